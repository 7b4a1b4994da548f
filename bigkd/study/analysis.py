"""The study's numbers as the paper reports them: each part's results and the claims checked.

Pure functions of the collected results (`bigkd.study.runs.collect`): {'config', 'seeds': {seed:
{'teachers', 'runs', 'parts'}}, 'chosen_lrs', ...}. Every number is kept per seed; a summary is
the mean with the min and max over seeds, since with three seeds a standard deviation says less
than the range.
"""
import math

import numpy as np

from bigkd.config import comma_list

MODES = ('fixed_teacher', 'independent_noise', 'consistent', 'function_matching')
LABELS = {'fixed_teacher': 'fixed teacher', 'independent_noise': 'independent noise',
          'consistent': 'consistent', 'function_matching': 'function matching'}


def spread(values) -> dict | None:
  """Mean, min, max and count of the finite values (None when there are none)."""
  v = [x for x in values if x is not None and math.isfinite(x)]
  if not v:
    return None
  return dict(mean=float(np.mean(v)), min=float(min(v)), max=float(max(v)), n=len(v),
              values=[float(x) for x in values if x is not None])


def matched_budget(budgets, values, target):
  """The budget at which the curve `values` (a quality such as val KL, lower is better, given
  at `budgets`) first reaches `target`, interpolating linearly in log budget between the two
  budgets around the first crossing. Returns (budget, bound): bound '' for an interpolated
  budget; '>' when the curve never reaches the target (the budget is above the largest one,
  returned); '<' when its smallest budget already does (returned: the budget is at most that).
  Non-finite values (diverged runs) count as never reaching the target."""
  points = sorted((b, v) for b, v in zip(budgets, values))
  ok = lambda v: v is not None and math.isfinite(v)
  if ok(points[0][1]) and points[0][1] <= target:
    return float(points[0][0]), '<'
  for (b0, v0), (b1, v1) in zip(points, points[1:]):
    if ok(v1) and v1 <= target:
      if not ok(v0) or v1 == target:
        return float(b1), ''
      t = (v0 - target) / (v0 - v1)
      return float(math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))), ''
  return float(points[-1][0]), '>'


def budget_ratio(adam_budgets, adam_values, budget, value):
  """How many times `budget` the Adam curve needs to reach `value`: (ratio, bound), bound as in
  `matched_budget` ('>': at least that ratio, '<': at most)."""
  matched, bound = matched_budget(adam_budgets, adam_values, value)
  return matched / budget, bound


def fmt_ratio(ratio, bound) -> str:
  return f'{"≥" if bound == ">" else "≤" if bound == "<" else ""}{ratio:.2f}×'


def find(runs: dict, **fields) -> dict | None:
  """The run of a seed whose fields equal `fields` (shampoo={} unless given)."""
  fields.setdefault('shampoo', {})
  for record in runs.values():
    if all(record.get(k) == v for k, v in fields.items()):
      return record
  return None


def seeds(results) -> list[str]:
  return sorted(results['seeds'], key=int)


def across(results, key, **fields) -> dict | None:
  """`spread` of one metric of the run `fields` over the seeds (None values for missing runs)."""
  values = []
  for s in seeds(results):
    record = find(results['seeds'][s]['runs'], **fields)
    values.append(None if record is None or record.get('diverged') else record.get(key))
  return spread(values)


def default_run(config, **fields) -> dict:
  """The fields of a run with the study's defaults for what a part does not vary."""
  base = dict(mode='function_matching', optimizer='adam', lr=config['student']['lr'],
              teacher_resolution=config['teacher']['resolution'])
  return dict(base, **fields)



def modes_part(results) -> dict:
  c = results['config']
  budget = c['modes']['budget']
  out = {}
  for mode in comma_list(c['modes']['modes']):
    run = default_run(c, mode=mode, budget=budget)
    out[mode] = {k: across(results, k, **run) for k in ('test_kl', 'test_agreement',
                                                         'test_accuracy', 'val_kl')}
  return dict(budget=budget, modes=out)


def patience_part(results) -> dict:
  c = results['config']
  budgets = list(c['patience']['budgets'])
  out = {}
  for mode in comma_list(c['patience']['modes']):
    out[mode] = {str(b): {k: across(results, k, **default_run(c, mode=mode, budget=b))
                          for k in ('test_kl', 'test_agreement', 'test_accuracy')}
                 for b in budgets}
  return dict(budgets=budgets, modes=out)


def resolution_part(results) -> dict:
  c = results['config']
  out = {}
  for res in c['resolution']['teacher_resolutions']:
    run = default_run(c, budget=c['resolution']['budget'], teacher_resolution=res)
    entry = {k: across(results, k, **run) for k in ('test_kl', 'test_agreement',
                                                    'test_accuracy', 'test_teacher_accuracy')}
    out[str(res)] = entry
  return dict(budget=c['resolution']['budget'], student_resolution=c['student']['resolution'],
              teachers=out)


def curve(results, seed, optimizer, budgets, chosen) -> list:
  """Final val KL of `optimizer` at each budget with its chosen lr (None: missing/diverged)."""
  runs, out = results['seeds'][seed]['runs'], []
  for b in budgets:
    lr = chosen.get(f'{optimizer}/{b}')
    record = None if lr is None else find(runs, mode='function_matching', budget=b,
                                          optimizer=optimizer, lr=lr)
    out.append(None if record is None or record.get('diverged') else record.get('val_kl'))
  return out


def optimizer_part(results) -> dict:
  """The lr grid (mean final val KL over the grid seeds), each budget's chosen lr, each seed's
  curve at the chosen lrs, and for each Shampoo budget the Adam budget of equal final val KL
  (per seed, and on the seed-mean curves)."""
  c, chosen = results['config'], results['chosen_lrs']
  o = c['optimizer']
  grid_seeds = [s for s in seeds(results) if int(s) < o['grid_seeds']]
  grid = {}
  for name, budgets, lrs in (('adam', o['adam_budgets'], o['adam_lrs']),
                             ('shampoo', o['shampoo_budgets'], o['shampoo_lrs'])):
    for b in budgets:
      for lr in lrs:
        records = [find(results['seeds'][s]['runs'], mode='function_matching', budget=b,
                        optimizer=name, lr=lr) for s in grid_seeds]
        if all(r is not None for r in records):
          diverged = any(r['diverged'] for r in records)
          grid[f'{name}/{b}/{lr:g}'] = dict(
              optimizer=name, budget=b, lr=lr, diverged=diverged,
              val_kl=None if diverged else float(np.mean([r['val_kl'] for r in records])))
  curves, matched = {}, {}
  for s in seeds(results):
    a = curve(results, s, 'adam', o['adam_budgets'], chosen)
    sh = curve(results, s, 'shampoo', o['shampoo_budgets'], chosen)
    curves[s] = dict(adam=a, shampoo=sh)
    matched[s] = {}
    for b, v in zip(o['shampoo_budgets'], sh):
      if v is not None and any(x is not None for x in a):
        ratio, bound = budget_ratio(o['adam_budgets'], a, b, v)
        matched[s][str(b)] = dict(ratio=ratio, bound=bound, adam_budget=ratio * b)
  mean_curves = {name: [spread([curves[s][name][i] for s in curves]) for i in
                        range(len(o[f'{name}_budgets']))] for name in ('adam', 'shampoo')}
  mean_matched = {}
  adam_mean = [None if x is None else x['mean'] for x in mean_curves['adam']]
  complete = lambda xs: xs and all(x is not None and x['n'] == len(curves) for x in xs)
  if complete(mean_curves['adam']):
    for b, v in zip(o['shampoo_budgets'], mean_curves['shampoo']):
      if v is not None and v['n'] == len(curves):
        ratio, bound = budget_ratio(o['adam_budgets'], adam_mean, b, v['mean'])
        mean_matched[str(b)] = dict(ratio=ratio, bound=bound, adam_budget=ratio * b)
  return dict(adam_budgets=list(o['adam_budgets']), shampoo_budgets=list(o['shampoo_budgets']),
              grid=grid, chosen_lrs=chosen, grid_seeds=grid_seeds, curves=curves,
              mean_curves=mean_curves, matched=matched, mean_matched=mean_matched,
              shampoo_options=o['shampoo'])


def shampoo_options_part(results) -> dict:
  """Each Shampoo variant's final val KL at one budget on seed 0, and the Adam budget (seed 0's
  curve) that matches it."""
  c, chosen = results['config'], results['chosen_lrs']
  budget = c['shampoo_options']['budget']
  lr = chosen.get(f'shampoo/{budget}')
  if lr is None or '0' not in results['seeds']:
    return {}
  runs = results['seeds']['0']['runs']
  adam = curve(results, '0', 'adam', c['optimizer']['adam_budgets'], chosen)
  from bigkd.cli import config_module
  SHAMPOO_VARIANTS = config_module('study').SHAMPOO_VARIANTS
  out = {}
  for variant in comma_list(c['shampoo_options']['variants']):
    options = SHAMPOO_VARIANTS.get(variant, {})
    record = find(runs, mode='function_matching', budget=budget, optimizer='shampoo', lr=lr,
                  shampoo=dict(sorted(options.items())))
    if record is None:
      continue
    entry = dict(options=options, diverged=record['diverged'], val_kl=record.get('val_kl'))
    if not record['diverged'] and any(x is not None for x in adam):
      entry['ratio'], entry['bound'] = budget_ratio(c['optimizer']['adam_budgets'], adam,
                                                    budget, record['val_kl'])
    out[variant] = entry
  return dict(budget=budget, lr=lr, variants=out)


def claims(parts) -> dict:
  """The paper's claims checked on the numbers, per seed where they are paired: a claim holds
  on a seed or it does not; nothing here is a threshold."""
  out = {}
  modes = parts.get('modes', {}).get('modes', {})
  if modes and all(m.get('test_kl') for m in modes.values()):
    n = min(m['test_kl']['n'] for m in modes.values())
    best = [min(modes, key=lambda m: modes[m]['test_kl']['values'][i]) for i in range(n)]
    out['modes_function_matching_best'] = dict(
        seeds_best=[b == 'function_matching' for b in best], best_per_seed=best)
  pat = parts.get('patience', {})
  if pat.get('modes'):
    budgets = [str(b) for b in pat['budgets']]
    for mode, entry in pat['modes'].items():
      series = [entry[b]['test_kl'] for b in budgets]
      if all(series):
        n = min(x['n'] for x in series)
        per_seed = [[x['values'][i] for x in series] for i in range(n)]
        out[f'patience_{mode}'] = dict(
            improves_every_step=[all(b < a for a, b in zip(v, v[1:])) for v in per_seed],
            best_budget=[pat['budgets'][int(np.argmin(v))] for v in per_seed],
            last_over_best=[v[-1] / min(v) for v in per_seed])
    fm, ft = pat['modes'].get('function_matching'), pat['modes'].get('fixed_teacher')
    if fm and ft:
      ratios = {}
      for b in budgets:
        if fm[b]['test_kl'] and ft[b]['test_kl']:
          ratios[b] = [f / t for f, t in zip(fm[b]['test_kl']['values'],
                                             ft[b]['test_kl']['values'])]
      out['patience_fm_over_ft_test_kl'] = ratios
  opt = parts.get('optimizer', {})
  if opt.get('mean_matched'):
    out['shampoo_budget_ratio'] = {b: fmt_ratio(m['ratio'], m['bound'])
                                   for b, m in opt['mean_matched'].items()}
  return out


def analyse(results) -> dict:
  parts = dict(modes=modes_part(results), patience=patience_part(results),
               resolution=resolution_part(results), optimizer=optimizer_part(results),
               shampoo_options=shampoo_options_part(results))
  return dict(parts, claims=claims(parts))


def timing(results, elapsed_s: float, parts, calls=()) -> dict:
  """This call's wall time, every call's (study_calls.jsonl), and the compute time of
  everything on disk (each run's wall time when it was trained: a sum over calls, for a study
  made in several)."""
  walls = [r.get('wall_s') or 0 for s in results['seeds'].values()
           for r in list(s['runs'].values()) + list(s['teachers'].values())]
  return dict(this_call_s=round(elapsed_s, 1), this_call_parts=list(parts),
              runs_on_disk=len(walls), sum_of_run_walls_s=round(sum(walls), 1),
              calls=list(calls))
