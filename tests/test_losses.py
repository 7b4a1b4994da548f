import jax
import jax.numpy as jnp
import numpy as np

from bigkd import losses


def logits(seed, shape=(8, 5)):
  return jax.random.normal(jax.random.key(seed), shape) * 3


def np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_kl_matches_numpy_and_scales_with_t_squared():
  t, s = np.asarray(logits(0)), np.asarray(logits(1))
  for temp in (1.0, 4.0):
    pt, ps = np_softmax(t / temp), np_softmax(s / temp)
    expected = temp ** 2 * np.mean(np.sum(pt * (np.log(pt) - np.log(ps)), -1))
    np.testing.assert_allclose(losses.kl_divergence(t, s, temp), expected, rtol=1e-5)
  assert float(losses.kl_divergence(t, t, 2.0)) < 1e-6


def test_hinton_loss_interpolates_between_labels_and_distillation():
  t, s = logits(0), logits(1)
  labels = jax.nn.one_hot(jnp.arange(8) % 5, 5)
  ce, kl = losses.cross_entropy(s, labels), losses.kl_divergence(t, s, 3.0)
  np.testing.assert_allclose(losses.hinton_loss(t, s, labels, 1.0, 3.0), ce, rtol=1e-6)
  np.testing.assert_allclose(losses.hinton_loss(t, s, labels, 0.0, 3.0), kl, rtol=1e-6)
  np.testing.assert_allclose(losses.hinton_loss(t, s, labels, 0.3, 3.0), 0.3 * ce + 0.7 * kl,
                             rtol=1e-6)


def test_hard_pseudo_labels_and_logit_l2():
  t, s = logits(0), logits(1)
  pseudo = jax.nn.one_hot(jnp.argmax(t, -1), 5)
  np.testing.assert_allclose(losses.hard_pseudo_label_loss(t, s), losses.cross_entropy(s, pseudo))
  np.testing.assert_allclose(losses.logit_l2(t, s), np.mean(np.sum((t - s) ** 2, -1)), rtol=1e-6)


def test_ensembles_average_logits_or_probabilities():
  a, b = logits(0), logits(1)
  np.testing.assert_allclose(losses.ensemble_logits([a, b], 'logits'), (a + b) / 2, rtol=1e-6)
  for temp in (1.0, 2.0):
    combined = losses.ensemble_logits([a, b], 'probs', temp)
    mean_probs = (jax.nn.softmax(a / temp) + jax.nn.softmax(b / temp)) / 2
    np.testing.assert_allclose(jax.nn.softmax(combined / temp), mean_probs, atol=1e-6)
