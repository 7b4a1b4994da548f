"""Two processes on localhost (2 CPU devices each, jax.distributed + gloo) train exactly like one
process: with resident images split by rows across both processes and an fsdp mesh (against the
1-device reference run), and with JPEGs streamed from a folder, each process reading and decoding
only its half of every batch (against 1 process with 1 device). They write metrics and summaries
once, and their sharded checkpoint (each process writing its own shards) restores in a single
1-device process."""
import os
import socket

from conftest import (DISTILL_STEPS, Job, assert_same_run, early_job, read_metrics, start_runs,
                      started, streamed_overrides)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


RESIDENT = {'data.shard_resident': True, 'mesh.data': 1, 'mesh.fsdp': 4}


def start_multihost_runs(folder):
  """Two processes (2 devices each) run the resident and the streamed config of the reference
  runs."""
  reference = started('reference_run')
  runs = [(f'{folder}/two_resident', RESIDENT),
          (f'{folder}/two_streamed', streamed_overrides(reference.jpegs))]
  address = f'127.0.0.1:{free_port()}'
  return Job(folder, *(start_runs(reference.teacher, runs, 2, dict(
      coordinator_address=address, num_processes=2, process_id=i)) for i in range(2)))


multihost_runs = early_job('multihost_runs', start_multihost_runs)


def test_two_processes_equal_one(reference_run, multihost_runs):
  out0, out1 = multihost_runs.outputs()
  (out_one,) = reference_run.outputs()  # both 1-device runs
  two_resident, two_streamed = (f'{multihost_runs.folder}/{name}'
                                for name in ('two_resident', 'two_streamed'))
  stage_dir = os.path.join(two_resident, 'student')
  assert_same_run(reference_run.stage_dir(), stage_dir, 'two processes')  # restored in 1 process
  assert [m['step'] for m in read_metrics(stage_dir)] == [3, 6]  # logged once, by process 0
  assert 'test acc' in out0 and 'test acc' not in out1  # the table: process 0 only
  assert 'over 2 process(es)' in out0
  written_by = os.listdir(os.path.join(stage_dir, 'checkpoints', '6', 'params'))
  assert {'ocdbt.process_0', 'ocdbt.process_1'} <= set(written_by)

  assert_same_run(reference_run.stage_dir(streamed=True), f'{two_streamed}/student', 'streamed')
  half = DISTILL_STEPS * 8 // 2
  assert f'process 0 read and decoded {half} training images' in out0, out0
  assert f'process 1 read and decoded {half} training images' in out1, out1
  assert f'process 0 read and decoded {2 * half} training images' in out_one, out_one
