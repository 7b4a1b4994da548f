import re

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
  """The registry's contract: `dtype` is the compute dtype; parameters stay float32 and the
  logits come back float32 (losses and softmax run in float32)."""
  model = get_model('resnet8', 10, dtype=jnp.bfloat16)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  apply = lambda p, x: model.apply({'params': p}, x)
  images = jnp.ones((2, 8, 8, 3))
  assert jax.eval_shape(apply, params, images).dtype == jnp.float32
  # Every convolution and matmul (resnet8: 9 convolutions, 1 dense) produces bf16.
  hlo = jax.jit(apply).lower(params, images).as_text()
  results = re.findall(r'stablehlo\.(?:convolution|dot_general)\b.*-> tensor<[0-9x]*(\w+)>', hlo)
  assert results == ['bf16'] * 10, results


def test_schedule_warms_up_linearly_then_decays_to_zero():
  schedule = learning_rate_schedule(1.0, warmup_steps=10, total_steps=110, schedule='cosine')
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0, 0.5, 1.0], atol=1e-6)
  np.testing.assert_allclose(schedule(60), 0.5, atol=1e-6)  # half-way through the cosine
  np.testing.assert_allclose(schedule(110), 0.0, atol=1e-6)
  constant = learning_rate_schedule(1.0, 10, 110, 'constant')
  np.testing.assert_allclose([constant(5), constant(100)], [0.5, 1.0], atol=1e-6)


def test_adam_decays_kernels_only():
  tx, _ = build_optimizer(OPT, total_steps=100, warmup_steps=0)
  params = {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)}
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # With zero gradients only the decoupled weight decay moves parameters: kernels, not biases.
  assert float(jnp.abs(updates['kernel']).max()) > 0
  np.testing.assert_allclose(updates['bias'], 0.0)


def test_chain_clips_the_global_gradient_norm():
  """Plain SGD (momentum 0, no decay, constant lr) shows the clip: its update is -lr · g."""
  lr, clip = 0.1, 1.0
  tx, _ = build_optimizer(dict(OPT, name='sgd', momentum=0.0, weight_decay=0.0, lr=lr,
                               schedule='constant', clip_norm=clip), 100, warmup_steps=0)
  params = {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)}
  state = tx.init(params)
  direction = {'kernel': jnp.arange(9.0).reshape(3, 3) - 4, 'bias': jnp.array([1.0, -2.0, 3.0])}
  unit = jax.tree.map(lambda g: g / optax.global_norm(direction), direction)
  for norm in (1e6, 0.5):
    grads = jax.tree.map(lambda u: norm * u, unit)
    updates, _ = tx.update(grads, state, params)
    # Above clip_norm the gradient is rescaled to norm clip_norm (its direction kept); below, as is.
    expected = jax.tree.map(lambda u: -lr * min(norm, clip) * u, unit)
    np.testing.assert_allclose(optax.global_norm(updates), lr * min(norm, clip), rtol=1e-5)
    for key in params:
      np.testing.assert_allclose(updates[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)


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


def test_paper_weight_decay_does_not_change_with_the_learning_rate():
  """The paper's configs keep big_vision's weight decay: per step, a kernel shrinks by
  wd · lr(t)/lr (the schedule normalised to 1 at its peak), whatever lr is set to."""
  from bigkd.bit_recipes import transfer_config
  paper = transfer_config('flowers,fast').optimizer.to_dict()
  paper_wd, paper_lr = paper['weight_decay'], paper['lr']
  assert paper['weight_decay_scaled_by_lr'] is False and paper_wd == 3e-4
  assert (paper['name'], paper['clip_norm']) == ('adam', 1.0)
  params = {'kernel': jnp.ones((3, 3)), 'bias': jnp.ones(3)}
  zero_grads = jax.tree.map(jnp.zeros_like, params)  # Adam's own update is then 0
  steps = np.array([0, 5, 10, 30, 59])

  def decay_per_step(opt):
    """Relative decay of the kernel at `steps`, and the learning rate there."""
    tx, schedule = build_optimizer(opt, total_steps=60, warmup_steps=10)
    def step(state, _):
      updates, state = tx.update(zero_grads, state, params)
      return state, -updates['kernel'] / params['kernel']
    _, decay = jax.lax.scan(step, tx.init(params), length=60)
    return np.asarray(decay[steps, 0, 0]), np.asarray(schedule(steps))

  decays = []
  for lr in (paper_lr, 10 * paper_lr):
    decay, lr_t = decay_per_step(dict(paper, lr=lr))
    np.testing.assert_allclose(decay, paper_wd * lr_t / lr, rtol=1e-5, atol=1e-12)
    assert decay[2] == pytest.approx(paper_wd)  # the peak, at the end of the warmup
    decays.append(decay)
    decay, lr_t = decay_per_step(dict(paper, lr=lr, weight_decay_scaled_by_lr=True))
    np.testing.assert_allclose(decay, lr_t * paper_wd, rtol=1e-5, atol=1e-12)  # optax.adamw
  np.testing.assert_allclose(decays[0], decays[1], rtol=1e-5)  # the lr override changed nothing
