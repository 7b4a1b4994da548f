"""Checkpoints of a stage's student (orbax) and loading of teachers / initialisations.

A stage folder holds `stage.json` (model, resolution, num_classes: what is needed to rebuild the
model), `checkpoints/<step>/{params,opt_state[,metric_sums,aux_params]}` and, once finished,
`summary.json`. The teacher is never saved with the student: a stage's checkpoint holds only its
own parameters (and, apart from them, the feature adapters that trained with it).
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from bigkd import paths


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model."""


def manager(stage_dir: str, keep: int = 2) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      paths.absolute(stage_dir) / 'checkpoints',
      # Temporary folders of saves cut short (a killed run) are removed when a manager opens.
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           cleanup_tmp_directories=True),
      item_handlers={'params': ocp.StandardCheckpointHandler(),
                     'opt_state': ocp.StandardCheckpointHandler(),
                     'metric_sums': ocp.StandardCheckpointHandler(),
                     'aux_params': ocp.StandardCheckpointHandler(),
                     'loss_state': ocp.StandardCheckpointHandler(),
                     'integrity': ocp.JsonCheckpointHandler()})


def _words(x) -> jax.Array:
  """The bits of `x`, flattened, as uint32 words (whatever its dtype)."""
  x = x.reshape(-1)
  if x.dtype == jnp.bool_ or x.dtype.itemsize == 1:
    return x.astype(jnp.uint32)
  if x.dtype.itemsize == 2:
    return jax.lax.bitcast_convert_type(x, jnp.uint16).astype(jnp.uint32)
  return jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)


@jax.jit
def checksum(tree) -> jax.Array:
  """A position-weighted sum, mod 2**32, of the bits of every leaf: computed on device, the same
  whatever the sharding (integer sums wrap exactly, in any order). Orbax restores overwritten
  bytes of a data file without complaint; this catches them."""
  total = jnp.uint32(0)
  for i, leaf in enumerate(jax.tree.leaves(tree)):
    words = _words(jnp.asarray(leaf))
    weights = jax.lax.iota(jnp.uint32, words.size) * jnp.uint32(2654435761) + jnp.uint32(2 * i + 1)
    total = total + jnp.sum(words * weights, dtype=jnp.uint32)
  return total


def state_items(state) -> dict:
  """The checkpoint items of a TrainState: params, opt_state, metric_sums and, for a stage with
  adapters or CRD heads, aux_params (its own item: `params` stays the student alone, which is
  all that teachers, `init` and notebooks read) and, with CRD, loss_state (its queues)."""
  items = dict(params=state.params, opt_state=state.opt_state, metric_sums=state.metric_sums)
  for name in ('aux_params', 'loss_state'):
    if getattr(state, name):
      items[name] = getattr(state, name)
  return items


def save(mngr: ocp.CheckpointManager, step: int, state) -> None:
  """Asynchronous: call `mngr.wait_until_finished()` before reading it or exiting. With the
  arrays goes their checksum (`integrity`), which `restore_state` verifies."""
  items = state_items(state)
  integrity = {name: int(checksum(value)) for name, value in items.items()}
  mngr.save(step, args=ocp.args.Composite(
      integrity=ocp.args.JsonSave(integrity),
      **{name: ocp.args.StandardSave(value) for name, value in items.items()}))


def verify(mngr: ocp.CheckpointManager, step: int, restored: dict) -> None:
  """Raises CheckpointError when restored items differ from the checksums saved with them."""
  saved = mngr.restore(step, args=ocp.args.Composite(integrity=ocp.args.JsonRestore()))
  for name, value in restored.items():
    if int(checksum(value)) != saved['integrity'][name]:
      raise CheckpointError(f'{name} do not match their checksum (overwritten data)')


def restore_state(mngr: ocp.CheckpointManager, step: int, state):
  """The TrainState saved at `step`, restored into the shapes, dtypes and shardings of `state`
  (a TrainState of the same stage, e.g. the freshly built step 0)."""
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state_items(state))
  out = mngr.restore(step, args=ocp.args.Composite(
      **{name: ocp.args.StandardRestore(value) for name, value in target.items()}))
  verify(mngr, step, out)
  return state.replace(step=jax.device_put(np.int32(step), state.step.sharding), **out)


def warn(message: str) -> None:
  """One line on stderr (process 0 only: every process would say the same)."""
  if jax.process_index() == 0:
    print(f'bigkd: warning: {message}', file=sys.stderr, flush=True)


def short_reason(error: Exception, limit: int = 160) -> str:
  """The first sentence of an error's first line, with its type, at most `limit` characters:
  what a one-line warning about a damaged checkpoint can say (TensorStore's run on for pages)."""
  message = error.args[0] if isinstance(error, KeyError) and error.args else error
  text = (str(message).strip().splitlines() or [''])[0].split('. See full')[0]
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= limit else text[:limit - 3] + '...'



def restore_newest_good(mngr: ocp.CheckpointManager, state, stage: str):
  """(state, step) from the newest checkpoint that restores; (state, 0) when there is none.

  Orbax finds some damage (a garbled metadata file, truncated or overwritten data) only while
  restoring, so each step is tried, newest first. A damaged one is named in one warning line and
  moved out of the way (to `damaged_checkpoints/` beside `checkpoints/`, kept for a look) so the
  run can save that step again; a stage whose checkpoints are all damaged raises
  CheckpointError rather than silently starting again from scratch."""
  steps = sorted(mngr.all_steps(), reverse=True)
  damaged = []
  for i, step in enumerate(steps):
    try:
      restored, error = restore_state(mngr, step, state), None
    except Exception as e:  # orbax raises many types (ValueError, OSError, KeyError, ...)
      restored, error = None, e
    if agreed(error is None):
      for bad, reason in damaged:
        move_aside(mngr, bad, reason)
      return restored, step
    fallback = f'falling back to step {steps[i + 1]}' if i + 1 < len(steps) else 'none left'
    reason = short_reason(error) if error else 'unreadable on another process'
    warn(f'checkpoint {step} of stage {stage} is unreadable ({reason}); {fallback}')
    damaged.append((step, reason))
  if damaged:
    steps = ', '.join(str(bad) for bad, _ in damaged)
    raise CheckpointError(f'stage {stage}: no readable checkpoint in {mngr.directory} '
                          f'(step(s) {steps} damaged); move the folder away to start the stage '
                          'again')
  return state, 0


def agreed(ok: bool) -> bool:
  """True when `ok` holds on every process (one tiny all-gather, at resume time only): all
  processes must fall back to the same step."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def move_aside(mngr: ocp.CheckpointManager, step: int, reason: str) -> None:
  """Moves a damaged step to `damaged_checkpoints/<step>` (replacing an older one there), with
  why in `damaged_checkpoints/<step>.txt`."""
  directory = paths.Path(mngr.directory)
  if jax.process_index() == 0:
    aside = directory.parent / 'damaged_checkpoints'
    paths.write_text(aside / f'{step}.txt', reason + '\n')
    paths.move(directory / str(step), aside / str(step))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f'bigkd: moved damaged checkpoint {step}')
  mngr.reload()


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


def write_stage_info(stage_dir, model, model_kwargs, resolution, num_classes,
                     class_names=(), peers=None) -> None:
  """stage.json: what a stage's parameters are (enough to load them without the config) and the
  names of its classes by label (so predictions read as names). A mutual stage's (model '')
  also names its `peers` {name: {model, model_kwargs, resolution}}: its parameters are
  {peer: params}, and each peer has a stage folder of its own (`save_peers`)."""
  info = dict(model=model, model_kwargs=model_kwargs, resolution=resolution,
              num_classes=num_classes, class_names=list(class_names))
  if peers:
    info['peers'] = peers
  paths.write_json(paths.Path(stage_dir) / 'stage.json', info, indent=None)


def save_peers(stage_dir, step: int, params: dict, peers: dict, num_classes: int,
               class_names=()) -> None:
  """Writes each peer of a mutual stage ({peer: params} at `step`; `peers` {peer: {model,
  model_kwargs, resolution}}) as a stage folder STAGE_DIR/PEER of its own: stage.json and a
  checkpoint of its parameters alone, so that a later stage names it as a teacher, or `init`,
  or a notebook opens it, as any stage. A peer already saved at `step` is left as it is (a
  re-run after a stop between this and the summary writes the same values)."""
  for name, info in peers.items():
    peer_dir = paths.Path(stage_dir) / name
    if jax.process_index() == 0:
      write_stage_info(peer_dir, info['model'], info['model_kwargs'], info['resolution'],
                       num_classes, class_names)
    mngr = manager(peer_dir, keep=1)
    if mngr.latest_step() != step:
      mngr.save(step, args=ocp.args.Composite(
          integrity=ocp.args.JsonSave({'params': int(checksum(params[name]))}),
          params=ocp.args.StandardSave(params[name])))
    mngr.wait_until_finished()
    mngr.close()


def read_stage_info(stage_dir: str) -> dict:
  path = paths.Path(stage_dir) / 'stage.json'
  if not path.is_file():
    raise CheckpointError(f'{stage_dir!r} is not a bigkd stage folder (no stage.json)')
  return paths.read_json(path)


def _latest_step(source: str, what: str):
  """(manager, latest step) of a bigkd stage folder; CheckpointError when it has none."""
  if not (paths.Path(source) / 'checkpoints').is_dir():
    raise CheckpointError(f'{what}: no checkpoints in {source!r}')
  mngr = manager(source)
  step = mngr.latest_step()
  if step is None:
    mngr.close()
    raise CheckpointError(f'{what}: no checkpoints in {source!r}')
  return mngr, step


def _read_npz(source: str, what: str, new_head_classes, shapes_only=False,
              vit_resolution: int | None = None):
  """A .npz file's params: BiT's released layout or, given `vit_resolution` (a ViT model), the
  AugReg ViT layout with its position embedding resized to that resolution's patch grid."""
  if not paths.Path(source).is_file():
    raise CheckpointError(f'{what}: checkpoint file {source!r} does not exist')
  from bigkd.models import bit, vit
  if vit_resolution is not None:
    return vit.load_npz(source, num_classes=new_head_classes, resolution=vit_resolution,
                        shapes_only=shapes_only)
  return bit.load_npz(source, num_classes=new_head_classes, shapes_only=shapes_only)


def check_fits(source: str, model: str, model_kwargs: dict, num_classes: int, resolution: int,
               what: str, new_head_classes: int | None = None) -> None:
  """Raises CheckpointError unless `source` (stage folder or .npz) exists and has exactly the
  parameter shapes of `model`. Reads metadata and headers only: nothing is loaded or placed."""
  from bigkd.models import param_shapes
  want = param_shapes(model, num_classes, resolution, **model_kwargs)
  if source.endswith('.npz'):
    have = _read_npz(source, what, new_head_classes, shapes_only=True,
                     vit_resolution=resolution if model.startswith('vit_') else None)
  else:
    mngr, step = _latest_step(source, what)
    have = mngr.item_metadata(step)['params']
    mngr.close()
  check_fit(have, want, f'{what} ({source})')


def load_params(source: str, abstract_params, what: str, new_head_classes: int | None = None):
  """Parameters from a bigkd stage folder (its latest checkpoint) or a BiT or ViT .npz file,
  checked against `abstract_params` (ShapeDtypeStructs with shardings) before they are placed.
  A ViT's (its params have a `Transformer`) .npz is read at the resolution its position
  embedding in `abstract_params` covers (resized from the file's when that differs).

  `new_head_classes`: for a student initialised from a pretrained .npz (e.g. a 21,843-class
  BiT-M), a zero head for this many classes replaces the file's. Teachers never get one.
  """
  if source.endswith('.npz'):
    from bigkd.models import vit
    params = _read_npz(source, what, new_head_classes,
                       vit_resolution=vit.resolution_of(abstract_params))
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
