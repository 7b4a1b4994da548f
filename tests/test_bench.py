"""The benchmark builds a stage's step like the trainer, times it and writes its JSON."""
import json
import os
import subprocess
import sys

from conftest import REPO
from test_cli import assert_bad_config
from test_sharding import FAST_XLA

KEYS = ('images_per_sec', 'step_seconds', 'flops_per_image', 'mfu', 'pipeline_ratio')


def bench(*args):
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS=FAST_XLA)
  return subprocess.run([sys.executable, '-m', 'bigkd.bench', '--config',
                         'configs/digits.py:fast', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_bench_on_digits_writes_the_json(tmp_path):
  path = tmp_path / 'bench.json'
  result = bench('--steps=10', '--warmup=1', f'--json={path}')
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'pipeline_ratio' in result.stdout and 'MFU' in result.stdout
  with open(path) as f:
    r = json.load(f)
  assert all(r[k] > 0 for k in KEYS), r
  assert r['stage'] == 'student' and r['teachers'] == ['resnet8@16']
  assert r['images_per_sec'] == r['batch_size'] / r['step_seconds']
  assert 1e5 < r['flops_per_image'] < 1e9  # a resnet8 forward plus a cnn_small step at 12-16 px


def test_unknown_stage_exits_2():
  assert_bad_config(bench('--stage=studnet'), 'studnet')
