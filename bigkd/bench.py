"""Throughput of one stage's train step, built as the trainer builds it.

  python -m bigkd.bench --config configs/X.py[:variant] [--config.a.b=v ...] [--stage NAME]
                        [--steps N] [--peak_tflops F] [--json PATH]

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
import functools
import itertools
import json
import sys
import time

import jax
import jax.numpy as jnp
from absl import flags
from ml_collections import config_flags

from bigkd import stages
from bigkd.config import ConfigError, validate
from bigkd.data.sampling import prefetch
from bigkd.data.sources import DataError
from bigkd.models import get_model
from bigkd.optim import build_optimizer
from bigkd.sharding import (batch_sharding, fsdp_compute_sharding, gather_rows, init_opt_state,
                            make_mesh, put_global, put_rows_sharded, replicated)
from bigkd.step import StepSpec, Teacher, TrainState, make_train_step, with_device_batches
from bigkd.train import fail

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file('config', None, 'Config file (configs/x.py[:variant]).',
                                lock_config=True, flag_values=FLAGS)
flags.DEFINE_string('stage', '', 'Stage to time; default: the last stage with teachers '
                    '(else the last stage).', flag_values=FLAGS)
flags.DEFINE_integer('steps', 30, 'Timed steps per variant (after warm-up).', flag_values=FLAGS)
flags.DEFINE_integer('warmup', 3, 'Untimed steps per variant before timing.', flag_values=FLAGS)
flags.DEFINE_float('peak_tflops', 0.0, 'Peak TFLOP/s of one device; 0: measure a matmul.',
                   flag_values=FLAGS)
flags.DEFINE_string('json', '', 'Write the results to this JSON file.', flag_values=FLAGS)

ROUNDS = 10  # timing alternates pipeline / fixed in rounds so both see the same machine load


def pick_plan(plans, name):
  if name:
    by_name = {p.name: p for p in plans}
    if name not in by_name:
      raise ConfigError(f'--stage={name!r}: not a stage of this run ({", ".join(by_name)})')
    return by_name[name]
  return ([p for p in plans if p.teachers] or plans)[-1]


def random_params(model, resolution, seed, targets):
  """Random parameters with the dtypes and shardings of `targets` (ShapeDtypeStructs)."""
  dummy = jnp.zeros((1, resolution, resolution, 3))
  init = lambda key: jax.tree.map(lambda p, t: p.astype(t.dtype),
                                  model.init(key, dummy)['params'], targets)
  return jax.jit(init, out_shardings=jax.tree.map(lambda t: t.sharding, targets))(
      jax.random.key(seed))


def init_student(plan, config, mesh, num_classes):
  """(student module, TrainState, optax tx, lr schedule) with the trainer's shardings."""
  min_fsdp = config.mesh.min_fsdp_size
  targets = stages.abstract_params(plan.model, plan.model_kwargs, num_classes, plan.resolution,
                                   jnp.float32, mesh, min_fsdp)
  student = get_model(plan.model, num_classes, **plan.model_kwargs)
  params = random_params(student, plan.resolution, config.seed, targets)
  tx, lr_schedule = build_optimizer(plan.optimizer, plan.steps, plan.warmup_steps)
  state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh)), params,
                     init_opt_state(tx, params, mesh, min_fsdp))
  return student, state, tx, lr_schedule


def init_teachers(plan, config, mesh, num_classes):
  """(Teachers, their random parameters) in the teacher dtype with the trainer's shardings."""
  dtype = jnp.dtype(config.teacher_dtype)
  teachers, params = [], []
  for i, t in enumerate(plan.teachers):
    model = get_model(t.model, num_classes, dtype=dtype, **t.model_kwargs)
    targets = stages.abstract_params(t.model, t.model_kwargs, num_classes, t.resolution, dtype,
                                     mesh, config.mesh.min_fsdp_size)
    teachers.append(Teacher(model, t.resolution))
    params.append(random_params(model, t.resolution, config.seed + 1 + i, targets))
  return tuple(teachers), params


def input_pipeline(config, data, plan, seed, step, mesh):
  """(step fed by the stage's input pipeline, iterator of its batch arguments), as trained."""
  batches = batch_sharding(mesh)
  if not config.data.device_resident:
    return step, prefetch(stages.host_batches(data.train, seed, plan.batch_size, 0, batches))
  shard = config.data.shard_resident
  resident = (put_rows_sharded(data.train.images, mesh) if shard
              else put_global(data.train.images, replicated(mesh)),
              put_global(data.train.labels, replicated(mesh)))
  return (with_device_batches(step, seed, plan.batch_size, batches,
                              functools.partial(gather_rows, mesh) if shard else None),
          itertools.repeat(resident))


def build(config, stage_name):
  """Everything the timed loops need: compiled pipeline and fixed steps and their inputs."""
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  validate(config, mesh.size)
  data = stages.load_data(config.data)
  plan = pick_plan(stages.plan_run(config, '/nonexistent', len(data.train.labels)), stage_name)
  student, state, tx, lr_schedule = init_student(plan, config, mesh, data.num_classes)
  teachers, teacher_params = init_teachers(plan, config, mesh, data.num_classes)
  spec = StepSpec(student, plan.resolution, teachers, data.num_classes,
                  tuple(sorted(plan.augment.items())), plan.teaching_mode, plan.loss,
                  plan.temperature, plan.label_weight, plan.ensemble, config.seed + plan.index)
  jit = functools.partial(jax.jit, donate_argnums=0, out_shardings=(
      jax.tree.map(lambda x: x.sharding, state), replicated(mesh)))
  make_step = lambda k: make_train_step(spec, tx, lr_schedule, k, fsdp_compute_sharding(mesh))
  step = make_step(plan.grad_accum_steps)
  pipeline_step, pipeline_batches = input_pipeline(config, data, plan, spec.seed, step, mesh)
  first = next(pipeline_batches)
  fixed_batch = tuple(put_global(x[:plan.batch_size], batch_sharding(mesh))
                      for x in (data.train.images, data.train.labels))
  compiled_pipeline = jit(pipeline_step).lower(state, teacher_params, *first).compile()
  compiled_fixed = jit(step).lower(state, teacher_params, *fixed_batch).compile()
  # XLA counts a scan's body once: take the FLOPs of the same step without accumulation.
  counted = compiled_fixed if plan.grad_accum_steps == 1 else jit(make_step(1)).lower(
      state, teacher_params, *fixed_batch).compile()
  return dict(plan=plan, mesh=mesh, state=state, teacher_params=teacher_params,
              pipeline=(compiled_pipeline, itertools.chain([first], pipeline_batches)),
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
  setup = build(config, stage)
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
  return '\n'.join([
      f'bench: stage {r["stage"]} ({r["model"]}@{r["resolution"]}{teachers}), batch '
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
  try:
    FLAGS(argv or sys.argv)
  except Exception as e:  # flag and config-file errors
    fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
  if FLAGS.config is None:
    fail('--config is required')
  try:
    result = run(FLAGS.config, FLAGS.stage, FLAGS.steps, FLAGS.warmup, FLAGS.peak_tflops)
  except (ConfigError, DataError) as e:
    fail(str(e).splitlines()[0])
  print(report(result), flush=True)
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
