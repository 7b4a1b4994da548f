"""python -m bigkd.report (one self-contained page, seen in headless Chromium) and
notebooks/inspect_run.ipynb run top to bottom, both on the shared digits demo run."""
import base64
import io
import json
import os
import re
import subprocess

import numpy as np
import pytest
from PIL import Image

from support import REPO, run_main

CHROMIUM = '/usr/bin/chromium'
NOTEBOOK = os.path.join(REPO, 'notebooks', 'inspect_run.ipynb')


@pytest.fixture(scope='module')
def report_page(demo_run):
  result = run_main('bigkd.report', [demo_run.workdir()])
  assert result.returncode == 0, result.stderr
  path = os.path.join(demo_run.workdir(), 'report.html')
  assert result.stdout.strip() == path
  with open(path) as f:
    return path, f.read()


def test_report_is_one_self_contained_page(report_page, demo_run):
  """Every figure is an embedded PNG (nothing else is loaded) and the summary table holds
  each stage's final numbers."""
  _, page = report_page
  images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', page)
  assert [alt for alt, _ in images] == [
      'teacher: training', 'student: training', 'baseline: training',
      'accuracy per class on test', 'teacher vs student top-1 predictions on test',
      'calibration of teacher and student on test',
      'student: teacher and student views under each teaching mode (the batch of step 40)']
  for _, data in images:
    width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
    assert width > 200 and height > 150
  assert not re.search(r'(src|href)="(?!data:)', page)  # no file or URL besides the page
  with open(os.path.join(demo_run.workdir(), 'summary.json')) as f:
    summary = json.load(f)['stages']
  for name, final in summary.items():
    row = re.search(rf'<tr><td>{name}</td>.*?</tr>', page).group(0)
    assert 'finished' in row and f'{final["test_accuracy"]:.4f}' in row
  assert f'<td>{summary["student"]["test_agreement"]:.4f}</td>' in page


def test_report_command_line(tmp_path):
  result = run_main('bigkd.report', ['--help'])
  assert result.returncode == 0 and 'WORKDIR' in result.stdout and '--split' in result.stdout
  for workdir in (str(tmp_path), str(tmp_path / 'missing')):
    result = run_main('bigkd.report', [workdir])
    assert result.returncode == 2
    assert result.stderr.startswith('bigkd: error: ') and result.stderr.count('\n') == 1
  assert not os.listdir(tmp_path)


@pytest.mark.skipif(not os.path.exists(CHROMIUM),
                    reason=f'needs Debian\'s chromium at {CHROMIUM} (apt-get install chromium; '
                    '.ci/run tries to install it)')
def test_report_renders_in_headless_chromium(report_page, tmp_path):
  """The page as a browser draws it is not blank, and its figures show: matplotlib's first
  colour (the curves, the bars) covers part of the screenshot."""
  out = str(tmp_path / 'report.png')
  subprocess.run(['bash', os.path.join(REPO, 'tools', 'screenshot_report.sh'),
                  os.path.dirname(report_page[0]), out], check=True, timeout=120,
                 capture_output=True)
  pixels = np.asarray(Image.open(out).convert('RGB')).astype(int)
  assert pixels.shape == (2400, 1280, 3)
  assert pixels.std() > 20
  blue = np.all(np.abs(pixels - [31, 119, 180]) < 16, axis=-1)
  assert blue.mean() > 0.002, blue.mean()


def test_notebook_runs_top_to_bottom(demo_notebook):
  """The notebook as committed (no outputs) runs in a fresh kernel on the finished run (see
  `demo_notebook`); its last cell's summary of every figure says each holds what it should."""
  import nbformat
  committed = nbformat.read(NOTEBOOK, as_version=4)
  assert all(not c.outputs and c.execution_count is None
             for c in committed.cells if c.cell_type == 'code')
  code = [c for c in demo_notebook.result().cells if c.cell_type == 'code']
  pictures = sum('image/png' in o.get('data', {}) for c in code for o in c.outputs)
  assert pictures == 3 + 4  # a curves figure per stage, then views, classes, agreement, calibration
  facts = json.loads(code[-1].outputs[-1]['text'])
  figures = facts['figures']
  titles = {name: [a['title'] for a in f['axes']] for name, f in figures.items()}
  assert titles['curves_student'] == ['loss', 'kl_T1', 'agreement', 'accuracy', 'lr']
  assert titles['curves_baseline'] == ['loss', 'accuracy', 'lr']
  assert figures['views']['axes'][0]['images'] == 1
  assert figures['per_class']['axes'][0]['bars'] == 3 * 10
  assert titles['agreement'][0].startswith('teacher vs student: agreement')
  assert figures['reliability']['axes'][0]['lines'] == 3
  with open(os.path.join(demo_notebook.workdir, 'summary.json')) as f:
    summary = json.load(f)['stages']['student']
  assert facts['student_test_accuracy'] == summary['test_accuracy']
