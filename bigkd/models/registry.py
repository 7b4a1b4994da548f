"""The model registry: name -> factory of a linen module; shapes and feature taps of a model."""
import inspect
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


def runs_from_tap(name: str) -> bool:
  """Whether model `name` can run only its layers after a feature tap (`from_tap`, as a
  student-friendly teacher's branches do: `bigkd.models.adapters.StudentBranch`)."""
  module = type(get_model(name, num_classes=2))
  return 'from_tap' in inspect.signature(module.__call__).parameters


def _abstract_init(model: nn.Module, resolution: int, collections):
  """`model.init` on one image, shapes only (jax.eval_shape): nothing is computed."""
  images = jax.ShapeDtypeStruct((1, resolution, resolution, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, mutable=collections), images)


def param_shapes(name: str, num_classes: int, resolution: int, **kwargs):
  """ShapeDtypeStructs of model `name`'s parameters (float32); nothing is computed."""
  return _abstract_init(get_model(name, num_classes, **kwargs), resolution, ['params'])['params']


def feature_shapes(name: str, num_classes: int, resolution: int,
                   model_kwargs: dict | None = None) -> dict[str, tuple[int, ...]]:
  """{feature name: per-example shape (no batch axis)} of model `name` at `resolution`, e.g.
  {'stage1': (16, 16, 16), ..., 'prelogits': (64,)}: for checking a student/teacher feature pair
  before any work. Shapes only (jax.eval_shape): nothing is computed."""
  model = get_model(name, num_classes, **(model_kwargs or {}))
  sown = _abstract_init(model, resolution, ['params', 'intermediates'])['intermediates']
  return {key: tuple(values[0].shape[1:]) for key, values in sown.items()}


def features(model: nn.Module, params, images, names=None):
  """(logits, {name: feature}) from one forward pass of `model`: the features it sows (see the
  module docstring), all of them when `names` is None. Features come in at least float32, like
  the logits, whatever the model's compute dtype. Raises KeyError naming an unknown feature."""
  logits, state = model.apply({'params': params}, images, mutable=['intermediates'])
  sown = state['intermediates']
  unknown = sorted(set(names or ()) - set(sown))
  if unknown:
    raise KeyError(f'{type(model).__name__} has no feature {", ".join(unknown)}; '
                   f'it has {", ".join(sorted(sown))}')
  as_float = lambda x: x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return logits, {key: as_float(sown[key][0]) for key in (sown if names is None else names)}
