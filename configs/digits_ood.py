"""Distillation data on the bundled digits: does a student learn its teacher's function from
images outside the task?

  python -m bigkd.train --config configs/digits_ood.py --workdir runs/digits_ood

The task is the digits 0-4 (`data.classes='0-4'`: about 600 train, 150 val and 150 test images).
Four stages:
  teacher        resnet8 at 16 px, trained on the task's labelled train images (800 steps);
  student_task   cnn_small at 12 px, distilled by function matching on the task's own train
                 images (labels unused);
  student_ood    the same, on out-of-domain images only: the train digits 5-9, unlabeled;
  student_mixed  the same, each batch half task images, half digits 5-9.
Every student gets as many steps; all are evaluated on the task's val/test (digits 0-4).
`python tools/ood_table.py` runs it for three seeds and prints the README's table.
Variants (comma-separated): `steps=N` (student steps, default 1500), `fast` (a few steps per
stage, for tests).
"""
from bigkd.cli import config_module
from bigkd.config import stage_config

OOD = dict(source='digits', classes='5-9')  # the train split's digits 5-9, without labels


def get_config(variant=None):
  tokens = [t.strip() for t in (variant or '').split(',') if t.strip()]
  counts = [t for t in tokens if t.startswith('steps=') and t[6:].isdigit()]
  unknown = [t for t in tokens if t != 'fast' and t not in counts]
  if unknown:
    raise ValueError(f'configs/digits_ood.py: unknown variant {unknown[0]!r} (known: steps=N, '
                     'fast, joined by commas)')
  fast = 'fast' in tokens
  c = config_module('digits').get_config('fast' if fast else None)  # the demo's run settings
  c.data.classes = '0-4'
  steps = int(counts[-1][6:]) if counts else (40 if fast else 1500)
  with c.unlocked():
    c.stages = type(c.stages)()
    c.stages.teacher = stage_config('resnet8', 16, steps=40 if fast else 800, label_weight=1.0,
                                    augment=dict(mixup_alpha=0.0))
    student = lambda **train_data: stage_config(
        'cnn_small', 12, teachers={'teacher': 'teacher'}, steps=steps,
        teaching_mode='function_matching', train_data=train_data)
    c.stages.student_task = student()
    c.stages.student_ood = student(ood=OOD)
    c.stages.student_mixed = student(task=dict(source='task'), ood=OOD)
  c.stage_order = 'teacher,student_task,student_ood,student_mixed'
  return c
