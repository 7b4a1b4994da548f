"""bigkd.study: the matched-budget interpolation, the config, and the regression guard (the fast
variant: function matching against the fixed teacher at two budgets, one seed)."""
import json
import math
import os
import sys

import pytest

from bigkd.cli import config_module
from bigkd.study import analysis, command, runs
from bigkd.study.analysis import budget_ratio, matched_budget
from support import finish, start

BUDGETS = [100, 300, 1000, 3000]


def test_matched_budget_interpolates_on_log_budget():
  kls = [0.20, 0.10, 0.05, 0.04]
  # 0.075 is halfway from 0.10 (300) to 0.05 (1000): halfway in log budget, sqrt(300 * 1000).
  budget, bound = matched_budget(BUDGETS, kls, 0.075)
  assert bound == '' and budget == pytest.approx(math.sqrt(300 * 1000))  # 547.72
  # 0.18: a fifth of the way from 100 to 300 in log budget: 100 * 3 ** 0.2 = 124.57.
  assert matched_budget(BUDGETS, kls, 0.18)[0] == pytest.approx(124.5731, rel=1e-5)
  assert matched_budget(BUDGETS, kls, 0.05) == (1000.0, '')  # exactly on a point
  assert matched_budget(BUDGETS, kls, 0.3) == (100.0, '<')   # the smallest budget does better
  assert matched_budget(BUDGETS, kls, 0.03) == (3000.0, '>')  # never reached
  # the order of the points does not matter
  assert matched_budget(BUDGETS[::-1], kls[::-1], 0.075)[0] == pytest.approx(547.7226, rel=1e-6)


def test_matched_budget_takes_the_first_crossing_and_skips_diverged_runs():
  # not monotone: the first crossing of 0.11 is between 100 and 300, at 100 * 3 ** 0.9.
  budget, _ = matched_budget(BUDGETS, [0.2, 0.1, 0.12, 0.05], 0.11)
  assert budget == pytest.approx(100 * 3 ** 0.9)  # 268.98
  # a diverged run (None) never reaches the target; the first budget that does is taken whole
  assert matched_budget(BUDGETS, [None, 0.1, 0.05, 0.04], 0.15) == (300.0, '')
  assert matched_budget(BUDGETS, [None, None, None, None], 0.15) == (3000.0, '>')


def test_budget_ratio_is_the_adam_budget_over_the_shampoo_budget():
  ratio, bound = budget_ratio(BUDGETS, [0.20, 0.10, 0.05, 0.04], 100, 0.075)
  assert bound == '' and ratio == pytest.approx(5.477226, rel=1e-6)
  assert budget_ratio(BUDGETS, [0.20, 0.10, 0.05, 0.04], 1000, 0.03) == (3.0, '>')
  assert analysis.fmt_ratio(3.0, '>') == '≥3.00×'


def test_study_config_variants():
  assert config_module('study').get_config().seeds == 3
  assert config_module('study').get_config('fast').parts == 'modes,patience'
  with pytest.raises(ValueError, match=r"unknown variant 'fats' \(known: none, fast\)"):
    config_module('study').get_config('fats')


def test_runs_are_shared_between_parts():
  """Patience, modes and the optimizer's Adam grid name the same folder for the same run, so it
  is trained once."""
  c = config_module('study').get_config()
  names = lambda part, seed=0: {r.name for r in runs.part_runs(c, part, seed, {})}
  fm_1000 = runs.Run('function_matching', 1000).name
  assert fm_1000 == 'fm_t16_adam_lr0.003_b1000'
  assert fm_1000 in names('modes') & names('patience') & names('optimizer') & names('resolution')
  # seeds after the grid seeds run only the chosen lr, and nothing without a choice
  assert names('optimizer', 1) == set()
  chosen = {('adam', b): 1e-2 for b in c.optimizer.adam_budgets}
  assert {r.lr for r in runs.part_runs(c, 'optimizer', 1, chosen)} == {1e-2}


def test_cli_refuses_unknown_parts_and_variants(capsys):
  assert command.main(['unused', '--only', 'modes,patiense']) == 2
  assert 'patiense: unknown part (known: modes' in capsys.readouterr().err
  assert command.main(['unused', '--config', 'quick']) == 2
  assert "unknown variant 'quick'" in capsys.readouterr().err


# The regression guard, with bounds from the fast variant run on seeds 0-3 (docs/study.md):
# - function matching's test KL fell 4.7-8.5x from 100 to 400 steps (every seed; the full study
#   saw it fall at every budget step on every seed). A function matching broken on purpose
#   (teacher and student on independent crops, seeds 0-1) fell only 3.0-3.5x.
# - test KL(function matching) / test KL(fixed teacher) at 400 steps was 0.53-1.04: below 1 on
#   three seeds of four, so the guard asserts the bound, not the direction (the full study has
#   function matching ahead on every seed only at 3000 steps, 0.49-0.90). Broken: 2.1-2.3.
MIN_FM_IMPROVEMENT = 4.0
MAX_FM_OVER_FT = 1.5


@pytest.mark.integration
def test_fast_study_guards_function_matching(tmp_path):
  """The fast study (`python -m bigkd.study W --config fast` in a subprocess, as a user runs it:
  its compilation cache, in W, compiles the initialisation and evaluation once for the teacher
  and the runs): function matching improves with budget and is not behind the fixed teacher at
  the longer budget, within bounds measured over seeds; a re-run trains nothing again."""
  root = str(tmp_path / 'study')
  printed = finish(start([sys.executable, '-m', 'bigkd.study', root, '--config', 'fast']))
  with open(os.path.join(root, 'study.json')) as f:
    analysis = json.load(f)['analysis']
  modes, patience = analysis['modes']['modes'], analysis['patience']
  kl = lambda entry: entry['test_kl']['mean']
  fm_over_ft = kl(modes['function_matching']) / kl(modes['fixed_teacher'])
  short, long = (patience['modes']['function_matching'][str(b)] for b in patience['budgets'])
  improvement = kl(short) / kl(long)
  print(f'fm/ft {fm_over_ft:.3f}, fm improvement {improvement:.2f}x')
  assert fm_over_ft < MAX_FM_OVER_FT, (fm_over_ft, printed)
  assert improvement > MIN_FM_IMPROVEMENT, (improvement, printed)
  for name in ('study.md', 'patience.png', 'modes.png'):
    assert os.path.getsize(os.path.join(root, name)) > 0
  rerun = runs.Study(config_module('study').get_config('fast'), root, out=print)
  rerun.run(['modes', 'patience'])
  assert rerun.trained == []  # a re-run reads every finished run back, trains nothing
