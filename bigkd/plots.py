"""Figures of a run: training curves, teacher-vs-student agreement, per-class accuracy,
calibration, and the views teacher and student see under each teaching mode.

Every function returns a `matplotlib.figure.Figure` made without pyplot: no global figure list
to leak from , no GUI backend needed. A
notebook shows a returned figure as it shows any; `to_png` renders one with Agg. Inputs are
plain arrays and DataFrames, mostly from `bigkd.inspect`:

    run = inspect.load_run(workdir)
    plots.training_curves(run.metrics['student'], 'student')
    logits, labels = run.stage('student').predict_split('test')
    plots.reliability_diagram({'student': logits}, labels)
"""
import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bigkd.views import GAP, PAIR_GAP, teaching_modes, views_grid_image

# (panel title, per-step training series, evaluation series drawn as points)
CURVE_PANELS = (
    ('loss', ('loss',), ()),
    ('kl_T1', ('kl_T1',), ('val_kl',)),
    ('agreement', ('agreement',), ('val_agreement',)),
    ('accuracy', (), ('val_accuracy', 'val_teacher_accuracy')),
    ('lr', ('lr',), ()),
)


def to_png(fig: Figure, dpi: int = 100) -> bytes:
  """The figure as PNG bytes, rendered by Agg whatever backend is active."""
  FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=dpi)
  return buffer.getvalue()


def _series(metrics, column):
  """(steps, values) of the rows where `column` was logged; None when it never was."""
  if column not in metrics or metrics[column].isna().all():
    return None
  rows = metrics[column].notna()
  return metrics['step'][rows].to_numpy(), metrics[column][rows].to_numpy()


def training_curves(metrics, title: str = '') -> Figure:
  """One panel per metric a stage logged (loss, kl_T1, agreement, val accuracies, lr): the
  per-step values as lines, the evaluations (`val_*`) as points. A supervised stage has no
  kl_T1 or agreement panel."""
  panels = [(name, [(c, s) for c in train if (s := _series(metrics, c)) is not None],
             [(c, s) for c in evals if (s := _series(metrics, c)) is not None])
            for name, train, evals in CURVE_PANELS]
  panels = [p for p in panels if p[1] or p[2]]
  if not panels:
    raise ValueError(f'no metrics logged yet{f" for {title}" if title else ""}')
  fig = Figure(figsize=(3.2 * max(len(panels), 1), 2.8), layout='constrained')
  for ax, (name, train, evals) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
    for column, (steps, values) in train:  # dots while there are few (one is not a line)
      ax.plot(steps, values, '.-' if len(steps) < 50 else '-', label=column)
    for column, (steps, values) in evals:
      ax.plot(steps, values, 'o--', label=column)
    ax.set_title(name)
    ax.set_xlabel('step')
    if [c for c, _ in train + evals] != [name]:  # a lone series named as its panel needs none
      ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  return fig


def _class_labels(num_classes, class_names):
  return list(class_names) if class_names else [str(i) for i in range(num_classes)]


def agreement_matrix(teacher_logits, student_logits, class_names=None,
                     names=('teacher', 'student')) -> Figure:
  """How often the student's top-1 class (columns) meets the teacher's (rows): the diagonal
  is where they agree, whatever the label."""
  num_classes = teacher_logits.shape[-1]
  counts = np.zeros((num_classes, num_classes), int)
  np.add.at(counts, (teacher_logits.argmax(-1), student_logits.argmax(-1)), 1)
  fig = Figure(figsize=(5, 4.4), layout='constrained')
  ax = fig.subplots()
  image = ax.imshow(counts, cmap='Blues')
  fig.colorbar(image, ax=ax, shrink=0.8)
  if num_classes <= 20:
    for (i, j), n in np.ndenumerate(counts):
      if n:
        ax.text(j, i, n, ha='center', va='center', fontsize=7,
                color='white' if n > counts.max() / 2 else 'black')
  labels = _class_labels(num_classes, class_names)
  ax.set_xticks(range(num_classes), labels, rotation=90 if num_classes > 10 else 0)
  ax.set_yticks(range(num_classes), labels)
  ax.set_xlabel(f'{names[1]} prediction')
  ax.set_ylabel(f'{names[0]} prediction')
  ax.set_title(f'{names[0]} vs {names[1]}: agreement {np.trace(counts) / counts.sum():.1%}')
  return fig


def per_class_accuracy(logits: dict, labels, class_names=None) -> Figure:
  """Accuracy on each class, one bar per model ({name: logits}) side by side."""
  labels = np.asarray(labels)
  num_classes = next(iter(logits.values())).shape[-1]
  fig = Figure(figsize=(max(6, 0.6 * num_classes * max(len(logits), 2) / 2), 3.4),
               layout='constrained')
  ax = fig.subplots()
  width = 0.8 / len(logits)
  for k, (name, model_logits) in enumerate(logits.items()):
    correct = model_logits.argmax(-1) == labels
    per_class = [correct[labels == c].mean() if np.any(labels == c) else np.nan
                 for c in range(num_classes)]
    ax.bar(np.arange(num_classes) + (k - (len(logits) - 1) / 2) * width, per_class, width,
           label=f'{name} ({correct.mean():.1%})')
  ax.set_xticks(range(num_classes), _class_labels(num_classes, class_names))
  ax.set_ylim(0, 1)
  ax.set_ylabel('accuracy')
  ax.set_title('accuracy per class')
  ax.legend(fontsize='small')
  return fig


def softmax(logits):
  z = np.exp(logits - logits.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def calibration(logits, labels, bins: int = 10) -> dict:
  """Top-1 confidence against accuracy in `bins` equal-width confidence bins: per bin the
  mean confidence, the accuracy and the count, and the expected calibration error (ECE, the
  count-weighted mean gap)."""
  probs = softmax(np.asarray(logits, np.float64))
  confidence, correct = probs.max(-1), probs.argmax(-1) == np.asarray(labels)
  which = np.minimum((confidence * bins).astype(int), bins - 1)
  count = np.bincount(which, minlength=bins)
  with np.errstate(invalid='ignore'):
    mean_conf = np.bincount(which, confidence, bins) / count
    accuracy = np.bincount(which, correct, bins) / count
  gaps = np.where(count > 0, np.abs(np.nan_to_num(accuracy - mean_conf)), 0.0)
  return dict(confidence=mean_conf, accuracy=accuracy, count=count,
              ece=float(np.sum(count * gaps) / count.sum()))


def reliability_diagram(logits: dict, labels, bins: int = 10) -> Figure:
  """Accuracy against confidence per model ({name: logits}); on the diagonal a model is as
  sure as it is right. The legend gives each model's ECE."""
  fig = Figure(figsize=(4.6, 4.2), layout='constrained')
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], ':', color='grey', label='calibrated')
  for name, model_logits in logits.items():
    c = calibration(model_logits, labels, bins)
    seen = c['count'] > 0
    ax.plot(c['confidence'][seen], c['accuracy'][seen], 'o-',
            label=f'{name} (ECE {c["ece"]:.3f})')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel('confidence (top-1 probability)')
  ax.set_ylabel('accuracy')
  ax.set_title('reliability')
  ax.legend(fontsize='small')
  return fig


def views_grid(spec, images, sizes, labels, step: int, examples: int = 4) -> Figure:
  """`views_grid_image` as a figure, its rows named by teaching mode and its columns by model
  and resolution."""
  n, cell, modes = min(examples, len(images)), 64, teaching_modes(spec)
  grid = views_grid_image(spec, images, sizes, labels, step, n, cell)
  fig = Figure(figsize=(grid.shape[1] / 60 + 1.6, grid.shape[0] / 60 + 0.8),
               layout='constrained')
  ax = fig.subplots()
  ax.imshow(grid, interpolation='nearest')
  pair = 2 * cell + GAP + PAIR_GAP
  x = [e * pair + cell / 2 + k * (cell + GAP) for e in range(n) for k in (0, 1)]
  teacher_res = spec.teachers[0].resolution
  ax.set_xticks(x, [f'teacher {teacher_res}px', f'student {spec.resolution}px'] * n,
                fontsize=7, rotation=20)
  ax.set_yticks([r * (cell + PAIR_GAP) + cell / 2 for r in range(len(modes))], modes)
  ax.tick_params(length=0)
  ax.set_frame_on(False)
  ax.set_title(f'teacher and student views, step {step}')
  return fig


def figure_facts(fig: Figure) -> dict:
  """What a figure holds, per axes (title, x label, lines, bars, images, legend entries),
  minus colour bars: enough to check a figure is not empty without looking at it."""
  facts = []
  for ax in fig.axes:
    if ax.get_label() == '<colorbar>':
      continue
    legend = ax.get_legend()
    facts.append(dict(title=ax.get_title(), xlabel=ax.get_xlabel(), lines=len(ax.lines),
                      points=sum(len(line.get_xdata()) for line in ax.lines),
                      bars=len(ax.patches), images=len(ax.images),
                      legend=[t.get_text() for t in legend.get_texts()] if legend else []))
  return dict(suptitle=fig.get_suptitle(), axes=facts)
