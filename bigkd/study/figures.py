"""The study's figures: matplotlib `Figure`s made without pyplot, as in `bigkd.plots`, from the
parts of `analysis.analyse`."""
from matplotlib.figure import Figure

from bigkd.study.analysis import LABELS, MODES, fmt_ratio

COLORS = {'fixed_teacher': 'tab:red', 'independent_noise': 'tab:orange',
          'consistent': 'tab:green', 'function_matching': 'tab:blue', 'adam': 'tab:gray',
          'shampoo': 'tab:purple'}


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
