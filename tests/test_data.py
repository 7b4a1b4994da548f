import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from ml_collections import ConfigDict

from bigkd.data import sources


def test_digits_split_is_fixed_disjoint_and_complete():
  splits = {name: sources.load_digits(name, 16) for name in ('train', 'val', 'test')}
  assert {k: len(v.labels) for k, v in splits.items()} == {'train': 1197, 'val': 300, 'test': 300}
  for split in splits.values():
    assert split.images.shape[1:] == (16, 16, 3) and split.images.dtype == np.uint8
    assert split.images.max() > 200  # strokes reach white after the 0..16 -> 0..255 rescale
    assert np.all(split.sizes == 16)  # square: the image fills its canvas
  fingerprints = [{img.tobytes() for img in s.images} for s in splits.values()]
  assert len(fingerprints[0] & fingerprints[2]) < 5  # (a few digits are pixel-identical)
  again = sources.load_digits('test', 16)
  np.testing.assert_array_equal(again.labels, splits['test'].labels)
  np.testing.assert_array_equal(again.images, splits['test'].images)


def test_canvas_keeps_the_whole_image_and_its_aspect():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, :10] = 255    # a white left edge and a grey right edge: both must survive
  image[:, -10:] = 128
  canvas, (h, w) = sources.fit_to_canvas(image, 20)
  assert canvas.shape == (20, 20, 3) and (h, w) == (10, 20)  # long side to 20, aspect kept
  assert canvas[:h, 0].min() >= 250 and abs(int(canvas[:h, -1].mean()) - 128) <= 2
  np.testing.assert_array_equal(canvas[h:], np.repeat(canvas[h - 1:h], 20 - h, axis=0))


def test_tfds_source_reads_a_dataset_offline(tmp_path):
  cfg = ConfigDict(dict(source='tfds', name='cifar10', data_dir=str(tmp_path), base_size=24,
                        num_classes=0, train_split='train[:75%]', val_split='train[75%:]',
                        test_split='test', device_resident=True))
  with tfds.testing.mock_data(num_examples=16):
    train = sources.load_split(cfg, 'train_split')
    val = sources.load_split(cfg, 'val_split')
  # (mock_data yields num_examples for any split string; slicing is tfds's own business)
  assert train.images.shape == (16, 24, 24, 3) and train.images.dtype == np.uint8
  assert train.sizes.shape == (16, 2) and train.sizes.max() == 24
  assert len(val.labels) == 16 and train.labels.max() < 10


def test_tfds_source_names_a_missing_dataset(tmp_path):
  with pytest.raises(sources.DataError, match='no_such_dataset'):
    sources.load_tfds('no_such_dataset', 'train', str(tmp_path), 16)


def write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tf.io.write_file(path, tf.io.encode_png(array))


def test_image_folder_in_memory_and_streamed(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (('train', 3), ('val', 2)):
    for cls in ('cat', 'dog'):
      for i in range(n):
        write_png(str(tmp_path / split / cls / f'{i}.png'),
                  rng.integers(0, 255, (30, 20, 3), dtype=np.uint8))
  (tmp_path / 'train' / 'cat' / '.DS_Store').write_bytes(b'\0\1')
  source = sources.FolderSource(str(tmp_path), 'train')
  assert source.class_names == ['cat', 'dog'] and source.skipped == 1
  train = sources.in_memory(source, 16)
  val = sources.in_memory(sources.FolderSource(str(tmp_path), 'val'), 16)
  assert train.images.shape == (6, 16, 16, 3) and np.all(train.sizes == [16, 11])  # 30x20
  assert list(train.labels) == [0, 0, 0, 1, 1, 1] and list(val.labels) == [0, 0, 1, 1]
  streamed = sources.StreamedSplit(source, 16)
  images, sizes, labels = streamed.rows([4, 1])
  np.testing.assert_array_equal(images, train.images[[4, 1]])
  np.testing.assert_array_equal(labels, [1, 0])
  assert streamed.decoded == 2  # read on demand: only the rows asked for


def test_image_folder_names_a_corrupt_image(tmp_path):
  write_png(str(tmp_path / 'train' / 'a' / 'good.png'), np.zeros((8, 8, 3), np.uint8))
  (tmp_path / 'train' / 'a' / 'bad.png').write_bytes(b'not an image')
  with pytest.raises(sources.DataError, match='bad.png'):
    sources.in_memory(sources.FolderSource(str(tmp_path), 'train'), 8)


def test_streaming_and_prepare_take_the_same_files(tmp_path):
  """One folder rule (bigkd/data/folders.py): training's FolderSource and bigkd.prepare list the
  same images with the same labels and skip the same junk; TF decodes every image listed."""
  from PIL import Image

  from bigkd.data import prepare_inputs
  image = Image.fromarray(np.zeros((6, 9, 3), np.uint8))
  for split in ('train', 'val'):
    for cls in ('cat', 'dog'):
      os.makedirs(tmp_path / split / cls)
      image.save(tmp_path / split / cls / 'a.png')
  image.save(tmp_path / 'train' / 'cat' / 'b.webp')
  image.save(tmp_path / 'train' / 'dog' / 'no_extension', 'JPEG')
  image.save(tmp_path / 'train' / 'dog' / 'c.tif')  # TF reads no TIFF: skipped by both
  (tmp_path / 'train' / 'cat' / '.DS_Store').write_bytes(b'\0\1')
  (tmp_path / 'train' / 'cat' / '._b.webp').write_bytes(b'\0\5\x16\7 macOS AppleDouble')
  (tmp_path / 'train' / 'dog' / 'notes.txt').write_text('from the zoo')
  os.makedirs(tmp_path / 'train' / 'dog' / 'more.jpg')  # a sub-folder: ignored
  os.makedirs(tmp_path / 'train' / '.ipynb_checkpoints')  # hidden: no class
  _, plans = prepare_inputs.folder_plans(str(tmp_path), '')
  assert [plan.name for plan in plans] == ['train', 'val']
  for plan in plans:
    source = sources.FolderSource(str(tmp_path), plan.name)
    assert [(item.name, item.label) for item in plan.items()] == list(
        zip(source.paths, source.labels.tolist()))
    assert (plan.skipped, source.class_names) == (source.skipped, ['cat', 'dog'])
  train = sources.FolderSource(str(tmp_path), 'train')
  assert [os.path.relpath(p, tmp_path) for p in train.paths] == [
      'train/cat/a.png', 'train/cat/b.webp', 'train/dog/a.png', 'train/dog/no_extension']
  assert train.skipped == 4
  assert sources.in_memory(train, 8).sizes.tolist() == [[5, 8]] * 4


def test_image_folder_refuses_a_class_that_train_lacks(tmp_path):
  for split, cls in (('train', 'cat'), ('val', 'cat'), ('val', 'fox')):
    write_png(str(tmp_path / split / cls / '0.png'), np.zeros((8, 8, 3), np.uint8))
  with pytest.raises(sources.DataError, match=r"'fox' of .*val is not a class of train/"):
    sources.FolderSource(str(tmp_path), 'val')


def data_imports(path: str) -> set[str]:
  """The bigkd.data modules that a module imports anywhere (inside functions too)."""
  import ast
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module == 'bigkd.data':
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('bigkd.data.'):
      found.add(node.module.split('.')[2])
    elif isinstance(node, ast.Import):
      found.update(a.name.split('.')[2] for a in node.names if a.name.startswith('bigkd.data.'))
  return found


def test_data_modules_import_no_circle():
  """Each bigkd.data module imports only modules below it (checked on the source: cheap)."""
  folder = os.path.dirname(sources.__file__)
  graph = {name[:-3]: data_imports(os.path.join(folder, name))
           for name in os.listdir(folder) if name.endswith('.py') and name != '__init__.py'}
  order = []
  while len(order) < len(graph):
    ready = sorted(m for m in graph if m not in order and graph[m] <= set(order))
    assert ready, f'import circle among {sorted(set(graph) - set(order))}: {graph}'
    order += ready
  assert graph['records'] <= {'errors'}  # the format: writer and reader import it, not each other
