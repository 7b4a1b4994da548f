"""Adapters: small trainable maps from a student feature to the shape of a teacher feature, so
that a feature loss (FitNet hints, `bigkd.losses.fitnet_loss`) can compare features of different
widths and resolutions.

  [B, H, W, C_s] -> [B, H', W', C_t]: 1x1 convolution + GroupNorm, with a bilinear resize when
      (H, W) != (H', W'). FitNets' regressor (Romero et al. 2015) as a 1x1 conv + norm, the form
      later feature-distillation work settled on; GroupNorm rather than BatchNorm, like the
      models (no batch statistics in the train state).
  [B, C_s] -> [B, C_t]: a dense layer.

`target_shape` is the teacher feature's per-example shape, as `bigkd.models.feature_shapes`
returns it.

`ShallowClassifier`: a classifier on an intermediate feature ("be your own teacher"), trained
with the model and never exported.

`StudentBranch`: a student-friendly teacher's branch (Park et al. 2021): a transform of a
teacher feature to the shape of the student's feature at the same tap, then the student's own
layers after that tap; trained with the teacher, never exported.

`ContrastiveHeads`: CRD's two embedding heads (a linear map of each side's vector feature to a
`dim`-dimensional unit vector), trained with the student and never exported.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class FeatureAdapter(nn.Module):
  target_shape: tuple[int, ...]  # (H', W', C_t) or (C_t,)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.ndim - 1 != len(self.target_shape) or len(self.target_shape) not in (1, 3):
      raise ValueError(f'cannot adapt a feature of shape {x.shape[1:]} to {self.target_shape}: '
                       'both must be spatial (H, W, C) or both vectors (C,)')
    if len(self.target_shape) == 1:
      return nn.Dense(self.target_shape[0], dtype=self.dtype)(x)
    height, width, channels = self.target_shape
    conv = nn.Conv(channels, (1, 1), use_bias=False, dtype=self.dtype)

    def resize(y):
      if y.shape[1:3] == (height, width):
        return y
      return jax.image.resize(y, (y.shape[0], height, width, y.shape[-1]), 'bilinear')

    # The 1x1 conv mixes channels pixel by pixel and the resize mixes pixels channel by channel;
    # both are linear, so they commute: resize on the side with fewer channels.
    y = conv(resize(x)) if x.shape[-1] <= channels else resize(conv(x))
    # gcd: the most groups up to 32 (BiT's count) that divide any channel count.
    return nn.GroupNorm(num_groups=math.gcd(32, channels), dtype=self.dtype)(y)


class ContrastiveHeads(nn.Module):
  """(student embedding, teacher embedding) of a pair of vector features: for each side a dense
  layer to `dim` and an L2 normalisation (CRD's `Embed`, one per side)."""
  dim: int

  @nn.compact
  def __call__(self, student_feature, teacher_feature):
    embed = lambda x, name: _unit(nn.Dense(self.dim, name=name)(x.astype(jnp.float32)))
    return embed(student_feature, 'student'), embed(teacher_feature, 'teacher')


def _unit(x, eps=1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps ** 2))


class ShallowClassifier(nn.Module):
  """(logits, feature) of a spatial feature [B, H, W, C]: a 1x1 convolution to `width` channels
  (the final embedding's, so that the feature can be compared with it) + GroupNorm + ReLU, a
  global average pool (the feature, [B, width]) and a dense layer to the classes. The
  bottleneck + pool + classifier of "be your own teacher" (Zhang et al. 2019), at its smallest."""
  num_classes: int
  width: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.width, (1, 1), use_bias=False)(x.astype(jnp.float32))
    y = nn.relu(nn.GroupNorm(num_groups=math.gcd(32, self.width))(y))
    feature = jnp.mean(y, axis=(1, 2))
    return nn.Dense(self.num_classes)(feature), feature


class StudentBranch(nn.Module):
  """Logits of a student branch on a teacher feature [B, H, W, C_t] (SFTN, Park et al. 2021):
  the transform layer T_i, a 1x1 convolution to the student's channels + GroupNorm + ReLU (the
  paper's conv + BN + ReLU, GroupNorm like the models), with a bilinear resize when the
  teacher's map is not the student's size (a teacher at another resolution); then `student`
  (a registry model that takes `from_tap`) from tap `tap` onward: its later blocks and head."""
  student: nn.Module
  tap: str
  tap_shape: tuple[int, ...]  # the student's feature at `tap`: (H, W, C)

  @nn.compact
  def __call__(self, x):
    height, width, channels = self.tap_shape
    y = nn.Conv(channels, (1, 1), use_bias=False, name='transform_conv')(x.astype(jnp.float32))
    if y.shape[1:3] != (height, width):
      y = jax.image.resize(y, (y.shape[0], height, width, channels), 'bilinear')
    y = nn.relu(nn.GroupNorm(num_groups=math.gcd(32, channels), name='transform_norm')(y))
    return self.student(y, from_tap=self.tap)
