"""The trainer's two promises about state: the device count does not change the result, and a
killed run resumes from its last checkpoint and ends where an uninterrupted run ends."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

from conftest import REPO, run_cli

SMALL = ['--config', 'configs/digits.py:fast', '--config.stage_order=teacher,student',
         '--config.stages.teacher.model=cnn_small', '--config.stages.teacher.resolution=12',
         '--config.stages.student.model=cnn_tiny', '--config.stages.student.resolution=8',
         '--config.batch_size=32', '--config.eval_batch_size=64', '--config.log_every=20']


def metrics(stage_dir):
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_eight_devices_give_the_metrics_of_one(tmp_path):
  steps = ['--config.stages.teacher.steps=100', '--config.stages.student.steps=100']
  runs = {}
  for devices in (1, 8):
    workdir = tmp_path / f'd{devices}'
    result = run_cli([*SMALL, *steps, '--workdir', str(workdir)],
                     env_extra={'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'})
    assert result.returncode == 0, result.stderr[-3000:]
    runs[devices] = workdir
  for stage in ('teacher', 'student'):
    one, eight = metrics(runs[1] / stage), metrics(runs[8] / stage)
    assert [m['step'] for m in one] == [m['step'] for m in eight]
    for a, b in zip(one, eight):
      for key in ('loss', 'grad_norm', 'lr'):
        np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=1e-5, err_msg=f'{stage} {key}')
  with open(runs[1] / 'summary.json') as f1, open(runs[8] / 'summary.json') as f8:
    s1, s8 = json.load(f1)['stages'], json.load(f8)['stages']
  for stage in s1:
    for key, value in s1[stage].items():
      if isinstance(value, float):
        np.testing.assert_allclose(value, s8[stage][key], atol=2e-3, err_msg=f'{stage} {key}')


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
  args = [*SMALL, '--config.stage_order=teacher', '--config.stages.teacher.steps=240',
          '--config.checkpoint_every=40']
  env = dict(os.environ, PYTHONPATH=REPO)
  interrupted = tmp_path / 'interrupted'
  proc = subprocess.Popen([sys.executable, '-m', 'bigkd.train', *args, '--workdir',
                           str(interrupted)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ckpt_dir = interrupted / 'teacher' / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt_dir.exists() and any(
      d.isdigit() and int(d) >= 80 for d in os.listdir(ckpt_dir))):
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (interrupted / 'teacher' / 'summary.json').exists(), 'finished before the kill'

  resumed = run_cli([*args, '--workdir', str(interrupted)])
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming from step' in resumed.stdout
  straight = run_cli([*args, '--workdir', str(tmp_path / 'straight')])
  assert straight.returncode == 0, straight.stderr[-3000:]

  a, b = metrics(interrupted / 'teacher'), metrics(tmp_path / 'straight' / 'teacher')
  assert [m['step'] for m in a] == [m['step'] for m in b]  # no duplicated or missing log lines
  for x, y in zip(a, b):
    np.testing.assert_allclose(x['loss'], y['loss'], rtol=1e-5)
  with open(interrupted / 'summary.json') as f1, open(tmp_path / 'straight' / 'summary.json') as f2:
    assert json.load(f1) == json.load(f2)
