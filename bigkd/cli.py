"""What every command-line entry point shares: `--help`, flag parsing and the one-line errors.

Exit codes: 0 success; 2 bad command line, config or input (one `bigkd: error:` line on stderr,
before any work); 3 the loss or gradients went NaN/Inf (nothing bad saved); 75 preempted by
SIGTERM/SIGINT after a checkpoint at the current step (re-run to resume); 1 anything else.
"""
import importlib.util
import os
import sys

from absl import flags


def _bundled_configs() -> str:
  """The bundled configs: bigkd/configs/ in an installed package (pyproject.toml maps the
  top-level configs/ there), configs/ beside bigkd/ in a checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  packaged = os.path.join(here, 'configs')
  if os.path.isfile(os.path.join(packaged, '__init__.py')):
    return packaged
  return os.path.join(os.path.dirname(here), 'configs')


BUNDLED_CONFIGS = _bundled_configs()


def fail(message: str, code: int = 2):
  print(f'bigkd: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def config_flag_values(argv) -> flags.FlagValues:
  """A fresh set of flags (one per call: a `main` can run many times in-process) holding the
  `--config configs/x.py[:variant]` flag that every command takes; the command adds its own."""
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Config file (configs/x.py[:variant]).',
                                  lock_config=True, flag_values=fv, sys_argv=argv)
  return fv


def flags_help(flag_values: flags.FlagValues) -> str:
  """The program's own flags with their help and defaults (absl's built-in ones left out)."""
  text = flag_values.get_help().split('\nabsl.flags:')[0]
  return '\n'.join(l for l in text.splitlines() if l.strip() and not l.endswith(':')
                   or l.startswith('  '))


def bundled_config_path(value: str) -> str:
  """`--config` value with `configs/NAME.py` (or `NAME.py`) pointing at the config bundled with
  bigkd when no such file exists here: the documented commands work from any directory and from
  an installed package. A file of that name in the current directory wins."""
  path, colon, variant = value.partition(':')
  bundled = os.path.join(BUNDLED_CONFIGS, os.path.basename(path))
  if (not os.path.exists(path) and os.path.dirname(path) in ('', 'configs')
      and os.path.isfile(bundled)):
    return bundled + colon + variant
  return value


def config_module(name: str):
  """The bundled config `configs/NAME.py` as a module (its `get_config` and constants), loaded
  by path: configs import the library, the library never imports configs."""
  module_name = f'bigkd_config_{name}'
  if module_name not in sys.modules:
    spec = importlib.util.spec_from_file_location(module_name,
                                                  os.path.join(BUNDLED_CONFIGS, f'{name}.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[module_name] = module
  return sys.modules[module_name]


def with_bundled_configs(argv: list) -> list:
  """argv with each `--config` value passed through `bundled_config_path`."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg.startswith('--config=') or arg.startswith('-config='):
      flag, _, value = arg.partition('=')
      out[i] = f'{flag}={bundled_config_path(value)}'
    elif arg in ('--config', '-config') and i + 1 < len(out):
      out[i + 1] = bundled_config_path(out[i + 1])
  return out


FIELDS_FLAG = '--fields'


def parse(flag_values: flags.FlagValues, argv, usage: str):
  """Parses `argv` into `flag_values`; `--help`/`-h` prints `usage` and the flags (exit 0);
  `--fields` prints every field of the resolved config with its default and meaning (exit 0).
  A bad flag or config file (missing file, bad variant, bad override) is a `fail` naming it."""
  if any(a in ('--help', '-h', '--helpfull', '-help') for a in argv[1:]):
    print(f'{usage.strip()}\n\nflags:\n{flags_help(flag_values)}\n  {FIELDS_FLAG}: print '
          'every field of the --config (after overrides): value, default, meaning; then exit')
    sys.exit(0)
  fields = FIELDS_FLAG in argv[1:]
  argv = [a for a in argv if a != FIELDS_FLAG]
  try:
    flag_values(argv)
    if 'config' in flag_values and flag_values.config is not None:
      flag_values.config.to_dict()  # a config file that failed to load raises here
  except Exception as e:  # a bad flag, or a config file's error (bad variant, bad value)
    fail(one_line(e))
  if 'config' in flag_values and flag_values.config is None:
    fail('--config is required')
  if 'config' in flag_values and 'stage_order' not in flag_values.config:
    fail(f'{flag_values["config"].config_filename} is not a training config (no stages); '
         'configs/study.py is run by python -m bigkd.study')
  if fields:
    from bigkd.config import describe_fields
    print(describe_fields(flag_values.config))
    sys.exit(0)


def one_line(error: Exception) -> str:
  """The useful line of a flag or config-file error. A config file's own error arrives as
  "flag --config=...: Error whilst parsing config file:" followed by a traceback whose last line
  is the message; a misspelt override is a KeyError holding 'key' and a suggestion."""
  while error.args and isinstance(error.args[0], Exception):  # e.g. AttributeError(KeyError(..))
    error = error.args[0]
  text = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
  if isinstance(error, KeyError):
    text = f'unknown config field {text}'
  lines = [l.strip() for l in str(text).splitlines() if l.strip()] or [type(error).__name__]
  if (lines[0].endswith(':') or isinstance(error, OSError)) and len(lines) > 1:
    return f'{lines[0]} {lines[-1]}'
  return ' '.join(lines) if len(lines) <= 3 else lines[0]
