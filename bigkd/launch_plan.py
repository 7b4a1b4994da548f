"""Plan: compile a config's real train step for a TPU slice this machine does not have, and tell
per chip whether it fits, how many FLOPs a step takes and how long the run will last.

  bigkd-plan --config configs/NAME.py[:variant] --target SLICE [--config.a.b=v ...]
             [--stage NAME] [--train_examples N] [--mfu 0.4] [--out plan.json]
             [--device_memory_gib G] [--nolevers]

Example (the paper's T384 -> S224 student at batch 4096 on a v5e-16 slice):
  bigkd-plan --config configs/bit_imagenet.py:t384_s224 --target v5e-16 --train_examples 1255544

SLICE is a slice name (v2-8, v3-32, v4-32, v5p-32, v5e-16, v6e-16: the number counts TensorCores
for v2-v5p and chips for v5e/v6e, as Cloud TPU names them), a topology as libtpu names it (v5e:4x4,
v4:2x2x4), or a GPU node COUNTxMODEL (8xH100-80, 4xA100-40, 1xH200-141): jax cannot compile for
CUDA without a GPU, so a node is planned from the XLA:TPU compile of the same step on as many
TPU chips (v5p, 95 GiB each, for 4-16 GPUs; v5e for 1-2), against the GPU's memory and FLOP/s,
and says so. A step whose temporaries exceed the chip's HBM is refused by XLA:TPU: the plan says
it does not fit, with the bytes XLA says it needs, and goes on to the levers. The step is the trainer's own
(`build.abstract_stage`: teachers' forward, the student's forward and backward, the optimiser
update, the config's mesh laid onto the slice's chips), compiled by the pinned libtpu with
JAX_PLATFORMS=cpu (`pip install -r requirements-plan.txt`); teachers and data need not exist here,
only their shapes. Every number printed says where it comes from: XLA's memory and cost analyses of
the compiled step, the chip's published HBM and peak bfloat16 FLOP/s, and a stated MFU. A stage
that does not fit is compiled again with the levers added one by one (bfloat16 Adam moment,
bfloat16 student, fsdp over every device, remat, 2/4/8 microbatches) until it fits, and the
overrides that make it fit are printed. A JSON copy goes to --out.

Exit codes: 0 planned; 2 bad config, target or flag (one line on stderr); 1 anything else.
"""
import json
import math
import os
import re
import sys
import time
from typing import NamedTuple

from absl import flags

from bigkd import cli, paths

GIB = 2 ** 30
# Published per-chip HBM (GiB) and peak dense bfloat16 TFLOP/s. A chip may be several devices
# (TensorCores) in libtpu's topology: its memory and FLOP/s are shared between them.
CHIPS = {'v2': (16, 45), 'v3': (32, 123), 'v4': (32, 275), 'v5e': (16, 197), 'v5p': (95, 459),
         'v6e': (32, 918)}
THREE_D = ('v4', 'v5p')  # torus generations: AxBxC topologies
# Published per-GPU memory (GiB) and peak dense bfloat16 TFLOP/s (SXM parts).
GPUS = {'A100-40': (40, 312), 'A100-80': (80, 312), 'H100-80': (80, 989), 'H200-141': (140, 989)}
# jax compiles for CUDA only with a GPU (and its plugin) present: a GPU node is planned from the
# XLA:TPU compile of the same program on as many TPU chips. XLA:TPU refuses a program whose
# temporaries exceed the chip's HBM, so the proxy is v5p (95 GiB, more than an 80 GiB GPU) where
# libtpu has a slice of that size (it has none of 1 or 2 v5p chips).
GPU_PROXIES = {1: 'v5e:1x1', 2: 'v5e:1x2', 4: 'v5p:2x2x1', 8: 'v5p:2x2x2', 16: 'v5p:2x2x4'}
# XLA:TPU's refusal of a program larger than the chip's memory, with the bytes it needs.
OUT_OF_MEMORY = re.compile(r'memory required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds '
                           r'available HBM \(([\d.]+)([KMGT]?)\)')


def gpu_of(target: str) -> tuple[int, str] | None:
  """(count, model) of a GPU node 'NxMODEL' ('8xH100-80'); None for anything else."""
  from bigkd.config import ConfigError
  match = re.fullmatch(r'(\d+)x([A-Z]\d+-\d+)', target)
  if not match:
    return None
  count, model = int(match[1]), match[2]
  if model not in GPUS or count not in GPU_PROXIES:
    raise ConfigError(f'--target={target!r}: a GPU node is COUNTxMODEL, COUNT one of '
                      f'{", ".join(map(str, GPU_PROXIES))} and MODEL one of {", ".join(GPUS)}')
  return count, model


def topology_of(target: str) -> tuple[str, str]:
  """(generation, libtpu topology name) of a slice name ('v4-32') or a topology ('v4:2x2x4')."""
  from bigkd.config import ConfigError
  match = re.fullmatch(r'(v2|v3|v4|v5e|v5p|v6e)(?::(\d+(?:x\d+){1,2})|-(\d+))', target)
  if not match:
    raise ConfigError(f'--target={target!r}: a TPU slice such as v5e-16, v4-32, v5p-32, a '
                      f'topology such as v5e:4x4, v4:2x2x4 ({", ".join(CHIPS)}), or a GPU node '
                      'such as 8xH100-80')
  generation, topology, count = match.groups()
  if topology:
    return generation, f'{generation}:{topology}'
  cores_per_chip = 1 if generation in ('v5e', 'v6e') else 2
  chips = int(count) // cores_per_chip
  dims = 3 if generation in THREE_D else 2
  shape = [1] * dims
  for i in range(chips.bit_length() - 1):  # the power of two spread over the axes, last first
    shape[(dims - 1 - i) % dims] *= 2
  if chips < 1 or chips & (chips - 1) or int(count) % cores_per_chip:
    raise ConfigError(f'--target={target!r}: {count} is not a slice size of {generation} '
                      '(a power of two)')
  # Ascending, the axes of length 1 last: libtpu wants a 4-chip v4 / v5p slice as 2x2x1.
  shape = sorted(shape, key=lambda d: (d == 1, d))
  return generation, f'{generation}:{"x".join(map(str, shape))}'


def tpu_devices(topology: str):
  """The abstract devices of a TPU topology (no TPU needed: libtpu compiles for them)."""
  from jax.experimental import topologies
  from bigkd.config import ConfigError
  from bigkd.tf_quiet import stderr_to_devnull
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) when it loads, held by any other
  # jax process on this machine that found libtpu installed; compiling for abstract chips
  # touches no TPU, so planning shares the library instead of failing on the lock.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  try:
    with stderr_to_devnull():  # libtpu's notices about the TPU host this machine is not
      return topologies.get_topology_desc(topology_name=topology, platform='tpu').devices
  except Exception as e:  # libtpu missing, or a topology it refuses
    raise ConfigError(f'--target: libtpu cannot describe {topology!r} ({cli.one_line(e)}); '
                      'planning needs `pip install -r requirements-plan.txt`') from None


def shard_bytes(tree) -> int:
  """Bytes of one device's shard of every array (ShapeDtypeStruct with a sharding) of `tree`."""
  import jax
  import numpy as np
  return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def held_bytes(state, teacher_params, inputs) -> dict:
  """One device's shards of what the step holds, by kind (from the arguments' shard shapes)."""
  return dict(params_bytes=shard_bytes(state.params) + shard_bytes(state.aux_params),
              opt_state_bytes=shard_bytes(state.opt_state),
              teacher_bytes=shard_bytes(teacher_params), input_bytes=shard_bytes(inputs))


def analysis_path(lowered, mesh) -> str | None:
  """Where the plan of this program on these devices is kept: in jax's persistent compilation
  cache folder, when one is set (`jax_compilation_cache_dir`), since jax cannot read back an
  executable compiled for an abstract topology. Keyed by the program's text, the devices (kind
  and coordinates), XLA_FLAGS and the jax and libtpu versions: the same key, the same plan."""
  import hashlib
  import jax
  folder = jax.config.jax_compilation_cache_dir
  if not folder:
    return None
  devices = [(d.device_kind, getattr(d, 'coords', None), getattr(d, 'core_on_chip', None))
             for d in mesh.devices.flat]
  key = '\n'.join([lowered.as_text(), repr(devices), os.environ.get('XLA_FLAGS', ''),
                   jax.__version__, libtpu_version()])
  return os.path.join(folder, 'bigkd-plan',
                      hashlib.sha256(key.encode()).hexdigest()[:32] + '.json')


def compile_stage(plan, mesh, num_train_examples: int, canvas: int) -> dict:
  """Compiles the stage's step for `mesh`; its per-device bytes and FLOPs, from XLA (or from
  `analysis_path`, where the same program was planned before: `from_cache`)."""
  from bigkd import build
  step, args = build.abstract_stage(plan, mesh, num_train_examples, canvas)
  lowered = step.lower(*args)
  path = analysis_path(lowered, mesh)
  if path and paths.Path(path).exists():
    return {**paths.read_json(path), 'from_cache': True}
  result = compiled_analysis(lowered, *args)
  if path:
    paths.write_json(path, result)
  return result


def compiled_analysis(lowered, state, teacher_params, *inputs) -> dict:
  """Compiles `lowered` (the step of these arguments); its per-device bytes and FLOPs."""
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as e:  # jax's JaxRuntimeError
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return refused(e, state, teacher_params, inputs, time.perf_counter() - start)
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes
          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
          + memory.generated_code_size_in_bytes)
  return dict(
      compile_seconds=round(seconds, 1), **held_bytes(state, teacher_params, inputs),
      argument_bytes=memory.argument_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      peak_bytes=peak,
      flops=float(cost.get('flops', 0.0)),
      xla_seconds=float(cost.get('optimal_seconds', -1.0)))


def refused(error, state, teacher_params, inputs, seconds) -> dict:
  """The plan of a step XLA:TPU would not compile for lack of HBM: what it holds (shard
  shapes), the temporaries XLA says it needs (a lower bound of the peak), no FLOPs."""
  units = {'': 1, 'K': 2 ** 10, 'M': 2 ** 20, 'G': 2 ** 30, 'T': 2 ** 40}
  match = OUT_OF_MEMORY.search(str(error))
  needed = int(float(match[1]) * units[match[2]]) if match else -1
  held = shard_bytes(state) + shard_bytes(teacher_params) + shard_bytes(inputs)
  return dict(
      compile_seconds=round(seconds, 1), compile_error=cli.one_line(error)[:300],
      **held_bytes(state, teacher_params, inputs), argument_bytes=held, temp_bytes=needed,
      output_bytes=0, alias_bytes=0, code_bytes=0, peak_bytes=held + needed if needed >= 0 else -1,
      flops=0.0, xla_seconds=-1.0)


def fits_in(result: dict, device_memory: float) -> bool:
  """Compiled (XLA:TPU did not refuse it) and its peak within `device_memory`."""
  return 'compile_error' not in result and result['peak_bytes'] <= device_memory


def estimates(result: dict, plan, device_memory: float, device_tflops: float, mfu: float) -> dict:
  """Fits or not against the device's HBM, and step / run time at `mfu` of the peak; XLA's
  own step-time estimate where it gives a positive one."""
  step_seconds = result['flops'] / (device_tflops * 1e12 * mfu) if result['flops'] else None
  xla = result['xla_seconds'] if result['xla_seconds'] > 0 else None
  return dict(fits=fits_in(result, device_memory), steps=plan.steps,
              step_seconds_at_mfu=step_seconds,
              run_hours_at_mfu=step_seconds * plan.steps / 3600 if step_seconds else None,
              xla_step_seconds=xla, run_hours_xla=xla * plan.steps / 3600 if xla else None)


def size(nbytes: float) -> str:
  for unit, scale in (('GiB', GIB), ('MiB', 2 ** 20), ('KiB', 2 ** 10)):
    if nbytes >= scale:
      return f'{nbytes / scale:.2f} {unit}'
  return f'{nbytes:.0f} B'


def duration(seconds: float) -> str:
  return f'{seconds / 86400:.2f} days' if seconds >= 86400 else f'{seconds / 3600:.2f} h'


def report_lines(name: str, r: dict, device_memory: float, mfu: float) -> list[str]:
  gib = size
  if 'compile_error' in r:
    needed = gib(r['temp_bytes']) if r['temp_bytes'] >= 0 else 'more than the chip has'
    return [
        f'[{name}] per device: params {gib(r["params_bytes"])}, optimiser state '
        f'{gib(r["opt_state_bytes"])}, teachers {gib(r["teacher_bytes"])}, inputs '
        f'{gib(r["input_bytes"])} (shard shapes)',
        f'[{name}] XLA:TPU refused to compile it: temporaries of {needed} on top of '
        f'{gib(r["argument_bytes"])} of arguments, against the compiling chip\'s HBM -> '
        f'DOES NOT FIT {gib(device_memory)} ({r["compile_error"][:160]})']
  xla = (f'{r["xla_step_seconds"]:.4g} s/step, {duration(3600 * r["run_hours_xla"])}'
         if r['xla_step_seconds'] else 'not given')
  return [
      f'[{name}] per device: params {gib(r["params_bytes"])}, optimiser state '
      f'{gib(r["opt_state_bytes"])}, teachers {gib(r["teacher_bytes"])}, inputs '
      f'{gib(r["input_bytes"])} (shard shapes)',
      f'[{name}] XLA memory analysis: arguments {gib(r["argument_bytes"])}, temporaries '
      f'{gib(r["temp_bytes"])}, outputs {gib(r["output_bytes"])} (aliased '
      f'{gib(r["alias_bytes"])}), code {gib(r["code_bytes"])}: peak {gib(r["peak_bytes"])} of '
      f'{gib(device_memory)} -> {"fits" if r["fits"] else "DOES NOT FIT"}',
      f'[{name}] XLA cost analysis: {r["flops"] / 1e9:.4g} GFLOP per device per step; at '
      f'{mfu:.0%} MFU of the peak {r["step_seconds_at_mfu"]:.4g} s/step, {r["steps"]} steps = '
      f'{duration(3600 * r["run_hours_at_mfu"])}; XLA\'s own estimate: {xla}']


def with_canvas(config):
  """data.base_size=0 (an image folder's canvas, chosen from its images): chosen as the trainer
  chooses it when the folder is here, else it must be given."""
  from bigkd import build
  from bigkd.config import ConfigError
  from bigkd.data.sources import DataError
  try:
    return build.with_base_size(config)
  except (DataError, OSError) as e:
    raise ConfigError(f'data.base_size=0: the canvas is chosen from the images of '
                      f'{config.data.data_dir}, not readable here ({cli.one_line(e)}); give it '
                      'with --config.data.base_size=N') from None


class DataSizes(NamedTuple):
  """What a plan needs of the data: the train split's examples, the class count, and the
  examples of each source of the stages with their own train_data ({stage: (n, ...)})."""
  train: int
  classes: int
  stage_sources: dict

  def of_stage(self, plan) -> int:
    """The examples stage `plan` trains on (the resident images it holds)."""
    return sum(d.examples for d in plan.train_data) if plan.train_data else self.train


def data_sizes(config, given: int, out=print) -> DataSizes:
  """From the data when it is readable here (each stage's train_data too), else
  --train_examples and data.num_classes (every train_data source then taken as that large, and
  said so)."""
  from bigkd import build
  from bigkd.config import ConfigError
  own = build.stage_train_data(config)
  if given:
    if not config.data.num_classes:
      raise ConfigError('--train_examples needs data.num_classes (the class count) set')
    for name, specs in own.items():
      out(f'bigkd-plan: stages.{name}.train_data: each of its sources ({", ".join(specs)}) '
          f'planned with --train_examples={given} examples')
    return DataSizes(given, config.data.num_classes,
                     {name: (given,) * len(specs) for name, specs in own.items()})
  try:
    data = build.load_data(config.data, own)
  except Exception as e:
    raise ConfigError(f'the train data is not readable here ({cli.one_line(e)}); give the '
                      'train split\'s size with --train_examples') from None
  return DataSizes(len(data.train), data.num_classes,
                   {name: d.sizes for name, d in data.stage_train.items()})


def levers(config, name: str, num_devices: int) -> list[dict]:
  """The overrides that lower stage `name`'s device memory, in the order of what they cost in
  step time: Adam's first moment in bfloat16 (nothing), a bfloat16 student (faster on TPUs and
  GPUs), parameters and optimiser state split over every device (an all-gather per step),
  rematerialised blocks (BiT: about a third more compute), then 2, 4, 8 microbatches."""
  stage = config.stages[name]
  found = []
  if config.optimizer.mu_dtype != 'bfloat16':
    found.append({'optimizer.mu_dtype': 'bfloat16'})
  if stage.compute_dtype != 'bfloat16':
    found.append({f'stages.{name}.compute_dtype': 'bfloat16'})
  if config.mesh.fsdp not in (-1, num_devices):
    found.append({'mesh.data': 1, 'mesh.fsdp': -1})
  if not stage.model_kwargs.get('remat'):
    found.append({f'stages.{name}.model_kwargs.remat': True})
  accum = stage.grad_accum_steps or config.grad_accum_steps
  found += [{f'stages.{name}.grad_accum_steps': k} for k in (2, 4, 8) if k > accum]
  return found


def with_overrides(config, overrides: dict):
  """A copy of `config` with {dotted field: value} set (new keys allowed: model_kwargs)."""
  import copy
  config = copy.deepcopy(config)
  with config.unlocked():
    for path, value in overrides.items():
      *parents, leaf = path.split('.')
      node = config
      for key in parents:
        node = node[key]
      node[leaf] = value
  return config


def flags_of(overrides: dict) -> str:
  return ' '.join(f'--config.{k}={v}' for k, v in overrides.items())


def stages_and_mesh(config, devices, sizes: DataSizes):
  """(stage plans, mesh) of a checked `config` on `devices`; teachers need not exist here."""
  from bigkd.plan import plan_stages
  from bigkd.sharding import make_mesh, mesh_shape
  plans = plan_stages(config, '/nonexistent', sizes.train, sizes.classes, len(devices),
                      check_checkpoints=False, train_sizes=sizes.stage_sources)
  return plans, make_mesh(*mesh_shape(config.mesh.data, config.mesh.fsdp, len(devices)),
                          devices=devices)


def compile_variant(config, name: str, devices, sizes: DataSizes) -> dict:
  """Stage `name` of `config` planned and compiled for `devices` (with the config's mesh)."""
  from bigkd.plan import check_config
  check_config(config, len(devices))
  plans, mesh = stages_and_mesh(config, devices, sizes)
  p = next(p for p in plans if p.name == name)
  return compile_stage(p, mesh, sizes.of_stage(p), config.data.base_size)


def search_levers(config, name: str, devices, sizes: DataSizes, device_memory: float,
                  out) -> dict | None:
  """Adds `levers` one at a time, compiling each time, until the stage fits: {'overrides',
  'peak_bytes'} of the first that fits, or None. A lever the stage cannot take (a model without
  remat, a batch that does not split) is named and left out."""
  from bigkd.config import ConfigError
  applied = {}
  for lever in levers(config, name, len(devices)):
    trial = {**applied, **lever}
    try:
      result = compile_variant(with_overrides(config, trial), name, devices, sizes)
    except (ConfigError, TypeError) as e:
      out(f'[{name}]   {flags_of(lever)}: not for this stage ({cli.one_line(e)})')
      continue
    peak = result['peak_bytes']
    applied, fits = trial, fits_in(result, device_memory)
    out(f'[{name}]   + {flags_of(lever)}: '
        + ('refused by XLA:TPU (out of HBM)' if 'compile_error' in result else
           f'peak {size(peak)}') + f' -> {"fits" if fits else "does not fit"}')
    if fits:
      out(f'[{name}] fits with: {flags_of(applied)}')
      return dict(overrides=applied, peak_bytes=peak)
  out(f'[{name}] no lever makes it fit: a larger slice, a smaller batch or a smaller model')
  return None


def plan(config, target: str, stage: str = '', num_train: int = 0, mfu: float = 0.4,
         out=print, memory_gib: float = 0, try_levers: bool = True) -> dict:
  """Compiles every stage of `config` (or `stage`) for `target`; prints and returns the plan.
  `memory_gib`: a device memory to plan for instead of the chip's published one. A stage that
  does not fit is compiled again with `levers` added one by one (`try_levers`)."""
  import jax
  from bigkd.config import ConfigError
  from bigkd.plan import check_config
  gpu = gpu_of(target)
  if gpu:
    chips, model = gpu
    topology, (chip_gib, chip_tflops) = GPU_PROXIES[chips], GPUS[model]
    kind = f'{model} (GPU)'
  else:
    generation, topology = topology_of(target)
    chip_gib, chip_tflops = CHIPS[generation]
    chips = math.prod(int(d) for d in topology.split(':')[1].split('x'))
  devices = tpu_devices(topology)
  kind = kind if gpu else devices[0].device_kind
  per_chip = len(devices) // chips
  device_memory, device_tflops = chip_gib * GIB / per_chip, chip_tflops / per_chip
  if memory_gib:
    device_memory = memory_gib * GIB
  config = with_canvas(config)
  check_config(config, len(devices))
  sizes = data_sizes(config, num_train, out)
  plans, mesh = stages_and_mesh(config, devices, sizes)
  if stage and stage not in [p.name for p in plans]:
    raise ConfigError(f'--stage={stage!r}: not a stage of this run '
                      f'({", ".join(p.name for p in plans)})')
  where = f'{topology} ({chips} chips, {len(devices)} x {kind}'
  if gpu:
    where = f'{target} ({chips} GPUs'
    out(f'bigkd-plan: {target}: jax compiles for CUDA only where a GPU is; bytes and FLOPs below '
        f'are an estimate from the XLA:TPU compile of the same step on {topology} '
        f'({chips} devices, the same mesh; TPU layouts and fusion differ from GPU ones), checked '
        f'against the {model}\'s published memory; no XLA step-time estimate')
  out(f'bigkd-plan: {where}; {chip_gib} GiB and {chip_tflops} bf16 TFLOP/s per chip, '
      f'published), mesh data={mesh.shape["data"]} '
      f'fsdp={mesh.shape["fsdp"]}, {sizes.train} train examples'
      + (f'; planned for {size(device_memory)} per device (--device_memory_gib)'
         if memory_gib else ''))
  stages = {}
  for p in plans:
    if stage and p.name != stage:
      continue
    models = ' + '.join(f'{peer.name} {peer.model} at {peer.resolution} px'
                        for peer in p.peers) or f'{p.model} at {p.resolution} px'
    out(f'[{p.name}] compiling: {models} ({p.compute_dtype}), batch {p.batch_size}'
        + ''.join(f', teacher {t.model} ({p.teacher_dtype}) at {t.resolution} px'
                  for t in p.teachers) + ' ...')
    result = dict(compute_dtype=p.compute_dtype, teacher_dtype=p.teacher_dtype,
                  **compile_stage(p, mesh, sizes.of_stage(p), config.data.base_size))
    if result.get('from_cache'):
      out(f'[{p.name}] the same program was compiled for these devices before: its analyses '
          'are read from the plan cache (bigkd-plan in jax_compilation_cache_dir)')
    if gpu:  # XLA:TPU's cost model says nothing of a GPU
      result['xla_seconds'] = -1.0
    result.update(estimates(result, p, device_memory, device_tflops, mfu))
    for line in report_lines(p.name, result, device_memory, mfu):
      out(line)
    if not result['fits'] and try_levers:
      out(f'[{p.name}] does not fit: compiling again with the levers, one more each time ...')
      result['fits_with'] = search_levers(config, p.name, devices, sizes, device_memory, out)
    stages[p.name] = result
  return dict(target=target, topology=topology, devices=len(devices), device_kind=kind,
              estimated_from=f'XLA:TPU compile for {topology}' if gpu else 'XLA:TPU compile',
              device_memory_bytes=device_memory,
              device_peak_tflops=device_tflops, mfu=mfu, train_examples=sizes.train,
              mesh=dict(mesh.shape), jax=jax.__version__, libtpu=libtpu_version(), stages=stages)


def libtpu_version() -> str:
  from importlib import metadata
  try:
    return metadata.version('libtpu')
  except metadata.PackageNotFoundError:
    return ''


def define_flags(argv) -> flags.FlagValues:
  fv = cli.config_flag_values(argv)
  flags.DEFINE_string('target', '', 'TPU slice (v5e-16, v4-32, ...), topology (v5e:4x4) or '
                      'GPU node (8xH100-80; estimated from a TPU compile).', flag_values=fv)
  flags.DEFINE_string('stage', '', 'Plan this stage only.', flag_values=fv)
  flags.DEFINE_integer('train_examples', 0, 'Size of the train split when it is not readable '
                       'here (needs data.num_classes).', flag_values=fv)
  flags.DEFINE_float('mfu', 0.4, 'Model FLOP utilisation assumed for the time estimates.',
                     flag_values=fv)
  flags.DEFINE_string('out', '', 'Write the plan as JSON to this file.', flag_values=fv)
  flags.DEFINE_float('device_memory_gib', 0, 'Plan for this much memory per device instead of '
                     "the chip's published HBM (0: the chip's).", flag_values=fv)
  flags.DEFINE_bool('levers', True, 'When a stage does not fit, compile it again with the levers '
                    '(bfloat16 Adam moment, bfloat16 student, fsdp, remat, microbatches) added '
                    'one by one and print the first set that fits.', flag_values=fv)
  return fv


def main(argv=None):
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile for the slice, run nothing here
  argv = cli.with_bundled_configs(argv or sys.argv)
  fv = define_flags(argv)
  cli.parse(fv, argv, __doc__)
  if not fv.target:
    cli.fail('--target is required (e.g. v5e-16, v4-32, v5e:2x2)')
  if not 0 < fv.mfu <= 1:
    cli.fail(f'--mfu={fv.mfu} must be in (0, 1]')
  if fv.device_memory_gib < 0:
    cli.fail(f'--device_memory_gib={fv.device_memory_gib} must be >= 0')
  from bigkd.config import ConfigError
  from bigkd.data.sources import DataError
  try:
    result = plan(fv.config, fv.target, fv.stage, fv.train_examples, fv.mfu,
                  memory_gib=fv.device_memory_gib, try_levers=fv.levers)
  except (ConfigError, DataError) as e:
    cli.fail(str(e).splitlines()[0])
  if fv.out:
    with open(fv.out, 'w') as f:
      json.dump(result, f, indent=1)
    print(f'bigkd-plan: wrote {fv.out}')


if __name__ == '__main__':
  main()
