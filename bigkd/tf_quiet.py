"""TensorFlow (and libtpu's topology query), with their C++ start-up notices silenced.

Only the modules that read data (`bigkd.data`) or write TensorBoard events (the loop, through
clu) need TensorFlow; `import bigkd`, `bigkd-train --help` and the notebook API do not pay for it.
TF writes its notices (oneDNN, CPU features) straight to file descriptor 2 before its logging is
set up, so neither TF_CPP_MIN_LOG_LEVEL nor Python logging hides them: descriptor 2 points at
/dev/null during the import; an import error still surfaces as a Python exception.
"""
import contextlib
import os
import sys
import threading

# bigkd runs TensorFlow only to decode images (and to write TensorBoard events): the streamed
# reader's parallelism is its own threads, each decoding a batch, so each TF op runs on the
# calling thread instead of handing its work to a pool of spinning threads. Set before the first
# TF op, read when TF starts its runtime; a value the user set wins. (The reader per CPU-second:
# benchmarks/README.md, "Input pipeline".)
os.environ.setdefault('TF_NUM_INTRAOP_THREADS', '1')


@contextlib.contextmanager
def stderr_to_devnull():
  """File descriptor 2 pointed at /dev/null (C++ writes there directly); Python exceptions
  still surface."""
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    yield
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


_quiet_import = threading.Lock()


def import_tensorflow():
  """The `tensorflow` module (imported quietly the first time). Safe from any thread: a module
  in sys.modules may still be importing in another thread (the streamed reader's threads start
  together), and only the `import` statement waits for it to finish."""
  with _quiet_import:
    if 'tensorflow' not in sys.modules:
      os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
      with stderr_to_devnull():
        import tensorflow  # noqa: F401  (the quiet first import)
  import tensorflow  # here or in another thread: returns once the import has finished
  return tensorflow


def import_tfds():
  """The `tensorflow_datasets` module, TensorFlow imported quietly first."""
  import_tensorflow()
  import tensorflow_datasets
  return tensorflow_datasets
