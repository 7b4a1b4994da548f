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
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_runs  # noqa: E402

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
  print(seed_runs.machine_line(seeds, runs))
  seed_runs.print_table('stage', [(n, n) for n in runs[0][0]], runs, COLUMNS)


if __name__ == '__main__':
  main()
