"""The first hour of a new user (after test_inspect.py, whose first test must see the shared demo
run while it trains): the package installed and run from elsewhere, `--help` and
`--fields`, unknown variants, an own image folder (junk files, a corrupt image, class names,
a small split), the BiT-M fine-tune-then-distil recipe on it, and curves that read right
(means over the log interval, TensorBoard scalars and the views image)."""
import glob
import json
import os
import subprocess

import numpy as np
import pytest

from support import (JPEG_CLASSES, REPO, installed_env, random_params, run_cli, run_main,
                     tiny_config, write_jpeg_folder)

from bigkd import build, inspect
from bigkd.step import logged_means

BUNDLED = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                 if not p.endswith('__init__.py'))


def test_installed_package_runs_the_demo_from_elsewhere(demo_run):
  """`pip install .` into a fresh venv: bigkd is imported from the venv (not the checkout), its
  console scripts call the modules' `main` (one of them run: each start imports TensorFlow), and
  `bigkd-train --config configs/digits.py:fast` (the bundled config) ran in a directory without
  configs/ (the shared demo run)."""
  result = subprocess.run([os.path.join(demo_run.bin, 'bigkd-report'), '--help'],
                          cwd=demo_run.root, env=installed_env(), capture_output=True, text=True)
  assert result.returncode == 0 and 'bigkd-report' in result.stdout, result.stderr
  for name, module in (('train', 'train'), ('bench', 'bench'), ('prepare', 'data.prepare'),
                       ('report', 'report'), ('plan', 'launch_plan')):
    script = open(os.path.join(demo_run.bin, f'bigkd-{name}')).read()
    assert f'from bigkd.{module} import main' in script, script
  assert script.startswith(f'#!{os.path.join(demo_run.bin, "python")}')
  where = subprocess.check_output(
      [os.path.join(demo_run.bin, 'python'), '-c',
       'import importlib.util; print(importlib.util.find_spec("bigkd").origin)'],
      cwd=demo_run.root, env=installed_env(), text=True)
  assert where.startswith(os.path.dirname(demo_run.bin)) and 'site-packages' in where
  assert not os.path.exists(os.path.join(demo_run.root, 'configs'))
  workdir = demo_run.workdir()
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert set(summary['stages']) == {'teacher', 'student', 'baseline'}
  assert f'{workdir}/report.html' in demo_run.stdout  # where the report goes, said at the end


def test_pyproject_lists_every_package():
  """pyproject.toml names the packages (it maps configs/ to bigkd.configs): a new folder of
  bigkd missing there would be missing from the installed package."""
  import tomllib
  with open(os.path.join(REPO, 'pyproject.toml'), 'rb') as f:
    listed = set(tomllib.load(f)['tool']['setuptools']['packages'])
  found = {os.path.relpath(os.path.dirname(p), REPO).replace(os.sep, '.')
           for p in glob.glob(os.path.join(REPO, 'bigkd', '**', '__init__.py'), recursive=True)}
  assert listed == found | {'bigkd.configs'}


def test_help_teaches_flags_an_example_and_the_fields():
  result = run_main('bigkd.train', ['--help'])
  assert result.returncode == 0
  for fragment in ('--config', '--workdir', 'Example', ':fast', '--fields', 'Exit codes'):
    assert fragment in result.stdout, fragment
  fields = run_main('bigkd.train', ['--config', 'configs/folder.py:bit', '--fields',
                                    '--config.stages.student.temperature=4'])
  assert fields.returncode == 0, fields.stderr
  lines = {line.split()[0]: line for line in fields.stdout.splitlines() if line.strip()}
  assert 'the canvas' in lines['data.base_size'] or 'canvas' in fields.stdout
  assert 'BiT-M-R152x2.npz' in lines['stages.teacher.init']
  assert 'random' in lines['stages.teacher.init']  # its comment from config.py
  assert '4.0' in lines['stages.student.temperature']  # the value after overrides ...
  assert '(default 1.0)' in lines['stages.student.temperature']  # ... and the default
  assert 'T²' in lines['stages.student.temperature']
  assert 'stages.student.teachers.teacher.source' in lines


@pytest.mark.parametrize('config', BUNDLED)
def test_unknown_variant_is_one_line_naming_the_known_ones(tmp_path, config):
  result = run_cli(['--config', f'configs/{config}:bogus', '--workdir', str(tmp_path / 'w')])
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert lines[0].startswith('bigkd: error:') and 'bogus' in lines[0]
  assert 'known' in lines[0] or 'variants' in lines[0], lines[0]
  assert not os.path.exists(tmp_path / 'w')


def tiny_folder_args(root, workdir):
  """configs/folder.py with models small enough for a CPU test (the rest is the config's)."""
  return ['--config', 'configs/folder.py', '--workdir', workdir,
          f'--config.data.data_dir={root}', '--config.eval_batch_size=8',
          '--config.stages.teacher.model=cnn_tiny', '--config.stages.teacher.resolution=16',
          '--config.stages.teacher.epochs=3', '--config.stages.student.model=cnn_tiny',
          '--config.stages.student.resolution=12', '--config.stages.student.epochs=3']


def test_own_folder_with_junk_files_small_split_and_class_names(tmp_path):
  """configs/folder.py on 24 training images with a .DS_Store and a note among them: the junk
  is skipped and counted, the batch (64) shrinks to the split, the canvas follows the images,
  and the class names come back from stage.json; then a corrupt image is an error naming it
  (one line, exit 2)."""
  root = write_jpeg_folder(str(tmp_path / 'images'))
  for junk in ('train/.DS_Store', 'train/circle/.DS_Store', 'train/cross/notes.txt'):
    open(os.path.join(root, junk), 'w').write('not an image')
  result = run_cli(tiny_folder_args(root, str(tmp_path / 'w')))
  assert result.returncode == 0, result.stderr
  assert 'batch size 64 > the 24 training examples; using 24' in result.stdout
  # Median long side of the JPEGs is 40 px; the largest model is 16 px: canvas 4/3 of it (32).
  assert 'median long side is 40 px; canvas 32 px' in result.stdout
  assert 'skipped 2 files that are not images' in result.stdout
  run = inspect.load_run(str(tmp_path / 'w'))
  student = run.stage('student')
  assert student.class_names == list(JPEG_CLASSES)
  assert run.plans['student'].batch_size == 24 and run.plans['student'].steps == 3
  assert json.load(open(tmp_path / 'w' / 'config.json'))['data']['base_size'] == 0

  with open(os.path.join(root, 'val', 'cross', 'broken.jpg'), 'wb') as f:
    f.write(b'\xff\xd8\xff\xe0 truncated')
  # Held in memory (the config's default), every image is decoded before any work.
  result = run_cli(tiny_folder_args(root, str(tmp_path / 'w2')))
  assert result.returncode == 2 and 'broken.jpg' in result.stderr, result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / 'w2')


def test_bit_recipe_fine_tunes_a_21k_head_npz_then_distils(tmp_path):
  """configs/folder.py:bit, the README's own-data recipe, with bit_tiny standing in for
  BiT-M-R152x2 (and cnn_tiny for BiT-R50x1, to keep the test short), run as `bigkd-train` runs
  it: the teacher stage starts from an .npz with a 21,843-class head. The teacher is re-headed
  for the folder's 3 classes, its body starts from the .npz, and the student is distilled from
  it."""
  from bigkd.models import bit
  folder = str(tmp_path)
  root = write_jpeg_folder(os.path.join(folder, 'images'))
  npz = os.path.join(folder, 'BiT-M-tiny.npz')
  bit.save_npz(random_params('bit_tiny', 16, num_classes=21843), npz)
  args = ['--config', 'configs/folder.py:bit', '--workdir', os.path.join(folder, 'w'),
          f'--config.data.data_dir={root}', f'--config.stages.teacher.init={npz}',
          '--config.teacher_dtype=float32', '--config.eval_batch_size=8',
          '--config.stages.teacher.model=bit_tiny', '--config.stages.teacher.resolution=16',
          '--config.stages.teacher.steps=3', '--config.stages.teacher.optimizer.warmup_steps=1',
          '--config.stages.student.model=cnn_tiny', '--config.stages.student.resolution=12',
          '--config.stages.student.steps=3', '--config.stages.student.optimizer.warmup_steps=1']
  result = run_cli(args)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(npz) as f:
    start_stem = f['resnet/root_block/standardized_conv2d/kernel']
  workdir = os.path.join(folder, 'w')
  run = inspect.load_run(workdir)
  teacher = run.stage('teacher', step=run.checkpoints['teacher'][0])
  head = teacher.params['head']['conv2d']['kernel']
  assert head.shape[-1] == 3 and teacher.class_names == list(JPEG_CLASSES)
  # The body came from the .npz: after 3 small SGD steps the stem is still close to it.
  stem = np.asarray(teacher.params['root_block']['standardized_conv2d']['kernel'])
  assert np.abs(stem - start_stem).max() < 0.05 * np.abs(start_stem).max()
  assert {'test_agreement', 'test_kl'} <= set(run.summary['stages']['student'])
  assert run.config['stages']['student']['teachers']['teacher']['source'] == 'teacher'


def test_logged_values_are_means_over_the_interval(tmp_path):
  """`loss` at a log step is the mean of the per-step losses since the previous log step."""
  config = tiny_config(steps=6, log_every=3)
  mesh, data, (plan,) = build.setup(config, str(tmp_path))
  stage = build.build_stage(plan, data, mesh)
  state, inputs, losses, logged = stage.state, stage.inputs(0, 6), [], []
  for step in range(1, 7):
    state, metrics = stage.train_step(state, stage.teacher_params, *next(inputs))
    losses.append(float(metrics['loss']))
    if step % 3 == 0:
      logged.append(logged_means(state.metric_sums)['loss'])
  np.testing.assert_allclose(logged, [np.mean(losses[:3]), np.mean(losses[3:])], rtol=1e-5)
  assert not np.isclose(logged[1], losses[5], rtol=1e-3)  # not just the last batch


def test_tensorboard_reads_scalars_and_the_views_image(demo_run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  student_dir = os.path.join(demo_run.workdir(), 'student')
  import tensorflow as tf
  events = EventAccumulator(student_dir, size_guidance={'scalars': 0, 'tensors': 0}).Reload()
  tags = events.Tags()
  assert {'loss', 'kl_T1', 'agreement', 'lr', 'val_accuracy', 'test_accuracy'} <= set(
      tags['scalars'])
  logged = [json.loads(line) for line in open(os.path.join(student_dir, 'metrics.jsonl'))]
  tb_loss = {e.step: e.value for e in events.Scalars('loss')}
  assert tb_loss == pytest.approx({r['step']: r['loss'] for r in logged if 'loss' in r})
  assert [e.step for e in events.Scalars('val_accuracy')] == [20, 40]
  # Images as TensorBoard 2 writes them: a tensor summary of the images plugin, which its
  # Images dashboard shows: [width, height, PNG].
  assert events.SummaryMetadata('views').plugin_data.plugin_name == 'images'
  (views,) = events.Tensors('views')
  width, height, png = views.tensor_proto.string_val
  image = tf.io.decode_png(png).numpy()
  assert views.step == 1 and image.shape == (int(height), int(width), 3)
  assert image.shape[1] > 4 * 2 * 64 and image.shape[0] > 2 * 64  # 4 pairs, >= 2 teaching modes
  assert image.std() > 10  # not a blank image


def test_the_study_config_is_not_mistaken_for_a_training_config(tmp_path):
  result = run_cli(['--config', 'configs/study.py', '--workdir', str(tmp_path / 'w')])
  assert result.returncode == 2 and 'python -m bigkd.study' in result.stderr, result.stderr
  assert not os.path.exists(tmp_path / 'w')
