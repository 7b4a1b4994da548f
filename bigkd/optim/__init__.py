"""The optimiser, built from config as a chain of small optax transformations:

  clip_by_global_norm(clip_norm) → adam | sgd+momentum | shampoo | muon
  (each with decoupled weight decay on kernels, AdamW semantics: decay ∝ lr(t)·wd)
  learning rate: linear warmup to `lr`, then cosine decay to 0 (or constant).

Weight decay. Every optimiser here multiplies its decay term `wd · param` by lr(t), so a kernel
shrinks by `lr(t) · wd` per step (optax.adamw's convention; SGD's passes through its momentum).
`optimizer.weight_decay_scaled_by_lr=True` (the default) uses `weight_decay` as that wd. `False`
reads `weight_decay` in big_vision's convention (the paper's code): a decay of
`weight_decay · lr(t) / lr` per step, the schedule's shape (1 at its peak) without the peak `lr`.
It is converted here, `wd = weight_decay / lr`, from the lr actually used, so overriding
`optimizer.lr` leaves that decay as configured.
"""
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adam', 'sgd', 'shampoo', 'muon')
SCHEDULES = ('cosine', 'constant')
DTYPES = ('float32', 'bfloat16', 'float16')  # for optimizer.mu_dtype and teacher_dtype


def learning_rate_schedule(lr, warmup_steps, total_steps, schedule):
  """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine to 0 at `total_steps`."""
  if schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(
        0.0, lr, warmup_steps, max(total_steps, warmup_steps + 1), end_value=0.0)
  if schedule == 'constant':
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup_steps), optax.constant_schedule(lr)],
        [warmup_steps])
  raise ValueError(f'unknown schedule {schedule!r}; one of {SCHEDULES}')


def kernels_only(params):
  """Weight-decay mask: decay matrices and convolution kernels, not biases or norm scales."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def build_optimizer(opt, total_steps, warmup_steps):
  """Returns (optax transformation, learning-rate schedule) for optimiser config `opt`."""
  schedule = learning_rate_schedule(opt['lr'], warmup_steps, total_steps, opt['schedule'])
  name, wd = opt['name'], opt['weight_decay']
  if not opt.get('weight_decay_scaled_by_lr', True):
    wd = wd / opt['lr']  # big_vision's decay, weight_decay·lr(t)/lr, as optax's lr(t)·wd
  if name == 'adam':
    base = optax.adamw(schedule, b1=opt['b1'], b2=opt['b2'], eps=opt['eps'],
                       mu_dtype=jnp.dtype(opt['mu_dtype']), weight_decay=wd, mask=kernels_only)
  elif name == 'sgd':
    base = optax.chain(
        optax.add_decayed_weights(wd, mask=kernels_only),
        optax.sgd(schedule, momentum=opt['momentum'] or None, nesterov=opt['nesterov']))
  elif name == 'shampoo':
    from bigkd.optim.shampoo import shampoo
    base = shampoo(schedule, b1=opt['b1'], b2=opt['b2'], weight_decay=wd,
                   weight_decay_mask=kernels_only, **opt['shampoo'])
  elif name == 'muon':
    from bigkd.optim.shampoo import muon
    base = muon(schedule, weight_decay=wd, weight_decay_mask=kernels_only)
  else:
    raise ValueError(f'unknown optimizer {name!r}; one of {OPTIMIZERS}')
  if opt['clip_norm'] > 0:
    base = optax.chain(optax.clip_by_global_norm(opt['clip_norm']), base)
  return base, schedule


def per_peer(tx: optax.GradientTransformation, names) -> optax.GradientTransformation:
  """`tx` applied to each peer's subtree of {peer: params} on its own (deep mutual learning):
  its own state, and each peer's update a function of its own gradient alone: clipping by the
  global norm of the whole tree would couple the peers (one's large gradient shrinking the
  others' steps), so each peer is clipped by its own norm. The state is {peer: state}."""
  names = tuple(names)

  def init(params):
    return {name: tx.init(params[name]) for name in names}

  def update(updates, state, params=None):
    out = {name: tx.update(updates[name], state[name], None if params is None else params[name])
           for name in names}
    return {name: u for name, (u, _) in out.items()}, {name: s for name, (_, s) in out.items()}

  return optax.GradientTransformation(init, update)
