"""Small models for small images: a plain CNN and CIFAR-style ResNets (He et al. 2016, sec. 4.2).

resnet{6n+2} has three stages of n basic blocks with 16k, 32k, 64k channels (k the width
multiplier, `resnet8x4` has k=4). GroupNorm replaces BatchNorm (see the registry docstring).

Feature taps (sown into 'intermediates', see `bigkd.models.features`), for R x R images:
  CifarResNet: stage1 [B, R, R, 16k], stage2 [B, R/2, R/2, 32k], stage3 [B, R/4, R/4, 64k]
               (each stage's last block output, after its ReLU; halvings round up),
               prelogits [B, 64k] (the global average pool the dense head reads).
  SmallCNN (width w): stage1 [B, R/2, R/2, w], stage2 [B, R/4, R/4, 2w] (after each max pool;
               halvings round down), prelogits [B, (R/4)^2 * 2w] (the flattened map).
"""
import functools

import flax.linen as nn
import jax.numpy as jnp

from bigkd.models.registry import register


def _norm(channels: int, dtype) -> nn.Module:
  return nn.GroupNorm(num_groups=min(8, channels), dtype=dtype)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual; a 1x1 projection when the shape changes."""
  channels: int
  stride: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.channels, (3, 3), strides=self.stride)(x)
    y = nn.relu(_norm(self.channels, self.dtype)(y))
    y = conv(self.channels, (3, 3))(y)
    y = _norm(self.channels, self.dtype)(y)
    if x.shape[-1] != self.channels or self.stride != 1:
      x = conv(self.channels, (1, 1), strides=self.stride, name='proj')(x)
      x = _norm(self.channels, self.dtype)(x)
    return nn.relu(x + y)


class CifarResNet(nn.Module):
  num_classes: int
  blocks_per_stage: int
  width: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, from_tap=None):
    """Logits of `images`; with `from_tap` ('stage1', 'stage2' or 'stage3'), `images` is that
    tap's feature and only the blocks after it (and the head) run. Every layer is made either
    way, so the parameter names are the full model's (a branch's parameters are a subtree of
    the full model's)."""
    stem_conv = nn.Conv(16 * self.width, (3, 3), use_bias=False, dtype=self.dtype)
    stem_norm = _norm(16 * self.width, self.dtype)
    stages = [[BasicBlock(channels * self.width, 2 if (stage > 0 and i == 0) else 1, self.dtype)
               for i in range(self.blocks_per_stage)]
              for stage, channels in enumerate((16, 32, 64))]
    first = _first_stage_after(from_tap, len(stages))
    x = images.astype(self.dtype)
    if first == 0:
      x = nn.relu(stem_norm(stem_conv(x)))
    for stage in range(first, len(stages)):
      for block in stages[stage]:
        x = block(x)
      self.sow('intermediates', f'stage{stage + 1}', x)
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'prelogits', x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def _first_stage_after(from_tap, num_stages: int) -> int:
  """The index of the first stage to run: 0 for the whole model, k after tap 'stage{k}'."""
  if from_tap is None:
    return 0
  taps = [f'stage{k + 1}' for k in range(num_stages)]
  if from_tap not in taps:
    raise ValueError(f'cannot run from tap {from_tap!r}: one of {", ".join(taps)}')
  return taps.index(from_tap) + 1


class SmallCNN(nn.Module):
  """conv-relu-pool twice, then a dense layer on the flattened map (LeNet-like: small images
  keep their layout, which a global pool would lose). A fast student for tests and demos."""
  num_classes: int
  width: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images, from_tap=None):
    """Logits of `images`; with `from_tap` ('stage1' or 'stage2'), of that tap's feature
    through the layers after it (names as in the full model, see `CifarResNet`)."""
    convs = [nn.Conv(self.width * mult, (3, 3), dtype=self.dtype) for mult in (1, 2)]
    x = images.astype(self.dtype)
    for stage in range(_first_stage_after(from_tap, len(convs)), len(convs)):
      x = nn.max_pool(nn.relu(convs[stage](x)), (2, 2), strides=(2, 2))
      self.sow('intermediates', f'stage{stage + 1}', x)
    x = x.reshape(x.shape[0], -1)
    self.sow('intermediates', 'prelogits', x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


def _register_resnet(depth: int, width: int):
  name = f'resnet{depth}' + (f'x{width}' if width > 1 else '')

  @register(name)
  def factory(num_classes, dtype=jnp.float32):
    return CifarResNet(num_classes, (depth - 2) // 6, width, dtype)


for _depth in (8, 14, 20, 32, 44, 56, 110):
  for _width in (1, 2, 4):
    _register_resnet(_depth, _width)

for _name, _width in (('cnn_tiny', 8), ('cnn_small', 16), ('cnn_base', 32)):
  register(_name)(functools.partial(lambda w, num_classes, dtype=jnp.float32:
                                    SmallCNN(num_classes, w, dtype), _width))
