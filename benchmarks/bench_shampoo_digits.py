"""Shampoo vs Adam on the bundled digits distillation (configs/digits.py's student stage).

  python benchmarks/bench_shampoo_digits.py                        # trains a teacher first
  python benchmarks/bench_shampoo_digits.py --teacher_dir runs/digits/teacher --json out.json

The student (cnn_small at 12 px) is distilled from the digits teacher (resnet8 at 16 px) by
function matching, exactly as the demo's student stage (same data order, augmentation, init,
budget, warmup + cosine schedule, clipping, weight decay); only the optimiser and its peak
learning rate change. For each optimiser and learning rate of its grid, the validation
KL(teacher ‖ student) on whole images (bigkd.evaluate, 300 val images) is measured every
`--eval_every` steps. Printed:

  * the target: the final validation KL of Adam at its best learning rate (lowest final KL);
  * per run, the first evaluated step whose validation KL is ≤ the target ("steps to target",
    so its resolution is eval_every); each optimiser's best lr is the one with the lowest final KL;
  * for information, the same at looser targets (1.25x … 4x the target), best lr each;
  * the step time of the jitted train step (teacher forward + student forward/backward +
    optimiser update) for both optimisers in this process, on the same batches, blocking on
    every step, in alternating rounds after warm-up; the mean includes Shampoo's periodic
    inverse roots (amortised), the median mostly does not. The optimiser update alone (on
    fixed gradients) is timed the same way, for information.
"""
import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

# Before numpy/jax load OpenBLAS: Shampoo's inverse roots call LAPACK (syevd via jax's CPU
# kernels), and a multi-threaded OpenBLAS on a small, busy CPU spins its threads against each
# other (a 288x288 eigh took ~1 s instead of ~15 ms here). Adam never calls LAPACK, so this
# does not favour either optimiser's train step; set OPENBLAS_NUM_THREADS to override.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
sys.path.insert(0, ROOT)
from bigkd import build, stages  # noqa: E402
from bigkd.config import stage_names  # noqa: E402
from bigkd.optim import build_optimizer  # noqa: E402

# Shampoo options used here (the rest are default_shampoo_options()). cnn_small's kernels merge
# to (27, 16), (144, 32) and (288, 10) matrices: block_size 288 keeps every axis whole (one
# factor per side, no padded blocks).
SHAMPOO_OPTIONS = dict(block_size=288, precondition_every=10, start_preconditioning_step=10)


def load_digits_config():
  from bigkd.cli import config_module
  return config_module('digits').get_config()


def ensure_teacher(teacher_dir, workdir):
  """A trained digits teacher stage folder: the given one, or one trained now in workdir."""
  if teacher_dir:
    return teacher_dir
  config = load_digits_config()
  config.stage_order = 'teacher'
  print(f'no --teacher_dir: training the digits teacher in {workdir}', flush=True)
  stages.run(config, workdir)
  return os.path.join(workdir, 'teacher')


@dataclasses.dataclass
class Setup:
  plan: object   # bigkd.plan.StagePlan of the demo's student stage
  data: object
  mesh: object


def make_setup(teacher_dir, workdir, steps):
  """The demo's student stage, its teacher read from teacher_dir; everything but the optimiser."""
  config = load_digits_config()
  demo_index = stage_names(config).index('student')  # seeds init/augmentation as the demo
  config.stages.student.teachers.teacher.source = os.path.abspath(teacher_dir)
  config.stages.student.steps = steps
  config.stage_order = 'student'
  mesh, data, (plan,) = build.setup(config, workdir)
  return Setup(dataclasses.replace(plan, index=demo_index), data, mesh)


def optimizer_config(setup, name, lr, shampoo_options):
  opt = dict(setup.plan.optimizer, name=name, lr=lr)
  opt['shampoo'] = dict(opt['shampoo'], **shampoo_options)
  return opt


def build_run(setup, opt):
  """The stage exactly as the trainer builds it (bigkd.build), with optimiser config `opt`."""
  return build.build_stage(dataclasses.replace(setup.plan, optimizer=opt), setup.data, setup.mesh)


def train_run(setup, name, lr, shampoo_options, eval_every):
  """One training run; returns the validation KL curve (step 0, every eval_every, the end)
  and the mean training KL over each evaluation window."""
  stage = build_run(setup, optimizer_config(setup, name, lr, shampoo_options))
  state, inputs = stage.state, stage.inputs(0)
  val = lambda params: stage.evaluate(params, splits=('val',))
  first = val(state.params)
  curve = [dict(step=0, val_kl=first['val_kl'], val_agreement=first['val_agreement'],
                train_kl=None)]
  window, start = [], time.perf_counter()
  for step in range(1, setup.plan.steps + 1):
    state, metrics = stage.train_step(state, stage.teacher_params, *next(inputs))
    window.append(metrics['kl'])
    if step % eval_every == 0 or step == setup.plan.steps:
      ev = val(state.params)
      train_kl = float(np.mean(jax.device_get(window)))
      window = []
      curve.append(dict(step=step, val_kl=ev['val_kl'] if np.isfinite(ev['val_kl'])
                        else float('nan'), val_agreement=ev['val_agreement'], train_kl=train_kl))
      if not np.isfinite(ev['val_kl']):
        print(f'  {name} lr {lr:g}: non-finite KL at step {step}; stopping this run', flush=True)
        break
  wall = time.perf_counter() - start
  last = curve[-1]
  print(f'  {name:8s} lr {lr:<8g} final val KL {last["val_kl"]:.4f}  agreement '
        f'{100 * last["val_agreement"]:.1f}%  ({wall:.0f}s incl. evals)', flush=True)
  return dict(optimizer=name, lr=lr, curve=curve, final_val_kl=last['val_kl'],
              final_val_agreement=last['val_agreement'], wall_s=wall,
              completed=last['step'] == setup.plan.steps)


def steps_to(curve, target, key='val_kl'):
  """First evaluated step whose KL is ≤ target; None if never."""
  for point in curve:
    if point[key] is not None and np.isfinite(point[key]) and point[key] <= target:
      return point['step']
  return None


def best_run(runs):
  ok = [r for r in runs if r['completed'] and np.isfinite(r['final_val_kl'])]
  return min(ok, key=lambda r: r['final_val_kl']) if ok else None


def time_steps(setup, opts, rounds, steps_per_round, warmup):
  """ms per jitted train step for each optimiser config, measured in alternating rounds from
  fresh states that advance in lockstep (so both see the same batches), blocking every step."""
  runs = {}
  for name, opt in opts.items():
    stage = build_run(setup, opt)
    state, inputs = stage.state, stage.inputs(0)
    step_fn = lambda state, stage=stage, inputs=inputs: stage.train_step(
        state, stage.teacher_params, *next(inputs))
    for _ in range(warmup):  # compiles; runs past start_preconditioning_step
      state, metrics = step_fn(state)
    jax.block_until_ready((state, metrics))
    runs[name] = [step_fn, state, []]
  for r in range(rounds):
    order = list(opts) if r % 2 == 0 else list(reversed(opts))
    for name in order:
      step_fn, state, times = runs[name]
      for _ in range(steps_per_round):
        t0 = time.perf_counter()
        state, metrics = step_fn(state)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t0)
      runs[name][1] = state
  return {name: times for name, (_, _, times) in runs.items()}


def time_updates(setup, opts, rounds, steps_per_round, warmup):
  """ms per jitted optimiser update alone (fixed random gradients), alternating rounds."""
  rng = np.random.default_rng(0)
  init_params = build_run(setup, next(iter(opts.values()))).state.params
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-2, p.dtype),
                       init_params)
  runs = {}
  for name, opt in opts.items():
    tx, _ = build_optimizer(opt, setup.plan.steps, setup.plan.warmup_steps)

    def update(params, opt_state, tx=tx):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state
    update = jax.jit(update, donate_argnums=(0, 1))
    params = jax.tree.map(jnp.copy, init_params)
    carry = (params, jax.jit(tx.init)(params))
    for _ in range(warmup):
      carry = update(*carry)
    jax.block_until_ready(carry)
    runs[name] = [update, carry, []]
  for r in range(rounds):
    for name in (list(opts) if r % 2 == 0 else list(reversed(opts))):
      update, carry, times = runs[name]
      for _ in range(steps_per_round):
        t0 = time.perf_counter()
        carry = jax.block_until_ready(update(*carry))
        times.append(time.perf_counter() - t0)
      runs[name][1] = carry
  return {name: times for name, (_, _, times) in runs.items()}


def fmt_steps(s):
  return '-' if s is None else str(s)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher_dir', default='',
                      help='a trained digits teacher stage folder; default: train one first')
  parser.add_argument('--workdir', default='',
                      help='where the teacher is trained if no --teacher_dir (default: a temp '
                      'dir); an existing finished teacher there is reused')
  parser.add_argument('--steps', type=int, default=1500, help='training budget (both optimisers)')
  parser.add_argument('--adam_lrs', type=float, nargs='+', default=[3e-3, 1e-2, 3e-2])
  parser.add_argument('--shampoo_lrs', type=float, nargs='+', default=[3e-3, 1e-2, 3e-2])
  parser.add_argument('--eval_every', type=int, default=25)
  parser.add_argument('--shampoo_block_size', type=int, default=SHAMPOO_OPTIONS['block_size'])
  parser.add_argument('--precondition_every', type=int,
                      default=SHAMPOO_OPTIONS['precondition_every'])
  parser.add_argument('--start_preconditioning_step', type=int,
                      default=SHAMPOO_OPTIONS['start_preconditioning_step'])
  parser.add_argument('--timing_rounds', type=int, default=30)
  parser.add_argument('--timing_steps', type=int, default=10,
                      help='steps per timing round (a multiple of precondition_every keeps '
                      'the number of inverse roots per round fixed)')
  parser.add_argument('--json', default='', help='write all curves and numbers here')
  args = parser.parse_args()
  shampoo_options = dict(block_size=args.shampoo_block_size,
                         precondition_every=args.precondition_every,
                         start_preconditioning_step=args.start_preconditioning_step)

  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({dev.platform}) x{jax.device_count()}, '
        f'{os.cpu_count()} CPUs visible, OPENBLAS_NUM_THREADS='
        f'{os.environ.get("OPENBLAS_NUM_THREADS")}', flush=True)
  workdir = args.workdir or tempfile.mkdtemp(prefix='bench_shampoo_digits_')
  teacher_dir = ensure_teacher(args.teacher_dir, workdir)
  setup = make_setup(teacher_dir, workdir, args.steps)
  plan = setup.plan
  print(f'student {plan.model}@{plan.resolution}px from {teacher_dir} '
        f'({plan.teachers[0].model}@{plan.teachers[0].resolution}px), {plan.teaching_mode}, '
        f'{plan.steps} steps, batch {plan.batch_size}, warmup {plan.warmup_steps} + '
        f'{plan.optimizer["schedule"]}, clip {plan.optimizer["clip_norm"]}, '
        f'wd {plan.optimizer["weight_decay"]}, b1 {plan.optimizer["b1"]}, '
        f'b2 {plan.optimizer["b2"]}', flush=True)
  print(f'shampoo options (others default): {shampoo_options}', flush=True)
  print(f'KL measure: validation KL(teacher || student) on whole images '
        f'({len(setup.data.val.labels)} val images), every {args.eval_every} steps', flush=True)

  runs = []
  for name, lrs in (('adam', args.adam_lrs), ('shampoo', args.shampoo_lrs)):
    for lr in lrs:
      runs.append(train_run(setup, name, lr, shampoo_options, args.eval_every))
  adam_best = best_run([r for r in runs if r['optimizer'] == 'adam'])
  shampoo_best = best_run([r for r in runs if r['optimizer'] == 'shampoo'])
  if adam_best is None:
    sys.exit('no Adam run finished with a finite KL: no target')
  target = adam_best['final_val_kl']
  for r in runs:
    r['steps_to_target'] = steps_to(r['curve'], target)
  # The same with the training KL (mean over each eval window), target from Adam's last window.
  train_target = adam_best['curve'][-1]['train_kl']
  for r in runs:
    r['steps_to_train_target'] = steps_to(r['curve'], train_target, 'train_kl')

  print(f'\ntarget: Adam (lr {adam_best["lr"]:g}) final val KL = {target:.4f}')
  print(f'{"optimizer":<9} {"lr":>8} {"final val KL":>13} {"min val KL":>11} '
        f'{"val agree%":>10} {"steps to target":>16} {"(train KL)":>11}')
  for r in runs:
    mark = ' *' if r is adam_best or r is shampoo_best else ''
    min_kl = min((p['val_kl'] for p in r['curve'] if np.isfinite(p['val_kl'])), default=np.nan)
    print(f'{r["optimizer"]:<9} {r["lr"]:>8g} {r["final_val_kl"]:>13.4f} {min_kl:>11.4f} '
          f'{100 * r["final_val_agreement"]:>10.1f} {fmt_steps(r["steps_to_target"]):>16} '
          f'{fmt_steps(r["steps_to_train_target"]):>11}{mark}')
  print('(* best lr per optimiser = lowest final val KL; steps to target: first evaluation '
        f'with val KL <= target, resolution {args.eval_every} steps; (train KL): the same with '
        'the mean training KL of each window against Adam\'s last window)')

  if shampoo_best is not None:  # secondary: looser targets, where early progress shows
    print(f'\nsteps to looser val-KL targets (best lr each; resolution {args.eval_every}):')
    print(f'{"target":>16} {"adam":>6} {"shampoo":>8} {"adam/shampoo":>13}')
    for k in (1.0, 1.25, 1.5, 2.0, 4.0):
      a, s = (steps_to(r['curve'], k * target) for r in (adam_best, shampoo_best))
      ratio_k = f'{a / s:.2f}' if a and s else '-'
      print(f'{f"{k:g} x {target:.4f}":>16} {fmt_steps(a):>6} {fmt_steps(s):>8} {ratio_k:>13}')

  timing_opts = {'adam': optimizer_config(setup, 'adam', adam_best['lr'], shampoo_options)}
  if shampoo_best is not None:
    timing_opts['shampoo'] = optimizer_config(setup, 'shampoo', shampoo_best['lr'],
                                              shampoo_options)
  warmup = max(20, args.start_preconditioning_step + 2 * args.precondition_every)
  step_times = time_steps(setup, timing_opts, args.timing_rounds, args.timing_steps, warmup)
  update_times = time_updates(setup, timing_opts, args.timing_rounds, args.timing_steps, warmup)
  timing = {}
  for name in timing_opts:
    timing[name] = dict(
        step_ms_mean=1e3 * statistics.mean(step_times[name]),
        step_ms_median=1e3 * statistics.median(step_times[name]),
        update_ms_mean=1e3 * statistics.mean(update_times[name]),
        update_ms_median=1e3 * statistics.median(update_times[name]))
  n_timed = args.timing_rounds * args.timing_steps
  print(f'\nstep time ({n_timed} steps each, {args.timing_rounds} alternating rounds, '
        'blocking every step, after warm-up):')
  for name, t in timing.items():
    print(f'  {name:<8} train step {t["step_ms_mean"]:7.2f} ms mean {t["step_ms_median"]:7.2f} '
          f'ms median | optimiser update alone {t["update_ms_mean"]:6.2f} ms mean '
          f'{t["update_ms_median"]:6.2f} ms median')

  result = dict(args=vars(args), shampoo_options=shampoo_options, teacher_dir=teacher_dir,
                kl_measure='validation KL(teacher||student), whole images', target=target,
                adam_best_lr=adam_best['lr'],
                shampoo_best_lr=shampoo_best['lr'] if shampoo_best else None,
                timing=timing, runs=runs, device=str(dev.device_kind))
  print('\nsummary')
  a_steps = adam_best['steps_to_target']
  s_steps = shampoo_best['steps_to_target'] if shampoo_best else None
  print(f'  adam    lr {adam_best["lr"]:g}: {a_steps} steps to val KL {target:.4f}')
  if shampoo_best is None:
    print('  shampoo: no run finished with a finite KL')
  else:
    speedup = a_steps / s_steps if s_steps else None
    ratio = timing['shampoo']['step_ms_mean'] / timing['adam']['step_ms_mean']
    update_ratio = timing['shampoo']['update_ms_mean'] / timing['adam']['update_ms_mean']
    print(f'  shampoo lr {shampoo_best["lr"]:g}: '
          + (f'{s_steps} steps' if s_steps else f'did not reach it in {plan.steps} steps')
          + (f'  -> {speedup:.2f}x fewer steps' if speedup else ''))
    print(f'  step time shampoo/adam: {ratio:.3f} (mean; median '
          f'{timing["shampoo"]["step_ms_median"] / timing["adam"]["step_ms_median"]:.3f}); '
          f'optimiser update alone: {update_ratio:.2f}')
    steps_ok = speedup is not None and speedup >= 2.0
    time_ok = ratio <= 1.3
    print(f'  goal >= 2x fewer steps: {"met" if steps_ok else "NOT met"}; '
          f'<= 1.3x step time: {"met" if time_ok else "NOT met"}')
    result.update(adam_steps_to_target=a_steps, shampoo_steps_to_target=s_steps,
                  speedup=speedup, step_time_ratio=ratio, update_time_ratio=update_ratio,
                  goal_steps_met=steps_ok, goal_time_met=time_ok)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1, default=float)
    print(f'wrote {args.json}')


if __name__ == '__main__':
  main()
