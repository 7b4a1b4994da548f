"""Shared fixtures: small, fast configs on the bundled digits."""
import os
import subprocess
import sys

import pytest

from bigkd.config import base_config, stage_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(steps=30, **top):
  """A one-stage supervised config on digits that trains in seconds on CPU."""
  c = base_config()
  c.batch_size = 32
  c.eval_batch_size = 64
  c.teacher_dtype = 'float32'
  c.log_every = 10
  c.checkpoint_every = 1000
  c.data.base_size = 12
  c.augment.crop_area = (0.6, 1.0)
  c.augment.flip = False
  c.optimizer.lr = 3e-3
  c.stages.teacher = stage_config('cnn_small', 12, steps=steps, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  c.stage_order = 'teacher'
  for key, value in top.items():
    c[key] = value
  return c


def run_cli(args, env_extra=None, timeout=600):
  """Runs `python -m bigkd.train ARGS` in a fresh process; returns the CompletedProcess."""
  env = dict(os.environ, PYTHONPATH=REPO, **(env_extra or {}))
  return subprocess.run([sys.executable, '-m', 'bigkd.train', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='session')
def trained_teacher(tmp_path_factory):
  """A supervised cnn_small teacher on digits (a bigkd stage folder), trained once per session."""
  from bigkd import stages
  workdir = str(tmp_path_factory.mktemp('teacher_run'))
  summary = stages.run(tiny_config(steps=120), workdir)
  return os.path.join(workdir, 'teacher'), summary['stages']['teacher']
