"""A killed run resumes from its last checkpoint and ends where an uninterrupted run ends.
(That the device count does not change the result: test_sharding.py and test_multihost.py.)"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from support import REPO, read_metrics, run_cli, signal_when

ARGS = ['--config', 'configs/digits.py:fast', '--config.stage_order=teacher',
        '--config.stages.teacher.model=cnn_small', '--config.stages.teacher.resolution=12',
        '--config.batch_size=32', '--config.eval_batch_size=64', '--config.log_every=20',
        '--config.stages.teacher.steps=240', '--config.checkpoint_every=40']


@pytest.mark.integration
@pytest.mark.parametrize('data', ['resident', 'streamed'])
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, data, request):
  args = ARGS
  if data == 'streamed':  # JPEGs of mixed sizes, each step read and decoded from the folder
    root = request.getfixturevalue('jpeg_folder')
    args = [*ARGS, '--config.data.source=folder', f'--config.data.data_dir={root}',
            '--config.data.device_resident=False', '--config.data.base_size=24',
            '--config.batch_size=8', '--config.eval_batch_size=8']
  interrupted = tmp_path / 'interrupted'
  proc = subprocess.Popen([sys.executable, '-m', 'bigkd.train', *args, '--workdir',
                           str(interrupted)], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  ckpt_dir = interrupted / 'teacher' / 'checkpoints'
  killer = signal_when(proc, lambda: ckpt_dir.exists() and any(
      d.isdigit() and int(d) >= 80 for d in os.listdir(ckpt_dir)), signal.SIGKILL)
  straight = run_cli([*args, '--workdir', str(tmp_path / 'straight')])  # meanwhile
  assert straight.returncode == 0, straight.stderr[-3000:]
  killer.join()
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, 'finished before the kill'
  assert not (interrupted / 'teacher' / 'summary.json').exists()

  resumed = run_cli([*args, '--workdir', str(interrupted)])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from step' in resumed.stdout

  a, b = read_metrics(interrupted / 'teacher'), read_metrics(tmp_path / 'straight' / 'teacher')
  assert [m['step'] for m in a] == [m['step'] for m in b]  # no duplicated or missing log lines
  for x, y in zip(a, b):
    np.testing.assert_allclose(x['loss'], y['loss'], rtol=1e-5)
  with open(interrupted / 'summary.json') as f1, open(tmp_path / 'straight' / 'summary.json') as f2:
    assert json.load(f1) == json.load(f2)
