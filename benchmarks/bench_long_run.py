"""Long runs: host memory stays flat, and the loop syncs with the host only at log steps.

  python benchmarks/bench_long_run.py --steps 20000 --workdir /tmp/long_run

Trains the digits demo's student stage alone (cnn_small at 12 px distilled by function matching
from a randomly initialised resnet8 teacher at 16 px; its weights do not matter for speed or
memory) with `python -m bigkd.train`, three times in fresh processes:
  memory    `--steps` steps with log_every 1000: the trainer's resident set size (VmRSS, sampled
            from /proc every 0.2 s by this script) at step 1,000 and at the last step, and its
            growth (goal: < 5 %);
  syncs     the same stage, `--sync_steps` steps each, with log_every 100 and with log_every
            1,000: the steps/s that clu's ReportProgress logs past the first log interval
            (compilation excluded). If the loop synced with the host on every step, more
            frequent logging would not matter either; what this shows is that the logging
            interval, where the only sync is, costs little (goal: within 5 %).
Prints a summary; `--json` writes every number.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')


def rss_mb(pid):
  with open(f'/proc/{pid}/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def logged_steps(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def random_teacher(workdir):
  """A resnet8 stage folder at random weights (a teacher without training one)."""
  sys.path.insert(0, ROOT)
  import numpy as np
  from bigkd import checkpoint
  from bigkd.models import param_shapes
  import jax
  stage_dir = os.path.join(workdir, 'teacher')
  if not os.path.isdir(os.path.join(stage_dir, 'checkpoints')):
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(np.float32),
                          param_shapes('resnet8', 10, 16))
    checkpoint.write_stage_info(stage_dir, 'resnet8', {}, 16, 10)
    mngr = checkpoint.manager(stage_dir)
    checkpoint.save(mngr, 1, params, {'unused': np.zeros((), np.int32)})
    mngr.wait_until_finished()
    mngr.close()
  return stage_dir


def train(workdir, teacher, steps, log_every, sample_rss=False):
  """Runs the student stage; returns (logged records, [(step, rss_mb)] samples)."""
  args = [sys.executable, '-m', 'bigkd.train', '--config', 'configs/digits.py',
          '--workdir', workdir, '--config.stage_order=student',
          f'--config.stages.student.teachers.teacher.source={teacher}',
          f'--config.stages.student.steps={steps}', f'--config.log_every={log_every}',
          f'--config.checkpoint_every={steps}']
  proc = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(workdir, 'student', 'metrics.jsonl')
  samples = []
  while proc.poll() is None:
    if sample_rss:
      log = logged_steps(metrics_path)
      try:
        samples.append((log[-1]['step'] if log else 0, rss_mb(proc.pid)))
      except OSError:
        pass
    time.sleep(0.2)
  if proc.returncode != 0:
    sys.exit(f'training failed: {proc.stderr.read()[-2000:]}')
  return logged_steps(metrics_path), samples


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog='example: '
                                   'python benchmarks/bench_long_run.py --steps 20000')
  parser.add_argument('--workdir', default='', help='a folder for the runs (default: a new '
                      'temporary folder); an earlier measurement\'s folder is refused')
  parser.add_argument('--steps', type=int, default=20000, help='memory run length (0: skip)')
  parser.add_argument('--sync_steps', type=int, default=3000, help='length of each sync run')
  parser.add_argument('--json', default='')
  args = parser.parse_args()
  args.workdir = args.workdir or tempfile.mkdtemp(prefix='bigkd_long_run_')
  runs = (['memory'] if args.steps else []) + ['sync_100', 'sync_1000']
  for name in runs:  # an existing run would be resumed, and its old logs read back as new
    if os.path.exists(os.path.join(args.workdir, name)):
      parser.error(f'{os.path.join(args.workdir, name)} exists (an earlier measurement); '
                   'use a new --workdir')
  os.makedirs(args.workdir, exist_ok=True)
  teacher = random_teacher(args.workdir)

  first = last = growth = float('nan')
  samples = []
  if args.steps:
    _, samples = train(os.path.join(args.workdir, 'memory'), teacher, args.steps, 1000, True)
    at = lambda step: max((rss for s, rss in samples if s <= step), default=float('nan'))
    first, last = at(1000), at(args.steps)
    growth = last / first - 1

  rates = {}
  for log_every in (100, 1000):
    records, _ = train(os.path.join(args.workdir, f'sync_{log_every}'), teacher,
                       args.sync_steps, log_every)
    timed = [r['steps_per_sec'] for r in records if r['step'] > 1000 and 'steps_per_sec' in r]
    rates[log_every] = sum(timed) / len(timed)
  ratio = rates[100] / rates[1000]
  print(f'memory: VmRSS {first:.0f} MB at step 1000, {last:.0f} MB at step {args.steps}: '
        f'growth {100 * growth:+.1f}% (goal < 5%: {"met" if abs(growth) < 0.05 else "NOT met"})')
  print(f'syncs: {rates[100]:.1f} steps/s with log_every 100, {rates[1000]:.1f} with 1000: '
        f'ratio {ratio:.3f} (goal within 5%: {"met" if abs(ratio - 1) < 0.05 else "NOT met"})')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(rss_step_1000_mb=first, rss_last_mb=last, rss_growth=growth,
                     steps=args.steps, steps_per_sec=rates, rate_ratio=ratio,
                     rss_samples=samples), f, indent=1)


if __name__ == '__main__':
  main()
