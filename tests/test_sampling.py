"""Which examples form a step's batch: epoch after epoch, each in its own random order, so the
batch of step s is positions [s·B, (s+1)·B) of the stream of epoch orders (seed, epoch)."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from bigkd.build import streamed_inputs
from bigkd.data.sampling import _epoch_and_offset, device_batch_indices, host_batch_indices
from bigkd.data.sources import Split
from bigkd.sharding import batch_sharding, make_mesh
from bigkd.step import TrainState, with_device_batches

N, B = 50, 8  # epochs do not align with batches
STEPS = (0, 5, 6, 12, 18, 24, 31)  # 6, 12, 18 and 31 straddle an epoch boundary


def device_stream(seed, epochs):
  """The epoch orders of device batches end to end: epoch e's is keyed by (seed, 0x5eed, e)."""
  key = jax.random.fold_in(jax.random.key(seed), 0x5eed)
  return np.concatenate([np.asarray(jax.random.permutation(jax.random.fold_in(key, e), N))
                         for e in range(epochs)])


def host_stream(seed, epochs):
  """The epoch orders of streamed (host) batches end to end: numpy's generator at (seed, e)."""
  return np.concatenate([np.random.default_rng((seed, e)).permutation(N) for e in range(epochs)])


def batch_of(stream, step):
  return stream[step * B:(step + 1) * B]


def test_device_batches_visit_every_example_once_per_epoch():
  seen = np.concatenate([np.asarray(device_batch_indices(0, s, B, N)) for s in range(25)])
  for epoch in range(4):
    assert sorted(seen[epoch * N:(epoch + 1) * N]) == list(range(N))
  assert not np.array_equal(seen[:N], seen[N:2 * N])  # a new order each epoch


def test_jitted_device_batches_are_slices_of_the_stream_of_epoch_orders():
  assert [s for s in STEPS if s * B // N != ((s + 1) * B - 1) // N] == [6, 12, 18, 31]
  indices = jax.jit(lambda step: device_batch_indices(3, step, B, N))  # the step is traced
  stream = device_stream(3, epochs=7)
  for step in STEPS:
    np.testing.assert_array_equal(indices(jnp.int32(step)), batch_of(stream, step),
                                  err_msg=f'step {step}')


def test_host_batches_are_slices_of_the_stream_of_epoch_orders():
  stream = host_stream(3, epochs=7)
  for step in STEPS:
    np.testing.assert_array_equal(host_batch_indices(3, step, B, N), batch_of(stream, step),
                                  err_msg=f'step {step}')


def test_resumed_device_batches_are_those_of_an_uninterrupted_run():
  """The trainer's wrapper gathers the batch of `state.step` from the resident data: a run
  started at step 13 (as after a restore) sees what a run from step 0 sees from step 13 on."""
  labels = jnp.arange(N, dtype=jnp.int32)  # an example's label is its index
  images = 100 + labels
  step_fn = jax.jit(with_device_batches(
      lambda state, _, x, hw, y, cached=None: (state.replace(step=state.step + 1), (x, y)),
      seed=3, batch_size=B, batch_sharding=batch_sharding(make_mesh())))

  def run(start, steps):
    state, batches = TrainState.create(None, None, ()).replace(step=jnp.int32(start)), []
    for _ in range(steps):
      state, (x, y) = step_fn(state, None, images, jnp.ones((N, 2), jnp.int32), labels)
      np.testing.assert_array_equal(x, 100 + y)  # images and labels of the same examples
      batches.append(np.asarray(y))
    return batches

  uninterrupted, resumed = run(0, 20), run(13, 7)
  np.testing.assert_array_equal(resumed, uninterrupted[13:])
  np.testing.assert_array_equal(np.concatenate(uninterrupted), device_stream(3, 4)[:20 * B])


def test_resumed_streamed_batches_are_those_of_an_uninterrupted_run():
  """Streamed (host) input started at step 13 gives the batches steps 13, 14, ... of a run from
  step 0 get, in order (grain's reader threads do not reorder them)."""
  labels = np.arange(N, dtype=np.int32)
  split = Split(images=labels.astype(np.uint8).reshape(N, 1, 1, 1),
                sizes=np.ones((N, 2), np.int32), labels=labels)
  sharding = batch_sharding(make_mesh())

  def run(start, stop):
    batches = []
    for x, _, y in streamed_inputs(split, 3, B, sharding, start, stop):
      np.testing.assert_array_equal(np.asarray(x)[:, 0, 0, 0], y)
      batches.append(np.asarray(y))
    return batches

  uninterrupted, resumed = run(0, 20), run(13, 20)
  assert len(resumed) == 7
  np.testing.assert_array_equal(resumed, uninterrupted[13:])
  np.testing.assert_array_equal(np.concatenate(uninterrupted), host_stream(3, 4)[:20 * B])


def test_each_seed_and_epoch_has_its_own_order():
  """Seeds 0-2, epochs 0-2 (batches of 10 fill an epoch in 5 steps): nine different orders, so
  no seed replays another's epochs (as a key mixing seed + epoch would)."""
  for batch_indices in (lambda *a: np.asarray(device_batch_indices(*a)), host_batch_indices):
    orders = {(seed, epoch): tuple(np.concatenate(
        [batch_indices(seed, s, 10, N) for s in range(5 * epoch, 5 * epoch + 5)]))
              for seed, epoch in itertools.product(range(3), range(3))}
    assert all(sorted(order) == list(range(N)) for order in orders.values())
    assert len(set(orders.values())) == 9, batch_indices


def test_epoch_arithmetic_is_exact_where_step_times_batch_overflows_int32():
  n, batch = 1020, 512
  for step in (0, 1, 2, 1019, 3_000_000, 2 ** 31 // 512 + 12345):
    epoch, offset = _epoch_and_offset(jnp.int32(step), batch, n)
    assert (int(epoch), int(offset)) == divmod(step * batch, n)


def test_host_batches_visit_every_example_once_per_epoch():
  n, batch = 30, 7
  seen = np.concatenate([host_batch_indices(1, s, batch, n) for s in range(30)])
  for epoch in range(7):
    assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
