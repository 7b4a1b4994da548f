"""Throughput of one stage's train step, built as the trainer builds it.

  python -m bigkd.bench --config configs/X.py[:variant] [--config.a.b=v ...] [--stage NAME]
                        [--steps N] [--peak_tflops F] [--json PATH]

Example (the digits student, its teacher at random weights; on an H100 add --peak_tflops=989):
  python -m bigkd.bench --config configs/digits.py --json bench.json

The step is the trainer's (mesh, shardings, optimiser, on-device augmentation, teacher forward,
gradient accumulation); teachers and student are randomly initialised, since speed does not
depend on weights. It is timed twice, after warm-up, in interleaved rounds (the best round
counts: on a shared machine it is the one least disturbed by other work):
  pipeline  fed by the stage's input pipeline (device-resident gather, or streamed host batches
            with prefetch), exactly as in training;
  fixed     the same step fed one batch that already sits on the devices.
`pipeline_ratio` = pipeline step rate / fixed step rate: 1.0 means the input pipeline costs
nothing. FLOPs come from XLA's cost analysis of the compiled step; MFU is achieved FLOP/s over
`--peak_tflops` per device (e.g. 989 for an H100's dense bf16) or, when it is 0, over a measured
large-matmul rate.
"""
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from bigkd import cli

def define_flags(argv) -> flags.FlagValues:
  fv = cli.config_flag_values(argv)
  flags.DEFINE_string('stage', '', 'Stage to time; default: the last stage with teachers '
                      '(else the last stage).', flag_values=fv)
  flags.DEFINE_integer('steps', 30, 'Timed steps per variant (after warm-up).', flag_values=fv)
  flags.DEFINE_integer('warmup', 3, 'Untimed steps per variant before timing.', flag_values=fv)
  flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device; 0: measure a matmul.',
                     flag_values=fv)
  flags.DEFINE_string('json', '', 'Write the results to this JSON file.', flag_values=fv)
  return fv


ROUNDS = 10  # timing alternates pipeline / fixed in rounds so both see the same machine load


def pick_plan(plans, name):
  from bigkd.config import ConfigError
  if name:
    by_name = {p.name: p for p in plans}
    if name not in by_name:
      raise ConfigError(f'--stage={name!r}: not a stage of this run ({", ".join(by_name)})')
    return by_name[name]
  return ([p for p in plans if p.teachers] or plans)[-1]


def setup_stage(config, stage_name):
  """The trainer's build of one stage (random weights), its step compiled twice: fed by the
  stage's input pipeline, and fed one batch that already sits on the devices."""
  from bigkd import build
  from bigkd.sharding import batch_sharding
  from bigkd.step import make_train_step
  mesh, data, plans = build.setup(config, '/nonexistent')
  plan = pick_plan(plans, stage_name)
  stage = build.build_stage(plan, data, mesh, random_params=True)
  inputs = stage.inputs(0)
  first = next(inputs)
  fixed_batch = build.on_devices(build.local_rows(data.train_for(plan.name),
                                                  np.arange(plan.batch_size), stage.teacher_cache),
                                 batch_sharding(mesh))
  args = (stage.state, stage.teacher_params)
  compiled_pipeline = stage.train_step.lower(*args, *first).compile()
  compiled_fixed = build.jit_step(stage.raw_step, stage.state, mesh).lower(
      *args, *fixed_batch).compile()
  # XLA counts a scan's body once: take the FLOPs of the same step without accumulation.
  counted = compiled_fixed if plan.grad_accum_steps == 1 else build.jit_step(make_train_step(
      stage.spec, stage.tx, stage.lr_schedule, 1), stage.state, mesh).lower(
          *args, *fixed_batch).compile()
  return dict(plan=plan, mesh=mesh, state=stage.state, teacher_params=stage.teacher_params,
              pipeline=(compiled_pipeline, itertools.chain([first], inputs)),
              fixed=(compiled_fixed, itertools.repeat(fixed_batch)),
              flops_per_image=counted.cost_analysis()['flops'] * mesh.size / plan.batch_size)


def time_steps(setup, variant, steps):
  """Seconds for `steps` calls of one variant; the state threads through (donated buffers)."""
  compiled, batch_iter = setup[variant]
  state = setup['state']
  start = time.perf_counter()
  for _ in range(steps):
    state, _ = compiled(state, setup['teacher_params'], *next(batch_iter))
  jax.block_until_ready(state)
  setup['state'] = state
  return time.perf_counter() - start


def measured_peak_tflops():
  """Best of a few large matmuls on one device (bf16 on accelerators, f32 on CPU), TFLOP/s."""
  cpu = jax.devices()[0].platform == 'cpu'
  size, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float('inf')
  for _ in range(5):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


def run(config, stage='', steps=30, warmup=3, peak_tflops=0.0) -> dict:
  setup = setup_stage(config, stage)
  plan, mesh = setup['plan'], setup['mesh']
  for variant in ('pipeline', 'fixed'):
    time_steps(setup, variant, warmup)
  per_round = max(1, steps // ROUNDS)
  rounds = {'pipeline': [], 'fixed': []}
  for _ in range(ROUNDS):
    for variant in rounds:
      rounds[variant].append(time_steps(setup, variant, per_round) / per_round)
  step_seconds = {k: min(v) for k, v in rounds.items()}  # best round: least disturbed by load
  # Virtual CPU devices share the host's cores: one device's matmul rate is the whole peak.
  sharing = 1 if jax.devices()[0].platform == 'cpu' else mesh.size
  peak = (peak_tflops or measured_peak_tflops()) * sharing
  images_per_sec = plan.batch_size / step_seconds['pipeline']
  achieved = setup['flops_per_image'] * images_per_sec / 1e12
  return dict(stage=plan.name, model=plan.model, resolution=plan.resolution,
              teachers=[f'{t.model}@{t.resolution}' for t in plan.teachers],
              peers=[f'{p.name}: {p.model}@{p.resolution}' for p in plan.peers],
              batch_size=plan.batch_size, grad_accum_steps=plan.grad_accum_steps,
              devices=mesh.size, platform=jax.devices()[0].platform,
              mesh={'data': mesh.shape['data'], 'fsdp': mesh.shape['fsdp']},
              images_per_sec=images_per_sec, step_seconds=step_seconds['pipeline'],
              fixed_images_per_sec=plan.batch_size / step_seconds['fixed'],
              fixed_step_seconds=step_seconds['fixed'],
              pipeline_ratio=step_seconds['fixed'] / step_seconds['pipeline'],
              flops_per_image=setup['flops_per_image'], achieved_tflops=achieved,
              peak_tflops=peak, peak_measured=not peak_tflops, mfu=achieved / peak)


def report(r) -> str:
  teachers = f' from {", ".join(r["teachers"])}' if r['teachers'] else ''
  models = ' + '.join(r.get('peers', [])) or f'{r["model"]}@{r["resolution"]}'
  return '\n'.join([
      f'bench: stage {r["stage"]} ({models}{teachers}), batch '
      f'{r["batch_size"]} (grad_accum {r["grad_accum_steps"]}), mesh {r["mesh"]["data"]}x'
      f'{r["mesh"]["fsdp"]} on {r["devices"]} {r["platform"]} device(s)',
      f'  pipeline  {1e3 * r["step_seconds"]:9.2f} ms/step {r["images_per_sec"]:10.1f} img/s',
      f'  fixed     {1e3 * r["fixed_step_seconds"]:9.2f} ms/step '
      f'{r["fixed_images_per_sec"]:10.1f} img/s   pipeline_ratio {r["pipeline_ratio"]:.3f}',
      f'  {r["flops_per_image"] / 1e6:.2f} MFLOP/image (XLA cost analysis), achieved '
      f'{r["achieved_tflops"]:.4f} TFLOP/s, peak {r["peak_tflops"]:.3f} TFLOP/s '
      f'({"measured matmul" if r["peak_measured"] else "--peak_tflops"}), '
      f'MFU {100 * r["mfu"]:.2f}%'])


def main(argv=None):
  argv = cli.with_bundled_configs(argv or sys.argv)
  fv = define_flags(argv)
  cli.parse(fv, argv, __doc__)
  from bigkd.checkpoint import CheckpointError
  from bigkd.config import ConfigError
  from bigkd.data.sources import DataError
  try:
    result = run(fv.config, fv.stage, fv.steps, fv.warmup, fv.peak_tflops)
  except (ConfigError, CheckpointError, DataError) as e:
    cli.fail(str(e).splitlines()[0])
  print(report(result), flush=True)
  if fv.json:
    with open(fv.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
