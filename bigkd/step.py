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
from bigkd.losses import DEFAULT_LOSS_TERMS
from bigkd.data.sampling import device_batch_indices
from bigkd.models import features


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
  # Parameters trained with the student that are not the student's: the feature adapters of
  # FitNet pairs ({adapter key: params}). Checkpointed as their own item, never exported (a
  # stage's `params` stay the student's alone). None: the stage has none.
  aux_params: Any = None


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


def loss_components(loss_terms) -> tuple:
  """The metrics `loss_TERM` (each term's unweighted mean) that a stage with these weighted
  terms logs beside `loss`, their weighted sum: none for the default loss (`kl` alone, weight
  1), whose step computes exactly what it computed before other terms existed."""
  if tuple(loss_terms) == DEFAULT_LOSS_TERMS:
    return ()
  return tuple(f'loss_{term}' for term, _ in loss_terms)


def zero_metric_sums(distilled: bool, components: tuple = ()) -> dict:
  """Empty sums of the metrics a stage's step produces (KL and agreement only when distilled;
  `components`: its `loss_components`)."""
  names = (MEAN_METRICS if distilled else ('loss', 'grad_norm')) + tuple(components)
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
  """The logged values of an interval: each summed metric (MEAN_METRICS, then the loss
  components) averaged over its steps (host)."""
  count = float(sums['count'])
  names = [n for n in MEAN_METRICS if n in sums] + sorted(
      n for n in sums if n not in MEAN_METRICS and n != 'count')
  return {name: float(sums[name]) / count for name in names}


def note_nonfinite(first_nonfinite_step, bad, step):
  """`first_nonfinite_step` updated with this step's flag: `step` if this is the first bad one."""
  if first_nonfinite_step is None:
    return None
  return jnp.where((first_nonfinite_step == 0) & bad, step, first_nonfinite_step)


class Teacher(NamedTuple):
  """A frozen teacher: its module (computing in the teacher dtype) and input resolution."""
  model: nn.Module
  resolution: int


class FeaturePair(NamedTuple):
  """A student feature and a teacher feature that the feature losses (or the CKA) compare."""
  student_tap: str
  teacher: int               # index in StepSpec.teachers
  teacher_tap: str
  adapter: Any = None        # FitNet: a `FeatureAdapter` module from student to teacher shape
  adapter_key: str = ''      # ... and its parameters' key in TrainState.aux_params
  terms: tuple = ()          # the feature losses that compare this pair


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
  loss_terms: tuple = DEFAULT_LOSS_TERMS  # (term, weight): the loss is Σ weight·term
  loss_options: tuple = ()  # sorted (key, value) pairs of the stage's loss_options
  feature_pairs: tuple = ()  # of FeaturePair: what the feature losses compare


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


def outputs_on_views(teachers, teacher_params, views, taps):
  """[(float32 logits, {tap: float32 feature})] of each frozen teacher on its view (in the
  teacher's dtype, no gradient); `taps[i]`: the features wanted of teacher i (sown in the same
  forward pass, see `bigkd.models.features`)."""
  outputs = []
  for t, params, names in zip(teachers, teacher_params, taps):
    view = views[t.resolution].astype(t.model.dtype)
    if names:
      logits, feats = features(t.model, params, view, names)
    else:
      logits, feats = t.model.apply({'params': params}, view), {}
    outputs.append(jax.lax.stop_gradient((logits.astype(jnp.float32), feats)))
  return outputs


def teacher_taps(teachers, pairs) -> tuple:
  """For each teacher, the sorted names of its features that `pairs` compare."""
  return tuple(tuple(sorted({p.teacher_tap for p in pairs if p.teacher == i}))
               for i in range(len(teachers)))


def student_outputs(student, params, view, pairs):
  """(logits, {tap: feature}) of the student with the features that `pairs` compare."""
  names = sorted({p.student_tap for p in pairs})
  if not names:
    return student.apply({'params': params}, view), {}
  return features(student, params, view, names)


def feature_term(term, pair, teacher_feature, student_feature, aux_params, options):
  """The unweighted value of feature loss `term` on one pair (teacher first, as in
  `bigkd.losses`); FitNet through the pair's adapter when it has one."""
  if term == 'fitnet':
    if pair.adapter is not None:
      student_feature = pair.adapter.apply({'params': aux_params[pair.adapter_key]},
                                           student_feature)
    return losses.fitnet_loss(teacher_feature, student_feature)
  if term == 'at':
    return losses.attention_transfer(teacher_feature, student_feature, p=options['at_p'])
  if term == 'sp':
    return losses.similarity_preserving(teacher_feature, student_feature)
  if term == 'pkt':
    return losses.pkt(teacher_feature, student_feature)
  if term == 'rkd_distance':
    return losses.rkd_distance(teacher_feature, student_feature)
  if term == 'rkd_angle':
    return losses.rkd_angle(teacher_feature, student_feature)
  raise ValueError(f'unknown feature loss {term!r}')


def loss_terms(spec: StepSpec, t_logits, s_logits, targets, t_feats, s_feats, aux_params, step):
  """{term: unweighted value} of every weighted term of the stage's loss. A feature loss sums
  over the pairs that it compares (`FeaturePair.terms`); `t_feats[i]` are teacher i's
  features, `s_feats` the student's, all taken on the views the logits were (function
  matching: the same crops and mixup)."""
  options = dict(spec.loss_options)
  values = {}
  for term, _ in spec.loss_terms:
    if term == 'kl':
      values[term] = losses.hinton_loss(t_logits, s_logits, targets, spec.label_weight,
                                        spec.temperature, spec.loss)
    elif term == 'labels':
      values[term] = losses.cross_entropy(s_logits, targets)
    elif term == 'dkd':
      warmup = losses.linear_warmup(step + 1, options['dkd_warmup_steps'])
      values[term] = losses.dkd(t_logits, s_logits, targets, options['dkd_alpha'],
                                options['dkd_beta'], options['dkd_temperature'], warmup)
    elif term == 'dist':
      values[term] = losses.dist_loss(t_logits, s_logits, options['dist_beta'],
                                      options['dist_gamma'], options['dist_temperature'])
    else:
      values[term] = sum(feature_term(term, p, t_feats[p.teacher][p.teacher_tap],
                                      s_feats[p.student_tap], aux_params, options)
                         for p in spec.feature_pairs if term in p.terms)
  return values


def weighted_sum(spec: StepSpec, values):
  """Σ weight·value over the stage's terms, in their order (a weight of 1 multiplies nothing)."""
  total = None
  for term, weight in spec.loss_terms:
    value = values[term] if weight == 1 else weight * values[term]
    total = value if total is None else total + value
  return total


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


def optimized_tree(params, aux_params=None):
  """What the optimiser updates (and its state mirrors): the student's params, or, for a stage
  with adapters, {'student': params, 'adapters': aux_params} (one clip, one schedule)."""
  return params if aux_params is None else {'student': params, 'adapters': aux_params}


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
  default_loss = tuple(spec.loss_terms) == DEFAULT_LOSS_TERMS and not spec.feature_pairs

  def loss_fn(params, teacher_params, step, student_view, views, targets):
    if gather_params is not None:  # FSDP: whole weights for compute, the batch stays split
      params, teacher_params = jax.lax.with_sharding_constraint(
          (params, teacher_params), jax.tree.map(lambda _: gather_params,
                                                 (params, teacher_params)))
    if not default_loss:
      return weighted_loss(params, teacher_params, step, student_view, views, targets)
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

  def weighted_loss(trainable, teacher_params, step, student_view, views, targets):
    """Σ weight·term (`loss_terms`), each term logged as `loss_TERM`; `trainable` is the
    student's params, or {'student': ..., 'adapters': ...} when the stage has adapters."""
    params, aux_params = split_trainable(trainable)
    student_logits, s_feats = student_outputs(spec.student, params, student_view,
                                              spec.feature_pairs)
    outputs = outputs_on_views(spec.teachers, teacher_params, views,
                               teacher_taps(spec.teachers, spec.feature_pairs))
    t_logits = losses.ensemble_logits([logits for logits, _ in outputs], spec.ensemble,
                                      spec.temperature)
    values = loss_terms(spec, t_logits, student_logits, targets, [f for _, f in outputs],
                        s_feats, aux_params, step)
    loss = weighted_sum(spec, values)
    metrics = {f'loss_{term}': value for term, value in values.items()}
    metrics['kl_T1'] = losses.kl_divergence(t_logits, student_logits)
    metrics['agreement'] = jnp.mean(jnp.argmax(t_logits, -1) == jnp.argmax(student_logits, -1))
    metrics['loss'] = loss
    return loss, metrics

  has_adapters = any(p.adapter is not None for p in spec.feature_pairs)

  def split_trainable(trainable):
    """(student params, adapter params or None) of what the optimiser updates: the student's
    params, with the adapters beside them when the stage has any (one optimiser state, one
    gradient clip over both)."""
    return (trainable['student'], trainable['adapters']) if has_adapters else (trainable, None)

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def accumulated_grads(params, teacher_params, step, batch):
    """Mean gradients and metrics over `grad_accum_steps` microbatches of `batch`."""
    k = grad_accum_steps
    if k == 1:
      return grad_fn(params, teacher_params, step, *batch)
    micro = jax.tree.map(lambda x: microbatches(x, k), batch)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, params, teacher_params, step, *first))

    def add_microbatch(total, one):
      return jax.tree.map(jnp.add, total, grad_fn(params, teacher_params, step, *one)), None

    total, _ = jax.lax.scan(add_microbatch, zeros, micro)
    return jax.tree.map(lambda x: x / k, total)

  def train_step(state: TrainState, teacher_params, images, sizes, labels):
    key = jax.random.fold_in(jax.random.key(spec.seed), state.step)
    trainable = optimized_tree(state.params, state.aux_params if has_adapters else None)
    grads, metrics = accumulated_grads(trainable, teacher_params, state.step,
                                       augmented_batch(spec, images, sizes, labels, key))
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    params, aux_params = split_trainable(trainable)
    metrics['grad_norm'] = optax.global_norm(grads)
    metrics['lr'] = lr_schedule(state.step)
    skipped = skipped_update(opt_state)
    if isinstance(opt_state, optax.ApplyIfFiniteState):
      metrics['skipped_updates'] = opt_state.total_notfinite
    # Non-finite: a bad loss or gradient that was applied, or parameters that went bad anyway.
    bad = (~(jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])) & ~skipped
           | ~all_finite(trainable))
    return TrainState(state.step + 1, params, opt_state,
                      note_nonfinite(state.first_nonfinite_step, bad, state.step + 1),
                      add_metric_sums(state.metric_sums, metrics, state.step, log_every),
                      aux_params), metrics

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


def make_eval_step(student, resolution, teachers, ensemble, crop_fraction=0.0, cka_pairs=()):
  """Returns `eval_step(params, teacher_params, images, sizes, labels, mask) -> sums`. Each
  model sees the central crop of the paper's code (resize_small(S) then central_crop(R), with
  `crop_fraction` = R / S) rendered at its own resolution; `crop_fraction` 0: the whole image.
  `cka_pairs`: (label, FeaturePair) pairs whose minibatch HSIC terms the sums carry
  (`hsic/LABEL`: [xy, xx, yy] of the batch's real rows), for `evaluate` to turn into CKA."""

  def eval_step(params, teacher_params, images, sizes, labels, mask):
    view = augment.Draws(augment.central_boxes(sizes, crop_fraction),
                         jnp.zeros(images.shape[:1], bool), None)
    student_view = augment.render_view(images, view, resolution, sizes)
    pairs = tuple(pair for _, pair in cka_pairs)
    s_logits, s_feats = student_outputs(student, params, student_view, pairs)
    sums = {'count': jnp.sum(mask),
            'student_correct': jnp.sum(mask * (jnp.argmax(s_logits, -1) == labels))}
    if teachers and pairs:
      outputs = outputs_on_views(teachers, teacher_params,
                                 teacher_views(teachers, images, view, sizes),
                                 teacher_taps(teachers, pairs))
      t_logits = losses.ensemble_logits([logits for logits, _ in outputs], ensemble)
      for label, p in cka_pairs:
        sums[f'hsic/{label}'] = losses.masked_linear_hsic_terms(
            s_feats[p.student_tap], outputs[p.teacher][1][p.teacher_tap], mask)
    elif teachers:
      t_logits = losses.ensemble_logits(
          teacher_logits(teachers, teacher_params, images, view, sizes), ensemble)
    if teachers:
      t_logp, s_logp = jax.nn.log_softmax(t_logits), jax.nn.log_softmax(s_logits)
      kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
      sums['teacher_correct'] = jnp.sum(mask * (jnp.argmax(t_logits, -1) == labels))
      sums['agreement'] = jnp.sum(mask * (jnp.argmax(t_logits, -1) == jnp.argmax(s_logits, -1)))
      sums['kl'] = jnp.sum(mask * kl)
    return sums

  return eval_step
