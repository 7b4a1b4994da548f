"""Distillation methods side by side on the bundled digits: one teacher, the same student and
budget for each method.

  python -m bigkd.train --config configs/digits_methods.py --workdir runs/methods

Stages: `teacher` (resnet8 at 16 px, 800 steps on labels, as in configs/digits.py), then one
stage per method, each a cnn_small at 12 px taught by that teacher under function matching (the
same crop at 16 px and 12 px, shared mixup) for the same number of steps:
  kd        the logit KL alone (the patient-teacher recipe);
  labels    cross-entropy on the (mixed) labels alone: the teacher is only measured against;
  fitnet    KL + FitNets hints, student stage2 [3, 3, 32] -> teacher stage3 [4, 4, 64] through
            an adapter (1x1 conv + norm, resized);
  at        KL + attention transfer, stage2 vs stage3 (the teacher's stage3 pooled to 3x3);
  sp        KL + similarity-preserving, stage2 vs stage3;
  pkt       KL + probabilistic knowledge transfer on the embeddings (prelogits);
  rkd       KL + RKD distance (25) and angle (50) on the embeddings;
  crd       labels + 0.8 CRD on the embeddings (the paper's setting; τ = 0.07, 128-d heads),
            against queues of the last 1024 examples (16 batches) instead of 16384 from a
            memory bank: the digits' train split has 1,197;
  dkd       labels + decoupled KD (α = 1, β = 8, T = 4, ramped in over the first 20 epochs);
  dist      labels + DIST (β = γ = 2, τ = 4: the paper's CIFAR setting).
The feature-loss weights are the reference implementations' (SP 3000, PKT 30000 as in the CRD
benchmark, RKD 25/50): bigkd computes these losses as those implementations do, so their weights
apply unchanged. FitNet and AT have weight 1 (their terms start near the KL's size). None is
tuned.
Every stage reports linear CKA (student stage2 vs teacher stage3, student prelogits vs teacher
prelogits) next to agreement and KL. tools/methods_table.py runs it for several seeds and
prints the table of docs/methods.md.

Variants (comma-separated): method names run the teacher and those methods only (e.g.
`:fitnet,at`); `steps=N`: N steps per student (default 3000, as configs/digits.py's student);
`fast`: a few steps per stage (tests).
"""
from bigkd.config import base_config, stage_config

METHODS = ('kd', 'labels', 'fitnet', 'at', 'sp', 'pkt', 'rkd', 'crd', 'dkd', 'dist')
SPATIAL = (('student.stage2', 'teacher.stage3'),)    # [3, 3, 32] and [4, 4, 64]
EMBEDDING = (('student.prelogits', 'teacher.prelogits'),)  # [288] and [64]
CKA_PAIRS = SPATIAL + EMBEDDING
TEACHER_STEPS, STUDENT_STEPS = 800, 3000


def method_fields(method: str, steps: int) -> dict:
  """The stage_config fields that make a student stage use `method`."""
  epoch = 1200 // 64  # steps per epoch of the digits' train split at batch 64 (about)
  return {
      'kd': dict(),
      'labels': dict(loss_weights=dict(kl=0.0, labels=1.0)),
      'fitnet': dict(loss_weights=dict(fitnet=1.0), feature_pairs=SPATIAL),
      'at': dict(loss_weights=dict(at=1.0), feature_pairs=SPATIAL),
      'sp': dict(loss_weights=dict(sp=3000.0), feature_pairs=SPATIAL),
      'pkt': dict(loss_weights=dict(pkt=30000.0), feature_pairs=EMBEDDING),
      'rkd': dict(loss_weights=dict(rkd_distance=25.0, rkd_angle=50.0),
                  feature_pairs=EMBEDDING),
      'crd': dict(loss_weights=dict(kl=0.0, labels=1.0, crd=0.8), feature_pairs=EMBEDDING,
                  loss_options=dict(crd_queue=1024)),
      'dkd': dict(loss_weights=dict(kl=0.0, labels=1.0, dkd=1.0),
                  loss_options=dict(dkd_warmup_steps=min(20 * epoch, steps // 5))),
      'dist': dict(loss_weights=dict(kl=0.0, labels=1.0, dist=1.0),
                   loss_options=dict(dist_beta=2.0, dist_gamma=2.0, dist_temperature=4.0)),
  }[method]


def get_config(variant=None):
  tokens = [t.strip() for t in (variant or '').split(',') if t.strip()]
  budget = [t for t in tokens if t.startswith('steps=') and t[6:].isdigit() and int(t[6:]) > 0]
  unknown = [t for t in tokens if t not in METHODS + ('fast',) and t not in budget]
  if unknown:  # a typo must not silently run every method
    raise ValueError(f'configs/digits_methods.py: unknown variant {unknown[0]!r} (known: '
                     f'{", ".join(METHODS)}, fast, steps=N, or several joined by commas)')
  fast = 'fast' in tokens
  methods = [m for m in METHODS if m in tokens] or list(METHODS)
  teacher_steps, steps = (40, 20) if fast else (TEACHER_STEPS, STUDENT_STEPS)
  if budget:
    steps = int(budget[-1][6:])
  c = base_config()
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
  c.stages.teacher = stage_config('resnet8', 16, steps=teacher_steps, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  for method in methods:
    c.stages[method] = stage_config('cnn_small', 12, teachers={'teacher': 'teacher'}, steps=steps,
                                    teaching_mode='function_matching', cka_pairs=CKA_PAIRS,
                                    **method_fields(method, steps))
  c.stage_order = ','.join(['teacher', *methods])
  return c
