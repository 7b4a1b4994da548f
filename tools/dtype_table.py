"""The README's bfloat16-student table, from the current code:

  python tools/dtype_table.py [--seeds 0,1,2] [--root runs/dtype_table] [--student_steps N]

Runs `configs/digits.py` (resnet8 teacher on labels, cnn_small student distilled by function
matching, cnn_small baseline on labels) once per seed with the student computing in float32 and
once in bfloat16 (`--config.stages.student.compute_dtype=bfloat16`: convolutions and matmuls
in bfloat16; parameters, Adam state, logits, losses and normalisation statistics in float32), in
ROOT/DTYPE/seed_S (a finished run is reused: delete ROOT to measure again). Prints, per dtype,
the mean ± standard deviation over the seeds of the student's test accuracy, its agreement with
the teacher and KL(teacher ‖ student), and whether the bfloat16 mean lies within the float32
spread (mean ± 2 std, at least the difference of one test example, 1/300), with the machine it ran on.
`--student_steps` shortens the student stage (both dtypes alike) on a slow machine.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

COLUMNS = (('test accuracy (%)', 'test_accuracy', 100), ('agreement (%)', 'test_agreement', 100),
           ('KL', 'test_kl', 1))
DTYPES = ('float32', 'bfloat16')
TEST_EXAMPLES = 300  # the digits test split: one example is 1/300 of accuracy and agreement


def run(root: str, dtype: str, seed: int, student_steps: int) -> tuple[dict, str]:
  workdir = os.path.join(root, dtype, f'seed_{seed}')
  wall = '(reused)'
  if not os.path.exists(os.path.join(workdir, 'summary.json')):
    start = time.time()
    steps = [f'--config.stages.student.steps={student_steps}'] if student_steps else []
    subprocess.run([sys.executable, '-m', 'bigkd.train', '--config', 'configs/digits.py',
                    '--workdir', workdir, f'--config.seed={seed}',
                    f'--config.stages.student.compute_dtype={dtype}', *steps],
                   check=True, stdout=subprocess.DEVNULL)
    wall = f'{(time.time() - start) / 60:.1f} min'
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)['stages']['student'], wall


def mean_std(values: list[float]) -> tuple[float, float]:
  return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def within(f32: list[float], bf16: list[float], floor: float) -> bool:
  """The bfloat16 mean within the float32 spread: |difference of means| <= 2 std of float32
  (at least `floor`, the resolution of the metric on the test split)."""
  mean, std = mean_std(f32)
  return abs(statistics.mean(bf16) - mean) <= max(2 * std, floor)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--root', default='runs/dtype_table')
  parser.add_argument('--student_steps', type=int, default=0,
                      help="the student stage's steps (0: the config's 3,000)")
  args = parser.parse_args()
  seeds = [int(s) for s in args.seeds.split(',')]
  runs = {d: [run(args.root, d, s, args.student_steps) for s in seeds] for d in DTYPES}
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'{time.strftime("%Y-%m-%d")}; seeds {args.seeds}; '
        + '; '.join(f'{d}: ' + ', '.join(w for _, w in runs[d]) for d in DTYPES))
  print('| student computes in | ' + ' | '.join(title for title, _, _ in COLUMNS) + ' |')
  print('|---' * (len(COLUMNS) + 1) + '|')
  for d in DTYPES:
    cells = []
    for _, key, scale in COLUMNS:
      mean, std = mean_std([r[key] for r, _ in runs[d]])
      cells.append(f'{scale * mean:.{2 if scale == 100 else 4}f} ± '
                   f'{scale * std:.{2 if scale == 100 else 4}f}')
    print(f'| {d} | ' + ' | '.join(cells) + ' |')
  verdicts = []
  for title, key, scale in COLUMNS:
    f32, bf16 = ([r[key] for r, _ in runs[d]] for d in DTYPES)
    floor = 1 / TEST_EXAMPLES if scale == 100 else 0.0
    verdicts.append(f'{title.split(" (")[0]}: {"within" if within(f32, bf16, floor) else "OUTSIDE"}')
  print('bfloat16 mean vs the float32 spread (mean ± 2 std): ' + ', '.join(verdicts))


if __name__ == '__main__':
  main()
