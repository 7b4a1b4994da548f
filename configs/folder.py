"""Your own images: `root/{train,val,test}/{class}/*.{jpg,png,...}`, one folder per class.

  bigkd-train --config configs/folder.py --workdir runs/mine --config.data.data_dir=/data/mine
  bigkd-train --config configs/folder.py:bit --workdir runs/mine --config.data.data_dir=/data/mine \
      --config.stages.teacher.init=/data/bit/BiT-M-R152x2.npz

Classes are the folder names under `train/` (sorted; their names are saved in each stage's
stage.json, so predictions read as names). Files that are not images (`.DS_Store`, notes) are
skipped and counted; a corrupt image stops the run with its path. The defaults fit any size:
the canvas (`data.base_size=0`) follows the images' median long side, between the largest model
resolution and 4/3 of it; a batch larger than the train split shrinks to fit it.

Variants:
  (none)             from scratch, for a CPU and a few thousand images: teacher resnet14 at
                     48 px on the labels (100 epochs), then student cnn_small at 32 px distilled
                     from it by function matching (300 epochs: patient). The images are decoded
                     once and held in memory; for many more add
                     --config.data.device_resident=False (streamed).
  bit[,SIZE]         the paper's recipe from a public BiT-M checkpoint:
    stage teacher    BiT-M-R152x2 (ImageNet-21k) fine-tuned on your labels at 224 px, from the
                     .npz given as stages.teacher.init; its 21,843-class head is replaced by a
                     zero head for your classes (any head size works). BiT-HyperRule (Kolesnikov
                     et al. 2020): SGD with momentum 0.9, lr 0.003, batch 512, no weight decay,
                     mixup 0.1 above 20k images, and a length by the train split's size; a cosine
                     decay after the warmup stands in for its step decays.
    stage student    BiT-R50x1 from random weights (or --config.stages.student.init=BiT-M-R50x1
                     .npz), distilled from the fine-tuned teacher by function matching (the same
                     inception crop and mixup for both), Adam with warmup + cosine and clipping,
                     KL at T=10, for 20x the teacher's steps (patience is the paper's point).
    SIZE             the train split's size, picking the schedule lengths:
                     small (< 20k images, default)   teacher    500 steps, student  10,000
                     medium (< 500k images)          teacher 10,000 steps, student 200,000
                     large                           teacher 20,000 steps, student 400,000
An unknown variant is an error naming these (exit code 2). Every value can be overridden with
--config.FIELD=VALUE; `bigkd-train --config configs/folder.py:bit --fields` lists them.
"""
from bigkd.config import base_config, stage_config

# BiT-HyperRule lengths (teacher fine-tuning steps, warmup steps, mixup) by train split size.
HYPER_RULE = {'small': (500, 100, 0.0), 'medium': (10_000, 500, 0.1),
              'large': (20_000, 500, 0.1)}
PATIENCE = 20  # student steps per teacher step
BIT_TEACHER_INIT = '/path/to/bit_models/BiT-M-R152x2.npz'  # placeholder: override it
VARIANTS = ('', 'bit', *(f'bit,{size}' for size in HYPER_RULE))


def common(c, batch_size: int):
  c.batch_size = batch_size
  c.eval_batch_size = 64
  c.data.source = 'folder'
  c.data.data_dir = ''              # required: --config.data.data_dir=/path/to/root
  c.data.base_size = 0              # from the images (see the docstring)
  c.data.device_resident = False    # streamed: memory does not grow with the folder
  c.data.eval_crop_fraction = 0.875  # evaluation: central crop of 87.5% of the short side
  c.log_every = 50
  c.eval_every = 1000
  c.checkpoint_every = 1000
  return c


def scratch_config():
  c = common(base_config(), batch_size=64)
  c.teacher_dtype = 'float32'
  c.data.device_resident = True     # small data: decoded once (≈16 KB per image at 64 px)
  c.log_every, c.eval_every = 20, 200
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_epochs = 1.0
  c.optimizer.weight_decay = 1e-4
  c.stages.teacher = stage_config('resnet14', 48, epochs=100, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  c.stages.student = stage_config('cnn_small', 32, teachers={'teacher': 'teacher'}, epochs=300,
                                  teaching_mode='function_matching')
  c.stage_order = 'teacher,student'
  return c


def bit_config(size: str):
  teacher_steps, warmup, mixup = HYPER_RULE[size]
  c = common(base_config(), batch_size=512)
  c.teacher_dtype = 'bfloat16'
  c.augment.crop_sampler = 'tf'     # the paper's inception crop: 5-100% of the area
  c.augment.crop_area = (0.05, 1.0)
  c.augment.mixup_per_example = False
  c.optimizer.clip_norm = 1.0
  c.stages.teacher = stage_config(
      'bit_r152x2', 224, init=BIT_TEACHER_INIT, steps=teacher_steps, label_weight=1.0,
      augment=dict(mixup_alpha=mixup),
      optimizer=dict(name='sgd', lr=0.003, momentum=0.9, warmup_steps=warmup, weight_decay=0.0,
                     clip_norm=0.0))
  c.stages.student = stage_config(
      'bit_r50x1', 224, teachers={'teacher': 'teacher'}, steps=PATIENCE * teacher_steps,
      teaching_mode='function_matching', temperature=10.0,
      optimizer=dict(name='adam', lr=3e-3, warmup_steps=1500, weight_decay=3e-4,
                     weight_decay_scaled_by_lr=False, mu_dtype='bfloat16'))
  c.stage_order = 'teacher,student'
  return c


def get_config(variant=None):
  variant = (variant or '').replace(' ', '')
  if variant not in VARIANTS:
    raise ValueError(f'configs/folder.py: unknown variant {variant!r} (known: none, '
                     f'{", ".join(v for v in VARIANTS if v)})')
  return bit_config(variant.partition(',')[2] or 'small') if variant else scratch_config()
