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


def teacher_logits(teachers, teacher_params, images, teacher_draws):
  """Logits of each teacher on its view; views are rendered once per distinct resolution."""
  views = {}
  logits = []
  for teacher, params in zip(teachers, teacher_params):
    if teacher.resolution not in views:
      views[teacher.resolution] = augment.render_view(images, teacher_draws, teacher.resolution)
    view = views[teacher.resolution].astype(teacher.model.dtype)
    logits.append(teacher.model.apply({'params': params}, view).astype(jnp.float32))
  return [jax.lax.stop_gradient(l) for l in logits]


def make_train_step(spec: StepSpec, tx: optax.GradientTransformation, lr_schedule):
  """Returns `train_step(state, teacher_params, images, labels) -> (state, metrics)`."""
  aug = dict(spec.augment)

  def loss_fn(params, teacher_params, images, labels, key):
    batch = images.shape[0]
    onehot = jax.nn.one_hot(labels, spec.num_classes)
    if spec.teachers:
      student_draws, teacher_draws = augment.distillation_draws(key, batch, aug, spec.teaching_mode)
    else:
      student_draws = augment.sample_draws(key, batch, aug, use_mixup=aug['mixup_alpha'] > 0)
    student_view = augment.render_view(images, student_draws, spec.resolution)
    targets = augment.mix_labels(onehot, student_draws)
    student_logits = spec.student.apply({'params': params}, student_view)
    metrics = {}
    if not spec.teachers:
      loss = losses.cross_entropy(student_logits, targets)
    else:
      all_logits = teacher_logits(spec.teachers, teacher_params, images, teacher_draws)
      t_logits = losses.ensemble_logits(all_logits, spec.ensemble, spec.temperature)
      loss = losses.hinton_loss(t_logits, student_logits, targets, spec.label_weight,
                                spec.temperature, spec.loss)
      metrics['kl'] = losses.kl_divergence(t_logits, student_logits)
      metrics['agreement'] = jnp.mean(jnp.argmax(t_logits, -1) == jnp.argmax(student_logits, -1))
    metrics['loss'] = loss
    return loss, metrics

  def train_step(state: TrainState, teacher_params, images, labels):
    key = jax.random.fold_in(jax.random.key(spec.seed), state.step)
    grads, metrics = jax.grad(loss_fn, has_aux=True)(
        state.params, teacher_params, images, labels, key)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = lr_schedule(state.step)
    return TrainState(state.step + 1, params, opt_state), metrics

  return train_step


def with_device_batches(train_step, seed, batch_size, batch_sharding):
  """Wraps `train_step` for device-resident data: the batch is gathered on device from
  indices that are a pure function of (seed, step); the host sends nothing per step."""

  def step_on_resident_data(state, teacher_params, all_images, all_labels):
    indices = device_batch_indices(seed, state.step, batch_size, all_images.shape[0])
    indices = jax.lax.with_sharding_constraint(indices, batch_sharding)
    return train_step(state, teacher_params, all_images[indices], all_labels[indices])

  return step_on_resident_data


def make_eval_step(student, resolution, teachers, ensemble):
  """Returns `eval_step(params, teacher_params, images, labels, mask) -> sums` on whole images
  (the stored base-size image resized to each model's resolution)."""

  def eval_step(params, teacher_params, images, labels, mask):
    full = augment.Draws(augment.full_boxes(images.shape[0]),
                         jnp.zeros(images.shape[:1], bool), None)
    s_logits = student.apply({'params': params}, augment.render_view(images, full, resolution))
    sums = {'count': jnp.sum(mask),
            'student_correct': jnp.sum(mask * (jnp.argmax(s_logits, -1) == labels))}
    if teachers:
      t_logits = losses.ensemble_logits(teacher_logits(teachers, teacher_params, images, full),
                                        ensemble)
      t_logp, s_logp = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(s_logits)
      kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
      sums['teacher_correct'] = jnp.sum(mask * (jnp.argmax(t_logits, -1) == labels))
      sums['agreement'] = jnp.sum(mask * (jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)))
      sums['kl'] = jnp.sum(mask * kl)
    return sums

  return eval_step
