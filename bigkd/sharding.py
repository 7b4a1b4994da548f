"""The device mesh and where arrays live on it.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose members also hold
a slice of each large parameter). The batch is split over both axes; a parameter (and its
optimiser state) is split over `fsdp` along its largest dimension divisible by the fsdp size when
it has at least `min_fsdp_size` elements, and replicated otherwise. The rule depends only on an
array's shape, so Adam's moments get exactly the shardings of their parameters.

Multi-host: every helper here builds global arrays from the slices a process's own devices hold
(`jax.make_array_from_callback`), so a process only touches its share of a host array.
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigkd.config import ConfigError

BATCH_AXES = ('data', 'fsdp')


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
  """(data, fsdp) with -1 resolved; a `ConfigError` naming the sizes when they do not fit."""
  if data == -1 and fsdp == -1:
    raise ConfigError('mesh: at most one of mesh.data, mesh.fsdp may be -1')
  if data == 0 or fsdp == 0 or data < -1 or fsdp < -1:
    raise ConfigError(f'mesh.data={data}, mesh.fsdp={fsdp}: sizes must be positive (or -1)')
  rest = num_devices // max(data, fsdp, 1)
  data, fsdp = (rest if data == -1 else data), (rest if fsdp == -1 else fsdp)
  if data * fsdp != num_devices:
    raise ConfigError(f'mesh.data={data} x mesh.fsdp={fsdp} does not match the '
                      f'{num_devices} devices')
  return data, fsdp


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over all devices (of every process); -1 on one axis means "the rest".

  `jax.devices()` lists devices process by process, so each process's devices hold a contiguous
  range of the batch."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices.reshape(mesh_shape(data, fsdp, devices.size)), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape, fsdp_size: int, min_fsdp_size: int = 2 ** 18) -> P:
  """Shard the largest dimension divisible by `fsdp_size` over `fsdp` (if the tensor is large)."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_fsdp_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      return P(*[('fsdp' if d == dim else None) for d in range(len(shape))])
  return P()


def tree_shardings(mesh: Mesh, tree, min_fsdp_size: int = 2 ** 18):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp_size, min_fsdp_size)), tree)


def fsdp_compute_sharding(mesh: Mesh):
  """Where parameters go for the forward/backward pass: with an fsdp axis, whole (gathered per
  step, ZeRO-3 style) so that activations stay split by batch and GSPMD does not improvise
  tensor parallelism; None (leave them be) without one."""
  return replicated(mesh) if mesh.shape['fsdp'] > 1 else None


def init_opt_state(tx, params, mesh: Mesh, min_fsdp_size: int = 2 ** 18):
  """`tx.init(params)` with the optimiser state sharded by the parameters' rule.

  Explicit because `jax.jit(tx.init)` does not propagate shardings: zeros_like does not depend on
  its input's values, so the moments would land, unsharded, on one device."""
  shardings = tree_shardings(mesh, jax.eval_shape(tx.init, params), min_fsdp_size)
  return jax.jit(tx.init, out_shardings=shardings)(params)


def describe(params) -> str:
  """One line: how many parameter arrays (and what share of the elements) are split over fsdp."""
  leaves = jax.tree.leaves(params)
  split = [x for x in leaves if 'fsdp' in jax.tree.leaves(tuple(x.sharding.spec))]
  size = lambda xs: sum(int(np.prod(x.shape)) for x in xs)
  share = size(split) / max(size(leaves), 1)
  return (f'{len(split)}/{len(leaves)} parameter arrays ({100 * share:.0f}% of elements) '
          'split over fsdp')


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) placed as a global array, multi-host safe."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def put_rows_sharded(array: np.ndarray, mesh: Mesh) -> jax.Array:
  """`array` split by rows over every device (zero rows pad it to a multiple of the device
  count); each device, and so each process, holds and reads only its own rows."""
  pad = -len(array) % mesh.size
  padded = np.pad(array, [(0, pad)] + [(0, 0)] * (array.ndim - 1)) if pad else array
  return put_global(padded, batch_sharding(mesh))


def gather_rows(mesh: Mesh, table: jax.Array, indices: jax.Array) -> jax.Array:
  """`table[indices]` for a row-sharded `table` (see `put_rows_sharded`) and replicated
  `indices`, returned sharded over the batch axes.

  Each device picks the requested rows it holds (zeros elsewhere) and a reduce-scatter sums the
  picks into each device's slice of the batch: exact (every row has one owner), no device ever
  holds the whole table, and the traffic is one batch of images per step."""
  rows = table.shape[0] // mesh.size

  def pick_local(shard, idx):
    offset = idx - jax.lax.axis_index(BATCH_AXES) * rows
    mine = (offset >= 0) & (offset < rows)
    picked = shard[jnp.clip(offset, 0, rows - 1)]
    picked = jnp.where(mine.reshape((-1,) + (1,) * (shard.ndim - 1)), picked,
                       jnp.zeros((), shard.dtype))
    return jax.lax.psum_scatter(picked, BATCH_AXES, scatter_dimension=0, tiled=True)

  return jax.shard_map(pick_local, mesh=mesh, in_specs=(P(BATCH_AXES), P()),
                       out_specs=P(BATCH_AXES))(table, indices)
