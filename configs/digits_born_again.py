"""Born-again networks on the bundled digits (self-distillation, Furlanello et al. 2018): a
resnet8 teacher at 16 px trained on labels (as in configs/digits.py), then generations of the
same resnet8, each distilled from the one before by function matching for as many steps.

  python -m bigkd.train --config configs/digits_born_again.py --workdir runs/born_again

Variants (comma-separated): `generations=N` (default 2), `ensemble` (one more generation,
distilled from all the earlier ones together), `byot` (one more stage, `teacher_byot`: the
teacher's resnet8 and budget trained on labels with shallow classifiers on its stage1 and stage2
that learn from its own output ("be your own teacher", Zhang et al. 2019): self_ce 0.7, self_kl
0.3 at T = 3, self_feature 0.03; not tuned), `fast` (a few steps per stage, for tests).
The generations are made by `bigkd.config.born_again`: ordinary stages, nothing new in the
trainer.
"""
from bigkd.cli import config_module
from bigkd.config import born_again, stage_config


def get_config(variant=None):
  tokens = [t.strip() for t in (variant or '').split(',') if t.strip()]
  counts = [t for t in tokens if t.startswith('generations=') and t[12:].isdigit()]
  unknown = [t for t in tokens if t not in ('fast', 'ensemble', 'byot') and t not in counts]
  if unknown:
    raise ValueError(f'configs/digits_born_again.py: unknown variant {unknown[0]!r} (known: '
                     'generations=N, ensemble, byot, fast, joined by commas)')
  fast = 'fast' in tokens
  c = config_module('digits').get_config('fast' if fast else None)  # the demo's run settings
  with c.unlocked():
    c.stages = type(c.stages)()
    c.stages.teacher = stage_config('resnet8', 16, steps=40 if fast else 800, label_weight=1.0,
                                    augment=dict(mixup_alpha=0.0))
  c.stage_order = 'teacher'
  generations = int(counts[-1][12:]) if counts else 2
  c = born_again(c, 'teacher', generations, ensemble='ensemble' in tokens,
                 teaching_mode='function_matching')
  if 'byot' in tokens:
    c.stages.teacher_byot = stage_config(
        'resnet8', 16, steps=c.stages.teacher.steps, label_weight=1.0,
        augment=dict(mixup_alpha=0.0), self_taps=('stage1', 'stage2'),
        loss_weights=dict(self_ce=0.7, self_kl=0.3, self_feature=0.03))
    c.stage_order += ',teacher_byot'
  return c
