"""`python -m bigkd.prepare`: image folder / tfds -> ArrayRecord shards, read back by RecordSplit.

Every run is `main` in-process on a handful of tiny images; only the tests that check the
parallel path use 2 workers (the pool's forkserver starts once per test session)."""
import io
import json
import os
import pickle
import struct

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from bigkd.data.jpeg import to_jpeg
from bigkd.data.records import RECORD_VERSION, RecordSplit, decode_record, encode_record
from support import run_main

CLASSES = ('cat', 'dog', 'emu')
# (file name, width, height, mode): JPEGs and PNGs, landscape, portrait, square, one grey.
SPECS = (('a.jpg', 40, 30, 'RGB'), ('b.png', 30, 40, 'RGB'), ('c.png', 50, 50, 'RGB'),
         ('d.jpg', 30, 20, 'L'))


def smooth_image(width, height, mode, seed):
  """Gradients (not noise), so JPEG's error is small and a wrong image is far off."""
  y, x = np.mgrid[:height, :width]
  rgb = np.stack([x * 255 // width, y * 255 // height, (x + y + 40 * seed) % 256], -1)
  image = Image.fromarray(rgb.astype(np.uint8))
  return image.convert(mode)


def save(image, path, fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image.save(path, fmt or ('JPEG' if path.endswith('.jpg') else 'PNG'), quality=90)


def make_folder(root):
  """ROOT/train/{cat,dog,emu}/ (4 images each, grey 'd.jpg', in dog a grey PNG instead; in emu
  also a JPEG without an extension) and ROOT/val/{cat,dog} (no emu), plus a .DS_Store and a
  notes.txt. Returns {split: [(path, label)]} in the order prepare must write them."""
  expected = {'train': [], 'val': []}
  for label, cls in enumerate(CLASSES):
    specs = list(SPECS)
    if cls == 'dog':
      specs[3] = ('d.png', 30, 20, 'L')
    for name, w, h, mode in specs:
      save(smooth_image(w, h, mode, label), str(root / 'train' / cls / name))
    if cls == 'emu':
      save(smooth_image(24, 36, 'RGB', 7), str(root / 'train' / cls / 'e_no_extension'), 'JPEG')
      specs.append(('e_no_extension', 24, 36, 'RGB'))
    expected['train'] += [(str(root / 'train' / cls / n), label) for n, *_ in specs]
    if cls != 'emu':
      save(smooth_image(36, 28, 'RGB', label + 3), str(root / 'val' / cls / 'v.png'))
      expected['val'].append((str(root / 'val' / cls / 'v.png'), label))
  (root / 'train' / 'cat' / '.DS_Store').write_bytes(b'\0\0\0\1Bud1' + bytes(64))
  (root / 'train' / 'dog' / 'notes.txt').write_text('where the photos came from\n')
  return expected


def run(*args):
  return run_main('bigkd.prepare', [str(a) for a in args])


def ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout.strip().splitlines()[-1]


def error_lines(result):
  assert result.returncode == 2, result.stderr[-3000:]
  return [l for l in result.stderr.splitlines() if l.startswith('bigkd: error:')]


def pixels(data):
  return np.asarray(Image.open(io.BytesIO(data)), np.int16)


def shard_files(out):
  """{relative path: bytes} of every file under OUT."""
  files = {}
  for dirpath, _, names in os.walk(out):
    for name in names:
      path = os.path.join(dirpath, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, out)] = f.read()
  return files


def test_record_header_is_four_little_endian_int32s():
  record = encode_record(b'\xff\xd8jpeg', 7, 30, 40)
  assert record[:16] == struct.pack('<4i', RECORD_VERSION, 7, 30, 40)
  assert decode_record(record) == (b'\xff\xd8jpeg', 7, 30, 40)
  with pytest.raises(ValueError, match='version'):
    decode_record(struct.pack('<4i', 99, 7, 30, 40) + b'x')


@pytest.mark.parametrize('fmt, mode, stored_mode', [
    ('BMP', 'RGB', 'RGB'), ('GIF', 'P', 'RGB'), ('JPEG', 'CMYK', 'RGB'), ('PNG', 'RGBA', 'RGB'),
    ('PNG', 'LA', 'L'), ('PNG', 'I;16', 'L'), ('WEBP', 'RGB', 'RGB')])
def test_other_images_become_jpegs_tf_reads(fmt, mode, stored_mode):
  """Whatever comes in is stored as a baseline JPEG (no CMYK: TF's decoder cannot read it)."""
  rgb = smooth_image(40, 30, 'RGB', 0)
  wide = Image.fromarray(np.asarray(rgb.convert('L'), np.uint16) * 257)  # 16-bit grey
  image = wide if mode == 'I;16' else rgb.convert(mode)
  encoded = io.BytesIO()
  image.save(encoded, fmt)
  data, height, width = to_jpeg(encoded.getvalue(), 0)
  stored = Image.open(io.BytesIO(data))
  assert (stored.format, stored.mode, height, width) == ('JPEG', stored_mode, 30, 40)
  assert tf.io.decode_jpeg(data, channels=3).shape == (30, 40, 3)
  reference = rgb.convert('L') if mode == 'I;16' else image.convert(stored_mode)  # (GIF: palette)
  assert np.abs(pixels(data) - np.asarray(reference, np.int16)).mean() < 4


def test_folder_round_trip(tmp_path):
  expected = make_folder(tmp_path / 'root')
  out = tmp_path / 'out'
  line = ok(run('--folder', tmp_path / 'root', '--out', out, '--shards', 2, '--workers', 2))
  assert 'train 13 written / 0 skipped corrupt / 2 skipped non-image' in line
  assert 'val 2 written / 0 skipped corrupt / 0 skipped non-image' in line
  for split, examples in expected.items():
    records = RecordSplit(str(out), split)
    assert records.class_names == list(CLASSES) and records.num_classes == 3
    assert len(records) == len(examples)
    for i, (path, label) in enumerate(examples):
      data, got_label, height, width = records[i]
      original = Image.open(path)
      assert (got_label, (width, height)) == (label, original.size), path
      assert Image.open(io.BytesIO(data)).format == 'JPEG'
      assert Image.open(io.BytesIO(data)).mode == original.mode  # grey stays grey
      with open(path, 'rb') as f:
        if original.format == 'JPEG':
          assert data == f.read(), f'{path}: a JPEG within the cap is stored byte for byte'
      diff = np.abs(pixels(data) - np.asarray(original, np.int16))
      assert diff.mean() < 1.5 and diff.max() < 24, (path, diff.mean(), diff.max())
  grey = RecordSplit(str(out), 'train')[3][0]
  assert tf.io.decode_jpeg(grey, channels=3).shape == (20, 30, 3)  # the reader's RGB
  info = json.loads((out / 'train' / 'info.json').read_text())
  assert info['shards'] == [f'train-0000{i}-of-00002.array_record' for i in range(2)]
  assert (info['skipped_not_image'], info['skipped_corrupt'], info['max_short_side']) == (2, [], 0)
  assert info['source'] == {'folder': str(tmp_path / 'root'), 'split': 'train'}
  top = json.loads((out / 'info.json').read_text())
  assert top['class_names'] == list(CLASSES) and top['splits'] == {'train': 13, 'val': 2}
  # grain copies a source into its workers: it must pickle (paths only) and read again.
  records = RecordSplit(str(out), 'train')
  assert records[-1][1] == 2
  copy = pickle.loads(pickle.dumps(records))
  assert copy._records is None and copy[12] == records[12] and copy[-1] == records[12]
  with pytest.raises(IndexError):
    copy[13]


def test_max_short_side_caps_the_short_side_keeping_aspect(tmp_path):
  expected = make_folder(tmp_path / 'root')
  out = tmp_path / 'out'
  ok(run('--folder', tmp_path / 'root', '--out', out, '--workers', 1))
  # Into the same OUT: shards written without the cap must not be reused.
  line = ok(run('--folder', tmp_path / 'root', '--out', out, '--max_short_side', 25,
                '--workers', 1))
  assert 'reused' not in line
  records = RecordSplit(str(out), 'train')
  sizes = {(40, 30): (33, 25), (30, 40): (25, 33), (50, 50): (25, 25), (30, 20): (30, 20),
           (24, 36): (24, 36)}
  for i, (path, _) in enumerate(expected['train']):
    data, _, height, width = records[i]
    original = Image.open(path)
    assert (width, height) == sizes[original.size] == Image.open(io.BytesIO(data)).size, path
    if original.size == (width, height) and original.format == 'JPEG':  # within the cap
      with open(path, 'rb') as f:
        assert data == f.read()
      continue
    resized = tf.image.resize(np.atleast_3d(np.asarray(original)), (height, width),
                              antialias=True)  # another resizer than prepare's own
    diff = np.abs(np.atleast_3d(pixels(data)) - np.asarray(resized))
    assert diff.mean() < 4, (path, diff.mean())
  assert json.loads((out / 'train' / 'info.json').read_text())['max_short_side'] == 25


def test_same_input_same_bytes_whatever_the_workers(tmp_path):
  make_folder(tmp_path / 'root')
  for out, workers in (('one', 1), ('two', 2)):
    ok(run('--folder', tmp_path / 'root', '--out', tmp_path / out, '--shards', 3,
           '--workers', workers))
  one, two = shard_files(tmp_path / 'one'), shard_files(tmp_path / 'two')
  assert sorted(one) == sorted(two) and len([f for f in one if f.endswith('.array_record')]) == 6
  for name in one:
    assert one[name] == two[name], name


def test_rerun_rewrites_only_missing_shards_and_removes_temporaries(tmp_path):
  make_folder(tmp_path / 'root')
  out, args = tmp_path / 'out', ('--folder', tmp_path / 'root', '--shards', 3, '--workers', 1)
  ok(run(*args, '--out', out))
  before = shard_files(out)
  split_dir = out / 'train'
  stat = {n: os.stat(split_dir / n) for n in os.listdir(split_dir)}
  os.remove(split_dir / 'train-00001-of-00003.array_record')  # "killed" before its rename
  (split_dir / 'train-00002-of-00003.array_record.tmp').write_bytes(b'half a shard')
  line = ok(run(*args, '--out', out))
  assert '(2 of 3 shards reused)' in line and 'val 2 written' in line
  assert shard_files(out) == before  # same bytes, and no temporary left
  for name in ('train-00000-of-00003.array_record', 'train-00002-of-00003.array_record'):
    again = os.stat(split_dir / name)
    assert (again.st_ino, again.st_mtime_ns) == (stat[name].st_ino, stat[name].st_mtime_ns)


def add_corrupt_files(root):
  """Two corrupt images in the last class (so in the last shard): text named .jpg, half a PNG."""
  bad = root / 'train' / 'emu' / 'zz_broken.jpg'
  bad.write_text('not a jpeg')
  png = io.BytesIO()
  smooth_image(64, 64, 'RGB', 1).save(png, 'PNG')
  cut = root / 'train' / 'emu' / 'zz_truncated.png'
  cut.write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
  return str(bad), str(cut)


def test_corrupt_image_stops_the_run_or_is_skipped(tmp_path):
  make_folder(tmp_path / 'root')
  bad, cut = add_corrupt_files(tmp_path / 'root')
  out, args = tmp_path / 'out', ('--folder', tmp_path / 'root', '--shards', 3, '--workers', 1)
  errors = error_lines(run(*args, '--out', out))
  assert errors == [f'bigkd: error: corrupt image {bad} (use --on_corrupt=skip to skip it)']
  split_files = sorted(os.listdir(out / 'train'))
  assert split_files == ['train-00000-of-00003.array_record', 'train-00000-of-00003.stats.json',
                         'train-00001-of-00003.array_record', 'train-00001-of-00003.stats.json']
  line = ok(run(*args, '--out', out, '--on_corrupt=skip'))
  assert 'train 13 written / 2 skipped corrupt / 2 skipped non-image (2 of 3 shards reused)' in line
  info = json.loads((out / 'train' / 'info.json').read_text())
  assert info['skipped_corrupt'] == [bad, cut] and info['num_examples'] == 13
  assert len(RecordSplit(str(out), 'train')) == 13
  # A shard that skipped them still counts as corrupt input for a run that does not skip.
  assert error_lines(run(*args, '--out', out)) == [
      f'bigkd: error: corrupt image {bad} (use --on_corrupt=skip to skip it)']


def test_tfds_source_keeps_order_labels_and_pixels(tmp_path):
  import tensorflow_datasets as tfds
  out = tmp_path / 'out'
  with tfds.testing.mock_data(num_examples=6):
    line = ok(run('--tfds', 'oxford_flowers102', '--tfds_data_dir', tmp_path / 'tfds',
                  '--splits', 'train[:50%]=train,test', '--out', out, '--shards', 2,
                  '--workers', 2))
    builder = tfds.builder('oxford_flowers102', data_dir=str(tmp_path / 'tfds'))
    reference = list(tfds.as_numpy(builder.as_dataset(split='test', shuffle_files=False)))
  assert 'train 6 written / 0 skipped corrupt / 0 skipped non-image' in line
  records = RecordSplit(str(out), 'test')
  assert len(records) == 6 and records.class_names == builder.info.features['label'].names
  for i, example in enumerate(reference):
    data, label, height, width = records[i]
    assert (label, height, width) == (example['label'], *example['image'].shape[:2])
    diff = np.abs(pixels(data) - example['image'])  # mock images are noise: JPEG's worst case
    assert diff.mean() < 5 and diff.max() < 40, (diff.mean(), diff.max())
  info = json.loads((out / 'train' / 'info.json').read_text())
  assert info['source']['split'] == 'train[:50%]' and info['num_classes'] == 102


def test_tfds_prepared_dataset_splits_and_slices(tmp_path):
  """A real (generated offline) tfds dataset: split sizes from its metadata, every split by
  default, split expressions that slice, grey PNGs stored as grey JPEGs."""
  import tensorflow_datasets as tfds
  data_dir = str(tmp_path / 'tfds')
  tfds.testing.DummyMnist(data_dir=data_dir).download_and_prepare()
  args = ('--tfds', 'dummy_mnist', '--tfds_data_dir', data_dir, '--workers', 1)
  line = ok(run(*args, '--out', tmp_path / 'all'))
  assert 'train 20 written' in line and 'test 20 written' in line
  ok(run(*args, '--out', tmp_path / 'cut', '--splits', 'train[:25%]=a,train[25%:]=b'))
  train = RecordSplit(str(tmp_path / 'all'), 'train')
  a, b = (RecordSplit(str(tmp_path / 'cut'), s) for s in 'ab')
  assert (len(a), len(b)) == (5, 15)
  assert [a[i] for i in range(5)] + [b[i] for i in range(15)] == [train[i] for i in range(20)]
  reference = tfds.builder('dummy_mnist', data_dir=data_dir).as_dataset(
      split='train', shuffle_files=False)
  for i, example in enumerate(tfds.as_numpy(reference)):
    data, label, height, width = train[i]
    assert (label, height, width) == (example['label'], 28, 28)
    assert Image.open(io.BytesIO(data)).mode == 'L'
    assert np.abs(pixels(data) - example['image'][..., 0]).mean() < 3
  assert train.class_names == [str(d) for d in range(10)]


def test_a_class_that_train_lacks_is_one_error_line(tmp_path):
  """Its images would drop out of the evaluation unseen: refused, as training refuses it."""
  make_folder(tmp_path / 'root')
  save(smooth_image(20, 20, 'RGB', 0), str(tmp_path / 'root' / 'val' / 'fox' / 'f.png'))
  errors = error_lines(run('--folder', tmp_path / 'root', '--out', tmp_path / 'out'))
  assert errors == [f"bigkd: error: class folder 'fox' of {tmp_path / 'root' / 'val'} is not a "
                    'class of train/: its images would be left out (add it to train/ or remove it)']
  assert not os.path.exists(tmp_path / 'out')

@pytest.mark.parametrize('args, fragment', [
    (['--folder', '/no/such/folder'], 'image folder /no/such/folder does not exist'),
    (['--tfds', 'no_such_dataset'], 'no_such_dataset'),
    ([], 'give one source'),
    (['--folder', '.', '--on_corrupt=maybe'], 'on_corrupt'),
    (['--folder', 'bigkd', '--splits', 'train[:9]'], 'output name'),
])
def test_bad_input_is_one_error_line(tmp_path, args, fragment):
  errors = error_lines(run(*args, '--out', tmp_path / 'out'))
  assert len(errors) == 1 and fragment in errors[0], errors
  assert not os.path.exists(tmp_path / 'out')


def test_help_shows_an_example():
  result = run('--help')
  assert result.returncode == 0, result.stderr
  assert 'Example' in result.stdout and '--max_short_side' in result.stdout
