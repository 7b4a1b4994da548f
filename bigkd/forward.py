"""One forward: a model on a view -> float32 logits and the requested feature taps.

The train step, the evaluation and `bigkd.inspect` all call `forward`, so what a notebook
predicts is what the loop trained and evaluated.
"""
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigkd.data import augment
from bigkd.models import features


class Teacher(NamedTuple):
  """A frozen teacher: its module (computing in the teacher dtype) and input resolution."""
  model: nn.Module
  resolution: int


class Peer(NamedTuple):
  """A model of a deep-mutual-learning stage: its name (its key in the stage's parameters), its
  module (computing in the stage's compute dtype) and input resolution."""
  name: str
  model: nn.Module
  resolution: int


def forward(model: nn.Module, params, view, taps=()):
  """(float32 logits, {tap: float32 feature}) of `model` on `view`, computed in the model's
  dtype; `taps` are sown in the same pass (`bigkd.models.features`)."""
  view = view.astype(model.dtype)
  if taps:
    logits, feats = features(model, params, view, sorted(taps))
  else:
    logits, feats = model.apply({'params': params}, view), {}
  return logits.astype(jnp.float32), feats


def render_views(teachers, images, draws, image_hw=None) -> dict:
  """The teachers' (or peers') views {resolution: view}, rendered once per distinct resolution."""
  return {size: augment.render_view(images, draws, size, image_hw)
          for size in sorted({t.resolution for t in teachers})}


def teacher_forward(teachers, teacher_params, views, taps=None) -> list:
  """[(logits, {tap: feature})] of each frozen teacher on its view, without gradient;
  `taps[i]`: the features wanted of teacher i (None: none)."""
  taps = taps or [()] * len(teachers)
  return [jax.lax.stop_gradient(forward(t.model, params, views[t.resolution], names))
          for t, params, names in zip(teachers, teacher_params, taps)]


def eval_draws(sizes, crop_fraction: float) -> augment.Draws:
  """The evaluation view's draws: the central crop of the paper's code (resize_small(S) then
  central_crop(R), `crop_fraction` = R / S; 0: the whole image), no flip, no mixup."""
  return augment.Draws(augment.central_boxes(sizes, crop_fraction),
                       jnp.zeros(sizes.shape[:1], bool), None)


def eval_forward(model, params, resolution, crop_fraction, images, sizes, taps=()):
  """`forward` on the evaluation view of a batch of canvases."""
  view = augment.render_view(images, eval_draws(sizes, crop_fraction), resolution, sizes)
  return forward(model, params, view, taps)
