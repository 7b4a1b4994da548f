"""Config defaults: every field, its default and what it means.

A config file (configs/*.py) builds its ConfigDict from `base_config()` and `stage_config()`, so
every field has a default and a comment here, and command-line overrides of unknown keys fail.
The checks of a config's values live in `bigkd.plan`; a failed check raises `ConfigError` with
one line naming the problem, which the entry points turn into exit code 2 before any work.
"""
import inspect
import re
import sys

import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A bad config or input, reported as one line and exit code 2."""


def base_config() -> ConfigDict:
  c = ConfigDict()
  c.seed = 0                      # seeds init, batch order and augmentation
  c.batch_size = 128              # global batch size, for every stage that does not set its own
  c.eval_batch_size = 256         # global batch size of evaluation
  c.teacher_dtype = 'bfloat16'    # teacher forward dtype (inference only)
  c.log_every = 50                # steps between metric logs (the only per-step host sync)
  c.log_views = True              # distilled stages: TensorBoard image `views`, the teacher and
                                  # student views of step 1 under each teaching mode (about a
                                  # second of compile on a CPU)
  c.grad_accum_steps = 1          # microbatches per step (same update, 1/k activation memory)
  c.eval_every = 0                # steps between val/test evaluations; 0: only at the end
  c.checkpoint_every = 500        # steps between checkpoints (and always at the end)
  c.keep_checkpoints = 2          # checkpoints kept per stage
  c.data = ConfigDict(dict(
      source='digits',            # digits | tfds | folder | records (bigkd.prepare's output)
      name='',                    # tfds dataset name (source='tfds')
      data_dir='',                # tfds data_dir, image folder root, or bigkd.prepare's --out
      base_size=32,               # canvas side: each image is resized so its long side is this
                                  # (aspect kept); crops are taken over the whole image. 0
                                  # (source=folder): from the images' median long side, between
                                  # the largest model resolution and 4/3 of it
      num_classes=0,              # 0: the source's class count (digits: max train label + 1)
      train_split='train', val_split='val', test_split='test',  # split names of the source
                                  # (tfds split strings such as 'train[:90%]' work too)
      device_resident=True,       # True: decoded once, held on the devices; False: streamed,
                                  # each process reading and decoding only its rows per step
      shard_resident=False,       # resident images: False replicated on every device (fastest
                                  # gather); True split by rows over devices and processes
      reader_threads=4,           # streamed: steps read and decoded in parallel per process
      eval_crop_fraction=0.0,     # evaluation view: central crop of this fraction of the short
                                  # side (resize_small(S) + central_crop(R): R/S); 0: whole image
  ))
  c.augment = ConfigDict(dict(
      crop_sampler='uniform_area',  # uniform_area: area ~ U(crop_area), log aspect ~ U, 10
                                  # attempts | tf: tf.image.sample_distorted_bounding_box as in
                                  # the paper's code (integer heights, uniform aspect)
      crop_area=(0.08, 1.0),      # inception crop: area fraction range
      crop_aspect=(3 / 4, 4 / 3),  # inception crop: aspect ratio range (box width / height)
      crop_attempts=100,          # crop_sampler=tf: attempts before the whole image is used
      flip=True,                  # random horizontal flips
      mixup_alpha=1.0,            # Beta(α, α) mixup (function matching; supervised if > 0)
      mixup_per_example=False,    # False: one mixup weight per batch, as in the paper's code
  ))
  c.optimizer = ConfigDict(dict(
      name='adam',                # adam | sgd | shampoo | muon
      lr=1e-3,                    # peak learning rate
      schedule='cosine',          # cosine | constant, after a linear warmup
      warmup_steps=0,             # linear warmup length in steps ...
      warmup_epochs=0.0,          # ... or in epochs (used when > 0)
      b1=0.9, b2=0.999, eps=1e-8,  # Adam (b1, b2 also Shampoo's momentum / statistics decay)
      mu_dtype='float32',         # dtype of Adam's first moment (bfloat16 saves memory)
      momentum=0.9, nesterov=False,  # SGD
      weight_decay=0.0,           # decoupled, kernels only; see weight_decay_scaled_by_lr
      weight_decay_scaled_by_lr=True,  # True: decay per step = lr(t)·weight_decay (optax.adamw);
                                  # False: weight_decay·lr(t)/lr, the schedule's shape only
                                  # (big_vision, the paper's code): overriding lr keeps the decay
      clip_norm=1.0,              # global-norm gradient clipping; 0: off
      skip_nonfinite_updates=False,  # True: a step with NaN/Inf gradients leaves params and
                                  # opt state unchanged (counted: metric skipped_updates); too
                                  # many in a row, or False: the run stops (exit 3)
      shampoo=ConfigDict(_shampoo_defaults()),  # options of bigkd.optim.shampoo
  ))
  c.mesh = ConfigDict(dict(
      data=-1,                    # data-parallel axis size; -1: the rest of the devices
      fsdp=1,                     # axis whose members also split large params and their opt state
      min_fsdp_size=2 ** 18,      # params with fewer elements stay replicated on the fsdp axis
  ))
  c.stages = ConfigDict()         # name -> stage_config(...)
  c.stage_order = ''              # comma-separated stage names, run in this order
  c.allowed_changes = ''          # comma-separated fields (or prefixes: 'optimizer') that may
                                  # differ from the workdir's config.json on a re-run. Without
                                  # it only log_every, log_views, eval_every,
                                  # checkpoint_every, keep_checkpoints, eval_batch_size,
                                  # data.data_dir, data.reader_threads and mesh.* may
                                  # (bigkd.workdir.SAFE_TO_CHANGE);
                                  # a started stage's model and a finished stage's steps
                                  # never change, even when listed (use a new workdir)
  return c


def _shampoo_defaults() -> dict:
  try:
    from bigkd.optim.shampoo import default_shampoo_options
  except ImportError:
    return {}
  return default_shampoo_options()


def stage_config(model: str, resolution: int, teachers=None, **overrides) -> ConfigDict:
  """One stage. `teachers`: {name: source} where source is an earlier stage's name, a bigkd
  run's stage folder, or a BiT .npz file (then also give model and resolution as a dict)."""
  s = ConfigDict(dict(
      model=model,                # registry name of the model this stage trains
      model_kwargs=ConfigDict(),  # extra model arguments (e.g. remat=True for BiT)
      resolution=resolution,      # its input resolution
      init='',                    # '' (random), a bigkd stage folder, or a .npz to start from
      steps=0,                    # training length in steps ...
      epochs=0.0,                 # ... or in epochs (used when > 0)
      batch_size=0,               # 0: the global config.batch_size
      grad_accum_steps=0,         # 0: the global config.grad_accum_steps
      teaching_mode='function_matching',  # fixed_teacher | independent_noise | consistent | function_matching
      loss='kl',                  # kl | hard_pseudo | logit_l2
      temperature=1.0,            # distillation temperature T (the KL is scaled by T²)
      label_weight=0.0,           # Hinton α: α·CE(labels) + (1−α)·distillation; 1 = supervised
      ensemble='logits',          # logits | probs: how several teachers are combined
      optimizer=ConfigDict(),     # overrides of config.optimizer for this stage
      augment=ConfigDict(),       # overrides of config.augment for this stage
      feature_pairs=(),           # (student tap, teacher tap) pairs that the feature losses
                                  # (fitnet, at, sp, pkt, rkd_*) compare: 'student.TAP' and
                                  # 'TEACHER.TAP', TEACHER a name in teachers, TAP a feature
                                  # of the model (stage1, stage2, ..., prelogits), e.g.
                                  # (('student.stage2', 'teacher.stage3'),); a third string
                                  # 'LOSS,LOSS' limits a pair to those losses (default: every
                                  # weighted one). Each loss sums over its pairs; features are
                                  # taken on the views the logits see (function matching)
      cka_pairs=(),               # pairs (as feature_pairs) whose linear CKA the evaluation
                                  # reports (val_cka, test_cka: mean over the pairs, and one
                                  # value per pair when several); (): the feature_pairs
  ))
  # The training loss: the sum of weight x term over the terms with a weight (the default:
  # today's logit loss alone). A distilled stage only; unweighted terms are never computed.
  s.loss_weights = ConfigDict(dict(
      kl=1.0,                     # the logit loss above (loss, temperature, label_weight:
                                  # α·CE(labels) + (1−α)·T²·KL at the default loss='kl')
      labels=0.0,                 # cross-entropy on the (mixed) labels, outside Hinton's α
      fitnet=0.0,                 # FitNets hints: mean squared error of the student feature
                                  # (through a 1x1 conv + norm adapter where shapes differ,
                                  # trained with the student, never exported) vs the teacher's
      at=0.0,                     # attention transfer: L2 between normalised attention maps
                                  # (teacher map resized to the student's spatial size)
      sp=0.0,                     # similarity-preserving: batch similarity matrices
      pkt=0.0,                    # probabilistic KT: cosine-kernel conditional distributions
      rkd_distance=0.0,           # RKD distance-wise (the paper: 25); vector taps (prelogits)
      rkd_angle=0.0,              # RKD angle-wise (the paper: 50); vector taps (prelogits)
      dkd=0.0,                    # decoupled KD on the logits (target class: label argmax)
      dist=0.0,                   # DIST: Pearson relations of the logits' probabilities
  ))
  s.loss_options = ConfigDict(dict(
      at_p=2.0,                   # attention map: mean over channels of |feature|^p
      dkd_alpha=1.0, dkd_beta=8.0,  # DKD: weights of the target / non-target class terms
      dkd_temperature=4.0,        # DKD temperature (the loss is scaled by T²)
      dkd_warmup_steps=0,         # DKD weight ramped in linearly over these steps; 0: none
      dist_beta=1.0, dist_gamma=1.0,  # DIST: weights of the inter- / intra-class relations
      dist_temperature=1.0,       # DIST temperature τ (the loss is scaled by τ²)
  ))
  s.teachers = ConfigDict()
  for name, source in (teachers or {}).items():
    spec = source if isinstance(source, dict) else dict(source=source)
    s.teachers[name] = ConfigDict(dict(
        source=spec['source'],    # an earlier stage, a bigkd stage folder, or a .npz file
        model=spec.get('model', ''),  # '' : from the stage / stage.json
        model_kwargs=ConfigDict(spec.get('model_kwargs', {})),  # its model's extra arguments
        resolution=spec.get('resolution', 0)))  # 0 : from the stage / stage.json
  for key, value in overrides.items():
    if key not in s:
      raise ConfigError(f'stage_config: unknown field {key!r}')
    if key in FIELD_GROUPS:  # set the named fields, keep the other defaults
      for name, field in value.items():
        if name not in s[key]:
          raise ConfigError(f'stage_config: unknown field {key}.{name!r} (known: '
                            f'{", ".join(s[key])})')
        s[key][name] = field
    else:
      s[key] = ConfigDict(value) if isinstance(value, dict) else value
  return s


# Stage fields that are groups of fields with defaults: a stage_config(...) argument such as
# loss_weights=dict(fitnet=1.0) sets those fields and keeps the others' defaults.
FIELD_GROUPS = ('loss_weights', 'loss_options')


def comma_list(text: str) -> list[str]:
  """'a, b,,c' -> ['a', 'b', 'c']: the comma-separated names config strings hold."""
  return [name.strip() for name in text.split(',') if name.strip()]


def stage_names(config: ConfigDict) -> list[str]:
  """The stages to run, in order (ConfigDict sorts its keys, so the order is explicit)."""
  return comma_list(config.stage_order)


def merged(defaults: ConfigDict, overrides: ConfigDict, where: str) -> dict:
  """`defaults` updated with a stage's `overrides`, which may only name existing keys."""
  out = defaults.to_dict()
  for key, value in overrides.items():
    if key not in out:
      raise ConfigError(f'{where}.{key}: unknown key (known: {", ".join(sorted(out))})')
    out[key] = value.to_dict() if isinstance(value, ConfigDict) else value
  return out


def field_docs() -> dict[str, str]:
  """{field: the comment next to its default in this file}. The comments are the fields'
  documentation (`--fields` prints them), so they are read from here rather than written twice.
  Stage fields are keyed 'stages.*.x', a teacher's 'stages.*.teachers.*.x'."""
  docs, section, last = {}, '', None
  for line in inspect.getsource(sys.modules[__name__]).splitlines():
    code, _, comment = line.partition('# ')
    if not code.strip() and last and comment:  # a comment line continues the one above
      for key in last:
        docs[key] += ' ' + comment.strip()
      continue
    last = []
    opened = re.match(r'\s*(c\.(\w+)|s|s\.teachers\[name\]|s\.(\w+)) = ConfigDict\(dict\(',
                      code)
    if opened:
      section = ({'s': 'stages.*.', 's.teachers[name]': 'stages.*.teachers.*.'}.get(opened[1])
                 or (f'stages.*.{opened[3]}.' if opened[3] else f'{opened[2]}.'))
      continue
    top = re.match(r'\s*c\.(\w+) =', code)
    if top:
      section = ''
    names = [top[1]] if top else re.findall(r'(?<![=!<>\w])(\w+)=(?!=)', code)
    if comment and names and (top or section):
      last = [section + name for name in names]
      docs.update((key, comment.strip()) for key in last)
  return docs


def field_key(path: str) -> str:
  """The key of a resolved config field in `field_docs` ('stages.student.teachers.t.model' ->
  'stages.*.teachers.*.model'; a stage's optimizer/augment override -> the global field's)."""
  parts = path.split('.')
  if parts[0] == 'stages' and len(parts) > 2:
    parts[1] = '*'
    if parts[2] == 'teachers' and len(parts) > 4:
      parts[3] = '*'
    if parts[2] in ('optimizer', 'augment') and len(parts) > 3:
      parts = parts[2:]
  return '.'.join(parts)


def field_doc(path: str, docs: dict) -> str:
  key = field_key(path)
  if key.startswith('optimizer.shampoo.'):
    return 'Shampoo option (see bigkd.optim.shampoo.shampoo)'
  return docs.get(key, '')


def flatten(tree: dict, prefix: str = '') -> dict:
  """{dotted.name: leaf} of nested dicts (an empty dict is a leaf)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(flatten(value, f'{prefix}{key}.'))
    else:
      out[prefix + key] = value
  return out


MISSING = object()


def describe_fields(config: ConfigDict) -> str:
  """Every field of a resolved config: its value, the default where it differs, and what it
  means (the comments of this file): what `--fields` prints."""
  docs = field_docs()
  defaults = flatten(base_config().to_dict())
  stage_defaults = flatten(stage_config('', 0).to_dict())
  order = {key: i for i, key in enumerate(docs)}
  stages = stage_names(config)

  def position(path):  # the global fields, then each stage's, in the order of this file
    parts = path.split('.')
    stage = stages.index(parts[1]) if parts[0] == 'stages' and parts[1] in stages else -1
    key = '.'.join(parts[2:] if parts[2:3] in (['optimizer'], ['augment']) else parts)
    return stage, order.get(field_key(key), len(order)), path

  def default_of(path):  # a stage's optimizer/augment overrides default to the global field
    parts = path.split('.')
    if parts[0] != 'stages' or len(parts) < 3:
      return defaults.get(path, MISSING)
    if parts[2] in ('optimizer', 'augment') and len(parts) > 3:
      return defaults.get('.'.join(parts[2:]), MISSING)
    return stage_defaults.get('.'.join(parts[2:]), MISSING)

  lines = []
  for path, value in sorted(flatten(config.to_dict()).items(), key=lambda kv: position(kv[0])):
    default = default_of(path)
    shown = f'{path} = {value!r}' + ('' if default in (value, MISSING) else
                                     f'  (default {default!r})')
    doc = field_doc(path, docs)
    lines.append(f'{shown:<58} {("# " + doc) if doc else ""}'.rstrip())
  return '\n'.join(lines)
