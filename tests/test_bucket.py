"""Workdirs, teachers and reports in a bucket, against a real GCS-API server on localhost
(fake-gcs-server; support.GcsEmulator): two processes with no shared workdir train a stage whose
teacher is in the bucket, are killed after a checkpoint, resume from the bucket, fall back from a
damaged newest checkpoint and end exactly where the 1-device reference run ends; the notebook API
and the report read the run there. A host that cannot see the bucket stops every process before
anything is written. TensorBoard events are off in these runs: TensorFlow's GCS file system has
its endpoint compiled in (https://www.googleapis.com/storage/v1/) and cannot reach an emulator.
"""
import ast
import os
import signal

import fsspec
import pytest

from bigkd import paths
from support import REPO, GcsEmulator, assert_same_run, finish, free_port, read_metrics, \
    run_main, start_runs, write_jpeg_folder

BUCKET = 'gs://bigkd-test'


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """The emulator, with this process's storage clients pointed at it (for the module)."""
  server = GcsEmulator(str(tmp_path_factory.mktemp('gcs')))
  with pytest.MonkeyPatch.context() as mp:
    for key, value in server.env.items():
      mp.setenv(key, value)
    mp.setitem(fsspec.config.conf, 'gcs', {'token': 'anon'})  # (read from the env at import)
    yield server
  server.stop()


def test_files_are_written_whole_and_moved_in_a_bucket_as_on_disk(gcs, tmp_path):
  for root in (paths.Path(f'{BUCKET}/files'), paths.Path(tmp_path)):
    paths.write_json(root / 'a' / 'x.json', {'a': 1})
    paths.append_text(root / 'log.jsonl', 'one\n')
    paths.append_text(root / 'log.jsonl', 'two\n')  # gcsfs's own 'a' mode overwrites
    paths.write_text(root / 'ckpt' / '4' / 'data', 'arrays')
    paths.write_text(root / 'aside' / '4.txt', 'why')
    paths.move(root / 'ckpt' / '4', root / 'aside' / '4')
    assert paths.read_json(root / 'a' / 'x.json') == {'a': 1}, root
    assert (root / 'log.jsonl').read_text() == 'one\ntwo\n', root
    assert (root / 'aside' / '4' / 'data').read_text() == 'arrays', root
    assert not (root / 'ckpt' / '4').exists(), root
    assert not list((root / 'a').glob('*.tmp')), root


def test_metrics_log_resumes_in_a_bucket(gcs):
  from bigkd.stages import JsonlWriter
  path = paths.Path(f'{BUCKET}/metrics/metrics.jsonl')
  writer = JsonlWriter(path)
  for step in (3, 6, 9):
    writer.write_scalars(step, {'loss': float(step)})
    writer.flush()
    assert len(path.read_text().splitlines()) == step // 3  # visible at once, not at close
  writer.close()
  resumed = JsonlWriter(path, resume_step=6)  # lines after the checkpoint are dropped
  resumed.write_scalars(9, {'loss': 0.5})
  resumed.close()
  assert [(m['step'], m['loss']) for m in read_metrics(path.parent)] == [(3, 3), (6, 6), (9, .5)]


def test_prepared_records_are_read_from_a_bucket(gcs, tmp_path):
  from bigkd.data.records import RecordSplit
  root = write_jpeg_folder(str(tmp_path / 'jpegs'), per_class={'train': 3, 'val': 1})
  result = run_main('bigkd.prepare', ['--folder', root, '--out', str(tmp_path / 'prepared'),
                                      '--shards', '2', '--workers', '1'])
  assert result.returncode == 0, result.stderr
  fsspec.filesystem('gcs').put(str(tmp_path / 'prepared'), f'{BUCKET}/prepared', recursive=True)
  local, remote = (RecordSplit(d, 'train') for d in (str(tmp_path / 'prepared'),
                                                       f'{BUCKET}/prepared'))
  assert len(remote) == len(local) == 9 and remote.class_names == local.class_names
  assert [remote[i] for i in range(len(local))] == [local[i] for i in range(len(local))]


# Modules that read or write workdirs, stage folders, teacher sources or prepared data.
PATH_MODULES = ('checkpoint.py', 'workdir.py', 'stages.py', 'inspect.py', 'report.py', 'plan.py',
                'models/bit.py', 'data/records.py')


def local_only_calls(source: str) -> list[str]:
  """Calls of the builtin `open`, of `os.path.*` and of `shutil.*` in `source`."""
  found = []
  for node in ast.walk(ast.parse(source)):
    if not isinstance(node, ast.Call):
      continue
    name = ast.unparse(node.func)
    if name == 'open' or name.startswith(('os.path.', 'shutil.')):
      found.append(f'line {node.lineno}: {name}')
  return found


def test_no_local_only_file_calls_on_run_paths():
  assert local_only_calls('with open(p) as f: os.path.join(a, b); shutil.move(a, b)') == [
      'line 1: open', 'line 1: os.path.join', 'line 1: shutil.move']
  for name in PATH_MODULES:
    with open(os.path.join(REPO, 'bigkd', name)) as f:
      assert local_only_calls(f.read()) == [], f'bigkd/{name}: use bigkd.paths'


def test_a_bucket_that_does_not_exist_is_one_line(gcs):
  result = run_main('bigkd.train', ['--config', 'configs/digits.py:fast',
                                    '--workdir', 'gs://no-such-bucket/run'])
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      'bigkd: error: workdir gs://no-such-bucket/run: bucket gs://no-such-bucket does not exist '
      'or is not visible with these credentials'], result.stderr


KILL_AFTER_CHECKPOINT = """
import os, signal
from jax.experimental import multihost_utils
from bigkd import checkpoint
save = checkpoint.save
def save_then_die(mngr, step, state):  # a hard kill right after checkpoint {step} is committed
  save(mngr, step, state)
  if step == {step}:
    mngr.wait_until_finished()
    multihost_utils.sync_global_devices('committed')
    os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save_then_die
"""


def two_processes(teacher, workdir, overrides, env, prelude=''):
  """The two processes (2 CPU devices each) of one run of support.distill_config."""
  address = f'127.0.0.1:{free_port()}'
  return [start_runs(teacher, [(workdir, overrides)], 2, dict(
      coordinator_address=address, num_processes=2, process_id=i), env[i], prelude)
          for i in range(2)]


@pytest.mark.integration
def test_two_processes_train_resume_and_fall_back_in_a_bucket(gcs, reference_run):
  teacher, workdir = f'{BUCKET}/teacher', f'{BUCKET}/run'
  fsspec.filesystem('gcs').put(reference_run.teacher, teacher, recursive=True)
  overrides = {'checkpoint_every': 2, 'tensorboard': False}
  procs = two_processes(teacher, workdir, overrides, [gcs.env] * 2,
                        KILL_AFTER_CHECKPOINT.replace('{step}', '4'))
  for p in procs:
    p.communicate(timeout=600)
  # Killed (a process that outlives the other by a moment may be aborted by jax.distributed).
  codes = [p.returncode for p in procs]
  assert set(codes) <= {-signal.SIGKILL, -signal.SIGABRT} and -signal.SIGKILL in codes, codes
  stage = paths.Path(workdir) / 'student'
  checkpoints = stage / 'checkpoints'
  assert sorted(p.name for p in checkpoints.iterdir()) == ['2', '4']
  assert not (stage / 'summary.json').exists()
  (checkpoints / '4' / 'params' / '_METADATA').write_text('{"tree_metadata": ')  # damaged

  out0, out1 = (finish(p) for p in two_processes(teacher, workdir, overrides, [gcs.env] * 2))
  assert 'resuming from step 2' in out0 and 'resuming from step 2' in out1
  assert (stage / 'damaged_checkpoints' / '4' / 'params').is_dir()
  assert 'JSONDecodeError' in (stage / 'damaged_checkpoints' / '4.txt').read_text()  # why
  assert_same_run(reference_run.stage_dir(), str(stage), 'in a bucket, killed and resumed')
  assert [m['step'] for m in read_metrics(stage)] == [3, 6]

  from bigkd import inspect
  run = inspect.load_run(workdir)
  assert run.finished and run.stages == ['student'] and run.checkpoints['student'] == [4, 6]
  assert list(run.metrics['student']['step']) == [3, 6]
  report = run_main('bigkd.report', [workdir])  # bigkd-report
  assert report.returncode == 0 and report.stdout.strip() == f'{workdir}/report.html', report
  assert '<h1>bigkd run gs://bigkd-test/run</h1>' in paths.Path(workdir, 'report.html').read_text()


@pytest.mark.integration
def test_a_host_that_cannot_see_the_bucket_stops_every_host_before_any_write(
    gcs, reference_run, tmp_path):
  elsewhere = GcsEmulator(str(tmp_path / 'elsewhere'), bucket=None)  # the bucket is not there
  try:
    procs = two_processes(reference_run.teacher, f'{BUCKET}/refused', {'tensorboard': False},
                          [gcs.env, elsewhere.env])
    printed = [p.communicate(timeout=600) for p in procs]
  finally:
    elsewhere.stop()
  assert [p.returncode for p in procs] == [1, 1], printed  # (the runner raises; the CLI: 2)
  assert 'another process refused the run' in printed[0][1], printed[0][1][-2000:]
  assert 'bucket gs://bigkd-test does not exist' in printed[1][1], printed[1][1][-2000:]
  assert not paths.Path(f'{BUCKET}/refused').exists()  # no config.json, nothing at all
