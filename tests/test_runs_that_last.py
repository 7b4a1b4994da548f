"""A run that survives preemption, bad numbers and damaged checkpoints.

SIGTERM saves where the run stands and exits 75, and re-running resumes bitwise; a damaged newest
checkpoint is named in one warning and the previous one used; NaN/Inf stops a run (exit 3)
without saving the bad state; a teacher with a NaN weight is refused before training (exit 2).
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from support import REPO, final_params, read_metrics, run_cli, signal_when, tiny_config

# cnn_small at 12 px on the digits (fast compile); one stage, 30 steps, checkpoints at 10, 20, 30.
ARGS = ['--config', 'configs/digits.py:fast', '--config.stage_order=teacher',
        '--config.stages.teacher.model=cnn_small', '--config.stages.teacher.resolution=12',
        '--config.batch_size=32', '--config.eval_batch_size=64', '--config.log_every=10',
        '--config.stages.teacher.steps=30', '--config.checkpoint_every=10']
WARNING = re.compile(r'^bigkd: warning: checkpoint 30 of stage teacher is unreadable \(.+\); '
                     r'falling back to step 20$')


def stage_params(stage_dir):
  return final_params(str(stage_dir), 'cnn_small', 12)


def assert_same_result(reference_workdir, workdir):
  """Bitwise: the same final parameters and the same summary."""
  for a, b in zip(jax.tree.leaves(stage_params(reference_workdir / 'teacher')),
                  jax.tree.leaves(stage_params(workdir / 'teacher'))):
    np.testing.assert_array_equal(a, b)
  with open(reference_workdir / 'summary.json') as f1, open(workdir / 'summary.json') as f2:
    assert json.load(f1) == json.load(f2)


def bigkd_lines(text):
  return [line for line in text.splitlines() if line.startswith('bigkd:')]


# --- Preemption ------------------------------------------------------------------------------

@pytest.mark.integration
def test_sigterm_saves_at_the_current_step_and_a_rerun_resumes_bitwise(tmp_path):
  args = [*ARGS, '--config.stages.teacher.steps=200', '--config.checkpoint_every=1000']
  workdir = tmp_path / 'preempted'
  proc = subprocess.Popen([sys.executable, '-m', 'bigkd.train', *args, '--workdir', str(workdir)],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = workdir / 'teacher' / 'metrics.jsonl'
  stopper = signal_when(proc, lambda: metrics.exists() and bool(metrics.read_text().strip()),
                        signal.SIGTERM)
  straight = run_cli([*args, '--workdir', str(tmp_path / 'straight')])  # meanwhile
  assert straight.returncode == 0, straight.stderr[-3000:]
  stopper.join()
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 75, err[-3000:]
  assert time.time() - stopper.sent_at < 30
  assert bigkd_lines(err) == [l for l in err.splitlines() if 'preempted' in l], err[-2000:]
  assert not (workdir / 'teacher' / 'summary.json').exists()
  steps = [int(d) for d in os.listdir(workdir / 'teacher' / 'checkpoints') if d.isdigit()]
  assert len(steps) == 1 and 10 <= steps[0] < 200, steps  # where it stood, not a multiple of 1000
  stopped = steps[0]
  assert f'at step {stopped}' in err
  assert read_metrics(workdir / 'teacher')[-1]['step'] <= stopped  # the log was flushed

  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  resumed = run_cli([*args, '--workdir', str(workdir)])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
  assert f'resuming from step {stopped}' in resumed.stdout
  assert_same_result(tmp_path / 'straight', workdir)
  a, b = read_metrics(workdir / 'teacher'), read_metrics(tmp_path / 'straight' / 'teacher')
  assert [m['step'] for m in a] == [m['step'] for m in b]
  assert [m['loss'] for m in a] == [m['loss'] for m in b]


# --- Damaged checkpoints ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def straight_run(tmp_path_factory):
  """The uninterrupted 30-step run (checkpoints 20 and 30 kept), every damage test's reference."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  result = run_cli([*ARGS, '--workdir', str(workdir)])
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def unfinished_copy(straight_run, workdir):
  """The straight run as if it had been stopped after writing its last checkpoint."""
  shutil.copytree(straight_run, workdir)
  os.remove(workdir / 'summary.json')
  os.remove(workdir / 'teacher' / 'summary.json')
  return workdir / 'teacher' / 'checkpoints'


def overwrite(path, data: bytes, at: int):
  with open(path, 'r+b') as f:
    f.seek(at)
    f.write(data)


def damage(step_dir, how):
  params = os.path.join(step_dir, 'params')
  data_files = sorted(glob.glob(os.path.join(params, 'ocdbt.process_*', 'd', '*')),
                      key=os.path.getsize)
  if how == 'garbled_item_metadata':
    with open(os.path.join(params, '_METADATA'), 'w') as f:
      f.write('{"tree_metadata": ')
  elif how == 'empty_item_metadata':
    open(os.path.join(params, '_METADATA'), 'w').close()
  elif how == 'truncated_data':
    for path in data_files:
      os.truncate(path, os.path.getsize(path) // 2)
  elif how == 'missing_params':
    shutil.rmtree(params)
  elif how == 'random_bytes':  # the data file holding the largest arrays
    overwrite(data_files[-1], np.random.default_rng(0).bytes(64), os.path.getsize(data_files[-1]) // 3)
  else:
    raise ValueError(how)


@pytest.mark.parametrize('how', ['garbled_item_metadata', 'empty_item_metadata',
                                 'truncated_data', 'missing_params', 'random_bytes'])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(straight_run, tmp_path, how):
  checkpoints = unfinished_copy(straight_run, tmp_path / 'run')
  damage(checkpoints / '30', how)
  leftover = checkpoints / '40.orbax-checkpoint-tmp-1234567'  # a save cut short by a kill
  leftover.mkdir()
  result = run_cli([*ARGS, '--workdir', str(tmp_path / 'run')])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = bigkd_lines(result.stderr)
  assert len(lines) == 1 and WARNING.match(lines[0]), lines
  assert 'resuming from step 20' in result.stdout
  assert (checkpoints.parent / 'damaged_checkpoints' / '30').is_dir()  # kept for a look
  assert not leftover.exists()
  assert_same_result(straight_run, tmp_path / 'run')


@pytest.mark.parametrize('how', ['empty', 'garbled'])
def test_damaged_step_metadata_never_changes_the_result(straight_run, tmp_path, how):
  """Orbax does not need `_CHECKPOINT_METADATA` to restore: the checksummed data is used as it
  is (or, if orbax ever refuses it, the previous step with a warning)."""
  checkpoints = unfinished_copy(straight_run, tmp_path / 'run')
  with open(checkpoints / '30' / '_CHECKPOINT_METADATA', 'w') as f:
    f.write('' if how == 'empty' else '{"init_timestamp_nsecs": [')
  result = run_cli([*ARGS, '--workdir', str(tmp_path / 'run')])
  assert result.returncode == 0, result.stderr[-3000:]
  lines = bigkd_lines(result.stderr)
  assert lines == [] or (len(lines) == 1 and WARNING.match(lines[0])), lines
  assert_same_result(straight_run, tmp_path / 'run')


def test_all_checkpoints_damaged_is_one_error_line(straight_run, tmp_path):
  checkpoints = unfinished_copy(straight_run, tmp_path / 'run')
  for step in ('20', '30'):
    damage(checkpoints / step, 'missing_params')
  result = run_cli([*ARGS, '--workdir', str(tmp_path / 'run')])
  assert result.returncode == 2
  errors = [l for l in result.stderr.splitlines() if l.startswith('bigkd: error:')]
  assert len(errors) == 1 and 'no readable checkpoint' in errors[0], result.stderr[-2000:]
  assert (checkpoints / '20').is_dir() and (checkpoints / '30').is_dir()  # nothing moved
  assert not (tmp_path / 'run' / 'teacher' / 'summary.json').exists()


# --- Non-finite numbers ----------------------------------------------------------------------

def test_absurd_learning_rate_stops_without_saving_the_bad_state(tmp_path):
  # Logged only at the end: the checks before each save are what keep bad states out.
  result = run_cli([*ARGS, '--config.optimizer.lr=1e6', '--config.optimizer.clip_norm=0',
                    '--config.log_every=30', '--config.checkpoint_every=5', '--workdir',
                    str(tmp_path)])
  assert result.returncode == 3, result.stderr[-3000:]
  lines = bigkd_lines(result.stderr)
  assert len(lines) == 1, lines
  match = re.fullmatch(r'bigkd: error: stage teacher: non-finite loss/gradients at step (\d+) '
                       r'\(last good checkpoint: step (\d+|none)\)', lines[0])
  assert match, lines
  bad = int(match[1])
  saved = sorted(int(d) for d in os.listdir(tmp_path / 'teacher' / 'checkpoints') if d.isdigit())
  assert all(s < bad for s in saved), (saved, bad)
  assert match[2] == (str(saved[-1]) if saved else 'none')
  assert not (tmp_path / 'teacher' / 'summary.json').exists()
  assert not (tmp_path / 'summary.json').exists()


def test_teacher_with_a_nan_weight_is_refused_before_training(tmp_path):
  from bigkd.models import bit, param_shapes
  params = jax.tree.map(lambda s: np.zeros(s.shape, np.float32), param_shapes('bit_tiny', 10, 16))
  leaf = jax.tree.leaves(params)[0]
  leaf.reshape(-1)[0] = np.nan
  bit.save_npz(params, str(tmp_path / 'teacher.npz'))
  result = run_cli(['--config', 'configs/digits.py:fast', '--config.stage_order=student',
                    f'--config.stages.student.teachers.teacher.source={tmp_path}/teacher.npz',
                    '--config.stages.student.teachers.teacher.model=bit_tiny',
                    '--config.stages.student.teachers.teacher.resolution=16',
                    '--workdir', str(tmp_path / 'run')])
  assert result.returncode == 2, result.stderr[-3000:]
  lines = bigkd_lines(result.stderr)
  assert len(lines) == 1 and 'teachers.teacher' in lines[0] and 'NaN' in lines[0], lines
  assert not (tmp_path / 'run' / 'student' / 'metrics.jsonl').exists()


# --- Skipping non-finite updates (optimizer.skip_nonfinite_updates) --------------------------

@pytest.mark.parametrize('skip', [True, False])
def test_nonfinite_updates_are_skipped_and_counted_or_flagged(tmp_path, skip):
  from bigkd.build import build_stage, setup
  config = tiny_config(steps=4)
  config.optimizer.skip_nonfinite_updates = skip
  mesh, data, plans = setup(config, str(tmp_path))
  stage = build_stage(plans[0], data, mesh)
  step = jax.jit(stage.raw_step)
  images, sizes, labels = data.train.rows(np.arange(32))
  images = images.astype(np.float32)
  poisoned = images.copy()
  poisoned[3, 0, 0, 0] = np.nan

  state = stage.state
  before = jax.device_get(state.params)
  state, metrics = step(state, stage.teacher_params, poisoned, sizes, labels)
  if not skip:
    assert int(state.first_nonfinite_step) == 1
    assert 'skipped_updates' not in metrics
    return
  assert int(state.first_nonfinite_step) == 0 and int(metrics['skipped_updates']) == 1
  jax.tree.map(np.testing.assert_array_equal, before, jax.device_get(state.params))
  state, metrics = step(state, stage.teacher_params, images, sizes, labels)
  assert int(state.first_nonfinite_step) == 0 and int(metrics['skipped_updates']) == 1
  assert not np.array_equal(jax.tree.leaves(before)[0], jax.tree.leaves(state.params)[0])
