"""Deep mutual learning on the bundled digits (online distillation, Zhang et al. 2018; the KD
survey's §3.2): two students trained together from scratch, each on its labels and on the
other's predictions, against each trained alone for as many steps.

  python -m bigkd.train --config configs/digits_dml.py --workdir runs/dml

Stages:
  mutual        peers `cnn` (cnn_small at 12 px) and `resnet` (resnet8 at 16 px) in one step on
                the same batch (one crop box rendered at 12 and 16 px), each with
                CE(labels) + KL(the other ‖ itself) at T = 1 (the paper's loss), 1000 steps;
                each peer is then a stage folder of its own, mutual/cnn and mutual/resnet;
  cnn_alone     cnn_small at 12 px on labels alone, 1000 steps;
  resnet_alone  resnet8 at 16 px on labels alone, 1000 steps.
No mixup (a supervised recipe, as the paper's). `tools/dml_table.py` runs it over seeds.
Variants (comma-separated): `same` (two cnn_small peers at 12 px, `cnn` and `cnn2`, against
cnn_alone: DML of identical networks), `fast` (a few steps per stage, for tests).
"""
from bigkd.cli import config_module
from bigkd.config import mutual_stage, stage_config

VARIANTS = ('fast', 'same')


def get_config(variant=None):
  tokens = [t.strip() for t in (variant or '').split(',') if t.strip()]
  unknown = [t for t in tokens if t not in VARIANTS]
  if unknown:
    raise ValueError(f'configs/digits_dml.py: unknown variant {unknown[0]!r} (known: '
                     f'{", ".join(VARIANTS)}, joined by commas)')
  fast = 'fast' in tokens
  c = config_module('digits').get_config('fast' if fast else None)  # the demo's run settings
  steps = 40 if fast else 1000
  supervised = dict(steps=steps, label_weight=1.0, augment=dict(mixup_alpha=0.0))
  peers = ({'cnn': ('cnn_small', 12), 'cnn2': ('cnn_small', 12)} if 'same' in tokens else
           {'cnn': ('cnn_small', 12), 'resnet': ('resnet8', 16)})
  with c.unlocked():
    c.stages = type(c.stages)()
    c.stages.mutual = mutual_stage(peers, steps=steps, augment=dict(mixup_alpha=0.0))
    c.stages.cnn_alone = stage_config('cnn_small', 12, **supervised)
    if 'same' not in tokens:
      c.stages.resnet_alone = stage_config('resnet8', 16, **supervised)
  c.stage_order = 'mutual,cnn_alone' + ('' if 'same' in tokens else ',resnet_alone')
  return c
