"""Feature taps: every registry model sows its named features ('intermediates') without changing
its logits or its parameter tree, and `feature_shapes` / `features` report them."""
import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from support import random_params
from bigkd.models import bit, cifar, feature_shapes, features, get_model, model_names, \
    param_shapes, vit

CLASSES = 5
# name: (resolution, per-example feature shapes from the model docstrings' formulas,
#        fingerprint of the parameter tree (paths and shapes) recorded before taps existed)
CASES = {
    'cnn_tiny': (16, {'stage1': (8, 8, 8), 'stage2': (4, 4, 16), 'prelogits': (4 * 4 * 16,)},
                 '1433f40cab12912d'),
    'resnet8': (16, {'stage1': (16, 16, 16), 'stage2': (8, 8, 32), 'stage3': (4, 4, 64),
                     'prelogits': (64,)}, '08d185cc5b0b21c4'),
    'bit_tiny': (32, {'stage1': (8, 8, 128), 'stage2': (4, 4, 256), 'stage3': (2, 2, 512),
                      'stage4': (1, 1, 1024), 'prelogits': (1024,)}, '5a367e5d91ad3e77'),
}


def fingerprint(params):
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  text = '\n'.join(f'{jax.tree_util.keystr(path)} {tuple(leaf.shape)}' for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def compiled(name):
  """(model, jitted (plain apply, `features`)): one program, compiled once per model."""
  model = get_model(name, CLASSES)
  return model, jax.jit(lambda p, x: (model.apply({'params': p}, x), features(model, p, x)))


def images(resolution):
  return np.random.default_rng(1).uniform(-1, 1, (2, resolution, resolution, 3)).astype(np.float32)


def prelogits_from_last_stage(name, params, feats):
  """`prelogits` recomputed from the last stage's tap, as each model's docstring describes it."""
  if name.startswith('cnn'):
    return feats['stage2'].reshape(len(feats['stage2']), -1)
  if name.startswith('resnet'):
    return feats['stage3'].mean((1, 2))
  x = np.asarray(feats['stage4'], np.float64)  # BiT: final GroupNorm (32 groups) + ReLU + pool
  g = x.reshape(*x.shape[:3], 32, -1)
  g = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + 1e-5)
  norm = params['group_norm']
  return np.maximum(g.reshape(x.shape) * norm['scale'] + norm['bias'], 0).mean((1, 2))


def head(name, params):
  """(kernel, bias) of the classifier that reads `prelogits`."""
  if name.startswith('bit'):
    return params['head']['conv2d']['kernel'][0, 0], params['head']['conv2d']['bias']
  return params['Dense_0']['kernel'], params['Dense_0']['bias']


@pytest.mark.parametrize('name', sorted(CASES))
def test_taps_leave_logits_and_params_unchanged(name):
  resolution, shapes, recorded = CASES[name]
  model, plain_and_tapped = compiled(name)
  assert fingerprint(param_shapes(name, CLASSES, resolution)) == recorded
  x = images(resolution)
  init = jax.eval_shape(lambda: model.init(jax.random.key(0), x))
  assert set(init) == {'params'}  # the taps never reach a checkpoint
  params = random_params(name, resolution, CLASSES)
  plain, (logits, feats) = plain_and_tapped(params, x)
  np.testing.assert_array_equal(logits, plain)
  assert {k: v.shape[1:] for k, v in feats.items()} == shapes
  assert feature_shapes(name, CLASSES, resolution) == shapes
  assert all(v.dtype == jnp.float32 for v in feats.values())
  kernel, bias = head(name, params)  # `prelogits` is what the head reads, made of the last stage
  np.testing.assert_allclose(feats['prelogits'] @ kernel + bias, logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feats['prelogits'], prelogits_from_last_stage(name, params, feats),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(KeyError, match='no feature stage9; it has prelogits, stage1'):
    jax.eval_shape(lambda p: features(model, p, x, ['stage1', 'stage9']), params)


def test_every_registry_model_is_a_tapped_kind():
  """The cases above (and, for ViT, tests/test_vit.py) cover every module class the registry
  builds, so every model has taps."""
  kinds = (cifar.SmallCNN, cifar.CifarResNet, bit.ResNetV2, vit.VisionTransformer)
  assert {type(get_model(name, CLASSES)) for name in model_names()} == set(kinds)
  small_r50 = dict(base=32, block_units=(1, 1, 1, 1))
  assert feature_shapes('bit_r50x1', CLASSES, 64, small_r50) == {
      'stage1': (16, 16, 128), 'stage2': (8, 8, 256), 'stage3': (4, 4, 512),
      'stage4': (2, 2, 1024), 'prelogits': (1024,)}
  half = get_model('resnet8x2', CLASSES, dtype=jnp.bfloat16)
  x = jnp.zeros((1, 16, 16, 3))
  _, feats = jax.eval_shape(lambda p: features(half, p, x, ['stage3', 'prelogits']),
                            param_shapes('resnet8x2', CLASSES, 16))
  assert {k: (v.shape, v.dtype) for k, v in feats.items()} == {
      'stage3': ((1, 4, 4, 128), jnp.float32), 'prelogits': ((1, 128), jnp.float32)}


def test_bit_npz_round_trip_keeps_features(tmp_path):
  _, plain_and_tapped = compiled('bit_tiny')
  resolution = CASES['bit_tiny'][0]
  params = random_params('bit_tiny', resolution, CLASSES)
  bit.save_npz(params, tmp_path / 'w.npz')
  loaded = bit.load_npz(tmp_path / 'w.npz', 'bit_tiny')
  x = images(resolution)
  want, got = plain_and_tapped(params, x), plain_and_tapped(loaded, x)
  jax.tree.map(np.testing.assert_array_equal, got, want)
