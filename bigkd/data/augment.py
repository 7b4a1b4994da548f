"""On-device augmentation shared by teacher and student.

A crop box is sampled per example (inception crop) and rendered at each model's resolution with
`jax.image.scale_and_translate`, so a 384-px teacher and a 224-px student see the same content.
Flip and mixup reuse the same draws for both views. The paper's four teaching modes only differ
in which draws the teacher shares with the student (`distillation_draws`).

Boxes are (top, left, height, width) as fractions of each image's height and width (its valid
region on the canvas, see `sources.py`), so they do not depend on the resolution they are
rendered at, and a box sampled over the whole image reaches all of it.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp

TEACHING_MODES = ('fixed_teacher', 'independent_noise', 'consistent', 'function_matching')


class Draws(NamedTuple):
  """The random choices that define one augmented view of a batch."""
  boxes: jax.Array      # float32 [B, 4] (top, left, height, width) in [0, 1]
  flips: jax.Array      # bool [B]
  mix_weights: jax.Array | None  # float32 [B] weight of the example itself; None: no mixup


def sample_crop_boxes(key, batch_size, area_range, aspect_range, attempts=10, image_hw=None):
  """Inception crop: area fraction ~ U(area_range), log aspect ~ U(log aspect_range), the
  aspect ratio being the box's width / height in pixels of each image (`image_hw` [B, 2]: its
  height and width; None: square images).

  Ten attempts per example; the first that fits inside the image is used, and the whole image
  when none fits (a valid fallback box, never an empty one).
  """
  k_area, k_aspect, k_pos = jax.random.split(key, 3)
  shape = (batch_size, attempts)
  area = jax.random.uniform(k_area, shape, minval=area_range[0], maxval=area_range[1])
  log_aspect = jax.random.uniform(k_aspect, shape, minval=jnp.log(aspect_range[0]),
                                  maxval=jnp.log(aspect_range[1]))
  # A box of pixel aspect a and area fraction A in an H x W image spans sqrt(A·a·H/W) of the
  # width and sqrt(A/a·W/H) of the height.
  h_over_w = (jnp.ones((batch_size, 1)) if image_hw is None
              else (image_hw[:, 0] / image_hw[:, 1]).astype(jnp.float32)[:, None])
  width = jnp.sqrt(area * jnp.exp(log_aspect) * h_over_w)
  height = jnp.sqrt(area / jnp.exp(log_aspect) / h_over_w)
  fits = (width <= 1.0) & (height <= 1.0)
  first = jnp.argmax(fits, axis=1)[:, None]
  any_fits = jnp.any(fits, axis=1)
  height = jnp.where(any_fits, jnp.take_along_axis(height, first, 1)[:, 0], 1.0)
  width = jnp.where(any_fits, jnp.take_along_axis(width, first, 1)[:, 0], 1.0)
  pos = jax.random.uniform(k_pos, (batch_size, 2))
  return jnp.stack([pos[:, 0] * (1 - height), pos[:, 1] * (1 - width), height, width], axis=-1)


CROP_SAMPLERS = ('uniform_area', 'tf')


def crop_boxes(key, batch_size, aug, image_hw):
  """Crop boxes by `aug['crop_sampler']`: 'uniform_area' (above) or 'tf', the semantics of
  tf.image.sample_distorted_bounding_box as in the paper's code (`inception_crop.py`)."""
  if aug.get('crop_sampler', 'uniform_area') == 'tf':
    from bigkd.data.inception_crop import sample_distorted_boxes
    return sample_distorted_boxes(key, image_hw, aug['crop_area'], aug['crop_aspect'],
                                  aug.get('crop_attempts', 100))
  return sample_crop_boxes(key, batch_size, aug['crop_area'], aug['crop_aspect'],
                           image_hw=image_hw)


def central_boxes(image_hw, fraction):
  """The evaluation view of the paper's code, resize_small(S) then central_crop(R), as a box:
  a centred square whose side is `fraction` = R / S of each image's short side. `fraction` 0:
  the whole image."""
  if not fraction:
    return full_boxes(image_hw.shape[0])
  hw = image_hw.astype(jnp.float32)
  side = fraction * jnp.min(hw, axis=1, keepdims=True)
  extent = side / hw  # (height, width) fractions
  return jnp.concatenate([(1 - extent) / 2, extent], axis=1)


def full_boxes(batch_size):
  return jnp.tile(jnp.array([[0.0, 0.0, 1.0, 1.0]]), (batch_size, 1))


def render_boxes(images, boxes, size, image_hw=None):
  """Renders each box of uint8 `images` [B, H, W, C] as a `size`² float32 image in [-1, 1].
  Boxes are fractions of each image's (height, width) `image_hw` [B, 2] (its valid region at the
  top-left of the canvas; None: the whole canvas)."""
  height, width, channels = images.shape[1:]
  if image_hw is None:
    image_hw = jnp.broadcast_to(jnp.array([height, width]), (images.shape[0], 2))

  def render_one(image, box, hw):
    top, left, box_h, box_w = box[0], box[1], box[2], box[3]
    h, w = hw[0].astype(jnp.float32), hw[1].astype(jnp.float32)
    scale = jnp.stack([size / (box_h * h), size / (box_w * w)])
    translation = -jnp.stack([top * h, left * w]) * scale
    return jax.image.scale_and_translate(
        image.astype(jnp.float32), (size, size, channels), (0, 1), scale, translation,
        method='linear', antialias=True)

  return jax.vmap(render_one)(images, boxes, image_hw) / 127.5 - 1.0


def sample_mix_weights(key, batch_size, alpha, per_example):
  """Mixup weights ~ Beta(alpha, alpha): one per batch (the paper's code) or one per example."""
  weight = jax.random.beta(key, alpha, alpha, (batch_size,) if per_example else ())
  return jnp.broadcast_to(weight, (batch_size,))


def mix(x, weights):
  """Mixes each example with its neighbour in the batch (a roll by one), as big_vision does."""
  w = weights.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  return w * x + (1 - w) * jnp.roll(x, 1, axis=0)


def sample_draws(key, batch_size, aug, use_mixup: bool, image_hw=None) -> Draws:
  k_box, k_flip, k_mix = jax.random.split(key, 3)
  boxes = crop_boxes(k_box, batch_size, aug, image_hw)
  flips = (jax.random.bernoulli(k_flip, 0.5, (batch_size,)) if aug['flip']
           else jnp.zeros((batch_size,), bool))
  weights = (sample_mix_weights(k_mix, batch_size, aug['mixup_alpha'], aug['mixup_per_example'])
             if use_mixup else None)
  return Draws(boxes, flips, weights)


def render_view(images, draws: Draws, size, image_hw=None):
  """One augmented view: crop box at `size`, then flip, then mixup."""
  view = render_boxes(images, draws.boxes, size, image_hw)
  view = jnp.where(draws.flips[:, None, None, None], view[:, :, ::-1], view)
  return view if draws.mix_weights is None else mix(view, draws.mix_weights)


def mix_labels(onehot, draws: Draws):
  return onehot if draws.mix_weights is None else mix(onehot, draws.mix_weights)


def distillation_draws(key, batch_size, aug, mode, image_hw=None) -> tuple[Draws, Draws]:
  """(student draws, teacher draws) for a teaching mode.

  fixed_teacher:     teacher sees the whole, unflipped image; the student a random crop + flip.
  independent_noise: teacher and student get separate crops and flips.
  consistent:        one crop and flip, shared.
  function_matching: one crop, flip and mixup, shared.
  """
  k_student, k_teacher = jax.random.split(key)
  student = sample_draws(k_student, batch_size, aug, mode == 'function_matching', image_hw)
  if mode in ('consistent', 'function_matching'):
    return student, student
  if mode == 'independent_noise':
    return student, sample_draws(k_teacher, batch_size, aug, False, image_hw)
  if mode == 'fixed_teacher':
    return student, Draws(full_boxes(batch_size), jnp.zeros((batch_size,), bool), None)
  raise ValueError(f'unknown teaching mode {mode!r}; one of {TEACHING_MODES}')
