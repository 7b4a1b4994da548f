"""Tests of bigkd.optim.shampoo: roots, layout, grafting, failure fallback, checkpoints, sharding,
convergence on an ill-conditioned Kronecker-structured quadratic, and the conv-aware Muon."""
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bigkd.optim.shampoo import (default_shampoo_options, from_blocks, inverse_pth_root,
                                 make_layout, merge_dims, muon, shampoo, to_blocks)
from support import finish, start


def rotated_spd(rng, n, cond):
  """SPD matrix with log-spaced eigenvalues in [1/cond, 1] in a random orthogonal basis."""
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return (q * np.logspace(0, -np.log10(cond), n)) @ q.T


def reference_root(a, p, eps):
  w, v = np.linalg.eigh(a)
  return (v * (np.maximum(w, 0) + eps * w.max()) ** (-1.0 / p)) @ v.T


def random_grads(params, steps, seed=0):
  """Gradient sequence from numpy (jax.random would compile one program per shape)."""
  rng = np.random.default_rng(seed)
  return [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
          for _ in range(steps)]


PARAMS = {'w': jnp.ones((24, 10)), 'k': jnp.ones((3, 3, 2, 5)), 'b': jnp.ones((10,))}


# ----------------------------------------------------------------------------- inverse roots
@pytest.mark.parametrize('method', ['eigh', 'newton'])
def test_inverse_root_matches_eigendecomposition(method):
  rng = np.random.default_rng(0)
  conds = [10.0, 1e4, 1e6]
  mats = np.stack([rotated_spd(rng, 20, c) * s for c, s in zip(conds, [1.0, 30.0, 1e-3])])
  for p in (2, 4, 8):
    roots, errs = jax.jit(jax.vmap(lambda a, p=p: inverse_pth_root(a, p, 1e-6, method)))(
        jnp.asarray(mats, jnp.float32))
    for a, r, e, c in zip(mats, np.asarray(roots, np.float64), errs, conds):
      ref = reference_root(a, p, 1e-6)
      rel = np.linalg.norm(r - ref) / np.linalg.norm(ref)
      assert rel < (1e-4 if c <= 1e4 else 5e-3), (method, p, c, rel)
      assert float(e) < 1e-4


# ----------------------------------------------------------------------------- layout
@pytest.mark.parametrize('shape,block_size', [
    ((7,), 8), ((5, 3), 8), ((37, 20), 8), ((37, 20), 16), ((3, 3, 5, 7), 8), ((2, 300, 10), 16),
    ((1, 45, 1, 19), 8), ((513, 3), 16), ((3, 3, 64, 48), 16)])
def test_blocks_are_lossless(shape, block_size):
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)
  lay = make_layout(shape, block_size, 400)
  xb, back = jax.jit(lambda x: (to_blocks(x, lay), from_blocks(to_blocks(x, lay), lay, shape)))(x)
  assert xb.shape == (int(np.prod(lay.count)),) + lay.block
  assert all(b <= block_size for i, b in enumerate(lay.block) if i in lay.axes)
  np.testing.assert_array_equal(back, x)
  assert float(jnp.sum(xb ** 2)) == pytest.approx(float(jnp.sum(x ** 2)), rel=1e-6)


def test_merge_dims():
  assert merge_dims((3, 3, 16, 32), 4096) == (144, 32)   # conv kernel → (9·Cin, Cout)
  assert merge_dims((3, 3, 512, 512), 4096) == (9, 512, 512)
  assert merge_dims((4, 8), 128) == (4, 8)               # a matrix stays a matrix
  assert merge_dims((3, 3, 2, 4), 4096) == (18, 4)
  assert merge_dims((1, 512), 4096) == (512,)            # effectively a vector
  assert make_layout((1, 512), 128, 4096).axes == ()      # → grafted optimiser only
  assert make_layout((10000, 64), 128, 4096).axes == (1,)  # too large: identity on that side
  assert make_layout((10000, 64), 128, 4096).block == (10000, 64)


def test_default_options_cover_shampoo_signature():
  opts = default_shampoo_options()
  assert not {'b1', 'b2', 'weight_decay', 'weight_decay_mask'} & set(opts)
  assert set(default_shampoo_options(shared=True)) == set(opts) | {
      'b1', 'b2', 'weight_decay', 'weight_decay_mask'}
  shampoo(1e-3, b1=0.9, b2=0.999, weight_decay=0.1, weight_decay_mask=None, **opts)


# ----------------------------------------------------------------------------- grafting
GRAFTS = {
    'adam': lambda lr, b1, b2, nesterov: optax.adam(lr, b1, b2, 1e-8, nesterov=nesterov),
    'rmsprop': lambda lr, b1, b2, nesterov: optax.rmsprop(lr, b2, 1e-8, momentum=b1,
                                                          nesterov=nesterov),
    'sgd': lambda lr, b1, b2, nesterov: optax.sgd(lr, momentum=b1, nesterov=nesterov),
}


def run_pair(opt, ref, params, grads):
  """Updates of `opt` and `ref` for the same gradient sequence (params held fixed)."""
  s, r, out = jax.jit(opt.init)(params), jax.jit(ref.init)(params), []
  step, ref_step = jax.jit(opt.update), jax.jit(ref.update)
  for g in grads:
    u, s = step(g, s, params)
    v, r = ref_step(g, r, params)
    out.append((u, v))
  return out


@pytest.mark.parametrize('graft,nesterov', [('adam', False), ('rmsprop', True), ('sgd', True)])
def test_grafting_takes_each_layers_norm_from_grafted_optimizer(graft, nesterov):
  lr, b1, b2 = 0.1, 0.9, 0.99
  opt = shampoo(lr, b1, b2, graft=graft, nesterov=nesterov, block_size=8,
                start_preconditioning_step=2, precondition_every=1)
  ref = GRAFTS[graft](lr, b1, b2, nesterov)
  for t, (u, v) in enumerate(run_pair(opt, ref, PARAMS, random_grads(PARAMS, 5))):
    for name in PARAMS:
      un, vn = float(jnp.linalg.norm(u[name])), float(jnp.linalg.norm(v[name]))
      assert un == pytest.approx(vn, rel=1e-5), (t, name)
      cos = float(jnp.vdot(u[name], v[name])) / (un * vn)
      if t >= 2 and name != 'b':   # preconditioned: same norm, another direction
        assert cos < 0.99, (t, name, cos)
      else:                        # before the start, and vectors: the grafted update itself
        np.testing.assert_allclose(u[name], v[name], rtol=1e-5, atol=1e-6)


def test_before_start_equals_adamw():
  """With weight decay, a mask, a schedule and Nesterov: exactly optax.adamw."""
  lr, b1, b2, wd = optax.linear_schedule(0.1, 0.01, 10), 0.9, 0.95, 0.05
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  opt = shampoo(lr, b1, b2, wd, mask, nesterov=True, block_size=8,
                start_preconditioning_step=100)
  ref = optax.adamw(lr, b1, b2, 1e-8, weight_decay=wd, mask=mask, nesterov=True)
  params = jax.tree.map(lambda p: p * 0.5, PARAMS)
  for u, v in run_pair(opt, ref, params, random_grads(params, 6, seed=3)):
    for name in params:
      np.testing.assert_allclose(u[name], v[name], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- failures
def test_failed_root_keeps_previous_preconditioner():
  opt = shampoo(0.1, block_size=8, start_preconditioning_step=1, precondition_every=1)
  grads = random_grads(PARAMS, 4)
  state, step = jax.jit(opt.init)(PARAMS), jax.jit(opt.update)
  for g in grads[:2]:
    _, state = step(g, state, PARAMS)
  sh = state[0]
  before = sh.roots['w']
  poisoned = dict(sh.stats, w=(sh.stats['w'][0] * jnp.nan, sh.stats['w'][1]))
  state = (sh._replace(stats=poisoned),) + state[1:]
  u, state = step(grads[2], state, PARAMS)
  after = state[0].roots['w']
  np.testing.assert_array_equal(after[0], before[0])     # NaN statistics: root kept
  assert not np.allclose(after[1], before[1])           # the healthy side still refreshed
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


def test_inaccurate_root_keeps_previous_preconditioner():
  opt = shampoo(0.1, block_size=8, start_preconditioning_step=0, precondition_every=1,
                inverse_root_method='newton', newton_max_iters=1)
  state, step = jax.jit(opt.init)(PARAMS), jax.jit(opt.update)
  for g in random_grads(PARAMS, 2):
    _, state = step(g, state, PARAMS)
  for roots in state[0].roots.values():
    for r in roots:   # one Newton step is far from converged: identity (initial) kept
      np.testing.assert_array_equal(r, np.broadcast_to(np.eye(r.shape[-1]), r.shape))


# ----------------------------------------------------------------------------- checkpoints
def test_state_survives_orbax_round_trip(tmp_path):
  mask = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    shampoo(optax.cosine_decay_schedule(0.1, 50), weight_decay=0.1,
                            weight_decay_mask=mask, block_size=8, start_preconditioning_step=1,
                            precondition_every=2))
  step = jax.jit(opt.update)
  grads = random_grads(PARAMS, 6)
  state = jax.jit(opt.init)(PARAMS)
  for g in grads[:3]:
    _, state = step(g, state, PARAMS)
  with ocp.CheckpointManager(tmp_path / 'ckpt') as mgr:
    mgr.save(3, args=ocp.args.StandardSave(state))
    mgr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = mgr.restore(3, args=ocp.args.StandardRestore(abstract))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for g in grads[3:]:
    u, state = step(g, state, PARAMS)
    v, restored = step(g, restored, PARAMS)
    jax.tree.map(np.testing.assert_array_equal, u, v)


# ----------------------------------------------------------------------------- sharding
SHARDED = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from bigkd.optim.shampoo import shampoo
    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ('x', 'y'))
    specs = {'w': P('x', 'y'), 'k': P(None, None, None, 'x'), 'b': P('y')}
    rng = np.random.default_rng(0)
    shapes = {'w': (32, 24), 'k': (3, 3, 4, 8), 'b': (24,)}
    params = {n: rng.normal(size=s).astype(np.float32) for n, s in shapes.items()}
    grads = {n: rng.normal(size=(3,) + s).astype(np.float32) for n, s in shapes.items()}
    opt = shampoo(0.1, block_size=8, start_preconditioning_step=1, precondition_every=1)

    @jax.jit
    def run(params, grads):   # init and three updates in one program: one compilation
      step = lambda s, g: opt.update(g, s, params)[::-1]
      updates = jax.lax.scan(step, opt.init(params), grads)[1]
      return jax.tree.map(lambda x: x[-1], updates)
    shard = lambda t, lead=(): {
        n: jax.device_put(x, NamedSharding(mesh, P(*lead, *specs[n]))) for n, x in t.items()}
    u = run(shard(params), shard(grads, (None,)))
    ref = run(params, grads)
    diff = max(float(np.max(np.abs(np.asarray(u[n]) - np.asarray(ref[n])))) for n in shapes)
    print('SHARDED_OK', len(u['w'].sharding.device_set), diff)
''')


@pytest.mark.integration
def test_update_under_jit_on_sharded_8_device_mesh():
  out = finish(start([sys.executable, '-c', SHARDED], devices=8))  # a subprocess: 8 devices
  line = [l for l in out.splitlines() if l.startswith('SHARDED_OK')][-1]
  _, devices, diff = line.split()
  assert int(devices) == 8 and float(diff) < 1e-5, line


# ----------------------------------------------------------------------------- convergence
LR_GRID = [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0]


def steps_to_target(make_opt, loss, x0, target, steps):
  """Per learning rate of LR_GRID: the first step whose loss ≤ target (None: never)."""
  @jax.jit
  def losses(lr):
    opt = make_opt(lr)

    def step(carry, _):
      x, s = carry
      value, g = jax.value_and_grad(loss)(x)
      u, s = opt.update(g, s, x)
      return (x + u, s), value
    return jax.lax.scan(step, (x0, opt.init(x0)), None, steps)[1]
  found = lambda ls: int(np.argmax(ls <= target)) if np.any(ls <= target) else None
  return {lr: found(np.asarray(losses(lr))) for lr in LR_GRID}


def test_shampoo_beats_adam_on_ill_conditioned_kronecker_quadratic():
  """loss = ½ tr((X−X*)ᵀ L (X−X*) R), L and R SPD with condition 1e3 each in random rotated
  bases (Hessian R ⊗ L: condition 1e6, no coordinate basis diagonalises it). Shampoo (defaults,
  Adam graft) must reach 1e-4 · loss(0) in ≤ 1/3 of Adam's steps, each at its best LR."""
  rng = np.random.default_rng(0)
  m, n = 16, 12
  left, right = (jnp.asarray(rotated_spd(rng, k, 1e3), jnp.float32) for k in (m, n))
  x_star = jnp.asarray(rng.normal(size=(m, n)), jnp.float32)

  def loss(x):
    e = x - x_star
    return 0.5 * jnp.trace(e.T @ left @ e @ right)
  x0 = jnp.zeros((m, n))
  target = 1e-4 * float(loss(x0))
  best = {}
  for name, make in [('adam', lambda lr: optax.adam(lr)), ('shampoo', lambda lr: shampoo(lr))]:
    found = steps_to_target(make, loss, x0, target, 1500)
    best[name] = min(s for s in found.values() if s is not None)
    print(name, found)
  print('best steps to target:', best)
  assert 3 * best['shampoo'] <= best['adam'], best


# ----------------------------------------------------------------------------- muon
def test_muon_orthogonalises_conv_kernels_and_sends_vectors_to_adam():
  params = {'k': jnp.ones((3, 3, 2, 8)), 'b': jnp.ones((8,))}
  grads = random_grads(params, 3)
  flat = {'k': jnp.ones((18, 8)), 'b': params['b']}
  flat_grads = [dict(g, k=g['k'].reshape(18, 8)) for g in grads]
  ours = muon(0.02, weight_decay=0.1, weight_decay_mask=lambda p: jax.tree.map(
      lambda x: x.ndim > 1, p))
  ref = optax.contrib.muon(0.02, weight_decay=0.1, weight_decay_mask=lambda p: jax.tree.map(
      lambda x: x.ndim > 1, p))
  s, r = jax.jit(ours.init)(params), jax.jit(ref.init)(flat)
  ours_step, ref_step = jax.jit(ours.update), jax.jit(ref.update)
  for g, fg in zip(grads, flat_grads):
    u, s = ours_step(g, s, params)
    v, r = ref_step(fg, r, flat)
    # Five Newton-Schulz iterations amplify rounding: 1e-6 is 1e-4 of the update's largest
    # entries (a kernel flattened in another order differs by 1e-2).
    np.testing.assert_allclose(u['k'].reshape(18, 8), v['k'], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u['b'], v['b'], rtol=1e-5, atol=1e-7)
  adam = optax.adam(0.02, nesterov=True)   # muon's Adam fallback is Nesterov by default
  a, adam_step = adam.init(params['b']), jax.jit(adam.update)
  for g in grads:
    w, a = adam_step(g['b'], a)
  np.testing.assert_allclose(u['b'], w, rtol=1e-5, atol=1e-7)
