"""The study's report: WORKDIR/study.md (the tables), study.json (every number, per seed, and
the analysis) and a PNG per part with numbers."""
import json
import os

from bigkd.plots import to_png
from bigkd.study.analysis import LABELS, MODES, analyse, fmt_ratio
from bigkd.study.figures import FIGURES, has_numbers


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
