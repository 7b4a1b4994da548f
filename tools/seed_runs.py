"""What the README's seed tables share (tools/*_table.py): one run of a bundled config per seed
in ROOT/seed_S (a finished seed is reused: delete ROOT to measure again), mean ± standard
deviation cells, and the line naming the machine and each seed's wall time."""
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def run_seed(root: str, seed: int, config: str) -> tuple[dict, str]:
  """({stage: summary}, wall time) of `bigkd.train --config CONFIG` for `seed` in ROOT/seed_S."""
  workdir = os.path.join(root, f'seed_{seed}')
  start = time.time()
  wall = '(reused)'
  if not os.path.exists(os.path.join(workdir, 'summary.json')):
    subprocess.run([sys.executable, '-m', 'bigkd.train', '--config', config, '--workdir',
                    workdir, f'--config.seed={seed}'], check=True, stdout=subprocess.DEVNULL)
    wall = f'{(time.time() - start) / 60:.1f} min'
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)['stages'], wall


def cell(values, scale, digits):
  """'mean ± std' of `values` × `scale` ('' for none; a spread of 0 for one value)."""
  if not values:
    return ''
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f'{scale * statistics.mean(values):.{digits}f} ± {scale * spread:.{digits}f}'


def machine_line(seeds, runs, extra='') -> str:
  """The machine, the date and each seed's wall time (runs: [(stages, wall)] per seed)."""
  return (f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'{time.strftime("%Y-%m-%d")}; {extra}' + ', '.join(
              f'seed {s}: {w}' for s, (_, w) in zip(seeds, runs)))


def print_table(first: str, rows, runs, columns) -> None:
  """The Markdown table: a row per (stage name, label) of `rows`, a column per (title, summary
  key, scale) of `columns`, each cell the mean ± std over the seeds' `runs` ([(stages, wall)])."""
  print(f'| {first} | ' + ' | '.join(title for title, _, _ in columns) + ' |')
  print('|---' * (len(columns) + 1) + '|')
  for name, label in rows:
    cells = [cell([r[name][key] for r, _ in runs if key in r[name]], scale,
                  2 if scale == 100 else 3) for _, key, scale in columns]
    print(f'| {label} | ' + ' | '.join(cells) + ' |')
