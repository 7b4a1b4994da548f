"""The README's "Where the paper's runs fit" table, from the current code and the pinned libtpu:

  JAX_PLATFORMS=cpu python tools/fit_table.py [--configs t224_s224,t384_s224,t384_t224_s224]
      [--targets v5e-16,v5e-64,v4-32,v5p-32,8xH100-80] [--variants default,fsdp,remat,f32]
      [--cache runs/fit_table] [--table_only]

Each cell is one `bigkd-plan` of the student stage of `configs/bit_imagenet.py:PRESET` (batch
4096, 1,200 epochs of the 1,255,544 train[:98%] images) on one target with one variant of the
levers, through bigkd-plan's own functions (`launch_plan.plan`, no levers search): the XLA:TPU
compile of the trainer's step, its memory and cost analyses against the chip's published HBM and
peak bfloat16 FLOP/s. A GPU node is planned as bigkd-plan plans it: from the compile on as many
v5e chips. A compile takes minutes on a small CPU machine, so every finished cell is kept in
CACHE/CELL.json (with the jax and libtpu versions that made it) and a re-run skips it: the tool
can be stopped and resumed, and limited to some configs, targets or variants. (`--config NAME`
plans another bundled config's variants instead, its train split read from the data: the test
plans the digits.) Cells are
computed variant by variant, config by config, target by target, in the order given; the table
printed at the end lists every cell asked for, those not yet computed as "not computed".

Variants (on top of the config as released: data parallel over every device, bfloat16
student and teacher, Adam's first moment in bfloat16, no remat):
  default  the config as released
  fsdp     parameters and optimiser state split over every device (mesh.data=1, mesh.fsdp=-1)
  remat    the student's blocks rematerialised in the backward pass
  f32      a float32 student (stages.student.compute_dtype=float32)
  fsdp+remat, f32+fsdp, ...  any '+'-joined combination
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TRAIN_EXAMPLES = {'bit_imagenet': 1255544}  # ImageNet train[:98%]; others: read the data
STAGE = 'student'
LEVERS = {
    'default': {},
    'fsdp': {'mesh.data': 1, 'mesh.fsdp': -1},
    'remat': {f'stages.{STAGE}.model_kwargs.remat': True},
    'f32': {f'stages.{STAGE}.compute_dtype': 'float32'},
}
NAMES = {'t224_s224': 'T224→S224', 't384_s224': 'T384→S224',
         't384_t224_s224': 'T384+T224→S224'}


def overrides_of(variant: str) -> dict:
  """The config overrides of a variant name ('default', 'fsdp', 'fsdp+remat', ...)."""
  found = {}
  for part in variant.split('+'):
    if part not in LEVERS:
      raise SystemExit(f'fit_table: variant {variant!r}: {part!r} is not one of '
                       f'{", ".join(LEVERS)}')
    found.update(LEVERS[part])
  return found


def cell_path(cache: str, config: str, preset: str, target: str, variant: str) -> str:
  return os.path.join(cache, f'{config}__{preset}__{target}__{variant}.json')


def versions() -> dict:
  import jax
  from bigkd import launch_plan
  return dict(jax=jax.__version__, libtpu=launch_plan.libtpu_version())


def compute_cell(config_name: str, preset: str, target: str, variant: str, log=print) -> dict:
  """bigkd-plan of the student stage of `configs/CONFIG_NAME.py:preset` with `variant`'s
  overrides on `target` (no levers search): the plan's dict, with the wall time it took."""
  from bigkd import cli, launch_plan
  config = cli.config_module(config_name).get_config(preset)
  config = launch_plan.with_overrides(config, overrides_of(variant))
  start = time.time()
  plan = launch_plan.plan(config, target, stage=STAGE,
                          num_train=TRAIN_EXAMPLES.get(config_name, 0),
                          out=lambda line: log(f'  {line}'), try_levers=False)
  return dict(plan, config=config_name, preset=preset, variant=variant,
              overrides=overrides_of(variant), wall_seconds=round(time.time() - start, 1))


def load_cell(path: str, want: dict) -> dict | None:
  """A cached cell made by the same jax and libtpu, else None."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    cell = json.load(f)
  return cell if all(cell.get(k) == v for k, v in want.items()) else None


def row(preset: str, target: str, variant: str, cell: dict | None) -> str:
  """One markdown row: GiB per chip (peak of XLA's memory analysis) against the chip's HBM,
  fits, days of the run at the plan's MFU and by XLA's own step-time estimate."""
  head = f'| {NAMES.get(preset, preset)} | {target} | {variant} |'
  if cell is None:
    return head + ' not computed | | | |'
  s = cell['stages'][STAGE]
  per = 'GPU' if 'GPU' in cell['device_kind'] else 'device'
  days = lambda hours: f'{hours / 24:.1f}' if hours else '—'
  peak = f'{s["peak_bytes"] / 2 ** 30:.2f}'
  if 'compile_error' in s:  # XLA:TPU refused the program: arguments + the temporaries it needs
    peak = f'> {peak}' if s['peak_bytes'] >= 0 else 'more than'
  return (f'{head} {peak} of {cell["device_memory_bytes"] / 2 ** 30:.0f}'
          f' GiB per {per} | {"yes" if s["fits"] else "**no**"} | '
          f'{days(s["run_hours_at_mfu"])} | {days(s["run_hours_xla"])} |')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='bit_imagenet', help='a bundled config (configs/)')
  parser.add_argument('--configs', default='t224_s224,t384_s224,t384_t224_s224')
  parser.add_argument('--targets', default='v5e-16,v5e-64,v4-32,v5p-32,8xH100-80')
  parser.add_argument('--variants', default='default,fsdp,remat,f32')
  parser.add_argument('--cache', default='runs/fit_table')
  parser.add_argument('--table_only', action='store_true', help='print the cached cells only')
  parser.add_argument('--computed_only', action='store_true',
                      help='leave cells not yet computed out of the table')
  args = parser.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  presets, targets = args.configs.split(','), args.targets.split(',')
  variants = args.variants.split(',')
  for v in variants:
    overrides_of(v)
  os.makedirs(args.cache, exist_ok=True)
  want = versions()
  cells = {}
  for variant in variants:
    for preset in presets:
      for target in targets:
        path = cell_path(args.cache, args.config, preset, target, variant)
        cell = load_cell(path, want)
        if cell is None and not args.table_only:
          print(f'fit_table: {preset} on {target}, {variant} ...', flush=True)
          cell = compute_cell(args.config, preset, target, variant,
                              log=lambda line: print(line, flush=True))
          with open(path, 'w') as f:
            json.dump(cell, f, indent=1)
          print(f'fit_table: {preset} on {target}, {variant}: done in '
                f'{cell["wall_seconds"] / 60:.1f} min', flush=True)
        cells[preset, target, variant] = cell
  done = [c for c in cells.values() if c]
  print(f'{len(done)} of {len(cells)} cells computed')
  print(f'jax {want["jax"]}, libtpu {want["libtpu"]}; configs/{args.config}.py'
        + (f', {done[0]["stages"][STAGE]["steps"]:,} steps over {done[0]["train_examples"]:,} '
           'train images' if done else '')
        + '; days at 40% MFU of the peak bfloat16 FLOP/s')
  print('| pair | target | variant | peak (XLA memory analysis) | fits | days at 40% MFU | '
        "days by XLA's estimate |")
  print('|---|---|---|---|---|---|---|')
  for preset in presets:
    for target in targets:
      for variant in variants:
        if cells[preset, target, variant] or not args.computed_only:
          print(row(preset, target, variant, cells[preset, target, variant]))


if __name__ == '__main__':
  main()
