"""The README's distillation-data table, from the current code:

  python tools/ood_table.py [--seeds 0,1,2] [--root runs/ood_table] [--variant steps=1500]

Runs `configs/digits_ood.py` (a resnet8 teacher on the labelled digits 0-4, then the same
cnn_small student distilled by function matching from the task's own train images, from the
digits 5-9 only (out of domain, unlabeled), and from both mixed 1:1) once per seed in
ROOT/seed_S (a finished seed is reused: delete ROOT to measure again) and prints, per stage, the
mean ± standard deviation over the seeds of the test accuracy on the task's test digits (0-4),
the agreement with the teacher and KL(teacher ‖ student), with the machine it ran on.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_runs  # noqa: E402

COLUMNS = (('test accuracy (%)', 'test_accuracy', 100), ('agreement (%)', 'test_agreement', 100),
           ('KL', 'test_kl', 1))
ROWS = (('teacher', 'teacher (resnet8, labelled digits 0-4)'),
        ('student_task', '(a) student on the task\'s train images'),
        ('student_ood', '(b) student on the digits 5-9 only (out of domain)'),
        ('student_mixed', '(c) student on both, 1:1 per batch'))


def run_seed(root: str, seed: int, variant: str) -> tuple[dict, str]:
  return seed_runs.run_seed(root, seed, 'configs/digits_ood.py' + (f':{variant}' if variant else ''))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default='runs/ood_table')
  parser.add_argument('--variant', default='', help="configs/digits_ood.py's, e.g. steps=3000")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = [run_seed(args.root, s, args.variant) for s in seeds]
  print(seed_runs.machine_line(seeds, runs))
  seed_runs.print_table('stage', ROWS, runs, COLUMNS)


if __name__ == '__main__':
  main()
