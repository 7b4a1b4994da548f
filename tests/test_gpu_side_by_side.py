"""benchmarks/gpu_side_by_side.py: the GPU readiness command, its plumbing run on CPU (--dry)
without torch, as CI has none (with torch the same run adds the PyTorch side)."""
import json
import os
import subprocess
import sys

from support import REPO

sys.path.insert(0, os.path.join(REPO, 'benchmarks'))
import gpu_side_by_side  # noqa: E402


def test_dry_run_times_bigkds_bfloat16_step_and_says_torch_is_missing(tmp_path):
  out = tmp_path / 'gpu.json'
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'gpu_side_by_side.py'), '--dry',
       '--torch_python', str(tmp_path / 'no_python'), '--json', str(out)],
      capture_output=True, text=True, cwd=REPO, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  r = json.loads(out.read_text())
  assert r['dry'] and r['platform'] == 'cpu' and r['batch'] == 32
  assert list(r['images_per_sec']) == ['bigkd'] and r['ratio'] == {} and r['torch_missing']
  assert "only bigkd's side ran" in done.stdout
  assert r['images_per_sec']['bigkd'] > 0 and len(r['rounds_ms']['bigkd']) == 2
  # MFU = XLA's FLOPs per image x images/s over the (measured) peak.
  assert r['flops_per_image'] > 0 and r['peak_source'].startswith('measured')
  expected = r['flops_per_image'] * r['images_per_sec']['bigkd'] / (r['peak_tflops'] * 1e12)
  assert abs(r['mfu']['bigkd'] - expected) < 1e-9 and 'bigkd' in done.stdout


def test_the_paper_pair_and_published_peaks():
  spec = gpu_side_by_side.pair(dry=False, batch=256)
  assert '--config.stages.student.compute_dtype=bfloat16' in spec['bigkd']
  assert '--config.batch_size=256' in spec['bigkd'] and spec['torch'][-2:] == ['--batch', '256']
  for side, teacher, student in ((spec['bigkd'], 'bit_r152x2', 'bit_r50x1'),
                                 (spec['torch'], 'bit_r152x2', 'bit_r50x1')):
    assert any(teacher in a for a in side) and any(student in a for a in side)
  assert gpu_side_by_side.published_peak('NVIDIA H100 80GB HBM3') == 989
  assert gpu_side_by_side.published_peak('NVIDIA H200') == 989
  assert gpu_side_by_side.published_peak('NVIDIA A100-SXM4-80GB') == 312
  assert gpu_side_by_side.published_peak('Tesla T4') is None
