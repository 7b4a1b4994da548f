"""BiT ResNetV2: published sizes, the released .npz layout, and the maths against NumPy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd.models import bit, get_model

CLASSES, SIZE = 5, 32
TINY_UNITS, TINY_ROOT = (2, 1, 1, 1), 32  # bit_tiny's architecture, restated independently
_HEAD = 'resnet/head/conv2d/kernel'


def n_params(name, num_classes=1000):
  model = get_model(name, num_classes=num_classes)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize('name,published', [('bit_r50x1', 25.5e6), ('bit_r152x2', 236e6)])
def test_param_counts_match_paper(name, published):
  assert abs(n_params(name) / published - 1) < 0.01


def released_layout(rng, conv_name=lambda i: 'standardized_conv2d'):
  """{key: array} for bit_tiny, written from the published key layout with its own loops.

  `conv_name(i)` spells the i-th conv's scope, for files using `standardized_conv2d_<N>`."""
  flat, count = {}, iter(range(1000))

  def conv(prefix, k, cin, cout):
    flat[f'{prefix}/{conv_name(next(count))}/kernel'] = rng.normal(size=(k, k, cin, cout))

  def gn(prefix, c):
    flat[f'{prefix}/group_norm/gamma'] = 1 + 0.2 * rng.normal(size=c)
    flat[f'{prefix}/group_norm/beta'] = 0.2 * rng.normal(size=c)

  conv('resnet/root_block', 7, 3, TINY_ROOT)
  cin = TINY_ROOT
  for b, units in enumerate(TINY_UNITS):
    mid = TINY_ROOT * 2**b
    for u in range(units):
      p = f'resnet/block{b + 1}/unit{u + 1:02d}'
      gn(f'{p}/a', cin)
      conv(f'{p}/a', 1, cin, mid)
      if u == 0:
        conv(f'{p}/a/proj', 1, cin, 4 * mid)
      gn(f'{p}/b', mid)
      conv(f'{p}/b', 3, mid, mid)
      gn(f'{p}/c', mid)
      conv(f'{p}/c', 1, mid, 4 * mid)
      cin = 4 * mid
  gn('resnet', cin)
  flat['resnet/head/conv2d/kernel'] = 0.1 * rng.normal(size=(1, 1, cin, CLASSES))
  flat['resnet/head/conv2d/bias'] = rng.normal(size=CLASSES)
  return {k: v.astype(np.float32) for k, v in flat.items()}


def nested_by_hand(flat):
  """The same weights placed straight into the Flax params tree (gamma/beta -> scale/bias)."""
  tree = {}
  for key, value in flat.items():
    parts = ['standardized_conv2d' if p.startswith('standardized_conv2d') else p
             for p in key.split('/')[1:]]
    if parts[-2] == 'group_norm':
      parts[-1] = {'gamma': 'scale', 'beta': 'bias'}[parts[-1]]
    node = tree
    for p in parts[:-1]:
      node = node.setdefault(p, {})
    node[parts[-1]] = value
  return tree


# --- NumPy reference: BiT's formulas written out directly. ---

def np_conv(x, w, stride):
  """A bias-free conv padded (k - 1) // 2 on each side, as a sum of shifted matmuls."""
  k, pad = w.shape[0], (w.shape[0] - 1) // 2
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  return sum(x[:, i:i + stride * ho:stride, j:j + stride * wo:stride] @ w[i, j]
             for i in range(k) for j in range(k))


def np_std_conv(x, w, stride):
  return np_conv(x, (w - w.mean((0, 1, 2))) / np.sqrt(w.var((0, 1, 2)) + 1e-10), stride)


def np_group_norm(x, gamma, beta, groups=32):
  g = x.reshape(*x.shape[:3], groups, -1)
  mean, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + 1e-5)).reshape(x.shape) * gamma + beta


def np_max_pool(x):  # zero padding of 1, then 3x3 stride-2 VALID
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (x.shape[1] - 3) // 2 + 1, (x.shape[2] - 3) // 2 + 1
  return np.max([x[:, i:i + 2 * ho:2, j:j + 2 * wo:2] for i in range(3) for j in range(3)], 0)


def np_bit_forward(f, x):
  relu = lambda v: np.maximum(v, 0)
  gn = lambda p, v: np_group_norm(v, f[f'{p}/group_norm/gamma'], f[f'{p}/group_norm/beta'])
  conv = lambda p, v, s=1: np_std_conv(v, f[f'{p}/standardized_conv2d/kernel'], s)
  x = np_max_pool(conv('resnet/root_block', x.astype(np.float64), 2))
  for b, units in enumerate(TINY_UNITS):
    for u in range(units):
      p, stride = f'resnet/block{b + 1}/unit{u + 1:02d}', (2 if b and not u else 1)
      x_pre = relu(gn(f'{p}/a', x))
      shortcut = conv(f'{p}/a/proj', x_pre, stride) if u == 0 else x
      y = conv(f'{p}/a', x_pre)
      y = conv(f'{p}/b', relu(gn(f'{p}/b', y)), stride)
      y = conv(f'{p}/c', relu(gn(f'{p}/c', y)))
      x = y + shortcut
  x = relu(gn('resnet', x)).mean((1, 2))
  return x @ f['resnet/head/conv2d/kernel'][0, 0] + f['resnet/head/conv2d/bias']


@pytest.fixture(scope='module')
def tiny():
  model = get_model('bit_tiny', num_classes=CLASSES)
  images = np.random.default_rng(1).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  return model, images, jax.jit(lambda p, x: model.apply({'params': p}, x))


@pytest.mark.parametrize('spelling', ['plain', 'numbered'])
def test_hand_written_file_loads_like_direct_params(tmp_path, tiny, spelling):
  model, images, apply = tiny
  conv_name = (lambda i: 'standardized_conv2d') if spelling == 'plain' else (
      lambda i: f'standardized_conv2d_{i}' if i else 'standardized_conv2d')
  flat = released_layout(np.random.default_rng(0), conv_name)
  np.savez(tmp_path / 'w.npz', **flat)
  loaded = bit.load_npz(tmp_path / 'w.npz', model)
  direct = nested_by_hand(flat)
  np.testing.assert_array_equal(apply(loaded, images), apply(direct, images))
  if spelling == 'plain':  # the model computes exactly BiT's formulas
    np.testing.assert_allclose(apply(direct, images), np_bit_forward(flat, images),
                               rtol=1e-4, atol=1e-4)


def test_save_load_apply_is_exact(tmp_path, tiny):
  model, images, apply = tiny
  flat = released_layout(np.random.default_rng(2))
  params = jax.tree.map(jnp.asarray, nested_by_hand(flat))
  bit.check_params_fit(params, model)  # the hand-made tree is exactly what model.init makes
  bit.save_npz(params, tmp_path / 'p.npz')
  with np.load(tmp_path / 'p.npz') as saved:  # the released layout, key for key
    assert set(saved.files) == set(flat)
    for k in flat:
      np.testing.assert_array_equal(saved[k], flat[k])
  loaded = bit.load_npz(tmp_path / 'p.npz', 'bit_tiny')
  np.testing.assert_array_equal(apply(loaded, images), apply(params, images))


def test_std_conv_and_group_norm_match_numpy(tiny):
  model, images, _ = tiny
  flat = released_layout(np.random.default_rng(3))
  capture = jax.jit(lambda p, x: model.apply({'params': p}, x, capture_intermediates=True,
                                             mutable=['intermediates']))
  _, state = capture(nested_by_hand(flat), images)
  got = state['intermediates']
  root = got['root_block']['__call__'][0]
  want = np_std_conv(images, flat['resnet/root_block/standardized_conv2d/kernel'], 2)
  np.testing.assert_allclose(root, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      got['group_norm']['__call__'][0],
      np_group_norm(np.asarray(got['block4']['__call__'][0], np.float64),
                    flat['resnet/group_norm/gamma'], flat['resnet/group_norm/beta']),
      rtol=1e-4, atol=1e-4)
  w = np.random.default_rng(4).normal(2.0, 3.0, (3, 3, 4, 6)).astype(np.float32)
  std = np.asarray(bit.standardize(w))
  np.testing.assert_allclose(std, (w - w.mean((0, 1, 2))) / np.sqrt(w.var((0, 1, 2)) + 1e-10),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('size, stride, as_patches', [(2, 1, True), (4, 2, True), (5, 1, False),
                                                     (1, 1, False)])
def test_conv_agrees_with_numpy_however_the_cpu_computes_it(size, stride, as_patches):
  """`bit.conv2d`: a 3x3 conv whose output is 2x2 (after a stride, too) runs on the CPU as
  image patches times the kernel matrix, a matmul, as no other platform and no other shape does;
  values and both gradients agree with NumPy and with XLA's convolution."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(2, size, size, 16)).astype(np.float32)
  w = rng.normal(size=(3, 3, 16, 8)).astype(np.float32)
  conv = lambda x, w: bit.conv2d(x, w, stride)
  np.testing.assert_allclose(jax.jit(conv)(x, w), np_conv(x, w, stride), rtol=1e-5, atol=1e-5)
  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride,) * 2, ((1, 1), (1, 1)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))
  for got, want in zip(jax.grad(loss(conv), (0, 1))(x, w), jax.grad(loss(lax_conv), (0, 1))(x, w)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # float32 sums of 144 terms
  lowered = {platform: jax.jit(conv).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
             for platform in ('cpu', 'tpu', 'cuda')}
  assert ['dot_general' in lowered[p] for p in ('cpu', 'tpu', 'cuda')] == [as_patches, False, False]


def write(tmp_path, flat):
  np.savez(tmp_path / 'bad.npz', **flat)
  return tmp_path / 'bad.npz'


@pytest.mark.parametrize('model', ['bit_tiny', None])  # named, or inferred from the file
def test_missing_unexpected_misshaped_keys_are_named(tmp_path, model):
  good = released_layout(np.random.default_rng(0))
  key = 'resnet/block2/unit01/b/standardized_conv2d/kernel'
  cases = {
      'missing': {k: v for k, v in good.items() if k != key},
      'unexpected': {**good, 'resnet/block1/unit01/a/extra/kernel': np.zeros(3)},
      'mis-shaped': {**good, key: np.zeros((3, 3, 64, 65), np.float32)},
  }
  for kind, flat in cases.items():
    with pytest.raises(bit.CheckpointMismatchError) as e:
      bit.load_npz(write(tmp_path, flat), model)
    msg = str(e.value)
    assert '\n' not in msg and f'1 {kind}' in msg and 'bad.npz' in msg, msg
    assert (key if kind != 'unexpected' else 'resnet/block1/unit01/a/extra/kernel') in msg, msg


def test_all_problems_in_one_error_and_file_variants(tmp_path, tiny):
  model, images, apply = tiny
  good = released_layout(np.random.default_rng(0))
  gn, conv = 'resnet/block1/unit01/b/group_norm/gamma', 'resnet/block1/unit01/b/standardized_conv2d'
  bad = {k: v for k, v in good.items() if k != gn}
  bad.update({'other/thing': np.zeros(2), f'{conv}_7/kernel': good[f'{conv}/kernel'],  # 2 spellings
              _HEAD: np.zeros((1, 1, 1023, CLASSES), np.float32)})
  with pytest.raises(bit.CheckpointMismatchError) as e:
    bit.load_npz(write(tmp_path, bad), model)
  for text in ('1 missing', gn, '2 unexpected', 'other/thing', f'{conv}_7/kernel', '1 mis-shaped',
               f'{_HEAD} (1, 1, 1023, 5) vs model (1, 1, 1024, 5)'):
    assert text in str(e.value), str(e.value)
  # GroupNorm params stored with leading unit axes load as (C,).
  reshaped = {k: v.reshape(1, 1, 1, -1) if 'group_norm' in k else v for k, v in good.items()}
  loaded = bit.load_npz(write(tmp_path, reshaped), model)
  np.testing.assert_array_equal(apply(loaded, images), apply(nested_by_hand(good), images))


def test_many_missing_keys_stay_one_line(tmp_path):
  good = released_layout(np.random.default_rng(0))
  flat = {k: v for k, v in good.items() if 'block3' not in k}
  with pytest.raises(bit.CheckpointMismatchError, match=r'^\S+ does not fit the model: \d+ missing'
                     r' \(resnet/block3/unit01/a/group_norm/beta, .*, \+\d+ more\)$'):
    bit.load_npz(write(tmp_path, flat), 'bit_tiny')


def test_corrupt_file_names_path(tmp_path):
  path = tmp_path / 'corrupt.npz'
  path.write_bytes(b'not a zip archive at all')
  with pytest.raises(bit.CheckpointError, match='corrupt.npz') as e:
    bit.load_npz(path)
  assert '\n' not in str(e.value)
  with pytest.raises(bit.CheckpointError, match='missing.npz'):
    bit.load_npz(tmp_path / 'missing.npz')


def test_head_reinit_and_check_params_fit(tmp_path):
  np.savez(tmp_path / 'w.npz', **released_layout(np.random.default_rng(0)))
  params = bit.load_npz(tmp_path / 'w.npz', num_classes=7)
  assert params['head']['conv2d']['kernel'].shape == (1, 1, 1024, 7)
  head = params['head']['conv2d']
  assert not np.any(head['kernel']) and not np.any(head['bias'])
  model7 = get_model('bit_tiny', num_classes=7)
  bit.check_params_fit(params, model7)
  assert bit.reinit_head(params, 3)['head']['conv2d']['bias'].shape == (3,)
  with pytest.raises(bit.CheckpointMismatchError, match='head/conv2d/kernel'):
    bit.check_params_fit(params, get_model('bit_tiny', num_classes=CLASSES))
  with pytest.raises(bit.CheckpointMismatchError, match='missing'):
    bit.check_params_fit(params, get_model('bit_r50x1', num_classes=7))


def test_bfloat16_and_remat_share_params(tiny):
  model, images, apply = tiny
  params = nested_by_hand(released_layout(np.random.default_rng(5)))
  want = apply(params, images)
  for dtype, remat, tol in ((jnp.float32, True, 1e-5), (jnp.bfloat16, False, 0.1)):
    variant = get_model('bit_tiny', CLASSES, dtype=dtype, remat=remat)
    bit.check_params_fit(params, variant)
    out = jax.jit(lambda p, x: variant.apply({'params': p}, x))(params, images)
    assert out.dtype == jnp.float32 and out.shape == (2, CLASSES)
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol * np.abs(want).max())


def test_a_frozen_teacher_standardises_its_kernels_once_and_computes_the_same(tiny):
  """build.frozen / frozen_params: a teacher's kernels standardised at load, its module reading
  them as they are; the same logits as the model standardising them in its forward. Models
  without weight standardisation pass through unchanged."""
  from bigkd import build
  model, images, apply = tiny
  params = nested_by_hand(released_layout(np.random.default_rng(6)))
  teacher = build.frozen(model)
  assert teacher.standardized and not model.standardized
  frozen = build.frozen_params(teacher, jax.device_put(params))
  kernel = params['block1']['unit01']['b']['standardized_conv2d']['kernel']
  np.testing.assert_allclose(frozen['block1']['unit01']['b']['standardized_conv2d']['kernel'],
                             bit.standardize(kernel), rtol=1e-6, atol=1e-6)
  head = frozen['head']['conv2d']['kernel']  # not a StdConv: as it was
  np.testing.assert_array_equal(head, params['head']['conv2d']['kernel'])
  out = jax.jit(lambda p, x: teacher.apply({'params': p}, x))(frozen, images)
  np.testing.assert_allclose(out, apply(params, images), rtol=1e-5, atol=1e-5)
  plain = get_model('cnn_small', CLASSES)
  assert build.frozen(plain) is plain and build.frozen_params(plain, params) is params
