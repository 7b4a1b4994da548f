"""BiT ResNetV2 (Kolesnikov et al. 2020, "Big Transfer") and its released .npz checkpoint format.

Pre-activation bottleneck ResNet with GroupNorm (32 groups) and weight-standardised convolutions,
so it has no batch statistics and transfers at any batch size. Submodules are named after the
released files, so the params tree is that file's layout with `resnet/` dropped and GroupNorm's
gamma/beta spelled scale/bias; loading and saving are a key mapping:

  resnet/root_block/standardized_conv2d/kernel          -> root_block/standardized_conv2d/kernel
  resnet/block2/unit01/a/group_norm/gamma               -> block2/unit01/a/group_norm/scale
  resnet/block2/unit01/a/proj/standardized_conv2d/kernel (the projection, from a's pre-activation)
  resnet/group_norm/{gamma,beta}, resnet/head/conv2d/{kernel,bias}  (head kernel (1, 1, C, classes))

In a unit, `x/group_norm` is the norm applied before conv `x` (pre-activation), as in the files.

Feature taps (sown into 'intermediates', see `bigkd.models.features`), for R x R images and
c = base * width root channels (64 * width for the released models):
  stage1 [B, R/4, R/4, 4c], stage2 [B, R/8, R/8, 8c], stage3 [B, R/16, R/16, 16c],
  stage4 [B, R/32, R/32, 32c]: each block's output, the residual stream before any norm (the
  network is pre-activation, so no block ends with one); every halving rounds up.
  prelogits [B, 32c]: after the final GroupNorm + ReLU and the global average pool, what the
  head reads.
`apply(params, feature, from_tap='stageK')` runs only the blocks after tap stageK and the head
(a student branch of a student-friendly teacher, `bigkd.models.adapters.StudentBranch`).
"""
import functools
import re
import zipfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigkd import paths
from bigkd.models.registry import get_model, register

BLOCK_UNITS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


class CheckpointError(ValueError):
  """A checkpoint file cannot be read as a .npz archive."""


class CheckpointMismatchError(CheckpointError):
  """A params tree or file does not have the keys and shapes the model expects."""


def standardize(kernel, eps=1e-10):
  """Weight standardisation: zero mean, unit variance per output channel over (H, W, C_in),
  the variance in two passes (exact, as the reference formula). Reduced as a [H·W·C_in, C_out]
  matrix over its rows: XLA:CPU runs the same reductions over three axes of the 4-D kernel, and
  their gradients, 3-13x slower (benchmarks/README.md); the values agree to float rounding."""
  rows = kernel.reshape(-1, kernel.shape[-1])
  centered = rows - jnp.mean(rows, axis=0)
  var = jnp.mean(centered * centered, axis=0)
  return (centered / jnp.sqrt(var + eps)).reshape(kernel.shape)


def standardize_kernels(params):
  """`params` with every StdConv kernel standardised: what a model built with
  `standardized=True` reads. A frozen teacher's kernels never change, so they are standardised
  once at load rather than in every step's forward."""
  def leaf(path, x):
    keys = [getattr(k, 'key', None) for k in path]
    return standardize(x) if keys[-2:] == ['standardized_conv2d', 'kernel'] else x
  return jax.tree_util.tree_map_with_path(leaf, params)


def _group_norm(dtype):
  # Exact (two-pass) variance: matches the reference formula, not E[x^2] - E[x]^2.
  return nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=dtype, use_fast_variance=False,
                      name='group_norm')


class StdConv(nn.Module):
  """Bias-free conv with a standardised kernel, padded (k-1)//2 on each side as in BiT.

  Standardisation runs on the param in its own dtype; only the result is cast to `dtype`.
  `standardized`: the kernel param is already standardised (`standardize_kernels`: a frozen
  teacher's, done once instead of at every step).
  """
  features: int
  kernel_size: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32
  standardized: bool = False

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.he_normal(), (k, k, x.shape[-1], self.features))
    kernel = kernel if self.standardized else standardize(kernel)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


def conv2d(x, kernel, stride: int):
  """NHWC x HWIO convolution padded (k-1)//2 on each side. On the CPU, a convolution whose
  output is smaller than its kernel but larger than 1 (a 3x3 conv with a 2x2 output: BiT's
  block4 at 64 px) runs as image patches times the kernel matrix: XLA:CPU's own convolution of
  that shape is 10-20x slower, in the forward pass and the input gradient (8 x 2 x 2 x 512 with a
  3x3x512x512 kernel: 72 ms forward, 3.2 ms as patches; benchmarks/README.md). Other platforms,
  and every other shape, keep the convolution; the two agree to float rounding."""
  k, pad = kernel.shape[0], (kernel.shape[0] - 1) // 2
  padding = ((pad, pad), (pad, pad))
  numbers = ('NHWC', 'HWIO', 'NHWC')

  def convolution(x, kernel):
    return jax.lax.conv_general_dilated(x, kernel, (stride,) * 2, padding,
                                        dimension_numbers=numbers)

  def patches_times_kernel(x, kernel):
    patches = jax.lax.conv_general_dilated_patches(x, (k, k), (stride,) * 2, padding,
                                                   dimension_numbers=numbers)
    # A patch's features are ordered (C_in, kernel row, kernel column).
    matrix = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, kernel.shape[-1])
    return jnp.einsum('nhwp,pc->nhwc', patches, matrix)

  out = [(size + 2 * pad - k) // stride + 1 for size in x.shape[1:3]]
  if not any(1 < size < k for size in out):
    return convolution(x, kernel)
  return jax.lax.platform_dependent(x, kernel, cpu=patches_times_kernel, default=convolution)


class Conv(nn.Module):
  """A scope holding one StdConv: the released `root_block` and `proj` layers."""
  features: int
  kernel_size: int
  stride: int = 1
  dtype: jnp.dtype = jnp.float32
  standardized: bool = False

  @nn.compact
  def __call__(self, x):
    return StdConv(self.features, self.kernel_size, self.stride, self.dtype, self.standardized,
                   name='standardized_conv2d')(x)


class PreActConv(nn.Module):
  """GN -> ReLU -> conv: a unit's `a`, `b` or `c`. `a` also holds the projection shortcut,
  computed from the same pre-activated input; returns (conv output, shortcut or None)."""
  features: int
  kernel_size: int
  stride: int = 1
  proj_features: int | None = None
  proj_stride: int = 1
  dtype: jnp.dtype = jnp.float32
  standardized: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.relu(_group_norm(self.dtype)(x))
    shortcut = None
    if self.proj_features:
      shortcut = Conv(self.proj_features, 1, self.proj_stride, self.dtype, self.standardized,
                      name='proj')(x)
    y = StdConv(self.features, self.kernel_size, self.stride, self.dtype, self.standardized,
                name='standardized_conv2d')(x)
    return y, shortcut


class Unit(nn.Module):
  """Pre-activation bottleneck: 1x1 to `mid`, 3x3 carrying the stride, 1x1 to 4*mid, + shortcut."""
  mid: int
  stride: int = 1
  proj: bool = False
  dtype: jnp.dtype = jnp.float32
  standardized: bool = False

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(PreActConv, dtype=self.dtype, standardized=self.standardized)
    y, shortcut = conv(self.mid, 1, proj_features=4 * self.mid if self.proj else None,
                       proj_stride=self.stride, name='a')(x)
    y, _ = conv(self.mid, 3, self.stride, name='b')(y)
    y, _ = conv(4 * self.mid, 1, name='c')(y)
    return y + (x if shortcut is None else shortcut)


class Block(nn.Module):
  """`units` bottleneck units; the first strides and projects."""
  mid: int
  units: int
  stride: int
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  standardized: bool = False

  @nn.compact
  def __call__(self, x):
    unit = nn.remat(Unit) if self.remat else Unit  # remat trades recompute for activation memory
    for i in range(self.units):
      stride = self.stride if i == 0 else 1
      x = unit(self.mid, stride, i == 0, self.dtype, self.standardized,
               name=f'unit{i + 1:02d}')(x)
    return x


class Head(nn.Module):
  """1x1 conv on the pooled features (the released `head/conv2d`), zero-initialised as in BiT."""
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.Conv(self.num_classes, (1, 1), dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='conv2d')(x)


class ResNetV2(nn.Module):
  """BiT ResNetV2: `base`*`width` root channels; block b has mid channels base*width*2**b."""
  num_classes: int
  block_units: tuple[int, ...] = BLOCK_UNITS[50]
  width: int = 1
  base: int = 64
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  standardized: bool = False  # the kernel params are standardised already (standardize_kernels)

  @nn.compact
  def __call__(self, images, from_tap=None):
    """Logits of `images`; with `from_tap` ('stage1' ... 'stage4'), `images` is that tap's
    feature and only the blocks after it, the final norm and the head run (parameter names as
    in the full model)."""
    c = self.base * self.width
    taps = [f'stage{b + 1}' for b in range(len(self.block_units))]
    if from_tap is not None and from_tap not in taps:
      raise ValueError(f'cannot run from tap {from_tap!r}: one of {", ".join(taps)}')
    first = 0 if from_tap is None else taps.index(from_tap) + 1
    x = images.astype(self.dtype)
    if first == 0:
      x = Conv(c, 7, 2, self.dtype, self.standardized, name='root_block')(x)
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))  # zeros, then VALID: BiT's pool, not SAME
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    for b in range(first, len(self.block_units)):
      stride = 1 if b == 0 else 2
      x = Block(c * 2**b, self.block_units[b], stride, self.dtype, self.remat,
                self.standardized, name=f'block{b + 1}')(x)
      self.sow('intermediates', f'stage{b + 1}', x)
    x = nn.relu(_group_norm(self.dtype)(x))
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
    self.sow('intermediates', 'prelogits', x[:, 0, 0])
    return Head(self.num_classes, self.dtype, name='head')(x)[:, 0, 0].astype(jnp.float32)


def _register(depth, width):
  @register(f'bit_r{depth}x{width}')
  def factory(num_classes, dtype=jnp.float32, remat=False, base=64, block_units=None):
    """`base` and `block_units` shrink the net for smoke tests (an explicit model_kwargs)."""
    units = tuple(block_units) if block_units is not None else BLOCK_UNITS[depth]
    return ResNetV2(num_classes, units, width, base=base, dtype=dtype, remat=remat)


for _depth in BLOCK_UNITS:
  for _width in (1, 2, 3, 4):
    _register(_depth, _width)


@register('bit_tiny')
def _tiny(num_classes, dtype=jnp.float32, remat=False):
  """For tests only: the BiT architecture at 32 root channels (GN's 32 groups still divide every
  width) and units (2, 1, 1, 1), so both projected and identity shortcuts are exercised."""
  return ResNetV2(num_classes, (2, 1, 1, 1), 1, base=32, dtype=dtype, remat=remat)


# --- The released .npz layout. ---------------------------------------------------------------

_CONV_SPELLING = re.compile(r'/standardized_conv2d_\d+/')
_GN_NAMES = {'scale': 'gamma', 'bias': 'beta'}
_ROOT, _HEAD, _BIAS = ('resnet/root_block/standardized_conv2d/kernel', 'resnet/head/conv2d/kernel',
                       'resnet/head/conv2d/bias')


def flat_key(path) -> str:
  """Params-tree path (tuple of names) -> released file key."""
  *parents, leaf = path
  if parents and parents[-1] == 'group_norm':
    leaf = _GN_NAMES.get(leaf, leaf)
  return '/'.join(('resnet', *parents, leaf))


def flatten(params) -> dict[str, np.ndarray]:
  """Params tree -> {released key: array}."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {flat_key(tuple(k.key for k in path)): leaf for path, leaf in leaves}


def unflatten(flat: dict[str, np.ndarray]) -> dict:
  """{released key: array} (plain spelling) -> params tree."""
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')[1:]
    if parents[-1] == 'group_norm':
      leaf = {v: k for k, v in _GN_NAMES.items()}[leaf]
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def _listing(keys, limit=3) -> str:
  keys = sorted(keys)
  more = f', +{len(keys) - limit} more' if len(keys) > limit else ''
  return ', '.join(keys[:limit]) + more


def raise_mismatch(where, missing=(), unexpected=(), misshaped=()):
  """One-line CheckpointMismatchError naming the first few keys of each kind, with counts."""
  parts = [f'{len(keys)} {kind} ({_listing(keys)})' for kind, keys in
           (('missing', missing), ('unexpected', unexpected), ('mis-shaped', misshaped)) if keys]
  if parts:
    raise CheckpointMismatchError(f'{where} does not fit the model: ' + '; '.join(parts))


def _compare(where, have: dict, model: nn.Module, image_size: int, unexpected=()):
  """`have`: {released key: shape}. Raises naming every key missing, extra or mis-shaped."""
  images = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  want = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)['params']
  want = {k: tuple(v.shape) for k, v in flatten(want).items()}
  raise_mismatch(where, missing=want.keys() - have.keys(),
            unexpected=[*unexpected, *(have.keys() - want.keys())],
            misshaped=[f'{k} {have[k]} vs model {want[k]}' for k in want.keys() & have.keys()
                       if have[k] != want[k]])


def check_params_fit(params, model: nn.Module, image_size: int = 224, where: str = 'params'):
  """Raises CheckpointMismatchError naming every key `params` lacks, has extra, or has in another
  shape than `model.init` would give. Shapes only (jax.eval_shape): nothing is allocated."""
  _compare(where, {k: tuple(np.shape(v)) for k, v in flatten(params).items()}, model, image_size)


def _zero_head(channels: int, num_classes: int) -> dict:
  return {'kernel': np.zeros((1, 1, channels, num_classes), np.float32),
          'bias': np.zeros((num_classes,), np.float32)}


def reinit_head(params, num_classes: int) -> dict:
  """A copy of `params` with a zero head for `num_classes` classes (BiT's transfer init)."""
  channels = params['head']['conv2d']['kernel'].shape[2]
  return {**params, 'head': {'conv2d': _zero_head(channels, num_classes)}}


def _infer_model(flat: dict, num_classes: int, where) -> ResNetV2:
  """The ResNetV2 a file describes: its root channels and the unit count of each block."""
  if _ROOT not in flat:
    raise_mismatch(f'{where} (pass model= : its architecture cannot be inferred)', missing=[_ROOT])
  units = [0] * 4
  for key in flat:
    if m := re.match(r'resnet/block([1-4])/unit(\d+)/', key):
      units[int(m[1]) - 1] = max(units[int(m[1]) - 1], int(m[2]))
  return ResNetV2(num_classes, tuple(units), 1, base=flat[_ROOT].shape[-1])


def _read_npz(path) -> dict[str, np.ndarray]:
  with paths.Path(path).open('rb') as f, np.load(f, allow_pickle=False) as archive:
    return {k: np.asarray(archive[k]) for k in archive.files}


def _read_npz_headers(path) -> dict[str, np.ndarray]:
  """{key: a zero-stride stand-in with the stored shape and dtype}: only the .npy headers are
  read, so checking a multi-GB teacher file costs nothing."""
  arrays = {}
  with paths.Path(path).open('rb') as file, zipfile.ZipFile(file) as archive:
    for name in archive.namelist():
      with archive.open(name) as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read_header(f)
      arrays[name.removesuffix('.npy')] = np.broadcast_to(np.zeros((), dtype), shape)
  return arrays


def read_arrays(path, shapes_only: bool = False) -> dict[str, np.ndarray]:
  """{key: array} of the .npz file `path` (any layout; ViT's loader reads through it too).
  `shapes_only`: read-only stand-ins with the stored shapes and dtypes (headers only).
  Raises CheckpointError, one line naming `path`, when it is not a readable .npz."""
  try:
    return _read_npz_headers(path) if shapes_only else _read_npz(path)
  except Exception as e:  # noqa: BLE001  (any failure to read is reported the same way)
    detail = ' '.join(str(e).split())
    raise CheckpointError(f'{path}: not a readable .npz checkpoint ({type(e).__name__}: {detail})')


def load_npz(path, model: nn.Module | str | None = None, num_classes: int | None = None,
             shapes_only: bool = False) -> dict:
  """Reads a released-layout .npz into a params tree for `model.apply({'params': p}, images)`.

  Accepts the `standardized_conv2d_<N>` spelling and GroupNorm params stored as (C,) or with
  leading unit axes. `num_classes`: re-initialise the head (zeros) for that many classes when it
  differs from the file's. `model` (a module or registry name, built with the resulting class
  count) is what the file is checked against; when None, the architecture is inferred from the
  file (root width, units per block), which cannot notice a block's trailing units all missing.
  Raises CheckpointError (unreadable file) or CheckpointMismatchError, one line naming `path`.
  `shapes_only`: read only the arrays' headers (leaves are read-only stand-ins): for checks.
  """
  raw = read_arrays(path, shapes_only)
  flat, unexpected = {}, []
  for key, value in raw.items():
    plain = _CONV_SPELLING.sub('/standardized_conv2d/', key)
    if plain in flat:  # a second spelling of one key
      unexpected.append(key)
      continue
    gn = plain.endswith(('group_norm/gamma', 'group_norm/beta'))
    if gn and value.ndim > 1 and value.size == value.shape[-1]:
      value = value.reshape(-1)  # some files keep GN params as (1, 1, 1, C)
    flat[plain] = value
  file_classes = flat[_HEAD].shape[-1] if np.ndim(flat.get(_HEAD)) == 4 else None
  if num_classes is not None and file_classes not in (None, num_classes):
    head = _zero_head(flat[_HEAD].shape[2], num_classes)
    flat[_HEAD], flat[_BIAS] = head['kernel'], head['bias']
  classes = num_classes or file_classes or 1
  if isinstance(model, str):
    model = get_model(model, num_classes=classes)
  model = model or _infer_model(flat, classes, path)
  _compare(path, {k: v.shape for k, v in flat.items()}, model, 32, unexpected)
  return unflatten(flat)


def save_npz(params, path) -> None:
  """Writes `params` in the released layout (flat keys, HWIO kernels) to exactly `path`."""
  arrays = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  with paths.Path(path).open('wb') as f:
    np.savez(f, **arrays)
