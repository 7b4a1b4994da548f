"""Shared fixtures: small, fast configs on the bundled digits, the CLI called in-process, the
long subprocesses that start with the session (`early_job`: the 1-device reference run that every
"N devices / N processes = 1 device" test compares against, and others), and one digits demo run
as a new user makes it (`demo_run`)."""
import atexit
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

# Before jax is imported: XLA's backend optimisations cost more compile time than they save on
# these tiny models. Subprocesses started by the tests inherit it.
FAST_XLA = '--xla_backend_optimization_level=0'
os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_XLA}'.strip()
# Many tests (and their subprocesses) compile the same tiny steps: one persistent compilation
# cache for the session (its own temporary folder unless JAX_COMPILATION_CACHE_DIR is set, e.g.
# to keep it warm between local runs) compiles each once. Only compile time changes.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='bigkd-tests-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from bigkd import checkpoint  # noqa: E402
from bigkd.config import base_config, stage_config  # noqa: E402
from bigkd.step import TrainState  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_FSDP = 256  # small enough that the cnn kernels split over fsdp


def tiny_config(steps=30, **top):
  """A one-stage supervised config on digits that trains in seconds on CPU."""
  c = base_config()
  c.batch_size = 32
  c.eval_batch_size = 64
  c.teacher_dtype = 'float32'
  c.log_every = 10
  c.log_views = False  # its compile, in every distilled test; the demo run writes it
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


def run_main(module, args):
  """`python -m MODULE ARGS` in this process (its `main`): CompletedProcess with the exit code
  and what it printed. For everything that needs no other device count or process."""
  import importlib
  main = importlib.import_module(module).main
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), contextlib.chdir(REPO):
    try:
      main([module, *args])
      code = 0
    except SystemExit as e:
      code = e.code
  return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def run_cli(args):
  """`python -m bigkd.train ARGS`, in-process."""
  return run_main('bigkd.train', args)


def subprocess_env(devices=1):
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]),
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_XLA}')


# --- Multi-device and multi-process runs, compared with one 1-device reference. -------------

def random_params(model, resolution, num_classes=10, seed=0):
  """Random parameters drawn on the host (no XLA compile, unlike `model.init`)."""
  from bigkd.models import param_shapes
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(
      np.prod(s.shape[:-1]) or 1)).astype(np.float32), param_shapes(model, num_classes, resolution))


def random_stage(stage_dir, model='cnn_small', resolution=12, num_classes=10, seed=0):
  """A bigkd stage folder with random parameters: a teacher without training one."""
  params = random_params(model, resolution, num_classes, seed)
  checkpoint.write_stage_info(stage_dir, model, {}, resolution, num_classes)
  mngr = checkpoint.manager(stage_dir)
  checkpoint.save(mngr, 1, TrainState.create(params, {'unused': np.zeros((), np.int32)}, ()))
  mngr.wait_until_finished()
  mngr.close()
  return stage_dir


DISTILL_STEPS = 6


def distill_config(teacher_dir, **overrides):
  """cnn_tiny at 8 px distilled (function matching, mixup) from the stage in `teacher_dir`,
  logged every 3 steps: the run every device-count test repeats on another mesh."""
  c = tiny_config()
  c.log_every = 3
  c.mesh.min_fsdp_size = MIN_FSDP
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'teacher': teacher_dir},
                                  steps=DISTILL_STEPS)
  c.stage_order = 'student'
  c.update_from_flattened_dict(overrides)
  return c


RUNNER = """
import json, sys
import jax
from bigkd import stages
from conftest import distill_config
teacher, runs, distributed = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
if distributed:
  jax.distributed.initialize(**distributed)
for workdir, overrides in runs:
  stages.run(distill_config(teacher, **overrides), workdir)
"""


def start_runs(teacher_dir, runs, devices, distributed=None):
  """Runs [(workdir, overrides)] of `distill_config` one after another in a fresh process with
  `devices` CPU devices (`distributed`: jax.distributed.initialize arguments)."""
  return subprocess.Popen([sys.executable, '-c', RUNNER, teacher_dir, json.dumps(runs),
                           json.dumps(distributed or {})], cwd=REPO, env=subprocess_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_when(proc, ready, signum, timeout=300) -> threading.Thread:
  """Sends `signum` to `proc` as soon as `ready()` holds (checked every 20 ms, for at most
  `timeout` s), from a thread, so that the test does other work meanwhile; join() it. The
  thread's `sent_at`: when it sent the signal (None: the process had ended)."""
  def watch():
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
      time.sleep(0.02)
    if proc.poll() is None:
      thread.sent_at = time.time()
      proc.send_signal(signum)
  thread = threading.Thread(target=watch, daemon=True)
  thread.sent_at = None
  thread.start()
  return thread


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


# --- Long subprocesses started with the session. -----------------------------------------
# Some tests wait on long subprocesses (the reference run and the runs on other meshes and
# process counts, every paper config's 2 steps, the fast study, ...). The in-process tests keep
# about one of the two cores busy; these jobs use the other one meanwhile: as the session starts,
# a thread starts those that the selected tests ask for, one after another, in the order the
# tests need them (all at once would crowd the in-process tests out). A test that needs a job
# before its turn starts it.

class Job:
  """Subprocesses a test waits on, and the folder they write in."""

  def __init__(self, folder, *procs):
    self.folder, self.procs = folder, procs
    self._lock, self._ended = threading.Lock(), None

  def wait(self, timeout=600) -> list:
    """[(exit code, stdout, stderr)] of each process, once all have ended."""
    with self._lock:
      if self._ended is None:
        ended = []
        for p in self.procs:
          out, err = p.communicate(timeout=timeout)
          ended.append((p.returncode, out, err))
        self._ended = ended
    return self._ended

  def outputs(self, timeout=600) -> list:
    """What each process printed (each must have exited 0)."""
    ended = self.wait(timeout)
    for code, _, err in ended:
      assert code == 0, err[-3000:]
    return [out for _, out, _ in ended]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        p.kill()


EARLY_JOBS = {}  # fixture name -> start(folder) -> Job, from `early_job`
_started, _start_lock = {}, threading.RLock()


def started(name) -> Job:
  """Job `name` (`EARLY_JOBS`), started now unless it was already."""
  with _start_lock:
    if name not in _started:
      folder = tempfile.mkdtemp(prefix=f'bigkd-tests-{name}-')
      atexit.register(shutil.rmtree, folder, ignore_errors=True)
      _started[name] = EARLY_JOBS[name](folder)
      atexit.register(_started[name].kill)  # runs before the rmtree
    return _started[name]


def early_job(name, start):
  """A session fixture `name`: the Job `start(folder)`, started early in the session when a
  selected test asks for it (directly or through another fixture)."""
  EARLY_JOBS[name] = start
  return pytest.fixture(scope='session', name=name)(lambda: started(name))


def _run_one_after_another(names):
  # Lower priority (on Linux a thread's nice value, inherited by the processes it starts): the
  # in-process tests, which run one after another, keep their core; the jobs take the rest.
  os.setpriority(os.PRIO_PROCESS, 0, 10)
  for name in names:
    try:
      started(name).wait(timeout=3600)
    except Exception:  # the test that needs the job reports it
      pass


def pytest_collection_finish(session):
  if session.config.option.collectonly:
    return
  needed = []
  for item in session.items:
    needed += [n for n in getattr(item, 'fixturenames', ()) if n in EARLY_JOBS and n not in needed]
  threading.Thread(target=_run_one_after_another, args=(needed,), daemon=True).start()


def streamed_overrides(jpeg_folder):
  """`distill_config` on a JPEG folder, each step's images read and decoded from it."""
  return {'data.source': 'folder', 'data.data_dir': jpeg_folder, 'data.base_size': 24,
          'data.device_resident': False, 'data.num_classes': 10, 'batch_size': 8,
          'eval_batch_size': 8}


class ReferenceRun(Job):
  """The 1-device runs of `distill_config` from a random teacher (on the digits, and streamed
  from the JPEGs in `jpegs`), which the runs on other meshes and process counts are compared
  with; `stage_dir()` waits for them."""

  teacher = property(lambda self: os.path.join(self.folder, 'teacher'))
  jpegs = property(lambda self: os.path.join(self.folder, 'jpegs'))

  def stage_dir(self, streamed=False):
    self.outputs()
    return os.path.join(self.folder, 'streamed' if streamed else 'one_device', 'student')


def start_reference_run(folder):
  teacher = random_stage(os.path.join(folder, 'teacher'))
  jpegs = write_jpeg_folder(os.path.join(folder, 'jpegs'))
  runs = [(os.path.join(folder, 'one_device'), {}),
          (os.path.join(folder, 'streamed'), streamed_overrides(jpegs))]
  return ReferenceRun(folder, start_runs(teacher, runs, 1))


reference_run = early_job('reference_run', start_reference_run)


def final_params(stage_dir, model='cnn_tiny', resolution=8):
  """The stage's last parameters, restored (whatever mesh wrote them) onto this 1-device host."""
  from bigkd.build import param_targets
  from bigkd.sharding import make_mesh
  target = param_targets(model, {}, 10, resolution, jnp.float32, make_mesh())
  return jax.device_get(checkpoint.load_params(stage_dir, target, 'test'))


def read_metrics(stage_dir):
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def assert_same_run(reference_dir, stage_dir, what):
  """Same final parameters (float tolerance), same logged loss / grad norm / lr at the same
  steps, same final evaluation."""
  import chex
  chex.assert_trees_all_close(final_params(reference_dir), final_params(stage_dir), rtol=1e-4,
                              atol=2e-5, custom_message=what)
  ref, got = read_metrics(reference_dir), read_metrics(stage_dir)
  assert [m['step'] for m in ref] == [m['step'] for m in got], what
  for a, b in zip(ref, got):
    for key in ('loss', 'kl_T1', 'grad_norm', 'lr'):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=1e-5, err_msg=f'{what} {key}')
  with open(os.path.join(reference_dir, 'summary.json')) as f1, \
       open(os.path.join(stage_dir, 'summary.json')) as f2:
    s1, s2 = json.load(f1), json.load(f2)
  for key, value in s1.items():
    if isinstance(value, float):
      np.testing.assert_allclose(value, s2[key], atol=2e-3, err_msg=f'{what} {key}')


@pytest.fixture(scope='session')
def trained_teacher(tmp_path_factory):
  """A supervised cnn_small teacher on digits (a bigkd stage folder), trained once per session."""
  from bigkd import stages
  workdir = str(tmp_path_factory.mktemp('teacher_run'))
  summary = stages.run(tiny_config(steps=120), workdir)
  return os.path.join(workdir, 'teacher'), summary['stages']['teacher']


# --- A folder of JPEGs of mixed sizes and aspect ratios, for the streamed input path. --------

JPEG_SIZES = [(30, 40), (40, 30), (36, 36), (27, 48)]  # landscape 4:3, portrait, square, 16:9
JPEG_CLASSES = ('circle', 'cross', 'square')


def write_jpeg_folder(root, per_class={'train': 8, 'val': 4, 'test': 4}, seed=0):
  """root/{split}/{class}/*.jpg: each class a tinted image, sizes cycling through JPEG_SIZES."""
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  for split, n in per_class.items():
    for c, cls in enumerate(JPEG_CLASSES):
      os.makedirs(os.path.join(root, split, cls), exist_ok=True)
      for i in range(n):
        h, w = JPEG_SIZES[i % len(JPEG_SIZES)]
        image = rng.integers(0, 60, (h, w, 3)) + 60 * np.eye(3, dtype=int)[c] * 3
        jpeg = tf.io.encode_jpeg(np.clip(image, 0, 255).astype(np.uint8), quality=95)
        tf.io.write_file(os.path.join(root, split, cls, f'{i:03d}.jpg'), jpeg)
  return root


@pytest.fixture(scope='session')
def jpeg_folder(tmp_path_factory):
  return write_jpeg_folder(str(tmp_path_factory.mktemp('jpegs')))


def folder_config(root, steps=6, streamed=True, **top):
  """A supervised cnn_tiny stage (16 px) on the JPEG folder, streamed by default."""
  c = tiny_config(steps=steps, **top)
  c.batch_size, c.eval_batch_size, c.log_every = 8, 8, 3
  c.data.source, c.data.data_dir, c.data.base_size = 'folder', root, 24
  c.data.device_resident = not streamed
  c.stages.teacher = stage_config('cnn_tiny', 16, steps=steps, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  return c


# --- One digits demo run that the inspect, report and notebook tests share. ------------------

DEMO_ARGS = ['--config', 'configs/digits.py:fast', '--config.checkpoint_every=20',
             '--config.keep_checkpoints=10', '--config.eval_every=20']


def install_package(root) -> str:
  """bigkd installed as a user installs it (`pip install .`, not editable) into a fresh venv at
  `root/venv` whose dependencies are this venv's (a .pth line: nothing is downloaded); returns
  the venv's bin folder, with the console scripts."""
  import shutil
  import site
  venv, src = os.path.join(root, 'venv'), os.path.join(root, 'src')
  subprocess.run([sys.executable, '-m', 'venv', '--without-pip', venv], check=True)
  python = os.path.join(venv, 'bin', 'python')
  purelib = subprocess.check_output(
      [python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], text=True)
  with open(os.path.join(purelib.strip(), 'dependencies.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  for folder in ('bigkd', 'configs'):
    shutil.copytree(os.path.join(REPO, folder), os.path.join(src, folder),
                    ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('pyproject.toml', 'README.md', 'requirements.txt'):
    shutil.copy(os.path.join(REPO, name), src)
  subprocess.run([python, '-m', 'pip', 'install', '-q', '--no-deps', '--no-build-isolation',
                  '--disable-pip-version-check', src], check=True, cwd=root)
  return os.path.join(venv, 'bin')


def installed_env():
  """The environment of a command of the installed package: no PYTHONPATH (the checkout must
  not be what is imported)."""
  env = dict(subprocess_env(1))
  env.pop('PYTHONPATH')
  return env


class DemoRun:
  """The digits `:fast` demo (teacher -> student -> baseline, 40 steps each) as a new user runs
  it: `bigkd-train` of the package installed into a fresh venv (`install_package`), started in
  another directory than the checkout, in a subprocess started when first requested, so a test
  can read the run while it is written. Checkpoints at steps 20 and 40, none deleted (each
  listed one stays loadable), and an evaluation at step 20 (curves with evaluation points).
  `workdir()` waits for the end."""

  def __init__(self, root):
    self.root, self.path = root, os.path.join(root, 'digits_fast')
    self.bin = install_package(root)
    self._proc = subprocess.Popen(
        [os.path.join(self.bin, 'bigkd-train'), *DEMO_ARGS, '--workdir', self.path],
        cwd=root, env=installed_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)

  def running(self) -> bool:
    return self._proc is not None and self._proc.poll() is None

  def workdir(self) -> str:
    if self._proc is not None:
      self.stdout = finish(self._proc)
      self._proc = None
    return self.path


@pytest.fixture(scope='session')
def demo_run(tmp_path_factory):
  return DemoRun(str(tmp_path_factory.mktemp('demo')))


NOTEBOOK_RUNNER = """
import os, sys
import nbformat
from nbclient import NotebookClient
source, out = sys.argv[1], sys.argv[2]
notebook = nbformat.read(source, as_version=4)
NotebookClient(notebook, timeout=300, kernel_name='python3',
               resources={'metadata': {'path': os.path.dirname(source)}}).execute()
nbformat.write(notebook, out)
"""


class DemoNotebook:
  """notebooks/inspect_run.ipynb run top to bottom by nbclient (a fresh kernel) on the finished
  demo run (BIGKD_WORKDIR: it does not train again), in a subprocess started when first
  requested, so it overlaps the tests that run in this process. `result()` waits for it and
  returns the executed notebook."""

  SOURCE = os.path.join(REPO, 'notebooks', 'inspect_run.ipynb')

  def __init__(self, workdir, out):
    self.workdir, self.out = workdir, out
    env = dict(subprocess_env(1), BIGKD_WORKDIR=workdir)
    self._proc = subprocess.Popen([sys.executable, '-c', NOTEBOOK_RUNNER, self.SOURCE, out],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)

  def result(self):
    import nbformat
    if self._proc is not None:
      finish(self._proc)
      self._proc = None
    return nbformat.read(self.out, as_version=4)


@pytest.fixture(scope='session')
def demo_notebook(demo_run, tmp_path_factory):
  notebook = DemoNotebook(demo_run.workdir(),
                          str(tmp_path_factory.mktemp('notebook') / 'executed.ipynb'))
  yield notebook
  notebook.result()  # not left running past the session (its kernel is a process too)
