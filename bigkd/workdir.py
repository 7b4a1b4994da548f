"""The workdir guard: a run's folder remembers the config it was started with.

Every check here runs before the workdir is touched (a refused run leaves it as it was): the
path can be made, the config differs from config.json only in fields that do not change the
result, and a started stage keeps its model and a finished one its length. Then `start` makes
the folder and writes the run-level records.
"""
import json
import os
import time

from bigkd import paths
from bigkd.config import SAFE_TO_CHANGE, ConfigError, comma_list, covered, flatten
from bigkd.checkpoint import read_stage_info, short_reason

ABSENT = '(absent)'


def _need(ok, message):
  if not ok:
    raise ConfigError(message)


def config_differences(stored: dict, current: dict) -> dict:
  """{field: (old, new)} of every leaf that differs between two JSON configs."""
  old, new = flatten(stored), flatten(current)
  return {k: (old.get(k, ABSENT), new.get(k, ABSENT)) for k in sorted(set(old) | set(new))
          if old.get(k, ABSENT) != new.get(k, ABSENT)}


def _show(value) -> str:
  return value if isinstance(value, str) and value else json.dumps(value)


def check_path(workdir: str) -> None:
  """The workdir is a folder that exists or can be made, checked without creating anything. In
  a bucket: the bucket exists and this process can reach it (every process checks; see
  stages.run), and the path is not an object."""
  _need(bool(workdir), '--workdir is empty')
  if paths.is_bucket(workdir):
    path = paths.Path(workdir)
    bucket = paths.bucket_of(path)
    try:
      found, is_file = bucket.exists(), path.is_file()
    except Exception as e:  # the storage client's many errors: no network, no credentials, ...
      raise ConfigError(f'workdir {workdir}: cannot reach the bucket ({short_reason(e)})') from None
    _need(found, f'workdir {workdir}: bucket {bucket} does not exist or is not visible '
          'with these credentials')
    _need(not is_file, f'workdir {workdir!r} is a file, not a folder')
    return
  path = paths.Path(workdir).absolute()
  _need(not path.exists() or path.is_dir(), f'workdir {workdir!r} is a file, not a folder')
  parent = path
  while not parent.exists():
    parent = parent.parent
  _need(parent.is_dir(), f'workdir {workdir!r} cannot be made: {str(parent)!r} is a file')
  _need(os.access(parent, os.W_OK | os.X_OK),
        f'workdir {workdir!r}: {str(parent)!r} is not writable')


def check_config(config, workdir: str) -> dict:
  """The changes of `config` against the config.json the workdir was started with (none for a
  new workdir): a `ConfigError` listing every field that changes the result and is not allowed;
  else {field: (old, new)} of the accepted ones, for the record."""
  path = paths.Path(workdir) / 'config.json'
  if not path.is_file():
    return {}
  try:
    stored = paths.read_json(path)
  except (OSError, ValueError) as e:
    raise ConfigError(f'workdir {workdir!r}: unreadable config.json ({e})') from None
  changes = config_differences(stored, json.loads(config.to_json_best_effort()))
  allowed = SAFE_TO_CHANGE + tuple(comma_list(config.allowed_changes))
  refused = [k for k in changes if not covered(k, allowed)]
  _need(not refused, f'workdir {workdir} was started with another config: ' + ', '.join(
      f'{k} {_show(changes[k][0])} -> {_show(changes[k][1])}' for k in refused)
        + f' (pass --config.allowed_changes={",".join(refused)} or use a new workdir)')
  return changes


def stage_record(plan) -> dict:
  """What stage.json says of a stage: the shape of its parameters."""
  record = dict(model=plan.model, model_kwargs=plan.model_kwargs, resolution=plan.resolution,
                num_classes=plan.num_classes)
  if plan.peers:
    record['peers'] = peer_records(plan)
  return record


def peer_records(plan) -> dict:
  """{peer: {model, model_kwargs, resolution}} of a mutual stage (what its stage.json says)."""
  return {p.name: dict(model=p.model, model_kwargs=p.model_kwargs, resolution=p.resolution)
          for p in plan.peers}


def check_started_stages(plans, workdir: str) -> None:
  """A stage already started in the workdir keeps the model its stage.json and checkpoints
  describe (also when allowed_changes or moved data would change it), and a finished stage is
  never extended or shortened (its summary, checkpoints and the later stages it taught would no
  longer match): either is an error naming the stage."""
  for plan in plans:
    stage_dir = paths.Path(workdir) / plan.name
    if (stage_dir / 'stage.json').is_file():
      started = read_stage_info(stage_dir)
      now = stage_record(plan)
      differ = [f'{k} {_show(started.get(k, ABSENT))} -> {_show(now[k])}' for k in now
                if started.get(k, ABSENT) != now[k]]
      _need(not differ, f'stages.{plan.name} was started in {stage_dir} with another model: '
            f'{", ".join(differ)}; its checkpoints cannot continue: use a new workdir')
    path = stage_dir / 'summary.json'
    if not path.is_file():
      continue
    done = paths.read_json(path).get('steps')
    _need(done in (None, plan.steps), f'stages.{plan.name} finished at {done} steps and would '
          f'now run {plan.steps}: a finished stage is not extended; use a new workdir')


def planned_not_to_fit(workdir, device_kind: str, device_count: int) -> list[str]:
  """The stages that WORKDIR/plan.json (`bigkd-plan --out`) says do not fit in device memory,
  when it was made for these devices (kind and count); [] without such a plan."""
  path = paths.Path(workdir) / 'plan.json'
  try:
    plan = paths.read_json(path) if path.is_file() else {}
  except ValueError:
    return []
  if (plan.get('device_kind'), plan.get('devices')) != (device_kind, device_count):
    return []
  return [name for name, stage in plan.get('stages', {}).items() if not stage.get('fits', True)]


def start(config, workdir: str, changes: dict, is_main: bool) -> None:
  """Makes the workdir; the main process writes config.json once (the run that starts the
  workdir; never rewritten) and appends accepted `changes` to config_changes.jsonl, so the
  records say what every run used."""
  try:
    paths.make_dirs(workdir)
  except OSError as e:
    raise ConfigError(f'workdir {workdir!r} cannot be made: {e.strerror}') from None
  if not is_main:
    return
  path = paths.Path(workdir) / 'config.json'
  if not path.exists():
    paths.write_text(path, config.to_json_best_effort(indent=1))
  if changes:
    paths.append_text(paths.Path(workdir) / 'config_changes.jsonl', json.dumps(
        {'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
         'changes': {k: list(v) for k, v in changes.items()}}) + '\n')
