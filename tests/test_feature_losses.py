"""Feature, relation and logit losses of issue 13 against NumPy written from each paper's formula.

Every reference below is float64 NumPy that does not call bigkd, written the way the paper states
the formula (sums over channels, explicit pairs and triplets, deleted target columns), so that a
shortcut taken by the JAX code (means, masks, log-space) is checked, not repeated. Each loss is
compared in value (to 1e-9) and in gradient: `jax.grad` against central differences of the
reference, for every input element.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import losses
from bigkd.models.adapters import FeatureAdapter

RNG = np.random.default_rng(0)


def numerical_grad(f, x, h=1e-6):
  """Central differences of the scalar function f at every element of x."""
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = h
    grad[index] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


def assert_matches_reference(loss, reference, *arrays):
  """loss(*arrays) == reference(*arrays), and d loss / d array == the reference's central
  differences, for every array (float64; one compile per call)."""
  arrays = [np.asarray(a, np.float64) for a in arrays]
  with jax.enable_x64(True):
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(arrays)))))(*arrays)
    value, grads = float(value), [np.asarray(g) for g in grads]
  want = reference(*arrays)
  np.testing.assert_allclose(value, want, rtol=1e-9)
  for i, (array, grad) in enumerate(zip(arrays, grads)):
    moved = lambda a: reference(*arrays[:i], a, *arrays[i + 1:])
    np.testing.assert_allclose(grad, numerical_grad(moved, array), rtol=1e-5,
                               atol=1e-7 * max(1.0, abs(want)), err_msg=f'gradient of input {i}')
  return want


def rows(x):
  return x.reshape(len(x), -1)


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_huber(d):
  return 0.5 * d ** 2 if abs(d) <= 1 else abs(d) - 0.5


# --- FitNets through the adapter. ---

def np_linear_resize_matrix(n_in, n_out):
  """[n_out, n_in] weights of a linear (triangle-kernel) resize with half-pixel centres: output
  o samples the input at x = (o + ½)·n_in/n_out − ½; input i weighs max(0, 1 − |i − x| / w),
  w = max(n_in / n_out, 1) (widened when shrinking: antialiasing), normalised over the inputs
  that exist (at the edges the missing ones drop out)."""
  width = max(n_in / n_out, 1.0)
  weights = np.zeros((n_out, n_in))
  for o in range(n_out):
    x = (o + 0.5) * n_in / n_out - 0.5
    weights[o] = [max(0.0, 1 - abs(i - x) / width) for i in range(n_in)]
    weights[o] /= weights[o].sum()
  return weights


def np_resize(x, h, w):
  """[B, H, W, ...] -> [B, h, w, ...] by `np_linear_resize_matrix` along each spatial axis."""
  x = np.einsum('oh,bh...->bo...', np_linear_resize_matrix(x.shape[1], h), x)
  return np.einsum('pw,bow...->bop...', np_linear_resize_matrix(x.shape[2], w), x)


def np_group_norm(x, groups, scale, bias, eps=1e-6):
  g = x.reshape(*x.shape[:-1], groups, -1)
  g = (g - g.mean((1, 2, 4), keepdims=True)) / np.sqrt(g.var((1, 2, 4), keepdims=True) + eps)
  return g.reshape(x.shape) * scale + bias


def np_adapter(params, x, target_shape):
  """Resize, then 1x1 conv, then GroupNorm; or a dense layer for vectors. (The adapter may
  resize after the conv instead: both are linear, so the order does not change the result.)"""
  if len(target_shape) == 1:
    return x @ params['Dense_0']['kernel'] + params['Dense_0']['bias']
  h, w, c = target_shape
  x = np_resize(x, h, w) @ params['Conv_0']['kernel'][0, 0]
  norm = params['GroupNorm_0']
  return np_group_norm(x, math.gcd(32, c), norm['scale'], norm['bias'])


def np_fitnet(teacher, adapted_student):
  """Romero et al.: ½‖u_h − r(v_g)‖² per example; bigkd's form is the element mean (the
  docstring's factor ½·H·W·C, restated here)."""
  per_example = 0.5 * np.sum(rows(adapted_student - teacher) ** 2, axis=1)
  return np.mean(per_example) / (0.5 * rows(teacher).shape[1])


@pytest.mark.parametrize('student_shape,target_shape', [
    ((2, 3, 3, 2), (6, 6, 6)),   # upsampled, resized before the conv (fewer student channels)
    ((2, 3, 3, 6), (6, 6, 4)),   # upsampled, resized after the conv (more student channels)
    ((2, 5, 5, 2), (3, 3, 4)),   # downsampled (antialiased), resized before the conv
    ((3, 5), (4,)),              # vectors: a dense layer
])
def test_fitnet_through_adapter_matches_numpy(student_shape, target_shape):
  adapter = FeatureAdapter(target_shape, dtype=jnp.float64)
  with jax.enable_x64(True):
    shapes = jax.eval_shape(adapter.init, jax.random.key(0), jnp.zeros(student_shape))['params']
  leaves, tree = jax.tree.flatten(shapes)
  values = [RNG.normal(size=s.shape) for s in leaves]
  student = RNG.normal(size=student_shape)
  teacher = RNG.normal(size=(student_shape[0], *target_shape))

  def loss(teacher, student, *param_leaves):
    adapted = adapter.apply({'params': jax.tree.unflatten(tree, param_leaves)}, student)
    return losses.fitnet_loss(teacher, adapted)

  def reference(teacher, student, *param_leaves):
    params = jax.tree.unflatten(tree, param_leaves)
    return np_fitnet(teacher, np_adapter(params, student, target_shape))

  assert_matches_reference(loss, reference, teacher, student, *values)


def test_adapter_shapes_and_refusals():
  def out_shape(student_shape, target_shape):
    adapter = FeatureAdapter(target_shape)
    x = jnp.zeros(student_shape)
    return jax.eval_shape(lambda: adapter.init_with_output(jax.random.key(0), x)[0]).shape

  assert out_shape((2, 8, 8, 16), (4, 4, 64)) == (2, 4, 4, 64)     # downsampled
  assert out_shape((2, 4, 4, 16), (4, 4, 24)) == (2, 4, 4, 24)     # same size, no resize
  assert out_shape((2, 16), (10,)) == (2, 10)
  for student, target in (((2, 4, 4, 8), (16,)), ((2, 8), (4, 4, 8))):
    with pytest.raises(ValueError, match='both must be spatial'):
      out_shape(student, target)


# --- Attention transfer. ---

def np_adaptive_pool(feature, h, w):
  """PyTorch's adaptive_avg_pool2d on [B, H, W, C]: output (i, j) averages input rows
  floor(i·H/h) .. ceil((i+1)·H/h) − 1 and the columns likewise."""
  H, W = feature.shape[1:3]
  out = np.zeros((len(feature), h, w, feature.shape[3]))
  for i in range(h):
    for j in range(w):
      r0, r1 = math.floor(i * H / h), math.ceil((i + 1) * H / h)
      c0, c1 = math.floor(j * W / w), math.ceil((j + 1) * W / w)
      out[:, i, j] = feature[:, r0:r1, c0:c1].mean(axis=(1, 2))
  return out


def np_attention_transfer(teacher, student, p, squared, match='pool'):
  """Zagoruyko & Komodakis: Q = vec(Σ_c |A_c|^p), normalised; ‖Q_s/‖Q_s‖ − Q_t/‖Q_t‖‖₂. Of
  another spatial size: RepDistiller's / mdistiller's AT pools the larger feature to the
  smaller's size first ('pool'); or the teacher's map is resized to the student's ('resize')."""
  def q(feature, size=None):
    a = np.sum(np.abs(feature) ** p, axis=-1)
    a = rows(a if size is None else np_resize(a, *size))
    return a / np.linalg.norm(a, axis=1, keepdims=True)
  if match == 'resize':
    diff = q(student) - q(teacher, student.shape[1:3])
  else:
    h, w = (min(a, b) for a, b in zip(student.shape[1:3], teacher.shape[1:3]))
    pool = lambda f: f if f.shape[1:3] == (h, w) else np_adaptive_pool(f, h, w)
    diff = q(pool(student)) - q(pool(teacher))
  if squared:  # the authors' code: (at(x) - at(y)).pow(2).mean()
    return np.mean(diff ** 2)
  return np.mean(np.linalg.norm(diff, axis=1))


@pytest.mark.parametrize('squared,teacher_hw,p,match', [
    (False, (3, 4), 2, 'pool'), (True, (3, 4), 2, 'pool'),
    (False, (5, 6), 3, 'pool'),     # a larger teacher feature, pooled to the student's 3x4
    (True, (6, 8), 2, 'pool'),      # twice as large: 2x2 blocks
    (False, (2, 2), 2, 'pool'),     # a smaller one: the student's feature is pooled to 2x2
    (False, (5, 6), 3, 'resize'),   # the teacher's map shrunk (antialiased) to 3x4
    (False, (2, 2), 2, 'resize'),   # or enlarged
])
def test_attention_transfer_matches_numpy(squared, teacher_hw, p, match):
  teacher, student = RNG.normal(size=(3, *teacher_hw, 5)), RNG.normal(size=(3, 3, 4, 2))
  assert_matches_reference(
      functools.partial(losses.attention_transfer, p=p, squared=squared, match=match),
      functools.partial(np_attention_transfer, p=p, squared=squared, match=match),
      teacher, student)
  with pytest.raises(ValueError, match='spatial features'):
    losses.attention_transfer(teacher, student.reshape(3, -1))


# --- Similarity-preserving. ---

def np_similarity_preserving(teacher, student):
  """Tung & Mori: G = QQᵀ, each row divided by its L2 norm; ‖G_t − G_s‖_F² / b²."""
  def g(feature):
    q = rows(feature)
    gram = q @ q.T
    return gram / np.linalg.norm(gram, axis=1, keepdims=True)
  return np.sum((g(teacher) - g(student)) ** 2) / len(teacher) ** 2


def test_similarity_preserving_matches_numpy():
  assert_matches_reference(losses.similarity_preserving, np_similarity_preserving,
                           RNG.normal(size=(5, 2, 2, 3)), RNG.normal(size=(5, 2, 2, 2)))


# --- PKT. ---

def np_pkt(teacher, student, eps=1e-7, form='reference'):
  """Passalis & Tefas as their code computes it: each row divided by (its norm + eps),
  K = ½(cos + 1). 'reference': p_{j|i} = K_ij / Σ_k K_ik over the whole batch (i included) and
  the mean over all b² entries of p log((p + eps)/(q + eps)); 'per_anchor': j, k ≠ i, the KL of
  each anchor i, averaged over anchors."""
  def conditionals(feature):
    x = rows(feature)
    x = x / (np.linalg.norm(x, axis=1, keepdims=True) + eps)
    n = len(x)
    kernel = [[0.5 * (x[i] @ x[j] + 1) for j in range(n)] for i in range(n)]
    others = lambda i: [j for j in range(n) if form == 'reference' or j != i]
    return [{j: kernel[i][j] / sum(kernel[i][k] for k in others(i)) for j in others(i)}
            for i in range(n)]
  p, q = conditionals(teacher), conditionals(student)
  kl = [sum(p[i][j] * np.log((p[i][j] + eps) / (q[i][j] + eps)) for j in p[i])
        for i in range(len(p))]
  return sum(kl) / len(p) ** 2 if form == 'reference' else np.mean(kl)


@pytest.mark.parametrize('form', ['reference', 'per_anchor'])
def test_pkt_matches_numpy(form):
  assert_matches_reference(functools.partial(losses.pkt, form=form),
                           functools.partial(np_pkt, form=form),
                           RNG.normal(size=(5, 4)), RNG.normal(size=(5, 3)))


# --- RKD. ---

def np_rkd_distance_terms(teacher, student):
  """Park et al.: ψ_D = ‖x_i − x_j‖ / μ, μ the mean over pairs i ≠ j; the differences ψ_s − ψ_t."""
  def psi(feature):
    x = rows(feature)
    pairs = [(i, j) for i in range(len(x)) for j in range(len(x)) if i != j]
    dist = {(i, j): np.linalg.norm(x[i] - x[j]) for i, j in pairs}
    mu = np.mean(list(dist.values()))
    return {pair: d / mu for pair, d in dist.items()}
  t, s = psi(teacher), psi(student)
  return [s[pair] - t[pair] for pair in t]


def np_rkd_angle_terms(teacher, student):
  """Park et al.: ψ_A = ⟨e_ij, e_kj⟩, e_ij = (x_i − x_j)/‖x_i − x_j‖, distinct i, j, k."""
  def psi(feature):
    x = rows(feature)
    e = lambda i, j: (x[i] - x[j]) / np.linalg.norm(x[i] - x[j])
    n = len(x)
    return {(i, j, k): e(i, j) @ e(k, j) for i in range(n) for j in range(n) for k in range(n)
            if len({i, j, k}) == 3}
  t, s = psi(teacher), psi(student)
  return [s[triplet] - t[triplet] for triplet in t]


def np_rkd_distance(teacher, student):
  """The authors' code: smooth_l1_loss over the whole b x b matrix (zeros on its diagonal)."""
  return sum(np_huber(d) for d in np_rkd_distance_terms(teacher, student)) / len(teacher) ** 2


def np_rkd_angle(teacher, student):
  """The authors' code: smooth_l1_loss over all b³ entries (0 unless i, j, k are distinct)."""
  return sum(np_huber(d) for d in np_rkd_angle_terms(teacher, student)) / len(teacher) ** 3


def np_rkd_25_50(teacher, student):
  return 25 * np_rkd_distance(teacher, student) + 50 * np_rkd_angle(teacher, student)


@pytest.fixture(scope='module')
def rkd_inputs():
  """A student batch with one outlier example, so that both Huber branches (|d| ≤ 1, > 1) are
  exercised by the distance and the angle terms."""
  teacher, student = RNG.normal(size=(5, 4)), RNG.normal(size=(5, 3))
  student[0] += 6
  for terms in (np_rkd_distance_terms(teacher, student), np_rkd_angle_terms(teacher, student)):
    assert min(map(abs, terms)) < 1 < max(map(abs, terms))
  return teacher, student


@pytest.mark.parametrize('loss,reference', [
    (losses.rkd_distance, np_rkd_distance),
    (losses.rkd_angle, np_rkd_angle),
    (losses.rkd_loss, np_rkd_25_50),  # the paper's default weights
])
def test_rkd_matches_numpy(rkd_inputs, loss, reference):
  assert_matches_reference(loss, reference, *rkd_inputs)


# --- DKD. ---

def np_dkd(teacher_logits, student_logits, labels, alpha, beta, temperature):
  """Zhao et al.: TCKD = KL(b^T ‖ b^S), b = [p_t, 1 − p_t]; NCKD = KL over the softmax of the
  logits with the target's column deleted; T²·mean(α·TCKD + β·NCKD)."""
  total = 0.0
  for t, s, y in zip(teacher_logits, student_logits, labels):
    pt, ps = np_softmax(t / temperature), np_softmax(s / temperature)
    bt, bs = np.array([pt[y], 1 - pt[y]]), np.array([ps[y], 1 - ps[y]])
    qt = np_softmax(np.delete(t, y) / temperature)
    qs = np_softmax(np.delete(s, y) / temperature)
    total += alpha * np.sum(bt * np.log(bt / bs)) + beta * np.sum(qt * np.log(qt / qs))
  return temperature ** 2 * total / len(labels)


def test_dkd_matches_numpy_with_labels_one_hot_or_mixed():
  teacher, student = 3 * RNG.normal(size=(4, 5)), 3 * RNG.normal(size=(4, 5))
  labels = np.array([0, 3, 4, 3])
  args = dict(alpha=1.5, beta=3.0, temperature=2.5)
  assert_matches_reference(
      lambda t, s: losses.dkd(t, s, jnp.asarray(labels), **args),
      lambda t, s: np_dkd(t, s, labels, **args), teacher, student)
  # Defaults (α = 1, β = 8, T = 4); class indices, one-hot and mixed labels pick the same target.
  want = np_dkd(teacher, student, labels, 1.0, 8.0, 4.0)
  one_hot = np.eye(5)[labels]
  mixed = 0.7 * one_hot + 0.3 * np.eye(5)[(labels + 1) % 5]
  got = jax.jit(lambda t, s: [losses.dkd(t, s, given) for given in (labels, one_hot, mixed)]
                + [losses.dkd(t, s, labels, warmup_factor=0.25)])(teacher, student)
  np.testing.assert_allclose(got, [want, want, want, 0.25 * want], rtol=1e-5)
  assert [float(losses.linear_warmup(s, 20)) for s in (0, 5, 20, 40)] == [0, 0.25, 1, 1]
  assert losses.linear_warmup(3, 0) == 1


# --- DIST. ---

def np_dist(teacher_logits, student_logits, beta, gamma, temperature, eps=1e-8):
  """Huang et al.: d = 1 − Pearson r; inter over each example's classes, intra over each class's
  examples; τ²·(β·inter + γ·intra). r as their code: ⟨ū, v̄⟩ / (‖ū‖·‖v̄‖ + 1e-8)."""
  def pearson(u, v):
    u, v = u - u.mean(), v - v.mean()
    return np.sum(u * v) / (np.linalg.norm(u) * np.linalg.norm(v) + eps)
  yt, ys = np_softmax(teacher_logits / temperature), np_softmax(student_logits / temperature)
  inter = np.mean([1 - pearson(ys[i], yt[i]) for i in range(len(yt))])
  intra = np.mean([1 - pearson(ys[:, j], yt[:, j]) for j in range(yt.shape[1])])
  return temperature ** 2 * (beta * inter + gamma * intra)


def test_dist_matches_numpy():
  args = dict(beta=2.0, gamma=0.5, temperature=3.0)  # β ≠ γ: swapped terms would show
  assert_matches_reference(functools.partial(losses.dist_loss, **args),
                           functools.partial(np_dist, **args),
                           3 * RNG.normal(size=(4, 6)), 3 * RNG.normal(size=(4, 6)))


# --- The reference conventions at any batch size and scale: values only (the gradients are
# checked above), batches odd and even, inputs as they come and ×20 (large logits: DIST's eps
# matters where a class's probabilities are tiny). ---

@pytest.mark.parametrize('batch', [3, 8, 13])
@pytest.mark.parametrize('scale', [1.0, 20.0])
def test_reference_conventions_at_any_batch_size_and_scale(batch, scale):
  rng = np.random.default_rng(batch)
  teacher, student = scale * rng.normal(size=(batch, 6)), scale * rng.normal(size=(batch, 4))
  spatial_t = scale * rng.normal(size=(batch, 6, 6, 3))
  spatial_s = scale * np.maximum(rng.normal(size=(batch, 3, 3, 2)), 0)  # ReLU'd
  logits_t, logits_s = scale * rng.normal(size=(batch, 10)), scale * rng.normal(size=(batch, 10))
  cases = [
      (losses.pkt, np_pkt, teacher, student),
      (losses.rkd_distance, np_rkd_distance, teacher, student),
      (losses.rkd_angle, np_rkd_angle, teacher, student),
      (losses.dist_loss, functools.partial(np_dist, beta=1.0, gamma=1.0, temperature=1.0),
       logits_t, logits_s),
      (functools.partial(losses.attention_transfer, squared=True),
       functools.partial(np_attention_transfer, p=2, squared=True), spatial_t, spatial_s),
  ]
  with jax.enable_x64(True):
    for loss, reference, t, s in cases:
      np.testing.assert_allclose(float(jax.jit(loss)(t, s)), reference(t, s), rtol=1e-5,
                                 err_msg=f'{loss} at batch {batch}, scale {scale}')


# --- All: zero at student == teacher, with finite gradients (no 0/0 in a norm or root), also
# for a batch with a repeated example (a zero pairwise distance). ---

def test_losses_vanish_with_finite_gradients_when_student_is_teacher():
  feature = RNG.normal(size=(4, 3, 3, 2)).astype(np.float32)
  feature[1] = feature[0]
  logits = RNG.normal(size=(4, 6)).astype(np.float32)
  labels = jnp.array([0, 1, 2, 5])
  cases = {'fitnet': (losses.fitnet_loss, feature), 'at': (losses.attention_transfer, feature),
           'sp': (losses.similarity_preserving, feature), 'pkt': (losses.pkt, feature),
           'rkd': (losses.rkd_loss, feature), 'dist': (losses.dist_loss, logits),
           'dkd': (lambda t, s: losses.dkd(t, s, labels), logits)}
  at_teacher = jax.jit(lambda: {name: jax.value_and_grad(loss, argnums=1)(x, x)
                                for name, (loss, x) in cases.items()})()
  for name, (value, grad) in at_teacher.items():
    assert abs(float(value)) < 1e-5, name
    assert np.all(np.isfinite(grad)) and np.abs(grad).max() < 1e-4, name


# --- Linear CKA with the unbiased HSIC. ---

def np_hsic1(k, l):
  """Song et al. 2012's unbiased HSIC, as written in Nguyen et al. 2021."""
  n = len(k)
  k, l, ones = k - np.diag(np.diag(k)), l - np.diag(np.diag(l)), np.ones(n)
  return (np.trace(k @ l) + (ones @ k @ ones) * (ones @ l @ ones) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * ones @ k @ l @ ones) / (n * (n - 3))


def np_hsic_terms(x, y):
  """Linear kernels of the raw (uncentred) features."""
  k, l = rows(x) @ rows(x).T, rows(y) @ rows(y).T
  return np_hsic1(k, l), np_hsic1(k, k), np_hsic1(l, l)


def np_cka(x, y):
  xy, xx, yy = np_hsic_terms(x, y)
  return xy / np.sqrt(xx * yy)


def test_linear_cka_matches_numpy():
  x = RNG.normal(size=(6, 2, 2)) + 1.0
  y = x.reshape(6, -1)[:, :3] @ RNG.normal(size=(3, 3)) + 0.5 * RNG.normal(size=(6, 3))
  assert_matches_reference(losses.linear_cka, np_cka, x, y)


def test_cka_properties_and_minibatch_accumulation():
  x = RNG.normal(size=(16, 6)).astype(np.float32)
  y = (np.tanh(x @ RNG.normal(size=(6, 5))) + 0.3 * RNG.normal(size=(16, 5))).astype(np.float32)
  orthogonal = np.linalg.qr(RNG.normal(size=(6, 6)))[0].astype(np.float32)

  @jax.jit
  def cka_cases(x, y):
    terms = [losses.linear_hsic_terms(x[i:i + 8], y[i:i + 8]) for i in (0, 8)]
    return dict(
        xy=losses.linear_cka(x, y), xx=losses.linear_cka(x, x),
        rotated=losses.linear_cka(x @ orthogonal, y),
        scaled=losses.linear_cka(3.7 * x, 0.2 * y),
        offset=losses.linear_cka(x + 300, y),  # cancels in float32 unless centred first
        minibatch=losses.cka_from_hsic(*[jnp.stack(column) for column in zip(*terms)]))

  got = cka_cases(x, y)
  base = float(got['xy'])
  np.testing.assert_allclose(base, np_cka(x.astype(np.float64), y.astype(np.float64)), rtol=1e-5)
  np.testing.assert_allclose(got['xx'], 1.0, rtol=1e-6)
  for key, tolerance in (('rotated', 1e-5), ('scaled', 1e-5), ('offset', 1e-4)):
    np.testing.assert_allclose(got[key], base, rtol=tolerance, err_msg=key)
  # Minibatch CKA: the HSIC terms of batches of 8 averaged, then combined.
  np_terms = np.mean([np_hsic_terms(x[i:i + 8].astype(np.float64), y[i:i + 8].astype(np.float64))
                      for i in (0, 8)], axis=0)
  np.testing.assert_allclose(got['minibatch'], np_terms[0] / np.sqrt(np_terms[1] * np_terms[2]),
                             rtol=1e-5)
  with pytest.raises(ValueError, match='at least 4'):
    losses.linear_cka(x[:3], y[:3])


def test_masked_hsic_terms_count_only_real_rows():
  """An evaluation batch padded with junk rows gives the HSIC terms of its real rows alone
  (NumPy on the kept rows), and nothing (zeros) when fewer than 4 rows are real."""
  x, y = RNG.normal(size=(9, 2, 3)) + 2.0, RNG.normal(size=(9, 4))
  x[7:], y[7:] = 1e3, -1e3  # padding: must not count
  mask = np.array([1, 1, 1, 1, 1, 1, 1, 0, 0], np.float64)
  with jax.enable_x64(True):
    got = jax.jit(losses.masked_linear_hsic_terms)(x, y, mask)
    few = jax.jit(losses.masked_linear_hsic_terms)(x, y, np.array([1, 1, 1] + [0] * 6, float))
  np.testing.assert_allclose(got, np_hsic_terms(x[:7], y[:7]), rtol=1e-9)
  np.testing.assert_array_equal(few, np.zeros(3))
  # float32 features far from 0 (post-ReLU activations are): centred by the real rows' mean,
  # the Gram entries keep their precision.
  offset = jax.jit(losses.masked_linear_hsic_terms)((x + 300).astype(np.float32),
                                                    y.astype(np.float32), mask)
  np.testing.assert_allclose(offset, np_hsic_terms(x[:7], y[:7]), rtol=1e-3)


def test_cka_of_an_evaluation_from_summed_batch_terms():
  """`evaluate.cka_results`: minibatch CKA = mean HSIC_xy / sqrt(mean HSIC_xx · mean HSIC_yy)
  over the batches (the sums' batch count cancels); several pairs: the mean and each."""
  from bigkd.evaluate import cka_results
  x, y = RNG.normal(size=(16, 5)), RNG.normal(size=(16, 3))
  y[:, :2] += x[:, :2]
  batches = [np_hsic_terms(x[i:i + 8], y[i:i + 8]) for i in (0, 8)]
  mean = np.mean(batches, axis=0)
  want = mean[0] / np.sqrt(mean[1] * mean[2])
  sums = np.sum(batches, axis=0)
  assert cka_results({'a': sums}) == pytest.approx({'cka': want}, rel=1e-12)
  both = cka_results({'a': sums, 'b': np.array([1.0, 1.0, 4.0])})
  assert both == pytest.approx({'cka': (want + 0.5) / 2, 'cka/a': want, 'cka/b': 0.5})
