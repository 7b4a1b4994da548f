"""Config defaults: every field, its default and what it means.

A config file (configs/*.py) builds its ConfigDict from `base_config()` and `stage_config()`, so
every field has a default and a meaning (the tables below, which `--fields` prints), and
command-line overrides of unknown keys fail. The checks of a config's values live in
`bigkd.plan`; a failed check raises `ConfigError` with one line naming the problem, which the
entry points turn into exit code 2 before any work.
"""
import ml_collections

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
  """A bad config or input, reported as one line and exit code 2."""


# Fields that may differ from a workdir's config.json on a re-run (`bigkd.workdir`): they change
# how a run is watched, saved or laid out, never what it computes (N devices = 1 device is
# tested; the data may move). A prefix ('mesh') covers every field under it; '*' stands for any
# one name (a stage's). `--fields` marks them; anything else needs config.allowed_changes.
SAFE_TO_CHANGE = ('log_every', 'log_views', 'tensorboard', 'eval_every', 'checkpoint_every',
                  'keep_checkpoints', 'eval_batch_size', 'data.data_dir', 'data.reader_threads',
                  'stages.*.train_data.*.data_dir', 'mesh', 'allowed_changes')


def covered(field: str, names) -> bool:
  """Whether dotted `field` is one of `names` or lies under one of them ('*': any one name)."""
  parts = field.split('.')
  return any(len(parts) >= len(pattern) and all(p in ('*', q) for p, q in zip(pattern, parts))
             for pattern in (name.split('.') for name in names))


SHAMPOO = 'SHAMPOO'  # stands for `optim.shampoo.default_shampoo_options()` in RUN_FIELDS

# (field, default, meaning): the run's fields, a stage's and a stage's teacher's.
RUN_FIELDS = (
    ('seed', 0, 'seeds init, batch order and augmentation'),
    ('batch_size', 128, 'global batch size, for every stage that does not set its own'),
    ('eval_batch_size', 256, 'global batch size of evaluation'),
    ('teacher_dtype', 'bfloat16', 'teacher forward dtype (inference only)'),
    ('log_every', 50, 'steps between metric logs (the only per-step host sync)'),
    ('log_views', True,
     'distilled stages: TensorBoard image `views`, the teacher and student views of step 1 '
     'under each teaching mode (about a second of compile on a CPU)'),
    ('tensorboard', True, "TensorBoard event files in each stage folder (written by "
     "TensorFlow's file system: local or gs://; metrics.jsonl is always written)"),
    ('grad_accum_steps', 1, 'microbatches per step (same update, 1/k activation memory)'),
    ('eval_every', 0, 'steps between val/test evaluations; 0: only at the end'),
    ('checkpoint_every', 500, 'steps between checkpoints (and always at the end)'),
    ('keep_checkpoints', 2, 'checkpoints kept per stage'),
    ('data.source', 'digits', "digits | tfds | folder | records (bigkd.prepare's output)"),
    ('data.name', '', "tfds dataset name (source='tfds')"),
    ('data.data_dir', '', "tfds data_dir, image folder root, or bigkd.prepare's --out"),
    ('data.base_size', 32,
     'canvas side: each image is resized so its long side is this (aspect kept); crops are '
     "taken over the whole image. 0 (source=folder): from the images' median long side, "
     'between the largest model resolution and 4/3 of it'),
    ('data.num_classes', 0, "0: the source's class count (digits: max train label + 1)"),
    ('data.classes', '',
     "digits: only these classes, e.g. '0-4' or '1,3,5-7' (labels keep their digit values, so "
     "'0-4' is a 5-class task); '': all"),
    ('data.train_split', 'train',
     "split names of the source (tfds split strings such as 'train[:90%]' work too)"),
    ('data.val_split', 'val',
     "split names of the source (tfds split strings such as 'train[:90%]' work too)"),
    ('data.test_split', 'test',
     "split names of the source (tfds split strings such as 'train[:90%]' work too)"),
    ('data.device_resident', True,
     'True: decoded once, held on the devices; False: streamed, each process reading and '
     'decoding only its rows per step'),
    ('data.shard_resident', False,
     'resident images: False replicated on every device (fastest gather); True split by rows '
     'over devices and processes'),
    ('data.reader_threads', 4, 'streamed: steps read and decoded in parallel per process'),
    ('data.eval_crop_fraction', 0.0,
     'evaluation view: central crop of this fraction of the short side (resize_small(S) + '
     'central_crop(R): R/S); 0: whole image'),
    ('augment.crop_sampler', 'uniform_area',
     'uniform_area: area ~ U(crop_area), log aspect ~ U, 10 attempts | tf: '
     "tf.image.sample_distorted_bounding_box as in the paper's code (integer heights, uniform "
     'aspect)'),
    ('augment.crop_area', (0.08, 1.0), 'inception crop: area fraction range'),
    ('augment.crop_aspect', (3 / 4, 4 / 3),
     'inception crop: aspect ratio range (box width / height)'),
    ('augment.crop_attempts', 100, 'crop_sampler=tf: attempts before the whole image is used'),
    ('augment.flip', True, 'random horizontal flips'),
    ('augment.mixup_alpha', 1.0, 'Beta(α, α) mixup (function matching; supervised if > 0)'),
    ('augment.mixup_per_example', False,
     "False: one mixup weight per batch, as in the paper's code"),
    ('optimizer.name', 'adam', 'adam | sgd | shampoo | muon'),
    ('optimizer.lr', 0.001, 'peak learning rate'),
    ('optimizer.schedule', 'cosine', 'cosine | constant, after a linear warmup'),
    ('optimizer.warmup_steps', 0, 'linear warmup length in steps ...'),
    ('optimizer.warmup_epochs', 0.0, '... or in epochs (used when > 0)'),
    ('optimizer.b1', 0.9, "Adam (b1, b2 also Shampoo's momentum / statistics decay)"),
    ('optimizer.b2', 0.999, "Adam (b1, b2 also Shampoo's momentum / statistics decay)"),
    ('optimizer.eps', 1e-8, "Adam (b1, b2 also Shampoo's momentum / statistics decay)"),
    ('optimizer.mu_dtype', 'float32', "dtype of Adam's first moment (bfloat16 saves memory)"),
    ('optimizer.momentum', 0.9, 'SGD'),
    ('optimizer.nesterov', False, 'SGD'),
    ('optimizer.weight_decay', 0.0, 'decoupled, kernels only; see weight_decay_scaled_by_lr'),
    ('optimizer.weight_decay_scaled_by_lr', True,
     'True: decay per step = lr(t)·weight_decay (optax.adamw); False: weight_decay·lr(t)/lr, '
     "the schedule's shape only (big_vision, the paper's code): overriding lr keeps the decay"),
    ('optimizer.clip_norm', 1.0, 'global-norm gradient clipping; 0: off'),
    ('optimizer.skip_nonfinite_updates', False,
     'True: a step with NaN/Inf gradients leaves params and opt state unchanged (counted: '
     'metric skipped_updates); too many in a row, or False: the run stops (exit 3)'),
    ('optimizer.shampoo', SHAMPOO, 'options of bigkd.optim.shampoo'),
    ('mesh.data', -1, 'data-parallel axis size; -1: the rest of the devices'),
    ('mesh.fsdp', 1, 'axis whose members also split large params and their opt state'),
    ('mesh.min_fsdp_size', 2 ** 18, 'params with fewer elements stay replicated on the fsdp axis'),
    ('stages', {}, 'name -> stage_config(...)'),
    ('stage_order', '', 'comma-separated stage names, run in this order'),
    ('allowed_changes', '',
     "comma-separated fields (or prefixes: 'optimizer') that may differ from the workdir's "
     "config.json on a re-run, besides those marked [safe to change]; a started stage's "
     "model and a finished stage's steps never change, even when listed (use a new workdir)"),
)

STAGE_FIELDS = (
    ('model', '', "registry name of the model this stage trains ('' for a stage with peers)"),
    ('model_kwargs', {},
     "extra model arguments (e.g. remat=True for BiT and ViT; pool='gap' for ViT)"),
    ('resolution', 0, 'its input resolution'),
    ('compute_dtype', 'float32',
     "dtype of this stage's convolutions and matmuls (bfloat16 on accelerators); parameters, "
     'optimiser state, logits, losses and normalisation statistics stay float32'),
    ('init', '', "'' (random), a bigkd stage folder, or a .npz to start from"),
    ('steps', 0, 'training length in steps ...'),
    ('epochs', 0.0, '... or in epochs (used when > 0)'),
    ('batch_size', 0, '0: the global config.batch_size'),
    ('grad_accum_steps', 0, '0: the global config.grad_accum_steps'),
    ('teaching_mode', 'function_matching',
     'fixed_teacher | independent_noise | consistent | function_matching'),
    ('loss', 'kl', 'kl | hard_pseudo | logit_l2'),
    ('temperature', 1.0, 'distillation temperature T (the KL is scaled by T²)'),
    ('label_weight', 0.0, 'Hinton α: α·CE(labels) + (1−α)·distillation; 1 = supervised'),
    ('ensemble', 'logits', 'logits | probs: how several teachers are combined'),
    ('teacher_cache', '',
     "fixed_teacher only: a folder (local or gs://) of the teachers' logits on the train split, "
     'computed once (resumably) before the stage if absent, then read instead of running the '
     'teachers at each step; refused when made for other teachers, weights or data'),
    ('teacher_cache_top_k', 0,
     "0: the cache keeps the full logits (exact); k: each image's k most likely classes, the "
     'rest of the probability spread evenly (an approximation, smaller)'),
    ('train_data', {},
     "{name: source} (fields below): where this stage's training images come from, e.g. an "
     'unlabeled image folder, another dataset or split, other digit classes, or a mixture: each '
     "batch takes a fixed number of rows from each source (by weight), the rows' order shuffled "
     'per step, all a pure function of (seed, step). {}: the train split of the data block. '
     "Evaluation stays on the data block's val/test splits; epochs and warmup_epochs count the "
     'examples of all the sources'),
    ('peers', {},
     '{name: {model, resolution, model_kwargs}} (PEER_FIELDS): deep mutual learning (online '
     'distillation, Zhang et al. 2018): K >= 2 models trained together in one step on the same '
     'augmented batch (the same crop box rendered at each resolution), each on CE(labels) + '
     'mutual_kl·T²·KL(the others\' mean prediction ‖ its own), each with its own parameters, '
     'optimiser state (the stage\'s optimizer, gradients clipped per peer) and metrics '
     '(`PEER/...`), all computing in the stage\'s compute_dtype. The stage\'s model '
     "and resolution stay ''/0, it has no teachers; each peer is written as a stage folder "
     "STAGE/PEER that later stages name as a teacher (teachers={'t': 'STAGE/PEER'}) or init. "
     'Make it with `mutual_stage`. {}: an ordinary stage'),
    ('optimizer', {}, 'overrides of config.optimizer for this stage'),
    ('augment', {}, 'overrides of config.augment for this stage'),
    ('feature_pairs', (),
     '(student tap, teacher tap) pairs that the feature losses (fitnet, at, sp, pkt, rkd_*) '
     "compare: 'student.TAP' and 'TEACHER.TAP', TEACHER a name in teachers, TAP a feature of "
     "the model (stage1, stage2, ..., prelogits), e.g. (('student.stage2', "
     "'teacher.stage3'),); a third string 'LOSS,LOSS' limits a pair to those losses (default: "
     'every weighted one). Each loss sums over its pairs; features are taken on the views the '
     'logits see (function matching)'),
    ('self_taps', (),
     "the student's own spatial taps (e.g. ('stage1', 'stage2')) that get a shallow classifier "
     'for the self_* terms (be your own teacher; a stage with or without teachers)'),
    ('sftn_student', '',
     'student-friendly teacher (SFTN, Park et al. 2021): registry name of the student whose '
     'layers form the branches trained with this stage (a stage without teachers; its model is '
     'the teacher). Each branch maps this model\'s feature at a tap of sftn_taps through a '
     "transform (1x1 conv + norm + ReLU, resized to the student's map) into the student's "
     'layers after that tap; branches are trained with it and never exported. '
     "'': none. Weights: loss_weights.labels (λ_T), sftn_kl, sftn_ce (SFTN_LOSS_WEIGHTS)"),
    ('sftn_taps', (),
     "taps of both models where the branches start (e.g. ('stage1', 'stage2')): spatial "
     'features [H, W, C], each a block output of this model and of sftn_student'),
    ('sftn_resolution', 0,
     'the resolution sftn_student is laid out for (the shapes its branches take); 0: this '
     "stage's resolution"),
    ('cka_pairs', (),
     'pairs (as feature_pairs) whose linear CKA the evaluation reports (val_cka, test_cka: '
     'mean over the pairs, and one value per pair when several); (): the feature_pairs'),
    ('loss_weights.kl', 1.0,
     'the logit loss above (loss, temperature, label_weight: α·CE(labels) + (1−α)·T²·KL at '
     "the default loss='kl')"),
    ('loss_weights.labels', 0.0,
     "cross-entropy on the (mixed) labels, outside Hinton's α (a stage without teachers: "
     'weight 1, the only weight it takes, except an SFTN stage, where it is λ_T; 0: 1)'),
    ('loss_weights.fitnet', 0.0,
     'FitNets hints: mean squared error of the student feature (through a 1x1 conv + norm '
     "adapter where shapes differ, trained with the student, never exported) vs the teacher's"),
    ('loss_weights.at', 0.0,
     'attention transfer: L2 between normalised attention maps (of features of another size: '
     'see loss_options.at_match)'),
    ('loss_weights.sp', 0.0, 'similarity-preserving: batch similarity matrices'),
    ('loss_weights.pkt', 0.0, 'probabilistic KT: cosine-kernel conditional distributions '
     '(the reference code\'s form: its weights, e.g. 30000, apply as they are)'),
    ('loss_weights.rkd_distance', 0.0,
     'RKD distance-wise, as the reference code (the paper: 25); vector taps (prelogits)'),
    ('loss_weights.rkd_angle', 0.0,
     'RKD angle-wise, as the reference code (the paper: 50); vector taps (prelogits)'),
    ('loss_weights.crd', 0.0,
     'contrastive representation distillation: InfoNCE of embedding heads (trained with the '
     'student, never exported) against queues of earlier batches; vector taps (prelogits). '
     "The paper's weight with labels: 0.8"),
    ('loss_weights.self_ce', 0.0,
     'be your own teacher: cross-entropy of shallow classifiers on the student\'s self_taps '
     '(trained with it, never exported), summed over them'),
    ('loss_weights.self_kl', 0.0,
     'be your own teacher: T²·KL(final output ‖ each shallow classifier) at '
     'loss_options.self_temperature'),
    ('loss_weights.self_feature', 0.0,
     "be your own teacher: mean squared difference of each shallow classifier's embedding and "
     'the final one (prelogits)'),
    ('loss_weights.sftn_kl', 0.0,
     'SFTN: τ²·KL(this model ‖ each student branch) at loss_options.sftn_temperature, summed '
     'over the branches; gradients reach both sides (the paper: 3)'),
    ('loss_weights.sftn_ce', 0.0,
     'SFTN: cross-entropy of each student branch on the (mixed) labels, summed (the paper: 1)'),
    ('loss_weights.mutual_kl', 0.0,
     "stages with peers: each peer's T²·KL(mean of the other peers' probabilities ‖ its own) at "
     'loss_options.mutual_temperature, the others a target (no gradient flows into them), beside '
     "its cross-entropy on the labels (loss_weights.labels); mutual_stage sets both to 1 (the "
     'paper). 0: the peers train side by side, independently (the baseline, same batches). Only '
     'for stages with peers'),
    ('loss_weights.dkd', 0.0, 'decoupled KD on the logits (target class: label argmax)'),
    ('loss_weights.dist', 0.0, "DIST: Pearson relations of the logits' probabilities"),
    ('loss_options.at_p', 2.0, 'attention map: mean over channels of |feature|^p'),
    ('loss_options.at_match', 'pool',
     "AT between features of different spatial sizes: 'pool' the larger feature to the "
     "smaller's size (RepDistiller, mdistiller) or 'resize' the teacher's map to the student's"),
    ('loss_options.pkt_form', 'reference',
     "'reference' (the authors' code: mean over all b² pairs, self-pairs included) or "
     "'per_anchor' (self-pairs left out, mean of each anchor's KL: ~b× larger, the same size at "
     'any batch size)'),
    ('loss_options.crd_dim', 128, 'CRD: embedding size of the heads (the paper: 128)'),
    ('loss_options.crd_queue', 16384,
     'CRD: negatives, the rows of each queue (the paper: 16384); a multiple of the batch size, '
     'at most the training examples'),
    ('loss_options.crd_temperature', 0.07, 'CRD: temperature τ of the critic (the paper: 0.07)'),
    ('loss_options.self_temperature', 3.0, 'be your own teacher: the KL\'s temperature'),
    ('loss_options.sftn_temperature', 1.0, "SFTN: the KL's temperature τ (the paper: 1)"),
    ('loss_options.mutual_temperature', 1.0,
     'deep mutual learning: the temperature of the peers\' KL (the paper: 1)'),
    ('loss_options.dkd_alpha', 1.0, 'DKD: weights of the target / non-target class terms'),
    ('loss_options.dkd_beta', 8.0, 'DKD: weights of the target / non-target class terms'),
    ('loss_options.dkd_temperature', 4.0, 'DKD temperature (the loss is scaled by T²)'),
    ('loss_options.dkd_warmup_steps', 0, 'DKD weight ramped in linearly over these steps; 0: none'),
    ('loss_options.dist_beta', 1.0, 'DIST: weights of the inter- / intra-class relations'),
    ('loss_options.dist_gamma', 1.0, 'DIST: weights of the inter- / intra-class relations'),
    ('loss_options.dist_temperature', 1.0, 'DIST temperature τ (the loss is scaled by τ²)'),
)

TEACHER_FIELDS = (
    ('source', '', 'an earlier stage, a bigkd stage folder, or a .npz file'),
    ('model', '', "'': from the stage / stage.json"),
    ('model_kwargs', {}, "its model's extra arguments"),
    ('resolution', 0, '0: from the stage / stage.json'),
)

# A peer of a deep-mutual-learning stage: `stage_config(..., peers={name: {field: value}})`.
PEER_FIELDS = (
    ('model', '', 'registry name of the peer\'s model'),
    ('resolution', 0, 'its input resolution (the crop box every peer sees, rendered at it)'),
    ('model_kwargs', {}, 'its extra model arguments'),
)

# A stage's train_data source: `stage_config(..., train_data={name: {field: value}})`.
TRAIN_DATA_FIELDS = (
    ('source', 'task',
     'task: the train split of the data block, with its labels | digits | folder '
     '(DATA_DIR/SPLIT/CLASS/*) | images (every image directly in data_dir: no labels) | records '
     '| tfds'),
    ('data_dir', '', 'image folder, bigkd.prepare output or tfds data_dir (as data.data_dir)'),
    ('name', '', "tfds dataset name (source='tfds')"),
    ('split', 'train', "the source's split (tfds split strings such as 'train[:50%]' work too)"),
    ('classes', '', "digits: only these classes, e.g. '5-9' (as data.classes); '': all"),
    ('labels', False,
     "True: the source's labels are the task's classes, so label terms may read them (task: "
     "always; images: never). False: unlabeled; then the stage may not ask for a label term "
     '(no teachers, label_weight, loss_weights.labels, dkd)'),
    ('weight', 1.0,
     "this source's share of every batch, relative to the other sources' weights (a fixed "
     'number of rows per step, by largest remainder)'),
)


TRAIN_SOURCES = ('task', 'digits', 'folder', 'images', 'records', 'tfds')


def is_labelled(source) -> bool:
  """Whether a train_data source's labels are the task's ('task': always; 'images': never)."""
  return source['source'] == 'task' or (source['source'] != 'images' and bool(source['labels']))


def _tree(rows, values=None) -> ConfigDict:
  """A ConfigDict of dotted `rows` (field, default, meaning), with `values` replacing defaults."""
  values = values or {}
  out = ConfigDict()
  for name, default, _ in rows:
    *groups, leaf = name.split('.')
    node = out
    for group in groups:
      if group not in node:
        node[group] = ConfigDict()
      node = node[group]
    value = values.get(name, default)
    node[leaf] = ConfigDict(value) if isinstance(value, dict) else value
  return out


def _shampoo_defaults() -> dict:
  from bigkd.optim.shampoo import default_shampoo_options
  return default_shampoo_options()


def base_config() -> ConfigDict:
  """The run's fields at their defaults; a config adds its stages (`stage_config`)."""
  return _tree(RUN_FIELDS, {'optimizer.shampoo': _shampoo_defaults()})


def stage_config(model: str, resolution: int, teachers=None, **overrides) -> ConfigDict:
  """One stage. `teachers`: {name: source} where source is an earlier stage's name, a bigkd
  run's stage folder, or a BiT or ViT .npz file (then also give model and resolution as a dict;
  a ViT file's position embedding is resized to that resolution's patch grid).
  `train_data={name: {field: value}}` (TRAIN_DATA_FIELDS): its training images, when not the
  data block's train split. `peers={name: (model, resolution)}` (PEER_FIELDS): a deep mutual
  learning stage (model '' and resolution 0; `mutual_stage` sets its loss weights)."""
  s = _tree(STAGE_FIELDS, {'model': model, 'resolution': resolution})
  s.teachers = ConfigDict()
  for name, source in (teachers or {}).items():
    spec = source if isinstance(source, dict) else dict(source=source)
    s.teachers[name] = _tree(TEACHER_FIELDS, spec)
  for key, value in overrides.items():
    if key not in s:
      raise ConfigError(f'stage_config: unknown field {key!r}')
    if key == 'train_data':  # each source gets every field, its defaults for those not given
      s.train_data = ConfigDict({name: _train_source(name, spec) for name, spec in value.items()})
    elif key == 'peers':
      s.peers = ConfigDict({name: _peer(name, spec) for name, spec in value.items()})
    elif key in FIELD_GROUPS:  # set the named fields, keep the other defaults
      for name, field in value.items():
        if name not in s[key]:
          raise ConfigError(f'stage_config: unknown field {key}.{name!r} (known: '
                            f'{", ".join(s[key])})')
        s[key][name] = field
    else:
      s[key] = ConfigDict(value) if isinstance(value, dict) else value
  return s


def _train_source(name: str, spec: dict) -> ConfigDict:
  known = [field for field, _, _ in TRAIN_DATA_FIELDS]
  unknown = sorted(set(spec) - set(known))
  if unknown:
    raise ConfigError(f'stage_config: train_data.{name}: unknown field {unknown[0]!r} (known: '
                      f'{", ".join(known)})')
  return _tree(TRAIN_DATA_FIELDS, spec)


def _peer(name: str, spec) -> ConfigDict:
  """A peer's fields from {field: value} or the shorthand (model, resolution)."""
  if isinstance(spec, (tuple, list)):
    if len(spec) != 2:
      raise ConfigError(f'stage_config: peers.{name}={spec!r}: give (model, resolution) or a dict '
                        'of model, resolution, model_kwargs')
    spec = dict(model=spec[0], resolution=spec[1])
  known = [field for field, _, _ in PEER_FIELDS]
  unknown = sorted(set(spec) - set(known))
  if unknown:
    raise ConfigError(f'stage_config: peers.{name}: unknown field {unknown[0]!r} (known: '
                      f'{", ".join(known)})')
  return _tree(PEER_FIELDS, dict(spec))


def mutual_stage(peers: dict, **overrides) -> ConfigDict:
  """A deep-mutual-learning stage (Zhang et al. 2018; the KD survey's online distillation):
  `peers` {name: (model, resolution) or {model, resolution, model_kwargs}}, K >= 2, trained
  together; `overrides` are stage_config fields (steps, optimizer, loss_weights=dict(mutual_kl=
  ...), loss_options=dict(mutual_temperature=...), ...)."""
  weights = {'labels': 1.0, 'mutual_kl': 1.0, **overrides.pop('loss_weights', {})}
  return stage_config('', 0, peers=peers, loss_weights=weights, **overrides)


def born_again(config: ConfigDict, first: str, generations: int, ensemble: bool = False,
               **overrides) -> ConfigDict:
  """Born-again networks (Furlanello et al. 2018; the KD survey's self-distillation): after
  stage `first`, `generations` stages of the same model at the same resolution, generation g
  (`FIRST_genG`) distilled from generation g − 1 (generation 0 is `first`) with `first`'s step
  count and the default recipe (function matching, KL) changed by `overrides` (stage_config
  fields); with `ensemble`, one more (`FIRST_gen_ensemble`) distilled from all the generations
  together. Ordinary stages: no new mechanism. Returns `config`, its stages and stage_order
  extended (the new stages right after `first`)."""
  if first not in config.stages:
    raise ConfigError(f'born_again: no stage {first!r} (stages: {", ".join(config.stages)})')
  if not isinstance(generations, int) or generations < 1:
    raise ConfigError(f'born_again: generations={generations!r} must be an integer >= 1')
  base = config.stages[first]
  made, teacher = [], first
  for g in range(1, generations + 1):
    made.append((f'{first}_gen{g}', {'teacher': teacher}))
    teacher = made[-1][0]
  if ensemble:
    made.append((f'{first}_gen_ensemble',
                 {f'gen{g}': name for g, name in enumerate([first] + [m for m, _ in made])}))
  order = stage_names(config) or [first]
  at = order.index(first) + 1 if first in order else len(order)
  with config.unlocked():
    for name, teachers in made:
      config.stages[name] = stage_config(base.model, base.resolution, teachers=teachers,
                                         **{'steps': base.steps, **overrides})
      config.stages[name].model_kwargs = ConfigDict(base.model_kwargs.to_dict())
  config.stage_order = ','.join(order[:at] + [m for m, _ in made] + order[at:])
  return config


# The loss weights of a student-friendly teacher stage in the SFTN paper (Park et al. 2021,
# sec. 4.1): λ_T (the teacher's cross-entropy, `labels`) = 1, λ_R^KL = 3, λ_R^CE = 1; its KL
# temperature τ = 1 is loss_options.sftn_temperature's default.
SFTN_LOSS_WEIGHTS = {'labels': 1.0, 'sftn_kl': 3.0, 'sftn_ce': 1.0}


# Stage fields that are groups of fields with defaults: a stage_config(...) argument such as
# loss_weights=dict(fitnet=1.0) sets those fields and keeps the others' defaults.
FIELD_GROUPS = ('loss_weights', 'loss_options')


def comma_list(text: str) -> list[str]:
  """'a, b,,c' -> ['a', 'b', 'c']: the comma-separated names config strings hold."""
  return [name.strip() for name in text.split(',') if name.strip()]


def class_list(text: str) -> tuple[int, ...]:
  """'1,3,5-7' -> (1, 3, 5, 6, 7): the classes a `classes` field names; '' -> () (all).
  Raises ConfigError (without the field's name: the caller adds it) on anything else."""
  out = set()
  for part in comma_list(text):
    first, _, last = part.partition('-')
    if not first.strip().isdigit() or (last and not last.strip().isdigit()):
      raise ConfigError(f'{text!r} is not a list of classes such as \'0-4\' or \'1,3,5-7\'')
    low, high = int(first), int(last or first)
    if low > high:
      raise ConfigError(f'{text!r}: the range {part!r} is empty')
    out.update(range(low, high + 1))
  return tuple(sorted(out))


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
  """{field: meaning}, stage fields keyed 'stages.*.x', a teacher's 'stages.*.teachers.*.x'."""
  return {**{name: doc for name, _, doc in RUN_FIELDS},
          **{f'stages.*.{name}': doc for name, _, doc in STAGE_FIELDS},
          **{f'stages.*.teachers.*.{name}': doc for name, _, doc in TEACHER_FIELDS},
          **{f'stages.*.train_data.*.{name}': doc for name, _, doc in TRAIN_DATA_FIELDS},
          **{f'stages.*.peers.*.{name}': doc for name, _, doc in PEER_FIELDS}}


def field_key(path: str) -> str:
  """The key of a resolved config field in `field_docs` ('stages.student.teachers.t.model' ->
  'stages.*.teachers.*.model'; a stage's optimizer/augment override -> the global field's)."""
  parts = path.split('.')
  if parts[0] == 'stages' and len(parts) > 2:
    parts[1] = '*'
    if parts[2] in ('teachers', 'train_data', 'peers') and len(parts) > 4:
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
    if covered(path, SAFE_TO_CHANGE):
      doc = f'[safe to change] {doc}'
    lines.append(f'{shown:<58} {("# " + doc) if doc else ""}'.rstrip())
  return '\n'.join(lines)
