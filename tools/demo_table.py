"""The README's digits results table, from the current code:

  python tools/demo_table.py [--seeds 0,1,2] [--root runs/demo_table]

Runs the demo (`configs/digits.py`) once per seed in ROOT/seed_S (a finished seed is reused:
delete ROOT to measure again) and prints the Markdown table with the machine it ran on.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time


def run_seed(root: str, seed: int) -> dict:
  workdir = os.path.join(root, f'seed_{seed}')
  start = time.time()
  if not os.path.exists(os.path.join(workdir, 'summary.json')):
    subprocess.run([sys.executable, '-m', 'bigkd.train', '--config', 'configs/digits.py',
                    '--workdir', workdir, f'--config.seed={seed}'], check=True,
                   stdout=subprocess.DEVNULL)
    wall = f'{time.time() - start:.0f} s'
  else:
    wall = '(reused)'
  with open(os.path.join(workdir, 'summary.json')) as f:
    stages = json.load(f)['stages']
  return dict(seed=seed, wall=wall, **{name: 100 * stages[name]['test_accuracy']
                                       for name in ('teacher', 'student', 'baseline')},
              agreement=100 * stages['student']['test_agreement'])


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default='runs/demo_table')
  args = parser.parse_args()
  rows = [run_seed(args.root, int(s)) for s in args.seeds.split(',')]
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'{time.strftime("%Y-%m-%d")}\n')
  print('| seed | teacher | student | baseline | student–teacher agreement | wall time |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["seed"]} | {r["teacher"]:.2f} | {r["student"]:.2f} | {r["baseline"]:.2f} | '
          f'{r["agreement"]:.2f} | {r["wall"]} |')


if __name__ == '__main__':
  main()
