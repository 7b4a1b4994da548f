"""The device mesh and where arrays live on it.

Mesh axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose members also hold
a slice of each large parameter). The batch is split over both axes; a parameter (and its
optimiser state) is split over `fsdp` along its largest dimension divisible by the fsdp size when
it has at least `min_fsdp_size` elements, and replicated otherwise.
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A (data, fsdp) mesh over all devices; -1 on one axis means "the rest"."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  n = devices.size
  if data == -1 and fsdp == -1:
    raise ValueError('mesh: at most one of data, fsdp may be -1')
  data = n // fsdp if data == -1 else data
  fsdp = n // data if fsdp == -1 else fsdp
  if data * fsdp != n:
    raise ValueError(f'mesh data={data} x fsdp={fsdp} does not match the {n} devices')
  return Mesh(devices.reshape(data, fsdp), BATCH_AXES)


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


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A host array (the same on every process) placed as a global array, multi-host safe."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])
