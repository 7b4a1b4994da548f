"""Which examples form the batch of a step: a pure function of (seed, step).

Examples are visited epoch by epoch, each epoch in its own random order (a permutation keyed by
(seed, epoch)), so resuming at any step replays exactly the batches an uninterrupted run sees.
`device_batch_indices` runs inside the jitted step (device-resident data: the host does nothing
per step); `host_batch_indices` is its numpy twin for streamed data.

A stage whose `train_data` mixes K sources takes from source k a fixed `rows[k]` examples per
step (`batch_rows`: its weight's share of the batch), each source visited epoch by epoch in its
own stream of orders, and the rows of the step shuffled by (seed, step) so that mixup's
neighbours come from any source (`device_step_indices`, `host_step_indices`): still a pure
function of (seed, step), and exact proportions at every step. One source is the plain rule.
"""
import jax
import jax.numpy as jnp
import numpy as np


def _epoch_and_offset(step, batch_size, num_examples):
  """(epoch, offset) of the first example of `step`, without forming step * batch_size.

  With step = a·N + b:  step·B = a·B·N + b·B, so epoch = a·B + (b·B) // N, offset = (b·B) % N.
  This stays exact in int32 for any step as long as N·B < 2³¹ (checked at config time).
  """
  a, b = step // num_examples, step % num_examples
  return a * batch_size + (b * batch_size) // num_examples, (b * batch_size) % num_examples


MIX_STREAM = 0x313  # the streams of a mixture's sources and its row order, apart from the rest


def device_batch_indices(seed, step, batch_size, num_examples, stream=None):
  """int32 [batch_size] indices of the examples of `step` (batch_size <= num_examples).
  `stream`: another sequence of orders (a mixture's source k)."""
  epoch, offset = _epoch_and_offset(step, batch_size, num_examples)
  key = jax.random.fold_in(jax.random.key(seed), 0x5eed)
  if stream is not None:
    key = jax.random.fold_in(jax.random.fold_in(key, MIX_STREAM), stream)
  this_order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  next_order = jax.random.permutation(jax.random.fold_in(key, epoch + 1), num_examples)
  position = offset + jnp.arange(batch_size)
  return jnp.where(position < num_examples, this_order[position % num_examples],
                   next_order[position % num_examples])


def host_batch_indices(seed, step, batch_size, num_examples, stream=None):
  """numpy twin of `device_batch_indices` (a different, equally pure, order)."""
  position = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, offsets = position // num_examples, position % num_examples
  prefix = (seed,) if stream is None else (seed, MIX_STREAM, stream)
  orders = {e: np.random.default_rng((*prefix, int(e))).permutation(num_examples)
            for e in np.unique(epochs)}
  return np.array([orders[e][o] for e, o in zip(epochs, offsets)], np.int32)


def batch_rows(batch_size: int, weights) -> tuple[int, ...]:
  """The rows of every batch that each source of a mixture gets: its weight's share of
  `batch_size`, rounded by largest remainder (ties: the earlier source), summing to it."""
  total = sum(weights)
  exact = [batch_size * w / total for w in weights]
  rows = [int(x) for x in exact]
  by_remainder = sorted(range(len(rows)), key=lambda k: (rows[k] - exact[k], k))
  for k in by_remainder[:batch_size - sum(rows)]:
    rows[k] += 1
  return tuple(rows)


def _offsets(sizes):
  return np.cumsum((0,) + tuple(sizes[:-1])).tolist()


def device_step_indices(seed, step, rows, sizes):
  """int32 [sum(rows)] indices of `step`'s examples in a mixture of sources of `sizes` examples
  (source k's example i is offset_k + i), `rows[k]` from source k; one source:
  `device_batch_indices`."""
  if len(rows) == 1:
    return device_batch_indices(seed, step, rows[0], sizes[0])
  parts = [device_batch_indices(seed, step, n, size, stream=k) + offset
           for k, (n, size, offset) in enumerate(zip(rows, sizes, _offsets(sizes)))]
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), MIX_STREAM), step)
  return jnp.concatenate(parts)[jax.random.permutation(key, sum(rows))]


def host_step_indices(seed, step, rows, sizes):
  """numpy twin of `device_step_indices` (a different, equally pure, order)."""
  if len(rows) == 1:
    return host_batch_indices(seed, step, rows[0], sizes[0])
  parts = [host_batch_indices(seed, step, n, size, stream=k) + offset
           for k, (n, size, offset) in enumerate(zip(rows, sizes, _offsets(sizes)))]
  order = np.random.default_rng((seed, MIX_STREAM, int(step))).permutation(sum(rows))
  return np.concatenate(parts)[order].astype(np.int32)


def plan_rows_and_sizes(plan, num_examples: int) -> tuple[tuple, tuple]:
  """(rows per source, examples per source) of a stage's batches: its train_data's, or the
  whole batch from the `num_examples` of the train split."""
  if plan.train_data:
    return tuple(d.rows for d in plan.train_data), tuple(d.examples for d in plan.train_data)
  return (plan.batch_size,), (num_examples,)


def step_batch_indices(plan, step: int, num_examples: int) -> np.ndarray:
  """The examples of logged step `step` (1 .. steps) of a stage plan, drawn as its train step
  draws them (on device for resident data, on the host for streamed data); `num_examples`: of
  the stage's train data."""
  draw = device_step_indices if plan.device_resident else host_step_indices
  return np.asarray(draw(plan.step_seed, step - 1, *plan_rows_and_sizes(plan, num_examples)))
