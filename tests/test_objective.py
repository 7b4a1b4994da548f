"""One loss path: the objective (a list of weighted terms over one forward) gives, on a fixed
batch, the loss and gradient of the two paths the train step had before (its default path and
`weighted_loss`), written out here as the reference, for every configuration those paths took."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import losses
from bigkd.models import features, get_model
from bigkd.models.adapters import FeatureAdapter
from bigkd.step import FeaturePair, Objective, StepSpec, Teacher, make_loss_fn

B, CLASSES, RES, T_RES = 12, 10, 8, 10
OPTIONS = dict(at_p=2.0, dkd_alpha=1.0, dkd_beta=8.0, dkd_temperature=4.0, dkd_warmup_steps=5,
               dist_beta=1.0, dist_gamma=2.0, dist_temperature=1.5, at_match='pool',
               pkt_form='reference')
ADAPTER = 'a0'


def former_default_loss(student, teachers, params, teacher_params, view, views, targets,
                        kind, temperature, label_weight, ensemble):
  """The train step's former default path: cross-entropy without teachers, else Hinton's loss
  against the ensembled teachers' float32 logits."""
  s_logits = student.apply({'params': params}, view)
  if not teachers:
    return losses.cross_entropy(s_logits, targets)
  all_logits = [jax.lax.stop_gradient(t.model.apply({'params': p}, views[t.resolution].astype(
      t.model.dtype)).astype(jnp.float32)) for t, p in zip(teachers, teacher_params)]
  t_logits = losses.ensemble_logits(all_logits, ensemble, temperature)
  return losses.hinton_loss(t_logits, s_logits, targets, label_weight, temperature, kind)


def former_weighted_loss(student, teachers, trainable, teacher_params, view, views, targets,
                         terms, pairs, step, temperature, label_weight, ensemble):
  """The former `weighted_loss`: Σ weight·term over feature-tapped forwards."""
  params, adapters = (trainable['student'], trainable['adapters']) if isinstance(
      trainable, dict) and 'adapters' in trainable else (trainable, None)
  s_logits, s_feats = features(student, params, view, sorted({p.student_tap for p in pairs}))
  outs = []
  for i, (t, p) in enumerate(zip(teachers, teacher_params)):
    names = sorted({q.teacher_tap for q in pairs if q.teacher == i})
    logits, feats = features(t.model, p, views[t.resolution].astype(t.model.dtype), names)
    outs.append(jax.lax.stop_gradient((logits.astype(jnp.float32), feats)))
  t_logits = losses.ensemble_logits([o[0] for o in outs], ensemble, temperature)
  o = OPTIONS
  feature_fns = {
      'at': lambda t, s: losses.attention_transfer(t, s, p=o['at_p']),
      'sp': losses.similarity_preserving, 'pkt': losses.pkt,
      'rkd_distance': losses.rkd_distance, 'rkd_angle': losses.rkd_angle}
  total = 0.0
  for term, weight in terms:
    if term == 'kl':
      value = losses.hinton_loss(t_logits, s_logits, targets, label_weight, temperature, 'kl')
    elif term == 'labels':
      value = losses.cross_entropy(s_logits, targets)
    elif term == 'dkd':
      value = losses.dkd(t_logits, s_logits, targets, o['dkd_alpha'], o['dkd_beta'],
                         o['dkd_temperature'], losses.linear_warmup(step + 1,
                                                                    o['dkd_warmup_steps']))
    elif term == 'dist':
      value = losses.dist_loss(t_logits, s_logits, o['dist_beta'], o['dist_gamma'],
                               o['dist_temperature'])
    else:
      value = 0.0
      for p in pairs:
        if term not in p.terms:
          continue
        t_f, s_f = outs[p.teacher][1][p.teacher_tap], s_feats[p.student_tap]
        if term == 'fitnet':
          if p.adapter is not None:
            s_f = p.adapter.apply({'params': adapters[p.adapter_key]}, s_f)
          value = value + losses.fitnet_loss(t_f, s_f)
        else:
          value = value + feature_fns[term](t_f, s_f)
    total = total + weight * value
  return total


@pytest.fixture(scope='module')
def batch():
  rng = np.random.default_rng(0)
  student = get_model('cnn_tiny', CLASSES)
  teachers = (Teacher(get_model('cnn_tiny', CLASSES), T_RES),
              Teacher(get_model('cnn_tiny', CLASSES), RES))
  init = lambda m, r, k: m.init(jax.random.key(k), jnp.zeros((1, r, r, 3)))['params']
  # Scaled teachers: confident, spread-out logits, so that the terms are far from trivial.
  teacher_params = [jax.tree.map(lambda x: 3 * x, init(t.model, t.resolution, i + 1))
                    for i, t in enumerate(teachers)]
  labels = rng.integers(0, CLASSES, B)
  targets = 0.7 * jax.nn.one_hot(labels, CLASSES) + 0.3 * jax.nn.one_hot(labels[::-1], CLASSES)
  view = jnp.asarray(rng.uniform(-1, 1, (B, RES, RES, 3)), jnp.float32)
  views = {RES: view, T_RES: jnp.asarray(rng.uniform(-1, 1, (B, T_RES, T_RES, 3)), jnp.float32)}
  return dict(student=student, teachers=teachers, teacher_params=teacher_params,
              params=init(student, RES, 0), view=view, views=views, targets=targets)


def spec_of(b, n_teachers, objective):
  return StepSpec(b['student'], RES, b['teachers'][:n_teachers], CLASSES, (), 'consistent',
                  objective, 0)


def assert_same(new_fn, old_fn, trainable):
  (loss, (metrics, _)), grads = jax.value_and_grad(new_fn, has_aux=True)(trainable)
  old_loss, old_grads = jax.value_and_grad(old_fn)(trainable)
  np.testing.assert_allclose(loss, old_loss, rtol=1e-6)
  np.testing.assert_allclose(metrics['loss'], old_loss, rtol=1e-6)
  chex.assert_trees_all_close(grads, old_grads, rtol=1e-5, atol=1e-7)
  assert float(optax_norm(grads)) > 1e-4  # the comparison is not of zeros
  return metrics


def optax_norm(tree):
  return jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(tree)))


DEFAULT_CASES = {  # (teachers, kind, temperature, label_weight, ensemble)
    'supervised': (0, 'kl', 1.0, 0.0, 'logits'),
    'kd': (1, 'kl', 1.0, 0.0, 'logits'),
    'hinton': (1, 'kl', 4.0, 0.3, 'logits'),
    'ensemble_logits': (2, 'kl', 2.0, 0.0, 'logits'),
    'ensemble_probs': (2, 'kl', 3.0, 0.1, 'probs'),
    'hard_pseudo': (1, 'hard_pseudo', 1.0, 0.5, 'logits'),
    'logit_l2': (2, 'logit_l2', 1.0, 0.0, 'logits'),
}


@pytest.mark.parametrize('case', DEFAULT_CASES)
def test_former_default_path(batch, case):
  n, kind, temperature, label_weight, ensemble = DEFAULT_CASES[case]
  terms = (('kl', 1.0),) if n else (('labels', 1.0),)
  spec = spec_of(batch, n, Objective(terms, kind, temperature, label_weight, ensemble))
  loss_fn = make_loss_fn(spec)
  new = lambda p: loss_fn(p, batch['teacher_params'][:n], 0, batch['view'], batch['views'],
                          batch['targets'])
  old = lambda p: former_default_loss(batch['student'], spec.teachers, p,
                                      batch['teacher_params'][:n], batch['view'],
                                      batch['views'], batch['targets'], kind, temperature,
                                      label_weight, ensemble)
  metrics = assert_same(new, old, batch['params'])
  assert not any(k.startswith('loss_') for k in metrics)  # one term: nothing but `loss`
  if n:
    t_logits = losses.ensemble_logits(
        [t.model.apply({'params': p}, batch['views'][t.resolution])
         for t, p in zip(spec.teachers, batch['teacher_params'])], ensemble, temperature)
    s_logits = batch['student'].apply({'params': batch['params']}, batch['view'])
    np.testing.assert_allclose(metrics['kl_T1'], losses.kl_divergence(t_logits, s_logits),
                               rtol=1e-5)
    np.testing.assert_allclose(metrics['agreement'], np.mean(
        np.argmax(t_logits, -1) == np.argmax(s_logits, -1)))


WEIGHTED_CASES = {
    'logit_terms': ((('kl', 1.0), ('labels', 0.5), ('dkd', 2.0), ('dist', 1.5)), ()),
    'feature_terms': ((('kl', 0.5), ('fitnet', 3.0), ('at', 100.0), ('sp', 10.0), ('pkt', 2.0),
                       ('rkd_distance', 5.0), ('rkd_angle', 7.0)), (
        FeaturePair('stage1', 0, 'stage2', FeatureAdapter((2, 2, 16)), ADAPTER,
                    ('fitnet', 'sp', 'pkt')),
        FeaturePair('stage2', 1, 'stage2', None, '', ('at', 'sp')),
        FeaturePair('prelogits', 0, 'prelogits', None, '', ('rkd_distance', 'rkd_angle')))),
}


@pytest.mark.parametrize('case', WEIGHTED_CASES)
def test_former_weighted_path(batch, case):
  terms, pairs = WEIGHTED_CASES[case]
  spec = spec_of(batch, 2, Objective(terms, 'kl', 2.0, 0.25, 'probs',
                                     tuple(sorted(OPTIONS.items())), pairs))
  trainable = batch['params']
  if any(p.adapter for p in pairs):
    adapter_params = pairs[0].adapter.init(jax.random.key(9), jnp.zeros((1, 4, 4, 8)))['params']
    trainable = {'student': batch['params'], 'adapters': {ADAPTER: adapter_params}}
  step = 2  # inside DKD's warmup: the ramp counts
  loss_fn = make_loss_fn(spec)
  new = lambda p: loss_fn(p, batch['teacher_params'], step, batch['view'], batch['views'],
                          batch['targets'])
  old = lambda p: former_weighted_loss(batch['student'], spec.teachers, p,
                                       batch['teacher_params'], batch['view'], batch['views'],
                                       batch['targets'], terms, pairs, step, 2.0, 0.25, 'probs')
  metrics = assert_same(new, old, trainable)
  assert sorted(k for k in metrics if k.startswith('loss_')) == sorted(
      f'loss_{t}' for t, _ in terms)
  total = sum(w * float(metrics[f'loss_{t}']) for t, w in terms)
  np.testing.assert_allclose(float(metrics['loss']), total, rtol=1e-5)


def relative_error(got, want):
  diff = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b, got, want)
  return float(optax_norm(diff) / optax_norm(want))


def test_a_bfloat16_student_keeps_float32_parameters_loss_and_gradient(batch):
  """Convolutions and matmuls in bfloat16, everything else in float32: the loss, its gradient
  (float32, for float32 master parameters) and the logits agree with the float32 student's
  within bfloat16's precision (8 significand bits: each rounding is relative 2^-8; a tolerance
  of 16 of them covers the few layers of cnn_tiny), and differ by far more than float32's
  rounding, so the computation really is in bfloat16."""
  eps_bf16, eps_f32 = 2.0 ** -8, 2.0 ** -24

  def loss_and_grad(dtype):
    student = get_model('cnn_tiny', CLASSES, dtype=dtype)
    spec = spec_of(dict(batch, student=student), 1, Objective((('kl', 1.0),)))
    loss_fn = make_loss_fn(spec)
    return jax.value_and_grad(lambda p: loss_fn(p, batch['teacher_params'][:1], 0,
                                                batch['view'], batch['views'],
                                                batch['targets']), has_aux=True)(batch['params'])

  (loss32, (metrics32, _)), grads32 = loss_and_grad(jnp.float32)
  (loss16, (metrics16, _)), grads16 = loss_and_grad(jnp.bfloat16)
  assert loss16.dtype == metrics16['kl_T1'].dtype == jnp.float32
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
  for got, want in ((loss16, loss32), (metrics16['kl_T1'], metrics32['kl_T1']),
                    (grads16, grads32)):
    error = relative_error(got, want)
    assert 100 * eps_f32 < error < 16 * eps_bf16, error


def test_own_classifiers_learn_from_the_model_and_not_the_other_way(batch):
  """Be your own teacher: the terms equal NumPy computed from the forward outputs (the shallow
  classifier's 1x1 conv, GroupNorm, ReLU, pool and dense written out); each trains the head and
  the blocks under its tap, and self_kl / self_feature have the model's final output and
  embedding as targets: no gradient reaches the final classifier through them."""
  from bigkd.models import features
  from bigkd.models.adapters import ShallowClassifier
  from bigkd.step import SelfHead
  from test_feature_losses import np_group_norm
  head = SelfHead('stage1', ShallowClassifier(CLASSES, 64), 'self_stage1')
  feature_1 = features(batch['student'], batch['params'], batch['view'], ['stage1'])[1]['stage1']
  head_params = head.module.init(jax.random.key(5), feature_1[:1])['params']
  trainable = {'student': batch['params'], 'adapters': {head.key: head_params}}
  logits, feats = features(batch['student'], batch['params'], batch['view'],
                           ['stage1', 'prelogits'])
  x, hp = np.asarray(feats['stage1'], np.float64), jax.tree.map(np.asarray, head_params)
  y = np.einsum('bhwc,cd->bhwd', x, hp['Conv_0']['kernel'][0, 0])
  y = np.maximum(np_group_norm(y, 32, hp['GroupNorm_0']['scale'], hp['GroupNorm_0']['bias']), 0)
  embedding = y.mean(axis=(1, 2))
  head_logits = embedding @ hp['Dense_0']['kernel'] + hp['Dense_0']['bias']
  log_softmax = lambda z: z - np.log(np.sum(np.exp(z - z.max(1, keepdims=True)), 1,
                                            keepdims=True)) - z.max(1, keepdims=True)
  t = 3.0
  final, shallow = log_softmax(np.asarray(logits, np.float64) / t), log_softmax(head_logits / t)
  want = {'self_ce': np.mean(-np.sum(np.asarray(batch['targets']) * log_softmax(head_logits), 1)),
          'self_kl': t * t * np.mean(np.sum(np.exp(final) * (final - shallow), 1)),
          'self_feature': np.mean((embedding - np.asarray(feats['prelogits'])) ** 2)}
  for term, value in want.items():
    spec = StepSpec(batch['student'], RES, (), CLASSES, (), 'consistent', Objective(
        ((term, 1.0),), options=(('self_temperature', t),), self_heads=(head,)), 0)
    loss_fn = make_loss_fn(spec)
    (loss, _), grads = jax.value_and_grad(
        lambda p: loss_fn(p, (), 0, batch['view'], {}, batch['targets']), has_aux=True)(trainable)
    np.testing.assert_allclose(loss, value, rtol=1e-5, err_msg=term)
    final_layer = float(optax_norm(grads['student']['Dense_0']))
    under_tap = float(optax_norm(grads['student']['Conv_0']))
    assert float(optax_norm(grads['adapters'])) > 1e-6 and under_tap > 1e-6, term
    assert final_layer == 0, (term, final_layer)  # targets: stop_gradient, and self_ce's head
                                                  # sits below the final classifier
