"""The README's deep-mutual-learning table, from the current code:

  python tools/dml_table.py [--seeds 0,1,2] [--variant same] [--root runs/dml_table]

Runs `configs/digits_dml.py` (two peers, cnn_small at 12 px and resnet8 at 16 px, trained
together by deep mutual learning, and each model trained alone for as many steps; `--variant`
is passed on, e.g. `same` for two cnn_small peers) once per seed in ROOT/seed_S (a finished seed
is reused: delete ROOT to measure again) and prints, per model, the mean ± standard deviation
over the seeds of the test accuracy and, for the peers, the agreement with and KL from the other
peer(s), with the machine it ran on.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_runs  # noqa: E402

COLUMNS = (('test accuracy (%)', 'test_accuracy', 100),
           ('agreement with the other peer(s) (%)', 'test_agreement', 100),
           ('KL(others ‖ peer)', 'test_kl', 1))


def run_seed(root: str, seed: int, variant: str) -> tuple[dict, str]:
  return seed_runs.run_seed(root, seed, 'configs/digits_dml.py' + (f':{variant}' if variant else ''))


def model_rows(stages: dict) -> dict:
  """{row: {metric: value}}: each peer of a mutual stage as 'STAGE/PEER' (its `PEER/test_*`
  metrics, and the peers' ensemble as 'STAGE (ensemble)'), every other stage as itself."""
  rows = {}
  for name, summary in stages.items():
    for peer in summary.get('peers', {}):
      rows[f'{name}/{peer}'] = {key[len(peer) + 1:]: value for key, value in summary.items()
                                if key.startswith(f'{peer}/')}
    if summary.get('peers'):
      rows[f'{name} (ensemble)'] = {'test_accuracy': summary['test_ensemble_accuracy']}
    else:
      rows[name] = summary
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--variant', default='', help="configs/digits_dml.py's variant")
  parser.add_argument('--root', default='runs/dml_table')
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = [(model_rows(stages), wall) for stages, wall in
          (run_seed(args.root, s, args.variant) for s in seeds)]
  print(seed_runs.machine_line(seeds, runs))
  seed_runs.print_table('model', [(n, n) for n in runs[0][0]], runs, COLUMNS)


if __name__ == '__main__':
  main()
