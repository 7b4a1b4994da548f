"""Where images come from, and the one form every batch takes.

Every image is placed on a square uint8 canvas of side `data.base_size`: resized (aspect kept)
so that its long side is the canvas side, at the top-left corner, the rest filled by repeating
its edge pixels; its valid (height, width) travels with it. Crop boxes are then sampled over the
whole image with its own aspect ratio (`augment.py`), never over a pre-cut centre square, and
each model renders the same box at its own resolution. A batch is `(images [B, S, S, 3] uint8,
sizes [B, 2] int32, labels [B] int32)`; an image without a label has label -1 (`NO_LABEL`).

Two kinds of split give such batches through one method, `rows(indices)`:
  `Split`          decoded once into host memory (small data: it then lives on the devices);
  `StreamedSplit`  a random-access source (an image folder, ArrayRecord files written by
                   `python -m bigkd.prepare`, or a tfds dataset prepared as ArrayRecord) whose
                   rows are read and decoded when asked for: memory does not grow with the data.

A stage's `train_data` (`load_train_data`) may take its training images from other sources,
possibly unlabeled, mixed by weight: one split over all of them (`MixedSplit`, or their images
concatenated in memory), example i of source k at index offset_k + i.

Bundled digits: scikit-learn's 1,797 8x8 grey digits, shuffled once with a fixed seed (0) and
split 1,197 train / 300 val / 300 test. The split is part of the data's definition; it never
depends on the run's seed. `classes` keeps only some digits of a split (labels unchanged): the
digits 0-4 as a task, 5-9 as images from outside it.
"""
import functools
import threading
from typing import NamedTuple

import numpy as np

from bigkd.config import class_list, is_labelled
from bigkd.data import folders
from bigkd.data.errors import DataError  # noqa: F401  (re-exported: bigkd.data.sources.DataError)
from bigkd.data.records import RecordSplit
from bigkd.tf_quiet import import_tensorflow, import_tfds


NO_LABEL = -1  # the label of an image that has none (its one-hot target is all zeros)


class Split(NamedTuple):
  """A split held in host memory as canvases."""
  images: np.ndarray  # uint8 [N, S, S, 3]
  sizes: np.ndarray   # int32 [N, 2]: each image's (height, width) on its canvas
  labels: np.ndarray  # int32 [N]

  def __len__(self):
    return len(self.labels)

  def rows(self, indices):
    return self.images[indices], self.sizes[indices], self.labels[indices]


class CanvasFunctions(NamedTuple):
  """TF graphs that put images on canvases of one side (`_canvas_functions`)."""
  fit: object                   # decoded uint8 [H, W, 3] -> (canvas, (h, w))
  decode_and_fit: object        # encoded bytes -> (canvas, (h, w))
  decode_and_fit_batch: object  # encoded bytes [N] -> (canvases [N, S, S, 3], sizes [N, 2])


@functools.lru_cache(maxsize=None)
def _canvas_functions(size: int) -> CanvasFunctions:
  """The `CanvasFunctions` for canvases of side `size`, compiled once as TF graphs (no eager
  op-by-op dispatch). The batch function maps a vector of encoded images in one call: called once
  per image, the call and its conversions cost as much as the resize (benchmarks/README.md,
  "Input pipeline")."""
  tf = import_tensorflow()

  def fit(image):
    h, w = tf.shape(image)[0], tf.shape(image)[1]
    scale = size / tf.cast(tf.maximum(h, w), tf.float32)
    new_h = tf.clip_by_value(tf.cast(tf.round(tf.cast(h, tf.float32) * scale), tf.int32), 1, size)
    new_w = tf.clip_by_value(tf.cast(tf.round(tf.cast(w, tf.float32) * scale), tf.int32), 1, size)
    def resize(antialias):  # (weights >= 0 summing to 1: the values stay in [0, 255])
      return lambda: tf.cast(tf.round(tf.image.resize(
          image, (new_h, new_w), method='bilinear', antialias=antialias)), tf.uint8)

    # Bilinear sampling already averages 2 x 2 input pixels per output pixel, which is all the
    # filtering a downscale by up to 2 needs; beyond that the (3x slower) antialiased kernel.
    resized = tf.case([(tf.logical_and(tf.equal(new_h, h), tf.equal(new_w, w)), lambda: image),
                       (scale < 0.5, resize(True))], default=resize(False))
    # Edge padding: rows and columns past the image repeat its last row and column (one
    # concatenation per axis: cheaper than gathering the whole canvas by clamped indices).
    rows = tf.concat([resized, tf.repeat(resized[-1:], size - new_h, axis=0)], 0)
    return (tf.concat([rows, tf.repeat(rows[:, -1:], size - new_w, axis=1)], 1),
            tf.stack([new_h, new_w]))

  def decode_and_fit(data):
    return fit(tf.io.decode_image(data, channels=3, expand_animations=False))

  fitted = (tf.TensorSpec([size, size, 3], tf.uint8), tf.TensorSpec([2], tf.int32))
  return CanvasFunctions(
      tf.function(fit, input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)]),
      tf.function(decode_and_fit, input_signature=[tf.TensorSpec([], tf.string)]),
      tf.function(lambda data: tf.map_fn(decode_and_fit, data, fn_output_signature=fitted,
                                         parallel_iterations=4),
                  input_signature=[tf.TensorSpec([None], tf.string)]))


def fit_to_canvas(image, size: int):
  """(canvas uint8 [size, size, 3], (h, w)): `image` resized (bilinear; antialiased when it
  shrinks by more than 2) so its long side is `size`, aspect kept, at the top-left; the padding
  repeats the edge pixels so that resampling at the image's border never blends in a foreign
  colour."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  canvas, hw = _canvas_functions(size).fit(np.ascontiguousarray(image[..., :3], np.uint8))
  return canvas.numpy(), tuple(int(x) for x in hw.numpy())


def decode_to_canvas(data, size: int, what=''):
  """`fit_to_canvas` of encoded bytes (JPEG, PNG, BMP, GIF, WebP) or of a decoded array."""
  if not isinstance(data, (bytes, np.bytes_)):
    return fit_to_canvas(data, size)
  tf = import_tensorflow()
  try:
    canvas, hw = _canvas_functions(size).decode_and_fit(data)
  except tf.errors.OpError:  # any decoding failure is a corrupt image
    raise DataError(f'corrupt or unreadable image {what!r}') from None
  return canvas.numpy(), tuple(int(x) for x in hw.numpy())


def stack_canvases(fitted):
  """(canvases [N, S, S, 3], sizes [N, 2]) of (canvas, (h, w)) pairs."""
  return (np.stack([c for c, _ in fitted]).astype(np.uint8, copy=False),
          np.asarray([s for _, s in fitted], np.int32).reshape(-1, 2))


def decode_batch_to_canvases(items, size: int):
  """`stack_canvases` of `decode_to_canvas(data, size, what)` for each (data, what) of `items`,
  the same canvases: encoded images in one TF call for the whole batch; a batch with decoded
  arrays, or with an unreadable image, one image at a time (which names the bad one)."""
  if items and all(isinstance(data, (bytes, np.bytes_)) for data, _ in items):
    tf = import_tensorflow()
    try:
      batch = np.asarray([data for data, _ in items], dtype=object)
      canvases, sizes = _canvas_functions(size).decode_and_fit_batch(batch)
      return canvases.numpy(), sizes.numpy()
    except tf.errors.OpError:  # an unreadable image: found and named below
      pass
  return stack_canvases([decode_to_canvas(data, size, what) for data, what in items])


DIGITS_SPLIT_SIZES = {'train': 1197, 'val': 300, 'test': 300}
DIGITS_SPLIT_SEED = 0


def load_digits(split: str, base_size: int, classes=()) -> Split:
  """One split of the bundled digits, upscaled to `base_size` (grey copied to 3 channels);
  `classes`: only the digits of those classes (labels unchanged), () all."""
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
  if classes:
    idx = idx[np.isin(digits.target[idx], classes)]
    if not len(idx):
      raise DataError(f'digits split {split!r} has no digit of classes {list(classes)}')
  grey = (digits.images[idx] * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16
  tf = import_tensorflow()
  images = tf.image.resize(grey[..., None], (base_size, base_size), method='bilinear')
  images = np.repeat(np.asarray(tf.round(images), np.uint8), 3, axis=-1)
  sizes = np.full((len(idx), 2), base_size, np.int32)
  return Split(images, sizes, digits.target[idx].astype(np.int32))


# --- Random-access sources: (encoded image or array, label) per index. ---------------------

class FolderSource:
  """Images under `root/{split}/{class}/*`, chosen by `folders.scan_split` (the rule that
  bigkd.prepare follows too); `skipped` counts the files that are no image."""

  def __init__(self, root: str, split: str):
    self.class_names = folders.class_names(root)
    found = folders.scan_split(root, split, self.class_names)
    self.paths, self.skipped = found.paths, found.skipped
    self.labels = np.asarray(found.labels, np.int32)

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i], 'rb') as f:
      return f.read(), int(self.labels[i]), self.paths[i]


class ImageFilesSource:
  """The images directly in one folder (`folders.scan_images`), without labels."""

  def __init__(self, root: str):
    found = folders.scan_images(root)
    self.paths, self.skipped, self.class_names = found.paths, found.skipped, []

  def __len__(self):
    return len(self.paths)

  def __getitem__(self, i):
    with open(self.paths[i], 'rb') as f:
      return f.read(), NO_LABEL, self.paths[i]


class UnlabeledSource:
  """A random-access source whose labels are not the task's: each example's label is NO_LABEL."""

  def __init__(self, source):
    self.source, self.class_names = source, []
    self.labels = np.full(len(source), NO_LABEL, np.int32)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    data, _, what = self.source[i]
    return data, NO_LABEL, what


def median_long_side(root: str, sample: int = 200) -> int:
  """The median long side, in pixels, of up to `sample` evenly spaced images of the train split
  of an image folder (from the file headers: nothing is decoded)."""
  from PIL import Image
  paths = FolderSource(root, 'train').paths
  sides = []
  for path in paths[::max(1, len(paths) // sample)]:
    try:
      with Image.open(path) as image:
        sides.append(max(image.size))
    except OSError:
      raise DataError(f'corrupt or unreadable image {path!r}') from None
  return int(np.median(sides))


class RecordSource:
  """ArrayRecord files written by `python -m bigkd.prepare` (`root/{split}/*.array_record`)."""

  def __init__(self, root: str, split: str):
    try:
      self.records = RecordSplit(root, split)
    except (OSError, ValueError, KeyError) as e:
      raise DataError(f'prepared data {root!r} split {split!r}: {e}') from None
    self.class_names = list(self.records.class_names)

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    image, label, _, _ = self.records[i]
    return image, label, f'record {i}'


class TfdsSource:
  """A tfds dataset prepared in ArrayRecord format (`tfds.data_source`: random access)."""

  def __init__(self, name: str, split: str, data_dir: str):
    tfds = import_tfds()
    try:
      self.source = tfds.data_source(name, split=split, data_dir=data_dir or None,
                                     download=False)
    except Exception as e:  # noqa: BLE001  (tfds raises several types)
      raise DataError(f'tfds dataset {name!r} split {split!r} in data_dir {data_dir!r} has no '
                      f'random-access (ArrayRecord) files ({str(e).splitlines()[0]}); convert '
                      'it once with python -m bigkd.prepare --tfds') from None
    features = self.source.dataset_info.features
    self.class_names = (list(getattr(features['label'], 'names', []))
                        if 'label' in features else [])

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    example = self.source[i]
    return example['image'], int(example.get('label', NO_LABEL)), f'example {i}'


class StreamedSplit:
  """A split read on demand: `rows(indices)` reads and decodes just those examples (each
  process asks only for its own rows) and counts them in `decoded`."""

  def __init__(self, source, canvas_size: int):
    self.source, self.canvas_size = source, canvas_size
    self.decoded = 0
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.source)

  def rows(self, indices):
    examples = [self.source[int(i)] for i in indices]
    images, sizes = decode_batch_to_canvases([(data, what) for data, _, what in examples],
                                             self.canvas_size)
    with self._lock:
      self.decoded += len(examples)
    return images, sizes, np.asarray([label for _, label, _ in examples], np.int32)


def load_tfds(name: str, split: str, data_dir: str, base_size: int) -> Split:
  """A tfds dataset the user already has under `data_dir` (no download), decoded into memory."""
  tfds = import_tfds()
  try:
    # Not as_supervised: some datasets (sun397) define no supervised keys; all have these two.
    ds = tfds.load(name, split=split, data_dir=data_dir or None, download=False,
                   shuffle_files=False)
  except Exception as e:  # tfds raises several types for a missing dataset / bad split
    raise DataError(f'tfds dataset {name!r} split {split!r} in data_dir {data_dir!r}: '
                    f'{str(e).splitlines()[0]}') from e
  images, labels = [], []
  for example in tfds.as_numpy(ds):
    images.append(example['image'])
    labels.append(example.get('label', NO_LABEL))  # (an unlabeled dataset has none)
  if not images:
    raise DataError(f'tfds dataset {name!r} split {split!r} is empty')
  canvases, sizes = stack_canvases([fit_to_canvas(image, base_size) for image in images])
  return Split(canvases, sizes, np.asarray(labels, np.int32))


def in_memory(source, base_size: int) -> Split:
  """Every example of a random-access source, decoded into host memory."""
  return Split(*StreamedSplit(source, base_size).rows(range(len(source))))


def open_source(data_cfg, split: str):
  """The random-access source of one split (folder, prepared ArrayRecord files, or tfds)."""
  if data_cfg.source == 'folder':
    return FolderSource(data_cfg.data_dir, split)
  if data_cfg.source == 'records':
    return RecordSource(data_cfg.data_dir, split)
  if data_cfg.source == 'tfds':
    return TfdsSource(data_cfg.name, split, data_cfg.data_dir)
  raise DataError(f'data.source={data_cfg.source!r} cannot be streamed (folder, records, tfds)')


def load_split(data_cfg, split_key: str):
  """The split named by `data_cfg[split_key]` ('train_split', ...) of the configured source:
  a `Split` in memory when `data.device_resident`, else a `StreamedSplit`."""
  split = data_cfg[split_key]
  if data_cfg.source == 'digits':
    return load_digits(split, data_cfg.base_size, class_list(data_cfg.get('classes', '')))
  if data_cfg.device_resident and data_cfg.source == 'tfds':
    return load_tfds(data_cfg.name, split, data_cfg.data_dir, data_cfg.base_size)
  source = open_source(data_cfg, split)
  if getattr(source, 'skipped', 0):
    print(f'bigkd: {split_key} {split!r}: skipped {source.skipped} files that are not images '
          f'({", ".join(folders.IMAGE_EXTENSIONS)})', flush=True)
  if data_cfg.device_resident:
    return in_memory(source, data_cfg.base_size)
  return StreamedSplit(source, data_cfg.base_size)


def class_names(data_cfg, train) -> list[str]:
  """The names of the classes, by label ('0'..'9' for the digits, the folder names of an image
  folder, the names a prepared or tfds dataset records); [] when the source names none."""
  if data_cfg.source == 'digits':
    return [str(d) for d in range(known_classes(train))]
  if data_cfg.source == 'tfds' and isinstance(train, Split):
    tfds = import_tfds()
    try:
      info = tfds.builder(data_cfg.name, data_dir=data_cfg.data_dir or None).info
      return list(getattr(info.features['label'], 'names', []))
    except Exception:  # noqa: BLE001  (names are a convenience; the data loaded already)
      return []
  source = train.source if isinstance(train, StreamedSplit) else open_source(
      data_cfg, data_cfg.train_split)
  return list(source.class_names)


def known_classes(train) -> int:
  """The class count the train split shows: its largest label + 1 when the labels are at hand
  (in memory, an image folder), else the streamed source's class names (0: unknown)."""
  labels = train.labels if isinstance(train, Split) else getattr(train.source, 'labels', None)
  if labels is not None and len(labels):
    return int(np.max(labels)) + 1
  return len(getattr(train.source, 'class_names', None) or [])


def num_classes(data_cfg, train) -> int:
  """`data.num_classes`, else the source's class count, else the largest label + 1. A
  `data.num_classes` below the labels is an error: those labels would index past the head."""
  known = known_classes(train)
  if data_cfg.num_classes:
    if data_cfg.num_classes < known:
      raise DataError(f'data.num_classes={data_cfg.num_classes} but the train split has '
                      f'{known} classes (labels up to {known - 1})')
    return data_cfg.num_classes
  if not known:
    raise DataError('the streamed source does not name its classes: set data.num_classes')
  return known


# --- A stage's train data: other sources than the train split, possibly mixed. -------------

class MixedSplit:
  """Several splits (`Split` or `StreamedSplit`) as one: index offsets[k] + i is example i of
  part k. `rows` reads each part's rows and returns them in the order asked."""

  def __init__(self, parts):
    self.parts = list(parts)
    self.offsets = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self):
    return int(self.offsets[-1])

  @property
  def decoded(self):
    """Images read and decoded so far by the streamed parts (None: none is streamed)."""
    counts = [p.decoded for p in self.parts if hasattr(p, 'decoded')]
    return sum(counts) if counts else None

  def rows(self, indices):
    indices = np.asarray(indices)
    part = np.searchsorted(self.offsets, indices, side='right') - 1
    images, sizes, labels = [None] * 3
    for k in np.unique(part):
      where = np.nonzero(part == k)[0]
      got = self.parts[k].rows(indices[where] - self.offsets[k])
      if images is None:
        images, sizes, labels = (np.zeros((len(indices),) + x.shape[1:], x.dtype) for x in got)
      images[where], sizes[where], labels[where] = got
    return images, sizes, labels


class TrainData(NamedTuple):
  """A stage's training examples: one split over all its sources (in their order) and the
  number of examples of each."""
  split: object
  sizes: tuple


def without_labels(split):
  """`split` with every label NO_LABEL (its labels are not the task's classes)."""
  if isinstance(split, Split):
    return Split(split.images, split.sizes, np.full(len(split), NO_LABEL, np.int32))
  return StreamedSplit(UnlabeledSource(split.source), split.canvas_size)


def load_source(data_cfg, spec: dict, task_train, task_classes: list, num_classes: int,
                where: str):
  """One train_data source (`config.TRAIN_DATA_FIELDS`) as a split of canvases of the data
  block's size, in memory or streamed as `data.device_resident` says; unlabeled
  (`without_labels`) unless `is_labelled`, and then its classes must be the task's
  (`task_classes`, by name where both are named: label i means the same class)."""
  if spec['source'] == 'task':
    return task_train
  if spec['source'] == 'images':
    source = ImageFilesSource(spec['data_dir'])
    if source.skipped:
      print(f'bigkd: {where}: skipped {source.skipped} files that are not images', flush=True)
    split = (in_memory(source, data_cfg.base_size) if data_cfg.device_resident
             else StreamedSplit(source, data_cfg.base_size))
  else:
    cfg = data_cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.update(source=spec['source'], data_dir=spec['data_dir'], name=spec['name'],
                 train_split=spec['split'], classes=spec['classes'])
    split = load_split(cfg, 'train_split')
  if not is_labelled(spec):
    return without_labels(split)
  known = known_classes(split)
  if known > num_classes:
    raise DataError(f'{where}: labels up to {known - 1}, but the task has {num_classes} '
                    'classes (labels=True says they are the task\'s)')
  names = class_names(cfg, split)
  if names and task_classes and names != task_classes[:len(names)]:
    raise DataError(f'{where}: its classes ({", ".join(names[:5])}, ...) are not the task\'s '
                    f'({", ".join(task_classes[:5])}, ...); labels=True needs the same classes')
  return split


def load_train_data(data_cfg, sources: dict, task_train, task_classes: list,
                    num_classes: int, where: str) -> TrainData:
  """A stage's `train_data` ({name: source fields}, in that order: a ConfigDict's, by name) as
  one split: the sources' images concatenated in memory when all of them are, else a
  `MixedSplit`."""
  parts = [load_source(data_cfg, spec, task_train, task_classes, num_classes, f'{where}.{name}')
           for name, spec in sources.items()]
  sizes = tuple(len(p) for p in parts)
  if len(parts) == 1:
    return TrainData(parts[0], sizes)
  if all(isinstance(p, Split) for p in parts):
    return TrainData(Split(*(np.concatenate(x) for x in zip(*parts))), sizes)
  return TrainData(MixedSplit(parts), sizes)
