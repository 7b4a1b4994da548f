"""PyTorch reference for `python -m bigkd.bench`: the same distillation step on a GPU.

One function-matching step (Beyer et al. 2022): gather a batch from a dataset that lives on the
GPU, sample one inception crop, flip and mixup weight per example, render the crop at the
teacher's and at the student's resolution, teacher forward (frozen, no grad), student forward and
backward on KL(teacher || student), global-norm clipping, AdamW. Models come from timm:
BiT `resnetv2_152x2_bit` teacher, `resnetv2_50x1_bit` student (GroupNorm + weight-standardised
convs, like bigkd's bit_r152x2 / bit_r50x1), random weights (speed does not depend on them),
bf16 autocast, channels_last, torch.compile.

Not run by bigkd's tests: it needs a CUDA GPU and torch + timm, which requirements.txt lacks.
  pip install torch timm          # torch >= 2.2, timm >= 0.9
  python benchmarks/torch_distill_step.py --batch 128 --teacher_res 224 --student_res 224 \
      --num_classes 10 --steps 50 --json torch.json
The JAX side of the comparison, on the same GPU (digits stored at 256 px; both stages random):
  python -m bigkd.bench --config configs/digits.py --stage student --steps 50 --json jax.json \
      --config.data.base_size=256 --config.batch_size=128 --config.teacher_dtype=bfloat16 \
      --config.stages.teacher.model=bit_r152x2 --config.stages.teacher.resolution=224 \
      --config.stages.student.model=bit_r50x1 --config.stages.student.resolution=224
(bigkd's student computes in float32 (TF32 matmuls on GPUs); pass --student_fp32 here to match.)

Prints and writes (--json) the keys of bigkd.bench: images_per_sec, step_seconds,
flops_per_image, mfu, pipeline_ratio (device-resident gather vs a fixed batch). FLOPs here are
those FlopCounterMode sees (convolutions and matmuls); XLA's cost analysis also counts elementwise
work, so bigkd's figure is a little higher for the same step. Rendering uses bilinear
grid_sample without bigkd's antialiasing: slightly less work than bigkd does.
"""
import argparse
import json
import math
import time


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--teacher', default='resnetv2_152x2_bit')
  p.add_argument('--student', default='resnetv2_50x1_bit')
  p.add_argument('--teacher_res', type=int, default=224)
  p.add_argument('--student_res', type=int, default=224)
  p.add_argument('--base_size', type=int, default=256, help='stored image size')
  p.add_argument('--examples', type=int, default=2048, help='images resident on the GPU')
  p.add_argument('--num_classes', type=int, default=1000)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=50, help='timed steps per variant')
  p.add_argument('--warmup', type=int, default=5, help='untimed steps (compilation) per variant')
  p.add_argument('--rounds', type=int, default=10)
  p.add_argument('--lr', type=float, default=1e-3)
  p.add_argument('--student_fp32', action='store_true', help='student outside autocast')
  p.add_argument('--no_compile', action='store_true')
  p.add_argument('--peak_tflops', type=float, default=0.0,
                 help='peak TFLOP/s of the GPU (e.g. 989 for H100 dense bf16); 0: measure')
  p.add_argument('--json', default='')
  return p.parse_args()


def crop_boxes(torch, batch, device, area=(0.08, 1.0), aspect=(3 / 4, 4 / 3), attempts=10):
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


def render(torch, F, images, boxes, flips, size):
  """Each box of float images [B, 3, H, W] resampled (bilinear) to size², flipped where asked."""
  top, left, h, w = boxes.unbind(-1)
  sign = 1 - 2 * flips.float()
  zeros = torch.zeros_like(h)
  theta = torch.stack([torch.stack([w * sign, zeros, 2 * left + w - 1], -1),
                       torch.stack([zeros, h, 2 * top + h - 1], -1)], 1)
  grid = F.affine_grid(theta, (images.shape[0], 3, size, size), align_corners=False)
  return F.grid_sample(images, grid, mode='bilinear', align_corners=False)


def mix(torch, x, weight):
  """Mixup with the neighbour in the batch (a roll by one), one weight per batch."""
  return weight * x + (1 - weight) * torch.roll(x, 1, 0)


def main():
  args = parse_args()
  try:
    import timm
    import torch
    import torch.nn.functional as F
  except ImportError as e:
    raise SystemExit(f'needs torch and timm (pip install torch timm): {e}')
  assert torch.cuda.is_available(), 'needs a CUDA GPU'
  device = torch.device('cuda')
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
  torch.backends.cudnn.benchmark = True
  cl = torch.channels_last

  teacher = timm.create_model(args.teacher, pretrained=False, num_classes=args.num_classes)
  teacher = teacher.to(device, memory_format=cl).eval().requires_grad_(False)
  student = timm.create_model(args.student, pretrained=False, num_classes=args.num_classes)
  student = student.to(device, memory_format=cl).train()
  opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0, fused=True)
  beta = torch.distributions.Beta(torch.tensor(1.0, device=device),
                                  torch.tensor(1.0, device=device))  # mixup_alpha = 1
  dataset = torch.randint(0, 256, (args.examples, args.base_size, args.base_size, 3),
                          dtype=torch.uint8, device=device)

  def loss_fn(images_u8):
    images = images_u8.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
    batch = images.shape[0]
    boxes = crop_boxes(torch, batch, device)
    flips = torch.rand(batch, device=device) < 0.5
    weight = beta.sample()
    t_view = mix(torch, render(torch, F, images, boxes, flips, args.teacher_res), weight)
    s_view = mix(torch, render(torch, F, images, boxes, flips, args.student_res), weight)
    with torch.autocast('cuda', dtype=torch.bfloat16):
      with torch.no_grad():
        t_logits = teacher(t_view.contiguous(memory_format=cl)).float()
    with torch.autocast('cuda', dtype=torch.bfloat16, enabled=not args.student_fp32):
      s_logits = student(s_view.contiguous(memory_format=cl)).float()
    return F.kl_div(F.log_softmax(s_logits, -1), F.log_softmax(t_logits, -1), log_target=True,
                    reduction='batchmean')

  loss_fn_c = loss_fn if args.no_compile else torch.compile(loss_fn)

  def step(images_u8):
    loss = loss_fn_c(images_u8)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  order = {'perm': torch.randperm(args.examples, device=device), 'pos': 0}

  def resident_batch():
    """Index gather from the resident dataset, a new permutation each epoch (on the GPU)."""
    if order['pos'] + args.batch > args.examples:
      order['perm'], order['pos'] = torch.randperm(args.examples, device=device), 0
    idx = order['perm'][order['pos']:order['pos'] + args.batch]
    order['pos'] += args.batch
    return dataset[idx]

  fixed = dataset[:args.batch].clone()
  feeds = {'pipeline': resident_batch, 'fixed': lambda: fixed}

  def timed(feed, steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
      step(feed())
    torch.cuda.synchronize()
    return time.perf_counter() - start

  for feed in feeds.values():
    timed(feed, args.warmup)
  per_round = max(1, args.steps // args.rounds)
  rounds = {k: [] for k in feeds}
  for _ in range(args.rounds):
    for name, feed in feeds.items():
      rounds[name].append(timed(feed, per_round) / per_round)
  step_seconds = {k: min(v) for k, v in rounds.items()}

  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False)
  with counter:  # one eager step: forward + backward of both models (matmuls and convs)
    loss_fn(fixed).backward()
  opt.zero_grad(set_to_none=True)
  flops_per_image = counter.get_total_flops() / args.batch

  peak = args.peak_tflops
  if not peak:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
      a @ a
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
      a @ a
    torch.cuda.synchronize()
    peak = 10 * 2 * 8192 ** 3 / (time.perf_counter() - start) / 1e12
  images_per_sec = args.batch / step_seconds['pipeline']
  achieved = flops_per_image * images_per_sec / 1e12
  result = dict(teacher=f'{args.teacher}@{args.teacher_res}',
                student=f'{args.student}@{args.student_res}', batch_size=args.batch,
                device=torch.cuda.get_device_name(), compiled=not args.no_compile,
                images_per_sec=images_per_sec, step_seconds=step_seconds['pipeline'],
                fixed_step_seconds=step_seconds['fixed'],
                pipeline_ratio=step_seconds['fixed'] / step_seconds['pipeline'],
                flops_per_image=flops_per_image, achieved_tflops=achieved, peak_tflops=peak,
                peak_measured=not args.peak_tflops, mfu=achieved / peak)
  print(f'torch: {result["teacher"]} -> {result["student"]}, batch {args.batch} on '
        f'{result["device"]}\n'
        f'  pipeline {1e3 * result["step_seconds"]:8.2f} ms/step {images_per_sec:9.1f} img/s\n'
        f'  fixed    {1e3 * result["fixed_step_seconds"]:8.2f} ms/step   pipeline_ratio '
        f'{result["pipeline_ratio"]:.3f}\n'
        f'  {flops_per_image / 1e9:.2f} GFLOP/image (FlopCounterMode), achieved {achieved:.1f} '
        f'TFLOP/s, peak {peak:.1f} TFLOP/s, MFU {100 * result["mfu"]:.1f}%', flush=True)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  main()
