"""A stage plan -> what its loop needs: data, parameters and optimiser state with their
shardings, the teachers (loaded once), the jitted train step with its inputs, and evaluation.

This is the one place where arrays are made from a plan. The trainer (`bigkd.stages`), the
benchmark (`bigkd.bench`), the notebook helpers (`bigkd.inspect`) and `benchmarks/` all call
`build_stage`, so what they time or inspect is what trains.
"""
import collections
import copy
import dataclasses
import functools
import itertools
import sys
from typing import Any, Callable, Iterator

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigkd import checkpoint, losses, teacher_cache
from bigkd.data import sources
from bigkd.config import stage_names
from bigkd.data.sampling import device_step_indices, host_batch_indices, host_step_indices, \
    plan_rows_and_sizes
from bigkd.evaluate import evaluate
from bigkd.models import bit, get_model, param_shapes
from bigkd.optim import build_optimizer, per_peer
from bigkd.plan import StagePlan, auto_base_size, check_config, plan_stages
from bigkd.sharding import batch_sharding, fsdp_compute_sharding, gather_rows, init_opt_state, \
    make_mesh, mesh_shape, put_global, put_rows_sharded, replicated, tree_shardings
from bigkd.models.adapters import ContrastiveHeads, FeatureAdapter, ShallowClassifier, \
    StudentBranch
from bigkd.objective import initial_queues
from bigkd.step import FeaturePair, Objective, Peer, SelfHead, SftnBranch, StepSpec, Teacher, \
    TrainState, fixed_view_teacher_logits, make_eval_step, make_mutual_eval_step, \
    make_train_step, optimized_tree, summed_metrics, with_device_batches

# optimizer.skip_nonfinite_updates: this many non-finite updates in a row are skipped; the next
# is applied, its non-finite parameters stop the run (a run that only makes NaNs should end).
MAX_SKIPPED_IN_A_ROW = 10


@dataclasses.dataclass
class RunData:
  """The three splits: `sources.Split` (in memory) or `sources.StreamedSplit` (read on demand),
  and the train data of the stages that have their own (`train_data`)."""
  train: Any
  val: Any
  test: Any
  num_classes: int
  class_names: list   # by label; [] when the source names none
  stage_train: dict = dataclasses.field(default_factory=dict)  # {stage: sources.TrainData}

  def train_for(self, stage: str):
    """The split stage `stage` trains on: its train_data's, or the train split."""
    return self.stage_train[stage].split if stage in self.stage_train else self.train


def load_data(data_cfg, train_data=None) -> RunData:
  """The data block's splits, and each stage's `train_data` ({stage: {source: fields}}; stages
  with the same sources share them)."""
  train = sources.load_split(data_cfg, 'train_split')
  val = sources.load_split(data_cfg, 'val_split')
  test = sources.load_split(data_cfg, 'test_split')
  data = RunData(train, val, test, sources.num_classes(data_cfg, train),
                 sources.class_names(data_cfg, train))
  loaded = {}
  for stage, specs in (train_data or {}).items():
    key = repr(specs)
    if key not in loaded:
      loaded[key] = sources.load_train_data(data_cfg, specs, train, data.class_names,
                                            data.num_classes, f'stages.{stage}.train_data')
    data.stage_train[stage] = loaded[key]
  return data


def stage_train_data(config) -> dict:
  """{stage: {source name: fields}} of the stages to run that have their own train_data."""
  return {name: config.stages[name].train_data.to_dict() for name in stage_names(config)
          if config.stages[name].train_data}


def setup(config, workdir: str):
  """(mesh, data, stage plans) of a config, every check done: raises ConfigError / DataError
  (one line) before anything is written. The trainer, the benchmark and notebooks start here."""
  num_devices = jax.device_count()
  config = with_base_size(config)
  check_config(config, num_devices)
  mesh = make_mesh(*mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices))
  data = load_data(config.data, stage_train_data(config))
  return mesh, data, plan_stages(config, workdir, len(data.train), data.num_classes,
                                 num_devices, train_sizes={
                                     name: d.sizes for name, d in data.stage_train.items()})


def with_base_size(config):
  """`config`, or for data.base_size=0 and an image folder a copy with the canvas side chosen
  from its images (`plan.auto_base_size`); the workdir's config.json keeps the 0."""
  if config.data.base_size != 0 or config.data.source != 'folder' or not config.data.data_dir:
    return config  # check_config names what is wrong with the others
  long_side = sources.median_long_side(config.data.data_dir)
  resolved = copy.deepcopy(config)
  resolved.data.base_size = auto_base_size(config, long_side)
  print(f'bigkd: data.base_size=0: the images\' median long side is {long_side} px; canvas '
        f'{resolved.data.base_size} px', flush=True)
  return resolved


def param_targets(model, model_kwargs, num_classes, resolution, dtype, mesh,
                  min_fsdp_size=2 ** 18):
  """ShapeDtypeStructs (in `dtype`, with their shardings) of a model's parameters."""
  shapes = param_shapes(model, num_classes, resolution, **model_kwargs)
  shardings = tree_shardings(mesh, shapes, min_fsdp_size)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                      shapes, shardings)


def random_params(model, resolution, key, targets):
  """`model.init` drawn on the devices, directly in the dtypes and shardings of `targets`."""
  dummy = jnp.zeros((1, resolution, resolution, 3))
  init = lambda k: jax.tree.map(lambda p, t: p.astype(t.dtype), model.init(k, dummy)['params'],
                                targets)
  return jax.jit(init, out_shardings=jax.tree.map(lambda t: t.sharding, targets))(key)


def frozen(model):
  """A teacher's module: a BiT reads its kernels standardised once at load
  (`frozen_params`), not at every step."""
  return model.clone(standardized=True) if hasattr(model, 'standardized') else model


def frozen_params(model, params):
  """A teacher's parameters as its `frozen` module reads them (same shardings)."""
  if not getattr(model, 'standardized', False):
    return params
  shardings = jax.tree.map(lambda x: x.sharding, params)
  return jax.jit(bit.standardize_kernels, out_shardings=shardings)(params)


def teacher_targets(plan: StagePlan, mesh):
  """(Teachers, ShapeDtypeStructs of their parameters): `frozen` modules and shapes in the
  teacher dtype, with the shardings of the parameter rule."""
  dtype = jnp.dtype(plan.teacher_dtype)
  teachers = tuple(Teacher(frozen(get_model(t.model, plan.num_classes, dtype=dtype,
                                            **t.model_kwargs)), t.resolution)
                   for t in plan.teachers)
  targets = [param_targets(t.model, t.model_kwargs, plan.num_classes, t.resolution, dtype, mesh,
                           plan.min_fsdp_size) for t in plan.teachers]
  return teachers, targets


def load_teachers(plan: StagePlan, mesh, random_init=False):
  """(Teachers, their parameters) in the teacher dtype, sharded like the student's.
  `random_init`: random weights instead of the checkpoints (the benchmark: speed only)."""
  teachers, targets = teacher_targets(plan, mesh)
  params = []
  for i, (t, teacher, target) in enumerate(zip(plan.teachers, teachers, targets)):
    what = f'stages.{plan.name}.teachers.{t.name}'
    loaded = (random_params(teacher.model, t.resolution, jax.random.key(plan.seed + 1 + i),
                            target) if random_init else
              checked_finite(checkpoint.load_params(t.source, target, what),
                             f'{what} ({t.source})'))
    params.append(frozen_params(teacher.model, loaded))
  return teachers, params


@jax.jit
def _nonfinite_count(tree):
  return sum(jnp.sum(~jnp.isfinite(x)) for x in jax.tree.leaves(tree))


def nonfinite_count(tree) -> int:
  """How many values of `tree` are NaN or ±Inf (computed on device; one small fetch; compiled
  once per tree structure, not per call)."""
  return int(_nonfinite_count(tree)) if jax.tree.leaves(tree) else 0


def checked_finite(params, what: str):
  """`params`, once checked finite: a teacher (or initialisation) with a NaN weight would turn
  the whole run non-finite at its first step, so it is refused before training (exit 2)."""
  bad = nonfinite_count(params)
  if bad:
    raise checkpoint.CheckpointError(f'{what}: {bad} parameter value(s) are NaN or Inf; '
                                     'refusing to train from it')
  return params


def check_teacher_logits(eval_step, params, teacher_params, split, batch_size, sharding,
                         plan: StagePlan) -> None:
  """Refuses teachers whose logits on the first evaluation batch are not finite (finite weights
  can still overflow). Uses the evaluation step, compiled once for the final evaluation anyway;
  the student's weights are finite, so a non-finite KL comes from the teachers."""
  from bigkd.evaluate import eval_batches
  sums = eval_step(params, teacher_params, *next(iter(eval_batches(split, batch_size, sharding))))
  if not np.isfinite(float(sums['kl'])):
    names = ', '.join(f'stages.{plan.name}.teachers.{t.name} ({t.source})' for t in plan.teachers)
    raise checkpoint.CheckpointError(f'{names}: non-finite logits on the first evaluation batch; '
                                     'refusing to distil from it')


def step_pairs(plan: StagePlan) -> tuple:
  """The stage's feature pairs for its train step: teachers by index, and for a FitNet pair
  whose shapes differ its adapter module and the key of the adapter's parameters."""
  teacher_index = {t.name: i for i, t in enumerate(plan.teachers)}
  name = lambda i, p: f'{i}_{p.student_tap}_to_{p.teacher}_{p.teacher_tap}'
  crd = lambda p: 'crd' in p.terms
  return tuple(FeaturePair(
      p.student_tap, teacher_index[p.teacher], p.teacher_tap,
      FeatureAdapter(p.teacher_shape) if p.adapter else None,
      name(i, p) if p.adapter else '', p.terms,
      ContrastiveHeads(plan.loss_options['crd_dim']) if crd(p) else None,
      f'crd_{name(i, p)}' if crd(p) else '') for i, p in enumerate(plan.feature_pairs))


def eval_cka_pairs(plan: StagePlan) -> tuple:
  """(label, FeaturePair) of each pair whose CKA the evaluation reports."""
  teacher_index = {t.name: i for i, t in enumerate(plan.teachers)}
  return tuple((p.label, FeaturePair(p.student_tap, teacher_index[p.teacher], p.teacher_tap))
               for p in plan.cka_pairs)


# Folded into the stage's init key for its adapters: a stream apart from the student's draw.
ADAPTER_STREAM = 1


def self_heads(plan: StagePlan) -> tuple:
  """The stage's shallow classifiers on the student's own taps (`objective.SelfHead`)."""
  return tuple(SelfHead(tap, ShallowClassifier(plan.num_classes, plan.prelogits_width),
                        f'self_{tap}') for tap, _ in plan.self_taps)


# Folded into the adapters' key for the SFTN branches: their draws apart from the others'.
SFTN_STREAM = 2


def sftn_branches(plan: StagePlan) -> tuple:
  """The stage's student branches (`objective.SftnBranch`): the student model (in the stage's
  compute dtype) from each tap, behind its transform."""
  if not plan.sftn_student:
    return ()
  student = get_model(plan.sftn_student, plan.num_classes, dtype=jnp.dtype(plan.compute_dtype))
  return tuple(SftnBranch(tap, StudentBranch(student, tap, student_shape), f'sftn_{tap}')
               for tap, _, student_shape in plan.sftn_branches)


def initial_adapters(plan: StagePlan, pairs, mesh):
  """{key: params} of the stage's adapters, CRD heads, shallow classifiers and SFTN branches,
  drawn from (seed, stage index) apart from the student's init and sharded by the parameter
  rule; {} when the stage has none."""
  with_adapter = [(p, planned) for p, planned in zip(pairs, plan.feature_pairs)
                  if p.adapter or p.heads]
  own = self_heads(plan)
  branches = sftn_branches(plan)
  if not with_adapter and not own and not branches:
    return {}
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(plan.seed), plan.index),
                           ADAPTER_STREAM)

  def init():
    params = {}
    for i, (p, planned) in enumerate(with_adapter):
      student_feature = jnp.zeros((1, *planned.student_shape))
      if p.adapter:
        params[p.adapter_key] = p.adapter.init(jax.random.fold_in(key, i),
                                               student_feature)['params']
      if p.heads:  # a stream apart from the adapters' (the first pairs' draws stay as they were)
        params[p.heads_key] = p.heads.init(jax.random.fold_in(key, len(with_adapter) + i),
                                           student_feature,
                                           jnp.zeros((1, *planned.teacher_shape)))['params']
    for i, (head, (_, shape)) in enumerate(zip(own, plan.self_taps)):
      params[head.key] = head.module.init(jax.random.fold_in(key, 2 * len(with_adapter) + i),
                                          jnp.zeros((1, *shape)))['params']
    for i, (branch, (_, shape, _)) in enumerate(zip(branches, plan.sftn_branches)):
      params[branch.key] = branch.module.init(
          jax.random.fold_in(jax.random.fold_in(key, SFTN_STREAM), i),
          jnp.zeros((1, *shape)))['params']
    return params

  shardings = tree_shardings(mesh, jax.eval_shape(init), plan.min_fsdp_size)
  return jax.jit(init, out_shardings=shardings)()


def stage_param_targets(plan: StagePlan, mesh):
  """ShapeDtypeStructs (float32, sharded) of what the stage trains: its model's parameters, or
  for a stage with peers {peer: its model's parameters}."""
  if plan.peers:
    return {p.name: param_targets(p.model, p.model_kwargs, plan.num_classes, p.resolution,
                                  jnp.float32, mesh, plan.min_fsdp_size) for p in plan.peers}
  return param_targets(plan.model, plan.model_kwargs, plan.num_classes, plan.resolution,
                       jnp.float32, mesh, plan.min_fsdp_size)


def initial_state(plan: StagePlan, student, tx, mesh, pairs=()) -> TrainState:
  """Step 0: parameters from `plan.init` (head re-initialised) or drawn from (seed, stage
  index; peer i of a mutual stage: folded with i), the adapters of `pairs` (`step_pairs`) if
  any, and the optimiser state of both, each sharded by the parameter rule (`sharding.py`)."""
  targets = stage_param_targets(plan, mesh)
  init_key = jax.random.fold_in(jax.random.key(plan.seed), plan.index)
  if plan.peers:
    params = {p.name: random_params(model, p.resolution, jax.random.fold_in(init_key, i),
                                    targets[p.name])
              for i, (p, model) in enumerate(zip(plan.peers, student))}
  elif plan.init:
    params = checked_finite(checkpoint.load_params(plan.init, targets, f'stages.{plan.name}.init',
                                                   new_head_classes=plan.num_classes),
                            f'stages.{plan.name}.init ({plan.init})')
  else:
    params = random_params(student, plan.resolution, init_key, targets)
  aux_params = initial_adapters(plan, pairs, mesh)
  opt_state = init_opt_state(tx, optimized_tree(params, aux_params), mesh, plan.min_fsdp_size)
  return TrainState.create(params, opt_state, stage_metrics(plan), aux_params,
                           initial_queues(pairs, plan.loss_options),
                           put=lambda x: jax.device_put(x, replicated(mesh)))


def prefetch_to_device(iterator, size=2):
  """Keeps `size` batches in flight: device transfers are asynchronous, so the next batch
  moves while the current step runs (the pattern of flax.jax_utils.prefetch_to_device, for
  global sharded arrays)."""
  queue = collections.deque()
  for item in iterator:
    queue.append(item)
    if len(queue) > size:
      yield queue.popleft()
  yield from queue


def local_rows(split, indices, cache=None) -> tuple:
  """This process's rows of a global batch: (images, sizes, labels[, cache rows])."""
  local = np.array_split(indices, jax.process_count())[jax.process_index()]
  rows = split.rows(local)
  return rows if cache is None else (*rows, {k: v[local] for k, v in cache.items()})


def streamed_inputs(split, seed, batch_size, sharding, start_step, stop_step=None,
                    num_threads=4, cache=None, batch_indices=None):
  """Batches (images, sizes, labels[, teacher cache rows]) of steps start_step, start_step + 1,
  ...: each process reads and decodes only its rows of the global batch (indices a pure function
  of (seed, step): `batch_indices(step)`, by default `host_batch_indices`), `num_threads` steps
  at a time in grain's reader threads (TF's decoding releases the GIL), then sends them to its
  devices."""
  batch_indices = batch_indices or (
      lambda step: host_batch_indices(seed, step, batch_size, len(split)))

  def step_rows(step):
    return local_rows(split, batch_indices(step), cache)

  steps = grain.MapDataset.range(start_step, stop_step or sys.maxsize)
  host = steps.map(step_rows).to_iter_dataset(
      grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
  return prefetch_to_device(on_devices(rows, sharding) for rows in host)


def on_devices(rows, sharding):
  """Each process's rows of a global batch (`local_rows`) as global arrays split over the
  devices by rows."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), rows)


def random_cache(plan: StagePlan, num_examples: int) -> dict:
  """A teacher cache of random logits, shaped as `plan`'s (the benchmark: speed only)."""
  logits = np.random.default_rng(0).normal(size=(num_examples, plan.num_classes))
  return jax.device_get(losses.compact_logits(logits.astype(np.float32),
                                              plan.teacher_cache_top_k))


def teacher_cache_rows(plan: StagePlan, spec: StepSpec, teacher_params, train, mesh) -> dict:
  """The stage's teacher cache in host memory ({'values', ('indices')} by train example),
  computed first where the folder lacks it; refused (ConfigError) when made for other teachers,
  weights or data."""
  want = dict(plan.teacher_cache_identity,
              teacher_checksums=teacher_cache.teacher_checksums(teacher_params))
  what = f'stages.{plan.name}.teacher_cache'
  teacher_cache.check_reusable(plan.teacher_cache, want, what)
  if teacher_cache.read_identity(plan.teacher_cache) is None:
    logits = jax.jit(functools.partial(fixed_view_teacher_logits, spec, teacher_params))
    teacher_cache.make(plan.teacher_cache, want, lambda rows: logits(*on_devices(
        local_rows(train, rows), batch_sharding(mesh))), mesh.size)
  return teacher_cache.load(plan.teacher_cache)


def jit_step(step_fn, state: TrainState, mesh):
  """`step_fn(state, teacher_params, *inputs)` jitted: the state is donated (updated in place)
  and keeps its shardings; metrics come back replicated."""
  return jax.jit(step_fn, donate_argnums=0, out_shardings=(
      jax.tree.map(lambda x: x.sharding, state), replicated(mesh)))


@dataclasses.dataclass
class Stage:
  """A built stage. `train_step(state, teacher_params, *inputs) -> (state, metrics)` is jitted
  (state donated) and fed by `inputs(start_step, stop_step)`; `raw_step` is the same step,
  unjitted, on an explicit (images, sizes, labels) batch."""
  plan: StagePlan
  mesh: Any
  student: Any
  teachers: tuple
  teacher_params: list
  tx: Any
  lr_schedule: Callable
  spec: StepSpec
  state: TrainState
  raw_step: Callable
  train_step: Callable
  inputs: Callable[..., Iterator]  # (start_step, stop_step=None: endless) -> inputs per step
  evaluate: Callable  # (params, splits=('val', 'test')) -> {'val_accuracy': ..., ...}
  teacher_cache: dict | None = None  # the cached teacher logits the step reads (host memory)


def stage_metrics(plan: StagePlan) -> tuple:
  """The names the stage's `metric_sums` keep (`step.summed_metrics`)."""
  return summed_metrics(bool(plan.teachers), plan.loss_terms, [p.name for p in plan.peers])


def student_model(plan: StagePlan):
  """The stage's model, computing in its compute dtype (its parameters are float32); for a
  stage with peers, the tuple of their modules."""
  if plan.peers:
    return tuple(get_model(p.model, plan.num_classes, dtype=jnp.dtype(plan.compute_dtype),
                           **p.model_kwargs) for p in plan.peers)
  return get_model(plan.model, plan.num_classes, dtype=jnp.dtype(plan.compute_dtype),
                   **plan.model_kwargs)


def stage_optimizer(plan: StagePlan):
  """(optax transformation, learning-rate schedule) of a stage."""
  tx, lr_schedule = build_optimizer(plan.optimizer, plan.steps, plan.warmup_steps)
  if plan.peers:  # each peer's update from its own gradient (clipped by its own norm)
    tx = per_peer(tx, [p.name for p in plan.peers])
  if plan.optimizer.get('skip_nonfinite_updates'):
    tx = optax.apply_if_finite(tx, MAX_SKIPPED_IN_A_ROW)
  return tx, lr_schedule


def stage_spec(plan: StagePlan, student, teachers, pairs) -> StepSpec:
  objective = Objective(plan.loss_terms, plan.loss, plan.temperature, plan.label_weight,
                        plan.ensemble, tuple(sorted(plan.loss_options.items())), pairs,
                        self_heads(plan), sftn_branches(plan))
  if plan.peers:  # `student`: their modules (`student_model`)
    return StepSpec(None, 0, (), plan.num_classes, tuple(sorted(plan.augment.items())),
                    plan.teaching_mode, objective, plan.step_seed, peer_specs(plan, student))
  return StepSpec(student, plan.resolution, teachers, plan.num_classes,
                  tuple(sorted(plan.augment.items())), plan.teaching_mode, objective,
                  plan.step_seed)


def peer_specs(plan: StagePlan, modules) -> tuple:
  """The `Peer`s of a mutual stage, with their modules (`student_model`)."""
  return tuple(Peer(p.name, model, p.resolution) for p, model in zip(plan.peers, modules))


def train_data_indices(plan: StagePlan, seed: int, draw):
  """`step -> indices` of a stage with train_data: `draw` (`sampling.device_step_indices` or
  `host_step_indices`) at its sources' rows and sizes; None for the data block's train split
  (the inputs' default rule over all its examples)."""
  if not plan.train_data:
    return None
  rows, sizes = plan_rows_and_sizes(plan, 0)
  return lambda step: draw(seed, step, rows, sizes)


def fed_step(plan: StagePlan, spec: StepSpec, raw_step, mesh):
  """The step as the loop calls it: on device-resident data it gathers its own batch (the
  resident images split by rows over devices with `shard_resident`); streamed, it takes one."""
  if not plan.device_resident:
    return raw_step
  return with_device_batches(raw_step, spec.seed, plan.batch_size, batch_sharding(mesh),
                             functools.partial(gather_rows, mesh) if plan.shard_resident
                             else None, train_data_indices(plan, spec.seed, device_step_indices))


def build_stage(plan: StagePlan, data: RunData, mesh, random_params=False) -> Stage:
  """Everything the loop of `plan` needs, at step 0. `random_params`: random student and
  teachers, no checkpoint read (the benchmark: speed does not depend on weights)."""
  student = student_model(plan)
  teachers, teacher_params = load_teachers(plan, mesh, random_init=random_params)
  tx, lr_schedule = stage_optimizer(plan)
  pairs = step_pairs(plan)
  state = initial_state(dataclasses.replace(plan, init='') if random_params else plan, student,
                        tx, mesh, pairs)
  spec = stage_spec(plan, student, teachers, pairs)
  raw_step = make_train_step(spec, tx, lr_schedule, plan.grad_accum_steps,
                             fsdp_compute_sharding(mesh), plan.log_every)
  batches = batch_sharding(mesh)
  train = data.train_for(plan.name)
  cache = None
  if plan.teacher_cache:
    cache = (random_cache(plan, len(train)) if random_params else
             teacher_cache_rows(plan, spec, teacher_params, train, mesh))
  if plan.device_resident:
    resident = (put_rows_sharded(train.images, mesh) if plan.shard_resident
                else put_global(train.images, replicated(mesh)),
                put_global(train.sizes, replicated(mesh)),
                put_global(train.labels, replicated(mesh)))
    if cache is not None:
      resident += (jax.tree.map(lambda x: put_global(x, replicated(mesh)), cache),)
    inputs = lambda start_step, stop_step=None: itertools.repeat(resident)
  else:
    inputs = functools.partial(
        streamed_inputs, train, spec.seed, plan.batch_size, batches,
        num_threads=plan.reader_threads, cache=cache,
        batch_indices=train_data_indices(plan, spec.seed, host_step_indices))
  train_step = jit_step(fed_step(plan, spec, raw_step, mesh), state, mesh)
  eval_step = jax.jit(make_mutual_eval_step(spec.peers, plan.eval_crop_fraction) if plan.peers
                      else make_eval_step(student, plan.resolution, teachers, plan.ensemble,
                                          plan.eval_crop_fraction, eval_cka_pairs(plan)))
  if teachers and not random_params:
    check_teacher_logits(eval_step, state.params, teacher_params, data.val, plan.eval_batch_size,
                         batches, plan)

  def evaluate_splits(params, splits=('val', 'test')):
    results = {}
    for name in splits:
      metrics = evaluate(eval_step, params, teacher_params, getattr(data, name),
                         plan.eval_batch_size, batches)
      results.update(split_results(name, metrics, [p.name for p in plan.peers]))
    return results

  return Stage(plan, mesh, student, teachers, teacher_params, tx, lr_schedule, spec, state,
               raw_step, train_step, inputs, evaluate_splits, cache)


def split_results(split: str, metrics: dict, peers=()) -> dict:
  """An evaluation's metrics keyed by split ('val_accuracy'); a mutual stage's per peer
  ('PEER/val_accuracy', ...), beside the peers' ensemble ('val_ensemble_accuracy') and the mean
  of their accuracies ('val_accuracy', so that tables of stages read it)."""
  out = {}
  for key, value in metrics.items():
    peer, _, name = key.rpartition('/')
    out[f'{peer}/{split}_{name}' if peer in peers else f'{split}_{key}'] = value
  if peers:
    out[f'{split}_accuracy'] = float(np.mean([metrics[f'{p}/accuracy'] for p in peers]))
  return out


def _abstract(shapes, shardings):
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def abstract_stage(plan: StagePlan, mesh, num_train_examples: int, canvas: int):
  """(jitted train step, its arguments as ShapeDtypeStructs carrying their shardings): the step
  `build_stage` makes, without data, checkpoints or any array, so that it can be compiled ahead
  of time for devices this machine does not have (`bigkd.launch_plan`)."""
  student = student_model(plan)
  teachers, teacher_params = teacher_targets(plan, mesh)
  tx, lr_schedule = stage_optimizer(plan)
  pairs = step_pairs(plan)
  params = stage_param_targets(plan, mesh)
  shapes = jax.eval_shape(lambda: initial_adapters(plan, pairs, mesh))
  aux_params = _abstract(shapes, tree_shardings(mesh, shapes, plan.min_fsdp_size))
  shapes = jax.eval_shape(tx.init, optimized_tree(params, aux_params))
  opt_state = _abstract(shapes, tree_shardings(mesh, shapes, plan.min_fsdp_size))
  scalar = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated(mesh))
  loss_state = jax.eval_shape(lambda: initial_queues(pairs, plan.loss_options))
  state = TrainState.create(params, opt_state, stage_metrics(plan), aux_params, loss_state,
                            put=lambda x: jax.tree.map(scalar, x))
  spec = stage_spec(plan, student, teachers, pairs)
  raw_step = make_train_step(spec, tx, lr_schedule, plan.grad_accum_steps,
                             fsdp_compute_sharding(mesh), plan.log_every)
  if plan.device_resident:  # the whole train split (images padded when split by rows)
    n = num_train_examples
    rows = -(-n // mesh.size) * mesh.size if plan.shard_resident else n
    images = (rows, batch_sharding(mesh) if plan.shard_resident else replicated(mesh))
    per_example = (n, replicated(mesh))
  else:
    images = per_example = (plan.batch_size, batch_sharding(mesh))
  inputs = (jax.ShapeDtypeStruct((images[0], canvas, canvas, 3), jnp.uint8, sharding=images[1]),
            jax.ShapeDtypeStruct((per_example[0], 2), jnp.int32, sharding=per_example[1]),
            jax.ShapeDtypeStruct((per_example[0],), jnp.int32, sharding=per_example[1]))
  return jit_step(fed_step(plan, spec, raw_step, mesh), state, mesh), (
      state, teacher_params, *inputs)
