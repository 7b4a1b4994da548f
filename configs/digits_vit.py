"""ViTs and ResNets teaching each other on the bundled digits: a ViT student from a ResNet
teacher and a ResNet student from a ViT teacher, next to the same models trained on labels alone.

  python -m bigkd.train --config configs/digits_vit.py --workdir runs/digits_vit

Four stages, every one at 16 px (the 8 x 8 digits upsampled) for the same number of steps:
  resnet8            resnet8 trained on labels: the ResNet teacher, and the ResNet baseline;
  vit                a small ViT (vit_tiny_test: width 32, 2 blocks of 2 heads, 4 x 4 patches, so
                     16 patch tokens and a class token) trained on labels: the ViT teacher, and
                     the ViT baseline;
  vit_from_resnet8   the ViT distilled from resnet8 by function matching (same crop, mixup);
  resnet8_from_vit   resnet8 distilled from the ViT by function matching.
A student and its baseline have the same model, resolution and budget; only the teacher differs
from the labels. `tools/vit_table.py` runs this config over seeds and prints the table.

Variants (comma-separated): `steps=N` (every stage; default 600), `fast` (a few steps per stage,
for tests of the command line).
"""
from bigkd.cli import config_module
from bigkd.config import stage_config

DEFAULT_STEPS = 600
VIT = 'vit_tiny_test'


def get_config(variant=None):
  tokens = [t.strip() for t in (variant or '').split(',') if t.strip()]
  counts = [t for t in tokens if t.startswith('steps=') and t[6:].isdigit() and int(t[6:]) > 0]
  unknown = [t for t in tokens if t != 'fast' and t not in counts]
  if unknown:
    raise ValueError(f'configs/digits_vit.py: unknown variant {unknown[0]!r} (known: steps=N, '
                     'fast, joined by commas)')
  fast = 'fast' in tokens
  steps = int(counts[-1][6:]) if counts else (40 if fast else DEFAULT_STEPS)
  c = config_module('digits').get_config('fast' if fast else None)  # the demo's run settings
  if not fast:
    c.eval_every = 0  # the final evaluation only (what the table reads)
  labels = dict(steps=steps, label_weight=1.0, augment=dict(mixup_alpha=0.0))
  distilled = dict(steps=steps, teaching_mode='function_matching')
  with c.unlocked():
    c.stages = type(c.stages)()
    c.stages.resnet8 = stage_config('resnet8', 16, **labels)
    c.stages.vit = stage_config(VIT, 16, **labels)
    c.stages.vit_from_resnet8 = stage_config(VIT, 16, teachers={'teacher': 'resnet8'},
                                             **distilled)
    c.stages.resnet8_from_vit = stage_config('resnet8', 16, teachers={'teacher': 'vit'},
                                             **distilled)
  c.stage_order = 'resnet8,vit,vit_from_resnet8,resnet8_from_vit'
  return c
