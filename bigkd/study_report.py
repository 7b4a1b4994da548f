"""The study's numbers as the paper shows them: tables (study.md), figures (PNGs), study.json.

Pure functions of the collected results (`bigkd.study.collect`): {'config', 'seeds': {seed:
{'teachers', 'runs', 'parts'}}, 'chosen_lrs', ...}. Every number is kept per seed; a summary is
the mean with the min and max over seeds, since with three seeds a standard deviation says less
than the range. Figures are matplotlib `Figure`s made without pyplot, as in `bigkd.plots`.
"""
import json
import math
import os

import numpy as np
from matplotlib.figure import Figure

from bigkd.config import comma_list
from bigkd.plots import to_png

MODES = ('fixed_teacher', 'independent_noise', 'consistent', 'function_matching')
LABELS = {'fixed_teacher': 'fixed teacher', 'independent_noise': 'independent noise',
          'consistent': 'consistent', 'function_matching': 'function matching'}
COLORS = {'fixed_teacher': 'tab:red', 'independent_noise': 'tab:orange',
          'consistent': 'tab:green', 'function_matching': 'tab:blue', 'adam': 'tab:gray',
          'shampoo': 'tab:purple'}


# ----------------------------------------------------------------------------- numbers
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


# ----------------------------------------------------------------------------- figures
def budget_ticks(ax, budgets):
  """The budgets themselves as the ticks of a log axis (not powers of ten)."""
  from matplotlib.ticker import NullLocator
  ax.set_xticks(budgets, [str(b) for b in budgets])
  ax.xaxis.set_minor_locator(NullLocator())


def _band(ax, x, entries, color, label, marker='o'):
  """Mean line with the min-max band over seeds, and every seed as a dot."""
  keep = [(b, e) for b, e in zip(x, entries) if e]
  if not keep:
    return
  xs = [b for b, _ in keep]
  ax.plot(xs, [e['mean'] for _, e in keep], marker + '-', color=color, label=label)
  ax.fill_between(xs, [e['min'] for _, e in keep], [e['max'] for _, e in keep], color=color,
                  alpha=0.2, lw=0)
  for b, e in keep:
    ax.plot([b] * len(e['values']), e['values'], '.', color=color, alpha=0.5, ms=4)


def patience_figure(part) -> Figure:
  """Test KL and agreement against budget per mode (log x): the paper's 'patient' figure."""
  fig = Figure(figsize=(8.5, 3.2), layout='constrained')
  axes = fig.subplots(1, 2)
  for mode, entry in part['modes'].items():
    budgets = part['budgets']
    _band(axes[0], budgets, [entry[str(b)]['test_kl'] for b in budgets], COLORS[mode],
          LABELS[mode])
    agree = [entry[str(b)]['test_agreement'] for b in budgets]
    agree = [None if a is None else {k: (100 * v if k in ('mean', 'min', 'max') else
                                         [100 * x for x in v] if k == 'values' else v)
                                     for k, v in a.items()} for a in agree]
    _band(axes[1], budgets, agree, COLORS[mode], LABELS[mode])
  for ax, title in zip(axes, ('test KL(teacher ‖ student)', 'test agreement (%)')):
    ax.set_xscale('log')
    ax.set_xlabel('training steps (each with its own schedule)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    budget_ticks(ax, part['budgets'])
  axes[0].set_yscale('log')
  axes[0].legend(fontsize='small')
  return fig


def modes_figure(part) -> Figure:
  """The four teaching modes at one budget: mean, min-max over seeds and each seed."""
  fig = Figure(figsize=(8.5, 3.2), layout='constrained')
  axes = fig.subplots(1, 2)
  modes = [m for m in MODES if m in part['modes']]
  for ax, key, scale, title in ((axes[0], 'test_kl', 1, 'test KL(teacher ‖ student)'),
                                (axes[1], 'test_agreement', 100, 'test agreement (%)')):
    for i, mode in enumerate(modes):
      e = part['modes'][mode][key]
      if not e:
        continue
      ax.bar(i, scale * e['mean'], color=COLORS[mode], alpha=0.7,
             yerr=[[scale * (e['mean'] - e['min'])], [scale * (e['max'] - e['mean'])]],
             capsize=4)
      ax.plot([i] * len(e['values']), [scale * v for v in e['values']], 'k.', ms=4)
    ax.set_xticks(range(len(modes)), [LABELS[m].replace(' ', '\n') for m in modes],
                  fontsize='small')
    ax.set_title(f'{title}, {part["budget"]} steps')
    ax.grid(alpha=0.3, axis='y')
  agreements = [part['modes'][m]['test_agreement'] for m in modes]
  if all(agreements):
    low = min(a['min'] for a in agreements)
    axes[1].set_ylim(max(0, 100 * low - 2), 100)
  return fig


def optimizer_figure(part) -> Figure:
  """Final val KL against budget for Adam and Shampoo (each budget its own schedule and best
  lr), every seed thin and the mean thick, with the budget ratio at matched KL."""
  fig = Figure(figsize=(8.5, 3.4), layout='constrained')
  axes = fig.subplots(1, 2)
  ax = axes[0]
  for name in ('adam', 'shampoo'):
    budgets = part[f'{name}_budgets']
    _band(ax, budgets, part['mean_curves'][name], COLORS[name], name.capitalize())
  for b, m in part['mean_matched'].items():
    if m['bound'] == '':
      ax.annotate(fmt_ratio(m['ratio'], m['bound']), (float(b), 1), xycoords=('data',
                  'axes fraction'), xytext=(0, -12), textcoords='offset points', ha='center',
                  fontsize='small', color=COLORS['shampoo'])
  ax.set_title('final val KL at the best lr of each budget\n(Shampoo steps × ratio = '
               'Adam steps of equal KL)', fontsize='medium')
  ax.legend(fontsize='small')
  ax = axes[1]
  for name, style in (('adam', '-'), ('shampoo', '--')):
    lrs = sorted({g['lr'] for g in part['grid'].values() if g['optimizer'] == name})
    for i, lr in enumerate(lrs):
      points = sorted((g['budget'], g['val_kl']) for g in part['grid'].values()
                      if g['optimizer'] == name and g['lr'] == lr and g['val_kl'] is not None)
      if points:
        ax.plot(*zip(*points), 'o' + style, color=COLORS[name], alpha=0.35 + 0.3 * i,
                label=f'{name} lr {lr:g}', ms=4)
  ax.set_title(f'the lr grid (seed{"s" if len(part["grid_seeds"]) > 1 else ""} '
               f'{", ".join(part["grid_seeds"])})')
  ax.legend(fontsize='x-small', ncol=2)
  for ax in axes:
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('training steps (each with its own schedule)')
    ax.grid(alpha=0.3)
    budget_ticks(ax, sorted(set(part['adam_budgets']) | set(part['shampoo_budgets'])))
  return fig


def resolution_figure(part) -> Figure:
  """Student accuracy and agreement for each teacher resolution, and the teachers' accuracy:
  KL is not comparable across teachers, accuracy is (the paper compares student accuracy)."""
  fig = Figure(figsize=(9.5, 3.0), layout='constrained')
  axes = fig.subplots(1, 3)
  res = list(part['teachers'])
  for ax, key, title in ((axes[0], 'test_accuracy', 'student test accuracy'),
                         (axes[1], 'test_agreement', 'student-teacher test agreement'),
                         (axes[2], 'test_teacher_accuracy', 'teacher test accuracy')):
    low = 100.0
    for i, r in enumerate(res):
      e = part['teachers'][r][key]
      if e:
        low = min(low, 100 * e['min'])
        ax.bar(i, 100 * e['mean'], color='tab:blue', alpha=0.6,
               yerr=[[100 * (e['mean'] - e['min'])], [100 * (e['max'] - e['mean'])]],
               capsize=4)
        ax.plot([i] * len(e['values']), [100 * v for v in e['values']], 'k.', ms=4)
    ax.set_xticks(range(len(res)), [f'{r} px teacher' for r in res])
    ax.set_ylim(max(0.0, low - 1.5), 100)
    ax.set_title(f'{title} (%)', fontsize='medium')
    ax.grid(alpha=0.3, axis='y')
  fig.suptitle(f'student at {part["student_resolution"]} px, function matching, '
               f'{part["budget"]} steps', fontsize='medium')
  return fig


# ----------------------------------------------------------------------------- tables
def cell(e, scale=1.0, digits=4) -> str:
  """'mean (min–max)' over seeds; '–' when missing."""
  if not e:
    return '–'
  if e['n'] == 1:
    return f'{scale * e["mean"]:.{digits}f}'
  return (f'{scale * e["mean"]:.{digits}f} ({scale * e["min"]:.{digits}f}–'
          f'{scale * e["max"]:.{digits}f})')


def markdown(results, parts) -> str:
  n = len(results['seeds'])
  lines = [f'# bigkd study on the digits ({n} seed{"s" if n > 1 else ""})', '',
           'Cells: mean over seeds (min–max). KL is KL(teacher ‖ student) at T = 1 on the '
           '300 test (or val) digits, each model on the whole image at its resolution; '
           'agreement and accuracy in %.', '']
  m = parts['modes']
  if any(e['test_kl'] for e in m['modes'].values()):
    lines += [f'## Teaching modes ({m["budget"]} steps)', '',
              '| mode | test KL | test agreement | test accuracy |', '|---|---|---|---|']
    for mode in MODES:
      if mode in m['modes']:
        e = m['modes'][mode]
        lines.append(f'| {LABELS[mode]} | {cell(e["test_kl"])} | '
                     f'{cell(e["test_agreement"], 100, 2)} | {cell(e["test_accuracy"], 100, 2)} |')
    lines.append('')
  p = parts['patience']
  if p['modes']:
    lines += ['## Patience (test KL; agreement below)', '',
              '| steps | ' + ' | '.join(LABELS[x] for x in p['modes']) + ' |',
              '|---|' + '---|' * len(p['modes'])]
    for b in p['budgets']:
      lines.append(f'| {b} | ' + ' | '.join(cell(p['modes'][x][str(b)]['test_kl'])
                                             for x in p['modes']) + ' |')
    lines += ['', '| steps | ' + ' | '.join(LABELS[x] for x in p['modes']) + ' |',
              '|---|' + '---|' * len(p['modes'])]
    for b in p['budgets']:
      lines.append(f'| {b} | ' + ' | '.join(cell(p['modes'][x][str(b)]['test_agreement'],
                                                  100, 2) for x in p['modes']) + ' |')
    lines.append('')
  r = parts['resolution']
  if any(e['test_accuracy'] for e in r['teachers'].values()):
    lines += [f'## Resolution (student {r["student_resolution"]} px, function matching, '
              f'{r["budget"]} steps)', '',
              '| teacher | teacher test accuracy | student test accuracy | test agreement | '
              'test KL |', '|---|---|---|---|---|']
    for res, e in r['teachers'].items():
      lines.append(f'| {res} px | {cell(e["test_teacher_accuracy"], 100, 2)} | '
                   f'{cell(e["test_accuracy"], 100, 2)} | {cell(e["test_agreement"], 100, 2)} '
                   f'| {cell(e["test_kl"])} |')
    lines.append('')
  o = parts['optimizer']
  if any(g['optimizer'] == 'shampoo' for g in o['grid'].values()):
    lines += ['## Optimizer: Adam vs Shampoo, each budget its own warmup + cosine schedule', '',
              f'Learning-rate grid, final val KL (mean over seed(s) {", ".join(o["grid_seeds"])}'
              '); **bold**: chosen, used for every seed.', '',
              '| optimizer | steps | ' + ' | '.join(
                  f'lr {lr:g}' for lr in sorted({g['lr'] for g in o['grid'].values()})) + ' |']
    lrs = sorted({g['lr'] for g in o['grid'].values()})
    lines.append('|---|---|' + '---|' * len(lrs))
    for name in ('adam', 'shampoo'):
      for b in o[f'{name}_budgets']:
        row = []
        for lr in lrs:
          g = o['grid'].get(f'{name}/{b}/{lr:g}')
          text = '–' if g is None else 'diverged' if g['diverged'] else f'{g["val_kl"]:.4f}'
          row.append(f'**{text}**' if o['chosen_lrs'].get(f'{name}/{b}') == lr else text)
        lines.append(f'| {name} | {b} | ' + ' | '.join(row) + ' |')
    lines += ['', 'Final val KL at the chosen lr (all seeds):', '',
              '| steps | Adam | Shampoo |', '|---|---|---|']
    for b in sorted(set(o['adam_budgets']) | set(o['shampoo_budgets'])):
      cells = []
      for name in ('adam', 'shampoo'):
        budgets = o[f'{name}_budgets']
        cells.append(cell(o['mean_curves'][name][budgets.index(b)]) if b in budgets else '–')
      lines.append(f'| {b} | ' + ' | '.join(cells) + ' |')
    lines += ['', 'Adam steps that reach each Shampoo budget\'s final val KL (log-budget '
              'interpolation) and their ratio to the Shampoo steps:', '',
              '| Shampoo steps | on the mean curves | per seed |', '|---|---|---|']
    for b in o['shampoo_budgets']:
      mm = o['mean_matched'].get(str(b))
      per = [o['matched'][s].get(str(b)) for s in o['matched']]
      lines.append(f'| {b} | ' + (f'{mm["adam_budget"]:.0f} steps: '
                                   f'{fmt_ratio(mm["ratio"], mm["bound"])}' if mm else '–')
                   + ' | ' + ', '.join('–' if x is None else fmt_ratio(x['ratio'], x['bound'])
                                       for x in per) + ' |')
    lines += ['', f'Shampoo options: {o["shampoo_options"]} (the rest: '
              '`default_shampoo_options()`).', '']
  so = parts['shampoo_options']
  if so.get('variants'):
    lines += [f'## Shampoo options varied one at a time ({so["budget"]} steps, lr '
              f'{so["lr"]:g}, seed 0)', '',
              '| variant | change | final val KL | Adam budget ratio |', '|---|---|---|---|']
    for v, e in so['variants'].items():
      kl = 'diverged' if e['diverged'] else f'{e["val_kl"]:.4f}'
      ratio = fmt_ratio(e['ratio'], e['bound']) if 'ratio' in e else '–'
      change = ', '.join(f'{k}={x}' for k, x in e['options'].items()) or '(base)'
      lines.append(f'| {v} | {change} | {kl} | {ratio} |')
    lines.append('')
  t = results.get('timing')
  if t:
    mach = results.get('machine', {})
    lines += ['## Time and machine', '',
              f'Machine: {mach.get("cpus")} CPUs ({mach.get("device")}), jax {mach.get("jax")}, '
              f'{mach.get("platform")}. The {t["runs_on_disk"]} runs on disk (teachers '
              f'included) took {t["sum_of_run_walls_s"] / 60:.1f} min of training when they '
              'ran. The calls of the command on this workdir:', '',
              '| started | parts | seeds | runs trained | wall time | load average at the end |',
              '|---|---|---|---|---|---|']
    for call in t.get('calls') or []:
      lines.append(f'| {call["started"]} | {", ".join(call["parts"])} | {call["seeds"]} | '
                   f'{call["trained"]} | {call["wall_s"] / 60:.1f} min | '
                   f'{call.get("load_average_at_end")} |')
    lines.append('')
  return '\n'.join(lines)


FIGURES = (('patience', patience_figure), ('modes', modes_figure),
           ('optimizer', optimizer_figure), ('resolution', resolution_figure))


def has_numbers(name, part) -> bool:
  """Whether a part has enough finished runs to draw."""
  if name == 'patience':
    return any(e[str(b)]['test_kl'] for e in part['modes'].values() for b in part['budgets'])
  if name == 'modes':
    return any(e['test_kl'] for e in part['modes'].values())
  if name == 'optimizer':
    return any(x for xs in part['mean_curves'].values() for x in xs)
  if name == 'resolution':
    return any(e['test_accuracy'] for e in part['teachers'].values())
  return False


def write_report(results, root: str) -> list[str]:
  """WORKDIR/study.json, study.md and a PNG per part with numbers; returns the paths."""
  parts = analyse(results)
  written = []
  for name, make in FIGURES:
    if has_numbers(name, parts[name]):
      path = os.path.join(root, f'{name}.png')
      with open(path, 'wb') as f:
        f.write(to_png(make(parts[name]), dpi=80))
      written.append(path)
  path = os.path.join(root, 'study.md')
  with open(path, 'w') as f:
    f.write(markdown(results, parts))
  written.append(path)
  path = os.path.join(root, 'study.json')
  with open(path + '.tmp', 'w') as f:
    json.dump(dict(results, analysis=parts), f, indent=1)
  os.replace(path + '.tmp', path)
  return [path] + written
