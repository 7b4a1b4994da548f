"""Bad configs stop before any work: exit code 2 and one line on stderr naming the problem."""
import os

import jax
import numpy as np
import pytest

from bigkd.config import ConfigError
from bigkd.plan import check_config
from support import run_cli, run_main, tiny_config

DIGITS = ['--config', 'configs/digits.py:fast']


def assert_bad_config(result, *fragments):
  errors = [l for l in result.stderr.splitlines() if l.startswith('bigkd: error:')]
  assert result.returncode == 2, result.stderr[-2000:]
  assert len(errors) == 1, result.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]


@pytest.mark.parametrize('override, fragments', [
    ('--config.stages.teacher.stpes=5', ('stpes',)),
    ('--config.batch_size=many', ('batch_size',)),
    ('--config.stages.student.resolution=64', ('stages.student.resolution=64', 'base_size=16')),
    ('--config.stages.student.model=resnet9000', ('resnet9000',)),
    ('--config.stages.student.teaching_mode=patient', ('teaching_mode', 'patient')),
    ('--config.stage_order=teacher,studnet', ('studnet',)),
])
def test_bad_overrides_exit_2_naming_the_problem(tmp_path, override, fragments):
  result = run_cli([*DIGITS, '--workdir', str(tmp_path / 'w'), override])
  assert_bad_config(result, *fragments)
  assert not os.path.exists(tmp_path / 'w' / 'teacher')  # nothing was started


def test_batch_size_not_divisible_by_devices():
  c = tiny_config()
  c.batch_size = 12
  with pytest.raises(ConfigError, match='batch size 12 is not divisible by the 8 devices'):
    check_config(c, 8)


@pytest.mark.parametrize('args, fragments', [
    (['--config', 'configs/nofile.py'], ('No such file', 'configs/nofile.py')),
    (['--config', 'configs/bit_transfer.py:flowers,huge'], ("unknown budget 'huge'", 'long')),
    (['--config.stages.teacher.stpes=5'], ('stpes', 'Did you mean "steps"')),
    (['--bogus_flag'], ('bogus_flag',)),
])
def test_bad_command_lines_exit_2_with_the_whole_message(tmp_path, args, fragments):
  args = args if args[0] == '--config' else [*DIGITS, *args]
  result = run_cli([*args, '--workdir', str(tmp_path / 'w')])
  assert_bad_config(result, *fragments)
  assert '\\n' not in result.stderr and not os.path.exists(tmp_path / 'w')


def test_help_lists_the_flags_with_an_example():
  for module in ('bigkd.train', 'bigkd.bench'):
    result = run_main(module, ['--help'])
    assert result.returncode == 0, result.stderr
    assert '--config' in result.stdout and 'Example' in result.stdout, result.stdout
    assert 'flagfile' not in result.stdout  # absl's own flags are left out


def test_missing_teacher_checkpoint(tmp_path):
  result = run_cli([*DIGITS, '--workdir', str(tmp_path), '--config.stage_order=student',
                    f'--config.stages.student.teachers.teacher.source={tmp_path}/nowhere'])
  assert_bad_config(result, 'stages.student.teachers.teacher', 'nowhere')


def test_teacher_checkpoint_that_does_not_fit(tmp_path, trained_teacher):
  teacher_dir, _ = trained_teacher  # a cnn_small stage, claimed here to be a resnet8
  result = run_cli([*DIGITS, '--workdir', str(tmp_path), '--config.stage_order=student',
                    '--config.data.base_size=12', '--config.stages.student.resolution=12',
                    f'--config.stages.student.teachers.teacher.source={teacher_dir}',
                    '--config.stages.student.teachers.teacher.model=resnet8'])
  assert_bad_config(result, 'does not fit the model', 'teachers.teacher')


def test_npz_teacher_that_does_not_fit(tmp_path):
  from bigkd.models import bit, param_shapes
  shapes = param_shapes('bit_tiny', num_classes=5, resolution=16)  # digits have 10 classes
  bit.save_npz(jax.tree.map(lambda s: np.zeros(s.shape, np.float32), shapes),
               str(tmp_path / 'teacher.npz'))
  result = run_cli([*DIGITS, '--workdir', str(tmp_path / 'w'), '--config.stage_order=student',
                    f'--config.stages.student.teachers.teacher.source={tmp_path}/teacher.npz',
                    '--config.stages.student.teachers.teacher.model=bit_tiny',
                    '--config.stages.student.teachers.teacher.resolution=16'])
  assert_bad_config(result, 'teacher.npz', 'does not fit the model', 'has shape (1, 1, 1024, 5)')
  assert not os.path.exists(tmp_path / 'w')


def snapshot(root):
  """{relative path: bytes (files) or None (folders)} of everything under `root`."""
  tree = {}
  for folder, dirs, files in os.walk(root):
    for name in dirs:
      tree[os.path.relpath(os.path.join(folder, name), root)] = None
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        tree[os.path.relpath(path, root)] = f.read()
  return tree


def empty_class_folder(tmp_path, monkeypatch):
  """A JPEG folder whose train/cross holds no image (only a stray note)."""
  from support import write_jpeg_folder
  root = write_jpeg_folder(str(tmp_path / 'jpegs'), per_class={'train': 2, 'val': 1, 'test': 1})
  for name in os.listdir(tmp_path / 'jpegs' / 'train' / 'cross'):
    os.remove(tmp_path / 'jpegs' / 'train' / 'cross' / name)
  (tmp_path / 'jpegs' / 'train' / 'cross' / 'notes.txt').write_text('no images here')
  return ['--config.stage_order=baseline', '--config.data.source=folder',
          f'--config.data.data_dir={root}', '--config.data.base_size=24',
          '--config.batch_size=4', '--config.eval_batch_size=4']


def file_as_workdir(tmp_path, monkeypatch):
  (tmp_path / 'w').write_text('a file, not a folder')
  return []


def file_above_workdir(tmp_path, monkeypatch):
  (tmp_path / 'f').write_text('a file')
  return ['--workdir', str(tmp_path / 'f' / 'w')]


def unwritable_parent(tmp_path, monkeypatch):
  """A read-only parent folder; as root (who writes anywhere) os.access is told so."""
  os.makedirs(tmp_path / 'ro')
  os.chmod(tmp_path / 'ro', 0o555)
  access, ro = os.access, str(tmp_path / 'ro')
  monkeypatch.setattr(os, 'access', lambda path, mode, **kw: (
      not str(path).startswith(ro) and access(path, mode, **kw)))
  return ['--workdir', str(tmp_path / 'ro' / 'w')]


NPZ = '--config.stages.student.teachers.teacher'
WEIGHTS, PAIRS = '--config.stages.student.loss_weights', '--config.stages.student.feature_pairs'
MALFORMED = [  # (id, overrides or a function (tmp_path, monkeypatch) -> them, error fragments)
    ('unknown_variant', ['--config', 'configs/digits.py:nosuch'], ('nosuch', 'fast')),
    ('eval_batch_size_0', ['--config.eval_batch_size=0'], ('eval_batch_size=0',)),
    ('eval_batch_size_neg', ['--config.eval_batch_size=-64'], ('eval_batch_size=-64',)),
    ('log_every_0', ['--config.log_every=0'], ('log_every=0',)),
    ('log_every_neg', ['--config.log_every=-1'], ('log_every=-1',)),
    ('eval_every_neg', ['--config.eval_every=-5'], ('eval_every=-5',)),
    ('checkpoint_every_0', ['--config.checkpoint_every=0'], ('checkpoint_every=0',)),
    ('checkpoint_every_neg', ['--config.checkpoint_every=-10'], ('checkpoint_every=-10',)),
    ('keep_checkpoints_0', ['--config.keep_checkpoints=0'], ('keep_checkpoints=0',)),
    ('keep_checkpoints_neg', ['--config.keep_checkpoints=-2'], ('keep_checkpoints=-2',)),
    ('mixup_alpha_neg', ['--config.augment.mixup_alpha=-1.0'],
     ('stages.student', 'mixup_alpha=-1.0')),
    ('stage_mixup_alpha_neg', ['--config.stages.teacher.augment.mixup_alpha=-0.5'],
     ('stages.teacher', 'mixup_alpha=-0.5')),
    ('temperature_0', ['--config.stages.student.temperature=0'], ('temperature',)),
    ('temperature_neg', ['--config.stages.student.temperature=-2'], ('temperature',)),
    ('label_weight_high', ['--config.stages.student.label_weight=1.5'], ('label_weight',)),
    ('label_weight_neg', ['--config.stages.student.label_weight=-0.1'], ('label_weight',)),
    ('num_classes_below_labels', ['--config.data.num_classes=5'],
     ('data.num_classes=5', '10 classes')),
    ('num_classes_neg', ['--config.data.num_classes=-1'], ('data.num_classes=-1',)),
    ('empty_class_folder', empty_class_folder, ('cross', 'has no images')),
    ('workdir_is_a_file', file_as_workdir, ('is a file',)),
    ('workdir_under_a_file', file_above_workdir, ('is a file', 'f')),
    ('workdir_unwritable', unwritable_parent, ('not writable',)),
    ('accum_above_train_split', ['--config.batch_size=2048', '--config.grad_accum_steps=2048'],
     ('1197 training examples', 'grad_accum_steps')),
    ('steps_neg', ['--config.stages.teacher.steps=-1'], ('stages.teacher.steps=-1',)),
    ('epochs_neg', ['--config.stages.teacher.epochs=-1.0'], ('stages.teacher.epochs=-1.0',)),
    ('warmup_steps_neg', ['--config.optimizer.warmup_steps=-1'], ('warmup_steps=-1',)),
    ('warmup_epochs_neg', ['--config.optimizer.warmup_epochs=-1.0'], ('warmup_epochs=-1.0',)),
    ('grad_accum_neg', ['--config.grad_accum_steps=-1'], ('grad_accum_steps=-1',)),
    ('stage_grad_accum_neg', ['--config.stages.teacher.grad_accum_steps=-2'],
     ('stages.teacher.grad_accum_steps=-2',)),
    ('crop_area_one_number', ['--config.augment.crop_area=(0.5,)'], ('crop_area', 'pair')),
    ('crop_area_not_numbers', ["--config.augment.crop_area=(0.5,'a')"], ('crop_area', 'pair')),
    ('crop_aspect_three', ['--config.augment.crop_aspect=(0.5,1.0,2.0)'],
     ('crop_aspect', 'pair')),
    ('crop_area_reversed', ['--config.augment.crop_area=(0.9,0.5)'], ('crop_area',)),
    ('npz_teacher_without_resolution', [f'{NPZ}.source=/nowhere/t.npz', f'{NPZ}.model=bit_tiny'],
     ('.npz', 'resolution')),
    ('stage_named_twice', ['--config.stage_order=teacher,student,teacher'], ('teacher', 'twice')),
    ('base_size_0', ['--config.data.base_size=0'], ('data.base_size=0',)),
    ('clip_norm_neg', ['--config.optimizer.clip_norm=-1.0'], ('clip_norm=-1.0',)),
    ('weight_decay_neg', ['--config.optimizer.weight_decay=-0.1'], ('weight_decay=-0.1',)),
    ('reader_threads_0', ['--config.data.reader_threads=0'], ('reader_threads=0',)),
    ('mesh_data_0', ['--config.mesh.data=0'], ('mesh.data=0',)),
    ('lr_0', ['--config.optimizer.lr=0'], ('optimizer.lr',)),
    ('b1_above_1', ['--config.optimizer.b1=1.5'], ('optimizer.b1=1.5',)),
    ('b2_neg', ['--config.optimizer.b2=-1.0'], ('optimizer.b2=-1.0',)),
    ('momentum_neg', ['--config.optimizer.momentum=-1.0'], ('optimizer.momentum=-1.0',)),
    ('eps_neg', ['--config.optimizer.eps=-1.0'], ('optimizer.eps=-1.0',)),
    ('teacher_resolution_neg', [f'{NPZ}.resolution=-4'], ('teachers.teacher.resolution=-4',)),
    ('min_fsdp_size_neg', ['--config.mesh.min_fsdp_size=-1'], ('min_fsdp_size=-1',)),
    # Feature and relation losses (digits.py: student cnn_small at 12 px, teacher resnet8 at 16).
    ('feature_loss_without_pairs', ['--config.stages.student.loss_weights.fitnet=1.0'],
     ('stages.student.loss_weights.fitnet', 'needs feature_pairs')),
    ('feature_pairs_without_loss', [f'{PAIRS}=(("student.stage2","teacher.stage3"),)'],
     ('stages.student.feature_pairs', 'no feature loss')),
    ('feature_tap_unknown',
     [f'{WEIGHTS}.at=1.0', f'{PAIRS}=(("student.stage9","teacher.stage3"),)'],
     ('student.stage9', 'cnn_small has no feature', 'stage1, stage2')),
    ('feature_pair_of_no_teacher',
     [f'{WEIGHTS}.at=1.0', f'{PAIRS}=(("student.stage2","t.stage3"),)'],
     ("no teacher 't'",)),
    ('fitnet_vector_to_map', [f'{WEIGHTS}.fitnet=1.0',
                              f'{PAIRS}=(("student.prelogits","teacher.stage3"),)'],
     ('fitnet cannot adapt', 'student.prelogits (288,)', 'teacher.stage3 (4, 4, 64)')),
    ('rkd_on_maps',
     [f'{WEIGHTS}.rkd_angle=50.0', f'{PAIRS}=(("student.stage2","teacher.stage3"),)'],
     ('rkd_angle compares vector features', '(3, 3, 32)', '(4, 4, 64)')),
    ('at_on_vectors',
     [f'{WEIGHTS}.at=1.0', f'{PAIRS}=(("student.prelogits","teacher.prelogits"),)'],
     ('at compares spatial features', '(288,)', '(64,)')),
    ('loss_weight_neg', [f'{WEIGHTS}.dkd=-1.0'], ('loss_weights.dkd=-1.0',)),
    ('loss_weights_all_0', [f'{WEIGHTS}.kl=0.0'], ('every weight is 0',)),
    ('loss_weights_without_teacher', ['--config.stages.baseline.loss_weights.dkd=1.0'],
     ('stages.baseline.loss_weights.dkd', 'without teachers')),
    ('dkd_temperature_0', ['--config.stages.student.loss_options.dkd_temperature=0.0'],
     ('loss_options.dkd_temperature=0.0',)),
]


@pytest.mark.parametrize('name, args, fragments', MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_input_is_one_line_before_any_work(tmp_path, monkeypatch, name, args,
                                                     fragments):
  """Every malformed input: exit 2, exactly one `bigkd: error:` line, and nothing under
  tmp_path (the workdir included) created or changed."""
  args = args(tmp_path, monkeypatch) if callable(args) else args
  args = args if args[:1] == ['--config'] else [*DIGITS, *args]
  args = args if '--workdir' in args else [*args, '--workdir', str(tmp_path / 'w')]
  before = snapshot(tmp_path)
  result = run_cli(args)
  assert_bad_config(result, *fragments)
  assert snapshot(tmp_path) == before
