"""Student-friendly teacher networks (SFTN, Park et al. 2021) on the bundled digits: the same
student distilled from an ordinary teacher and from an SFTN teacher of the same architecture
and budget.

  python -m bigkd.train --config configs/digits_sftn.py --workdir runs/sftn

Stages:
  teacher        resnet8 at 16 px, 800 steps on labels (as in configs/digits_methods.py);
  sftn           the same resnet8 and steps, trained with student branches: at its stage1
                 [16, 16, 16] and stage2 [8, 8, 32] taps a transform (1x1 conv + GroupNorm +
                 ReLU, resized) feeds cnn_small's layers after the same tap, laid out at the
                 student's 12 px ([6, 6, 16] and [3, 3, 32]); the paper's loss: λ_T = 1,
                 λ_R^KL = 3, λ_R^CE = 1, τ = 1 (config.SFTN_LOSS_WEIGHTS). The branches are
                 never exported: later stages read a plain resnet8;
  kd_teacher, kd_sftn            cnn_small at 12 px distilled from each (function matching,
                                 the logit KL), 3000 steps;
  fitnet_teacher, fitnet_sftn    the same + FitNets hints, student stage2 [3, 3, 32] -> teacher
                                 stage3 [4, 4, 64] through an adapter (configs/digits_methods.py).
tools/sftn_table.py runs it for several seeds and prints the README's table.

Variants (comma-separated): `steps=N` (N steps per student, default 3000), `teacher_steps=N`
(default 800), `fast` (a few steps per stage, for tests).
"""
from bigkd.config import SFTN_LOSS_WEIGHTS, base_config, stage_config

TEACHER_STEPS, STUDENT_STEPS = 800, 3000
SFTN_TAPS = ('stage1', 'stage2')
FITNET = dict(loss_weights=dict(fitnet=1.0), feature_pairs=(('student.stage2', 'teacher.stage3'),))


def _number(tokens, key, default):
  found = [t for t in tokens if t.startswith(f'{key}=')]
  return int(found[-1].split('=', 1)[1]) if found else default


def _known(token: str) -> bool:
  key, _, value = token.partition('=')
  return token == 'fast' or (key in ('steps', 'teacher_steps') and value.isdigit()
                             and int(value) > 0)


def get_config(variant=None):
  tokens = [t.strip() for t in (variant or '').split(',') if t.strip()]
  unknown = [t for t in tokens if not _known(t)]
  if unknown:  # a typo must not silently run the long default
    raise ValueError(f'configs/digits_sftn.py: unknown variant {unknown[0]!r} (known: steps=N, '
                     'teacher_steps=N, fast, joined by commas)')
  fast = 'fast' in tokens
  teacher_steps = _number(tokens, 'teacher_steps', 40 if fast else TEACHER_STEPS)
  student_steps = _number(tokens, 'steps', 20 if fast else STUDENT_STEPS)
  c = base_config()  # the run settings of configs/digits_methods.py
  c.batch_size = 64
  c.teacher_dtype = 'float32'        # bf16 convolutions are emulated (slow) on CPU
  c.log_every = 20 if fast else 100
  c.checkpoint_every = 1000
  c.data.base_size = 16
  c.augment.crop_area = (0.5, 1.0)
  c.augment.flip = False
  c.optimizer.lr = 3e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.weight_decay = 1e-4
  supervised = dict(steps=teacher_steps, label_weight=1.0, augment=dict(mixup_alpha=0.0))
  c.stages.teacher = stage_config('resnet8', 16, **supervised)
  c.stages.sftn = stage_config('resnet8', 16, **supervised, sftn_student='cnn_small',
                               sftn_taps=SFTN_TAPS, sftn_resolution=12,
                               loss_weights=SFTN_LOSS_WEIGHTS)
  order = ['teacher', 'sftn']
  for method, fields in (('kd', {}), ('fitnet', FITNET)):
    for teacher in ('teacher', 'sftn'):
      name = f'{method}_{teacher}'
      c.stages[name] = stage_config('cnn_small', 12, teachers={'teacher': teacher},
                                    steps=student_steps, teaching_mode='function_matching',
                                    **fields)
      order.append(name)
  c.stage_order = ','.join(order)
  return c
