"""Command line: python -m bigkd.train --config configs/NAME.py[:variant] --workdir DIR
                                       [--config.a.b=value ...]

Exit codes: 0 success; 2 bad config or input (one line on stderr naming the problem); 1 else.
Re-running the same command resumes from the last checkpoint of the unfinished stage.
"""
import os
import sys

from absl import flags
from ml_collections import config_flags

FLAGS = flags.FlagValues()
config_flags.DEFINE_config_file('config', None, 'Config file (configs/x.py[:variant]).',
                                lock_config=True, flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and summaries go.',
                    flag_values=FLAGS)
flags.DEFINE_string('coordinator_address', None, 'jax.distributed coordinator host:port '
                    '(multi-process runs; auto-detected on TPU VMs and SLURM).', flag_values=FLAGS)
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).',
                     flag_values=FLAGS)
flags.DEFINE_integer('process_id', None, 'This process (multi-process runs).', flag_values=FLAGS)


def fail(message: str, code: int = 2):
  print(f'bigkd: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def parse(argv):
  try:
    FLAGS(argv)
  except flags.Error as e:
    fail(str(e).splitlines()[0])
  except Exception as e:  # config file errors: missing file, a bad variant, a bad value
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    fail(f'{type(e).__name__}: {lines[-1] if lines else ""}')
  if FLAGS.config is None:
    fail('--config is required')
  if not FLAGS.workdir:
    fail('--workdir is required')
  return FLAGS.config, FLAGS.workdir


def maybe_initialize_distributed():
  """Starts jax.distributed for multi-process runs (explicit flags, TPU VMs, SLURM)."""
  import jax
  if FLAGS.coordinator_address or (FLAGS.num_processes or 1) > 1:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()


def main(argv=None):
  config, workdir = parse(argv or sys.argv)
  maybe_initialize_distributed()
  from bigkd import stages
  from bigkd.checkpoint import CheckpointError
  from bigkd.config import ConfigError
  from bigkd.data.sources import DataError
  try:
    stages.run(config, workdir)
  except (ConfigError, CheckpointError, DataError) as e:
    fail(str(e).splitlines()[0])


if __name__ == '__main__':
  main()
