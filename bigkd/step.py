"""The jitted train step and the eval step: pure functions built from plain arguments.

Per step, on device: indices(seed, step) → gather → one set of augmentation draws → teacher
view(s) and student view → teacher forward (frozen, bf16, no gradient) → loss → optax update.
"""
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from bigkd import losses
from bigkd.data import augment
from bigkd.data.sampling import device_batch_indices


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  # The first step whose loss, gradients or parameters were not finite (0: none yet). Carried on
  # device so that the check costs no host sync per step: the loop reads it only where it syncs
  # anyway (log steps, checkpoints). None: not tracked (states built by hand, e.g. in tests).
  first_nonfinite_step: Any = None
  # Sums of the MEAN_METRICS over the steps since the last log step, and their count: a logged
  # value is the mean over its whole log interval, not one batch's. Checkpointed with the state,
  # so a resumed run logs what an uninterrupted one does. None: not tracked.
  metric_sums: Any = None


def all_finite(tree) -> jax.Array:
  """True when every element of every leaf is finite (no NaN, no ±Inf). Unlike a global norm,
  it does not overflow to Inf on huge but finite values."""
  leaves = jax.tree.leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else \
      jnp.array(True)


def skipped_update(opt_state) -> jax.Array:
  """True when `optax.apply_if_finite` (skip_nonfinite_updates) saw non-finite gradients this
  step: it rejects the update (parameters and optimiser state stay as they were) unless too many
  came in a row, and then the parameters it applied are non-finite, which `all_finite` catches.
  False for any other optimiser."""
  if not isinstance(opt_state, optax.ApplyIfFiniteState):
    return jnp.array(False)
  return ~opt_state.last_finite


# Logged as means over the steps since the last log (`TrainState.metric_sums`); `lr` is logged
# as the value at the step and `skipped_updates` as the running total.
MEAN_METRICS = ('loss', 'kl_T1', 'agreement', 'grad_norm')


def zero_metric_sums(distilled: bool) -> dict:
  """Empty sums of the metrics a stage's step produces (KL and agreement only when distilled)."""
  names = MEAN_METRICS if distilled else ('loss', 'grad_norm')
  return {name: jnp.zeros((), jnp.float32) for name in ('count',) + names}


def add_metric_sums(sums, metrics, step, log_every):
  """`sums` with this step's metrics added, first emptied when `step` (0-based, the step being
  taken) opens a log interval: the loop logs after steps that are multiples of `log_every`."""
  if sums is None:
    return None
  fresh = step % log_every == 0
  return {name: jnp.where(fresh, 0.0, total) + (1.0 if name == 'count' else metrics[name])
          for name, total in sums.items()}


def logged_means(sums) -> dict:
  """The logged values of an interval: each of MEAN_METRICS averaged over its steps (host)."""
  count = float(sums['count'])
  return {name: float(sums[name]) / count for name in MEAN_METRICS if name in sums}


def note_nonfinite(first_nonfinite_step, bad, step):
  """`first_nonfinite_step` updated with this step's flag: `step` if this is the first bad one."""
  if first_nonfinite_step is None:
    return None
  return jnp.where((first_nonfinite_step == 0) & bad, step, first_nonfinite_step)


class Teacher(NamedTuple):
  """A frozen teacher: its module (computing in the teacher dtype) and input resolution."""
  model: nn.Module
  resolution: int


class StepSpec(NamedTuple):
  """Everything static about a stage's train step (hashable: jit closes over it)."""
  student: nn.Module
  resolution: int
  teachers: tuple  # of Teacher; empty: a supervised stage
  num_classes: int
  augment: tuple   # sorted (key, value) pairs of the resolved augment config
  teaching_mode: str
  loss: str
  temperature: float
  label_weight: float
  ensemble: str
  seed: int


def teacher_views(teachers, images, teacher_draws, image_hw=None):
  """The teachers' views {resolution: view}, rendered once per distinct resolution."""
  return {size: augment.render_view(images, teacher_draws, size, image_hw)
          for size in sorted({t.resolution for t in teachers})}


def logits_on_views(teachers, teacher_params, views):
  """Each frozen teacher's float32 logits on its view (in the teacher's dtype, no gradient)."""
  return [jax.lax.stop_gradient(t.model.apply({'params': params},
                                              views[t.resolution].astype(t.model.dtype))
                                .astype(jnp.float32))
          for t, params in zip(teachers, teacher_params)]


def teacher_logits(teachers, teacher_params, images, teacher_draws, image_hw=None):
  """Logits of each teacher on its view; views are rendered once per distinct resolution."""
  return logits_on_views(teachers, teacher_params,
                         teacher_views(teachers, images, teacher_draws, image_hw))


def microbatches(x, k):
  """[B, ...] -> [k, B/k, ...]; microbatch j holds rows j, j+k, ..., so when B is split over
  devices in contiguous blocks every microbatch is split over all devices the same way."""
  return jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)


def augmented_batch(spec: StepSpec, images, sizes, labels, key):
  """(student view, teacher views {resolution: view}, targets) of a whole batch: the only random
  part of a train step. A module-level pure function of (spec, batch, key), so that
  `bigkd.inspect.views` can show exactly the batch a step trained on."""
  aug = dict(spec.augment)
  batch = images.shape[0]
  onehot = jax.nn.one_hot(labels, spec.num_classes)
  if spec.teachers:
    student_draws, teacher_draws = augment.distillation_draws(key, batch, aug,
                                                              spec.teaching_mode, sizes)
  else:
    student_draws = augment.sample_draws(key, batch, aug, aug['mixup_alpha'] > 0, sizes)
  student_view = augment.render_view(images, student_draws, spec.resolution, sizes)
  views = teacher_views(spec.teachers, images, teacher_draws, sizes) if spec.teachers else {}
  return student_view, views, augment.mix_labels(onehot, student_draws)


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, lr_schedule,
                    grad_accum_steps: int = 1, gather_params=None, log_every: int = 1):
  """Returns `train_step(state, teacher_params, images, sizes, labels) -> (state, metrics)`
  (a batch of canvases, each image's size on its canvas, and labels: see `data/sources.py`).

  With `grad_accum_steps` k > 1 the whole batch is augmented first (its draws and mixup pairs
  are those of the full batch), then forward and backward run on k microbatches in a scan and
  their gradients and metrics are averaged: the full batch's update with 1/k of the activation
  memory (every loss is a mean over examples). `gather_params`: the sharding that student and
  teacher parameters take for compute (see `sharding.fsdp_compute_sharding`); None: as stored.
  `log_every`: the interval over which `state.metric_sums` accumulates (see MEAN_METRICS).
  """
  def loss_fn(params, teacher_params, student_view, views, targets):
    if gather_params is not None:  # FSDP: whole weights for compute, the batch stays split
      params, teacher_params = jax.lax.with_sharding_constraint(
          (params, teacher_params), jax.tree.map(lambda _: gather_params,
                                                 (params, teacher_params)))
    student_logits = spec.student.apply({'params': params}, student_view)
    metrics = {}
    if not spec.teachers:
      loss = losses.cross_entropy(student_logits, targets)
    else:
      all_logits = logits_on_views(spec.teachers, teacher_params, views)
      t_logits = losses.ensemble_logits(all_logits, spec.ensemble, spec.temperature)
      loss = losses.hinton_loss(t_logits, student_logits, targets, spec.label_weight,
                                spec.temperature, spec.loss)
      # At T = 1 whatever the stage's temperature (`loss` is T²·KL at T): comparable across
      # stages and with the evaluation's `val_kl` / `test_kl`, which are also at T = 1.
      metrics['kl_T1'] = losses.kl_divergence(t_logits, student_logits)
      metrics['agreement'] = jnp.mean(jnp.argmax(t_logits, -1) == jnp.argmax(student_logits, -1))
    metrics['loss'] = loss
    return loss, metrics

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulated_grads(params, teacher_params, batch):
    """Mean gradients and metrics over `grad_accum_steps` microbatches of `batch`."""
    k = grad_accum_steps
    if k == 1:
      return grad_fn(params, teacher_params, *batch)
    micro = jax.tree.map(lambda x: microbatches(x, k), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, teacher_params, *first))

    def add_microbatch(total, one):
      return jax.tree.map(jnp.add, total, grad_fn(params, teacher_params, *one)), None

    total, _ = jax.lax.scan(add_microbatch, zeros, micro)
    return jax.tree.map(lambda x: x / k, total)

  def train_step(state: TrainState, teacher_params, images, sizes, labels):
    key = jax.random.fold_in(jax.random.key(spec.seed), state.step)
    grads, metrics = accumulated_grads(state.params, teacher_params,
                                       augmented_batch(spec, images, sizes, labels, key))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = lr_schedule(state.step)
    skipped = skipped_update(opt_state)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
      metrics['skipped_updates'] = opt_state.total_notfinite
    # Non-finite: a bad loss or gradient that was applied, or parameters that went bad anyway.
    bad = (~(jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])) & ~skipped
           | ~all_finite(params))
    return TrainState(state.step + 1, params, opt_state,
                      note_nonfinite(state.first_nonfinite_step, bad, state.step + 1),
                      add_metric_sums(state.metric_sums, metrics, state.step, log_every)), metrics

  return train_step


def with_device_batches(train_step, seed, batch_size, batch_sharding, gather_images=None):
  """Wraps `train_step` for device-resident data: the batch is gathered on device from
  indices that are a pure function of (seed, step); the host sends nothing per step.

  `gather_images(all_images, indices)` replaces `all_images[indices]` when the resident images
  are split over devices (their row count then includes padding: the example count is that of
  the labels)."""

  def step_on_resident_data(state, teacher_params, all_images, all_sizes, all_labels):
    indices = device_batch_indices(seed, state.step, batch_size, all_labels.shape[0])
    sharded_indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
    images = (gather_images(all_images, indices) if gather_images
              else all_images[sharded_indices])
    return train_step(state, teacher_params, images, all_sizes[sharded_indices],
                      all_labels[sharded_indices])

  return step_on_resident_data


def make_eval_step(student, resolution, teachers, ensemble, crop_fraction=0.0):
  """Returns `eval_step(params, teacher_params, images, sizes, labels, mask) -> sums`. Each
  model sees the central crop of the paper's code (resize_small(S) then central_crop(R), with
  `crop_fraction` = R / S) rendered at its own resolution; `crop_fraction` 0: the whole image."""

  def eval_step(params, teacher_params, images, sizes, labels, mask):
    view = augment.Draws(augment.central_boxes(sizes, crop_fraction),
                         jnp.zeros(images.shape[:1], bool), None)
    s_logits = student.apply({'params': params},
                             augment.render_view(images, view, resolution, sizes))
    sums = {'count': jnp.sum(mask),
            'student_correct': jnp.sum(mask * (jnp.argmax(s_logits, -1) == labels))}
    if teachers:
      t_logits = losses.ensemble_logits(
          teacher_logits(teachers, teacher_params, images, view, sizes), ensemble)
      t_logp, s_logp = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(s_logits)
      kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
      sums['teacher_correct'] = jnp.sum(mask * (jnp.argmax(t_logits, -1) == labels))
      sums['agreement'] = jnp.sum(mask * (jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)))
      sums['kl'] = jnp.sum(mask * kl)
    return sums

  return eval_step
