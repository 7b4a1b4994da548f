"""Where bigkd's train step spends its CPU time, by kind of HLO op (issue 27).

  JAX_PLATFORMS=cpu python benchmarks/profile_cpu_step.py [--pair bit64] [--steps 5]

Builds the stage as `bigkd.bench` does (a pair of benchmarks/side_by_side.py: the digits
config's student stage with its models and resolutions overridden), traces `--steps` steps with
`jax.profiler`, and sums the XLA CPU runtime's per-op events (one per top-level thunk of the
compiled step: a fusion, a convolution, a while loop ...) by category of the op, read from the
optimised HLO (`compiled.as_text()`): its opcode, and the JAX source (`op_name` metadata) of the
instructions it fuses:
  conv forward            convolutions outside the gradient (teacher and student)
  conv backprop-input     gradient convolutions whose output has the layer's input shape ...
  conv backprop-filter    ... or its kernel's shape (checked against the params)
  GroupNorm               ops of a `group_norm` / `GroupNorm` scope (forward and gradient)
  weight standardisation  other ops of a `standardized_conv2d` scope (forward and gradient)
  transposes / copies     ops that only move data (transpose, copy, reshape, slice, pad ...)
  augmentation, RNG       random bits, crop sampling and rendering, mixup, batch gather
  the rest                everything else (ReLU, residual adds, loss, clipping, Adam ...)
Event times are summed over the runtime's threads, which may run independent ops at the same
time: the table gives each category's share of op time, next to the step's wall time.
"""
import argparse
import collections
import glob
import os
import re
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

CATEGORIES = ('conv forward', 'conv backprop-input', 'conv backprop-filter', 'GroupNorm',
              'weight standardisation', 'transposes / copies', 'augmentation, RNG', 'the rest')
MOVES = {'transpose', 'copy', 'bitcast', 'reshape', 'broadcast', 'slice', 'concatenate', 'pad',
         'reverse', 'dynamic-slice', 'dynamic-update-slice', 'parameter', 'constant', 'tuple',
         'get-tuple-element', 'copy-start', 'copy-done'}
AUGMENT = ('threefry', 'random', '_uniform', '_beta', '_gamma', '_normal', '_shuffle',
           'sample_draws', 'render', 'scale_and_translate', 'device_batch_indices', 'augment',
           'take_along_axis', 'mix')

_INSTR = re.compile(r'^\s+(?:ROOT )?%?([^\s=]+) = (.*)$')
_COMP = re.compile(r'^(ENTRY )?%?([^\s(]+) .*\{$')


class Instr:
  def __init__(self, name, text):
    self.name = name
    if text.startswith('('):  # a tuple shape: skip to its closing parenthesis
      depth = 0
      for i, ch in enumerate(text):
        depth += {'(': 1, ')': -1}.get(ch, 0)
        if depth == 0:
          break
      shape, rest = text[:i + 1], text[i + 1:].strip()
    else:
      shape, _, rest = text.partition(' ')
    self.opcode = re.match(r'[\w\-]+', rest).group(0)
    dims = re.search(r'\[([\d,]*)\]', shape)
    self.dims = tuple(int(d) for d in dims.group(1).split(',') if d) if dims else ()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    self.op_name = op_name.group(1) if op_name else ''
    calls = re.search(r'calls=%?([\w.\-]+)', rest)
    self.calls = calls.group(1) if calls else None


def parse_hlo(text):
  """({computation: [Instr]}, name of the entry computation)."""
  comps, entry, current = {}, None, None
  for line in text.splitlines():
    if m := _COMP.match(line):
      current = comps.setdefault(m.group(2), [])
      entry = m.group(2) if m.group(1) else entry
    elif current is not None and (m := _INSTR.match(line)):
      current.append(Instr(m.group(1), m.group(2)))
  return comps, entry


def semantic(op_name):
  """The category an op's JAX source puts it in, or None."""
  if 'group_norm' in op_name or 'GroupNorm' in op_name:
    return 'GroupNorm'
  if 'standardized_conv2d' in op_name or 'standardize' in op_name:
    return 'weight standardisation'
  if any(k in op_name for k in AUGMENT):
    return 'augmentation, RNG'
  return None


def layer_path(op_name):
  """'jit(f)/transpose(jvp(ResNetV2))/block1/unit01/a/standardized_conv2d/conv_general_dilated'
  -> 'block1/unit01/a/standardized_conv2d' (the params path of the conv's kernel)."""
  parts = [p for p in op_name.split('/') if '(' not in p and p != 'conv_general_dilated']
  return '/'.join(parts)


def categorise(instr, comps, kernels):
  inner = comps.get(instr.calls, []) if instr.calls else [instr]
  conv = next((i for i in inner if i.opcode == 'convolution'), None)  # maybe in a fusion
  if conv:
    if 'transpose(' not in conv.op_name:
      return 'conv forward'
    kernel = kernels.get(layer_path(conv.op_name))
    return ('conv backprop-filter' if kernel and sorted(kernel) == sorted(conv.dims)
            else 'conv backprop-input')
  if instr.opcode != 'while' and all(i.opcode in MOVES for i in inner):
    return 'transposes / copies'
  votes = collections.Counter(semantic(i.op_name) for i in inner if i.opcode not in MOVES)
  votes.pop(None, None)
  return votes.most_common(1)[0][0] if votes else semantic(instr.op_name) or 'the rest'


def kernel_shapes(params):
  """{params path of a 4-d kernel: its shape}."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {'/'.join(str(k.key) for k in path[:-1]): tuple(leaf.shape) for path, leaf in leaves
          if path[-1].key == 'kernel' and leaf.ndim == 4}


def op_events(trace_dir):
  """{event name: (total picoseconds, count)} of every event on the XLA CPU runtime's threads."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  with open(glob.glob(f'{trace_dir}/plugins/profile/*/*.xplane.pb')[0], 'rb') as f:
    space.ParseFromString(f.read())
  totals = collections.defaultdict(lambda: [0, 0])
  for plane in space.planes:
    for line in plane.lines:
      for e in line.events:
        t = totals[plane.event_metadata[e.metadata_id].name]
        t[0] += e.duration_ps
        t[1] += 1
  return totals


def main():
  from side_by_side import PAIRS
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--pair', default='bit64', choices=list(PAIRS))
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--top', type=int, default=12, help='also list the N most expensive ops')
  args = p.parse_args()

  import jax
  from bigkd import bench, cli
  argv = cli.with_bundled_configs(['bench', '--config', 'configs/digits.py',
                                   *PAIRS[args.pair]['bigkd']])
  fv = bench.define_flags(argv)
  cli.parse(fv, argv, bench.__doc__)
  setup = bench.setup_stage(fv.config, 'student')
  comps, entry = parse_hlo(setup['pipeline'][0].as_text())
  kernels = kernel_shapes(setup['state'].params)
  top_level = {i.name: i for i in comps[entry]}
  bench.time_steps(setup, 'pipeline', 3)
  wall = min(bench.time_steps(setup, 'pipeline', 1) for _ in range(args.steps))
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    traced = bench.time_steps(setup, 'pipeline', args.steps) / args.steps
    jax.profiler.stop_trace()
    events = op_events(trace_dir)

  per_cat = {c: [0.0, 0] for c in CATEGORIES}
  ops = []
  for name, (ps, count) in events.items():
    if name in top_level:  # the thunks of the entry computation (a while loop holds its body)
      ms = ps / 1e9 / args.steps
      cat = categorise(top_level[name], comps, kernels)
      per_cat[cat][0] += ms
      per_cat[cat][1] += count / args.steps
      ops.append((ms, name, cat, top_level[name].op_name))
  total = sum(ms for ms, _ in per_cat.values())
  plan = setup['plan']
  print(f'{args.pair}: {", ".join(f"{t.model}@{t.resolution}" for t in plan.teachers)} -> '
        f'{plan.model}@{plan.resolution}, batch {plan.batch_size}; jax {jax.__version__}, '
        f'{os.cpu_count()} cores; XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}\n'
        f'step wall time {1e3 * wall:.1f} ms (best of {args.steps}), traced '
        f'{1e3 * traced:.1f} ms; op time {total:.1f} ms per step, {len(ops)} distinct '
        f'top-level ops\n')
  print('| category | ms per step | share of op time | ops per step |\n|---|---|---|---|')
  for cat, (ms, count) in per_cat.items():
    print(f'| {cat} | {ms:.1f} | {100 * ms / total:.1f} % | {count:.0f} |')
  print(f'\nthe {args.top} most expensive ops (ms per step, category, source):')
  for ms, name, cat, op_name in sorted(ops, reverse=True)[:args.top]:
    print(f'  {ms:7.2f}  {name:32s} {cat:24s} {op_name.removeprefix("jit(step_on_resident_data)/")}')


if __name__ == '__main__':
  main()
