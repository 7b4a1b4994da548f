"""The study's runs: what each part runs for a seed, their trainer configs, training each run
in its own workdir (a finished one is read back) and collecting everything finished on disk."""
import contextlib
import dataclasses
import json
import os
import time

from bigkd.cli import config_module
from bigkd.config import comma_list

study_configs = config_module('study')
PARTS = study_configs.PARTS

MODE_TAGS = {'fixed_teacher': 'ft', 'independent_noise': 'in', 'consistent': 'cs',
             'function_matching': 'fm'}
METRICS = ('val_kl', 'val_agreement', 'val_accuracy', 'test_kl', 'test_agreement',
           'test_accuracy', 'test_teacher_accuracy')


@dataclasses.dataclass(frozen=True)
class Run:
  """One student run of a seed: what the experiments vary; the rest comes from the study."""
  mode: str
  budget: int
  optimizer: str = 'adam'
  lr: float = 3e-3
  teacher_resolution: int = 16
  shampoo: tuple = ()  # (option, value) pairs over the study's Shampoo options

  @property
  def name(self) -> str:
    """The run's folder: readable, and the same whichever part asks for it (shared runs)."""
    extra = ''.join(f'_{k}{v}' for k, v in self.shampoo)
    return (f'{MODE_TAGS[self.mode]}_t{self.teacher_resolution}_{self.optimizer}'
            f'_lr{self.lr:g}_b{self.budget}{extra}')


# ----------------------------------------------------------------------------- configs
def base_size(study) -> int:
  """One canvas for every run of the study, large enough for its largest model resolution, so
  runs differ only in what an experiment varies."""
  return max(study.teacher.resolution, study.student.resolution,
             *study.resolution.teacher_resolutions)


def trainer_config(study, seed: int):
  """The trainer's settings shared by every run: the digits demo's (batch, crops, decay)."""
  c = config_module('digits').get_config()
  c.seed = seed
  c.batch_size = study.batch_size
  c.data.base_size = base_size(study)
  c.log_every = 100
  c.eval_every = 0                 # the final evaluation is all the study reads
  c.checkpoint_every = 1000        # long runs resume mid-way; short ones save once, at the end
  c.keep_checkpoints = 1
  c.stages = {}
  return c


def teacher_config(study, seed: int, resolution: int):
  """A teacher trained on labels at `resolution` (one stage, `teacher`)."""
  from bigkd.config import stage_config
  c = trainer_config(study, seed)
  t = study.teacher
  c.optimizer.lr, c.optimizer.warmup_steps = t.lr, t.warmup_steps
  c.stages.teacher = stage_config(t.model, resolution, steps=t.steps, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  c.stage_order = 'teacher'
  return c


def warmup_steps(study, budget: int) -> int:
  return max(1, min(study.student.warmup_max, int(study.student.warmup_fraction * budget)))


def student_config(study, seed: int, run: Run, teacher_dir: str):
  """The run's student stage (`student`), distilled from the stage folder `teacher_dir`. Every
  run of a seed has stage index 0 in its own workdir: the same initialisation and batches."""
  from bigkd.config import stage_config
  c = trainer_config(study, seed)
  c.optimizer.name, c.optimizer.lr = run.optimizer, run.lr
  c.optimizer.warmup_steps = warmup_steps(study, run.budget)
  if run.optimizer == 'shampoo':
    options = dict(study.optimizer.shampoo.to_dict(), **dict(run.shampoo))
    for key in ('b1', 'b2'):  # decays the trainer passes to every optimiser
      if key in options:
        c.optimizer[key] = options.pop(key)
    c.optimizer.shampoo.update(options)
  s = study.student
  c.stages.student = stage_config(s.model, s.resolution, steps=run.budget,
                                  teachers={'teacher': os.path.abspath(teacher_dir)},
                                  teaching_mode=run.mode)
  c.stage_order = 'student'
  return c


# ----------------------------------------------------------------------------- the runs

def shampoo_variants(study) -> dict:
  """{variant: (option, value) pairs} of the shampoo_options part, from configs/study.py."""
  known = study_configs.SHAMPOO_VARIANTS
  variants = comma_list(study.shampoo_options.variants)
  unknown = [v for v in variants if v not in known]
  if unknown:
    raise ValueError(f'shampoo_options.variants: unknown {unknown} (known: {", ".join(known)})')
  return {v: tuple(sorted(known[v].items())) for v in variants}


def part_runs(study, part: str, seed: int, chosen: dict) -> list[Run]:
  """The runs of one part for one seed. `chosen`: {(optimizer, budget): lr} from the grid seeds;
  where a choice is missing (its grid is unfinished), the runs that need it are left out."""
  fm, lr = 'function_matching', study.student.lr
  if part == 'modes':
    return [Run(m, study.modes.budget, lr=lr) for m in comma_list(study.modes.modes)]
  if part == 'patience':
    return [Run(m, b, lr=lr) for m in comma_list(study.patience.modes)
            for b in study.patience.budgets]
  if part == 'resolution':
    return [Run(fm, study.resolution.budget, lr=lr, teacher_resolution=r)
            for r in study.resolution.teacher_resolutions]
  if part == 'optimizer':
    o, runs = study.optimizer, []
    for name, budgets, lrs in (('adam', o.adam_budgets, o.adam_lrs),
                               ('shampoo', o.shampoo_budgets, o.shampoo_lrs)):
      for b in budgets:
        grid = lrs if seed < o.grid_seeds else [chosen.get((name, b))]
        runs += [Run(fm, b, name, x) for x in grid if x is not None]
    return runs
  if part == 'shampoo_options':
    budget = study.shampoo_options.budget
    grid = [Run(fm, budget, 'shampoo', x) for x in study.optimizer.shampoo_lrs]
    best = chosen.get(('shampoo', budget))
    if seed != 0:
      return []
    return grid + ([Run(fm, budget, 'shampoo', best, shampoo=v)
                    for v in shampoo_variants(study).values() if v] if best else [])
  raise ValueError(f'unknown part {part!r} (known: {", ".join(PARTS)})')


def teacher_resolutions(study, part: str) -> list[int]:
  if part == 'resolution':
    return list(study.resolution.teacher_resolutions)
  return [study.teacher.resolution]


def seed_dir(root: str, seed: int) -> str:
  return os.path.join(root, f'seed_{seed}')


def teacher_workdir(root: str, seed: int, resolution: int) -> str:
  return os.path.join(seed_dir(root, seed), f'teacher_{resolution}px')


# ----------------------------------------------------------------------------- running
def read_json(path: str):
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value) -> None:
  """Written whole, then renamed: an interrupted write never leaves half a file."""
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=1)
  os.replace(path + '.tmp', path)


def finished(workdir: str, stage: str) -> dict | None:
  """What a finished run left: its stage summary (+ wall time), or the divergence record."""
  for name in ('diverged.json', os.path.join(stage, 'summary.json')):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      record = read_json(path)
      timing = os.path.join(workdir, 'study_time.json')
      return dict(record, **(read_json(timing) if os.path.exists(timing) else {}))
  return None


def train(config, workdir: str, stage: str) -> tuple[dict, bool]:
  """(the run's record, whether it was trained now). A finished run is read back once its config
  is checked unchanged (a changed study must not pass old numbers off as new ones). The
  trainer's own output goes to WORKDIR/train.log; a run that goes non-finite is recorded as
  diverged (a learning rate too high for its optimiser), not retried."""
  from bigkd import stages
  from bigkd import workdir as workdir_guard
  workdir_guard.check_config(config, workdir)
  done = finished(workdir, stage)
  if done is not None:
    return done, False
  os.makedirs(workdir, exist_ok=True)
  start = time.perf_counter()
  with open(os.path.join(workdir, 'train.log'), 'a') as log, contextlib.redirect_stdout(log):
    try:
      record = stages.run(config, workdir)['stages'][stage]
    except stages.NonFinite as e:
      record = {'diverged': str(e)}
      write_json(os.path.join(workdir, 'diverged.json'), record)
  timing = {'wall_s': round(time.perf_counter() - start, 2)}
  write_json(os.path.join(workdir, 'study_time.json'), timing)
  return dict(record, **timing), True


def run_record(run: Run, record: dict) -> dict:
  """The numbers of a run that the report reads, with what the run varied."""
  out = dict(dataclasses.asdict(run), name=run.name, shampoo=dict(run.shampoo),
             diverged='diverged' in record, wall_s=record.get('wall_s'))
  out.update({k: record.get(k) for k in METRICS})
  return out


def chosen_lrs(study, root: str) -> dict:
  """{(optimizer, budget): lr} with the lowest mean final val KL over the grid seeds, for the
  grids whose runs all finished (diverged runs lose)."""
  o, chosen = study.optimizer, {}
  for name, budgets, lrs in (('adam', o.adam_budgets, o.adam_lrs),
                             ('shampoo', o.shampoo_budgets, o.shampoo_lrs)):
    for b in budgets:
      means = {}
      for lr in lrs:
        records = [finished(os.path.join(seed_dir(root, s), Run('function_matching', b, name,
                                                                lr).name), 'student')
                   for s in range(min(o.grid_seeds, study.seeds))]
        if any(r is None for r in records):
          break
        kls = [r.get('val_kl') for r in records]
        means[lr] = float('inf') if any(k is None for k in kls) else sum(kls) / len(kls)
      else:
        if means and min(means.values()) < float('inf'):
          chosen[(name, b)] = min(means, key=means.get)
  return chosen


class Study:
  """Runs the parts of a study in ROOT, seed by seed, printing one line per run."""

  def __init__(self, study, root: str, out=print):
    self.study, self.root, self.out = study, root, out
    self.trained = []  # the runs (and teachers) this call trained, by folder

  def teacher(self, seed: int, resolution: int) -> str:
    workdir = teacher_workdir(self.root, seed, resolution)
    record, trained = train(teacher_config(self.study, seed, resolution), workdir, 'teacher')
    if 'diverged' in record:
      raise RuntimeError(f'teacher {workdir}: {record["diverged"]}')
    if trained:
      self.trained.append(workdir)
      self.out(f'[seed {seed}] teacher {resolution}px: test accuracy '
               f'{100 * record["test_accuracy"]:.2f}%  ({record["wall_s"]:.0f} s)')
    return os.path.join(workdir, 'teacher')

  def student(self, seed: int, run: Run) -> dict:
    teacher_dir = self.teacher(seed, run.teacher_resolution)
    workdir = os.path.join(seed_dir(self.root, seed), run.name)
    record, trained = train(student_config(self.study, seed, run, teacher_dir), workdir,
                            'student')
    if trained:
      self.trained.append(workdir)
      what = ('diverged' if 'diverged' in record else
              f'val KL {record["val_kl"]:.4f}  test KL {record["test_kl"]:.4f}  test agreement '
              f'{100 * record["test_agreement"]:.1f}%')
      self.out(f'[seed {seed}] {run.name}: {what}  ({record["wall_s"]:.0f} s)')
    return record

  def run(self, parts) -> None:
    """Seed by seed, part by part. A part's runs can depend on its earlier runs (the lr chosen
    on a grid), so each part is asked again until it names no run not yet done."""
    for seed in range(self.study.seeds):
      for part in parts:
        done = set()
        while True:
          todo = [r for r in part_runs(self.study, part, seed, chosen_lrs(self.study, self.root))
                  if r.name not in done]
          if not todo:
            break
          for run in todo:
            self.student(seed, run)
            done.add(run.name)


# ----------------------------------------------------------------------------- collecting
def collect(study, root: str) -> dict:
  """Everything finished on disk, per seed: {'teachers': {res: record}, 'runs': {name: record},
  'parts': {part: [run names]}} (a part lists the runs it needs, finished or not)."""
  chosen = chosen_lrs(study, root)
  seeds = {}
  for seed in range(study.seeds):
    teachers, runs, parts = {}, {}, {}
    for part in PARTS:
      wanted = part_runs(study, part, seed, chosen)
      parts[part] = [r.name for r in wanted]
      for res in teacher_resolutions(study, part):
        done = finished(teacher_workdir(root, seed, res), 'teacher')
        if done is not None:
          teachers[str(res)] = {k: done.get(k) for k in ('test_accuracy', 'val_accuracy',
                                                        'wall_s')}
      for run in wanted:
        done = finished(os.path.join(seed_dir(root, seed), run.name), 'student')
        if done is not None:
          runs[run.name] = run_record(run, done)
    seeds[str(seed)] = dict(teachers=teachers, runs=runs, parts=parts)
  return dict(seeds=seeds, chosen_lrs={f'{o}/{b}': lr for (o, b), lr in chosen.items()})
