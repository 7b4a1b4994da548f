"""Shampoo with layer-wise grafting, and Muon extended to convolution kernels.

Why Shampoo: a diagonal preconditioner (Adam) cannot undo curvature that is not axis aligned.
Shampoo keeps one small second-moment matrix per tensor axis (for a matrix G: L = Σ G Gᵀ and
R = Σ Gᵀ G) and steps along L^(-1/2k) G R^(-1/2k), a Kronecker approximation of full-matrix
AdaGrad (Gupta et al. 2018; Anil et al. 2020). Its step length is poorly calibrated, so each
parameter takes its update's *direction* from Shampoo and its *norm* from a diagonal optimiser
(grafting); before `start_preconditioning_step` the grafted optimiser runs alone. One step:
graft update (optax's, with its β1) | β1-momentum of the preconditioned gradient, rescaled to the
graft's per-parameter norm → + weight_decay·param (AdamW) → ·(−lr).

Layout of one parameter, static (from its shape only):
  drop size-1 dims → merge consecutive dims while the product stays ≤ max_preconditioner_dim
  (a (3, 3, Cin, Cout) kernel becomes (9·Cin, Cout)) → cut each axis ≤ max_preconditioner_dim
  into blocks of block_size (the last one zero-padded: lossless, padding never reaches the
  parameter); larger axes stay whole and get no preconditioner (identity on that side) →
  one stacked array (n_blocks, b_1, …, b_k), so every root is one vmapped eigh.
Scalars, vectors and tensors without a preconditioned axis use the grafted optimiser alone.
"""
import functools
import inspect
import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

_mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)
_einsum = functools.partial(jnp.einsum, precision=jax.lax.Precision.HIGHEST)
_SHARED = ('b1', 'b2', 'weight_decay', 'weight_decay_mask')  # also passed to Adam by trainers


# ----------------------------------------------------------------------------- layout
class Layout(NamedTuple):
  """Static blocking of one parameter: merged shape, block length and count per axis, and the
  axes that get a preconditioner (empty: the grafted optimiser alone)."""
  shape: tuple
  block: tuple
  count: tuple
  axes: tuple


def merge_dims(shape, max_dim):
  """Drops size-1 dims and merges consecutive dims while their product stays ≤ max_dim.

  Fewer, larger factors see more of the curvature for the same memory; a tensor of rank ≥ 2
  stays at least a matrix, so small layers keep separate input and output factors.
  """
  dims, merged = [d for d in shape if d != 1], []
  for d in dims:
    if merged and merged[-1] * d <= max_dim:
      merged[-1] *= d
    else:
      merged.append(d)
  if len(merged) == 1 and len(dims) >= 2:
    merged = [math.prod(dims[:-1]), dims[-1]]
  return tuple(merged)


def make_layout(shape, block_size, max_dim):
  """Blocks of block_size on axes ≤ max_dim; larger axes are not preconditioned (their factor
  would be too costly to invert), rank < 2 parameters not at all."""
  merged = merge_dims(shape, max_dim)
  axes = tuple(i for i, d in enumerate(merged) if d <= max_dim) if len(merged) > 1 else ()
  block = tuple(min(d, block_size) if i in axes else d for i, d in enumerate(merged))
  count = tuple(-(-d // b) for d, b in zip(merged, block))
  return Layout(merged, block, count, axes)


def to_blocks(x, lay):
  """x → (n_blocks, b_1, …, b_k): zero-pad every axis to whole blocks and stack the blocks."""
  k = len(lay.shape)
  x = jnp.pad(x.reshape(lay.shape),
              [(0, n * b - d) for d, b, n in zip(lay.shape, lay.block, lay.count)])
  x = x.reshape([v for nb in zip(lay.count, lay.block) for v in nb])
  x = x.transpose(list(range(0, 2 * k, 2)) + list(range(1, 2 * k, 2)))
  return x.reshape((-1,) + lay.block)


def from_blocks(xb, lay, shape):
  """Inverse of `to_blocks`: unstack, drop the padding, restore the parameter's shape."""
  k = len(lay.shape)
  x = xb.reshape(lay.count + lay.block).transpose([j for i in range(k) for j in (i, k + i)])
  x = x.reshape([n * b for n, b in zip(lay.count, lay.block)])
  return x[tuple(slice(0, d) for d in lay.shape)].reshape(shape)


def _axis_gram(xb, axis):
  """Per block, X_(axis) X_(axis)ᵀ: the second moment of one axis, summed over the others."""
  y = jnp.moveaxis(xb, axis + 1, 1)
  y = y.reshape(y.shape[:2] + (-1,))
  return _einsum('nij,nkj->nik', y, y)


def _apply_on_axis(xb, mat, axis):
  """Multiplies every block by its (symmetric) preconditioner along one axis."""
  z = _einsum('nij,nj...->ni...', mat, jnp.moveaxis(xb, axis + 1, 1))
  return jnp.moveaxis(z, 1, axis + 1)


# ----------------------------------------------------------------------------- roots
def _matrix_power(x, p):
  """x^p for a static positive integer p, by repeated squaring."""
  result = None
  while p:
    if p & 1:
      result = x if result is None else _mm(result, x)
    p >>= 1
    if p:
      x = _mm(x, x)
  return result


def _max_eigenvalue(a, iters=100):
  """Power iteration from a fixed random start: cheap, and only needs to be roughly right."""
  v = jax.random.normal(jax.random.PRNGKey(0), a.shape[:1], a.dtype)

  def step(_, v):
    w = _mm(a, v)
    return w / jnp.maximum(jnp.linalg.norm(w), 1e-30)
  v = jax.lax.fori_loop(0, iters, step, v)
  return v @ _mm(a, v)


def _root_eigh(a, p, eps):
  """(A + eps·λmax·I)^(-1/p) from one eigendecomposition; error = relative reconstruction
  error of the decomposition (NaN for an all-zero A, which then counts as a failure)."""
  w, v = jnp.linalg.eigh(a)
  root = _mm(v * (jnp.maximum(w, 0.0) + eps * jnp.max(w)) ** (-1.0 / p), v.T)
  err = jnp.linalg.norm(_mm(v * w, v.T) - a) / jnp.linalg.norm(a)
  return root, err


def _root_newton(a, p, eps, max_iters, tol):
  """Coupled Newton iteration (Guo & Higham 2006): X → A^(-1/p) while M = X^p A → I.

  Only matmuls (fast on accelerators, unlike eigh). A is scaled so M's eigenvalues start in
  (0, (p+1)/2], where the iteration converges; it stops when ‖M − I‖_F ≤ tol or stops
  improving (float32 floor). Error = ‖M − I‖_F.
  """
  eye = jnp.eye(a.shape[0], dtype=a.dtype)
  lam = _max_eigenvalue(a)
  a = a + eps * lam * eye
  z = (p + 1) / (2 * lam * (1 + eps))
  m0 = z * a

  def body(carry):
    i, x, m, err, _ = carry
    t = ((p + 1) * eye - m) / p
    x_new, m_new = _mm(x, t), _mm(_matrix_power(t, p), m)
    err_new = jnp.linalg.norm(m_new - eye)
    better = err_new < err
    x, m = jnp.where(better, x_new, x), jnp.where(better, m_new, m)
    return i + 1, x, m, jnp.minimum(err, err_new), ~better | (err_new <= tol)

  init = (0, z ** (1.0 / p) * eye, m0, jnp.linalg.norm(m0 - eye), jnp.array(False))
  _, x, _, err, _ = jax.lax.while_loop(lambda c: (c[0] < max_iters) & ~c[4], body, init)
  return x, err


def inverse_pth_root(a, p, eps=1e-6, method='eigh', newton_max_iters=100, newton_tol=1e-6):
  """(A + eps·λmax(A)·I)^(-1/p) of a symmetric PSD matrix in float32, and an error measure.

  The damping is relative to the largest eigenvalue, so it is invariant to the statistics'
  scale (which shrinks or grows with the gradients and with β2's averaging).
  """
  a = a.astype(jnp.float32)
  a = (a + a.T) / 2
  if method == 'eigh':
    return _root_eigh(a, p, eps)
  if method == 'newton':
    if p != int(p):
      raise ValueError(f'the newton inverse root needs an integer p, got {p}')
    return _root_newton(a, int(p), eps, newton_max_iters, newton_tol)
  raise ValueError(f"unknown inverse_root_method {method!r}; one of 'eigh', 'newton'")


# ----------------------------------------------------------------------------- shampoo
class ShampooState(NamedTuple):
  """Per parameter (same tree as the params): `momentum` of the Shampoo direction, `stats` and
  `roots` as tuples with one (n_blocks, b, b) array per preconditioned axis; () where unused."""
  count: jax.Array
  graft: optax.OptState
  momentum: Any
  stats: Any
  roots: Any


def _graft_transform(graft, b1, b2, eps, nesterov):
  """The diagonal optimiser that gives each update its norm: exactly optax's adam, rmsprop
  (momentum=b1) or sgd (momentum=b1), without the learning rate."""
  trace = optax.trace(b1, nesterov) if b1 else optax.identity()
  if graft == 'adam':
    return optax.scale_by_adam(b1, b2, eps, nesterov=nesterov)
  if graft == 'rmsprop':
    return optax.chain(optax.scale_by_rms(b2, eps), trace)
  if graft == 'sgd':
    return trace
  raise ValueError(f"unknown graft {graft!r}; one of 'adam', 'rmsprop', 'sgd'")


def _precondition(xb, lay, roots, shape):
  """Applies every preconditioned axis' inverse root to the blocks; back to the param's shape."""
  for axis, root in zip(lay.axes, roots):
    xb = _apply_on_axis(xb, root, axis)
  return from_blocks(xb, lay, shape)


def _graft(direction, graft_update, use):
  """`direction` scaled to the norm of `graft_update`; the graft's update itself where `use`
  is false or the direction vanished."""
  gn, dn = jnp.linalg.norm(graft_update.astype(jnp.float32)), jnp.linalg.norm(direction)
  use = use & (dn > 0)
  return jnp.where(use, direction * (gn / jnp.where(use, dn, 1.0)), graft_update)


def scale_by_shampoo(*, b1, b2, graft, graft_b2, eps, nesterov, block_size,
                     max_preconditioner_dim, start_preconditioning_step, precondition_every,
                     exponent_override, matrix_eps, inverse_root_method, newton_max_iters,
                     newton_tol, root_failure_threshold):
  """Shampoo direction grafted onto a diagonal optimiser's norm, without learning rate and
  weight decay; the options (all required here) and their defaults are those of `shampoo`."""
  graft_b2 = b2 if graft_b2 is None else graft_b2
  if graft != 'sgd' and graft_b2 >= 1.0:
    raise ValueError('b2 = 1 sums the statistics; set graft_b2 < 1 for the adam/rmsprop graft')
  graft_tx = _graft_transform(graft, b1, graft_b2, eps, nesterov)
  layout_of = lambda x: make_layout(x.shape, block_size, max_preconditioner_dim)
  exponent = lambda lay: exponent_override or 2 * len(lay.axes)
  root_fn = lambda p: jax.vmap(functools.partial(
      inverse_pth_root, p=p, eps=matrix_eps, method=inverse_root_method,
      newton_max_iters=newton_max_iters, newton_tol=newton_tol))

  def init_fn(params):
    leaves, treedef = jax.tree.flatten(params)
    moms, stats, roots = [], [], []
    for x in leaves:
      lay = layout_of(x)
      n = math.prod(lay.count)
      moms.append(jnp.zeros(x.shape, jnp.float32) if lay.axes and b1 else ())
      stats.append(tuple(jnp.zeros((n, lay.block[a], lay.block[a])) for a in lay.axes))
      roots.append(tuple(jnp.tile(jnp.eye(lay.block[a]), (n, 1, 1)) for a in lay.axes))
    return ShampooState(jnp.zeros([], jnp.int32), graft_tx.init(params),
                        *(treedef.unflatten(t) for t in (moms, stats, roots)))

  def accumulate(s, gram):
    return s + gram if b2 == 1.0 else b2 * s + (1 - b2) * gram

  def new_roots(lays, stats, roots):
    """Fresh inverse roots; a block keeps its old root where the new one is not finite or its
    error exceeds root_failure_threshold. Blocks of equal size and exponent, across all
    parameters, share one vmapped call: one eigh per block size to compile and launch."""
    flat = [(exponent(lay), s, r) for lay, ss, rs in zip(lays, stats, roots)
            for s, r in zip(ss, rs)]
    groups, fresh = {}, [None] * len(flat)
    for i, (p, s, _) in enumerate(flat):
      groups.setdefault((p, s.shape[-1]), []).append(i)
    for (p, _), idx in groups.items():
      new, err = root_fn(p)(jnp.concatenate([flat[i][1] for i in idx]))
      ok = jnp.all(jnp.isfinite(new), axis=(1, 2)) & (err <= root_failure_threshold)
      new = jnp.where(ok[:, None, None], new, jnp.concatenate([flat[i][2] for i in idx]))
      ends = list(itertools.accumulate(flat[i][1].shape[0] for i in idx))
      for i, part in zip(idx, jnp.split(new, ends[:-1])):
        fresh[i] = part
    parts = iter(fresh)
    return [tuple(next(parts) for _ in ss) for ss in stats]

  def update_fn(updates, state, params=None):
    count = state.count
    graft_upd, graft_state = graft_tx.update(updates, state.graft, params)
    leaves, treedef = jax.tree.flatten(updates)
    lays = [layout_of(g) for g in leaves]
    blocks = [to_blocks(g.astype(jnp.float32), lay) if lay.axes else None
              for g, lay in zip(leaves, lays)]
    stats = [tuple(accumulate(s, _axis_gram(xb, a)) for s, a in zip(ss, lay.axes))
             for xb, lay, ss in zip(blocks, lays, treedef.flatten_up_to(state.stats))]
    started = count >= start_preconditioning_step
    recompute = started & ((count - start_preconditioning_step) % precondition_every == 0)
    old_roots = treedef.flatten_up_to(state.roots)
    roots = jax.lax.cond(recompute, lambda s, r: new_roots(lays, s, r), lambda s, r: r,
                         stats, old_roots)
    outs, moms = [], []
    for g, gu, xb, lay, rs, mom in zip(leaves, treedef.flatten_up_to(graft_upd), blocks, lays,
                                       roots, treedef.flatten_up_to(state.momentum)):
      direction = pg = _precondition(xb, lay, rs, g.shape) if lay.axes else None
      if lay.axes and b1:
        mom = jnp.where(started, b1 * mom + pg, mom)
        direction = b1 * mom + pg if nesterov else mom
      outs.append(_graft(direction, gu, started).astype(g.dtype) if lay.axes else gu)
      moms.append(mom)
    state = ShampooState(optax.safe_int32_increment(count), graft_state,
                         treedef.unflatten(moms), treedef.unflatten(stats),
                         treedef.unflatten(roots))
    return treedef.unflatten(outs), state

  return optax.GradientTransformation(init_fn, update_fn)


def shampoo(learning_rate, b1=0.9, b2=0.999, weight_decay=0.0, weight_decay_mask=None, *,
            graft='adam', graft_b2=None, eps=1e-8, nesterov=False, block_size=256,
            max_preconditioner_dim=4096, start_preconditioning_step=10, precondition_every=10,
            exponent_override=None, matrix_eps=1e-6, inverse_root_method='eigh',
            newton_max_iters=100, newton_tol=1e-6, root_failure_threshold=0.1):
  """Shampoo as a complete optimiser, like `optax.adamw(learning_rate, ...)`.

  b1: momentum of the Shampoo direction and of the graft (nesterov: Nesterov form of both).
  b2: decay of the Kronecker statistics (1.0: plain sums, as in AdaGrad) and, unless graft_b2
    is set, of the graft's second moment. eps: the graft's epsilon.
  graft: 'adam' | 'rmsprop' | 'sgd' — whose per-parameter update norm Shampoo's direction takes;
    before start_preconditioning_step the update *is* that optimiser's (optax.adamw,
    optax.rmsprop(decay=b2, momentum=b1), optax.sgd(momentum=b1)).
  block_size: blocks of preconditioned axes; max_preconditioner_dim: larger axes get identity
    (also the limit for merging small dims). precondition_every: steps between inverse roots.
  exponent_override: p of the inverse p-th root (default 2·number of preconditioned axes).
  matrix_eps: damping eps·λmax·I. inverse_root_method: 'eigh' | 'newton' (newton_max_iters,
    newton_tol). root_failure_threshold: a root with larger error keeps its predecessor.
  weight_decay, weight_decay_mask: decoupled, AdamW semantics (update += wd·param, then ·−lr).
  """
  options = {k: v for k, v in locals().items()
             if k not in ('learning_rate', 'weight_decay', 'weight_decay_mask')}
  return optax.chain(scale_by_shampoo(**options),
                     optax.add_decayed_weights(weight_decay, weight_decay_mask),
                     optax.scale_by_learning_rate(learning_rate))


def default_shampoo_options(shared=False):
  """All of `shampoo`'s options with their defaults, for config files. Without `shared`, the
  options a trainer also gives Adam (b1, b2, weight_decay, weight_decay_mask) are left out, so
  `shampoo(lr, b1=…, b2=…, weight_decay=…, weight_decay_mask=…, **options)` does not clash."""
  params = inspect.signature(shampoo).parameters.values()
  return {p.name: p.default for p in params
          if p.name != 'learning_rate' and (shared or p.name not in _SHARED)}


# ----------------------------------------------------------------------------- muon
def kernel_dimension_numbers(params):
  """Muon specs that treat every n-d kernel (…, C_out) as a (prod(…), C_out) matrix, so conv
  kernels (H, W, Cin, Cout) are orthogonalised as (H·W·Cin, Cout); rank < 2 → None (Adam)."""
  spec = lambda x: (MuonDimensionNumbers(tuple(range(x.ndim - 1)), x.ndim - 1)
                    if x.ndim >= 2 else None)
  return jax.tree.map(spec, params)


def muon(learning_rate, **options):
  """optax.contrib.muon including convolution kernels; vectors and scalars go to its Adam."""
  options.setdefault('muon_weight_dimension_numbers', kernel_dimension_numbers)
  return optax.contrib.muon(learning_rate, **options)
