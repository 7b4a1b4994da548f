"""Where images come from. Every source returns, per split, decoded uint8 images at one fixed
square base size and int32 labels: `Split(images[N, S, S, 3], labels[N])`.

Resizing is done once, here: the short side is resized to the base size, then the centre is
cropped. Training crops are sampled later, on device, from these base-size images.

Bundled digits: scikit-learn's 1,797 8x8 grey digits, shuffled once with a fixed seed (0) and
split 1,197 train / 300 val / 300 test. The split is part of the data's definition; it never
depends on the run's seed.
"""
import os
from typing import NamedTuple

import numpy as np


class DataError(ValueError):
  """Bad data input: a missing folder, a corrupt image, an unknown split."""


class Split(NamedTuple):
  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int32 [N]


DIGITS_SPLIT_SIZES = {'train': 1197, 'val': 300, 'test': 300}
DIGITS_SPLIT_SEED = 0


def resize_to_base(image: np.ndarray, base_size: int) -> np.ndarray:
  """Short side to `base_size`, then centre crop; grey becomes RGB. uint8 in, uint8 out."""
  import tensorflow as tf  # lazy: TF import costs seconds and only data loading needs it
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  h, w = image.shape[:2]
  scale = base_size / min(h, w)
  new_h, new_w = max(base_size, round(h * scale)), max(base_size, round(w * scale))
  resized = tf.image.resize(image[..., :3], (new_h, new_w), method='bilinear', antialias=True)
  top, left = (new_h - base_size) // 2, (new_w - base_size) // 2
  crop = resized[top:top + base_size, left:left + base_size]
  return np.asarray(tf.clip_by_value(tf.round(crop), 0, 255), np.uint8)


def load_digits(split: str, base_size: int) -> Split:
  """One split of the bundled digits, upscaled to `base_size` (grey copied to 3 channels)."""
  if split not in DIGITS_SPLIT_SIZES:
    raise DataError(f'digits has splits {sorted(DIGITS_SPLIT_SIZES)}, not {split!r}')
  from sklearn.datasets import load_digits as sk_digits
  digits = sk_digits()
  order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(digits.target))
  start = 0
  for name in ('train', 'val', 'test'):
    if name == split:
      break
    start += DIGITS_SPLIT_SIZES[name]
  idx = order[start:start + DIGITS_SPLIT_SIZES[split]]
  grey = (digits.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16
  import tensorflow as tf
  images = tf.image.resize(grey[..., None], (base_size, base_size), method='bilinear')
  images = np.repeat(np.asarray(tf.round(images), np.uint8), 3, axis=-1)
  return Split(images, digits.target[idx].astype(np.int32))


def load_tfds(name: str, split: str, data_dir: str, base_size: int) -> Split:
  """A tfds dataset the user already has under `data_dir` (no download), decoded and resized."""
  import tensorflow_datasets as tfds
  try:
    # Not as_supervised: some datasets (sun397) define no supervised keys; all have these two.
    ds = tfds.load(name, split=split, data_dir=data_dir or None, download=False,
                   shuffle_files=False)
  except Exception as e:  # tfds raises several types for a missing dataset / bad split
    raise DataError(f'tfds dataset {name!r} split {split!r} in data_dir {data_dir!r}: '
                    f'{str(e).splitlines()[0]}') from e
  images, labels = [], []
  for example in tfds.as_numpy(ds):
    images.append(resize_to_base(example['image'], base_size))
    labels.append(example['label'])
  if not images:
    raise DataError(f'tfds dataset {name!r} split {split!r} is empty')
  return Split(np.stack(images), np.asarray(labels, np.int32))


def load_image_folder(root: str, split: str, base_size: int) -> Split:
  """Images under `root/{split}/{class}/*`; classes are the sorted folder names of the train split."""
  import tensorflow as tf
  train_dir, split_dir = os.path.join(root, 'train'), os.path.join(root, split)
  for d in (train_dir, split_dir):
    if not os.path.isdir(d):
      raise DataError(f'image folder {d!r} does not exist')
  classes = sorted(c for c in os.listdir(train_dir) if os.path.isdir(os.path.join(train_dir, c)))
  images, labels = [], []
  for label, cls in enumerate(classes):
    cls_dir = os.path.join(split_dir, cls)
    if not os.path.isdir(cls_dir):
      continue
    for fname in sorted(os.listdir(cls_dir)):
      path = os.path.join(cls_dir, fname)
      try:
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
      except Exception as e:
        raise DataError(f'corrupt or unreadable image {path!r}') from e
      images.append(resize_to_base(np.asarray(image), base_size))
      labels.append(label)
  if not images:
    raise DataError(f'no images under {split_dir!r}')
  return Split(np.stack(images), np.asarray(labels, np.int32))


def load_split(data_cfg, split_key: str) -> Split:
  """The split named by `data_cfg[split_key]` ('train_split', ...) of the configured source."""
  split = data_cfg[split_key]
  if data_cfg.source == 'digits':
    return load_digits(split, data_cfg.base_size)
  if data_cfg.source == 'tfds':
    return load_tfds(data_cfg.name, split, data_cfg.data_dir, data_cfg.base_size)
  if data_cfg.source == 'folder':
    return load_image_folder(data_cfg.data_dir, split, data_cfg.base_size)
  raise DataError(f'unknown data source {data_cfg.source!r} (digits, tfds, folder)')


def num_classes(data_cfg, train: Split) -> int:
  return data_cfg.num_classes or int(train.labels.max()) + 1
