"""A workdir remembers the config it was started with: a re-run that would change the result is
refused (exit 2, one line listing the fields, nothing rewritten); safe changes (logging,
checkpointing, evaluation batch, data location, device layout) and fields listed in
config.allowed_changes are accepted and recorded in config_changes.jsonl."""
import json
import os
import shutil

import pytest

from support import run_cli
from test_cli import assert_bad_config, snapshot

TINY = ['--config', 'configs/digits.py:fast', '--config.stage_order=teacher,student',
        '--config.data.base_size=12', '--config.batch_size=32', '--config.eval_batch_size=64',
        '--config.log_every=5', '--config.checkpoint_every=5', '--config.optimizer.warmup_steps=2',
        '--config.log_views=False',
        *[f'--config.stages.{s}.{k}={v}' for s in ('teacher', 'student')
          for k, v in (('model', 'cnn_tiny'), ('resolution', 8), ('steps', 10))]]


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished two-stage workdir (teacher -> student, 10 steps each, checkpoints at 5 and 10)."""
  workdir = str(tmp_path_factory.mktemp('finished') / 'w')
  result = run_cli([*TINY, '--workdir', workdir])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture
def interrupted(finished, tmp_path):
  """The finished workdir as a run killed between the student's checkpoints 5 and 10 leaves it:
  no student summary, no run summary, the last checkpoint at step 5."""
  workdir = str(tmp_path / 'w')
  shutil.copytree(finished, workdir)
  for path in ('summary.json', 'student/summary.json'):
    os.remove(os.path.join(workdir, path))
  shutil.rmtree(os.path.join(workdir, 'student', 'checkpoints', '10'))
  return workdir


def read(path):
  with open(path, 'rb') as f:
    return f.read()


@pytest.mark.parametrize('changes, fragments', [
    (['--config.optimizer.lr=0.01'], ('optimizer.lr 0.003 -> 0.01',)),
    (['--config.stages.student.model=cnn_small'],
     ('stages.student.model cnn_tiny -> cnn_small',)),
    (['--config.stages.student.steps=20'], ('stages.student.steps 10 -> 20',)),
    (['--config.optimizer.lr=0.01', '--config.stages.teacher.resolution=12'],
     ('optimizer.lr 0.003 -> 0.01', 'stages.teacher.resolution 8 -> 12',
      '--config.allowed_changes=optimizer.lr,stages.teacher.resolution')),
])
def test_finished_workdir_refuses_another_config(finished, changes, fragments):
  before = snapshot(finished)
  result = run_cli([*TINY, *changes, '--workdir', finished])
  assert_bad_config(result, f'workdir {finished} was started with another config', *fragments)
  assert snapshot(finished) == before  # config.json, stage.json and the rest: same bytes


def test_interrupted_workdir_refuses_another_lr(interrupted):
  before = snapshot(interrupted)
  result = run_cli([*TINY, '--config.optimizer.lr=0.01', '--workdir', interrupted])
  assert_bad_config(result, 'optimizer.lr 0.003 -> 0.01')
  assert 'student' not in result.stdout  # nothing ran
  assert snapshot(interrupted) == before


def test_safe_changes_resume_and_are_recorded(interrupted):
  config, stage = (read(os.path.join(interrupted, p))
                   for p in ('config.json', 'student/stage.json'))
  result = run_cli([*TINY, '--config.log_every=2', '--config.log_views=True',
                    '--config.eval_every=4', '--config.keep_checkpoints=3',
                    '--config.data.reader_threads=2',
                    '--workdir', interrupted])
  assert result.returncode == 0, result.stderr[-3000:]
  assert '[student] resuming from step 5' in result.stdout
  assert '[teacher] already finished' in result.stdout
  assert os.path.isfile(os.path.join(interrupted, 'summary.json'))
  assert read(os.path.join(interrupted, 'config.json')) == config  # written once, by the start
  assert read(os.path.join(interrupted, 'student/stage.json')) == stage
  with open(os.path.join(interrupted, 'config_changes.jsonl')) as f:
    records = [json.loads(line) for line in f]
  assert len(records) == 1 and records[0]['changes']['log_every'] == [5, 2]
  assert set(records[0]['changes']) == {'log_every', 'log_views', 'eval_every',
                                        'keep_checkpoints', 'data.reader_threads'}


def test_allowed_changes_let_a_listed_field_change(interrupted):
  config = read(os.path.join(interrupted, 'config.json'))
  result = run_cli([*TINY, '--config.optimizer.lr=0.01', '--workdir', interrupted,
                    '--config.allowed_changes=optimizer.lr'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert '[student] resuming from step 5' in result.stdout
  assert read(os.path.join(interrupted, 'config.json')) == config
  with open(os.path.join(interrupted, 'config_changes.jsonl')) as f:
    changes = json.loads(f.readline())['changes']
  assert changes == {'optimizer.lr': [0.003, 0.01], 'allowed_changes': ['', 'optimizer.lr']}


def test_a_finished_stage_is_not_extended_even_when_allowed(finished):
  before = snapshot(finished)
  result = run_cli([*TINY, '--config.stages.teacher.steps=20', '--workdir', finished,
                    '--config.allowed_changes=stages.teacher.steps'])
  assert_bad_config(result, 'stages.teacher finished at 10 steps', 'use a new workdir')
  assert snapshot(finished) == before


def test_a_started_stage_keeps_its_model_even_when_allowed(interrupted):
  before = snapshot(interrupted)
  result = run_cli([*TINY, '--config.stages.student.model=cnn_small', '--workdir', interrupted,
                    '--config.allowed_changes=stages.student.model'])
  assert_bad_config(result, 'stages.student was started', 'model cnn_tiny -> cnn_small')
  assert snapshot(interrupted) == before


def test_a_new_workdir_records_its_config(finished):
  """The config.json of a run is the resolved config it ran with (here: the finished one)."""
  with open(os.path.join(finished, 'config.json')) as f:
    stored = json.load(f)
  assert stored['optimizer']['lr'] == 0.003 and stored['stages']['student']['steps'] == 10
  assert stored['allowed_changes'] == ''
  assert not os.path.exists(os.path.join(finished, 'config_changes.jsonl'))


def test_a_plan_for_these_devices_that_does_not_fit_is_one_warning(finished, tmp_path):
  """bigkd-plan --out WORKDIR/plan.json: a run on the devices it was made for (kind and count)
  warns at start in one line when a stage's peak did not fit; a plan for other devices is quiet."""
  import jax
  workdir = str(tmp_path / 'w')
  shutil.copytree(finished, workdir)  # finished: the re-run skips its stages
  kind, count = jax.devices()[0].device_kind, jax.device_count()
  stages = {'teacher': {'fits': True}, 'student': {'fits': False}}
  for plan_kind, warned in ((kind, True), ('TPU v5 lite', False)):
    with open(os.path.join(workdir, 'plan.json'), 'w') as f:
      json.dump({'device_kind': plan_kind, 'devices': count, 'stages': stages}, f)
    result = run_cli([*TINY, '--workdir', workdir])
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [l for l in result.stderr.splitlines() if l.startswith('bigkd: warning:')]
    assert warnings == ([f'bigkd: warning: plan.json in the workdir (made for {count} x {kind}, '
                         'these devices) says stage(s) student do not fit in device memory']
                        if warned else []), result.stderr
