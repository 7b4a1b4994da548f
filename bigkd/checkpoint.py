"""Checkpoints of a stage's student (orbax) and loading of teachers / initialisations.

A stage folder holds `stage.json` (model, resolution, num_classes: what is needed to rebuild the
model), `checkpoints/<step>/{params,opt_state}` and, once finished, `summary.json`. The teacher
is never saved with the student: a stage's checkpoint holds only its own parameters.
"""
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model."""


def manager(stage_dir: str, keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(stage_dir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_handlers={'params': ocp.StandardCheckpointHandler(),
                     'opt_state': ocp.StandardCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, params, opt_state) -> None:
  """Asynchronous: call `mngr.wait_until_finished()` before reading it or exiting."""
  mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                          opt_state=ocp.args.StandardSave(opt_state)))


def restore_state(mngr: ocp.CheckpointManager, step: int, state):
  """The TrainState saved at `step`, restored into the shapes, dtypes and shardings of `state`
  (a TrainState of the same stage, e.g. the freshly built step 0)."""
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        (state.params, state.opt_state))
  out = mngr.restore(step, args=ocp.args.Composite(
      params=ocp.args.StandardRestore(target[0]), opt_state=ocp.args.StandardRestore(target[1])))
  return state.replace(step=jax.device_put(np.int32(step), state.step.sharding),
                       params=out['params'], opt_state=out['opt_state'])


def shape_mismatches(params, abstract_params) -> list[str]:
  """Names every missing, unexpected or mis-shaped leaf of `params` against `abstract_params`."""
  def flat(tree):
    return {jax.tree_util.keystr(path): np.shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(params), flat(abstract_params)
  problems = [f'missing {k}' for k in want if k not in have]
  problems += [f'unexpected {k}' for k in have if k not in want]
  problems += [f'{k} has shape {have[k]}, model needs {want[k]}'
               for k in want if k in have and have[k] != want[k]]
  return problems


def check_fit(params, abstract_params, what: str) -> None:
  problems = shape_mismatches(params, abstract_params)
  if problems:
    more = f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''
    raise CheckpointError(f'{what} does not fit the model: {"; ".join(problems[:3])}{more}')


def write_stage_info(stage_dir, model, model_kwargs, resolution, num_classes) -> None:
  os.makedirs(stage_dir, exist_ok=True)
  with open(os.path.join(stage_dir, 'stage.json'), 'w') as f:
    json.dump(dict(model=model, model_kwargs=model_kwargs, resolution=resolution,
                   num_classes=num_classes), f)


def read_stage_info(stage_dir: str) -> dict:
  path = os.path.join(stage_dir, 'stage.json')
  if not os.path.isfile(path):
    raise CheckpointError(f'{stage_dir!r} is not a bigkd stage folder (no stage.json)')
  with open(path) as f:
    return json.load(f)


def _latest_step(source: str, what: str):
  """(manager, latest step) of a bigkd stage folder; CheckpointError when it has none."""
  if not os.path.isdir(os.path.join(source, 'checkpoints')):
    raise CheckpointError(f'{what}: no checkpoints in {source!r}')
  mngr = manager(source)
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    raise CheckpointError(f'{what}: no checkpoints in {source!r}')
  return mngr, step


def _read_npz(source: str, what: str, new_head_classes, shapes_only=False):
  if not os.path.isfile(source):
    raise CheckpointError(f'{what}: checkpoint file {source!r} does not exist')
  from bigkd.models import bit
  return bit.load_npz(source, num_classes=new_head_classes, shapes_only=shapes_only)


def check_fits(source: str, model: str, model_kwargs: dict, num_classes: int, resolution: int,
               what: str, new_head_classes: int | None = None) -> None:
  """Raises CheckpointError unless `source` (stage folder or .npz) exists and has exactly the
  parameter shapes of `model`. Reads metadata and headers only: nothing is loaded or placed."""
  from bigkd.models import param_shapes
  want = param_shapes(model, num_classes, resolution, **model_kwargs)
  if source.endswith('.npz'):
    have = _read_npz(source, what, new_head_classes, shapes_only=True)
  else:
    mngr, step = _latest_step(source, what)
    have = mngr.item_metadata(step)['params']
    mngr.close()
  check_fit(have, want, f'{what} ({source})')


def load_params(source: str, abstract_params, what: str, new_head_classes: int | None = None):
  """Parameters from a bigkd stage folder (its latest checkpoint) or a BiT .npz file, checked
  against `abstract_params` (ShapeDtypeStructs with shardings) before they are placed.

  `new_head_classes`: for a student initialised from a pretrained .npz (e.g. a 21,843-class
  BiT-M), a zero head for this many classes replaces the file's. Teachers never get one.
  """
  if source.endswith('.npz'):
    params = _read_npz(source, what, new_head_classes)
  else:
    mngr, step = _latest_step(source, what)
    metadata = mngr.item_metadata(step)['params']
    check_fit(metadata, abstract_params, f'{what} ({source})')
    params = mngr.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))['params']
    mngr.close()
  check_fit(params, abstract_params, f'{what} ({source})')
  return jax.tree.map(_placed, params, abstract_params)


def _placed(x, target):
  """`x` with the dtype and sharding of `target`. Orbax restores global arrays that may span
  other processes' devices (never fetched to the host); .npz arrays are numpy, the same on every
  process, and each process places only its own slices."""
  if isinstance(x, jax.Array):
    x = x if x.sharding == target.sharding else jax.device_put(x, target.sharding)
    return x if x.dtype == target.dtype else x.astype(target.dtype)
  from bigkd.sharding import put_global
  return put_global(np.asarray(x, target.dtype), target.sharding)
