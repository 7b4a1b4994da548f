"""Train: python -m bigkd.train --config configs/NAME.py[:variant] --workdir DIR [--config.X=V ...]

Runs the stages of a config (e.g. teacher -> student -> baseline) in DIR; re-running the same
command resumes the unfinished stage from its last checkpoint and skips finished ones. Every
config field can be overridden with --config.FIELD=VALUE (fields and defaults: bigkd/config.py).

Example (the bundled digits demo, a few minutes on a laptop CPU; `:fast` for a few seconds):
  python -m bigkd.train --config configs/digits.py --workdir runs/digits --config.seed=1

Exit codes: 0 success; 2 bad config or input (one line on stderr naming the problem, before
anything is written), a teacher with NaN/Inf weights or logits, or a stage whose checkpoints are
all unreadable (a damaged newest one is named in a warning and the previous one used); 3 the
loss, gradients or parameters went NaN/Inf (one line naming stage and step; no checkpoint of the
bad state, no summary; optimizer.skip_nonfinite_updates skips such steps instead); 75 stopped by
SIGTERM/SIGINT after writing a checkpoint at the current step: run the same command again to
resume exactly there; 1 anything else.
"""
import os
import sys

from absl import flags

from bigkd import cli

def define_flags(argv) -> flags.FlagValues:
  """A fresh set of this command's flags (one per call: `main` can run many times in-process)."""
  fv = cli.config_flag_values(argv)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and summaries go.',
                      flag_values=fv)
  flags.DEFINE_string('coordinator_address', None, 'jax.distributed coordinator host:port '
                      '(multi-process runs; auto-detected on TPU VMs and SLURM).', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process runs).',
                       flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'This process (multi-process runs).', flag_values=fv)
  return fv


def maybe_initialize_distributed(fv):
  """Starts jax.distributed for multi-process runs (explicit flags, TPU VMs, SLURM)."""
  import jax
  if fv.coordinator_address or (fv.num_processes or 1) > 1:
    jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  elif 'SLURM_JOB_ID' in os.environ and int(os.environ.get('SLURM_NTASKS', '1')) > 1:
    jax.distributed.initialize()
  elif os.environ.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0:
    jax.distributed.initialize()


def main(argv=None):
  argv = cli.with_bundled_configs(argv or sys.argv)
  fv = define_flags(argv)
  cli.parse(fv, argv, __doc__)
  if not fv.workdir:
    cli.fail('--workdir is required')
  maybe_initialize_distributed(fv)
  from bigkd import stages
  from bigkd.checkpoint import CheckpointError
  from bigkd.config import ConfigError
  from bigkd.data.sources import DataError
  try:
    stages.run(fv.config, fv.workdir)
  except (ConfigError, CheckpointError, DataError) as e:
    cli.fail(str(e).splitlines()[0])
  except stages.NonFinite as e:
    cli.fail(str(e), stages.NONFINITE_EXIT_CODE)
  except stages.Preempted as e:
    print(f'bigkd: preempted: {e}', file=sys.stderr, flush=True)
    sys.exit(stages.PREEMPTED_EXIT_CODE)


if __name__ == '__main__':
  main()
