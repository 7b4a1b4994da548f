"""What the teacher and the student of a distilled stage are shown under each teaching mode, as
arrays and as one uint8 grid image: below both the loop (TensorBoard's `views` image) and the
notebook layer (`bigkd.inspect`, `bigkd.plots`), so neither imports the other.
"""
import functools

import jax
import numpy as np

from bigkd.data import augment
from bigkd.forward import Teacher
from bigkd.step import augmented_batch


def step_key(seed: int, step: int) -> jax.Array:
  """The augmentation key of logged step `step`: the train step folds in its `state.step`,
  which is `step - 1` (the loop logs step s after the update that made `state.step` = s)."""
  return jax.random.fold_in(jax.random.key(seed), step - 1)


def teaching_modes(spec) -> list[str]:
  """The paper's teaching modes a stage's augmentation allows (`function_matching` needs
  mixup)."""
  return [m for m in augment.TEACHING_MODES
          if m != 'function_matching' or dict(spec.augment)['mixup_alpha'] > 0]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _mode_views(spec, modes, images, sizes, labels, key):
  """(student view, first teacher's view) per mode, compiled together."""
  resolution = spec.teachers[0].resolution
  out = []
  for mode in modes:  # augmented_batch needs of the teachers only their resolutions
    one = spec._replace(teaching_mode=mode, teachers=(Teacher(None, resolution),))
    student, teachers, _ = augmented_batch(one, images, sizes, labels, key)
    out.append((student, teachers[resolution]))
  return tuple(out)


def teaching_mode_views(spec, images, sizes, labels, step: int) -> dict:
  """{mode: (student view, teacher view)} of one batch under each of `teaching_modes(spec)`,
  with the draws logged step `step` of a distilled stage (`spec`) makes; the teacher view is
  that of its first teacher."""
  if not spec.teachers:
    raise ValueError('teaching modes need a distilled stage (one with teachers)')
  modes = tuple(teaching_modes(spec))
  out = jax.device_get(_mode_views(spec, modes, images, sizes, labels, step_key(spec.seed, step)))
  return dict(zip(modes, out))


def _cell(view, size: int) -> np.ndarray:
  """A view in [-1, 1] as uint8, scaled to `size`² by nearest neighbour (pixels stay sharp)."""
  pixels = np.clip(np.round((np.asarray(view) + 1.0) * 127.5), 0, 255).astype(np.uint8)
  rows = np.arange(size) * pixels.shape[0] // size
  cols = np.arange(size) * pixels.shape[1] // size
  return pixels[rows][:, cols]


GAP, PAIR_GAP = 2, 8  # white pixels between a teacher and a student view / between examples


def _join(blocks, gap: int, axis: int) -> np.ndarray:
  """uint8 `blocks` side by side (axis 1) or stacked (axis 0), `gap` white pixels apart."""
  shape = list(blocks[0].shape)
  shape[axis] = gap
  white = np.full(shape, 255, np.uint8)
  return np.concatenate([part for block in blocks for part in (white, block)][1:], axis)


def grid_array(mode_views: dict, examples: int = 4, cell: int = 64) -> np.ndarray:
  """uint8 [H, W, 3] on white: one row per teaching mode ({mode: (student, teacher)}), for
  each example its teacher view then its student view, each scaled to `cell`² pixels."""
  rows = [_join([_join([_cell(teacher[e], cell), _cell(student[e], cell)], GAP, 1)
                 for e in range(min(examples, len(student)))], PAIR_GAP, 1)
          for student, teacher in mode_views.values()]
  return _join(rows, PAIR_GAP, 0)


def views_grid_image(spec, images, sizes, labels, step: int, examples: int = 4,
                     cell: int = 64) -> np.ndarray:
  """The views grid as uint8 [H, W, 3] (for TensorBoard's image summaries): for each teaching
  mode (`inspect.teaching_modes`) a row of (teacher view, student view) pairs of the first
  `examples` images of a batch, with the draws of logged step `step` of the distilled stage
  whose `StepSpec` is `spec`."""
  n = min(examples, len(images))
  return grid_array(teaching_mode_views(spec, images[:n], sizes[:n], labels[:n], step), n, cell)
