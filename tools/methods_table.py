"""The distillation-methods table of docs/methods.md, from the current code:

  python tools/methods_table.py [--seeds 0,1,2] [--steps 1000] [--root runs/methods_table]

Runs `configs/digits_methods.py:steps=N` (a resnet8 teacher, then the same cnn_small student
taught by each method for N steps) once per seed in ROOT/seed_S: each seed is a whole replicate,
teacher included. A finished seed is reused (the trainer skips finished stages, so an
interrupted one resumes); delete ROOT to measure again. Prints the Markdown table: per method
the mean ± standard deviation over the seeds of the test accuracy, the top-1 agreement and
KL(teacher ‖ student) with the teacher, and linear CKA of two feature pairs.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bigkd.cli import config_module  # noqa: E402

CKA_PAIRS, METHODS = (getattr(config_module('digits_methods'), n) for n in ('CKA_PAIRS', 'METHODS'))

# (column title, summary key, scale): accuracy and agreement in %.
COLUMNS = (('test accuracy (%)', 'test_accuracy', 100), ('agreement (%)', 'test_agreement', 100),
           ('KL', 'test_kl', 1))
CKA_COLUMNS = tuple((f'CKA {s.split(".")[1]}~{t.split(".")[1]}', f'test_cka/{s},{t}', 1)
                    for s, t in CKA_PAIRS)


def run_seed(root: str, seed: int, steps: int) -> tuple[dict, str]:
  """({stage: summary}, wall time) of one seed's run."""
  workdir = os.path.join(root, f'seed_{seed}')
  start = time.time()
  if not os.path.exists(os.path.join(workdir, 'summary.json')):
    subprocess.run([sys.executable, '-m', 'bigkd.train', '--config',
                    f'configs/digits_methods.py:steps={steps}', '--workdir', workdir,
                    f'--config.seed={seed}'], check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    wall = f'{(time.time() - start) / 60:.1f} min'
  else:
    wall = '(reused)'
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)['stages'], wall


def mean_spread(values) -> str:
  mean = statistics.mean(values)
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  digits = 2 if abs(mean) >= 1 else 3
  return f'{mean:.{digits}f} ± {spread:.{digits}f}'


def table(runs: list[dict]) -> str:
  columns = COLUMNS + CKA_COLUMNS
  lines = ['| method | ' + ' | '.join(title for title, _, _ in columns) + ' |',
           '|---' * (len(columns) + 1) + '|']
  teacher = [100 * run['teacher']['test_accuracy'] for run in runs]
  lines.append(f'| teacher (resnet8, 16 px) | {mean_spread(teacher)} |'
               + ' |' * (len(columns) - 1))
  for method in METHODS:
    cells = [mean_spread([scale * run[method][key] for run in runs]) for _, key, scale in columns]
    lines.append(f'| {method} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--steps', type=int, default=1000, help='student steps per method')
  parser.add_argument('--root', default='runs/methods_table')
  args = parser.parse_args()
  runs, walls = [], []
  for seed in (int(s) for s in args.seeds.split(',')):
    summary, wall = run_seed(args.root, seed, args.steps)
    runs.append(summary)
    walls.append(f'seed {seed}: {wall}')
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'{time.strftime("%Y-%m-%d")}; {args.steps} student steps; {", ".join(walls)}\n')
  print(table(runs))


if __name__ == '__main__':
  main()
