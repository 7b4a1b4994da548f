import numpy as np

from bigkd.data.sampling import _epoch_and_offset, device_batch_indices, host_batch_indices


def test_device_batches_visit_every_example_once_per_epoch():
  n, batch = 50, 8  # epochs do not align with batches
  seen = np.concatenate([np.asarray(device_batch_indices(0, s, batch, n)) for s in range(25)])
  for epoch in range(4):
    assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
  assert not np.array_equal(seen[:n], seen[n:2 * n])  # a new order each epoch


def test_batches_are_a_pure_function_of_seed_and_step():
  a = np.asarray(device_batch_indices(3, 17, 8, 50))
  b = np.asarray(device_batch_indices(3, 17, 8, 50))
  c = np.asarray(device_batch_indices(4, 17, 8, 50))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  np.testing.assert_array_equal(host_batch_indices(3, 17, 8, 50), host_batch_indices(3, 17, 8, 50))


def test_epoch_arithmetic_is_exact_where_step_times_batch_overflows_int32():
  import jax.numpy as jnp
  n, batch = 1020, 512
  for step in (0, 1, 2, 1019, 3_000_000, 2 ** 31 // 512 + 12345):
    epoch, offset = _epoch_and_offset(jnp.int32(step), batch, n)
    assert (int(epoch), int(offset)) == divmod(step * batch, n)


def test_host_batches_visit_every_example_once_per_epoch():
  n, batch = 30, 7
  seen = np.concatenate([host_batch_indices(1, s, batch, n) for s in range(30)])
  for epoch in range(7):
    assert sorted(seen[epoch * n:(epoch + 1) * n]) == list(range(n))
