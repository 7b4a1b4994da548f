"""Vision Transformer (Dosovitskiy et al. 2021), laid out like big_vision's, read from and written
to the AugReg .npz files (Steiner et al. 2021, "How to train your ViT?").

The image is cut into patch x patch squares, each embedded by one conv (kernel = stride = patch),
a learned class token is prepended (pool 'token'; pool 'gap' has none), a learned position
embedding is added to every token, and `depth` pre-norm encoder blocks follow:
    x = x + MHA(LN(x));  x = x + MLP(LN(x))     MLP: Dense -> GELU (tanh form) -> Dense
then a final LayerNorm, the class token (or the mean of all tokens for 'gap') and a dense head,
zero-initialised as in big_vision. Dropout and stochastic depth are left out (no train flag, like
every bigkd model).

Submodules are named after the AugReg files, so the params tree is the file's layout and loading
is a key split. The names are the pre-linen ones those files carry (big_vision itself renames
them to linen's MultiHeadDotProductAttention_0 / LayerNorm_1 / MlpBlock_0 and keeps a top-level
`pos_embedding` without the class token's slot; such files are not read here):
  embedding/{kernel (p, p, 3, D), bias}          cls (1, 1, D)  (pool 'token' only)
  Transformer/posembed_input/pos_embedding (1, N, D): N = 1 + (R/p)^2 tokens ('token'), or (R/p)^2
  Transformer/encoderblock_{i}/LayerNorm_0, LayerNorm_2          {scale, bias} (D,)
  Transformer/encoderblock_{i}/MultiHeadDotProductAttention_1/{query,key,value}/kernel (D, H, D/H)
      .../{query,key,value}/bias (H, D/H),  .../out/kernel (H, D/H, D),  .../out/bias (D,)
  Transformer/encoderblock_{i}/MlpBlock_3/Dense_0 (D -> mlp), Dense_1 (mlp -> D)
  Transformer/encoder_norm/{scale, bias}         head/{kernel (D, classes), bias}

Feature taps (sown into 'intermediates', see `bigkd.models.features`), for R x R images, patch p
and width D (g = R // p, the patch grid; pixels beyond it are dropped, as by a VALID conv):
  block1 ... block{depth} [B, g, g, D]: the residual stream after each encoder block (`blockN`
  is the output of encoderblock_{N-1}), the class token dropped and the patch tokens laid out on
  their grid, so that the NHWC feature losses (attention transfer, FitNet) apply unchanged.
  prelogits [B, D]: after the final LayerNorm and the pool ('token' or 'gap'), what the head reads.
"""
import functools
import math
import re
from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage

from bigkd import paths
from bigkd.models.bit import CheckpointMismatchError, raise_mismatch, read_arrays
from bigkd.models.registry import get_model, register

# name: (width, depth, heads, mlp width), as in the ViT and AugReg papers.
SIZES = {'ti': (192, 12, 3, 768), 's': (384, 12, 6, 1536), 'b': (768, 12, 12, 3072),
         'l': (1024, 24, 16, 4096)}


def _layer_norm(dtype, name):
  # Exact (two-pass) variance, as the reference formula; statistics in float32 whatever dtype.
  return nn.LayerNorm(epsilon=1e-6, dtype=dtype, use_fast_variance=False, name=name)


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense. flax's `nn.gelu` defaults to the tanh approximation, which is what
  big_vision and the AugReg models were trained with."""
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = functools.partial(nn.Dense, dtype=self.dtype,
                              kernel_init=nn.initializers.xavier_uniform(),
                              bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(dense(self.mlp_dim)(x), approximate=True)
    return dense(x.shape[-1])(y)


class EncoderBlock(nn.Module):
  """Pre-norm block: x + MHA(LN(x)), then x + MLP(LN(x)). Softmax runs in float32."""
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    y = _layer_norm(self.dtype, 'LayerNorm_0')(x)
    y = nn.MultiHeadDotProductAttention(
        self.num_heads, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
        force_fp32_for_softmax=True, name='MultiHeadDotProductAttention_1')(y, y)
    x = x + y
    y = _layer_norm(self.dtype, 'LayerNorm_2')(x)
    return x + MlpBlock(self.mlp_dim, self.dtype, name='MlpBlock_3')(y)


class Encoder(nn.Module):
  """+ position embedding, the blocks, the final LayerNorm (the files' `Transformer` scope).
  Returns (normalised tokens, [the residual stream after each block])."""
  depth: int
  num_heads: int
  mlp_dim: int
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    x = x + PositionEmbedding(name='posembed_input')(x).astype(self.dtype)
    block = nn.remat(EncoderBlock) if self.remat else EncoderBlock
    streams = []
    for i in range(self.depth):
      x = block(self.num_heads, self.mlp_dim, self.dtype, name=f'encoderblock_{i}')(x)
      streams.append(x)
    return _layer_norm(self.dtype, 'encoder_norm')(x), streams


class PositionEmbedding(nn.Module):
  """A learned (1, tokens, width) table, normal with std 1/sqrt(width) as in big_vision."""

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    return self.param('pos_embedding', nn.initializers.normal(stddev=1 / math.sqrt(width)),
                      (1, *x.shape[1:]))


class VisionTransformer(nn.Module):
  """ViT: `patch` x `patch` patches of width `width`, `depth` blocks of `num_heads` heads."""
  num_classes: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  patch: int
  pool: str = 'token'
  dtype: jnp.dtype = jnp.float32
  remat: bool = False

  @nn.compact
  def __call__(self, images):
    if self.pool not in ('token', 'gap'):
      raise ValueError(f"ViT pool must be 'token' or 'gap', not {self.pool!r}")
    p = self.patch
    x = nn.Conv(self.width, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                name='embedding')(images.astype(self.dtype))
    batch, h, w, _ = x.shape
    x = x.reshape(batch, h * w, self.width)
    has_cls = self.pool == 'token'
    if has_cls:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width)).astype(self.dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.width)), x], axis=1)
    x, streams = Encoder(self.depth, self.num_heads, self.mlp_dim, self.dtype, self.remat,
                         name='Transformer')(x)
    for i, stream in enumerate(streams):
      patch_tokens = stream[:, int(has_cls):]
      self.sow('intermediates', f'block{i + 1}', patch_tokens.reshape(batch, h, w, -1))
    x = x[:, 0] if has_cls else jnp.mean(x.astype(jnp.float32), axis=1)
    x = x.astype(self.dtype)
    self.sow('intermediates', 'prelogits', x)
    return nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name='head')(x).astype(jnp.float32)


def _register(size, patch):
  width, depth, heads, mlp = SIZES[size]

  @register(f'vit_{size}{patch}')
  def factory(num_classes, dtype=jnp.float32, pool='token', remat=False):
    """`pool`: 'token' (the class token, as the AugReg classifiers) or 'gap' (no class token)."""
    return VisionTransformer(num_classes, width, depth, heads, mlp, patch, pool, dtype, remat)


for _size in SIZES:
  for _patch in (16, 32):
    _register(_size, _patch)


@register('vit_tiny_test')
def _tiny(num_classes, dtype=jnp.float32, pool='token', patch=4, remat=False):
  """For tests and the digits (configs/digits_vit.py): width 32, 2 blocks of 2 heads, mlp 64;
  4 x 4 patches by default."""
  return VisionTransformer(num_classes, 32, 2, 2, 64, patch, pool, dtype, remat)


# --- The AugReg .npz layout. -----------------------------------------------------------------

_EMBED, _POS, _HEAD, _BIAS = ('embedding/kernel', 'Transformer/posembed_input/pos_embedding',
                              'head/kernel', 'head/bias')
_QUERY = 'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/query/kernel'
_MLP = 'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'


def flatten(params) -> dict:
  """Params tree -> {file key: array}: the tree's path joined by '/'."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {'/'.join(k.key for k in path): leaf for path, leaf in leaves}


def unflatten(flat: dict) -> dict:
  """{file key: array} -> params tree."""
  tree = {}
  for key, value in flat.items():
    *parents, leaf = key.split('/')
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def resize_pos_embedding(pos_embedding, grid: int, has_cls: bool) -> np.ndarray:
  """`pos_embedding` (1, [1 +] g*g, D) for a grid x grid patch grid: the patch tokens' table is
  resized bilinearly on its 2-D grid (scipy's zoom, order 1, corners kept: big_vision's
  `resample_posemb`, the "high-res fine-tuning" of the ViT paper); the class token's entry stays."""
  head, table = np.split(np.asarray(pos_embedding), [int(has_cls)], axis=1)
  old = math.isqrt(table.shape[1])
  if old * old != table.shape[1]:
    raise CheckpointMismatchError(f'{_POS} {tuple(pos_embedding.shape)}: its {table.shape[1]} '
                                  'patch tokens are not a square grid')
  if old == grid:
    return pos_embedding
  zoom = grid / old
  table = scipy.ndimage.zoom(table.reshape(old, old, -1), (zoom, zoom, 1), order=1)
  return np.concatenate([head, table.reshape(1, grid * grid, -1)], axis=1)


def _file_resolution(flat: dict) -> int:
  """The resolution whose patch grid the file's position embedding covers."""
  tokens = flat[_POS].shape[1] - ('cls' in flat)
  return flat[_EMBED].shape[0] * math.isqrt(max(tokens, 0))


def resolution_of(params) -> int | None:
  """The smallest resolution whose patch grid a ViT params tree (or its shapes) covers; None when
  `params` is not a ViT's (for code that holds only a model's parameter shapes)."""
  if not isinstance(params, Mapping) or 'Transformer' not in params or 'embedding' not in params:
    return None
  return _file_resolution(flatten(params))


def _infer_model(flat: dict, num_classes: int, where) -> VisionTransformer:
  """The ViT a file describes: patch and width (embedding), heads, mlp width, depth, pool."""
  missing = [k for k in (_EMBED, _POS, _QUERY, _MLP) if k not in flat]
  if missing:
    raise_mismatch(f'{where} (pass model= : its architecture cannot be inferred)', missing=missing)
  depth = 1 + max(int(m[1]) for k in flat if (m := re.match(r'Transformer/encoderblock_(\d+)/', k)))
  patch, _, _, width = flat[_EMBED].shape
  return VisionTransformer(num_classes, width, depth, flat[_QUERY].shape[1], flat[_MLP].shape[1],
                           patch, 'token' if 'cls' in flat else 'gap')


def _compare(where, have: dict, model: nn.Module, resolution: int):
  """`have`: {file key: shape}. Raises naming the keys missing, extra or mis-shaped."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  want = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)['params']
  want = {k: tuple(v.shape) for k, v in flatten(want).items()}
  raise_mismatch(where, missing=want.keys() - have.keys(), unexpected=have.keys() - want.keys(),
                 misshaped=[f'{k} {have[k]} vs model {want[k]}' for k in want.keys() & have.keys()
                            if have[k] != want[k]])


def load_npz(path, model: nn.Module | str | None = None, num_classes: int | None = None,
             resolution: int | None = None, shapes_only: bool = False) -> dict:
  """Reads an AugReg-layout .npz into a params tree for `model.apply({'params': p}, images)`.

  `num_classes`: a zero head for that many classes when the file's has another count.
  `resolution`: the images the model will see; when their patch grid differs from the file's
  position embedding, that table is resized (`resize_pos_embedding`). `model` (a module or a
  registry name, built with the resulting class count) is what the file is checked against;
  when None, the architecture is inferred from the file. Raises CheckpointError (unreadable
  file) or CheckpointMismatchError, one line naming `path` and the first few keys that do not
  fit. `shapes_only`: read only the arrays' headers (stand-ins for checks).
  """
  flat = dict(read_arrays(path, shapes_only))
  file_classes = flat[_HEAD].shape[-1] if np.ndim(flat.get(_HEAD)) == 2 else None
  if num_classes is not None and file_classes not in (None, num_classes):
    flat[_HEAD] = np.zeros((flat[_HEAD].shape[0], num_classes), np.float32)
    flat[_BIAS] = np.zeros((num_classes,), np.float32)
  classes = num_classes or file_classes or 1
  if isinstance(model, str):
    model = get_model(model, num_classes=classes)
  model = model or _infer_model(flat, classes, path)
  if resolution is not None and _POS in flat and np.ndim(flat.get(_EMBED)) == 4:
    grid = resolution // flat[_EMBED].shape[0]
    try:
      flat[_POS] = resize_pos_embedding(flat[_POS], grid, 'cls' in flat)
    except CheckpointMismatchError as e:
      raise CheckpointMismatchError(f'{path} does not fit the model: {e}') from None
  if resolution is None:
    resolution = _file_resolution(flat) if _POS in flat and _EMBED in flat else 224
  _compare(path, {k: tuple(v.shape) for k, v in flat.items()}, model, resolution)
  return unflatten(flat)


def save_npz(params, path) -> None:
  """Writes `params` in the AugReg layout (flat '/'-joined keys, float32) to exactly `path`."""
  arrays = {k: np.asarray(v, np.float32) for k, v in flatten(params).items()}
  with paths.Path(path).open('wb') as f:
    np.savez(f, **arrays)
