"""Two processes on localhost (2 CPU devices each, jax.distributed + gloo) train exactly like one
process with 4 devices; they write metrics and summaries once, and their sharded checkpoint
(each process writing its own shards) restores in a single 1-device process."""
import json
import os
import socket
import subprocess
import sys

from conftest import REPO
from test_sharding import FAST_XLA, MIN_FSDP, assert_trees_close, final_params, random_stage

STEPS = 4


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def train(workdir, devices, overrides, *distributed):
  """Starts `python -m bigkd.train` on a small distillation run with `devices` CPU devices."""
  args = ['--config', 'configs/digits.py:fast', '--workdir', workdir,
          '--config.stage_order=student', '--config.data.base_size=12',
          '--config.stages.student.model=cnn_tiny', '--config.stages.student.resolution=8',
          f'--config.stages.student.steps={STEPS}', '--config.batch_size=32',
          '--config.eval_batch_size=64', f'--config.mesh.min_fsdp_size={MIN_FSDP}',
          *overrides, *distributed]
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_XLA}')
  return subprocess.Popen([sys.executable, '-m', 'bigkd.train', *args], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outputs(procs, timeout=600):
  results = [p.communicate(timeout=timeout) for p in procs]
  for p, (_, err) in zip(procs, results):
    assert p.returncode == 0, err[-3000:]
  return [out for out, _ in results]


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
  """Resident images split by rows over the 4 devices of both processes (the batch is gathered
  across processes) and a 1x4 mesh: every large parameter is split across the processes.
  (Streamed data, data.device_resident=False, takes the same path as in a single process:
  each process gathers its rows of the global batch; checked by hand, not here, to keep the
  file fast.)"""
  teacher = random_stage(str(tmp_path / 'teacher'))
  overrides = [f'--config.stages.student.teachers.teacher.source={teacher}',
               '--config.data.shard_resident=True', '--config.mesh.data=1', '--config.mesh.fsdp=4']
  port = free_port()
  two = str(tmp_path / 'two')
  procs = [train(two, 2, overrides, f'--coordinator_address=127.0.0.1:{port}',
                 '--num_processes=2', f'--process_id={i}') for i in range(2)]
  procs.append(train(str(tmp_path / 'one'), 4, overrides))
  out0, out1, _ = outputs(procs)

  assert_trees_close(final_params(str(tmp_path / 'one' / 'student')),
                     final_params(os.path.join(two, 'student')), 'two processes')
  with open(os.path.join(two, 'student', 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [STEPS]  # logged once, by process 0
  assert os.path.exists(os.path.join(two, 'summary.json'))
  assert 'test acc' in out0 and 'test acc' not in out1  # the table: process 0 only
  assert 'over 2 process(es)' in out0
  written_by = os.listdir(os.path.join(two, 'student', 'checkpoints', str(STEPS), 'params'))
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(written_by)
