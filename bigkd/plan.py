"""Config -> stage plans: every check that needs no device, in one place.

The trainer, the benchmark and the notebook helpers all go through here, so a bad config is found
the same way everywhere: `check_config` (before any data is read) and `plan_stages` (once the
train split's size and class count are known) raise `ConfigError` with one line naming the
problem, before the workdir is touched. A `StagePlan` holds every value a stage needs as a plain
Python value; `bigkd.build` turns it into arrays and functions, `bigkd.stages` runs it.
"""
import dataclasses
import json

from bigkd import checkpoint, paths, teacher_cache
from bigkd.config import PEER_FIELDS, STAGE_FIELDS, TRAIN_DATA_FIELDS, TRAIN_SOURCES, \
    ConfigError, class_list, comma_list, is_labelled, merged, stage_names
from bigkd.data.augment import CROP_SAMPLERS, TEACHING_MODES
from bigkd.data.sampling import batch_rows
from bigkd.losses import AT_MATCHES, DEFAULT_LOSS_TERMS, DISTILL_LOSSES, ENSEMBLE_MODES, \
    FEATURE_LOSSES, LABEL_TERMS, LOSS_TERMS, MUTUAL_LOSSES, PKT_FORMS, SELF_LOSSES, SFTN_LOSSES, \
    SUPERVISED_LOSS_TERMS
from bigkd.models import feature_shapes, model_names, runs_from_tap
from bigkd.optim import DTYPES, OPTIMIZERS, SCHEDULES
from bigkd.sharding import mesh_shape

SOURCES = ('digits', 'tfds', 'folder', 'records')


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
  name: str
  source: str       # a stage folder (of this run or another) or a .npz file
  model: str
  resolution: int
  model_kwargs: dict


@dataclasses.dataclass(frozen=True)
class PeerPlan:
  """A model of a deep-mutual-learning stage (`stage_config(..., peers=...)`)."""
  name: str         # its key in the stage's parameters, its metrics' prefix, its folder
  model: str
  resolution: int
  model_kwargs: dict


@dataclasses.dataclass(frozen=True)
class PairPlan:
  """A student feature and a teacher feature that a feature loss (or the CKA) compares."""
  student_tap: str      # a feature of the stage's model (`bigkd.models.features`)
  teacher: str          # the teacher's name in the stage's teachers
  teacher_tap: str
  student_shape: tuple  # per example, no batch axis
  teacher_shape: tuple
  adapter: bool         # FitNet: a trained adapter maps the student feature to teacher_shape
  terms: tuple = ()     # the feature losses that compare this pair (none: a CKA pair)

  @property
  def label(self) -> str:
    """'student.TAP,TEACHER.TAP': how the config names the pair (and summary.json its CKA)."""
    return f'student.{self.student_tap},{self.teacher}.{self.teacher_tap}'


@dataclasses.dataclass(frozen=True)
class DataPlan:
  """One source of a stage's train data (`train_data`), with its share of every batch."""
  name: str       # its name in the stage's train_data
  spec: dict      # its fields (config.TRAIN_DATA_FIELDS), as configured
  labelled: bool  # its labels are the task's classes (`config.is_labelled`)
  rows: int       # the rows of every batch drawn from it
  examples: int   # its size


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """One stage with everything resolved to plain values (nothing else is read from the config)."""
  name: str
  index: int            # position in stage_order: seeds this stage's init and augmentation
  seed: int             # the run's seed
  model: str
  model_kwargs: dict
  resolution: int
  compute_dtype: str    # the student's convolutions and matmuls; its parameters stay float32
  init: str             # '' (random), a bigkd stage folder, or a .npz (head re-initialised)
  steps: int
  warmup_steps: int
  batch_size: int
  grad_accum_steps: int
  optimizer: dict
  augment: dict
  teachers: tuple       # of TeacherPlan; empty: supervised
  teaching_mode: str
  loss: str
  temperature: float
  label_weight: float
  ensemble: str
  num_classes: int
  teacher_dtype: str
  min_fsdp_size: int
  device_resident: bool
  shard_resident: bool
  reader_threads: int   # streamed data: steps read and decoded at once per process
  eval_batch_size: int
  eval_crop_fraction: float
  log_every: int
  log_views: bool
  tensorboard: bool
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: int
  loss_terms: tuple = SUPERVISED_LOSS_TERMS  # (term, weight), weight > 0, in LOSS_TERMS order
  loss_options: dict = dataclasses.field(default_factory=dict)  # stage_config's loss_options
  feature_pairs: tuple = ()  # of PairPlan: what the feature losses compare
  cka_pairs: tuple = ()      # of PairPlan: what the evaluation's CKA compares
  self_taps: tuple = ()      # (tap, per-example shape) of the student's shallow classifiers
  prelogits_width: int = 0   # ... whose embeddings match the final one, of this width
  sftn_student: str = ''     # SFTN: the student model whose layers form the branches
  sftn_branches: tuple = ()  # ... (tap, this model's feature shape, the student's) of each
  teacher_cache: str = ''    # a folder of the teachers' cached logits ('': run the teachers)
  teacher_cache_top_k: int = 0
  teacher_cache_identity: dict = dataclasses.field(default_factory=dict)  # `teacher_cache.identity`
  train_data: tuple = ()     # of DataPlan, by name (as ConfigDict keeps them); (): train split
  peers: tuple = ()          # of PeerPlan: deep mutual learning (model '', resolution 0)

  @property
  def step_seed(self) -> int:
    """Seed of the step's randomness (augmentation, batch order): differs between stages."""
    return self.seed + self.index


def _need(ok, message):
  if not ok:
    raise ConfigError(message)


def check_config(config, num_devices: int) -> None:
  """Everything that can be checked from the config and the device count alone."""
  mesh_shape(config.mesh.data, config.mesh.fsdp, num_devices)
  names = stage_names(config)
  _need(len(names) > 0, 'config.stage_order is empty: nothing to run')
  twice = sorted({name for name in names if names.count(name) > 1})
  _need(not twice, f'stage_order={config.stage_order!r} names {", ".join(twice)} twice: a '
        'stage folder holds one stage')
  _check_intervals(config)
  for name in names:
    _need(name in config.stages, f'stage_order names {name!r}, which is not in config.stages '
          f'({", ".join(config.stages)})')
  data = config.data
  _need(data.source in SOURCES, f'data.source={data.source!r}: one of {", ".join(SOURCES)}')
  _need(data.source != 'records' or data.data_dir,
        'data.source=records needs data.data_dir (the output folder of bigkd.prepare)')
  _need(0 <= data.eval_crop_fraction <= 1,
        f'data.eval_crop_fraction={data.eval_crop_fraction} must be in [0, 1] (0: whole image)')
  _need(data.reader_threads > 0, f'data.reader_threads={data.reader_threads} must be positive')
  _need(data.source != 'tfds' or data.name, 'data.source=tfds needs data.name')
  _need(data.source != 'folder' or data.data_dir,
        'data.source=folder needs data.data_dir (the folder root)')
  _need(data.base_size > 0, f'data.base_size={data.base_size} must be positive' + (
      ' (0, from the images, needs data.source=folder)' if data.base_size == 0 else ''))
  _need(data.num_classes >= 0, f'data.num_classes={data.num_classes} must be >= 0 (0: the '
        "source's class count)")
  _need(not data.classes or data.source == 'digits',
        f'data.classes={data.classes!r}: only the digits source keeps some classes')
  _check_classes('data.classes', data.classes)
  _need(config.eval_batch_size % num_devices == 0,
        f'eval_batch_size={config.eval_batch_size} is not divisible by the {num_devices} devices')
  _need(config.teacher_dtype in DTYPES,
        f'teacher_dtype={config.teacher_dtype!r}: one of {", ".join(DTYPES)}')
  seen = []
  for name in names:
    _check_stage(config, name, seen, num_devices)
    seen.append(name)


def _check_intervals(config) -> None:
  """Run-wide counts. A zero or negative interval would divide by zero mid-run or never save;
  keep_checkpoints=0 would delete the final model."""
  for key in ('eval_batch_size', 'log_every', 'checkpoint_every', 'keep_checkpoints',
              'grad_accum_steps'):
    _need(config[key] > 0, f'{key}={config[key]} must be positive' + (
        ' (the final checkpoint is the trained model)' if key == 'keep_checkpoints' else ''))
  _need(config.mesh.min_fsdp_size >= 0,
        f'mesh.min_fsdp_size={config.mesh.min_fsdp_size} must be >= 0')
  _need(config.eval_every >= 0, f'eval_every={config.eval_every} must be >= 0 (0: only at the '
        'end)')


def _check_pair(where, key, value):
  """crop_area / crop_aspect: a (min, max) pair of numbers, so the range checks can index it."""
  ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
  _need(ok, f'{where}: augment.{key}={value!r} must be a (min, max) pair of numbers')


def stage_groups(config, name) -> tuple[dict, dict]:
  """(optimizer, augment) of stage `name`: the run's groups with the stage's overrides, which
  may only name existing fields (tuples as tuples, whatever JSON made of them)."""
  stage, where = config.stages[name], f'stages.{name}'
  opt = merged(config.optimizer, stage.optimizer, f'{where}.optimizer')
  aug = merged(config.augment, stage.augment, f'{where}.augment')
  return opt, {k: tuple(v) if isinstance(v, list) else v for k, v in aug.items()}


def _check_model(where, model, resolution, base_size) -> None:
  _need(model in model_names(), f'{where}.model={model!r}: unknown model')
  _need(0 < resolution <= base_size,
        f'{where}.resolution={resolution} is above the stored image size '
        f'data.base_size={base_size}' if resolution > 0 else
        f'{where}.resolution must be positive')


# Folders a stage folder already holds: no peer may be written there.
STAGE_FOLDER_NAMES = ('checkpoints', 'damaged_checkpoints')


def _check_peers(stage, where, base_size) -> None:
  """A deep-mutual-learning stage: two or more peers, each a known model at a resolution the
  canvas holds and a name that can be a folder and a metric prefix; the stage's own model,
  teachers and teacher-feature fields unset; only the labels and mutual_kl terms."""
  _need(len(stage.peers) >= 2, f'{where}.peers: deep mutual learning needs at least 2 peers '
        f'(has {len(stage.peers)}: {", ".join(stage.peers) or "none"})')
  known = [field for field, _, _ in PEER_FIELDS]
  for peer, spec in stage.peers.items():
    at = f'{where}.peers.{peer}'
    _need(peer.replace('_', '').replace('-', '').isalnum() and peer not in STAGE_FOLDER_NAMES,
          f'{at}: a peer name is letters, digits, _ and - (its folder and its metrics\' '
          f'prefix), not {", ".join(STAGE_FOLDER_NAMES)}')
    _need(hasattr(spec, 'keys') and set(spec.keys()) == set(known), f'{at}: a peer has the '
          f'fields {", ".join(known)} (make it with mutual_stage or stage_config(peers=...))')
    _check_model(at, spec.model, spec.resolution, base_size)
  _need(not stage.model and not stage.resolution, f'{where}: a stage with peers trains their '
        f'models; leave its model and resolution unset (model={stage.model!r}, resolution='
        f'{stage.resolution}; use mutual_stage)')
  for key in ('teachers', 'init', 'teacher_cache', 'feature_pairs', 'cka_pairs', 'self_taps',
              'sftn_student', 'sftn_taps'):
    _need(not stage[key], f'{where}.{key}: a stage with peers has none (its peers teach one '
          'another)')
  weights = stage.loss_weights.to_dict()
  default = {field.split('.')[1]: value for field, value, _ in STAGE_FIELDS
             if field.startswith('loss_weights.')}
  other = sorted(t for t, w in weights.items()
                 if w != default.get(t) and t not in ('labels', *MUTUAL_LOSSES))
  _need(not other, f'{where}.loss_weights.{",".join(other)}: a stage with peers has the labels '
        'and mutual_kl terms only')
  _need(weights['labels'] or weights['mutual_kl'],
        f'{where}.loss_weights: labels and mutual_kl are 0; nothing to train')
  temperature = stage.loss_options.mutual_temperature
  _need(isinstance(temperature, (int, float)) and temperature > 0,
        f'{where}.loss_options.mutual_temperature={temperature!r} must be positive')


def _check_stage(config, name, earlier, num_devices):
  stage, where, base_size = config.stages[name], f'stages.{name}', config.data.base_size
  if stage.peers:
    _check_peers(stage, where, base_size)
  else:
    _check_model(where, stage.model, stage.resolution, base_size)
    _need(not stage.loss_weights.get('mutual_kl'), f'{where}.loss_weights.mutual_kl='
          f'{stage.loss_weights.get("mutual_kl")}: deep mutual learning needs peers (a stage '
          'made with mutual_stage)')
  _need(stage.compute_dtype in DTYPES,
        f'{where}.compute_dtype={stage.compute_dtype!r}: one of {", ".join(DTYPES)}')
  for key in ('steps', 'epochs', 'batch_size', 'grad_accum_steps'):
    _need(stage[key] >= 0, f'{where}.{key}={stage[key]} must be >= 0')
  batch = stage.batch_size or config.batch_size
  _need(batch > 0 and batch % num_devices == 0,
        f'{where}: batch size {batch} is not divisible by the {num_devices} devices')
  accum = stage.grad_accum_steps or config.grad_accum_steps
  _need(accum > 0 and batch % (accum * num_devices) == 0,
        f'{where}: batch size {batch} is not divisible by grad_accum_steps={accum} x the '
        f'{num_devices} devices')
  _need(stage.steps > 0 or stage.epochs > 0, f'{where}: set steps or epochs (> 0)')
  _need(stage.teaching_mode in TEACHING_MODES,
        f'{where}.teaching_mode={stage.teaching_mode!r}: one of {", ".join(TEACHING_MODES)}')
  _need(stage.loss in DISTILL_LOSSES, f'{where}.loss={stage.loss!r}: one of {DISTILL_LOSSES}')
  _need(stage.ensemble in ENSEMBLE_MODES,
        f'{where}.ensemble={stage.ensemble!r}: one of {ENSEMBLE_MODES}')
  _need(stage.temperature > 0, f'{where}.temperature must be positive')
  _need(0.0 <= stage.label_weight <= 1.0, f'{where}.label_weight must be in [0, 1]')
  if stage.teacher_cache:
    _check_teacher_cache(stage, where)
  _check_train_data(stage, where)
  opt, aug = stage_groups(config, name)
  _need(aug['crop_sampler'] in CROP_SAMPLERS,
        f'{where}: augment.crop_sampler={aug["crop_sampler"]!r}: one of {", ".join(CROP_SAMPLERS)}')
  _need(aug['crop_attempts'] > 0, f'{where}: augment.crop_attempts must be positive')
  _need(opt['name'] in OPTIMIZERS, f'{where}: optimizer.name={opt["name"]!r}: one of {OPTIMIZERS}')
  _need(opt['schedule'] in SCHEDULES,
        f'{where}: optimizer.schedule={opt["schedule"]!r}: one of {SCHEDULES}')
  _need(opt['lr'] > 0, f'{where}: optimizer.lr must be positive')
  for key in ('warmup_steps', 'warmup_epochs', 'weight_decay', 'clip_norm', 'eps'):
    _need(opt[key] >= 0, f'{where}: optimizer.{key}={opt[key]} must be >= 0')
  for key in ('b1', 'b2', 'momentum'):  # decay rates: 1 or more never forgets, or diverges
    _need(0 <= opt[key] < 1, f'{where}: optimizer.{key}={opt[key]} must be in [0, 1)')
  _need(aug['mixup_alpha'] >= 0, f'{where}: augment.mixup_alpha={aug["mixup_alpha"]} must be '
        '>= 0 (0: no mixup)')
  _check_pair(where, 'crop_area', aug['crop_area'])
  _check_pair(where, 'crop_aspect', aug['crop_aspect'])
  _need(opt['mu_dtype'] in DTYPES,
        f'{where}: optimizer.mu_dtype={opt["mu_dtype"]!r}: one of {", ".join(DTYPES)}')
  _need(0 < aug['crop_area'][0] <= aug['crop_area'][1] <= 1,
        f'{where}: augment.crop_area={aug["crop_area"]} must satisfy 0 < min <= max <= 1')
  _need(0 < aug['crop_aspect'][0] <= aug['crop_aspect'][1],
        f'{where}: augment.crop_aspect={aug["crop_aspect"]} must satisfy 0 < min <= max')
  if stage.teachers and stage.teaching_mode == 'function_matching':
    _need(aug['mixup_alpha'] > 0, f'{where}: function_matching needs augment.mixup_alpha > 0')
  _check_objective(stage, where)
  for tname, teacher in stage.teachers.items():
    _need(teacher.resolution >= 0, f'{where}.teachers.{tname}.resolution={teacher.resolution} '
          'must be >= 0 (0: the resolution its stage was trained at)')
    source, _, peer = teacher.source.partition('/')
    if teacher.source in config.stages or (peer and source in config.stages):
      _need(source in earlier, f'{where}.teachers.{tname}: stage {source!r} '
            'must run before the stage it teaches (see stage_order)')
      peers = config.stages[source].peers
      _need(not peers or peer in peers, f'{where}.teachers.{tname}={teacher.source!r}: stage '
            f'{source!r} trains peers; name one of them: ' + ', '.join(
                f"'{source}/{p}'" for p in peers))
      _need(not peer or peers, f'{where}.teachers.{tname}={teacher.source!r}: stage {source!r} '
            'has no peers (it is a teacher by its name alone)')
    elif teacher.source.endswith('.npz'):
      _need(teacher.model and teacher.resolution > 0, f'{where}.teachers.{tname}: a .npz '
            'teacher needs model and resolution')
    _need(teacher.resolution <= base_size,
          f'{where}.teachers.{tname}.resolution={teacher.resolution} is above the stored '
          f'image size data.base_size={base_size}')


def _check_classes(where, text) -> None:
  try:
    class_list(text)
  except ConfigError as e:
    raise ConfigError(f'{where}: {e}') from None


def _check_train_data(stage, where) -> None:
  """Each source of a stage's train_data by its fields; and a stage whose train data has
  unlabeled images asks for no term that reads labels (they would read nothing)."""
  known = [field for field, _, _ in TRAIN_DATA_FIELDS]
  for name, source in stage.train_data.items():
    at = f'{where}.train_data.{name}'
    _need(hasattr(source, 'keys') and set(source.keys()) == set(known),
          f'{at}: a source has the fields {", ".join(known)} (make it with stage_config(..., '
          'train_data={name: dict(...)}))')
    kind = source.source
    _need(kind in TRAIN_SOURCES, f'{at}.source={kind!r}: one of {", ".join(TRAIN_SOURCES)}')
    _need(kind not in ('folder', 'images', 'records') or source.data_dir,
          f'{at}: source={kind} needs data_dir')
    _need(kind != 'tfds' or source.name, f'{at}: source=tfds needs name')
    _need(not source.classes or kind == 'digits',
          f'{at}.classes={source.classes!r}: only the digits source keeps some classes')
    _check_classes(f'{at}.classes', source.classes)
    _need(isinstance(source.weight, (int, float)) and not isinstance(source.weight, bool)
          and source.weight > 0, f'{at}.weight={source.weight!r} must be a number > 0')
    _need(not (kind == 'images' and source.labels), f'{at}: source=images has no labels (a '
          'folder of images without class folders); labels=True needs source=folder')
  unlabeled = [name for name, source in stage.train_data.items() if not is_labelled(source)]
  if not unlabeled:
    return
  none = (f'but its train_data.{unlabeled[0]} has no labels (labels=False; give a teacher and '
          'a loss that reads none, e.g. kl with label_weight=0)')
  _need(stage.teachers, f'{where}: a stage without teachers trains on labels, {none}')
  _need(stage.label_weight == 0, f'{where}.label_weight={stage.label_weight} reads labels, '
        f'{none}')
  for term in LABEL_TERMS:
    _need(not stage.loss_weights.get(term), f'{where}.loss_weights.{term}='
          f'{stage.loss_weights.get(term)} reads labels, {none}')


def _check_teacher_cache(stage, where) -> None:
  """Cached logits stand for the teachers' only where the teachers' view is a function of the
  image alone and nothing but their logits is read during training."""
  _need(stage.teachers, f'{where}.teacher_cache: a stage without teachers has nothing to cache')
  _need(stage.teaching_mode == 'fixed_teacher', f'{where}.teacher_cache needs teaching_mode='
        f"'fixed_teacher' (under {stage.teaching_mode!r} the teachers' view changes every step)")
  features = [t for t in FEATURE_LOSSES if stage.loss_weights.get(t)]
  _need(not features, f'{where}.teacher_cache: {", ".join(features)} read(s) teacher features '
        'at every step; the cache holds logits only')
  _need(isinstance(stage.teacher_cache_top_k, int) and stage.teacher_cache_top_k >= 0,
        f'{where}.teacher_cache_top_k={stage.teacher_cache_top_k!r} must be an integer >= 0')


def _check_objective(stage, where) -> None:
  """loss_weights, loss_options, feature_pairs and cka_pairs, by name (shapes: `_feature_pairs`,
  once the models' features are known)."""
  weights = stage.loss_weights.to_dict()
  unknown = sorted(set(weights) - set(LOSS_TERMS))
  _need(not unknown, f'{where}.loss_weights: unknown term(s) {", ".join(unknown)} (known: '
        f'{", ".join(LOSS_TERMS)})')
  for term, weight in weights.items():
    _need(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight >= 0,
          f'{where}.loss_weights.{term}={weight!r} must be a number >= 0')
  if stage.peers:  # the rest: `_check_peers`
    return
  default = dict(DEFAULT_LOSS_TERMS)
  self_terms = [t for t in SELF_LOSSES if weights.get(t)]
  _need(bool(self_terms) == bool(stage.self_taps),
        f'{where}.self_taps needs a weighted self_ce, self_kl or self_feature term' if
        stage.self_taps else f'{where}.loss_weights.{self_terms[0] if self_terms else ""}: '
        'self-distillation terms need self_taps (the student taps that get a classifier)')
  _check_sftn(stage, where, weights)
  if not stage.teachers:
    own = SELF_LOSSES + (('labels',) + SFTN_LOSSES if stage.sftn_student else ())
    changed = sorted(t for t, w in weights.items() if w != default.get(t, 0.0) and t not in own)
    _need(not changed, f'{where}.loss_weights.{",".join(changed)}: a stage without teachers '
          'trains on labels alone (cross-entropy); these terms need a teacher')
    for key in ('feature_pairs', 'cka_pairs'):
      _need(not stage[key], f'{where}.{key}: a stage without teachers has no teacher features')
    return
  _need(any(weights.values()), f'{where}.loss_weights: every weight is 0; nothing to train')
  feature_terms = [t for t in FEATURE_LOSSES if weights.get(t)]
  _need(not stage.feature_pairs or feature_terms,
        f'{where}.feature_pairs is set but no feature loss ({", ".join(FEATURE_LOSSES)}) has a '
        'weight in loss_weights (for the CKA alone, use cka_pairs)')
  used = set()
  for pair in stage.feature_pairs:
    used.update(_parse_pair(pair, stage, f'{where}.feature_pairs', feature_terms)[3])
  for term in feature_terms:
    _need(term in used, f'{where}.loss_weights.{term}: a feature loss needs feature_pairs that '
          'it compares, e.g. (("student.stage2", "teacher.stage3"),)')
  for pair in stage.cka_pairs:
    _parse_pair(pair, stage, f'{where}.cka_pairs', ())
  options = stage.loss_options
  for key in ('at_p', 'dkd_temperature', 'dist_temperature', 'crd_dim', 'crd_temperature'):
    _need(options[key] > 0, f'{where}.loss_options.{key}={options[key]} must be positive')
  for key in ('dkd_alpha', 'dkd_beta', 'dkd_warmup_steps', 'dist_beta', 'dist_gamma'):
    _need(options[key] >= 0, f'{where}.loss_options.{key}={options[key]} must be >= 0')
  for key, known in (('at_match', AT_MATCHES), ('pkt_form', PKT_FORMS)):
    _need(options[key] in known, f'{where}.loss_options.{key}={options[key]!r}: one of '
          f'{", ".join(known)}')


def _check_sftn(stage, where, weights) -> None:
  """A student-friendly teacher stage (SFTN) by its fields: a known student, taps, a weighted
  branch term, no teachers (its shapes: `_sftn_branches`)."""
  terms = [t for t in SFTN_LOSSES if weights.get(t)]
  if not stage.sftn_student:
    _need(not terms and not stage.sftn_taps, f'{where}.' + (
        f'loss_weights.{terms[0]}' if terms else 'sftn_taps') + ': SFTN needs sftn_student '
        '(the student model whose layers form the branches)')
    return
  _need(stage.sftn_student in model_names(),
        f'{where}.sftn_student={stage.sftn_student!r}: unknown model')
  taps = stage.sftn_taps
  _need(isinstance(taps, (tuple, list)) and len(taps) > 0 and all(isinstance(t, str) for t in taps)
        and len(set(taps)) == len(taps), f'{where}.sftn_taps={taps!r} must name one or more '
        "distinct taps where the branches start, e.g. ('stage1', 'stage2')")
  _need(terms, f'{where}.sftn_student needs a weighted sftn_kl or sftn_ce term (the paper: '
        'config.SFTN_LOSS_WEIGHTS, labels 1, sftn_kl 3, sftn_ce 1)')
  _need(not stage.teachers, f'{where}: an SFTN stage trains a teacher on labels with its '
        f'student branches; it has no teachers of its own ({", ".join(stage.teachers)})')
  _need(stage.sftn_resolution >= 0, f'{where}.sftn_resolution={stage.sftn_resolution} must be '
        ">= 0 (0: the stage's resolution)")
  _need(stage.loss_options.sftn_temperature > 0, f'{where}.loss_options.sftn_temperature='
        f'{stage.loss_options.sftn_temperature} must be positive')


def _parse_pair(pair, stage, where, feature_terms) -> tuple[str, str, str, tuple]:
  """('student.TAP', 'TEACHER.TAP'[, 'LOSS,LOSS']) -> (student tap, teacher name, teacher tap,
  the feature losses that compare the pair). Without the third element: every weighted one of
  `feature_terms`; with it (feature_pairs only), those it names, each weighted."""
  ok = (isinstance(pair, (tuple, list)) and len(pair) in (2, 3) and all(
      isinstance(p, str) for p in pair) and all('.' in p for p in pair[:2]))
  _need(ok, f'{where}: {pair!r} is not a pair (\'student.TAP\', \'TEACHER.TAP\'[, \'LOSS,...\'])')
  (side, student_tap), (teacher, teacher_tap) = (p.split('.', 1) for p in pair[:2])
  _need(side == 'student', f'{where}: {pair[0]!r} must name a student feature, '
        '\'student.TAP\' (the first of a pair is the student\'s)')
  _need(teacher in stage.teachers, f'{where}: {pair[1]!r}: no teacher {teacher!r} in this stage '
        f'(teachers: {", ".join(stage.teachers)})')
  if len(pair) == 2:
    return student_tap, teacher, teacher_tap, tuple(feature_terms)
  named = tuple(comma_list(pair[2]))
  _need(feature_terms, f'{where}: {pair!r}: a CKA pair takes no loss names')
  bad = [n for n in named if n not in feature_terms]
  _need(named and not bad, f'{where}: {pair!r}: {", ".join(bad) or "no loss"} is not a '
        f'weighted feature loss of this stage ({", ".join(feature_terms)})')
  return student_tap, teacher, teacher_tap, tuple(t for t in feature_terms if t in named)


# What each feature loss can compare, by the number of per-example dimensions (3: [H, W, C],
# 1: [D]); None: anything (flattened per example).
FEATURE_RANKS = {'fitnet': None, 'at': (3,), 'sp': None, 'pkt': None, 'rkd_distance': (1,),
                 'rkd_angle': (1,), 'crd': (1,)}
RANK_NAMES = {(3,): 'spatial features [H, W, C]', (1,): 'vector features (prelogits)'}


def _cached_feature_shapes(model, num_classes, resolution, model_kwargs, cache):
  key = (model, num_classes, resolution, json.dumps(model_kwargs, sort_keys=True))
  if key not in cache:
    cache[key] = feature_shapes(model, num_classes, resolution, model_kwargs)
  return cache[key]


def _feature_pairs(name, stage, key, teachers, model_shapes, feature_terms) -> tuple:
  """The PairPlans of stage.`key`, each tap checked against its model's features and each
  pair's shapes against the feature losses that compare it (a ConfigError naming both shapes
  where no adapter can make them comparable)."""
  teacher_plans = {t.name: t for t in teachers}
  student_shapes = model_shapes(stage.model, stage.resolution, stage.model_kwargs.to_dict())
  where = f'stages.{name}.{key}'
  pairs = []
  for pair in stage[key]:
    student_tap, teacher, teacher_tap, terms = _parse_pair(pair, stage, where, feature_terms)
    t = teacher_plans[teacher]
    teacher_shapes = model_shapes(t.model, t.resolution, t.model_kwargs)
    for tap, shapes, model, side in ((student_tap, student_shapes, stage.model, 'student'),
                                     (teacher_tap, teacher_shapes, t.model, teacher)):
      _need(tap in shapes, f'{where}: {side}.{tap}: {model} has no feature {tap!r} (it has '
            f'{", ".join(sorted(shapes))})')
    s_shape, t_shape = student_shapes[student_tap], teacher_shapes[teacher_tap]
    shown = f'{pair[0]} {s_shape} and {pair[1]} {t_shape}'
    for term in terms:
      ranks = FEATURE_RANKS[term]
      _need(ranks is None or (len(s_shape) in ranks and len(t_shape) in ranks),
            f'{where}: {term} compares {RANK_NAMES.get(ranks)}, not {shown}')
    adapter = 'fitnet' in terms and s_shape != t_shape
    _need(not adapter or len(s_shape) == len(t_shape),
          f'{where}: fitnet cannot adapt {shown}: an adapter maps [H, W, C] to [H\', W\', C\'] '
          'or [D] to [D\'], not one kind to the other')
    pairs.append(PairPlan(student_tap, teacher, teacher_tap, s_shape, t_shape, adapter, terms))
  return tuple(pairs)


def _self_taps(name, stage, model_shapes) -> dict:
  """The StagePlan fields of a stage's own shallow classifiers: each tap with its shape, and
  the width of the final embedding that their embeddings match."""
  shapes = model_shapes(stage.model, stage.resolution, stage.model_kwargs.to_dict())
  where = f'stages.{name}.self_taps'
  for tap in stage.self_taps:
    _need(tap in shapes and len(shapes[tap]) == 3, f'{where}: {tap!r} is not a spatial feature '
          f'[H, W, C] of {stage.model} (it has {", ".join(sorted(shapes))})')
  _need('prelogits' in shapes, f'{where}: {stage.model} has no prelogits to match')
  return dict(self_taps=tuple((tap, shapes[tap]) for tap in stage.self_taps),
              prelogits_width=shapes['prelogits'][0])


def _sftn_branches(name, stage, model_shapes) -> dict:
  """The StagePlan fields of an SFTN stage's student branches: at each tap, this model's
  feature shape (the branch's input) and the student's (what its transform makes of it). A
  tap missing from either model, not spatial in both, or a student that cannot run from a tap
  is a ConfigError naming it."""
  where = f'stages.{name}.sftn_taps'
  student, resolution = stage.sftn_student, stage.sftn_resolution or stage.resolution
  _need(runs_from_tap(student), f'stages.{name}.sftn_student={student!r} cannot run its '
        "layers from a tap (models with from_tap: the CIFAR ResNets, cnn_*, bit_*)")
  mine = model_shapes(stage.model, stage.resolution, stage.model_kwargs.to_dict())
  theirs = model_shapes(student, resolution, {})
  branches = []
  for tap in stage.sftn_taps:
    for model, shapes in ((stage.model, mine), (student, theirs)):
      _need(tap in shapes, f'{where}: {model} has no tap {tap!r} (it has '
            f'{", ".join(sorted(shapes))})')
    _need(len(mine[tap]) == 3 and len(theirs[tap]) == 3 and tap != 'prelogits',
          f'{where}: a branch cannot start at {tap!r}: {stage.model} {mine[tap]} -> {student} '
          f'{theirs[tap]}; the transform maps a spatial block output [H, W, C] to another')
    branches.append((tap, mine[tap], theirs[tap]))
  return dict(sftn_student=student, sftn_branches=tuple(branches))


def _objective(name, stage, teachers, model_shapes) -> dict:
  """The StagePlan fields of a stage's loss: its weighted terms, their options and the feature
  pairs they (and the evaluation's CKA) compare. Default loss_weights: DEFAULT_LOSS_TERMS."""
  weights = stage.loss_weights.to_dict()
  if stage.peers:  # deep mutual learning: each peer's labels and mutual_kl terms
    return dict(loss_terms=tuple((t, float(weights[t])) for t in ('labels', *MUTUAL_LOSSES)
                                 if weights[t]), loss_options=stage.loss_options.to_dict())
  own = _self_taps(name, stage, model_shapes) if stage.self_taps else {}
  if stage.sftn_student:
    own.update(_sftn_branches(name, stage, model_shapes))
  if not stage.teachers:
    labels = float(weights['labels']) if stage.sftn_student and weights.get('labels') else 1.0
    return dict(loss_terms=(('labels', labels),) + tuple(
        (t, float(weights[t])) for t in SELF_LOSSES + SFTN_LOSSES if weights.get(t)),
                loss_options=stage.loss_options.to_dict(), **own)
  terms = tuple((t, float(weights[t])) for t in LOSS_TERMS if weights.get(t))
  feature_terms = [t for t, _ in terms if t in FEATURE_LOSSES]
  pairs = _feature_pairs(name, stage, 'feature_pairs', teachers, model_shapes, feature_terms)
  cka = (_feature_pairs(name, stage, 'cka_pairs', teachers, model_shapes, ())
         if stage.cka_pairs else pairs)
  cka = tuple({p.label: dataclasses.replace(p, adapter=False, terms=()) for p in cka}.values())
  return dict(loss_terms=terms, loss_options=stage.loss_options.to_dict(), feature_pairs=pairs,
              cka_pairs=cka, **own)


def stage_folder(workdir, name: str) -> str:
  """WORKDIR/NAME, local or in a bucket."""
  return str(paths.Path(workdir) / name)


def peer_folder(workdir, stage: str, peer: str) -> str:
  """WORKDIR/STAGE/PEER: where a mutual stage writes each peer as a stage folder of its own."""
  return str(paths.Path(workdir) / stage / peer)


def _teacher_plans(name, stage, workdir, earlier, base_size):
  """The teachers of stage `name`, each resolved to a source path, model and resolution."""
  teachers = []
  for tname, t in stage.teachers.items():
    source, _, peer = t.source.partition('/')
    if t.source in earlier:
      src = earlier[t.source]
      plan = TeacherPlan(tname, stage_folder(workdir, t.source), src.model, src.resolution,
                         src.model_kwargs)
    elif peer and source in earlier:  # a peer of an earlier mutual stage: its own folder
      src = {p.name: p for p in earlier[source].peers}[peer]
      plan = TeacherPlan(tname, peer_folder(workdir, source, peer), src.model, src.resolution,
                         src.model_kwargs)
    elif t.source.endswith('.npz'):
      plan = TeacherPlan(tname, t.source, t.model, t.resolution, t.model_kwargs.to_dict())
    else:
      try:
        info = checkpoint.read_stage_info(t.source)
      except checkpoint.CheckpointError as e:
        raise ConfigError(f'stages.{name}.teachers.{tname}: {e}') from None
      _need(not info.get('peers'), f'stages.{name}.teachers.{tname}: {t.source!r} trains peers; '
            'name one of them: ' + ', '.join(f"'{t.source}/{p}'" for p in info.get('peers', {})))
      plan = TeacherPlan(tname, t.source, t.model or info['model'],
                         t.resolution or info['resolution'],
                         t.model_kwargs.to_dict() or info.get('model_kwargs', {}))
    _need(plan.resolution <= base_size,
          f'stages.{name}.teachers.{tname}: resolution {plan.resolution} is above the stored '
          f'image size data.base_size={base_size}')
    teachers.append(plan)
  return tuple(teachers)


def _check_queue(name, size, batch, num_examples) -> None:
  """A CRD queue holds whole batches (a multiple of the batch size) of distinct examples (at
  most the train split: a larger queue would hold the same images twice as negatives)."""
  where = f'stages.{name}.loss_options.crd_queue={size}'
  _need(isinstance(size, int) and size > 0 and size % batch == 0,
        f'{where} must be a positive multiple of the batch size {batch}')
  _need(size <= num_examples, f'{where} is larger than the {num_examples} training examples '
        '(it would hold the same images several times)')


def fitted_batch_size(name: str, batch: int, num_examples: int, multiple: int) -> int:
  """`batch`, or for a train split smaller than it the largest multiple of `multiple` (gradient
  accumulation steps x devices) that fits: a small dataset trains with the batch it allows."""
  if batch <= num_examples:
    return batch
  fitted = num_examples // multiple * multiple
  _need(fitted > 0, f'stages.{name}: the {num_examples} training examples are fewer than '
        f'grad_accum_steps x devices = {multiple}')
  print(f'bigkd: stages.{name}: batch size {batch} > the {num_examples} training examples; '
        f'using {fitted}', flush=True)
  return fitted


def auto_base_size(config, median_long_side: int) -> int:
  """data.base_size=0: the canvas side for a folder of images whose median long side is
  `median_long_side`: at least the largest model resolution (stages and explicit teacher
  resolutions) and at most 4/3 of it (`bit_recipes.canvas_size`, enough for any crop not to be
  an upsample): small images are stored at their own size, large ones are not kept larger than
  the models can use."""
  from bigkd.bit_recipes import canvas_size
  stages = [config.stages[n] for n in stage_names(config) if n in config.stages]
  largest = max([s.resolution for s in stages] +
                [t.resolution for s in stages for t in s.teachers.values()] +
                [p.resolution for s in stages for p in s.peers.values()], default=1)
  return max(largest, min(canvas_size(largest), median_long_side))


def _data_plans(name, stage, batch, sizes) -> tuple:
  """The DataPlans of a stage's train_data: each source's rows per batch (`batch_rows`), at
  least one and at most its examples (an epoch of it holds whole batches' shares)."""
  where = f'stages.{name}.train_data'
  _need(sizes is not None, f'{where}: the sizes of its sources are not known here (read them '
        'first: bigkd.build.setup)')
  sources = list(stage.train_data.items())
  rows = batch_rows(batch, [s.weight for _, s in sources])
  plans = []
  for (source_name, source), n, size in zip(sources, rows, sizes):
    _need(n > 0, f'{where}.{source_name}.weight={source.weight} gives it no row of the batch of '
          f'{batch}; raise its weight or the batch size')
    _need(n <= size, f'{where}.{source_name}: {size} examples, fewer than its {n} rows of '
          f'every batch of {batch}; lower its weight or the batch size')
    plans.append(DataPlan(source_name, source.to_dict(), is_labelled(source), n, size))
  return tuple(plans)


def plan_stages(config, workdir: str, num_train_examples: int, num_classes: int,
                num_devices: int = 1, check_checkpoints: bool = True,
                train_sizes: dict | None = None) -> list[StagePlan]:
  """The stages of a checked config (see `check_config`), in order. Fits the batch to the
  train split (or a stage's train_data: `train_sizes` {stage: examples of each source}) and
  checks that every checkpoint from outside this run (teachers, `init`) exists and fits its
  model (shapes only, so nothing is loaded twice); `check_checkpoints` False: they need not
  exist here (`bigkd.launch_plan` compiles with their shapes alone)."""
  plans, cache = {}, {}
  model_shapes = lambda model, resolution, model_kwargs: _cached_feature_shapes(
      model, num_classes, resolution, model_kwargs, cache)
  for index, name in enumerate(stage_names(config)):
    stage = config.stages[name]
    accum = stage.grad_accum_steps or config.grad_accum_steps
    sizes = (train_sizes or {}).get(name)
    examples = sum(sizes) if stage.train_data and sizes else num_train_examples
    batch = fitted_batch_size(name, stage.batch_size or config.batch_size, examples,
                              accum * num_devices)
    data_plans = _data_plans(name, stage, batch, sizes) if stage.train_data else ()
    _need(not config.data.device_resident or batch * examples < 2 ** 31,
          f'stages.{name}: batch size x examples >= 2^31; use data.device_resident=False')
    steps_per_epoch = examples / batch
    steps = round(stage.epochs * steps_per_epoch) if stage.epochs > 0 else stage.steps
    opt, aug = stage_groups(config, name)
    warmup = (round(opt['warmup_epochs'] * steps_per_epoch) if opt['warmup_epochs'] > 0
              else opt['warmup_steps'])
    teachers = _teacher_plans(name, stage, workdir, plans, config.data.base_size)
    if stage.teachers and stage.loss_weights.crd:
      _check_queue(name, stage.loss_options.crd_queue, batch, examples)
    _need(stage.teacher_cache_top_k < num_classes, f'stages.{name}.teacher_cache_top_k='
          f'{stage.teacher_cache_top_k} must be below the {num_classes} classes')
    plans[name] = StagePlan(
        name=name, index=index, seed=config.seed, model=stage.model,
        model_kwargs=stage.model_kwargs.to_dict(), resolution=stage.resolution,
        compute_dtype=stage.compute_dtype, init=stage.init,
        steps=max(1, steps), warmup_steps=warmup, batch_size=batch,
        grad_accum_steps=accum, optimizer=opt,
        augment=aug,
        teachers=teachers,
        teaching_mode=stage.teaching_mode, loss=stage.loss, temperature=stage.temperature,
        label_weight=stage.label_weight, ensemble=stage.ensemble, num_classes=num_classes,
        teacher_dtype=config.teacher_dtype, min_fsdp_size=config.mesh.min_fsdp_size,
        device_resident=config.data.device_resident,
        shard_resident=config.data.shard_resident, reader_threads=config.data.reader_threads,
        eval_batch_size=config.eval_batch_size,
        eval_crop_fraction=config.data.eval_crop_fraction,
        log_every=config.log_every, log_views=config.log_views,
        tensorboard=config.tensorboard, eval_every=config.eval_every,
        checkpoint_every=config.checkpoint_every, keep_checkpoints=config.keep_checkpoints,
        teacher_cache=str(paths.absolute(stage.teacher_cache)) if stage.teacher_cache else '',
        teacher_cache_top_k=stage.teacher_cache_top_k, train_data=data_plans,
        peers=tuple(PeerPlan(p, s.model, s.resolution, s.model_kwargs.to_dict())
                    for p, s in stage.peers.items()),
        **_objective(name, stage, teachers, model_shapes))
    if stage.teacher_cache:  # what the cache must have been made for (the weights: when built)
      plans[name] = dataclasses.replace(plans[name], teacher_cache_identity=teacher_cache.identity(
          plans[name], config.data, examples))
      teacher_cache.check_reusable(plans[name].teacher_cache, plans[name].teacher_cache_identity,
                                   f'stages.{name}.teacher_cache')
  plans = list(plans.values())
  if check_checkpoints:
    check_external_checkpoints(plans, workdir)
  return plans


def check_external_checkpoints(plans, workdir) -> None:
  """Teachers and initialisations from outside this run must exist and fit their models."""
  internal = {stage_folder(workdir, p.name) for p in plans} | {
      peer_folder(workdir, p.name, peer.name) for p in plans for peer in p.peers}
  for plan in plans:
    checks = [(t.source, t.model, t.model_kwargs, t.resolution,
               f'stages.{plan.name}.teachers.{t.name}', None)
              for t in plan.teachers if t.source not in internal]
    if plan.init:
      checks.append((plan.init, plan.model, plan.model_kwargs, plan.resolution,
                     f'stages.{plan.name}.init', plan.num_classes))
    for source, model, model_kwargs, resolution, what, new_head in checks:
      try:
        checkpoint.check_fits(source, model, model_kwargs, plan.num_classes, resolution, what,
                              new_head_classes=new_head)
      except (checkpoint.CheckpointError, ValueError, OSError) as e:
        raise ConfigError(str(e).splitlines()[0] if str(e) else
                          f'{what}: unreadable checkpoint') from None
