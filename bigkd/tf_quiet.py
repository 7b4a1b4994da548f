"""TensorFlow, imported once with its C++ start-up notices silenced.

Only the modules that read data (`bigkd.data`) or write TensorBoard events (the loop, through
clu) need TensorFlow; `import bigkd`, `bigkd-train --help` and the notebook API do not pay for it.
TF writes its notices (oneDNN, CPU features) straight to file descriptor 2 before its logging is
set up, so neither TF_CPP_MIN_LOG_LEVEL nor Python logging hides them: descriptor 2 points at
/dev/null during the import; an import error still surfaces as a Python exception.
"""
import os
import sys


def import_tensorflow():
  """The `tensorflow` module (imported quietly the first time)."""
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)
  return tensorflow


def import_tfds():
  """The `tensorflow_datasets` module, TensorFlow imported quietly first."""
  import_tensorflow()
  import tensorflow_datasets
  return tensorflow_datasets
