"""Inception-crop boxes with the distribution of `tf.image.sample_distorted_bounding_box`.

The paper's released code (big_vision `inception_crop` / `decode_jpeg_and_inception_crop`) asks TF
for a box with an empty box set, `use_image_if_no_bounding_boxes=True` (the whole image is the
object), `min_object_covered=0`, `area_range=(0.05, 1.0)`, aspect ratio (0.75, 1.33) and TF's
default of 100 attempts. TF does not draw the area uniformly: each attempt draws an aspect ratio
uniformly, turns the area range into a range of integer box heights, and draws the height
uniformly among those integers. Small boxes are therefore much more likely than under a
uniform-area sampler: the mean area is 0.34 of a 375x500 image and 0.38 of a square one, where
area ~ U(0.05, 1) with rejection of boxes that do not fit gives 0.46. This module
reproduces that per-pixel behaviour in JAX, vectorised over examples and attempts, so crops can be
drawn on device for batches of differently sized images.

Boxes are (top, left, height, width) as fractions of each example's height/width, the convention
of `bigkd.data.augment.sample_crop_boxes`.

The default aspect range is the repo's (3/4, 4/3); big_vision passes (0.75, 1.33), which differs
only in the fourth digit of the upper end.
"""
import jax
import jax.numpy as jnp


def _round(x):
  """Rounds half to even, as C's `lrintf` does in TF's kernel, so integer sizes match."""
  return jnp.round(x)


def _max_height_for_width(width, aspect):
  """The tallest integer height whose rounded width (height * aspect) still fits in `width`.

  TF clips the height range with this so that the widest box of an attempt fits the image;
  the floor gives the answer up to float error, which the two corrections remove.
  """
  height = jnp.floor((width + 0.5) / aspect)
  height = jnp.where(_round((height + 1) * aspect) <= width, height + 1, height)
  return jnp.where(_round(height * aspect) > width, height - 1, height)


def _height_range(image_h, image_w, aspect, min_area, max_area):
  """Inclusive integer range of heights an attempt draws from.

  The ends come from the area range at this aspect ratio (rounded), the top end clipped so the
  box fits the image. When the range is empty the single top end is used, as in TF.
  """
  low = _round(jnp.sqrt(min_area / aspect))
  high = _round(jnp.sqrt(max_area / aspect))
  high = jnp.minimum(high, _max_height_for_width(image_w, aspect))
  high = jnp.minimum(high, image_h)
  return jnp.minimum(low, high), high


def _nudge_into_area_range(height, aspect, min_area, max_area):
  """One pixel taller if the area is just too small, then one shorter if it is too large.

  Rounding the width can push a box drawn from the height range just outside the area range;
  TF gives it one chance each way (in this order) before rejecting the attempt.
  """
  width = _round(height * aspect)
  height = jnp.where(width * height < min_area, height + 1, height)
  width = _round(height * aspect)
  height = jnp.where(width * height > max_area, height - 1, height)
  return height, _round(height * aspect)


def _attempt_sizes(u_height, aspect, image_h, image_w, area_range):
  """Integer (height, width) of each attempt and whether the attempt is accepted.

  All arguments broadcast together; `u_height` is a U[0, 1) draw that picks the height
  uniformly among the integers of the attempt's height range.
  """
  min_area = area_range[0] * image_w * image_h
  max_area = area_range[1] * image_w * image_h
  low, high = _height_range(image_h, image_w, aspect, min_area, max_area)
  height = jnp.minimum(low + jnp.floor(u_height * (high - low + 1)), high)
  height, width = _nudge_into_area_range(height, aspect, min_area, max_area)
  pixels = width * height
  ok = ((pixels >= min_area) & (pixels <= max_area) & (height >= 1) & (width >= 1)
        & (height <= image_h) & (width <= image_w))
  return height, width, ok


def _first_accepted(height, width, ok, image_h, image_w):
  """The first accepted attempt of each row, or the whole image when none was accepted."""
  first = jnp.argmax(ok, axis=1)[:, None]
  found = jnp.any(ok, axis=1)
  pick = lambda x: jnp.take_along_axis(x, first, axis=1)[:, 0]
  return (jnp.where(found, pick(height), image_h[:, 0]),
          jnp.where(found, pick(width), image_w[:, 0]))


def _offset(u, image_side, box_side):
  """Integer offset, uniform over 0 .. image_side - box_side - 1 (0 when the box fills the side).

  TF never places a smaller box flush with the bottom/right edge: it draws the offset below
  the number of spare pixels rather than up to it. We keep that quirk to match its histograms.
  """
  spare = image_side - box_side
  return jnp.where(spare > 0, jnp.minimum(jnp.floor(u * spare), spare - 1), 0.0)


def sample_distorted_boxes(key, image_hw, area_range=(0.05, 1.0), aspect_range=(3 / 4, 4 / 3),
                           max_attempts=100):
  """Samples one inception-crop box per example, like TF's `sample_distorted_bounding_box`.

  Args:
    key: a JAX PRNG key; the same key gives the same boxes.
    image_hw: int or float array [B, 2] of each example's (height, width) in pixels, positive
      whole numbers; examples may differ in size.
    area_range: (min, max) box area as a fraction of the image area.
    aspect_range: (min, max) width / height of the box, drawn uniformly per attempt.
    max_attempts: attempts per example (static under jit); the whole image is used when all
      fail.

  Returns:
    float32 [B, 4] boxes (top, left, height, width) as fractions of each image's height and
    width. The box has integer pixel coordinates in its image.
  """
  hw = jnp.asarray(image_hw, jnp.float32)
  image_h, image_w = hw[:, 0:1], hw[:, 1:2]
  shape = (hw.shape[0], max_attempts)
  k_aspect, k_height, k_offset = jax.random.split(key, 3)
  aspect = jax.random.uniform(k_aspect, shape, jnp.float32, aspect_range[0], aspect_range[1])
  u_height = jax.random.uniform(k_height, shape, jnp.float32)
  height, width, ok = _attempt_sizes(u_height, aspect, image_h, image_w, area_range)
  height, width = _first_accepted(height, width, ok, image_h, image_w)
  u_offset = jax.random.uniform(k_offset, (hw.shape[0], 2), jnp.float32)
  top = _offset(u_offset[:, 0], image_h[:, 0], height)
  left = _offset(u_offset[:, 1], image_w[:, 0], width)
  return jnp.stack([top / image_h[:, 0], left / image_w[:, 0], height / image_h[:, 0],
                    width / image_w[:, 0]], axis=-1)
