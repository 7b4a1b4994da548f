"""Self-distillation as stages: born-again generations (`bigkd.config.born_again`) are ordinary
distilled stages, each taught by the one before, planned like any other."""
import pytest

from bigkd.cli import config_module
from bigkd.config import ConfigError, born_again
from bigkd.plan import check_config, plan_stages
from support import tiny_config


def test_born_again_generations_are_stages_taught_by_the_one_before(tmp_path):
  c = born_again(tiny_config(steps=30), 'teacher', 2, ensemble=True, temperature=2.0)
  plans = {p.name: p for p in plan_stages(c, str(tmp_path), 1197, 10, 1)}
  gens = ['teacher', 'teacher_gen1', 'teacher_gen2']
  assert list(plans) == gens + ['teacher_gen_ensemble']
  for g in (1, 2):
    p = plans[gens[g]]
    assert [(t.name, t.source) for t in p.teachers] == [('teacher', str(tmp_path / gens[g - 1]))]
    assert (p.model, p.resolution, p.steps) == (plans['teacher'].model,
                                                 plans['teacher'].resolution, 30)
    assert p.temperature == 2.0  # the overrides reach every generation
  ensemble = plans['teacher_gen_ensemble']
  assert [t.source for t in ensemble.teachers] == [str(tmp_path / g) for g in gens]
  with pytest.raises(ConfigError, match='no stage'):
    born_again(tiny_config(), 'student', 2)
  with pytest.raises(ConfigError, match='generations=0'):
    born_again(tiny_config(), 'teacher', 0)
  longer = born_again(tiny_config(steps=30), 'teacher', 1, steps=60)  # an override wins
  assert longer.stages.teacher_gen1.steps == 60


def test_born_again_digits_config_and_its_variants():
  module = config_module('digits_born_again')
  assert module.get_config('fast,generations=3').stage_order == (
      'teacher,teacher_gen1,teacher_gen2,teacher_gen3')
  with pytest.raises(ValueError, match='unknown variant'):
    module.get_config('generations=two')
  byot = module.get_config('fast,byot')
  assert byot.stage_order == 'teacher,teacher_gen1,teacher_gen2,teacher_byot'
  own = byot.stages.teacher_byot
  assert (own.model, own.steps, tuple(own.self_taps), dict(own.teachers)) == (
      'resnet8', byot.stages.teacher.steps, ('stage1', 'stage2'), {})
  check_config(byot, 1)
