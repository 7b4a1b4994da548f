"""Shared pieces of the configs reproducing Beyer et al. 2022 (arXiv:2106.05237): BiT-M-R152x2
teachers distilled into a BiT-R50x1 student by function matching.

The paper (Sec. 3) fixes the recipe: Adam, cosine decay after a linear warmup, clipping at 1.0,
batch 512 (4096 on ImageNet), inception crops, flips, mixup, KL. Per-dataset learning rates,
weight decays, temperatures, epochs and warmups are those released with the paper (big_vision
`configs/proj/distill/*.py`). Their weight decay is big_vision's, `wd · schedule(t)`, not scaled
by the base learning rate: the configs keep `weight_decay = wd` with
`weight_decay_scaled_by_lr = False`, so overriding `optimizer.lr` keeps the paper's decay.
Variant strings (`[PRESET|DATASET][,BUDGET][,epochs=N][,init[=PATH.npz]]`) are parsed here; each
config's docstring lists its own. Teacher and init paths are placeholders that the trainer
refuses until overridden (e.g. `--config.stages.student.teachers.teacher.source=/data/x.npz`).
"""
import math

from bigkd.config import base_config, comma_list, stage_config

PLACEHOLDER_DIR = '/path/to/bit_models'
TEACHER_MODEL = 'bit_r152x2'     # BiT-M-R152x2: ImageNet-21k pre-trained, fine-tuned per dataset
STUDENT_MODEL = 'bit_r50x1'      # BiT-R50x1, trained from scratch (random init) unless `init`
STUDENT_INIT_FILE = 'BiT-M-R50x1.npz'  # the public ImageNet-21k BiT-M-R50x1 (21,843-class head)


def placeholder(filename: str) -> str:
  return f'{PLACEHOLDER_DIR}/{filename}'


def parse_variant(variant, config, slots, init_default=None):
  """Reads a variant string: its leading names, then the options `epochs=N`, `init[=PATH]`.

  `config`: the config file, for messages. `slots`: [(label, allowed names, default)], the
  leading names in order; a slot whose default is None must be given. Returns
  ({label: name}, {'epochs': float, 'init': str}) with only the options given (a bare `init` is
  `init_default`, by default the placeholder of the public BiT-M-R50x1); anything else is a
  one-line ValueError naming the allowed values and the variant grammar.
  """
  grammar = ''
  for label, _, default in slots:
    name = (',' if grammar else '') + label.upper()
    grammar += name if default is None else f'[{name}]'
  grammar += '[,epochs=N][,init[=PATH.npz]]'

  def fail(problem):
    raise ValueError(f'{config}:{variant}: {problem} (variants: {grammar})' if variant else
                     f'{config} without a variant: {problem} (variants: {grammar})')

  tokens = comma_list(variant or '')
  names = {}
  for label, allowed, default in slots:
    if tokens and '=' not in tokens[0] and tokens[0] != 'init':
      names[label] = tokens.pop(0)
      if names[label] not in allowed:
        fail(f'unknown {label} {names[label]!r}; {label}s: {", ".join(allowed)}')
    elif default is None:
      fail(f'no {label} given; {label}s: {", ".join(allowed)}')
    else:
      names[label] = default
  options = {}
  for token in tokens:
    key, _, value = token.partition('=')
    key = key.strip()
    if key == 'epochs':
      try:
        options['epochs'] = float(value)
      except ValueError:
        options['epochs'] = math.nan
      if not 0 < options['epochs'] < math.inf:
        fail(f'option {token!r}: epochs must be a positive number')
    elif key == 'init':
      options['init'] = value.strip() or init_default or placeholder(STUDENT_INIT_FILE)
    else:
      fail(f'unknown option {token!r}; options: epochs=N, init[=PATH.npz]')
  return names, options


def canvas_size(resolution: int) -> int:
  """The canvas (long side of each stored or streamed image) for models up to `resolution`:
  4/3 of it, rounded up to a multiple of 32, so that a 4:3 photo's short side still holds the
  whole `resolution` and a full-image crop is not an upsample."""
  return 32 * math.ceil(resolution * 4 / 3 / 32)


def distill_config(*, dataset, num_classes, splits, base_size, device_resident, batch_size,
                   eval_batch_size, teachers, student_resolution, epochs, lr, paper_wd,
                   temperature, warmup_steps, log_every, eval_every, checkpoint_every,
                   eval_crop_fraction, init='', ensemble='probs', teacher_model=TEACHER_MODEL,
                   student_model=STUDENT_MODEL):
  """One stage, `student`: `student_model` (BiT-R50x1) distilled by function matching from
  `teachers` ({name: (.npz path, resolution)}, `teacher_model` each: BiT-M-R152x2)."""
  c = base_config()
  c.batch_size = batch_size                 # paper Sec. 3: 512; 4096 on ImageNet
  c.eval_batch_size = eval_batch_size
  c.teacher_dtype = 'bfloat16'              # teacher inference in bf16
  c.log_every = log_every
  c.eval_every = eval_every
  c.checkpoint_every = checkpoint_every
  c.keep_checkpoints = 2
  c.data.source = 'tfds'
  c.data.name = dataset
  c.data.data_dir = ''                      # set with --config.data.data_dir=/path/to/tfds
  c.data.base_size = base_size
  c.data.num_classes = num_classes          # explicit: the teacher's head has this many classes
  c.data.train_split, c.data.val_split, c.data.test_split = splits
  c.data.device_resident = device_resident
  # Released eval: resize_small(S) then central_crop(R) (256 -> 224 on ImageNet, 160 -> 128).
  c.data.eval_crop_fraction = eval_crop_fraction
  # Paper Sec. 3 / released code: inception crop + flip, mixup with one Beta(1, 1) weight per
  # batch ("mixup=dict(p=1.0)"), the same crop/flip/mixup for teacher and student. The crop is
  # big_vision's (decode_jpeg_and_)inception_crop: tf.image.sample_distorted_bounding_box with
  # area_range (5%, 100%), aspect_ratio_range (0.75, 1.33), 100 attempts, whole image as fallback.
  c.augment.crop_sampler = 'tf'
  c.augment.crop_area = (0.05, 1.0)
  c.augment.crop_aspect = (0.75, 1.33)
  c.augment.crop_attempts = 100
  c.augment.flip = True
  c.augment.mixup_alpha = 1.0
  c.augment.mixup_per_example = False
  # Paper Sec. 3: Adam (default betas), cosine schedule with linear warmup, clip 1.0.
  c.optimizer.name = 'adam'
  c.optimizer.lr = lr
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = warmup_steps
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.999, 1e-8
  c.optimizer.mu_dtype = 'bfloat16'         # released code: scale_by_adam(mu_dtype='bfloat16')
  c.optimizer.weight_decay = paper_wd       # as released, in big_vision's convention:
  c.optimizer.weight_decay_scaled_by_lr = False  # decay wd·lr(t)/lr, see the docstring
  c.optimizer.clip_norm = 1.0
  c.stages.student = stage_config(
      student_model, student_resolution, epochs=epochs, init=init,
      teachers={name: dict(source=path, model=teacher_model, resolution=res)
                for name, (path, res) in teachers.items()},
      teaching_mode='function_matching', loss='kl', temperature=temperature,
      label_weight=0.0, ensemble=ensemble, compute_dtype='bfloat16')
  c.stage_order = 'student'
  return c


# --- configs/bit_transfer.py: Flowers102, Pets, Food101, SUN397. ----------------------------
# Teachers fine-tuned at 128 px, student at 128 px.

# Released settings (big_vision bigsweep_flowers_pet.py / bigsweep_food_sun.py, "recommended
# settings from Fig3/Tab4 of the paper"): epochs, lr, weight decay (big_vision convention) and
# KL temperature for each training budget.
TRANSFER_DATASETS = {
    'flowers': dict(
        tfds='oxford_flowers102', num_classes=102, teacher='R152x2_T_flowers128.npz',
        splits=('train', 'validation', 'test'), device_resident=True,
        budgets=dict(fast=dict(epochs=10_000, lr=3e-3, wd=3e-4, temperature=10.0),
                     medium=dict(epochs=100_000, lr=1e-3, wd=1e-4, temperature=1.0),
                     long=dict(epochs=1_000_000, lr=3e-4, wd=1e-5, temperature=1.0))),
    'pets': dict(
        tfds='oxford_iiit_pet', num_classes=37, teacher='R152x2_T_pet128.npz',
        splits=('train[:90%]', 'train[90%:]', 'test'), device_resident=True,
        budgets=dict(fast=dict(epochs=1_000, lr=1e-2, wd=1e-3, temperature=5.0),
                     medium=dict(epochs=3_000, lr=3e-3, wd=3e-4, temperature=10.0),
                     long=dict(epochs=30_000, lr=3e-3, wd=1e-5, temperature=2.0))),
    'food': dict(
        tfds='food101', num_classes=101, teacher='R152x2_T_food128.npz',
        splits=('train[:90%]', 'train[90%:]', 'validation'), device_resident=False,
        budgets=dict(fast=dict(epochs=100, lr=1e-2, wd=1e-3, temperature=10.0),
                     medium=dict(epochs=1_000, lr=1e-3, wd=3e-4, temperature=10.0),
                     long=dict(epochs=3_000, lr=1e-2, wd=1e-4, temperature=5.0))),
    'sun': dict(
        tfds='sun397', num_classes=397, teacher='R152x2_T_sun128.npz',
        splits=('train', 'validation', 'test'), device_resident=False,
        budgets=dict(fast=dict(epochs=100, lr=1e-2, wd=1e-3, temperature=10.0),
                     medium=dict(epochs=1_000, lr=1e-3, wd=1e-4, temperature=10.0),
                     long=dict(epochs=3_000, lr=1e-2, wd=3e-5, temperature=10.0))),
}
BUDGETS = ('fast', 'medium', 'long')
TRANSFER_RESOLUTION = 128  # teachers released at 128 px ("rc128"); student trained/evaluated at 128
TRANSFER_EVAL_FRACTION = 128 / 160  # released eval: resize_small(160) then central_crop(128)


def transfer_config(variant):
  """configs/bit_transfer.py: 'DATASET[,BUDGET][,epochs=N][,init[=PATH.npz]]', DATASET one of
  flowers | pets | food | sun, BUDGET one of fast (the default) | medium | long."""
  names, options = parse_variant(variant, 'configs/bit_transfer.py',
                                 [('dataset', tuple(TRANSFER_DATASETS), None),
                                  ('budget', BUDGETS, 'fast')])
  spec = TRANSFER_DATASETS[names['dataset']]
  hp = spec['budgets'][names['budget']]
  return distill_config(
      dataset=spec['tfds'], num_classes=spec['num_classes'], splits=spec['splits'],
      base_size=canvas_size(TRANSFER_RESOLUTION), eval_crop_fraction=TRANSFER_EVAL_FRACTION,
      device_resident=spec['device_resident'], batch_size=512,
      eval_batch_size=512,
      teachers={'teacher': (placeholder(spec['teacher']), TRANSFER_RESOLUTION)},
      student_resolution=TRANSFER_RESOLUTION, epochs=options.get('epochs', hp['epochs']),
      lr=hp['lr'], paper_wd=hp['wd'], temperature=hp['temperature'], warmup_steps=1500,
      log_every=100, eval_every=5000, checkpoint_every=2500, init=options.get('init', ''))
