"""Multi-stage runs: each stage trains one model, supervised or distilled from earlier stages
(teacher → student, or teacher → assistant → student chains, TAKD).

`plan_run` reads the config once and checks everything (models, resolutions, batch sizes,
teacher checkpoints) before any training; `run` executes the plan, resuming each stage from its
latest checkpoint and skipping stages that already finished.
"""
import dataclasses
import functools
import itertools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from clu import metric_writers

from bigkd import checkpoint
from bigkd.config import ConfigError, merged, stage_names, validate
from bigkd.data import sources
from bigkd.data.sampling import host_batch_indices, prefetch
from bigkd.evaluate import evaluate
from bigkd.models import get_model
from bigkd.optim import build_optimizer
from bigkd.sharding import batch_sharding, describe, fsdp_compute_sharding, gather_rows, \
    make_mesh, put_global, put_rows_sharded, replicated, tree_shardings
from bigkd.step import StepSpec, Teacher, TrainState, make_eval_step, make_train_step, \
    with_device_batches


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
  name: str
  source: str       # a stage folder (of this run or another) or a .npz file
  model: str
  resolution: int
  model_kwargs: dict


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage with everything resolved to plain values."""
  name: str
  index: int
  model: str
  model_kwargs: dict
  resolution: int
  init: str
  steps: int
  warmup_steps: int
  batch_size: int
  optimizer: dict
  augment: dict
  teachers: tuple
  teaching_mode: str
  loss: str
  temperature: float
  label_weight: float
  ensemble: str
  grad_accum_steps: int = 1


@dataclasses.dataclass
class RunData:
  train: sources.Split
  val: sources.Split
  test: sources.Split
  num_classes: int


def load_data(data_cfg) -> RunData:
  train = sources.load_split(data_cfg, 'train_split')
  val = sources.load_split(data_cfg, 'val_split')
  test = sources.load_split(data_cfg, 'test_split')
  return RunData(train, val, test, sources.num_classes(data_cfg, train))


def abstract_params(model_name, model_kwargs, num_classes, resolution, dtype, mesh,
                    min_fsdp_size=2 ** 18):
  """ShapeDtypeStructs (with shardings) of a model's parameters; nothing is allocated."""
  model = get_model(model_name, num_classes, **model_kwargs)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                             jnp.zeros((1, resolution, resolution, 3)))['params'])
  shardings = tree_shardings(mesh, shapes, min_fsdp_size)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                      shapes, shardings)


def _teacher_plans(name, stage, config, workdir, plans):
  teachers = []
  by_name = {p.name: p for p in plans}
  for tname, t in stage.teachers.items():
    if t.source in by_name:
      src = by_name[t.source]
      teachers.append(TeacherPlan(tname, os.path.join(workdir, t.source), src.model,
                                  src.resolution, src.model_kwargs))
    elif t.source.endswith('.npz'):
      teachers.append(TeacherPlan(tname, t.source, t.model, t.resolution, t.model_kwargs.to_dict()))
    else:
      try:
        info = checkpoint.read_stage_info(t.source)
      except checkpoint.CheckpointError as e:
        raise ConfigError(f'stages.{name}.teachers.{tname}: {e}') from None
      teachers.append(TeacherPlan(tname, t.source, t.model or info['model'],
                                  t.resolution or info['resolution'],
                                  t.model_kwargs.to_dict() or info.get('model_kwargs', {})))
    if teachers[-1].resolution > config.data.base_size:
      raise ConfigError(f'stages.{name}.teachers.{tname}: resolution {teachers[-1].resolution} '
                        f'is above the stored image size data.base_size={config.data.base_size}')
  return tuple(teachers)


def plan_run(config, workdir, num_train_examples) -> list[StagePlan]:
  plans = []
  for index, name in enumerate(stage_names(config)):
    stage = config.stages[name]
    batch = stage.batch_size or config.batch_size
    if batch > num_train_examples:
      raise ConfigError(f'stages.{name}: batch size {batch} exceeds the {num_train_examples} '
                        'training examples')
    if config.data.device_resident and batch * num_train_examples >= 2 ** 31:
      raise ConfigError(f'stages.{name}: batch size x examples >= 2^31; use '
                        'data.device_resident=False')
    steps_per_epoch = num_train_examples / batch
    steps = round(stage.epochs * steps_per_epoch) if stage.epochs > 0 else stage.steps
    opt = merged(config.optimizer, stage.optimizer, f'stages.{name}.optimizer')
    warmup = (round(opt['warmup_epochs'] * steps_per_epoch) if opt['warmup_epochs'] > 0
              else opt['warmup_steps'])
    aug = merged(config.augment, stage.augment, f'stages.{name}.augment')
    aug = {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}
    plans.append(StagePlan(
        name, index, stage.model, stage.model_kwargs.to_dict(), stage.resolution, stage.init, max(1, steps), warmup, batch,
        opt, aug, _teacher_plans(name, stage, config, workdir, plans), stage.teaching_mode,
        stage.loss, stage.temperature, stage.label_weight, stage.ensemble,
        stage.grad_accum_steps or config.grad_accum_steps))
  return plans


def check_external_checkpoints(plans, config, workdir, num_classes, mesh):
  """Teachers and initialisations from outside this run must exist and fit, before any work."""
  internal = {os.path.join(workdir, p.name) for p in plans}
  for plan in plans:
    sources_to_check = [(t.source, t.model, t.model_kwargs, t.resolution,
                         f'stages.{plan.name}.teachers.{t.name}', None)
                        for t in plan.teachers if t.source not in internal]
    if plan.init:
      sources_to_check.append((plan.init, plan.model, plan.model_kwargs, plan.resolution,
                               f'stages.{plan.name}.init', num_classes))
    for source, model, model_kwargs, resolution, what, new_head in sources_to_check:
      target = abstract_params(model, model_kwargs, num_classes, resolution, jnp.float32, mesh,
                               config.mesh.min_fsdp_size)
      try:
        checkpoint.load_params(source, target, what, new_head_classes=new_head)
      except (checkpoint.CheckpointError, ValueError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0] if str(e) else f'{what}: unreadable checkpoint') from None


class Progress:
  """Terminal progress line: step, loss, steps/s, ETA."""

  def __init__(self, name, start_step, total_steps):
    self.name, self.total = name, total_steps
    self.last_step, self.last_time = start_step, time.time()

  def report(self, step, metrics):
    now = time.time()
    rate = (step - self.last_step) / max(now - self.last_time, 1e-9)
    self.last_step, self.last_time = step, now
    eta = (self.total - step) / max(rate, 1e-9)
    extra = ''.join(f' {k} {metrics[k]:.4f}' for k in ('kl', 'agreement') if k in metrics)
    print(f'[{self.name}] step {step}/{self.total} loss {metrics["loss"]:.4f}{extra} '
          f'{rate:.1f} steps/s ETA {int(eta) // 60}m{int(eta) % 60:02d}s', flush=True)


def host_batches(split, seed, batch_size, start_step, sharding):
  """Streamed batches: each process gathers its share of the global batch on the host."""
  for step in itertools.count(start_step):
    indices = host_batch_indices(seed, step, batch_size, len(split.labels))
    local = np.array_split(indices, jax.process_count())[jax.process_index()]
    yield tuple(jax.make_array_from_process_local_data(sharding, x[local])
                for x in (split.images, split.labels))


def _trim_metrics(path, last_step):
  """On resume, drop log lines written after the checkpoint we resume from."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    lines = [l for l in f if l.strip() and json.loads(l)['step'] <= last_step]
  with open(path, 'w') as f:
    f.writelines(lines)


def run_stage(plan: StagePlan, config, workdir, data: RunData, mesh) -> dict:
  stage_dir = os.path.join(workdir, plan.name)
  summary_path = os.path.join(stage_dir, 'summary.json')
  if os.path.exists(summary_path):
    print(f'[{plan.name}] already finished; skipping', flush=True)
    with open(summary_path) as f:
      return json.load(f)
  is_main = jax.process_index() == 0
  if is_main:
    checkpoint.write_stage_info(stage_dir, plan.model, plan.model_kwargs, plan.resolution,
                                data.num_classes)

  student = get_model(plan.model, data.num_classes, **plan.model_kwargs)
  param_targets = abstract_params(plan.model, plan.model_kwargs, data.num_classes,
                                  plan.resolution, jnp.float32, mesh, config.mesh.min_fsdp_size)
  param_shardings = jax.tree.map(lambda a: a.sharding, param_targets)
  if plan.init:
    params = checkpoint.load_params(plan.init, param_targets, f'stages.{plan.name}.init',
                                    new_head_classes=data.num_classes)
  else:
    init_key = jax.random.fold_in(jax.random.key(config.seed), plan.index)
    dummy = jnp.zeros((1, plan.resolution, plan.resolution, 3))
    params = jax.jit(lambda k: student.init(k, dummy)['params'],
                     out_shardings=param_shardings)(init_key)
  tx, lr_schedule = build_optimizer(plan.optimizer, plan.steps, plan.warmup_steps)
  # Optimiser moments have their parameter's shape, so the same size rule shards them alike.
  opt_shardings = tree_shardings(mesh, jax.eval_shape(tx.init, params),
                                 config.mesh.min_fsdp_size)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  state_shardings = TrainState(replicated(mesh), param_shardings, opt_shardings)
  state = TrainState(jax.device_put(jnp.zeros((), jnp.int32), replicated(mesh)), params, opt_state)

  mngr = checkpoint.manager(stage_dir, config.keep_checkpoints)
  metrics_path = os.path.join(stage_dir, 'metrics.jsonl')
  start_step = mngr.latest_step() or 0
  if start_step:
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    params, opt_state = checkpoint.restore(mngr, start_step, target.params, target.opt_state)
    state = TrainState(jax.device_put(jnp.asarray(start_step, jnp.int32), state_shardings.step),
                       params, opt_state)
    if is_main:
      _trim_metrics(metrics_path, start_step)
    print(f'[{plan.name}] resuming from step {start_step}', flush=True)

  teacher_dtype = jnp.dtype(config.teacher_dtype)
  teachers, teacher_params = [], []
  for t in plan.teachers:
    teachers.append(Teacher(get_model(t.model, data.num_classes, dtype=teacher_dtype,
                                      **t.model_kwargs), t.resolution))
    target = abstract_params(t.model, t.model_kwargs, data.num_classes, t.resolution,
                             teacher_dtype, mesh, config.mesh.min_fsdp_size)
    teacher_params.append(checkpoint.load_params(t.source, target,
                                                 f'stages.{plan.name}.teachers.{t.name}'))
  spec = StepSpec(student, plan.resolution, tuple(teachers), data.num_classes,
                  tuple(sorted(plan.augment.items())), plan.teaching_mode, plan.loss,
                  plan.temperature, plan.label_weight, plan.ensemble, config.seed + plan.index)
  train_step = make_train_step(spec, tx, lr_schedule, plan.grad_accum_steps,
                               fsdp_compute_sharding(mesh))
  batches = batch_sharding(mesh)
  if config.data.device_resident:
    shard = config.data.shard_resident  # each device (process) holds only its rows of images
    train_step = with_device_batches(train_step, spec.seed, plan.batch_size, batches,
                                     functools.partial(gather_rows, mesh) if shard else None)
    resident = (put_rows_sharded(data.train.images, mesh) if shard
                else put_global(data.train.images, replicated(mesh)),
                put_global(data.train.labels, replicated(mesh)))
    batch_iter = itertools.repeat(resident)
  else:
    batch_iter = prefetch(host_batches(data.train, spec.seed, plan.batch_size, start_step,
                                        batches))
  train_step = jax.jit(train_step, donate_argnums=0,
                       out_shardings=(state_shardings, replicated(mesh)))
  eval_step = jax.jit(make_eval_step(student, plan.resolution, tuple(teachers), plan.ensemble))

  def run_eval(step):
    results = {}
    for split_name in ('val', 'test'):
      split_metrics = evaluate(eval_step, state.params, teacher_params, getattr(data, split_name),
                               config.eval_batch_size, batches)
      results.update({f'{split_name}_{k}': v for k, v in split_metrics.items()})
    return results

  writer = metric_writers.create_default_writer(stage_dir, just_logging=not is_main,
                                                asynchronous=True)
  progress = Progress(plan.name, start_step, plan.steps)
  if is_main:
    print(f'[{plan.name}] mesh data={mesh.shape["data"]} fsdp={mesh.shape["fsdp"]} over '
          f'{jax.process_count()} process(es): {describe(state.params)}'
          + ''.join(f'; teacher {t.name}: {describe(p)}'
                    for t, p in zip(plan.teachers, teacher_params)), flush=True)
  log_file = open(metrics_path, 'a') if is_main else None
  try:
    for step in range(start_step + 1, plan.steps + 1):
      state, metrics = train_step(state, teacher_params, *next(batch_iter))
      record = None
      if step % config.log_every == 0 or step == plan.steps:
        record = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if is_main:
          progress.report(step, record)
      if config.eval_every and step % config.eval_every == 0 and step != plan.steps:
        record = {**(record or {}), **run_eval(step)}
      if record is not None:
        writer.write_scalars(step, record)
        if log_file:
          log_file.write(json.dumps({'step': step, **record}) + '\n')
          log_file.flush()
      if step % config.checkpoint_every == 0 or step == plan.steps:
        checkpoint.save(mngr, step, state.params, state.opt_state)
    mngr.wait_until_finished()
    final_eval = run_eval(plan.steps)
    writer.write_scalars(plan.steps, final_eval)
    summary = {'steps': plan.steps, 'model': plan.model, 'resolution': plan.resolution,
               **final_eval}
  finally:
    mngr.close()
    writer.close()
    if log_file:
      log_file.close()
  if is_main:
    with open(summary_path, 'w') as f:
      json.dump(summary, f, indent=1)
  return summary


def print_table(summaries: dict) -> None:
  print(f'\n{"stage":<12} {"test acc":>9} {"teacher acc":>12} {"agreement":>10}')
  for name, s in summaries.items():
    fmt = lambda key: f'{100 * s[key]:.2f}' if key in s else '-'
    print(f'{name:<12} {fmt("test_accuracy"):>9} {fmt("test_teacher_accuracy"):>12} '
          f'{fmt("test_agreement"):>10}')


def run(config, workdir) -> dict:
  """Runs every stage of `config` in `workdir`; returns and writes the top-level summary."""
  mesh = make_mesh(config.mesh.data, config.mesh.fsdp)
  validate(config, mesh.size)
  data = load_data(config.data)
  plans = plan_run(config, workdir, len(data.train.labels))
  check_external_checkpoints(plans, config, workdir, data.num_classes, mesh)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  summaries = {}
  for plan in plans:
    summaries[plan.name] = run_stage(plan, config, workdir, data, mesh)
  summary = {'stages': summaries}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    print_table(summaries)
  return summary

