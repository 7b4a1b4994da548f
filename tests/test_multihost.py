"""Two processes on localhost (2 CPU devices each, jax.distributed + gloo) train exactly like one
process: with resident images split by rows across both processes and an fsdp mesh (against the
1-device reference run), and with JPEGs streamed from a folder, each process reading and decoding
only its half of every batch (against 1 process with 1 device). They write metrics and summaries
once, and their sharded checkpoint (each process writing its own shards) restores in a single
1-device process."""
import os

import pytest

from support import DISTILL_STEPS, assert_same_run, finish, free_port, read_metrics, \
    start_runs, streamed_overrides


RESIDENT = {'data.shard_resident': True, 'mesh.data': 1, 'mesh.fsdp': 4}


@pytest.mark.integration
def test_two_processes_equal_one(reference_run, tmp_path):
  # Two processes (2 devices each) run the resident and the streamed config of the reference runs.
  two_resident, two_streamed = f'{tmp_path}/two_resident', f'{tmp_path}/two_streamed'
  runs = [(two_resident, RESIDENT), (two_streamed, streamed_overrides(reference_run.jpegs))]
  address = f'127.0.0.1:{free_port()}'
  procs = [start_runs(reference_run.teacher, runs, 2, dict(
      coordinator_address=address, num_processes=2, process_id=i)) for i in range(2)]
  try:
    out0, out1 = (finish(p) for p in procs)
  finally:
    for p in procs:  # the other one, when one failed
      p.kill()
  out_one = reference_run.stdout  # both 1-device runs
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
