"""A fixed_teacher stage's train step with its teacher run live vs read from a teacher cache,
side by side in one process (`bigkd.teacher_cache`).

  python benchmarks/bench_teacher_cache.py                  # both pairs
  python benchmarks/bench_teacher_cache.py --pairs digits --rounds 5 --steps 20

Pairs (random weights and a random cache: speed does not depend on values):
  digits  resnet8 @ 16 px -> cnn_small @ 12 px, batch 64 (configs/digits.py's student);
  bit     BiT-R152x2 @ 96 px -> BiT-R50x1 @ 64 px, batch 8, digits upscaled to 96 px (the paper's
          pair at CPU-sized resolutions).
Both steps are bigkd's own (`bigkd.bench.setup_stage`: mesh, optimiser, on-device augmentation),
fed one batch already on the devices; timing alternates live / cached in rounds and keeps each
side's best round (the least disturbed by other work on a shared machine). FLOPs per image are
XLA's cost analysis of each compiled step.
"""
import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bigkd import bench  # noqa: E402
from bigkd.cli import config_module  # noqa: E402
from bigkd.config import stage_config  # noqa: E402

NO_CACHE_HERE = '/nonexistent/bench_teacher_cache'  # random_params: a random cache, never read


def digits_config():
  c = config_module('digits').get_config()
  c.stages.student.teaching_mode = 'fixed_teacher'
  c.stage_order = 'teacher,student'
  return c


def bit_config():
  c = digits_config()
  c.batch_size = 8
  c.data.base_size = 96
  c.stages.teacher = stage_config('bit_r152x2', 96, steps=1)
  c.stages.student = stage_config('bit_r50x1', 64, teachers={'teacher': 'teacher'}, steps=1,
                                  teaching_mode='fixed_teacher')
  return c


PAIRS = {'digits': digits_config, 'bit': bit_config}


def with_cache(config):
  config.stages.student.teacher_cache = NO_CACHE_HERE
  return config


def compare(make_config, rounds: int, steps: int) -> dict:
  setups = {'live': bench.setup_stage(make_config(), 'student'),
            'cached': bench.setup_stage(with_cache(make_config()), 'student')}
  for setup in setups.values():
    bench.time_steps(setup, 'fixed', 2)  # warm-up
  best = {name: float('inf') for name in setups}
  for _ in range(rounds):
    for name, setup in setups.items():
      best[name] = min(best[name], bench.time_steps(setup, 'fixed', steps) / steps)
  plan, teacher = setups['live']['plan'], setups['live']['plan'].teachers[0]
  return dict(batch=plan.batch_size, teacher=f'{teacher.model}@{teacher.resolution}',
              student=f'{plan.model}@{plan.resolution}',
              ms={name: 1e3 * s for name, s in best.items()},
              mflop_per_image={name: s['flops_per_image'] / 1e6 for name, s in setups.items()})


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--pairs', default='digits,bit')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=10, help='steps per round and side')
  args = parser.parse_args()
  import jax
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
        f'{jax.device_count()} {jax.devices()[0].platform} device(s)')
  print('| pair | batch | live ms/step | cached ms/step | speed-up | live MFLOP/img | '
        'cached MFLOP/img |\n|---|---|---|---|---|---|---|')
  for name in args.pairs.split(','):
    r = compare(PAIRS[name], args.rounds, args.steps)
    print(f'| {r["teacher"]} -> {r["student"]} | {r["batch"]} | {r["ms"]["live"]:.1f} | '
          f'{r["ms"]["cached"]:.1f} | {r["ms"]["live"] / r["ms"]["cached"]:.2f}x | '
          f'{r["mflop_per_image"]["live"]:.1f} | {r["mflop_per_image"]["cached"]:.1f} |',
          flush=True)


if __name__ == '__main__':
  main()
