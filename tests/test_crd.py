"""CRD (contrastive representation distillation) with queues: the loss against NumPy written
from its formula, the queue's bookkeeping, and the train step (gradient accumulation gives the
full batch's update and queue). End to end (trains, resumes bitwise after a kill, 8 devices as
1, config errors): test_feature_distill.py, whose all-methods run includes CRD."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigkd import losses, objective
from bigkd.models import feature_shapes, get_model
from bigkd.models.adapters import ContrastiveHeads
from bigkd.step import FeaturePair, Objective, StepSpec, Teacher, TrainState, make_train_step, \
    summed_metrics
from support import random_params
from test_feature_losses import assert_matches_reference

RNG = np.random.default_rng(0)


def np_crd(student, teacher, student_queue, teacher_queue, valid, temperature):
  """Σ over the two sides of the mean over anchors i of
  −log(exp(a_i·p_i/τ) / (exp(a_i·p_i/τ) + Σ_{k valid} exp(a_i·n_k/τ))), anchor a, positive p,
  negatives n: (student, teacher, teacher queue) and (teacher, student, student queue)."""
  total = 0.0
  for anchors, positives, negatives in ((student, teacher, teacher_queue),
                                        (teacher, student, student_queue)):
    terms = []
    for a, p in zip(anchors, positives):
      positive = np.exp(np.dot(a, p) / temperature)
      others = sum(np.exp(np.dot(a, n) / temperature) for n, ok in zip(negatives, valid) if ok)
      terms.append(-np.log(positive / (positive + others)))
    total += np.mean(terms)
  return total


@pytest.mark.parametrize('batch, filled, temperature', [(5, 0, 0.07), (3, 4, 0.07),
                                                        (4, 7, 0.5)])
def test_crd_matches_numpy(batch, filled, temperature):
  """Value and gradient (every input, queues included), with an empty, a partly filled and a
  full queue of 7 rows."""
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  valid = np.arange(7) < filled
  arrays = [unit(RNG.normal(size=shape)) for shape in ((batch, 4), (batch, 4), (7, 4), (7, 4))]
  want = assert_matches_reference(
      lambda *a: losses.crd_info_nce(*a, valid, temperature),
      lambda *a: np_crd(*a, valid, temperature), *arrays)
  assert (want == 0) == (filled == 0)  # no negatives yet: the positive is certain


def test_queue_takes_whole_batches_oldest_first_and_counts_what_it_holds():
  heads = (FeaturePair('prelogits', 0, 'prelogits', None, '', ('crd',), ContrastiveHeads(2),
                       'q'),)
  state = objective.initial_queues(heads, {'crd_queue': 6, 'crd_dim': 2})
  assert state['q']['student'].shape == (6, 2) and int(state['q']['filled']) == 0
  for step in range(4):  # batches of 2 rows: the 4th goes where the 1st was
    batch = jnp.full((2, 2), float(step + 1))
    state = objective.updated_queues(state, {'q': {'student': batch, 'teacher': -batch}})
  np.testing.assert_array_equal(state['q']['student'][:, 0], [4, 4, 2, 2, 3, 3])
  np.testing.assert_array_equal(state['q']['teacher'][:, 0], [-4, -4, -2, -2, -3, -3])
  assert (int(state['q']['next']), int(state['q']['filled'])) == (2, 6)


def test_grad_accumulation_gives_the_full_batch_update_and_queue():
  """Negatives come from the queue alone, so each example's term is its own and k microbatches
  give the full batch's update; the queue receives the batch's rows in the batch's order."""
  student = get_model('cnn_tiny', 10)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (16, 10, 10, 3)), jnp.uint8)
  labels = jnp.arange(16) % 10
  teacher_params = (random_params('cnn_tiny', 10, seed=1),)
  heads = ContrastiveHeads(8)
  pair = FeaturePair('prelogits', 0, 'prelogits', None, '', ('crd',), heads, 'crd_0')
  options = {'crd_queue': 32, 'crd_dim': 8, 'crd_temperature': 0.1}
  aug = dict(crop_area=(0.5, 1.0), crop_aspect=(0.75, 1.33), flip=True, mixup_alpha=1.0,
             mixup_per_example=False)
  terms = (('labels', 1.0), ('crd', 0.8))
  spec = StepSpec(student, 8, (Teacher(get_model('cnn_tiny', 10), 10),), 10,
                  tuple(sorted(aug.items())), 'function_matching',
                  Objective(terms, options=tuple(sorted(options.items())), feature_pairs=(pair,)),
                  0)
  tx = optax.adam(1e-2)
  params = random_params('cnn_tiny', 8, seed=2)
  widths = [feature_shapes('cnn_tiny', 10, size)['prelogits'] for size in (8, 10)]
  aux = {'crd_0': heads.init(jax.random.key(3), *(jnp.zeros((1, *w)) for w in widths))['params']}
  queues = objective.initial_queues((pair,), options)
  # A queue half full of earlier embeddings: the loss has negatives to contrast with.
  earlier = {'student': jnp.asarray(RNG.normal(size=(16, 8)), jnp.float32),
             'teacher': jnp.asarray(RNG.normal(size=(16, 8)), jnp.float32)}
  queues = objective.updated_queues(queues, {'crd_0': earlier})
  trainable = {'student': params, 'adapters': aux}
  state = TrainState.create(params, tx.init(trainable), summed_metrics(True, terms), aux, queues)
  results = {}
  for k in (1, 4):
    step = jax.jit(make_train_step(spec, tx, lambda s: 1e-2, grad_accum_steps=k),
                   compiler_options={'xla_backend_optimization_level': 0})
    results[k] = step(state, teacher_params, images, jnp.full((16, 2), 10), labels)
  (full, full_metrics), (accum, accum_metrics) = results[1], results[4]
  assert float(full_metrics['loss_crd']) > 1.0  # 16 negatives: far from 0
  for key in ('loss', 'loss_crd', 'grad_norm'):
    np.testing.assert_allclose(full_metrics[key], accum_metrics[key], rtol=1e-5, err_msg=key)
  chex.assert_trees_all_close((full.params, full.aux_params), (accum.params, accum.aux_params),
                              rtol=1e-4, atol=2e-5)
  new_rows = full.loss_state['crd_0']['student'][16:]
  chex.assert_trees_all_close(new_rows, accum.loss_state['crd_0']['student'][16:], atol=1e-5)
  np.testing.assert_array_equal(full.loss_state['crd_0']['student'][:16], earlier['student'])
  assert (int(full.loss_state['crd_0']['filled']), int(full.loss_state['crd_0']['next'])) == (
      32, 0)
  np.testing.assert_allclose(np.linalg.norm(new_rows, axis=1), 1, rtol=1e-5)
