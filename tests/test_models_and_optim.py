import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigkd.models import get_model, model_names
from bigkd.optim import build_optimizer, learning_rate_schedule

OPT = dict(name='adam', lr=1e-2, schedule='cosine', b1=0.9, b2=0.999, eps=1e-8,
           mu_dtype='float32', momentum=0.9, nesterov=False, weight_decay=0.1, clip_norm=1.0,
           shampoo={})


@pytest.mark.parametrize('name', ['cnn_tiny', 'cnn_small', 'resnet8', 'resnet8x4', 'resnet20'])
def test_models_give_logits_for_each_class(name):
  model = get_model(name, num_classes=7)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  logits = jax.jit(model.apply)({'params': params}, jnp.ones((3, 16, 16, 3)))
  assert logits.shape == (3, 7) and logits.dtype == jnp.float32


def test_registry_knows_cifar_resnets_with_width_multipliers():
  names = model_names()
  for name in ('resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet8x4', 'resnet32x4'):
    assert name in names
  shapes = lambda name: jax.eval_shape(get_model(name, 10).init, jax.random.key(0),
                                       jnp.zeros((1, 8, 8, 3)))
  wide, narrow = shapes('resnet8x4'), shapes('resnet8')
  count = lambda p: sum(x.size for x in jax.tree.leaves(p))
  assert count(wide) > 10 * count(narrow)
  with pytest.raises(KeyError, match='resnet7'):
    get_model('resnet7', 10)


def test_bfloat16_model_computes_in_bfloat16_and_returns_float32():
  model = get_model('resnet8', 10, dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  hlo = jax.jit(lambda p, x: model.apply({'params': p}, x)).lower(
      params, jnp.ones((2, 8, 8, 3))).as_text()
  assert 'bf16' in hlo


def test_schedule_warms_up_linearly_then_decays_to_zero():
  schedule = learning_rate_schedule(1.0, warmup_steps=10, total_steps=110, schedule='cosine')
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.5, atol=1e-6)  # half-way through the cosine
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-6)
  constant = learning_rate_schedule(1.0, 10, 110, 'constant')
  np.testing.assert_allclose([constant(5), constant(100)], [0.5, 1.0], atol=1e-6)


def test_adam_chain_clips_and_decays_kernels_only():
  tx, _ = build_optimizer(OPT, total_steps=100, warmup_steps=0)
  params = {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)}
  state = tx.init(params)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, state, params)
  # With zero gradients only the decoupled weight decay moves parameters: kernels, not biases.
  assert float(jnp.abs(updates['kernel']).max()) > 0
  np.testing.assert_allclose(updates['bias'], 0.0)
  # Clipping: a huge gradient gives the same first Adam step as a small one in the same direction.
  tx_nowd, _ = build_optimizer(dict(OPT, weight_decay=0.0), 100, 0)
  big = tx_nowd.update({'kernel': jnp.full((3, 3), 1e6), 'bias': jnp.zeros(3)},
                       tx_nowd.init(params), params)[0]
  assert np.all(np.isfinite(big['kernel']))


@pytest.mark.parametrize('name', ['sgd', 'shampoo', 'muon'])
def test_other_optimizers_reduce_a_loss(name):
  tx, _ = build_optimizer(dict(OPT, name=name, weight_decay=0.0, lr=0.05), 200, 0)
  target = jax.random.normal(jax.random.key(0), (6, 4))
  params = {'w': jnp.zeros((6, 4)), 'b': jnp.zeros(4)}
  loss = lambda p: jnp.sum((p['w'] - target) ** 2) + jnp.sum((p['b'] - 1) ** 2)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(100):
    params, state = step(params, state)
  assert float(loss(params)) < 0.2 * float(loss({'w': jnp.zeros((6, 4)), 'b': jnp.zeros(4)}))
