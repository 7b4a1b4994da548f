"""The study's command line, `python -m bigkd.study WORKDIR [--seeds N] [--only PARTS]
[--config default|fast]`: runs the parts, logs the call, writes the report."""
import argparse
import json
import os
import platform
import sys
import time

from bigkd.cli import config_module
from bigkd.config import comma_list
from bigkd.study import __doc__ as package_doc
from bigkd.study.runs import PARTS, Study, collect


def machine() -> dict:
  import jax
  load = os.getloadavg() if hasattr(os, 'getloadavg') else None
  return dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version(),
              jax=jax.__version__, device=jax.devices()[0].device_kind,
              load_average=[round(x, 2) for x in load] if load else None)


def calls(root: str) -> list[dict]:
  """Every call of the command on this workdir (study_calls.jsonl): when, how long, what."""
  path = os.path.join(root, 'study_calls.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def load_study(name: str):
  return config_module('study').get_config('' if name in ('', 'default') else name)


def parse_args(argv):
  parser = argparse.ArgumentParser(
      prog='python -m bigkd.study', description=package_doc.split('\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog='example: python -m bigkd.study runs/study   (46 min measured on 2 CPU cores shared '
      'with other jobs; docs/study.md)')
  parser.add_argument('workdir', help='where the runs, study.json, study.md and the PNGs go')
  parser.add_argument('--seeds', type=int, default=0, help='seeds 0..N-1 (default: the config)')
  parser.add_argument('--only', default='',
                      help=f'comma-separated parts to run (known: {", ".join(PARTS)}); default: '
                      'the config\'s (modes,patience,resolution,optimizer). The report covers '
                      'every part finished on disk')
  parser.add_argument('--config', default='default', help='configs/study.py variant: '
                      'default | fast')
  parser.add_argument('--compile_cache', default='WORKDIR/jax_cache',
                      help="jax's persistent compilation cache ('' for none): each run compiles "
                      'its own train step, but init, evaluation and reruns hit the cache')
  return parser.parse_args(argv)


def enable_compile_cache(path: str) -> None:
  import jax
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)


def single_threaded_blas() -> None:
  """OpenBLAS to one thread once jax has loaded LAPACK (see OPENBLAS_NUM_THREADS in
  bigkd/study/__init__.py), for a caller that imported numpy before this package."""
  try:
    import jax.numpy as jnp
    import threadpoolctl
  except ImportError:
    return
  jnp.linalg.eigh(jnp.eye(2))
  threadpoolctl.threadpool_limits(1, user_api='blas')


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    study = load_study(args.config)
  except ValueError as e:
    print(f'bigkd.study: error: {e}', file=sys.stderr)
    return 2
  if args.seeds:
    study.seeds = args.seeds
  parts = comma_list(args.only or study.parts)
  unknown = [p for p in parts if p not in PARTS]
  if unknown or args.seeds < 0:
    print(f'bigkd.study: error: --only {",".join(unknown)}: unknown part (known: '
          f'{", ".join(PARTS)})' if unknown else 'bigkd.study: error: --seeds must be >= 1',
          file=sys.stderr)
    return 2
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  if args.compile_cache:
    enable_compile_cache(args.compile_cache.replace('WORKDIR', root))
  single_threaded_blas()
  from bigkd.study import analysis, report
  start = time.time()
  print(f'bigkd.study: {study.seeds} seed(s), parts {",".join(parts)} in {root}', flush=True)
  runner = Study(study, root, out=lambda line: print(line, flush=True))
  from bigkd import stages
  from bigkd.checkpoint import CheckpointError
  from bigkd.config import ConfigError
  from bigkd.data.sources import DataError
  try:
    runner.run(parts)
  except (ConfigError, CheckpointError, DataError) as e:  # e.g. a run made by another study
    print(f'bigkd.study: error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  except stages.Preempted as e:
    print(f'bigkd.study: preempted: {e}', file=sys.stderr)
    return stages.PREEMPTED_EXIT_CODE
  elapsed = time.time() - start
  call = dict(started=time.strftime('%Y-%m-%dT%H:%M:%S', time.localtime(start)),
              wall_s=round(elapsed, 1), parts=parts, seeds=study.seeds,
              trained=len(runner.trained), load_average_at_end=machine()['load_average'])
  with open(os.path.join(root, 'study_calls.jsonl'), 'a') as f:
    f.write(json.dumps(call) + '\n')
  results = collect(study, root)
  results.update(config=study.to_dict(), machine=machine(),
                 timing=analysis.timing(results, elapsed, parts, calls(root)))
  written = report.write_report(results, root)
  print(f'bigkd.study: {elapsed / 60:.1f} min; wrote {", ".join(written)}', flush=True)
  return 0
