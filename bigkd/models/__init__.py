"""Model registry: name -> flax.linen module.

Every model takes NHWC float images in [-1, 1] and returns float32 logits:
    model = get_model('resnet8x4', num_classes=10)
    logits = model.apply({'params': params}, images)
Parameters are a plain pytree (no batch statistics): models use GroupNorm, not BatchNorm, so
that they shard, checkpoint and load from .npz simply, and teacher forward needs no mutable state.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
  """Decorator: register `factory(num_classes, dtype, **kwargs) -> nn.Module` under `name`."""
  def wrap(factory):
    if name in _REGISTRY:
      raise ValueError(f'model {name!r} registered twice')
    _REGISTRY[name] = factory
    return factory
  return wrap


def model_names() -> list[str]:
  return sorted(_REGISTRY)


def get_model(name: str, num_classes: int, dtype=jnp.float32, **kwargs) -> nn.Module:
  """Returns the linen module `name` with `num_classes` outputs computing in `dtype`."""
  if name not in _REGISTRY:
    raise KeyError(f'unknown model {name!r}; known: {", ".join(model_names())}')
  return _REGISTRY[name](num_classes=num_classes, dtype=dtype, **kwargs)


def param_shapes(name: str, num_classes: int, resolution: int, **kwargs):
  """ShapeDtypeStructs of model `name`'s parameters (float32); nothing is computed."""
  model = get_model(name, num_classes, **kwargs)
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)['params']


from bigkd.models import bit, cifar  # noqa: E402,F401  (register bit_*, cnn_*, resnet*)
