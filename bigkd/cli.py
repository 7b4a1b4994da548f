"""What every command-line entry point shares: `--help`, flag parsing and the one-line errors.

Exit codes: 0 success; 2 bad command line, config or input (one `bigkd: error:` line on stderr,
before any work); 3 the loss or gradients went NaN/Inf (nothing bad saved); 75 preempted by
SIGTERM/SIGINT after a checkpoint at the current step (re-run to resume); 1 anything else.
"""
import sys

from absl import flags


def fail(message: str, code: int = 2):
  print(f'bigkd: error: {message}', file=sys.stderr, flush=True)
  sys.exit(code)


def flags_help(flag_values: flags.FlagValues) -> str:
  """The program's own flags with their help and defaults (absl's built-in ones left out)."""
  text = flag_values.get_help().split('\nabsl.flags:')[0]
  return '\n'.join(l for l in text.splitlines() if l.strip() and not l.endswith(':')
                   or l.startswith('  '))


def parse(flag_values: flags.FlagValues, argv, usage: str):
  """Parses `argv` into `flag_values`; `--help`/`-h` prints `usage` and the flags (exit 0).
  A bad flag or config file (missing file, bad variant, bad override) is a `fail` naming it."""
  if any(a in ('--help', '-h', '--helpfull', '-help') for a in argv[1:]):
    print(f'{usage.strip()}\n\nflags:\n{flags_help(flag_values)}')
    sys.exit(0)
  try:
    flag_values(argv)
    if 'config' in flag_values and flag_values.config is not None:
      flag_values.config.to_dict()  # a config file that failed to load raises here
  except Exception as e:  # a bad flag, or a config file's error (bad variant, bad value)
    fail(one_line(e))
  if 'config' in flag_values and flag_values.config is None:
    fail('--config is required')


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
