"""Streamed input: JPEGs of mixed sizes read and decoded per step, crops over the whole image,
the same batches from an image folder and from bigkd.prepare's ArrayRecord files."""
import jax
import numpy as np
import pytest

from bigkd import stages
from bigkd.data import augment, sources
from conftest import folder_config, read_metrics, run_cli, write_jpeg_folder


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
  batch = 256
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
  assert red.any(axis=(1, 2)).mean() > 0.05 and blue.any(axis=(1, 2)).mean() > 0.05
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
