"""The demo: distil a ResNet teacher into a small CNN on the bundled digits, on CPU in minutes.

  python -m bigkd.train --config configs/digits.py --workdir runs/digits

Three stages:
  teacher   resnet8 at 16 px, trained on labels (800 steps);
  student   cnn_small at 12 px, distilled from the teacher by function matching: the same inception
            crop rendered at 16 px for the teacher and 12 px for the student, and shared mixup
            (3,000 steps: patient);
  baseline  the same cnn_small at 12 px trained on labels alone, for as many steps as the student.
The final table compares their test accuracies and the student's agreement with the teacher.
Variant `:fast` runs a few dozen steps per stage (for tests of the command line).
"""
from bigkd.config import base_config, stage_config


VARIANTS = ('', 'fast')


def get_config(variant=None):
  if (variant or '') not in VARIANTS:  # a typo must not silently run the full demo
    raise ValueError(f'configs/digits.py: unknown variant {variant!r} (known: none, fast)')
  fast = variant == 'fast'
  c = base_config()
  c.batch_size = 64
  c.teacher_dtype = 'float32'        # bf16 convolutions are emulated (slow) on CPU
  c.log_every = 20 if fast else 100
  c.checkpoint_every = 500
  c.eval_every = 20 if fast else 500  # a validation curve (evaluation does not change training)
  c.data.base_size = 16              # digits are 8x8: 16 px keeps them sharp and the CPU fast
  c.augment.crop_area = (0.5, 1.0)   # small glyphs: keep most of them
  c.augment.flip = False             # digits are not mirror-symmetric
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4
  teacher_steps, student_steps = (40, 40) if fast else (800, 3000)
  c.stages.teacher = stage_config('resnet8', 16, steps=teacher_steps, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  c.stages.student = stage_config('cnn_small', 12, teachers={'teacher': 'teacher'},
                                  steps=student_steps, teaching_mode='function_matching')
  c.stages.baseline = stage_config('cnn_small', 12, steps=student_steps,
                                   augment=dict(mixup_alpha=0.0))
  c.stage_order = 'teacher,student,baseline'
  return c
