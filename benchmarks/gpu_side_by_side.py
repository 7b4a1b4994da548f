"""GPU readiness: bigkd's train step against PyTorch's on one GPU, for the paper's T224 -> S224 pair.

  python benchmarks/gpu_side_by_side.py [--torch_python PY] [--batch 128] [--torch_compile]
      [--rounds 5] [--seconds_per_round 5] [--peak_tflops F] [--json out.json]
  python benchmarks/gpu_side_by_side.py --dry [--torch_python PY]     # the plumbing, on CPU

Run it with the Python that has bigkd (with jax[cuda]); `--torch_python` is a Python with torch
(default: this one). Each side is a long-lived worker that builds and compiles its step once and
then times N steps whenever asked, in alternating rounds (benchmarks/side_by_side.py's workers
and protocol); the best round of each side counts. Both run on the same GPU, one at a time; the
bigkd worker does not preallocate GPU memory (XLA_PYTHON_CLIENT_PREALLOCATE=false) so that the
PyTorch worker has room.

  bigkd   `bigkd.bench.setup_stage` + `time_steps`: the trainer's own student step of
          configs/digits.py with the paper's models — BiT-R152x2 teacher (bfloat16) at 224 px,
          BiT-R50x1 student at 224 px computing in bfloat16 (float32 parameters, Adam state,
          logits and losses: `stages.student.compute_dtype`), digits stored at 256 px on the
          device; function-matching KL, Adam + clip 1 + weight decay, on-device inception crop +
          mixup, device-resident gather.
  torch   benchmarks/torch_distill_step.py --device cuda: the same models written by hand
          (bit_r152x2, bit_r50x1), bf16 autocast, channels_last, AdamW, clip 1; eager, and
          torch.compile'd too with --torch_compile.

It prints images/s of each side, the ratio bigkd / torch, and MFU: the FLOPs per image of
bigkd's compiled step (XLA's cost analysis) times images/s over the GPU's published peak dense
bfloat16 FLOP/s, found by device name (H100 and H200 SXM 989 TFLOP/s, A100 312; `--peak_tflops`
for another GPU). The same FLOPs are used for both sides: the same step's model FLOPs.

--dry runs the same plumbing on CPU in a minute: the digits student stage as configured (resnet8
teacher at 16 px, cnn_small student at 12 px, bfloat16 student), batch 32, 2 rounds of 2 steps,
JAX_PLATFORMS=cpu; MFU against the CPU's measured float32 matmul rate (bigkd.bench). When
`--torch_python` cannot import torch, only bigkd's side runs and a line says so.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from side_by_side import TORCH_COMMON, Worker, machine  # noqa: E402

# Published peak dense bfloat16 TFLOP/s by a substring of the device name (SXM parts).
PEAK_TFLOPS = (('H200', 989.0), ('H100', 989.0), ('A100', 312.0))


def pair(dry: bool, batch: int) -> dict:
  """The models of each side: the paper's T224 -> S224 pair, or the digits stage for --dry."""
  if dry:
    return dict(label='resnet8@16 -> cnn_small@12 (digits, bfloat16 student)', batch=batch,
                bigkd=[f'--config.batch_size={batch}',
                       '--config.stages.student.compute_dtype=bfloat16'],
                torch=['--teacher', 'resnet8', '--student', 'cnn_small', '--teacher_res', '16',
                       '--student_res', '12', '--base_size', '16', '--batch', str(batch)])
  return dict(label='BiT-R152x2@224 -> BiT-R50x1@224 (T224 -> S224, bfloat16 student)',
              batch=batch,
              bigkd=[f'--config.batch_size={batch}', '--config.data.base_size=256',
                     '--config.teacher_dtype=bfloat16',
                     '--config.stages.teacher.model=bit_r152x2',
                     '--config.stages.teacher.resolution=224',
                     '--config.stages.student.model=bit_r50x1',
                     '--config.stages.student.resolution=224',
                     '--config.stages.student.compute_dtype=bfloat16'],
              torch=['--teacher', 'bit_r152x2', '--student', 'bit_r50x1', '--teacher_res', '224',
                     '--student_res', '224', '--base_size', '256', '--batch', str(batch)])


def published_peak(device_name: str) -> float | None:
  """Peak dense bf16 TFLOP/s of a GPU by name ('NVIDIA H100 80GB HBM3' -> 989); None if unknown."""
  return next((tflops for key, tflops in PEAK_TFLOPS if key in device_name.upper()), None)


def bigkd_worker(overrides: list[str], measure_peak: bool):
  """The bigkd side of the protocol (see torch_distill_step.serve): its real train step."""
  sys.path.insert(0, ROOT)
  import jax
  from bigkd import bench, cli
  argv = cli.with_bundled_configs(['bench', '--config', 'configs/digits.py', *overrides])
  fv = bench.define_flags(argv)
  cli.parse(fv, argv, bench.__doc__)
  setup = bench.setup_stage(fv.config, 'student')
  bench.time_steps(setup, 'pipeline', 2)
  plan = setup['plan']
  device = jax.devices()[0]
  print(json.dumps(dict(
      teacher=', '.join(f'{t.model}@{t.resolution} ({plan.teacher_dtype})'
                        for t in plan.teachers),
      student=f'{plan.model}@{plan.resolution} ({plan.compute_dtype})',
      batch_size=plan.batch_size, jax=jax.__version__, platform=device.platform,
      device=device.device_kind, flops_per_image=setup['flops_per_image'],
      measured_peak_tflops=bench.measured_peak_tflops() if measure_peak else None)), flush=True)
  for line in sys.stdin:
    cpu = time.process_time()
    seconds = bench.time_steps(setup, 'pipeline', int(line))
    print(json.dumps({'seconds': seconds, 'cpu_seconds': time.process_time() - cpu}), flush=True)


def has_torch(python: str) -> str:
  """'' when `python` imports torch, else why not (one line)."""
  try:
    done = subprocess.run([python, '-c', 'import torch'], capture_output=True, text=True,
                          timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    return f'{python}: {e}'
  return '' if done.returncode == 0 else (done.stderr.strip().splitlines() or ['failed'])[-1]


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--dry', action='store_true', help='the plumbing on CPU with tiny models')
  p.add_argument('--torch_python', default=sys.executable, help='a Python with torch')
  p.add_argument('--batch', type=int, default=0, help='0: 128 (GPU), 32 (--dry)')
  p.add_argument('--torch_compile', action='store_true', help='also time torch.compile')
  p.add_argument('--rounds', type=int, default=0, help='0: 5 (GPU), 2 (--dry)')
  p.add_argument('--seconds_per_round', type=float, default=5.0,
                 help='each side times about this long per round')
  p.add_argument('--steps_per_round', type=int, default=0,
                 help='fixed steps per round; 0: from --seconds_per_round (--dry: 2)')
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help="the GPU's peak dense bf16 TFLOP/s; 0: published, by its name")
  p.add_argument('--json', default='')
  p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--measure_peak', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--overrides', default='[]', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  args.batch = args.batch or (32 if args.dry else 128)
  args.rounds = args.rounds or (2 if args.dry else 5)
  args.steps_per_round = args.steps_per_round or (2 if args.dry else 0)
  return args


def start_workers(args, spec, log_dir, torch_missing: str) -> list:
  """bigkd's worker first (it fails first where jax sees no GPU), then PyTorch's."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  if args.dry:
    env['JAX_PLATFORMS'] = 'cpu'
  workers = [Worker('bigkd', [sys.executable, os.path.abspath(__file__), '--worker',
                              '--overrides', json.dumps(spec['bigkd'])]
                    + (['--measure_peak'] if args.dry else []), env, log_dir)]
  platform = workers[0].info['platform']
  if not args.dry and platform != 'gpu':
    workers[0].close()
    raise SystemExit(f'gpu_side_by_side: jax sees no GPU (platform {platform}; install '
                     'jax[cuda12]), or run --dry for the plumbing on CPU')
  if torch_missing:
    return workers
  torch_cmd = [args.torch_python, os.path.join(HERE, 'torch_distill_step.py'), '--serve',
               *TORCH_COMMON, *spec['torch'], '--device', 'cpu' if args.dry else 'cuda']
  workers.append(Worker('torch eager', [*torch_cmd, '--no_compile'] if not args.dry
                        else torch_cmd, env, log_dir))
  if args.torch_compile:
    workers.append(Worker('torch compiled', torch_cmd if not args.dry
                          else [*torch_cmd, '--compile'], env, log_dir))
  return workers


def measure(args, workers) -> dict:
  """Alternating rounds; {worker: best seconds per step}, and every round's ms per step."""
  steps = {w.name: args.steps_per_round or max(1, round(args.seconds_per_round / w.time(1)))
           for w in workers}
  for w in workers:  # a calibration step is not a round
    w.seconds_per_step.clear()
  for r in range(args.rounds):
    for w in (workers if r % 2 == 0 else workers[::-1]):
      time.sleep(0.2)  # let the other side's work drain
      w.time(steps[w.name])
  return steps


def summary(args, spec, workers, steps, torch_missing: str) -> dict:
  """images/s, MFU and ratios of the finished workers."""
  info = workers[0].info
  flops = info['flops_per_image']
  if args.peak_tflops:
    peak, source = args.peak_tflops, '--peak_tflops'
  elif args.dry:
    peak, source = info['measured_peak_tflops'], 'measured float32 matmul on this CPU'
  else:
    peak = published_peak(info['device'])
    source = f'published dense bf16 peak of {info["device"]}' if peak else None
  images = {w.name: spec['batch'] / min(w.seconds_per_step) for w in workers}
  mfu = {name: flops * rate / (peak * 1e12) if peak else None for name, rate in images.items()}
  return dict(pair=spec['label'], batch=spec['batch'], dry=args.dry, device=info['device'],
              platform=info['platform'], jax=info['jax'],
              torch={w.name: w.info for w in workers[1:]}, torch_missing=torch_missing,
              flops_per_image=flops, peak_tflops=peak, peak_source=source,
              images_per_sec=images, mfu=mfu,
              ratio={name: images['bigkd'] / rate for name, rate in images.items()
                     if name != 'bigkd'},
              steps_per_round=steps, rounds=args.rounds,
              rounds_ms={w.name: [round(1e3 * s, 2) for s in w.seconds_per_step]
                         for w in workers}, machine=machine())


def report(r) -> str:
  pct = lambda m: f'MFU {100 * m:.1f}%' if m is not None else 'MFU ? (unknown peak: --peak_tflops)'
  lines = [f'{r["pair"]}, batch {r["batch"]} on {r["device"]} ({r["platform"]}, jax {r["jax"]})']
  if r['torch_missing']:
    lines.append(f'torch: not importable ({r["torch_missing"]}): only bigkd\'s side ran')
  for name, rate in r['images_per_sec'].items():
    lines.append(f'  {name:15s} {rate:9.1f} img/s  {pct(r["mfu"][name])}  '
                 f'(ms/step per round: {r["rounds_ms"][name]})')
  for name, ratio in r['ratio'].items():
    lines.append(f'  bigkd / {name}: {ratio:.2f}')
  peak = (f'{r["peak_tflops"]:.4g} TFLOP/s ({r["peak_source"]})' if r['peak_tflops']
          else 'unknown')
  lines.append(f'MFU: {r["flops_per_image"] / 1e9:.4g} GFLOP/image (XLA cost analysis of '
               f"bigkd's compiled step, for both sides) x img/s over a peak of {peak}; best of "
               f'{r["rounds"]} alternating rounds per side')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    return bigkd_worker(json.loads(args.overrides), args.measure_peak)
  import tempfile
  spec = pair(args.dry, args.batch)
  torch_missing = has_torch(args.torch_python)
  print(f'machine: {machine()}; load average {os.getloadavg()[0]:.2f}', flush=True)
  with tempfile.TemporaryDirectory() as log_dir:
    workers = start_workers(args, spec, log_dir, torch_missing)
    steps = measure(args, workers)
    for w in workers:
      w.close()
  result = summary(args, spec, workers, steps, torch_missing)
  print(report(result), flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
