"""Report: python -m bigkd.report WORKDIR [--split test] [--out FILE]

Writes WORKDIR/report.html, one self-contained page (figures embedded as PNG) about a run,
finished or still training: the summary table (CKA too where a stage measures it), each
stage's training curves, per-class accuracy of every stage side by side, for each distilled
stage the agreement matrix and the reliability diagram of it and its teacher, and the views
teacher and student see under each teaching mode. Predictions are on --split with the run's
evaluation protocol, at each stage's newest complete checkpoint.

Example (after `python -m bigkd.train --config configs/digits.py:fast --workdir runs/fast`):
  python -m bigkd.report runs/fast && open runs/fast/report.html
"""
import argparse
import base64
import html
import sys

from bigkd import cli, inspect, paths, plots

TABLE_KEYS = ('accuracy', 'teacher_accuracy', 'agreement', 'kl', 'cka')  # cka: mean over pairs


def image_tag(fig, caption: str) -> str:
  """A figure as an <img> with its PNG inline (the page needs no other file)."""
  data = base64.b64encode(plots.to_png(fig)).decode('ascii')
  return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
          f'<figcaption>{html.escape(caption)}</figcaption></figure>')


def stage_state(run, name: str) -> str:
  """'finished', 'training (step N)', 'started' or 'not started'."""
  if name in run.summary['stages']:
    return 'finished'
  if name not in run.stages:
    return 'not started'
  metrics = run.metrics[name]
  return f'training (step {int(metrics["step"].iloc[-1])})' if len(metrics) else 'started'


def summary_table(run, split: str) -> str:
  """Each stage's model, state and final evaluation on `split` (blank until it finishes)."""
  head = ''.join(f'<th>{split} {k.replace("_", " ")}</th>' for k in TABLE_KEYS)
  rows = []
  for name in run.planned:
    stage = run.config['stages'][name]
    final = run.summary['stages'].get(name, {})
    cells = ''.join(f'<td>{final[f"{split}_{k}"]:.4f}</td>' if f'{split}_{k}' in final
                    else '<td></td>' for k in TABLE_KEYS)
    model = ', '.join(f'{p}: {s["model"]} {s["resolution"]}px'
                      for p, s in stage.get('peers', {}).items()) or (
        f'{stage["model"]} {stage["resolution"]}px')
    rows.append(f'<tr><td>{html.escape(name)}</td><td>{html.escape(model)}</td>'
                f'<td>{stage_state(run, name)}</td>{cells}</tr>')
  return (f'<table><tr><th>stage</th><th>model</th><th>state</th>{head}</tr>'
          f'{"".join(rows)}</table>')


def prediction_figures(run, split: str) -> list[str]:
  """Per-class accuracy of every stage with a checkpoint; for each distilled stage, agreement
  with and calibration beside each of its teachers that is a stage of this run."""
  stages = {name: run.stage(name) for name in run.models()}
  if not stages:
    return []
  predictions = {name: stage.predict_split(split) for name, stage in stages.items()}
  labels = next(iter(predictions.values()))[1]
  class_names = next((s.class_names for s in stages.values() if s.class_names), None)
  logits = {name: p[0] for name, p in predictions.items()}
  tags = [image_tag(plots.per_class_accuracy(logits, labels, class_names),
                    f'accuracy per class on {split}')]
  for student in stages:
    for teacher in [t for t in run.teachers_of(student) if t in stages]:
      tags.append(image_tag(plots.agreement_matrix(logits[teacher], logits[student],
                                                   class_names, (teacher, student)),
                            f'{teacher} vs {student} top-1 predictions on {split}'))
      tags.append(image_tag(plots.reliability_diagram(
          {teacher: logits[teacher], student: logits[student]}, labels),
          f'calibration of {teacher} and {student} on {split}'))
  return tags


def views_figures(run, examples: int) -> list[str]:
  """For each distilled stage: the teaching modes applied to the batch of its newest
  checkpoint's step."""
  tags = []
  for name in run.stages:
    if not run.config['stages'][name].get('teachers') or not run.checkpoints[name]:
      continue
    step = run.checkpoints[name][-1]
    batch = inspect.step_batch(run, name, step)
    spec = run.built_stage(name).spec
    tags.append(image_tag(plots.views_grid(spec, batch.images, batch.sizes, batch.labels, step,
                                           examples),
                          f'{name}: teacher and student views under each teaching mode '
                          f'(the batch of step {step})'))
  return tags


STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}
td,th{border:1px solid #bbb;padding:4px 10px;text-align:right}td:first-child{text-align:left}
figure{display:inline-block;margin:0 1em 1em 0;vertical-align:top}
figcaption{font-size:small;color:#555}img{max-width:100%}"""


def render(run, split: str = 'test', examples: int = 4) -> str:
  """The report page of `run` as HTML text."""
  state = 'finished' if run.finished else 'in progress'
  curves = [image_tag(plots.training_curves(run.metrics[name], name), f'{name}: training')
            for name in run.stages if len(run.metrics[name])]
  parts = [f'<h1>bigkd run {html.escape(str(paths.absolute(run.workdir)))}</h1>',
           f'<p>Run {state}. Predictions at each stage\'s newest complete checkpoint.</p>',
           '<h2>Summary</h2>', summary_table(run, split),
           '<h2>Training curves</h2>', *curves,
           f'<h2>Predictions on {html.escape(split)}</h2>', *prediction_figures(run, split),
           '<h2>Views</h2>', *views_figures(run, examples)]
  return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>bigkd report</title>'
          f'<style>{STYLE}</style></head><body>{"".join(parts)}</body></html>\n')


def write_report(workdir: str, out: str | None = None, split: str = 'test',
                 examples: int = 4) -> str:
  """Writes the report (whole: a reader never sees half a page); returns its path."""
  run = inspect.load_run(workdir)
  if run.config is None:
    raise ValueError(f'{workdir!r} is not a bigkd workdir (no config.json)')
  out = out or str(paths.Path(workdir) / 'report.html')
  paths.write_text(out, render(run, split, examples))
  return out


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='bigkd-report', description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('workdir', help='the run folder (bigkd.train --workdir)')
  p.add_argument('--split', default='test', choices=('train', 'val', 'test'),
                 help='the split predictions are made on (default: test)')
  p.add_argument('--out', help='where to write the page (default: WORKDIR/report.html)')
  p.add_argument('--examples', type=int, default=4, help='images per row of the views grid')
  return p


def main(argv=None):
  """`argv` as sys.argv has it (the program name first); exit 2 with one line on a folder
  that is not a run."""
  argv = argv or sys.argv
  args = parser().parse_args(argv[1:])
  try:
    path = write_report(args.workdir, args.out, args.split, args.examples)
  except ValueError as e:
    cli.fail(str(e).splitlines()[0])
  print(path)


if __name__ == '__main__':
  main()
