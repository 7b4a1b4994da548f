"""Forward throughput of BiT ResNetV2 teachers on jax.devices()[0] (CPU, GPU or TPU unchanged).

  python benchmarks/bench_bit.py                       # bit_r50x1, bit_r152x2 at 224 and 384 px
  python benchmarks/bench_bit.py --models bit_r50x1 --sizes 224 --batch 64 --dtype bfloat16

Prints, per model and image size: parameter count, compile time and images/s (timed after one
warm-up call, which compiles). Weights are random: throughput does not depend on their values.
"""
import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bigkd.models import get_model  # noqa: E402


def bench(name, size, batch, iters, dtype):
  model = get_model(name, num_classes=1000, dtype=dtype)
  # Params do not depend on image size: initialise on a small image to keep init cheap.
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
  forward = jax.jit(lambda p, x: model.apply({'params': p}, x))
  images = jax.random.uniform(jax.random.PRNGKey(1), (batch, size, size, 3), minval=-1, maxval=1)
  start = time.perf_counter()
  forward(params, images).block_until_ready()
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(iters):
    out = forward(params, images)
  out.block_until_ready()
  per_iter = (time.perf_counter() - start) / iters
  print(f'{name:12s} {size:4d}px  params {n_params / 1e6:7.2f}M  batch {batch:3d}  '
        f'compile {compile_s:6.1f}s  {per_iter * 1e3:9.1f} ms/batch  {batch / per_iter:8.2f} img/s',
        flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', nargs='+', default=['bit_r50x1', 'bit_r152x2'])
  parser.add_argument('--sizes', nargs='+', type=int, default=[224, 384])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--iters', type=int, default=3)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  args = parser.parse_args()
  print(f'device: {jax.devices()[0].device_kind} ({jax.devices()[0].platform}), '
        f'dtype {args.dtype}', flush=True)
  for name in args.models:
    for size in args.sizes:
      bench(name, size, args.batch, args.iters, jnp.dtype(args.dtype))


if __name__ == '__main__':
  main()
