"""Which examples form the batch of a step: a pure function of (seed, step).

Examples are visited epoch by epoch, each epoch in its own random order (a permutation keyed by
(seed, epoch)), so resuming at any step replays exactly the batches an uninterrupted run sees.
`device_batch_indices` runs inside the jitted step (device-resident data: the host does nothing
per step); `host_batch_indices` is its numpy twin for streamed data.
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


def device_batch_indices(seed, step, batch_size, num_examples):
  """int32 [batch_size] indices of the examples of `step` (batch_size <= num_examples)."""
  epoch, offset = _epoch_and_offset(step, batch_size, num_examples)
  key = jax.random.fold_in(jax.random.key(seed), 0x5eed)
  this_order = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)
  next_order = jax.random.permutation(jax.random.fold_in(key, epoch + 1), num_examples)
  position = offset + jnp.arange(batch_size)
  return jnp.where(position < num_examples, this_order[position % num_examples],
                   next_order[position % num_examples])


def host_batch_indices(seed, step, batch_size, num_examples):
  """numpy twin of `device_batch_indices` (a different, equally pure, order)."""
  position = step * batch_size + np.arange(batch_size, dtype=np.int64)
  epochs, offsets = position // num_examples, position % num_examples
  orders = {e: np.random.default_rng((seed, int(e))).permutation(num_examples)
            for e in np.unique(epochs)}
  return np.array([orders[e][o] for e, o in zip(epochs, offsets)], np.int32)


def step_batch_indices(plan, step: int, num_examples: int) -> np.ndarray:
  """The examples of logged step `step` (1 .. steps) of a stage plan, drawn as its train step
  draws them (on device for resident data, on the host for streamed data)."""
  draw = device_batch_indices if plan.device_resident else host_batch_indices
  return np.asarray(draw(plan.step_seed, step - 1, plan.batch_size, num_examples))
