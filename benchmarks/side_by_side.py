"""bigkd's train step against the same step in PyTorch, side by side on this machine's CPU.

  python benchmarks/side_by_side.py --torch_python /work/torchvenv/bin/python [--pairs ...]
      [--rounds 5] [--seconds_per_round 3] [--torch_compile] [--json out.json]

Run it with the Python that has bigkd (its venv: the bigkd side runs under the same
interpreter); `--torch_python` has torch (never bigkd's venv: PyTorch is a benchmark-only
dependency). Each side is a long-lived worker process that builds and compiles its step once,
then times N steps whenever asked (`--serve` of torch_distill_step.py; `--worker bigkd` here),
so the rounds alternate between the sides without recompiling: both see the same machine load,
and the best round of each side counts (the least disturbed one on a shared machine).

  bigkd   `bigkd.bench.setup_stage` + `time_steps`: the trainer's own step of the digits config's
          student stage (function matching KL, Adam + clip 1 + weight decay, on-device inception
          crop + mixup rendered with antialiasing, device-resident gather), the models and
          resolutions overridden per pair; float32 everywhere (the config's teacher_dtype).
  torch   benchmarks/torch_distill_step.py --device cpu: teacher forward under no_grad, student
          forward + backward, KL, clip 1, AdamW (no weight decay), the same crop area (0.5, 1),
          no flip and batch-wide mixup, rendered by bilinear grid_sample (no antialiasing),
          float32, NCHW, `torch.set_num_threads` = the usable cores (XLA's CPU client uses them
          all); eager, and compiled with --torch_compile.

Pairs (name: teacher -> student, batch):
  bit64    bit_r50x1@64  -> bit_r50x1@64,  batch 8
  bit128   bit_r50x1@128 -> bit_r50x1@128, batch 8
  digits   resnet8@16    -> cnn_small@12,  batch 64 (the digits demo's student stage)
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def bit_pair(res):
  return dict(
      label=f'bit_r50x1@{res} -> bit_r50x1@{res}', batch=8,
      bigkd=['--config.batch_size=8', f'--config.data.base_size={res}',
             '--config.stages.teacher.model=bit_r50x1',
             f'--config.stages.teacher.resolution={res}',
             '--config.stages.student.model=bit_r50x1',
             f'--config.stages.student.resolution={res}'],
      torch=['--teacher', 'bit_r50x1', '--student', 'bit_r50x1', '--teacher_res', str(res),
             '--student_res', str(res), '--base_size', str(res), '--batch', '8'])


PAIRS = {
    'bit64': bit_pair(64),
    'bit128': bit_pair(128),
    'digits': dict(label='resnet8@16 -> cnn_small@12', batch=64, bigkd=[],
                   torch=['--teacher', 'resnet8', '--student', 'cnn_small', '--teacher_res',
                          '16', '--student_res', '12', '--base_size', '16', '--batch', '64']),
}
# What configs/digits.py sets for every stage, repeated for the PyTorch side.
TORCH_COMMON = ['--device', 'cpu', '--num_classes', '10', '--crop_area', '0.5', '1.0',
                '--no_flip', '--examples', '1024', '--warmup', '3']


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--torch_python', help='a Python with torch (not bigkd\'s venv)')
  p.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=list(PAIRS))
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--seconds_per_round', type=float, default=3.0,
                 help='each side times about this long per round')
  p.add_argument('--torch_compile', action='store_true', help='also time torch.compile')
  p.add_argument('--json', default='')
  p.add_argument('--worker', choices=['bigkd'], help=argparse.SUPPRESS)
  p.add_argument('--pair', choices=list(PAIRS), help=argparse.SUPPRESS)
  return p.parse_args()


def bigkd_worker(pair):
  """The bigkd side of the protocol (see torch_distill_step.serve): its real train step."""
  sys.path.insert(0, ROOT)
  import jax
  from bigkd import bench, cli
  argv = cli.with_bundled_configs(['bench', '--config', 'configs/digits.py',
                                   *PAIRS[pair]['bigkd']])
  fv = bench.define_flags(argv)
  cli.parse(fv, argv, bench.__doc__)
  setup = bench.setup_stage(fv.config, 'student')
  bench.time_steps(setup, 'pipeline', 3)
  plan = setup['plan']
  print(json.dumps(dict(
      teacher=', '.join(f'{t.model}@{t.resolution}' for t in plan.teachers),
      student=f'{plan.model}@{plan.resolution}', batch_size=plan.batch_size,
      jax=jax.__version__, platform=jax.devices()[0].platform,
      flops_per_image=setup['flops_per_image'])), flush=True)
  for line in sys.stdin:
    cpu = time.process_time()
    seconds = bench.time_steps(setup, 'pipeline', int(line))
    print(json.dumps({'seconds': seconds, 'cpu_seconds': time.process_time() - cpu}), flush=True)


class Worker:
  """A side's process: started, warmed up (compiled), then asked to time N steps at a time."""

  def __init__(self, name, cmd, env, log_dir):
    self.name = name
    self.log = os.path.join(log_dir, f'{name}.log')
    with open(self.log, 'w') as log:
      self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=log, text=True, env=env, cwd=ROOT)
    self.info = self.reply()
    self.seconds_per_step, self.cores_busy = [], []  # per round: wall time, CPU time / wall

  def reply(self) -> dict:
    for line in self.proc.stdout:  # skip anything else a library prints to stdout
      if line.startswith('{'):
        return json.loads(line)
    with open(self.log) as f:
      tail = ''.join(f.readlines()[-15:])
    raise SystemExit(f'{self.name} worker exited ({self.proc.wait()}); its log {self.log}:\n'
                     f'{tail}')

  def time(self, steps) -> float:
    self.proc.stdin.write(f'{steps}\n')
    self.proc.stdin.flush()
    reply = self.reply()
    self.seconds_per_step.append(reply['seconds'] / steps)
    self.cores_busy.append(reply['cpu_seconds'] / reply['seconds'])
    return reply['seconds'] / steps

  def close(self):
    self.proc.stdin.close()
    self.proc.wait()


def machine() -> str:
  model = next((l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo')
                if l.startswith('model name')), 'unknown CPU')
  return f'{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)'


def run_pair(args, name, log_dir) -> dict:
  pair = PAIRS[name]
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  torch_cmd = [args.torch_python, os.path.join(HERE, 'torch_distill_step.py'), '--serve',
               *TORCH_COMMON, *pair['torch']]
  # One at a time: each compiles undisturbed by the other.
  workers = [Worker('torch eager', torch_cmd, env, log_dir)]
  if args.torch_compile:
    workers.append(Worker('torch compiled', [*torch_cmd, '--compile'], env, log_dir))
  workers.append(Worker('bigkd', [sys.executable, os.path.abspath(__file__), '--worker',
                                  'bigkd', '--pair', name], env, log_dir))
  steps = {w.name: max(1, round(args.seconds_per_round / w.time(1))) for w in workers}
  for w in workers:  # the calibration step is not a round
    w.seconds_per_step.clear()
    w.cores_busy.clear()
  for r in range(args.rounds):
    for w in (workers if r % 2 == 0 else workers[::-1]):  # alternate who goes first
      time.sleep(0.5)  # let the other side's threads go idle
      w.time(steps[w.name])
  for w in workers:
    w.close()
  best = {w.name: pair['batch'] / min(w.seconds_per_step) for w in workers}
  return dict(pair=name, label=pair['label'], batch=pair['batch'], steps_per_round=steps,
              images_per_sec=best, ratio=best['bigkd'] / best['torch eager'],
              rounds_ms={w.name: [round(1e3 * s, 1) for s in w.seconds_per_step]
                         for w in workers},
              cores_busy={w.name: [round(c, 2) for c in w.cores_busy] for w in workers},
              info={w.name: w.info for w in workers})


def main():
  args = parse_args()
  if args.worker:
    return bigkd_worker(args.pair)
  if not args.torch_python:
    raise SystemExit('--torch_python: a Python with torch is needed for the PyTorch side')
  print(f'machine: {machine()}; load average {os.getloadavg()[0]:.2f} at the start', flush=True)
  results = []
  with tempfile.TemporaryDirectory() as log_dir:
    for name in args.pairs:
      r = run_pair(args, name, log_dir)
      results.append(r)
      torch_info, jax_info = r['info']['torch eager'], r['info']['bigkd']
      others = ''.join(f'  {k} {v:7.1f} img/s' for k, v in r['images_per_sec'].items()
                       if k not in ('bigkd', 'torch eager'))
      print(f'{r["label"]:32s} batch {r["batch"]:3d}  bigkd {r["images_per_sec"]["bigkd"]:7.1f} '
            f'img/s  torch eager {r["images_per_sec"]["torch eager"]:7.1f} img/s{others}  '
            f'bigkd/torch {r["ratio"]:.2f}\n'
            f'    ms/step per round (steps per round {r["steps_per_round"]}): '
            f'{r["rounds_ms"]}', flush=True)
  print(f'best of {args.rounds} alternating rounds per side; jax {jax_info["jax"]}, torch '
        f'{torch_info["torch"]} ({torch_info["threads"]} threads, float32); load average '
        f'{os.getloadavg()[0]:.2f} at the end', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(machine=machine(), results=results), f, indent=1)


if __name__ == '__main__':
  main()
