"""The README's self-distillation table, from the current code:

  python tools/born_again_table.py [--seeds 0,1,2] [--root runs/born_again_table]

Runs `configs/digits_born_again.py:ensemble,byot` (a resnet8 teacher on labels, two generations
of resnet8 each distilled from the one before, one from the ensemble of all three, and the
teacher's model and budget with its own shallow classifiers: "be your own teacher") once per
seed in ROOT/seed_S (a finished seed is reused: delete ROOT to measure again) and prints, per
stage, the mean ± standard deviation over the seeds of the test accuracy, the agreement with
its teacher and KL(teacher ‖ stage), with the machine it ran on.
"""
import argparse
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_runs  # noqa: E402
from seed_runs import cell  # noqa: E402

COLUMNS = (('test accuracy (%)', 'test_accuracy', 100), ('agreement (%)', 'test_agreement', 100),
           ('KL', 'test_kl', 1))


def run_seed(root: str, seed: int) -> tuple[dict, str]:
  return seed_runs.run_seed(root, seed, 'configs/digits_born_again.py:ensemble,byot')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default='runs/born_again_table')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = [run_seed(args.root, s) for s in seeds]
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'{time.strftime("%Y-%m-%d")}; ' + ', '.join(f'seed {s}: {w}'
                                                    for s, (_, w) in zip(seeds, runs)))
  print('| stage | ' + ' | '.join(title for title, _, _ in COLUMNS) + ' |')
  print('|---' * (len(COLUMNS) + 1) + '|')
  for name in runs[0][0]:
    cells = [cell([r[name][key] for r, _ in runs if key in r[name]], scale,
                  2 if scale == 100 else 3) for _, key, scale in COLUMNS]
    print(f'| {name} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
