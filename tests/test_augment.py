import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd.data import augment

AUG = dict(crop_area=(0.3, 1.0), crop_aspect=(3 / 4, 4 / 3), flip=True, mixup_alpha=1.0,
           mixup_per_example=False)


def random_images(n=16, size=32, seed=0):
  # Smooth images, so that rendering one box at two resolutions gives comparable pictures.
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 255, (n, 4, 4, 3))
  return jnp.asarray(jax.image.resize(coarse, (n, size, size, 3), 'linear'), jnp.uint8)


def test_crop_boxes_lie_inside_the_image_with_area_in_range():
  boxes = np.asarray(augment.sample_crop_boxes(jax.random.key(0), 4096, (0.08, 1.0), (3 / 4, 4 / 3)))
  top, left, h, w = boxes.T
  assert np.all(top >= 0) and np.all(left >= 0)
  assert np.all(top + h <= 1 + 1e-6) and np.all(left + w <= 1 + 1e-6)
  area = h * w
  assert area.min() >= 0.08 - 1e-6 and area.max() <= 1 + 1e-6
  assert np.all((w / h >= 3 / 4 - 1e-5) & (w / h <= 4 / 3 + 1e-5))
  # Areas spread over the range, not stuck at the fallback.
  assert np.mean(area < 0.5) > 0.3


def test_crop_box_falls_back_to_the_whole_image_when_nothing_fits():
  # Area 0.9 with aspect 4..5 needs a width > 1: no attempt fits.
  boxes = np.asarray(augment.sample_crop_boxes(jax.random.key(1), 64, (0.9, 1.0), (4.0, 5.0)))
  np.testing.assert_allclose(boxes, np.tile([0, 0, 1, 1], (64, 1)))


def test_full_box_renders_the_same_as_resize():
  images = random_images(4, 32)
  rendered = augment.render_boxes(images, augment.full_boxes(4), 24)
  expected = jax.image.resize(images.astype(jnp.float32), (4, 24, 24, 3), 'linear') / 127.5 - 1
  np.testing.assert_allclose(rendered, expected, atol=1e-4)


def test_box_renders_the_cropped_region():
  image = jnp.zeros((1, 32, 32, 3), jnp.uint8).at[:, 8:16, 16:32].set(255)
  box = jnp.array([[8 / 32, 16 / 32, 8 / 32, 16 / 32]])  # exactly the white rectangle
  view = augment.render_boxes(image, box, 16)
  assert float(view[:, 1:-1, 1:-1].min()) > 0.99  # white (border pixels blend with outside)


def _downsample(x, size):
  return jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), 'linear')


@pytest.mark.parametrize('mode', augment.TEACHING_MODES)
def test_teacher_and_student_views_share_what_the_mode_shares(mode):
  images = random_images(16, 32)
  student_draws, teacher_draws = augment.distillation_draws(jax.random.key(3), 16, AUG, mode)
  student = augment.render_view(images, student_draws, 16)
  teacher = augment.render_view(images, teacher_draws, 32)  # the teacher at twice the resolution
  gap = float(jnp.mean(jnp.abs(_downsample(teacher, 16) - student)))
  if mode in ('consistent', 'function_matching'):
    assert gap < 0.03, gap  # same content, only resampling differences
    np.testing.assert_array_equal(student_draws.boxes, teacher_draws.boxes)
  else:
    assert gap > 0.1, gap
  if mode == 'function_matching':
    assert student_draws.mix_weights is not None
    assert teacher_draws.mix_weights is student_draws.mix_weights
  else:
    assert student_draws.mix_weights is None and teacher_draws.mix_weights is None
  if mode == 'fixed_teacher':
    np.testing.assert_allclose(teacher_draws.boxes, augment.full_boxes(16))
    assert not np.any(teacher_draws.flips)


def test_flip_mirrors_the_view():
  images = random_images(8, 16)
  draws = augment.Draws(augment.full_boxes(8), jnp.arange(8) % 2 == 0, None)
  view = augment.render_view(images, draws, 16)
  plain = augment.render_view(images, draws._replace(flips=jnp.zeros(8, bool)), 16)
  np.testing.assert_allclose(view[0], plain[0][:, ::-1], atol=1e-6)
  np.testing.assert_allclose(view[1], plain[1], atol=1e-6)


def test_mixup_one_weight_per_batch_or_per_example():
  per_batch = augment.sample_mix_weights(jax.random.key(0), 64, 1.0, per_example=False)
  per_example = augment.sample_mix_weights(jax.random.key(0), 64, 1.0, per_example=True)
  assert np.unique(np.asarray(per_batch)).size == 1
  assert np.unique(np.asarray(per_example)).size == 64
  assert 0 <= float(per_example.min()) and float(per_example.max()) <= 1


def test_mixup_mixes_images_and_labels_with_the_same_weights():
  x = jnp.arange(4.0)[:, None] * jnp.ones((4, 3))
  weights = jnp.array([1.0, 0.25, 0.5, 0.0])
  mixed = augment.mix(x, weights)
  # Example i is mixed with example i-1 (a roll by one).
  np.testing.assert_allclose(mixed[:, 0], [0.0, 0.25 * 1 + 0.75 * 0, 0.5 * 2 + 0.5 * 1, 2.0])
  onehot = jax.nn.one_hot(jnp.arange(4), 4)
  draws = augment.Draws(augment.full_boxes(4), jnp.zeros(4, bool), weights)
  labels = augment.mix_labels(onehot, draws)
  np.testing.assert_allclose(labels.sum(-1), 1.0)
  np.testing.assert_allclose(labels[1], [0.75, 0.25, 0, 0])
