"""The README's student-friendly teacher table, from the current code:

  python tools/sftn_table.py [--seeds 0,1,2] [--root runs/sftn_table] [--variant VARIANT]

Runs `configs/digits_sftn.py` (an ordinary resnet8 teacher and an SFTN resnet8 of the same
budget with cnn_small branches, then cnn_small distilled from each with KD and with KD +
FitNets) once per seed in ROOT/seed_S (a finished seed is reused: delete ROOT to measure again)
and prints, per student, the mean ± standard deviation over the seeds of its test accuracy,
its teacher's, the agreement with its teacher and KL(teacher ‖ student), with the machine it ran
on, then the gain of the SFTN teacher's student over the ordinary one's per method (the paired
difference, seed by seed). `--variant` passes config variants (e.g. `steps=500`; a short check:
`fast`).
"""
import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_runs  # noqa: E402
from seed_runs import cell  # noqa: E402

COLUMNS = (('test accuracy (%)', 'test_accuracy', 100),
           ("teacher's test accuracy (%)", 'test_teacher_accuracy', 100),
           ('agreement (%)', 'test_agreement', 100), ('KL', 'test_kl', 1))
METHODS = ('kd', 'fitnet')
TEACHERS = (('teacher', 'ordinary'), ('sftn', 'SFTN'))


def run_seed(root: str, seed: int, variant: str) -> tuple[dict, str]:
  return seed_runs.run_seed(root, seed, 'configs/digits_sftn.py' + (f':{variant}' if variant else ''))


def table(runs) -> list[str]:
  """The markdown lines: one row per (method, teacher), then the SFTN gain per method."""
  lines = ['| student of | method | ' + ' | '.join(t for t, _, _ in COLUMNS) + ' |',
           '|---|---' + '|---' * len(COLUMNS) + '|']
  for method in METHODS:
    for stage_teacher, label in TEACHERS:
      stage = f'{method}_{stage_teacher}'
      cells = [cell([r[stage][key] for r in runs if key in r[stage]], scale,
                    2 if scale == 100 else 3) for _, key, scale in COLUMNS]
      lines.append(f'| {label} teacher | {method} | ' + ' | '.join(cells) + ' |')
  lines.append('')
  gains = [f'{method}: ' + cell([r[f'{method}_sftn']['test_accuracy'] -
                                 r[f'{method}_teacher']['test_accuracy'] for r in runs], 100, 2)
           for method in METHODS]
  lines.append('SFTN − ordinary teacher, student test accuracy (points): ' + '; '.join(gains))
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default='runs/sftn_table')
  parser.add_argument('--variant', default='')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = [run_seed(args.root, s, args.variant) for s in seeds]
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'{time.strftime("%Y-%m-%d")}; configs/digits_sftn.py'
        + (f':{args.variant}' if args.variant else '') + '; '
        + ', '.join(f'seed {s}: {w}' for s, (_, w) in zip(seeds, runs)))
  print('\n'.join(table([r for r, _ in runs])))


if __name__ == '__main__':
  main()
