"""ViT: published sizes, the AugReg .npz layout, the maths against NumPy, position-embedding
resizing, bfloat16 compute and the feature taps."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import checkpoint
from bigkd.models import feature_shapes, features, get_model, param_shapes, vit
from bigkd.models.bit import CheckpointMismatchError

CLASSES, SIZE = 5, 16
# vit_tiny_test's architecture, restated independently.
WIDTH, DEPTH, HEADS, MLP, PATCH = 32, 2, 2, 64, 4
GRID = SIZE // PATCH
_POS = 'Transformer/posembed_input/pos_embedding'


@pytest.mark.parametrize('name,published', [('vit_ti16', 5.7e6), ('vit_s16', 22.1e6),
                                            ('vit_b16', 86.6e6)])
def test_param_counts_match_published(name, published):
  count = sum(x.size for x in jax.tree.leaves(param_shapes(name, 1000, 224)))
  assert abs(count / published - 1) < 0.01


def augreg_layout(rng, pool='token', classes=CLASSES):
  """{key: array} for vit_tiny_test, written from the AugReg file layout with its own loops."""
  flat = {}

  def dense(key, shape, fan_in, bias_shape=None):
    flat[f'{key}/kernel'] = rng.normal(size=shape) / np.sqrt(fan_in)
    flat[f'{key}/bias'] = 0.1 * rng.normal(size=bias_shape or shape[-1:])

  def norm(key):
    flat[f'{key}/scale'] = 1 + 0.2 * rng.normal(size=WIDTH)
    flat[f'{key}/bias'] = 0.2 * rng.normal(size=WIDTH)

  dense('embedding', (PATCH, PATCH, 3, WIDTH), PATCH * PATCH * 3)
  tokens = GRID * GRID
  if pool == 'token':
    flat['cls'] = rng.normal(size=(1, 1, WIDTH))
    tokens += 1
  flat[_POS] = 0.5 * rng.normal(size=(1, tokens, WIDTH))
  for i in range(DEPTH):
    block = f'Transformer/encoderblock_{i}'
    norm(f'{block}/LayerNorm_0')
    for name in ('query', 'key', 'value'):
      dense(f'{block}/MultiHeadDotProductAttention_1/{name}', (WIDTH, HEADS, WIDTH // HEADS),
            WIDTH, bias_shape=(HEADS, WIDTH // HEADS))
    dense(f'{block}/MultiHeadDotProductAttention_1/out', (HEADS, WIDTH // HEADS, WIDTH), WIDTH)
    norm(f'{block}/LayerNorm_2')
    dense(f'{block}/MlpBlock_3/Dense_0', (WIDTH, MLP), WIDTH)
    dense(f'{block}/MlpBlock_3/Dense_1', (MLP, WIDTH), MLP)
  norm('Transformer/encoder_norm')
  dense('head', (WIDTH, classes), WIDTH)
  return {k: v.astype(np.float32) for k, v in flat.items()}


def write(tmp_path, flat, name='w.npz'):
  np.savez(tmp_path / name, **flat)
  return tmp_path / name


# --- NumPy reference: the ViT equations written out directly, in float64. ---

def np_layer_norm(x, f, key):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * f[f'{key}/scale'] + f[f'{key}/bias']


def np_gelu(x):  # the tanh form (flax's nn.gelu default, used by big_vision)
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def np_attention(y, f, key):
  proj = lambda name: np.einsum('btd,dhk->bthk', y, f[f'{key}/{name}/kernel']) + \
      f[f'{key}/{name}/bias']
  q, k, v = proj('query'), proj('key'), proj('value')
  logits = np.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(q.shape[-1])
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = np.einsum('bhqt,bthk->bqhk', weights, v)
  return np.einsum('bqhk,hkd->bqd', out, f[f'{key}/out/kernel']) + f[f'{key}/out/bias']


def np_vit_forward(f, x, pool):
  """(logits, prelogits, residual stream after the last block) of the file's weights."""
  b, p = len(x), PATCH
  patches = x.astype(np.float64).reshape(b, GRID, p, GRID, p, 3).transpose(0, 1, 3, 2, 4, 5)
  x = patches.reshape(b, GRID * GRID, p * p * 3) @ f['embedding/kernel'].reshape(-1, WIDTH)
  x = x + f['embedding/bias']
  if pool == 'token':
    x = np.concatenate([np.broadcast_to(f['cls'], (b, 1, WIDTH)), x], axis=1)
  x = x + f[_POS]
  for i in range(DEPTH):
    block = f'Transformer/encoderblock_{i}'
    x = x + np_attention(np_layer_norm(x, f, f'{block}/LayerNorm_0'), f,
                         f'{block}/MultiHeadDotProductAttention_1')
    y = np_layer_norm(x, f, f'{block}/LayerNorm_2')
    y = np_gelu(y @ f[f'{block}/MlpBlock_3/Dense_0/kernel'] + f[f'{block}/MlpBlock_3/Dense_0/bias'])
    x = x + y @ f[f'{block}/MlpBlock_3/Dense_1/kernel'] + f[f'{block}/MlpBlock_3/Dense_1/bias']
  encoded = np_layer_norm(x, f, 'Transformer/encoder_norm')
  pre = encoded[:, 0] if pool == 'token' else encoded.mean(1)
  return pre @ f['head/kernel'] + f['head/bias'], pre, x


def images(size=SIZE, n=2):
  return np.random.default_rng(1).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def close(got, want, rtol):
  """Max |got - want| relative to the largest |want|."""
  err = np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))
  assert err < rtol, err
  return err


@pytest.mark.parametrize('pool', ['token', 'gap'])
def test_file_gives_the_numpy_reference_logits_and_taps(tmp_path, pool):
  flat = augreg_layout(np.random.default_rng(0), pool)
  model = get_model('vit_tiny_test', CLASSES, pool=pool)
  params = vit.load_npz(write(tmp_path, flat), model)
  inferred = vit.load_npz(tmp_path / 'w.npz')  # the architecture read from the file alone
  jax.tree.map(np.testing.assert_array_equal, inferred, params)
  x = images()
  logits, feats = features(model, params, x)
  want, pre, last = np_vit_forward(flat, x, pool)
  assert logits.dtype == jnp.float32
  close(logits, want, 1e-5)
  close(feats['prelogits'], pre, 1e-5)
  patch_tokens = last[:, 1:] if pool == 'token' else last
  close(feats[f'block{DEPTH}'], patch_tokens.reshape(2, GRID, GRID, WIDTH), 1e-5)


def test_save_load_round_trip_and_new_head(tmp_path):
  params = vit.load_npz(write(tmp_path, augreg_layout(np.random.default_rng(2))), 'vit_tiny_test')
  vit.save_npz(params, tmp_path / 'p.npz')
  with np.load(tmp_path / 'p.npz') as saved:
    assert set(saved.files) == set(augreg_layout(np.random.default_rng(2)))
  jax.tree.map(np.testing.assert_array_equal, vit.load_npz(tmp_path / 'p.npz', 'vit_tiny_test'),
               params)
  fresh = vit.load_npz(tmp_path / 'p.npz', num_classes=7)
  assert fresh['head']['kernel'].shape == (WIDTH, 7) and not fresh['head']['kernel'].any()
  np.testing.assert_array_equal(fresh['embedding']['kernel'], params['embedding']['kernel'])


def test_a_file_that_does_not_fit_is_named_in_one_line(tmp_path):
  flat = augreg_layout(np.random.default_rng(3))
  key = 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel'
  flat[key] = np.zeros((MLP, WIDTH + 1), np.float32)
  with pytest.raises(CheckpointMismatchError, match=f'1 mis-shaped \\({key}') as error:
    vit.load_npz(write(tmp_path, flat), 'vit_tiny_test')
  assert '\n' not in str(error.value) and 'w.npz' in str(error.value)
  del flat[key]
  with pytest.raises(CheckpointMismatchError, match=f'1 missing \\({key}'):
    vit.load_npz(write(tmp_path, flat), 'vit_tiny_test', shapes_only=True)
  with pytest.raises(CheckpointMismatchError, match='vs model'):
    vit.load_npz(write(tmp_path, augreg_layout(np.random.default_rng(3))), 'vit_s16')


def test_another_resolution_resizes_the_position_embedding_bilinearly(tmp_path):
  flat = augreg_layout(np.random.default_rng(4))
  rows, cols = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing='ij')
  ramp = (rows + 2 * cols).reshape(1, -1, 1) * np.ones((1, 1, WIDTH))  # linear on the grid
  flat[_POS] = np.concatenate([flat[_POS][:, :1], ramp], axis=1).astype(np.float32)
  path = write(tmp_path, flat)
  same = vit.load_npz(path, resolution=SIZE)
  np.testing.assert_array_equal(same['Transformer']['posembed_input']['pos_embedding'], flat[_POS])
  big = 2 * SIZE
  pos = vit.load_npz(path, 'vit_tiny_test', resolution=big)[
      'Transformer']['posembed_input']['pos_embedding']
  new = big // PATCH
  assert pos.shape == (1, 1 + new * new, WIDTH)
  np.testing.assert_array_equal(pos[:, :1], flat[_POS][:, :1])  # the class token's entry
  rows, cols = np.meshgrid(np.arange(new), np.arange(new), indexing='ij')
  scale = (GRID - 1) / (new - 1)  # bilinear with the corners kept: a ramp stays that ramp
  np.testing.assert_allclose(pos[0, 1:, 0], ((rows + 2 * cols) * scale).reshape(-1), atol=1e-5)
  # Through the teacher/init loader: checked at the planned resolution, resized when placed.
  checkpoint.check_fits(str(path), 'vit_tiny_test', {}, CLASSES, big, 'teacher')
  with pytest.raises(checkpoint.CheckpointError, match='pos_embedding'):
    checkpoint.check_fits(str(path), 'vit_tiny_test', {'pool': 'gap'}, CLASSES, big, 'teacher')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device),
                        param_shapes('vit_tiny_test', CLASSES, big))
  loaded = checkpoint.load_params(str(path), target, 'teacher')
  np.testing.assert_array_equal(loaded['Transformer']['posembed_input']['pos_embedding'], pos)
  logits = get_model('vit_tiny_test', CLASSES).apply({'params': loaded}, images(big))
  assert logits.shape == (2, CLASSES)


def test_bfloat16_compute_is_close_to_float32(tmp_path):
  params = vit.load_npz(write(tmp_path, augreg_layout(np.random.default_rng(5))))
  x = images()
  full = get_model('vit_tiny_test', CLASSES).apply({'params': params}, x)
  half_model = get_model('vit_tiny_test', CLASSES, dtype=jnp.bfloat16)
  half, feats = features(half_model, params, x, ['block1', 'prelogits'])
  assert half.dtype == jnp.float32 and feats['block1'].dtype == jnp.float32
  close(half, np.asarray(full, np.float64), 3e-2)


def test_feature_taps_have_the_documented_shapes():
  taps = lambda patch, d: {'block1': (SIZE // patch, SIZE // patch, d),
                           'block2': (SIZE // patch, SIZE // patch, d), 'prelogits': (d,)}
  assert feature_shapes('vit_tiny_test', 10, SIZE) == taps(PATCH, WIDTH)
  assert feature_shapes('vit_tiny_test', 10, SIZE, {'patch': 8, 'pool': 'gap'}) == taps(8, WIDTH)
  shapes = feature_shapes('vit_s16', 10, 224)
  assert len(shapes) == 13 and shapes['block12'] == (14, 14, 384) and shapes['prelogits'] == (384,)
  model = get_model('vit_tiny_test', 10)
  params = param_shapes('vit_tiny_test', 10, SIZE)
  assert set(params) == {'embedding', 'cls', 'Transformer', 'head'}  # no taps in the params
  with pytest.raises(KeyError, match='no feature stage1; it has block1, block2, prelogits'):
    jax.eval_shape(lambda p: features(model, p, images(), ['stage1']), params)
