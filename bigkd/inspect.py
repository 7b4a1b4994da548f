"""The notebook API: open a run, finished or still training, and look inside it.

    run = inspect.load_run('runs/digits')       # config, summary, metrics, checkpoints
    run.metrics['student'].plot(x='step', y=['loss', 'kl_T1'])   # pandas DataFrames
    student = run.stage('student')             # its newest complete checkpoint (or step=N)
    logits = student.predict(images)           # uint8 [N, H, W, 3], the run's evaluation view
    student.evaluate('test')                   # what the loop logs as test_* for that step
    v = inspect.views(run, 'student', 40)      # the augmented batch of logged step 40

Reading never writes and never waits for the writer, so a running training is safe to open:
checkpoints are listed and restored without an orbax CheckpointManager (opening one cleans the
writer's temporary folders away), only finalised steps are listed (orbax writes a step into a
temporary folder and renames it once complete), and a half-written last line of
`metrics.jsonl` is left for the next look. `load_run` again to see what was written since.

Evaluation and views rebuild the stage with `bigkd.build.build_stage`, the code that trains it,
so they use the run's own data, evaluation protocol and augmentation, on whatever devices exist.
"""
import dataclasses
import functools
import json
from typing import NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pandas as pd

from bigkd import build, checkpoint, paths
from bigkd.config import ConfigError, stage_names
from bigkd.data.sampling import step_batch_indices
from bigkd.data.sources import Split
from bigkd.evaluate import eval_batches
from bigkd.forward import eval_forward
from bigkd.models import get_model
from bigkd.sharding import batch_sharding, make_mesh, mesh_shape
from bigkd.step import augmented_batch
from bigkd.views import step_key, teaching_mode_views, teaching_modes  # noqa: F401 (for notebooks)


def read_json(path):
  """A JSON file's content; None while it does not exist (or, written by an older bigkd in
  place, is half-written)."""
  try:
    return paths.read_json(path)
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def read_metrics(path) -> pd.DataFrame:
  """`metrics.jsonl` as a DataFrame, one row per logged step. Only lines that end in a newline
  count: the last one may be half-written by a running training."""
  try:
    text = paths.Path(path).read_text()
  except FileNotFoundError:
    text = ''
  lines = [line for line in text.split('\n')[:-1] if line.strip()]
  return pd.DataFrame([json.loads(line) for line in lines])


def complete_steps(stage_dir) -> list[int]:
  """The stage's finalised checkpoint steps, ascending (temporary folders are not listed)."""
  return sorted(ocp.step.checkpoint_steps(paths.absolute(stage_dir) / 'checkpoints'))


def read_item(path, handler, args):
  """One item of a checkpoint (e.g. `<step>/params`), read by a plain orbax Checkpointer."""
  checkpointer = ocp.Checkpointer(handler)
  try:
    return checkpointer.restore(path, args=args)
  finally:
    checkpointer.close()


def restore_params(stage_dir, step: int, targets):
  """The parameters saved at `step`, placed like `targets`, read without a CheckpointManager
  and checked against the checksum saved with them (when the checkpoint has one)."""
  path = paths.absolute(stage_dir) / 'checkpoints' / str(step)
  params = read_item(path / 'params', ocp.StandardCheckpointHandler(),
                     ocp.args.StandardRestore(targets))
  if (path / 'integrity').is_dir():
    saved = read_item(path / 'integrity', ocp.JsonCheckpointHandler(),
                      ocp.args.JsonRestore())
    if int(checkpoint.checksum(params)) != saved['params']:
      raise checkpoint.CheckpointError(f'{path}: params do not match their checksum')
  return params


def config_for_here(config: dict) -> ml_collections.ConfigDict:
  """The run's config as the ConfigDict it was, with its mesh replaced by plain data
  parallelism over this machine's devices when the recorded one does not fit them (the mesh
  changes where a result is computed, never the result)."""
  c = ml_collections.ConfigDict(config)
  try:
    mesh_shape(c.mesh.data, c.mesh.fsdp, jax.device_count())
  except ConfigError:
    c.mesh.data, c.mesh.fsdp = -1, 1
  return c


@dataclasses.dataclass
class Run:
  """A workdir as it was when `load_run` read it. `summary`: the final evaluation of each
  finished stage ({'stages': {name: {...}}}; while the run trains, the stages finished so far).
  `metrics`: stage -> DataFrame of metrics.jsonl. `checkpoints`: stage -> complete steps."""
  workdir: str
  config: dict | None
  summary: dict
  metrics: dict
  checkpoints: dict

  @property
  def stages(self) -> list[str]:
    """The stages started so far, in the run's order."""
    return list(self.checkpoints)

  @property
  def planned(self) -> list[str]:
    """Every stage of the config, started or not, in order."""
    return stage_names(self.config_here)

  @property
  def finished(self) -> bool:
    """Whether every stage of the config has its final evaluation."""
    return all(name in self.summary['stages'] for name in self.planned)

  def teachers_of(self, name: str) -> list[str]:
    """The stages (or peers, 'STAGE/PEER') of this run that teach stage `name` (teachers from
    elsewhere are left out; a peer is taught by no stage)."""
    teachers = self.config['stages'].get(name, {}).get('teachers', {})
    return [t['source'] for t in teachers.values()
            if t['source'].split('/')[0] in self.config['stages']]

  def models(self) -> list[str]:
    """The run's trained models with a checkpoint, in order: each stage, a mutual stage's peers
    in its place ('STAGE/PEER', once the stage has written them)."""
    out = []
    for name in self.stages:
      info = read_json(paths.Path(self.workdir) / name / 'stage.json') or {}
      peers = [f'{name}/{p}' for p in info.get('peers', {})]
      out += [p for p in peers if complete_steps(paths.Path(self.workdir) / p)] if peers else (
          [name] if self.checkpoints[name] else [])
    return out

  @functools.cached_property
  def config_here(self) -> ml_collections.ConfigDict:
    """The config to rebuild the run with on this machine (see `config_for_here`)."""
    if self.config is None:
      raise ValueError(f'{self.workdir}: no config.json (yet)')
    return config_for_here(self.config)

  @functools.cached_property
  def _prepared(self):
    """(mesh, data, {name: plan}), through the trainer's own `build.setup`."""
    mesh, data, plans = build.setup(self.config_here, self.workdir)
    return mesh, data, {p.name: p for p in plans}

  @property
  def mesh(self):
    return self._prepared[0]

  @property
  def data(self) -> build.RunData:
    return self._prepared[1]

  @property
  def plans(self) -> dict:
    return self._prepared[2]

  @functools.cached_property
  def _built(self) -> dict:
    return {}

  def built_stage(self, name: str) -> build.Stage:
    """The stage as the trainer builds it (jitted step, inputs, evaluation), made once."""
    if name not in self._built:
      self._built[name] = build.build_stage(self.plans[name], self.data, self.mesh)
    return self._built[name]

  def stage(self, name: str, step: int | None = None) -> 'TrainedStage':
    """Stage `name` at checkpoint `step` (default: its newest complete one)."""
    stage, _, peer = name.partition('/')
    if stage not in self.checkpoints:
      raise ValueError(f'{self.workdir}: no stage {name!r} (started: {self.stages})')
    peers = (read_json(paths.Path(self.workdir) / stage / 'stage.json') or {}).get('peers', {})
    if bool(peers) != bool(peer) or (peer and peer not in peers):
      raise ValueError(f'stage {stage} trains the peers {", ".join(peers)}: open one, e.g. '
                       f"'{stage}/{next(iter(peers))}'" if peers else
                       f'stage {stage} has no peers (open {stage!r})')
    steps = complete_steps(paths.Path(self.workdir) / name) if peer else self.checkpoints[name]
    if not steps:
      raise ValueError(f'stage {name}: no complete checkpoint yet')
    step = steps[-1] if step is None else step
    if step not in steps:
      raise ValueError(f'stage {name}: no complete checkpoint at step {step} (have {steps})')
    return TrainedStage(self, name, step)


def started_stages(workdir, config: dict | None) -> list[str]:
  """The run's stages that have started (their stage.json is written), in the run's order."""
  workdir = paths.Path(workdir)
  if config is not None:
    order = stage_names(ml_collections.ConfigDict(config))
  else:
    order = sorted(p.name for p in workdir.iterdir() if p.is_dir())
  return [n for n in order if read_json(workdir / n / 'stage.json') is not None]


def load_run(workdir: str) -> Run:
  """The run in `workdir` (a local folder or gs://...) as it is now: safe while it trains (see
  the module docstring)."""
  path = paths.Path(workdir)
  if not path.is_dir():
    raise ValueError(f'{workdir!r} is not a folder')
  config = read_json(path / 'config.json')
  names = started_stages(path, config)
  summary = read_json(path / 'summary.json')
  if summary is None:
    finished = {n: read_json(path / n / 'summary.json') for n in names}
    summary = {'stages': {n: s for n, s in finished.items() if s is not None}}
  return Run(workdir, config, summary,
             {n: read_metrics(path / n / 'metrics.jsonl') for n in names},
             {n: complete_steps(path / n) for n in names})


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def eval_logits(model, resolution: int, crop_fraction: float, params, images, sizes):
  """The evaluation's logits (`forward.eval_forward`), compiled once per model and shape,
  however often a run is opened."""
  return eval_forward(model, params, resolution, crop_fraction, images, sizes)[0]


class TrainedStage:
  """One stage of a run at one checkpoint: its model, parameters and predictions."""

  def __init__(self, run: Run, name: str, step: int):
    self.run, self.name, self.step = run, name, step
    self.dir = str(paths.Path(run.workdir) / name)
    self.info = checkpoint.read_stage_info(self.dir)
    kwargs = self.info.get('model_kwargs', {})
    self.model = get_model(self.info['model'], self.info['num_classes'], **kwargs)
    self._config = run.config_here
    self.mesh = make_mesh(self._config.mesh.data, self._config.mesh.fsdp)
    targets = build.param_targets(self.info['model'], kwargs, self.info['num_classes'],
                                  self.resolution, np.float32, self.mesh,
                                  self._config.mesh.min_fsdp_size)
    self.params = restore_params(self.dir, step, targets)

  @property
  def resolution(self) -> int:
    return self.info['resolution']

  @property
  def class_names(self) -> list[str] | None:
    """The class names stage.json records, if it does."""
    return self.info.get('class_names') or None

  def _predict(self, split) -> tuple[np.ndarray, np.ndarray]:
    """(float32 logits [N, classes], labels [N]) of a split (anything with `rows` and `len`),
    in evaluation batches split over the devices, the last one padded and its padding dropped."""
    logits, labels = [], []
    for images, sizes, batch_labels, mask in eval_batches(split, self._config.eval_batch_size,
                                                          batch_sharding(self.mesh)):
      keep = np.asarray(mask) > 0
      batch_logits = eval_logits(self.model, self.resolution,
                                 self._config.data.eval_crop_fraction, self.params, images, sizes)
      logits.append(jax.device_get(batch_logits)[keep])
      labels.append(np.asarray(batch_labels)[keep])
    return np.concatenate(logits).astype(np.float32), np.concatenate(labels)

  def predict(self, images, sizes=None) -> np.ndarray:
    """Logits for uint8 canvases [N, H, W, 3]; `sizes` [N, 2]: each image's (height, width) on
    its canvas (default: the whole canvas)."""
    images = np.asarray(images)
    if sizes is None:
      sizes = np.tile(np.array(images.shape[1:3], np.int32), (len(images), 1))
    return self._predict(Split(images, np.asarray(sizes, np.int32),
                               np.zeros(len(images), np.int32)))[0]

  def predict_split(self, split: str = 'test') -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the run's `split` ('train', 'val' or 'test')."""
    return self._predict(getattr(self.run.data, split))

  def evaluate(self, split: str = 'val') -> dict:
    """The loop's evaluation of this step on `split`: {f'{split}_accuracy': ..., and for a
    distilled stage f'{split}_teacher_accuracy', f'{split}_agreement', f'{split}_kl'}."""
    if '/' in self.name:  # a peer alone (its stage's evaluation needs every peer): accuracy
      logits, labels = self.predict_split(split)
      return {f'{split}_accuracy': float(np.mean(np.argmax(logits, -1) == labels))}
    return self.run.built_stage(self.name).evaluate(self.params, (split,))


def predict(stage_dir: str, images) -> np.ndarray:
  """Logits of a run's stage folder, at its newest checkpoint, for uint8 images [N, H, W, 3]."""
  stage_dir = paths.absolute(stage_dir)
  return load_run(str(stage_dir.parent)).stage(stage_dir.name).predict(images)


class Batch(NamedTuple):
  """The examples of one training step, before augmentation."""
  indices: np.ndarray  # the training examples, in order
  images: np.ndarray   # their canvases, uint8 [B, S, S, 3]
  sizes: np.ndarray    # int [B, 2]: each image's (height, width) on its canvas
  labels: np.ndarray   # int [B]


class Views(NamedTuple):
  """The augmented batch of one training step (`Batch`'s fields, then the views). Views are
  float32 in [-1, 1]."""
  step: int            # the logged (1-based) step
  indices: np.ndarray  # the training examples of the batch, in order
  images: np.ndarray   # their canvases, uint8 [B, S, S, 3]
  sizes: np.ndarray    # int [B, 2]: each image's (height, width) on its canvas
  labels: np.ndarray   # int [B]
  student: np.ndarray  # [B, r, r, 3] at the stage's resolution
  teachers: dict       # {resolution: [B, R, R, 3]}, one per teacher resolution; {}: supervised
  #                      (a stage with peers: the peers' views, and `student` None)
  targets: np.ndarray  # [B, classes]: one-hot labels, mixed like the student view


# The train step's augmentation alone, compiled once per stage spec (StepSpec is hashable).
augmented_batch_jit = jax.jit(augmented_batch, static_argnums=0)


def step_batch(run: Run, stage_name: str, step: int) -> Batch:
  """The examples logged step `step` (1 .. steps) of a stage trained on, as drawn from
  (seed, step) by the trainer."""
  plan = run.plans[stage_name]
  if not 1 <= step <= plan.steps:
    raise ValueError(f'stage {stage_name}: step {step} is outside 1..{plan.steps} '
                     '(steps are numbered as logged, from 1)')
  train = run.data.train_for(stage_name)
  indices = step_batch_indices(plan, step, len(train))
  return Batch(indices, *(np.asarray(x) for x in train.rows(indices)))


def views(run: Run, stage_name: str, step: int) -> Views:
  """The exact augmented batch logged step `step` (1 .. steps) of a stage trained on: a pure
  function of (seed, step), made by the train step's own `augmented_batch`."""
  batch = step_batch(run, stage_name, step)
  spec = run.built_stage(stage_name).spec
  student, teachers, targets = jax.device_get(augmented_batch_jit(
      spec, batch.images, batch.sizes, batch.labels, step_key(spec.seed, step)))
  return Views(step, *batch, student, teachers, targets)
