"""Streamed input: JPEGs of mixed sizes read and decoded per step, crops over the whole image,
the same batches from an image folder and from bigkd.prepare's ArrayRecord files."""
import glob
import sys

import jax
import numpy as np
import pytest

from bigkd import stages
from bigkd.data import augment, sources
from support import finish, folder_config, read_metrics, run_cli, start, write_jpeg_folder


def test_trains_streamed_from_a_jpeg_folder(tmp_path, jpeg_folder):
  summary = stages.run(folder_config(jpeg_folder), str(tmp_path))['stages']['teacher']
  log = read_metrics(tmp_path / 'teacher')
  assert [m['step'] for m in log] == [3, 6] and all(np.isfinite(m['loss']) for m in log)
  assert 0 <= summary['test_accuracy'] <= 1 and summary['steps'] == 6


@pytest.mark.parametrize('sampler', ['uniform_area', 'tf'])
def test_crops_reach_both_edges_of_a_landscape_image(jpeg_folder, sampler):
  """A 4:3 image with a red left edge and a blue right edge: over the training draws, views show
  both, so crops are taken over the whole image, not over a centre square."""
  image = np.full((30, 40, 3), 128, np.uint8)
  image[:, :2] = (255, 0, 0)
  image[:, -2:] = (0, 0, 255)
  canvas, hw = sources.fit_to_canvas(image, 40)
  batch = 512
  images = jax.numpy.asarray(np.repeat(canvas[None], batch, 0))
  sizes = jax.numpy.asarray(np.repeat(np.asarray([hw], np.int32), batch, 0))
  aug = dict(crop_sampler=sampler, crop_area=(0.05, 1.0), crop_aspect=(3 / 4, 4 / 3),
             crop_attempts=100, flip=False, mixup_alpha=0.0, mixup_per_example=False)
  draws = augment.sample_draws(jax.random.key(0), batch, aug, False, sizes)
  boxes = np.asarray(draws.boxes)
  assert boxes[:, 1].min() < 0.01 and (boxes[:, 1] + boxes[:, 3]).max() > 0.99
  views = np.asarray(augment.render_view(images, draws, 16, sizes))  # in [-1, 1]
  red = (views[..., 0] > 0.8) & (views[..., 2] < -0.8)
  blue = (views[..., 2] > 0.8) & (views[..., 0] < -0.8)
  # (tf's offsets stop one pixel short of the bottom and right edges, as TF's do: its boxes
  # reach the right edge only when they span the width or start at the last offset)
  assert red.any(axis=(1, 2)).sum() >= 3 and blue.any(axis=(1, 2)).sum() >= 3
  # The centre square (columns 5..35) alone never shows either edge.
  centre = np.asarray(augment.render_view(images[:1], augment.Draws(
      jax.numpy.asarray([[0, 5 / 40, 1, 30 / 40]]), jax.numpy.zeros(1, bool), None), 16,
      sizes[:1]))
  assert not (centre[..., 0] > 0.8).any() and not (centre[..., 2] > 0.8).any()


def test_a_corrupt_jpeg_is_one_line_naming_it(tmp_path):
  root = write_jpeg_folder(str(tmp_path / 'jpegs'), per_class={'train': 3, 'val': 1, 'test': 1})
  (tmp_path / 'jpegs' / 'train' / 'cross' / '001.jpg').write_bytes(b'\xff\xd8 truncated')
  result = run_cli(['--config', 'configs/digits.py:fast', '--workdir', str(tmp_path / 'w'),
                    '--config.stage_order=baseline', '--config.data.source=folder',
                    f'--config.data.data_dir={root}', '--config.data.device_resident=False',
                    '--config.data.base_size=24', '--config.batch_size=8',
                    '--config.eval_batch_size=8'])
  errors = [l for l in result.stderr.splitlines() if l.startswith('bigkd: error:')]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
  assert 'cross/001.jpg' in errors[0]


def test_eval_view_is_resize_small_then_central_crop():
  """The paper's evaluation, resize_small(S) then central_crop(R), here S=40, R=36 on a 60x90
  image (centred offsets are whole pixels), against TF doing exactly that; bigkd renders the
  same view from the image in one resampling."""
  import tensorflow as tf
  rng = np.random.default_rng(0)
  coarse = rng.uniform(0, 255, (1, 6, 9, 3))
  image = np.asarray(tf.image.resize(coarse, (60, 90)), np.uint8)[0]  # smooth
  small = tf.image.resize(image, (40, 60), antialias=True).numpy()  # short side 60 -> 40
  reference = small[2:38, 12:48]  # central 36 x 36
  canvas, hw = sources.fit_to_canvas(image, 90)  # long side 90: the image itself
  sizes = jax.numpy.asarray([hw], jax.numpy.int32)
  boxes = augment.central_boxes(sizes, 36 / 40)
  view = augment.render_view(jax.numpy.asarray(canvas[None]),
                             augment.Draws(boxes, jax.numpy.zeros(1, bool), None), 36, sizes)
  ours = (np.asarray(view[0]) + 1) * 127.5
  assert np.abs(ours - reference).mean() < 1.5, np.abs(ours - reference).mean()
  shifted = small[3:39, 12:48]  # one pixel off: a real difference, for scale
  assert np.abs(ours - shifted).mean() > 3 * np.abs(ours - reference).mean()
  whole = augment.central_boxes(sizes, 0.0)  # 0: the whole image (the digits' evaluation)
  np.testing.assert_allclose(np.asarray(whole), [[0, 0, 1, 1]])


def test_prepared_records_train_exactly_like_the_folder(tmp_path, jpeg_folder):
  """bigkd.prepare stores the JPEGs byte for byte: streaming its ArrayRecord files gives the
  very batches, and so the very run, of streaming the folder."""
  from support import run_main
  out = str(tmp_path / 'records')
  result = run_main('bigkd.prepare', ['--folder', jpeg_folder, '--out', out, '--workers', '1'])
  assert result.returncode == 0, result.stderr[-3000:]
  folder = stages.run(folder_config(jpeg_folder), str(tmp_path / 'folder'))
  c = folder_config(out)
  c.data.source = 'records'
  records = stages.run(c, str(tmp_path / 'records_run'))
  assert records == folder
  untimed = lambda log: [{k: v for k, v in m.items() if k not in ('steps_per_sec', 'uptime')}
                         for m in log]
  assert untimed(read_metrics(tmp_path / 'records_run' / 'teacher')) == untimed(
      read_metrics(tmp_path / 'folder' / 'teacher'))


DECODE_WHILE_IMPORTING = """
import sys, threading, time
from bigkd.data import sources
threading.Thread(target=lambda: __import__('tensorflow')).start()  # as a library's import does
while 'tensorflow' not in sys.modules:  # then in sys.modules, half imported, for seconds
  time.sleep(0.001)
canvas, _ = sources.decode_batch_to_canvases([(open(sys.argv[1], 'rb').read(), sys.argv[1])], 16)
assert canvas.shape == (1, 16, 16, 3)
"""


def test_reader_decodes_while_another_thread_imports_tensorflow(jpeg_folder):
  """A reader thread that starts while another thread imports TensorFlow waits for that import
  instead of using the half-imported module (an AttributeError, which the reader once reported
  as a corrupt image)."""
  image = sorted(glob.glob(f'{jpeg_folder}/train/*/*'))[0]
  finish(start([sys.executable, '-c', DECODE_WHILE_IMPORTING, image]))
