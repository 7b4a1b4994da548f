"""PyTorch reference for `python -m bigkd.bench`: the same distillation step, on a GPU or a CPU.

One function-matching step (Beyer et al. 2022): gather a batch from a dataset that lives on the
device, sample one inception crop, flip and mixup weight per example, render the crop at the
teacher's and at the student's resolution, teacher forward (frozen, no grad), student forward and
backward on KL(teacher || student), global-norm clipping, AdamW. Random weights (speed does not
depend on them).

Models: a timm name (GPU default: BiT `resnetv2_152x2_bit` teacher, `resnetv2_50x1_bit`
student), or one of bigkd's own names, written by hand below with bigkd's architecture (timm
needs a torchvision built for the same torch): `bit_r50x1` (ResNetV2, GroupNorm + weight
standardisation, as bigkd/models/bit.py and timm's resnetv2_50x1_bit; `bit_r152x2` the paper's
teacher, timm's resnetv2_152x2_bit), `resnet8` and
`cnn_small` (bigkd/models/cifar.py, the digits demo's teacher and student).

GPU (`--device cuda`, the default): bf16 autocast, channels_last, torch.compile.
  pip install torch timm          # torch >= 2.2, timm >= 0.9
  python benchmarks/torch_distill_step.py --batch 128 --teacher_res 224 --student_res 224 \
      --num_classes 10 --steps 50 --json torch.json
The JAX side of the comparison, on the same GPU (digits stored at 256 px; both stages random):
  python -m bigkd.bench --config configs/digits.py --stage student --steps 50 --json jax.json \
      --config.data.base_size=256 --config.batch_size=128 --config.teacher_dtype=bfloat16 \
      --config.stages.teacher.model=bit_r152x2 --config.stages.teacher.resolution=224 \
      --config.stages.student.model=bit_r50x1 --config.stages.student.resolution=224
(bigkd's student computes in float32 (TF32 matmuls on GPUs); pass --student_fp32 here to match.)

CPU (`--device cpu`): float32 throughout, `torch.set_num_threads(--threads)` (default: the
cores this process may use, as many as XLA's CPU client uses), eager unless --compile (inductor
needs a C++ compiler). benchmarks/side_by_side.py runs this in `--serve` mode against bigkd's
step, alternating rounds; alone:
  python benchmarks/torch_distill_step.py --device cpu --teacher bit_r50x1 --student bit_r50x1 \
      --teacher_res 64 --student_res 64 --base_size 64 --batch 8 --num_classes 10 --steps 10

Prints and writes (--json) the keys of bigkd.bench: images_per_sec, step_seconds,
flops_per_image, mfu, pipeline_ratio (device-resident gather vs a fixed batch). FLOPs here are
those FlopCounterMode sees (convolutions and matmuls); XLA's cost analysis also counts elementwise
work, so bigkd's figure is a little higher for the same step. Rendering uses bilinear
grid_sample without bigkd's antialiasing: slightly less work than bigkd does.
"""
import argparse
import json
import math
import os
import sys
import time

try:
  import torch
  import torch.nn.functional as F
  from torch import nn
except ImportError as e:
  raise SystemExit(f'needs torch (pip install torch; timm for timm models): {e}')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--device', default='cuda', choices=['cuda', 'cpu'])
  p.add_argument('--threads', type=int, default=0,
                 help='cpu: torch.set_num_threads; 0: the cores this process may use')
  p.add_argument('--teacher', default='resnetv2_152x2_bit')
  p.add_argument('--student', default='resnetv2_50x1_bit')
  p.add_argument('--teacher_res', type=int, default=224)
  p.add_argument('--student_res', type=int, default=224)
  p.add_argument('--base_size', type=int, default=256, help='stored image size')
  p.add_argument('--examples', type=int, default=2048, help='images resident on the device')
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--crop_area', type=float, nargs=2, default=(0.08, 1.0))
  p.add_argument('--no_flip', action='store_true')
  p.add_argument('--steps', type=int, default=50, help='timed steps per variant')
  p.add_argument('--warmup', type=int, default=5, help='untimed steps (compilation) per variant')
  p.add_argument('--rounds', type=int, default=10)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--student_fp32', action='store_true', help='cuda: student outside autocast')
  p.add_argument('--channels_last', type=int, default=-1,
                 help='1/0: memory format of images and models; -1: on for cuda, off for cpu')
  p.add_argument('--no_compile', action='store_true', help='cuda: eager')
  p.add_argument('--compile', action='store_true', help='cpu: torch.compile (default eager)')
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='peak TFLOP/s of the device (e.g. 989 for H100 dense bf16); 0: measure')
  p.add_argument('--serve', action='store_true',
                 help='after warm-up print one JSON line, then for each line N read from stdin '
                      'time N steps and print their seconds (benchmarks/side_by_side.py)')
  p.add_argument('--profile', type=int, default=0,
                 help='cpu: after warmup, time N steps under torch.profiler and print the op time '
                      "per category of benchmarks/profile_cpu_step.py (bigkd's side), then exit")
  p.add_argument('--json', default='')
  return p.parse_args(argv)


# --- bigkd's models, by hand (NCHW). ---------------------------------------------------------

class StdConv2d(nn.Conv2d):
  """Bias-free conv with a weight-standardised kernel (per output channel over C_in, H, W;
  bigkd's eps), written as timm's StdConv2d: one batch_norm over the flattened kernel."""

  def __init__(self, cin, cout, k, stride=1):
    super().__init__(cin, cout, k, stride, padding=(k - 1) // 2, bias=False)

  def forward(self, x):
    w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                     momentum=0.0, eps=1e-10).reshape_as(self.weight)
    return F.conv2d(x, w, None, self.stride, self.padding)


class PreActBottleneck(nn.Module):
  """GN-ReLU-conv 1x1, 3x3 (strided), 1x1 to 4*mid; projection from the first pre-activation."""

  def __init__(self, cin, mid, stride):
    super().__init__()
    self.norm1, self.conv1 = nn.GroupNorm(32, cin, 1e-5), StdConv2d(cin, mid, 1)
    self.norm2, self.conv2 = nn.GroupNorm(32, mid, 1e-5), StdConv2d(mid, mid, 3, stride)
    self.norm3, self.conv3 = nn.GroupNorm(32, mid, 1e-5), StdConv2d(mid, 4 * mid, 1)
    self.proj = (StdConv2d(cin, 4 * mid, 1, stride) if stride != 1 or cin != 4 * mid else None)

  def forward(self, x):
    pre = F.relu(self.norm1(x))
    shortcut = x if self.proj is None else self.proj(pre)
    y = self.conv1(pre)
    y = self.conv2(F.relu(self.norm2(y)))
    y = self.conv3(F.relu(self.norm3(y)))
    return y + shortcut


class ResNetV2(nn.Module):
  """BiT ResNetV2 (bigkd/models/bit.py): 7x7/2 root, zero pad + 3x3/2 VALID max pool, four
  blocks of pre-activation bottlenecks, final GN-ReLU, global average pool, linear head."""

  def __init__(self, num_classes, units=(3, 4, 6, 3), width=1):
    super().__init__()
    c = 64 * width
    self.root = StdConv2d(3, c, 7, 2)
    layers, cin = [], c
    for b, n in enumerate(units):
      for i in range(n):
        layers.append(PreActBottleneck(cin, c * 2**b, (1 if b == 0 else 2) if i == 0 else 1))
        cin = 4 * c * 2**b
    self.blocks = nn.Sequential(*layers)
    self.norm, self.head = nn.GroupNorm(32, cin, 1e-5), nn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.pad(self.root(x), (1, 1, 1, 1)), 3, 2)
    x = F.relu(self.norm(self.blocks(x)))
    return self.head(x.mean((2, 3)))


class BasicBlock(nn.Module):
  """bigkd's CifarResNet block: conv-GN-ReLU-conv-GN + (1x1 conv-GN) shortcut, then ReLU."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.norm1 = nn.GroupNorm(min(8, cout), cout, 1e-6)
    self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.norm2 = nn.GroupNorm(min(8, cout), cout, 1e-6)
    self.proj = None
    if cin != cout or stride != 1:
      self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                nn.GroupNorm(min(8, cout), cout, 1e-6))

  def forward(self, x):
    y = self.norm2(self.conv2(F.relu(self.norm1(self.conv1(x)))))
    return F.relu(y + (x if self.proj is None else self.proj(x)))


class CifarResNet(nn.Module):
  """resnet{6n+2} (width 1): 3x3 stem to 16, stages of n blocks at 16, 32, 64, pool, linear."""

  def __init__(self, num_classes, n):
    super().__init__()
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.GroupNorm(8, 16, 1e-6), nn.ReLU()]
    cin = 16
    for stage, c in enumerate((16, 32, 64)):
      for i in range(n):
        layers.append(BasicBlock(cin, c, 2 if stage > 0 and i == 0 else 1))
        cin = c
    self.body, self.head = nn.Sequential(*layers), nn.Linear(64, num_classes)

  def forward(self, x):
    return self.head(self.body(x).mean((2, 3)))


class SmallCNN(nn.Module):
  """bigkd's cnn_small: (3x3 conv, ReLU, 2x2 max pool) twice, linear on the flattened map."""

  def __init__(self, num_classes, resolution, width=16):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 3, 1, 1)
    self.conv2 = nn.Conv2d(width, 2 * width, 3, 1, 1)
    self.head = nn.Linear(2 * width * (resolution // 4) ** 2, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.conv1(x)), 2)
    x = F.max_pool2d(F.relu(self.conv2(x)), 2)
    return self.head(x.flatten(1))


HAND_WRITTEN = {'bit_r50x1': lambda classes, res: ResNetV2(classes),
                'bit_r152x2': lambda classes, res: ResNetV2(classes, (3, 8, 36, 3), 2),
                'resnet8': lambda classes, res: CifarResNet(classes, 1),
                'cnn_small': lambda classes, res: SmallCNN(classes, res)}


def make_model(name, num_classes, resolution):
  if name in HAND_WRITTEN:
    return HAND_WRITTEN[name](num_classes, resolution)
  try:
    import timm
  except ImportError as e:
    raise SystemExit(f'{name}: not one of {", ".join(HAND_WRITTEN)}, and timm is missing: {e}')
  return timm.create_model(name, pretrained=False, num_classes=num_classes)


# --- Augmentation. ---------------------------------------------------------------------------

def crop_boxes(batch, device, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3), attempts=10):
  """Inception crops (top, left, height, width) as fractions, as bigkd.data.augment samples."""
  shape = (batch, attempts)
  a = torch.empty(shape, device=device).uniform_(*area)
  log_r = torch.empty(shape, device=device).uniform_(math.log(aspect[0]), math.log(aspect[1]))
  w, h = torch.sqrt(a * torch.exp(log_r)), torch.sqrt(a / torch.exp(log_r))
  fits = (w <= 1) & (h <= 1)
  first = fits.float().argmax(1, keepdim=True)
  any_fits = fits.any(1)
  h = torch.where(any_fits, h.gather(1, first)[:, 0], torch.ones_like(any_fits, dtype=h.dtype))
  w = torch.where(any_fits, w.gather(1, first)[:, 0], torch.ones_like(any_fits, dtype=w.dtype))
  pos = torch.rand(batch, 2, device=device)
  return torch.stack([pos[:, 0] * (1 - h), pos[:, 1] * (1 - w), h, w], -1)


def render(images, boxes, flips, size):
  """Each box of float images [B, 3, H, W] resampled (bilinear) to size², flipped where asked."""
  top, left, h, w = boxes.unbind(-1)
  sign = 1 - 2 * flips.float()
  zeros = torch.zeros_like(h)
  theta = torch.stack([torch.stack([w * sign, zeros, 2 * left + w - 1], -1),
                       torch.stack([zeros, h, 2 * top + h - 1], -1)], 1)
  grid = F.affine_grid(theta, (images.shape[0], 3, size, size), align_corners=False)
  return F.grid_sample(images, grid, mode='bilinear', align_corners=False)


def mix(x, weight):
  """Mixup with the neighbour in the batch (a roll by one), one weight per batch."""
  return weight * x + (1 - weight) * torch.roll(x, 1, 0)


# --- The step. -------------------------------------------------------------------------------

def cpu_threads(args):
  return args.threads or len(os.sched_getaffinity(0))


def build(args):
  """(step, feeds, loss_fn, opt, info): one training step on a batch, and its two feeds."""
  cuda = args.device == 'cuda'
  device = torch.device(args.device)
  if cuda:
    assert torch.cuda.is_available(), 'needs a CUDA GPU (or --device cpu)'
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
  else:
    torch.set_num_threads(cpu_threads(args))
  channels_last = cuda if args.channels_last < 0 else bool(args.channels_last)
  fmt = torch.channels_last if channels_last else torch.contiguous_format
  compiled = (not args.no_compile) if cuda else args.compile
  autocast = torch.autocast('cuda', dtype=torch.bfloat16, enabled=cuda)
  student_autocast = torch.autocast('cuda', dtype=torch.bfloat16,
                                    enabled=cuda and not args.student_fp32)

  teacher = make_model(args.teacher, args.num_classes, args.teacher_res)
  teacher = teacher.to(device, memory_format=fmt).eval().requires_grad_(False)
  student = make_model(args.student, args.num_classes, args.student_res)
  student = student.to(device, memory_format=fmt).train()
  opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
  beta = torch.distributions.Beta(torch.tensor(1.0, device=device),
                                  torch.tensor(1.0, device=device))  # mixup_alpha = 1
  dataset = torch.randint(0, 256, (args.examples, args.base_size, args.base_size, 3),
                          dtype=torch.uint8, device=device)

  def loss_fn(images_u8):
    images = images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    batch = images.shape[0]
    boxes = crop_boxes(batch, device, area=tuple(args.crop_area))
    flips = torch.rand(batch, device=device) < (0.0 if args.no_flip else 0.5)
    weight = beta.sample()
    t_view = mix(render(images, boxes, flips, args.teacher_res), weight)
    s_view = mix(render(images, boxes, flips, args.student_res), weight)
    with autocast, torch.no_grad():
      t_logits = teacher(t_view.contiguous(memory_format=fmt)).float()
    with student_autocast:
      s_logits = student(s_view.contiguous(memory_format=fmt)).float()
    return F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                    reduction='batchmean')

  loss_fn_c = torch.compile(loss_fn) if compiled else loss_fn

  def step(images_u8):
    loss = loss_fn_c(images_u8)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  order = {'perm': torch.randperm(args.examples, device=device), 'pos': 0}

  def resident_batch():
    """Index gather from the resident dataset, a new permutation each epoch (on the device)."""
    if order['pos'] + args.batch > args.examples:
      order['perm'], order['pos'] = torch.randperm(args.examples, device=device), 0
    idx = order['perm'][order['pos']:order['pos'] + args.batch]
    order['pos'] += args.batch
    return dataset[idx]

  fixed = dataset[:args.batch].clone()
  feeds = {'pipeline': resident_batch, 'fixed': lambda: fixed}
  info = dict(teacher=f'{args.teacher}@{args.teacher_res}',
              student=f'{args.student}@{args.student_res}', batch_size=args.batch,
              device=torch.cuda.get_device_name() if cuda else 'cpu', torch=torch.__version__,
              threads=torch.get_num_threads(), compiled=compiled, channels_last=channels_last,
              dtype='bfloat16 autocast' if cuda else 'float32')
  return step, feeds, loss_fn, opt, info


def synchronize(args):
  if args.device == 'cuda':
    torch.cuda.synchronize()


def timed(args, step, feed, steps):
  synchronize(args)
  start = time.perf_counter()
  for _ in range(steps):
    step(feed())
  synchronize(args)
  return time.perf_counter() - start


def measured_peak_tflops(args):
  """Best large matmul: bf16 8192² on a GPU, f32 2048² on a CPU (as bigkd.bench), TFLOP/s."""
  size, dtype = (8192, torch.bfloat16) if args.device == 'cuda' else (2048, torch.float32)
  a = torch.randn(size, size, device=args.device, dtype=dtype)
  best = float('inf')
  for _ in range(5):
    synchronize(args)
    start = time.perf_counter()
    a @ a
    synchronize(args)
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best / 1e12


# The categories of profile_cpu_step.py, by aten op. Self times: an op's own time, not that of
# the ops it calls; `batch_norm` only appears in StdConv2d's weight standardisation.
OP_CATEGORIES = (
    ('conv forward', ('aten::mkldnn_convolution', 'aten::_slow_conv2d_forward',
                      'aten::thnn_conv2d', 'aten::_convolution', 'aten::convolution',
                      'aten::conv2d')),
    ('conv backward (input and filter)', ('aten::convolution_backward',
                                          'aten::mkldnn_convolution_backward')),
    ('GroupNorm', ('aten::native_group_norm', 'aten::native_group_norm_backward',
                   'aten::group_norm')),
    ('weight standardisation', ('aten::native_batch_norm', 'aten::native_batch_norm_backward',
                                'aten::batch_norm', 'aten::_batch_norm_impl_index',
                                'aten::_batch_norm_impl_index_backward',
                                'aten::_native_batch_norm_legit',
                                'aten::_native_batch_norm_legit_functional')),
    ('transposes / copies', ('aten::copy_', 'aten::contiguous', 'aten::clone', 'aten::permute',
                             'aten::reshape', 'aten::view', 'aten::_reshape_alias',
                             'aten::as_strided', 'aten::transpose', 'aten::t', 'aten::expand',
                             'aten::empty_like', 'aten::constant_pad_nd')),
    ('augmentation, RNG', ('aten::grid_sampler_2d', 'aten::grid_sampler_2d_backward',
                           'aten::uniform_', 'aten::rand', 'aten::randint', 'aten::randperm',
                           'aten::_sample_dirichlet', 'aten::_standard_gamma',
                           'aten::index', 'aten::affine_grid_generator')),
)


def profile(args, step, feed, steps):
  """Op self time per step by category (ms), over `steps` steps under torch.profiler."""
  from torch.profiler import ProfilerActivity
  from torch.profiler import profile as torch_profile
  synchronize(args)
  start = time.perf_counter()
  with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step(feed())
  wall = (time.perf_counter() - start) / steps
  category = {op: name for name, ops in OP_CATEGORIES for op in ops}
  totals, counts = {}, {}
  for event in prof.key_averages():
    name = category.get(event.key, 'the rest')
    totals[name] = totals.get(name, 0.0) + event.self_cpu_time_total / 1e3 / steps
    counts[name] = counts.get(name, 0) + event.count // steps
  op_time = sum(totals.values())
  print(f'torch {torch.__version__}, {args.teacher}@{args.teacher_res} -> '
        f'{args.student}@{args.student_res}, batch {args.batch}, {torch.get_num_threads()} '
        f'threads: {1e3 * wall:.1f} ms per step under the profiler ({steps} steps)')
  print(f'  {"category":34s} {"ms per step":>11s} {"share":>7s} {"ops per step":>12s}')
  for name in [n for n, _ in OP_CATEGORIES] + ['the rest']:
    ms = totals.get(name, 0.0)
    print(f'  {name:34s} {ms:11.1f} {100 * ms / op_time:6.1f}% {counts.get(name, 0):12d}')
  return totals


def serve(args, step, feeds, info):
  """The protocol of benchmarks/side_by_side.py: one JSON line when warm, then one JSON line
  {"seconds": wall, "cpu_seconds": process CPU time} per line N on stdin (N pipeline steps,
  timed); exits at end of input."""
  timed(args, step, feeds['pipeline'], args.warmup)
  print(json.dumps(info), flush=True)
  for line in sys.stdin:
    cpu = time.process_time()
    seconds = timed(args, step, feeds['pipeline'], int(line))
    print(json.dumps({'seconds': seconds, 'cpu_seconds': time.process_time() - cpu}), flush=True)


def main():
  args = parse_args()
  step, feeds, loss_fn, opt, info = build(args)
  if args.serve:
    return serve(args, step, feeds, info)
  for feed in feeds.values():
    timed(args, step, feed, args.warmup)
  if args.profile:
    return profile(args, step, feeds['pipeline'], args.profile)
  per_round = max(1, args.steps // args.rounds)
  rounds = {k: [] for k in feeds}
  for _ in range(args.rounds):
    for name, feed in feeds.items():
      rounds[name].append(timed(args, step, feed, per_round) / per_round)
  step_seconds = {k: min(v) for k, v in rounds.items()}

  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False)
  with counter:  # one eager step: forward + backward of both models (matmuls and convs)
    loss_fn(feeds['fixed']()).backward()
  opt.zero_grad(set_to_none=True)
  flops_per_image = counter.get_total_flops() / args.batch

  peak = args.peak_tflops or measured_peak_tflops(args)
  images_per_sec = args.batch / step_seconds['pipeline']
  achieved = flops_per_image * images_per_sec / 1e12
  result = dict(info, images_per_sec=images_per_sec, step_seconds=step_seconds['pipeline'],
                fixed_step_seconds=step_seconds['fixed'],
                pipeline_ratio=step_seconds['fixed'] / step_seconds['pipeline'],
                flops_per_image=flops_per_image, achieved_tflops=achieved, peak_tflops=peak,
                peak_measured=not args.peak_tflops, mfu=achieved / peak)
  print(f'torch {result["torch"]}: {result["teacher"]} -> {result["student"]}, batch '
        f'{args.batch} on {result["device"]} ({result["dtype"]}, '
        f'{"compiled" if result["compiled"] else "eager"}, {result["threads"]} threads)\n'
        f'  pipeline {1e3 * result["step_seconds"]:8.2f} ms/step {images_per_sec:9.1f} img/s\n'
        f'  fixed    {1e3 * result["fixed_step_seconds"]:8.2f} ms/step   pipeline_ratio '
        f'{result["pipeline_ratio"]:.3f}\n'
        f'  {flops_per_image / 1e9:.2f} GFLOP/image (FlopCounterMode), achieved {achieved:.3f} '
        f'TFLOP/s, peak {peak:.3f} TFLOP/s, MFU {100 * result["mfu"]:.1f}%', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
