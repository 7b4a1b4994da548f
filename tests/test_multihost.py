"""Two processes on localhost (2 CPU devices each, jax.distributed + gloo) train exactly like the
1-device reference run; they write metrics and summaries once, and their sharded checkpoint
(each process writing its own shards) restores in a single 1-device process."""
import os
import socket

from conftest import assert_same_run, finish, read_metrics, start_runs


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_device(tmp_path, reference_run):
  """Resident images split by rows over the 4 devices of both processes (the batch is gathered
  across processes) and a 1x4 mesh: every large parameter is split across the processes.
  (Streamed data takes each process's rows of the global batch: the same path as one process.)"""
  overrides = {'data.shard_resident': True, 'mesh.data': 1, 'mesh.fsdp': 4}
  workdir = str(tmp_path / 'two')
  address = f'127.0.0.1:{free_port()}'
  procs = [start_runs(reference_run.teacher, [(workdir, overrides)], 2,
                      dict(coordinator_address=address, num_processes=2, process_id=i))
           for i in range(2)]
  out0, out1 = (finish(p) for p in procs)
  stage_dir = os.path.join(workdir, 'student')
  assert_same_run(reference_run.stage_dir(), stage_dir, 'two processes')  # restored in 1 process
  assert [m['step'] for m in read_metrics(stage_dir)] == [3, 6]  # logged once, by process 0
  assert 'test acc' in out0 and 'test acc' not in out1  # the table: process 0 only
  assert 'over 2 process(es)' in out0
  written_by = os.listdir(os.path.join(stage_dir, 'checkpoints', '6', 'params'))
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(written_by)
