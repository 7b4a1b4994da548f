"""The README's ViT / ResNet cross-distillation table on the digits, from the current code:

  python tools/vit_table.py [--seeds 0,1,2] [--root runs/vit_table] [--variant steps=N]

Runs `configs/digits_vit.py` (resnet8 and a small ViT on labels, then a ViT distilled from the
resnet8 and a resnet8 distilled from the ViT, all at 16 px for the same steps) once per seed in
ROOT/seed_S (a finished seed is reused: delete ROOT to measure again) and prints, per stage, the
mean ± standard deviation over the seeds of the test accuracy, the agreement with its teacher
and KL(teacher ‖ stage), with the machine it ran on and each seed's wall time.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_runs  # noqa: E402

COLUMNS = (('test accuracy (%)', 'test_accuracy', 100), ('agreement (%)', 'test_agreement', 100),
           ('KL', 'test_kl', 1))
# What each stage of configs/digits_vit.py is, for the table's first column.
ROWS = {'resnet8': 'resnet8, labels', 'vit': 'ViT, labels',
        'vit_from_resnet8': 'ViT ← resnet8', 'resnet8_from_vit': 'resnet8 ← ViT'}


def run_seed(root: str, seed: int, variant: str) -> tuple[dict, str]:
  return seed_runs.run_seed(root, seed, 'configs/digits_vit.py' + (f':{variant}' if variant else ''))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default='runs/vit_table')
  parser.add_argument('--variant', default='', help="configs/digits_vit.py's variant, e.g. "
                      "'steps=100' (a seed that finished is reused whatever its variant)")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = [run_seed(args.root, s, args.variant) for s in seeds]
  print(seed_runs.machine_line(seeds, runs))
  seed_runs.print_table('stage', [(n, ROWS.get(n, n)) for n in runs[0][0]], runs, COLUMNS)


if __name__ == '__main__':
  main()
