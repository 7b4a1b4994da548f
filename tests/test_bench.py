"""The benchmark builds a stage's step like the trainer and times it: its FLOPs per image agree
with a count by hand (on one device and on two), its rates with the time its timed calls took,
and its JSON and printed report with the numbers it returned."""
import json
import math
import os
import re
import sys
import time

import jax
import pytest

from bigkd import bench, cli
from bigkd.plan import plan_stages
from support import REPO, finish, start

CONFIG = os.path.join(REPO, 'configs', 'digits.py')
# The digits demo's supervised `baseline` stage (12 px, batch 64, no mixup) as a cnn_tiny.
TINY_BASELINE = ['--config', f'{CONFIG}:fast', '--stage=baseline',
                 '--config.stages.baseline.model=cnn_tiny', '--steps=2', '--warmup=1',
                 '--peak_tflops=2']


def cnn_tiny_train_flops(resolution, num_classes=10):
  """FLOPs of one image's train step of cnn_tiny, counted by hand from bigkd/models/cifar.py:
  3x3 conv 3->8, 2x2 max pool, 3x3 conv 8->16, 2x2 max pool, dense (flattened map) -> classes.
  A conv costs 2·k²·Cin·Cout per output pixel ('SAME' padding: as many as input pixels), a
  dense layer 2·inputs·outputs. The backward pass costs twice the forward (gradients of the
  weights and of the activations), except that the first conv needs no gradient of its input.
  Elementwise work (relu, pooling, loss, augmentation, the optimiser update) is left out: a few
  per cent here."""
  r1, r2, r3 = resolution, resolution // 2, resolution // 4
  conv1 = 2 * r1 ** 2 * 3 ** 2 * 3 * 8
  conv2 = 2 * r2 ** 2 * 3 ** 2 * 8 * 16
  dense = 2 * r3 ** 2 * 16 * num_classes
  forward = conv1 + conv2 + dense
  return 3 * forward - conv1


def assert_printed(text, value):
  """`text` is `value` as printed, to its last decimal."""
  decimals = len(text.split('.')[1]) if '.' in text else 0
  assert abs(float(text) - value) <= 0.51 * 10 ** -decimals, (text, value)


def test_bench_json_and_report_hold_the_measured_step(tmp_path, capsys, monkeypatch):
  returned, calls = [], {'pipeline': [], 'fixed': []}
  run, time_steps = bench.run, bench.time_steps

  def timed_from_outside(setup, variant, steps):
    start = time.perf_counter()
    seconds = time_steps(setup, variant, steps)
    calls[variant].append((time.perf_counter() - start) / steps)
    return seconds

  monkeypatch.setattr(bench, 'run', lambda *a, **k: returned.append(run(*a, **k)) or returned[0])
  monkeypatch.setattr(bench, 'time_steps', timed_from_outside)
  path = tmp_path / 'bench.json'
  bench.main(['bench', *TINY_BASELINE, f'--json={path}'])
  with open(path) as f:
    r = json.load(f)
  assert r == returned[0]
  assert (r['stage'], r['model'], r['resolution'], r['teachers']) == (
      'baseline', 'cnn_tiny', 12, [])
  assert (r['batch_size'], r['grad_accum_steps']) == (64, 1)
  assert r['devices'] == jax.device_count() == r['mesh']['data'] * r['mesh']['fsdp']
  assert (r['peak_tflops'], r['peak_measured']) == (2.0, False)

  assert r['flops_per_image'] == pytest.approx(cnn_tiny_train_flops(12), rel=0.25)
  assert 0 < r['pipeline_ratio'] < math.inf
  # The rates are those of the best timed round (warm-ups left out), as timed from outside: the
  # timed loop is all of a call but a few microseconds.
  for variant, rate in (('pipeline', 'images_per_sec'), ('fixed', 'fixed_images_per_sec')):
    best = min(calls[variant][1:])
    assert 64 / best <= r[rate] < 1.5 * 64 / best, (variant, r[rate], calls[variant])

  report = capsys.readouterr().out
  for variant, ms, rate in (('pipeline', 'step_seconds', 'images_per_sec'),
                            ('fixed', 'fixed_step_seconds', 'fixed_images_per_sec')):
    printed = re.search(rf'{variant} +(\S+) ms/step +(\S+) img/s', report)
    assert_printed(printed[1], 1e3 * r[ms])
    assert_printed(printed[2], r[rate])
  printed = re.search(r'pipeline_ratio (\S+)\n +(\S+) MFLOP/image .* achieved (\S+) TFLOP/s.*'
                      r'MFU (\S+)%', report)
  for text, value in zip(printed.groups(), (r['pipeline_ratio'], r['flops_per_image'] / 1e6,
                                             r['achieved_tflops'], 100 * r['mfu'])):
    assert_printed(text, value)


@pytest.mark.integration
def test_flops_per_image_do_not_depend_on_devices_or_accumulation(tmp_path):
  """On 2 devices XLA's cost analysis counts one device's share of the batch, and a scan (the
  microbatches of gradient accumulation) once: the count per image must undo both."""
  finish(start([sys.executable, '-m', 'bigkd.bench', *TINY_BASELINE, '--config.grad_accum_steps=2',
                f'--json={tmp_path / "bench.json"}'], devices=2))
  with open(tmp_path / 'bench.json') as f:
    r = json.load(f)
  assert (r['devices'], r['mesh'], r['grad_accum_steps']) == (2, {'data': 2, 'fsdp': 1}, 2)
  assert r['flops_per_image'] == pytest.approx(cnn_tiny_train_flops(12), rel=0.25)


def test_unknown_stage_exits_2(capsys):
  with pytest.raises(SystemExit) as exit_info:
    bench.main(['bench', '--config', f'{CONFIG}:fast', '--stage=studnet'])
  assert exit_info.value.code == 2
  errors = [l for l in capsys.readouterr().err.splitlines() if l.startswith('bigkd: error:')]
  assert len(errors) == 1 and "'studnet'" in errors[0], errors
  assert 'baseline, student, teacher' in errors[0] or 'teacher, student, baseline' in errors[0]


def test_default_stage_is_the_last_with_teachers():
  config = cli.config_module('digits').get_config('fast')
  plans = plan_stages(config, '/nonexistent', 1197, 10)
  assert bench.pick_plan(plans, '').name == 'student'  # teacher, student, baseline
  assert bench.pick_plan(plans, 'teacher').name == 'teacher'
  config.stage_order = 'teacher,baseline'  # no stage with teachers: the last one
  assert bench.pick_plan(plan_stages(config, '/nonexistent', 1197, 10), '').name == 'baseline'
