"""The study: the paper's four experiments in miniature, on the bundled digits.

  python -m bigkd.study WORKDIR [--seeds N] [--only modes,patience,resolution,optimizer]
  python -m bigkd.study WORKDIR --config fast        # the regression guard's variant, ~30 s

Every run distils cnn_small at 12 px from a resnet8 teacher trained once per seed on labels
(`configs/digits.py`'s teacher and student: batch 64, inception crops of 50-100 % of the area, no
flip, Adam, weight decay 1e-4). Each student run is one stage in its own workdir, so every run of
a seed starts from the same initialisation and sees the same batches: two runs differ only in
what the experiment varies (paired comparisons, less noise than the seeds' spread).

Parts (`--only`):
  modes       the four teaching modes at one budget;
  patience    function matching and the fixed teacher at budgets spaced x3 (the paper's
              "patient" figure: test KL and agreement against budget);
  resolution  function matching from a teacher trained at 16 px (the shared teacher) against one
              trained at 12 px, the student's resolution: the paper's 384-px teacher for a 224-px
              student against the same-resolution pair (add 24 to teacher_resolutions for a
              third point; it raises the canvas, data.base_size, of every run to 24);
  optimizer   Adam and Shampoo, each at several budgets with its own warmup + cosine schedule and
              its best learning rate from a small grid (chosen on the first `grid_seeds` seeds'
              final val KL, then used for every seed): for each Shampoo budget, the Adam budget
              that reaches the same final val KL, interpolated on log budget;
  shampoo_options (not in the default) Shampoo's options varied one at a time at one budget and
              the optimizer part's chosen learning rate, on the first seed: what was tried to
              close the gap to the paper's 4x.
The mixup of `augment.mixup_alpha` is used by function matching only (bigkd.data.augment): the
other modes run without mixup, as in the paper.

Variant `fast`: the regression guard of tests/test_study.py, one seed and a small teacher
(cnn_small, 300 steps): function matching against the fixed teacher at 400 steps (modes), and
function matching at 100 and 400 steps (patience): three student runs.
"""
import ml_collections

ConfigDict = ml_collections.ConfigDict

VARIANTS = ('', 'fast')
PARTS = ('modes', 'patience', 'resolution', 'optimizer', 'shampoo_options')
DEFAULT_PARTS = PARTS[:4]
TEACHING_MODES = ('fixed_teacher', 'independent_noise', 'consistent', 'function_matching')

# Shampoo as in benchmarks/bench_shampoo_digits.py: cnn_small's kernels merge to (27, 16),
# (144, 32) and (288, 10) matrices, and block 288 keeps every axis whole (one factor per side).
SHAMPOO_OPTIONS = dict(block_size=288, precondition_every=10, start_preconditioning_step=10)

# Shampoo's options varied one at a time (part shampoo_options), each against SHAMPOO_OPTIONS.
SHAMPOO_VARIANTS = {
    'base': {},
    'block_64': dict(block_size=64),
    'start_50': dict(start_preconditioning_step=50),
    'start_1': dict(start_preconditioning_step=1),
    'every_2': dict(precondition_every=2),
    'exponent_2': dict(exponent_override=2),
    'graft_rmsprop': dict(graft='rmsprop'),
    'graft_sgd': dict(graft='sgd'),
    'stats_b2_0.99': dict(graft_b2=0.999, b2=0.99),
    'start_50_every_2': dict(start_preconditioning_step=50, precondition_every=2),
}


def get_config(variant=None):
  if (variant or '') not in VARIANTS:  # a typo must not silently run the 30-minute study
    raise ValueError(f'configs/study.py: unknown variant {variant!r} (known: none, fast)')
  fast = variant == 'fast'
  c = ConfigDict()
  c.seeds = 1 if fast else 3      # seeds 0 .. seeds-1, each with its own teachers
  c.parts = 'modes,patience' if fast else ','.join(DEFAULT_PARTS)  # what `--only` defaults to
  c.teacher = ConfigDict(dict(
      model='cnn_small' if fast else 'resnet8',
      resolution=16,              # the shared teacher of modes, patience and optimizer
      steps=300 if fast else 800,
      lr=3e-3,
      warmup_steps=100,
  ))
  c.student = ConfigDict(dict(
      model='cnn_small',
      resolution=12,
      lr=3e-3,                    # Adam's peak lr (the demo's) where no grid chooses one
      warmup_fraction=0.1,        # warmup = min(warmup_max, fraction * budget): every budget
      warmup_max=100,             # gets its own full warmup + cosine schedule
  ))
  c.batch_size = 64
  c.modes = ConfigDict(dict(
      budget=400 if fast else 1000,
      modes='function_matching,fixed_teacher' if fast else ','.join(TEACHING_MODES),
  ))
  c.patience = ConfigDict(dict(
      budgets=(100, 400) if fast else (100, 300, 1000, 3000),
      modes='function_matching' if fast else 'function_matching,fixed_teacher',
  ))
  c.resolution = ConfigDict(dict(teacher_resolutions=(12, 16), budget=1000))
  c.optimizer = ConfigDict(dict(
      adam_budgets=(100, 300, 1000, 3000),
      shampoo_budgets=(100, 300, 1000),
      adam_lrs=(3e-3, 1e-2, 3e-2),
      shampoo_lrs=(3e-3, 1e-2, 3e-2),
      grid_seeds=1,               # the lr of each (optimizer, budget) is chosen on these seeds
      shampoo=ConfigDict(SHAMPOO_OPTIONS),
  ))
  c.shampoo_options = ConfigDict(dict(budget=300, variants=','.join(SHAMPOO_VARIANTS)))
  return c
