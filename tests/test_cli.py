"""Bad configs stop before any work: exit code 2 and one line on stderr naming the problem."""
import os

import numpy as np
import pytest

from conftest import run_cli

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


def test_batch_size_not_divisible_by_devices(tmp_path):
  result = run_cli([*DIGITS, '--workdir', str(tmp_path), '--config.batch_size=12'],
                   env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert_bad_config(result, 'batch size 12', '8 devices')


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
  from bigkd.models import bit, get_model
  import jax
  import jax.numpy as jnp
  model = get_model('bit_tiny', num_classes=5)  # digits have 10 classes
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  bit.save_npz(jax.tree.map(np.asarray, params), str(tmp_path / 'teacher.npz'))
  result = run_cli([*DIGITS, '--workdir', str(tmp_path / 'w'), '--config.stage_order=student',
                    f'--config.stages.student.teachers.teacher.source={tmp_path}/teacher.npz',
                    '--config.stages.student.teachers.teacher.model=bit_tiny',
                    '--config.stages.student.teachers.teacher.resolution=16'])
  assert_bad_config(result, 'teacher.npz')
