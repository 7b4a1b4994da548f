"""The pure train step and eval step of a stage, built from plain arguments.

Per step, on device: indices(seed, step) → gather → one set of augmentation draws → teacher
view(s) and student view → `forward` of the teachers (frozen, no gradient) and the student →
`objective.loss_and_metrics` → optax update.
"""
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bigkd import losses, objective
from bigkd.data import augment
from bigkd.data.sampling import device_batch_indices
from bigkd.forward import Peer, Teacher, eval_draws, eval_forward, forward, render_views, \
    teacher_forward
from bigkd.objective import FeaturePair, Objective, Outputs, SelfHead, SftnBranch

__all__ = ['TrainState', 'StepSpec', 'Teacher', 'Peer', 'FeaturePair', 'SelfHead', 'SftnBranch',
           'Objective', 'make_train_step', 'make_eval_step', 'make_mutual_eval_step',
           'make_loss_fn', 'augmented_batch', 'with_device_batches']


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # The first step whose loss, gradients or parameters were not finite (0: none yet). Carried on
  # device so that the check costs no host sync per step: the loop reads it only where it syncs
  # anyway (log steps, checkpoints).
  first_nonfinite_step: jax.Array
  # Sums of the MEAN_METRICS (and loss terms) over the steps since the last log step, and their
  # count: a logged value is the mean over its whole log interval. Checkpointed with the state.
  metric_sums: dict
  # Parameters trained with the student that are not the student's: the feature adapters of
  # FitNet pairs, CRD heads, shallow classifiers, SFTN student branches ({key: params}; {}:
  # none). Checkpointed, never exported.
  aux_params: dict = flax.struct.field(default_factory=dict)
  # State that loss terms read and the step updates, not trained: CRD's queues of earlier
  # batches' embeddings ({heads key: queue}, `objective.initial_queues`; {}: none).
  # Checkpointed, replicated, never exported.
  loss_state: dict = flax.struct.field(default_factory=dict)

  @classmethod
  def create(cls, params, opt_state, metric_names, aux_params=None, loss_state=None,
             put=lambda x: x):
    """Step 0 with empty metric sums; `put` places the scalars and `loss_state` (e.g.
    replicated on a mesh)."""
    zero = lambda: put(jnp.zeros((), jnp.int32))
    sums = put({name: jnp.zeros((), jnp.float32) for name in ('count',) + tuple(metric_names)})
    return cls(zero(), params, opt_state, zero(), sums, aux_params or {}, put(loss_state or {}))


def all_finite(tree) -> jax.Array:
  """True when every element of every leaf is finite (no NaN, no ±Inf). Unlike a global norm,
  it does not overflow to Inf on huge but finite values."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else \
      jnp.array(True)


def skipped_update(opt_state) -> jax.Array:
  """True when `optax.apply_if_finite` (skip_nonfinite_updates) rejected this step's update."""
  if not isinstance(opt_state, optax.ApplyIfFiniteState):
    return jnp.array(False)
  return ~opt_state.last_finite


# Logged as means over the steps since the last log (`TrainState.metric_sums`); `lr` is logged
# as the value at the step and `skipped_updates` as the running total.
MEAN_METRICS = ('loss', 'kl_T1', 'agreement', 'grad_norm')


def summed_metrics(distilled: bool, terms, peers=()) -> tuple:
  """The names a stage's `metric_sums` keep (KL and agreement only when distilled). A stage
  with `peers` (their names) keeps the total loss and gradient norm, and each peer's
  (`PEER/...`: its loss, terms, KL and agreement with the others, gradient norm)."""
  if peers:
    return ('loss', 'grad_norm') + tuple(f'{peer}/{name}' for peer in peers
                                         for name in summed_metrics(True, terms))
  names = MEAN_METRICS if distilled else ('loss', 'grad_norm')
  return names + objective.logged_terms(terms)


def add_metric_sums(sums, metrics, step, log_every):
  """`sums` with this step's metrics added, first emptied when `step` (0-based, the step being
  taken) opens a log interval: the loop logs after steps that are multiples of `log_every`."""
  fresh = step % log_every == 0
  return {name: jnp.where(fresh, 0.0, total) + (1.0 if name == 'count' else metrics[name])
          for name, total in sums.items()}


def logged_means(sums) -> dict:
  """The logged values of an interval: each summed metric averaged over its steps (host)."""
  count = float(sums['count'])
  names = [n for n in MEAN_METRICS if n in sums] + sorted(
      n for n in sums if n not in MEAN_METRICS and n != 'count')
  return {name: float(sums[name]) / count for name in names}


def note_nonfinite(first_nonfinite_step, bad, step):
  """`first_nonfinite_step` updated with this step's flag: `step` if this is the first bad one."""
  return jnp.where((first_nonfinite_step == 0) & bad, step, first_nonfinite_step)


class StepSpec(NamedTuple):
  """Everything static about a stage's train step (hashable: jit closes over it)."""
  student: nn.Module
  resolution: int
  teachers: tuple  # of Teacher; empty: a supervised stage
  num_classes: int
  augment: tuple   # sorted (key, value) pairs of the resolved augment config
  teaching_mode: str
  objective: Objective
  seed: int
  peers: tuple = ()  # of Peer: a deep-mutual-learning stage (student None, no teachers)


def teacher_taps(num_teachers: int, pairs) -> tuple:
  """For each teacher, the names of its features that `pairs` compare."""
  return tuple(tuple(sorted({p.teacher_tap for p in pairs if p.teacher == i}))
               for i in range(num_teachers))


def microbatches(x, k):
  """[B, ...] -> [k, B/k, ...]; microbatch j holds rows j, j+k, ..., so when B is split over
  devices in contiguous blocks every microbatch is split over all devices the same way."""
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def joined_microbatches(x):
  """The inverse of `microbatches`: [k, B/k, ...] -> [B, ...] in the batch's row order."""
  return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])


def augmented_batch(spec: StepSpec, images, sizes, labels, key):
  """(student view, teacher views {resolution: view}, targets) of a whole batch: the only random
  part of a train step, a pure function of (spec, batch, key) (`bigkd.inspect.views` shows it).
  A stage with peers: (None, the peers' views {resolution: view}, targets)."""
  aug = dict(spec.augment)
  batch = images.shape[0]
  onehot = jax.nn.one_hot(labels, spec.num_classes)
  if spec.peers:  # one set of draws, rendered at each peer's resolution: no student view
    draws = augment.sample_draws(key, batch, aug, aug['mixup_alpha'] > 0, sizes)
    return None, render_views(spec.peers, images, draws, sizes), augment.mix_labels(onehot, draws)
  if spec.teachers:
    student_draws, teacher_draws = augment.distillation_draws(key, batch, aug,
                                                              spec.teaching_mode, sizes)
  else:
    student_draws = augment.sample_draws(key, batch, aug, aug['mixup_alpha'] > 0, sizes)
  student_view = augment.render_view(images, student_draws, spec.resolution, sizes)
  views = render_views(spec.teachers, images, teacher_draws, sizes) if spec.teachers else {}
  return student_view, views, augment.mix_labels(onehot, student_draws)


def optimized_tree(params, aux_params):
  """What the optimiser updates (and its state mirrors): the student's params, or, for a stage
  with adapters, {'student': params, 'adapters': aux_params} (one clip, one schedule)."""
  return {'student': params, 'adapters': aux_params} if aux_params else params


def split_trainable(trainable, has_adapters: bool):
  """(student params, adapter params) of an `optimized_tree`."""
  return (trainable['student'], trainable['adapters']) if has_adapters else (trainable, {})


def teacher_outputs(spec: StepSpec, teacher_params, views, taps=None):
  """(The teachers' combined logits, [{tap: feature}] of each teacher) on their views."""
  outputs = teacher_forward(spec.teachers, teacher_params, views, taps)
  return (losses.ensemble_logits([logits for logits, _ in outputs], spec.objective.ensemble,
                                 spec.objective.temperature), [feats for _, feats in outputs])


def fixed_view_teacher_logits(spec: StepSpec, teacher_params, images, sizes, labels):
  """The teachers' combined logits of a batch as a `fixed_teacher` train step computes them
  (the whole image, whatever the step's key): what `bigkd.teacher_cache` stores."""
  if spec.teaching_mode != 'fixed_teacher':
    raise ValueError(f'{spec.teaching_mode}: the teachers\' view depends on the step')
  _, views, _ = augmented_batch(spec, images, sizes, labels, jax.random.key(0))
  return teacher_outputs(spec, teacher_params, views)[0]


def make_loss_fn(spec: StepSpec, gather_params=None):
  """`loss_fn(trainable, teacher_params, step, student_view, views, targets, cached=None,
  loss_state={}) -> (loss, (metrics, batch embeddings))`: the forward passes and the stage's
  objective on one augmented batch; the embeddings are what joins the queues
  (`objective.enqueued`; {}: none). `cached`: the batch's rows of a teacher cache, read in place
  of the teachers' forward (`bigkd.teacher_cache`).
  `trainable`: `optimized_tree(params, aux_params)`. `gather_params`: the sharding that student
  and teacher parameters take for compute (FSDP); None: as stored."""
  obj = spec.objective
  pairs = obj.feature_pairs
  has_adapters = bool(obj.self_heads or obj.sftn_branches) or any(
      p.adapter is not None or p.heads is not None for p in pairs)
  student_taps = tuple(sorted({p.student_tap for p in pairs} | {h.tap for h in obj.self_heads}
                              | ({'prelogits'} if obj.self_heads else set())
                              | {b.tap for b in obj.sftn_branches}))
  taps = teacher_taps(len(spec.teachers), pairs)

  def loss_fn(trainable, teacher_params, step, student_view, views, targets, cached=None,
              loss_state=None):
    if gather_params is not None:  # FSDP: whole weights for compute, the batch stays split
      trainable, teacher_params = jax.lax.with_sharding_constraint(
          (trainable, teacher_params),
          jax.tree.map(lambda _: gather_params, (trainable, teacher_params)))
    if spec.peers:  # `trainable`: {peer: params}
      logits = {p.name: forward(p.model, trainable[p.name], views[p.resolution])[0]
                for p in spec.peers}
      outputs = objective.peer_outputs(logits, targets, step,
                                       dict(obj.options)['mutual_temperature'])
      loss, metrics = objective.peers_loss_and_metrics(outputs, obj)
      return loss, (metrics, {})
    params, aux_params = split_trainable(trainable, has_adapters)
    s_logits, s_feats = forward(spec.student, params, student_view, student_taps)
    t_logits, t_feats = None, []
    if cached is not None:
      t_logits = losses.cached_logits(cached, spec.num_classes)
    elif spec.teachers:
      t_logits, t_feats = teacher_outputs(spec, teacher_params, views, taps)
    outputs = Outputs(s_logits, s_feats, t_logits, t_feats, targets, aux_params, step,
                      loss_state or {})
    loss, metrics = objective.loss_and_metrics(outputs, obj)
    return loss, (metrics, objective.enqueued(outputs, obj))

  return loss_fn


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, lr_schedule,
                    grad_accum_steps: int = 1, gather_params=None, log_every: int = 1):
  """Returns `train_step(state, teacher_params, images, sizes, labels, cached=None) -> (state,
  metrics)` (a batch of canvases, each image's size on its canvas, labels: see
  `data/sources.py`, and the batch's rows of a teacher cache, if the stage reads one).

  With `grad_accum_steps` k > 1 the whole batch is augmented first (its draws and mixup pairs
  are those of the full batch), then forward and backward run on k microbatches in a scan and
  their gradients and metrics are averaged: the full batch's update with 1/k of the activation
  memory (every loss is a mean over examples). `log_every`: the interval over which
  `state.metric_sums` accumulates.
  """
  grad_fn = jax.grad(make_loss_fn(spec, gather_params), has_aux=True)

  def accumulated_grads(trainable, teacher_params, step, batch, loss_state):
    """(Mean gradients, mean metrics, batch embeddings) over `grad_accum_steps` microbatches of
    `batch`; the embeddings (`make_loss_fn`) back in the batch's row order."""
    k = grad_accum_steps
    grad = lambda *one: grad_fn(trainable, teacher_params, step, *one, loss_state)
    if k == 1:
      grads, (metrics, embeddings) = grad(*batch)
      return grads, metrics, embeddings
    micro = jax.tree.map(lambda x: microbatches(x, k), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    grads, (metrics, _) = jax.eval_shape(grad, *first)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads, metrics))

    def add_microbatch(total, one):
      grads, (metrics, embeddings) = grad(*one)
      return jax.tree.map(jnp.add, total, (grads, metrics)), embeddings

    total, embeddings = jax.lax.scan(add_microbatch, zeros, micro)
    grads, metrics = jax.tree.map(lambda x: x / k, total)
    return grads, metrics, jax.tree.map(joined_microbatches, embeddings)

  def train_step(state: TrainState, teacher_params, images, sizes, labels, cached=None):
    key = jax.random.fold_in(jax.random.key(spec.seed), state.step)
    trainable = optimized_tree(state.params, state.aux_params)
    batch = (*augmented_batch(spec, images, sizes, labels, key), cached)
    grads, metrics, embeddings = accumulated_grads(trainable, teacher_params, state.step, batch,
                                                   state.loss_state)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params, aux_params = split_trainable(trainable, bool(state.aux_params))
    metrics['grad_norm'] = optax.global_norm(grads)
    for p in spec.peers:  # each peer's own (clipped on its own: `optim.per_peer`)
      metrics[f'{p.name}/grad_norm'] = optax.global_norm(grads[p.name])
    metrics['lr'] = lr_schedule(state.step)
    skipped = skipped_update(opt_state)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
      metrics['skipped_updates'] = opt_state.total_notfinite
    # Non-finite: a bad loss or gradient that was applied, or parameters that went bad anyway.
    bad = (~(jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])) & ~skipped
           | ~all_finite(trainable))
    loss_state = objective.updated_queues(state.loss_state, embeddings)
    return TrainState(state.step + 1, params, opt_state,
                      note_nonfinite(state.first_nonfinite_step, bad, state.step + 1),
                      add_metric_sums(state.metric_sums, metrics, state.step, log_every),
                      aux_params, loss_state), metrics

  return train_step


def with_device_batches(train_step, seed, batch_size, batch_sharding, gather_images=None,
                        batch_indices=None):
  """Wraps `train_step` for device-resident data: the batch is gathered on device from
  indices that are a pure function of (seed, step); the host sends nothing per step.

  `gather_images(all_images, indices)` replaces `all_images[indices]` when the resident images
  are split over devices (their row count then includes padding: the example count is that of
  the labels). `batch_indices(step)`: the indices (a train_data mixture's,
  `sampling.device_step_indices`); None: `device_batch_indices` over all the examples."""

  def step_on_resident_data(state, teacher_params, all_images, all_sizes, all_labels,
                            all_cached=None):
    indices = (batch_indices(state.step) if batch_indices else
               device_batch_indices(seed, state.step, batch_size, all_labels.shape[0]))
    sharded_indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
    images = (gather_images(all_images, indices) if gather_images
              else all_images[sharded_indices])
    rows = lambda x: x[sharded_indices]
    return train_step(state, teacher_params, images, rows(all_sizes), rows(all_labels),
                      jax.tree.map(rows, all_cached))

  return step_on_resident_data


def make_mutual_eval_step(peers, crop_fraction=0.0):
  """Returns `eval_step(params, teacher_params, images, sizes, labels, mask) -> sums` of a stage
  with peers ({peer: params}; no teachers): each peer's correct predictions, top-1 agreement and
  KL with the mean prediction of the others (`objective.peer_outputs` at T = 1), as
  `PEER/student_correct`, `PEER/agreement`, `PEER/kl`, and those of the peers' ensemble (the mean
  of all their probabilities) as `ensemble_correct`."""

  def eval_step(params, teacher_params, images, sizes, labels, mask):
    logits = {p.name: eval_forward(p.model, params[p.name], p.resolution, crop_fraction, images,
                                   sizes)[0] for p in peers}
    sums = {'count': jnp.sum(mask), 'ensemble_correct': jnp.sum(mask * (jnp.argmax(
        losses.ensemble_logits(list(logits.values()), 'probs'), -1) == labels))}
    for name, o in objective.peer_outputs(logits, labels, 0, 1.0).items():
      sums[f'{name}/student_correct'] = jnp.sum(mask * (jnp.argmax(o.student_logits, -1) ==
                                                        labels))
      sums[f'{name}/agreement'] = jnp.sum(mask * objective.per_example_agreement(
          o.teacher_logits, o.student_logits))
      sums[f'{name}/kl'] = jnp.sum(mask * losses.per_example_kl(o.teacher_logits,
                                                                o.student_logits))
    return sums

  return eval_step


def make_eval_step(student, resolution, teachers, ensemble, crop_fraction=0.0, cka_pairs=()):
  """Returns `eval_step(params, teacher_params, images, sizes, labels, mask) -> sums` over the
  evaluation view (`forward.eval_draws`), each model at its own resolution. `cka_pairs`:
  (label, FeaturePair) pairs whose minibatch HSIC terms the sums carry (`hsic/LABEL`: [xy, xx,
  yy] of the batch's real rows), for `evaluate` to turn into CKA."""
  pairs = tuple(pair for _, pair in cka_pairs)
  student_taps = tuple(sorted({p.student_tap for p in pairs}))

  def eval_step(params, teacher_params, images, sizes, labels, mask):
    s_logits, s_feats = eval_forward(student, params, resolution, crop_fraction, images, sizes,
                                     student_taps)
    sums = {'count': jnp.sum(mask),
            'student_correct': jnp.sum(mask * (jnp.argmax(s_logits, -1) == labels))}
    if not teachers:
      return sums
    views = render_views(teachers, images, eval_draws(sizes, crop_fraction), sizes)
    outputs = teacher_forward(teachers, teacher_params, views,
                              teacher_taps(len(teachers), pairs))
    t_logits = losses.ensemble_logits([logits for logits, _ in outputs], ensemble)
    for label, p in cka_pairs:
      sums[f'hsic/{label}'] = losses.masked_linear_hsic_terms(
          s_feats[p.student_tap], outputs[p.teacher][1][p.teacher_tap], mask)
    sums['teacher_correct'] = jnp.sum(mask * (jnp.argmax(t_logits, -1) == labels))
    sums['agreement'] = jnp.sum(mask * objective.per_example_agreement(t_logits, s_logits))
    sums['kl'] = jnp.sum(mask * losses.per_example_kl(t_logits, s_logits))
    return sums

  return eval_step
