"""bigkd's inception-crop boxes against TF's `sample_distorted_bounding_box` itself.

The distribution checks draw the same number of boxes from bigkd and from TF (as big_vision calls
it) and compare area, aspect, height, offsets and the whole-image rate with thresholds derived
from the sample sizes. The same checks are run on a uniform-area sampler to show they catch the
error this module exists to fix.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd.data.inception_crop import sample_distorted_boxes

# big_vision's `inception_crop` arguments; `min_object_covered=0` is fixed in the TF call below.
BIG_VISION = dict(area_range=(0.05, 1.0), aspect_range=(0.75, 1.33), max_attempts=100)
N = 10_000
# Per KS statistic: the threshold is 0.035 at N boxes each. Over 140 seed pairs the correct
# sampler's largest KS was 0.030; the uniform-area sampler's area KS is 0.15 or more.
KS_ALPHA = 1e-5
MEAN_SIGMAS = 5.0
# Our area quantile at level p must lie between TF's at p -/+ this: robust to the jumps of the
# area distribution of tiny images, where quantiles themselves are discontinuous.
QUANTILE_SLACK = 0.025

sample_jit = jax.jit(sample_distorted_boxes, static_argnames='max_attempts')


def to_pixels(boxes, height, width):
  """Fraction boxes back to integer (y, x, h, w) pixels, the form TF returns."""
  return np.rint(np.asarray(boxes) * np.array([height, width, height, width])).astype(np.int64)


def bigkd_pixels(sampler, height, width, n, seed, params):
  """n boxes from `sampler` (bigkd's API) for one image size, in TF's integer pixel form."""
  hw = np.tile(np.array([[height, width]], np.int32), (n, 1))
  return to_pixels(sampler(jax.random.key(seed), hw, **params), height, width)


@functools.lru_cache(maxsize=None)
def tf_pixels(height, width, n, seed, area_range, aspect_range, max_attempts):
  """n boxes (y, x, h, w) from TF's stateless op, one seed per box.

  The stateless op shares its sampling code with the stateful one big_vision calls (their boxes
  have the same distribution), and seeds make the test deterministic.
  """
  tf = pytest.importorskip('tensorflow')

  @tf.function
  def draw(seeds):
    def one(s):
      begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
          [height, width, 3], tf.zeros([1, 0, 4]), seed=s, min_object_covered=0.0,
          area_range=area_range, aspect_ratio_range=aspect_range, max_attempts=max_attempts,
          use_image_if_no_bounding_boxes=True)
      return tf.concat([begin[:2], size[:2]], 0)
    return tf.map_fn(one, seeds, fn_output_signature=tf.int32)

  seeds = np.stack([np.full(n, seed), np.arange(n)], 1).astype(np.int32)
  return draw(tf.constant(seeds)).numpy().astype(np.int64)


def ks_statistic(a, b):
  """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
  a, b = np.sort(a), np.sort(b)
  grid = np.concatenate([a, b])
  cdf_a = np.searchsorted(a, grid, side='right') / len(a)
  cdf_b = np.searchsorted(b, grid, side='right') / len(b)
  return float(np.max(np.abs(cdf_a - cdf_b)))


def ks_threshold(n, m, alpha=KS_ALPHA):
  """Asymptotic KS critical value; conservative for our integer-valued (tied) samples."""
  return math.sqrt(-math.log(alpha / 2) / 2 * (n + m) / (n * m))


def box_stats(pixels, height, width):
  """The per-box quantities compared with TF."""
  y, x, h, w = pixels.T
  return dict(area=h * w / (height * width), aspect=w / h, height=h, top=y, left=x,
              whole=(h == height) & (w == width),
              flush=((y + h == height) & (h < height)) | ((x + w == width) & (w < width)))


def distribution_failures(ours, theirs, height, width):
  """Which distribution checks `ours` fails against `theirs` (TF), with their numbers."""
  a, b = box_stats(ours, height, width), box_stats(theirs, height, width)
  n, m = len(ours), len(theirs)
  failures = []
  for name in ('area', 'aspect', 'height', 'top', 'left'):
    ks = ks_statistic(a[name], b[name])
    if ks > ks_threshold(n, m):
      failures.append(f'KS {name} {ks:.4f} > {ks_threshold(n, m):.4f}')
  spread = math.sqrt(a['area'].var() / n + b['area'].var() / m)
  gap = abs(a['area'].mean() - b['area'].mean())
  if gap > MEAN_SIGMAS * spread:
    failures.append(f'mean area {a["area"].mean():.4f} vs TF {b["area"].mean():.4f}')
  levels = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
  quantiles = np.quantile(a['area'], levels)
  low = np.quantile(b['area'], levels - QUANTILE_SLACK)
  high = np.quantile(b['area'], levels + QUANTILE_SLACK)
  if np.any((quantiles < low) | (quantiles > high)):
    tf_quantiles = np.quantile(b['area'], levels)
    failures.append(f'area quantiles {quantiles.round(3)} vs TF {tf_quantiles.round(3)}')
  p = (a['whole'].sum() + b['whole'].sum()) / (n + m)
  whole_spread = math.sqrt(p * (1 - p) * (1 / n + 1 / m))
  if abs(a['whole'].mean() - b['whole'].mean()) > MEAN_SIGMAS * whole_spread:
    failures.append(f'whole-image rate {a["whole"].mean():.4f} vs TF {b["whole"].mean():.4f}')
  if a['flush'].any() != b['flush'].any():
    failures.append('boxes flush with the bottom/right edge: TF never does that')
  return failures


def uniform_area_boxes(key, image_hw, area_range=(0.05, 1.0), aspect_range=(3 / 4, 4 / 3),
                       max_attempts=100):
  """A deliberately wrong sampler: area ~ U(area_range), log aspect uniform, pixel-rounded sizes.

  Same API, attempts and fallback as the real one; only the size distribution differs.
  """
  hw = jnp.asarray(image_hw, jnp.float32)
  image_h, image_w = hw[:, :1], hw[:, 1:]
  k_area, k_aspect, k_pos = jax.random.split(key, 3)
  shape = (hw.shape[0], max_attempts)
  area = jax.random.uniform(k_area, shape, minval=area_range[0], maxval=area_range[1])
  aspect = jnp.exp(jax.random.uniform(k_aspect, shape, minval=jnp.log(aspect_range[0]),
                                      maxval=jnp.log(aspect_range[1])))
  h = jnp.round(jnp.sqrt(area * image_h * image_w / aspect))
  w = jnp.round(h * aspect)
  ok = (h >= 1) & (w >= 1) & (h <= image_h) & (w <= image_w)
  first = jnp.argmax(ok, 1)[:, None]
  h = jnp.where(ok.any(1), jnp.take_along_axis(h, first, 1)[:, 0], image_h[:, 0])
  w = jnp.where(ok.any(1), jnp.take_along_axis(w, first, 1)[:, 0], image_w[:, 0])
  pos = jnp.floor(jax.random.uniform(k_pos, (hw.shape[0], 2)) * (hw - jnp.stack([h, w], 1) + 1))
  return jnp.stack([pos[:, 0], pos[:, 1], h, w], 1) / jnp.concatenate([hw, hw], 1)


SIZES = [(375, 500), (500, 375), (20, 30)]


@pytest.mark.parametrize('height,width', SIZES)
def test_distribution_matches_tf(height, width):
  theirs = tf_pixels(height, width, N, 1, **BIG_VISION)
  ours = bigkd_pixels(sample_jit, height, width, N, 2, BIG_VISION)
  assert distribution_failures(ours, theirs, height, width) == []


@pytest.mark.parametrize('height,width', SIZES)
def test_the_same_checks_reject_a_uniform_area_sampler(height, width):
  theirs = tf_pixels(height, width, N, 1, **BIG_VISION)
  wrong = bigkd_pixels(jax.jit(uniform_area_boxes, static_argnames='max_attempts'), height, width,
                       N, 2, BIG_VISION)
  failures = distribution_failures(wrong, theirs, height, width)
  assert any(f.startswith('KS area') for f in failures), failures
  assert any(f.startswith('mean area') for f in failures), failures


@pytest.mark.parametrize('height,width,params', [
    (3, 3, BIG_VISION),  # TF returns the whole image ~19% of the time
    (4, 5, BIG_VISION),  # ~9%
    (17, 5, dict(area_range=(0.3, 0.9), aspect_range=(0.75, 1.33), max_attempts=3)),  # ~36%
])
def test_whole_image_rate_on_tiny_images_matches_tf(height, width, params):
  theirs = tf_pixels(height, width, N, 3, **params)
  ours = bigkd_pixels(sample_jit, height, width, N, 4, params)
  assert box_stats(theirs, height, width)['whole'].mean() > 0.05
  assert distribution_failures(ours, theirs, height, width) == []


MIXED_HW = np.array([[375, 500], [500, 375], [20, 30], [3, 3], [224, 224], [1, 1], [7, 1000]] * 64,
                    np.int32)


def test_boxes_are_whole_pixels_inside_the_image_with_area_and_aspect_in_range():
  area_range, aspect_range = (0.05, 1.0), (3 / 4, 4 / 3)
  boxes = np.asarray(sample_jit(jax.random.key(0), MIXED_HW, area_range, aspect_range))
  assert boxes.dtype == np.float32 and boxes.shape == (len(MIXED_HW), 4)
  scale = np.concatenate([MIXED_HW, MIXED_HW], 1).astype(np.float64)
  pixels = boxes * scale
  np.testing.assert_allclose(pixels, np.rint(pixels), atol=1e-3)
  y, x, h, w = np.rint(pixels).T
  image_h, image_w = MIXED_HW.T
  assert np.all((y >= 0) & (x >= 0) & (h >= 1) & (w >= 1))
  assert np.all((y + h <= image_h) & (x + w <= image_w))
  whole = (h == image_h) & (w == image_w)
  frac = h * w / (image_h * image_w)
  assert np.all(whole | ((frac >= area_range[0] - 1e-6) & (frac <= area_range[1] + 1e-6)))
  # The width is the height times the drawn aspect, rounded to a pixel.
  assert np.all(whole | ((w >= h * aspect_range[0] - 0.5) & (w <= h * aspect_range[1] + 0.5)))
  # A 7x1000 strip has no box with aspect in range and 5% of its area: always the whole image.
  strip = image_w == 1000
  assert np.all(whole[strip]) and np.mean(whole[(image_h * image_w > 1000) & ~strip]) < 0.01


def test_each_row_depends_only_on_its_own_image_size():
  # Row i of a mixed batch is the box row i would get in a batch of its size alone.
  key = jax.random.key(5)
  mixed = np.asarray(sample_jit(key, MIXED_HW))
  for size in np.unique(MIXED_HW, axis=0):
    alone = np.asarray(sample_jit(key, np.tile(size, (len(MIXED_HW), 1))))
    rows = np.all(MIXED_HW == size, axis=1)
    np.testing.assert_array_equal(mixed[rows], alone[rows])


def test_jit_is_deterministic_for_a_key_and_takes_int_or_float_sizes():
  hw = MIXED_HW  # the shape other tests compile, so only the float32 call compiles anew
  a = sample_jit(jax.random.key(7), jnp.asarray(hw, jnp.int32))
  np.testing.assert_array_equal(a, sample_jit(jax.random.key(7), jnp.asarray(hw, jnp.float32)))
  assert not np.array_equal(a, sample_jit(jax.random.key(8), hw))


def test_falls_back_to_the_whole_image_when_nothing_fits_as_tf_does():
  params = dict(area_range=(0.9, 1.0), aspect_range=(3.0, 4.0), max_attempts=100)
  boxes = sample_jit(jax.random.key(0), np.full((64, 2), 224, np.int32), **params)
  np.testing.assert_array_equal(boxes, np.tile([[0.0, 0.0, 1.0, 1.0]], (64, 1)))
  theirs = tf_pixels(224, 224, 64, 0, **params)
  np.testing.assert_array_equal(theirs, np.tile([[0, 0, 224, 224]], (64, 1)))
