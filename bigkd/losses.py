"""Distillation losses. Every loss returns a scalar averaged over the batch.

Logits are float32 [B, classes]; `labels` are (possibly mixed) one-hot targets [B, classes].
"""
import jax
import jax.numpy as jnp

DISTILL_LOSSES = ('kl', 'hard_pseudo', 'logit_l2')
ENSEMBLE_MODES = ('logits', 'probs')


def cross_entropy(logits, labels):
  """Cross-entropy against soft (or one-hot) targets."""
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))


def kl_divergence(teacher_logits, student_logits, temperature=1.0):
  """KL(p_teacher ‖ p_student) at temperature T, scaled by T² (Hinton et al. 2015).

  The T² keeps gradient magnitudes comparable across temperatures, so α in `hinton_loss`
  means the same thing at any T.
  """
  t_logp = jax.nn.log_softmax(teacher_logits / temperature)
  s_logp = jax.nn.log_softmax(student_logits / temperature)
  kl = jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)
  return temperature ** 2 * jnp.mean(kl)


def hard_pseudo_label_loss(teacher_logits, student_logits):
  """Cross-entropy against the teacher's argmax class."""
  pseudo = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), teacher_logits.shape[-1])
  return cross_entropy(student_logits, pseudo)


def logit_l2(teacher_logits, student_logits):
  """Mean squared difference of logits (Ba & Caruana 2014), summed over classes."""
  return jnp.mean(jnp.sum((teacher_logits - student_logits) ** 2, axis=-1))


def distillation_loss(kind, teacher_logits, student_logits, temperature):
  if kind == 'kl':
    return kl_divergence(teacher_logits, student_logits, temperature)
  if kind == 'hard_pseudo':
    return hard_pseudo_label_loss(teacher_logits, student_logits)
  if kind == 'logit_l2':
    return logit_l2(teacher_logits, student_logits)
  raise ValueError(f'unknown distillation loss {kind!r}; one of {DISTILL_LOSSES}')


def hinton_loss(teacher_logits, student_logits, labels, label_weight, temperature, kind='kl'):
  """α·CE(labels) + (1 − α)·distillation: α = 0 is pure distillation, α = 1 supervised."""
  soft = distillation_loss(kind, teacher_logits, student_logits, temperature)
  return label_weight * cross_entropy(student_logits, labels) + (1 - label_weight) * soft


def ensemble_logits(logits_list, mode, temperature=1.0):
  """Combines teachers. 'logits': mean of logits. 'probs': mean of the tempered probabilities,
  returned as T·log(mean p) so that softmax(·/T) of the result is exactly that mean."""
  stacked = jnp.stack(logits_list)
  if mode == 'logits':
    return jnp.mean(stacked, axis=0)
  if mode == 'probs':
    log_probs = jax.nn.log_softmax(stacked / temperature, axis=-1)
    return temperature * (jax.nn.logsumexp(log_probs, axis=0) - jnp.log(len(logits_list)))
  raise ValueError(f'unknown ensemble mode {mode!r}; one of {ENSEMBLE_MODES}')
