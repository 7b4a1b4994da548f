"""Fixtures, and the environment that must be set before jax is imported. The helpers the tests
share are in support.py.

The suite runs on pytest-xdist workers (`-n 2`); pyproject's `--dist loadscope` sends all tests
of a module to one worker, so a module fixture is made once. A session fixture is made once per
session, not once per worker: `built_once` makes it under a lock in a folder that all workers
share (the trained teacher, the JPEG folder, the reference run), or starts it there (the demo run
and its notebook, which run in the background; any worker reads them). Modules with tests marked
`integration` (long subprocesses) are sent to the workers first."""
import atexit
import os
import shutil
import tempfile

# Before jax is imported: XLA's backend optimisations cost more compile time than they save on
# these tiny models, and XLA:CPU's MLIR fusion emitters cost about 10 ms more per program than
# its older emitters (measured: 800 one-op programs 18.2 -> 10.4 CPU s; the suite 424 -> 355 s;
# the digits student's step as fast either way). Subprocesses started by the tests inherit them
# (support.subprocess_env).
FAST_XLA = '--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false'
if FAST_XLA not in os.environ.get('XLA_FLAGS', ''):  # xdist workers inherit it already set
  os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {FAST_XLA}'.strip()
# Many tests (and their subprocesses) compile the same tiny steps: one persistent compilation
# cache for the session compiles each once. Only compile time changes. The first pytest process
# (the xdist controller, or the only one) makes a temporary folder and removes it when it exits;
# the workers and every subprocess inherit the variable. Set JAX_COMPILATION_CACHE_DIR to keep
# a cache warm between local runs.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='bigkd-tests-xla-cache-')
  atexit.register(shutil.rmtree, os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
# The tests run on the CPU: with libtpu installed (requirements-plan.txt, for bigkd-plan), jax
# would otherwise look for a TPU at start-up in every process.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# libtpu (bigkd-plan's compiles) takes a machine-wide lock file: let a second test session on
# this machine plan at the same time (nothing here uses a real TPU).
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402

from support import (DemoNotebook, DemoRun, ReferenceRun, built_once, tiny_config,  # noqa: E402
                     write_jpeg_folder)


def pytest_collection_modifyitems(items):
  for item in items:
    if 'demo_run' in item.fixturenames:
      item.add_marker(pytest.mark.integration)
  # The modules with long tests first, so that no worker is left with one at the end (a stable
  # sort: the order of the modules' own tests stays).
  long_modules = {item.path for item in items if item.get_closest_marker('integration')}
  items.sort(key=lambda item: item.path not in long_modules)


@pytest.fixture(scope='session')
def shared_folder(tmp_path_factory):
  """A folder of this session that all its xdist workers share (without xdist, its own)."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if 'PYTEST_XDIST_WORKER' in os.environ else base)


@pytest.fixture(scope='session')
def trained_teacher(shared_folder):
  """A supervised cnn_small teacher on digits (a bigkd stage folder) and its summary, trained
  once per session."""
  def train(workdir):
    from bigkd import stages
    return stages.run(tiny_config(steps=120), workdir)['stages']['teacher']
  workdir, summary = built_once(shared_folder, 'trained_teacher', train)
  return os.path.join(workdir, 'teacher'), summary


@pytest.fixture(scope='session')
def jpeg_folder(shared_folder):
  """support.write_jpeg_folder's JPEGs (read only)."""
  return built_once(shared_folder, 'jpegs', lambda folder: write_jpeg_folder(folder))[0]


@pytest.fixture(scope='session')
def reference_run(shared_folder) -> ReferenceRun:
  """The 1-device runs of support.distill_config that the runs on other meshes and process
  counts are compared with, made once per session in a subprocess."""
  return ReferenceRun(*built_once(shared_folder, 'reference_run', ReferenceRun.build))


@pytest.fixture(scope='session')
def demo_run(shared_folder):
  """The digits demo as a new user runs it (support.DemoRun), started once, when first requested,
  in the background."""
  demo = DemoRun(built_once(shared_folder, 'demo', DemoRun.start)[0])
  yield demo
  demo.command.wait()  # not left running past the session


@pytest.fixture(scope='session')
def demo_notebook(demo_run, shared_folder):
  """The notebook run on the finished demo run (support.DemoNotebook), started once, when first
  requested, in the background."""
  workdir = demo_run.workdir()
  notebook = DemoNotebook(built_once(shared_folder, 'notebook', DemoNotebook.starter(workdir))[0],
                          workdir)
  yield notebook
  notebook.command.wait()  # not left running past the session (its kernel is a process too)
