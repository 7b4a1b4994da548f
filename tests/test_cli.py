"""Bad configs stop before any work: exit code 2 and one line on stderr naming the problem."""
import os

import jax
import numpy as np
import pytest

from bigkd.config import ConfigError
from bigkd.plan import check_config
from conftest import run_cli, run_main, tiny_config

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
