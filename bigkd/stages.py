"""The loop: run each stage of a plan (teacher → student, or teacher → assistant → student
chains, TAKD) with logging, evaluation, checkpoints and resume.

`run` checks the whole config (`bigkd.plan`) before any work, then runs the stages in order,
skipping finished ones and resuming an unfinished one from its latest checkpoint. Everything a
stage computes with is made by `bigkd.build.build_stage`; this module only steps it.
"""
import json
import os

import jax
from clu import metric_writers, periodic_actions

from bigkd import checkpoint
from bigkd.build import RunData, build_stage, prepare
from bigkd.plan import StagePlan
from bigkd.sharding import describe


class StepRecordWriter(metric_writers.MetricWriter):
  """A clu writer that gathers the scalars written for one step into one record and hands it to
  `emit(step, record)` when a later step arrives, or on flush (train metrics, evaluation and the
  progress rate of a step become one line)."""

  def __init__(self):
    self._step, self._record = None, {}

  def emit(self, step: int, record: dict) -> None:
    raise NotImplementedError

  def write_scalars(self, step, scalars):
    if step != self._step:
      self.flush()
      self._step = step
    self._record.update({k: float(v) for k, v in scalars.items()})

  def flush(self):
    if self._record:
      self.emit(self._step, self._record)
    self._record = {}

  def close(self):
    self.flush()

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass


class JsonlWriter(StepRecordWriter):
  """`metrics.jsonl`: one JSON object per logged step. Opened at `resume_step`, it first drops
  the lines written after that checkpoint, so a resumed run's log equals an uninterrupted one."""

  def __init__(self, path: str, resume_step: int = 0):
    super().__init__()
    lines = []
    if resume_step and os.path.exists(path):
      with open(path) as f:
        lines = [l for l in f if l.strip() and json.loads(l)['step'] <= resume_step]
    self._file = open(path, 'w')
    self._file.writelines(lines)
    self._file.flush()

  def emit(self, step, record):
    self._file.write(json.dumps({'step': step, **record}) + '\n')
    self._file.flush()

  def close(self):
    super().close()
    self._file.close()


class ConsoleWriter(StepRecordWriter):
  """The terminal line of a logged step: loss, KL, agreement, steps/s and the ETA."""

  def __init__(self, name: str, total_steps: int):
    super().__init__()
    self.name, self.total = name, total_steps

  def emit(self, step, record):
    if 'loss' not in record:
      return
    extra = ''.join(f' {k} {record[k]:.4f}' for k in ('kl', 'agreement') if k in record)
    rate = record.get('steps_per_sec')
    timing = ''
    if rate:
      eta = int((self.total - step) / rate)
      timing = f' {rate:.1f} steps/s ETA {eta // 60}m{eta % 60:02d}s'
    print(f'[{self.name}] step {step}/{self.total} loss {record["loss"]:.4f}{extra}{timing}',
          flush=True)


def make_writer(stage_dir: str, plan: StagePlan, resume_step: int):
  """TensorBoard events, metrics.jsonl and the console, on process 0; nothing elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  return metric_writers.MultiWriter([
      metric_writers.SummaryWriter(stage_dir),
      JsonlWriter(os.path.join(stage_dir, 'metrics.jsonl'), resume_step),
      ConsoleWriter(plan.name, plan.steps)])


def run_stage(plan: StagePlan, data: RunData, mesh, workdir: str) -> dict:
  """Trains one stage to `plan.steps` (resuming from its latest checkpoint); returns and writes
  its summary (final val/test evaluation)."""
  stage_dir = os.path.join(workdir, plan.name)
  summary_path = os.path.join(stage_dir, 'summary.json')
  if os.path.exists(summary_path):
    print(f'[{plan.name}] already finished; skipping', flush=True)
    with open(summary_path) as f:
      return json.load(f)
  is_main = jax.process_index() == 0
  if is_main:
    checkpoint.write_stage_info(stage_dir, plan.model, plan.model_kwargs, plan.resolution,
                                plan.num_classes)
  stage = build_stage(plan, data, mesh)
  mngr = checkpoint.manager(stage_dir, plan.keep_checkpoints)
  start_step = mngr.latest_step() or 0
  state = stage.state
  if start_step:
    state = checkpoint.restore_state(mngr, start_step, state)
    print(f'[{plan.name}] resuming from step {start_step}', flush=True)
  if is_main:
    print(f'[{plan.name}] mesh data={mesh.shape["data"]} fsdp={mesh.shape["fsdp"]} over '
          f'{jax.process_count()} process(es): {describe(state.params)}'
          + ''.join(f'; teacher {t.name}: {describe(p)}'
                    for t, p in zip(plan.teachers, stage.teacher_params)), flush=True)

  writer = make_writer(stage_dir, plan, start_step)
  # Logging steps are the only host syncs: metrics are fetched there and nowhere else.
  progress = periodic_actions.ReportProgress(num_train_steps=plan.steps, writer=writer,
                                             every_steps=plan.log_every, every_secs=None)
  decoded_before = getattr(data.train, 'decoded', None)
  inputs = stage.inputs(start_step, plan.steps)
  try:
    for step in range(start_step + 1, plan.steps + 1):
      state, metrics = stage.train_step(state, stage.teacher_params, *next(inputs))
      logged = step % plan.log_every == 0 or step == plan.steps
      evaluated = plan.eval_every and step % plan.eval_every == 0 and step != plan.steps
      if logged:
        writer.write_scalars(step, jax.device_get(metrics))
      progress(step)
      if evaluated:
        writer.write_scalars(step, stage.evaluate(state.params))
      if (logged or evaluated) and step != plan.steps:  # the last record takes the final eval
        writer.flush()
      if step % plan.checkpoint_every == 0 or step == plan.steps:
        checkpoint.save(mngr, step, state.params, state.opt_state)
    mngr.wait_until_finished()
    final_eval = stage.evaluate(state.params)
    writer.write_scalars(plan.steps, final_eval)
  finally:
    mngr.close()
    writer.close()
  if decoded_before is not None:  # streamed: each process reads only its rows of each batch
    print(f'[{plan.name}] process {jax.process_index()} read and decoded '
          f'{data.train.decoded - decoded_before} training images', flush=True)
  summary = {'steps': plan.steps, 'model': plan.model, 'resolution': plan.resolution,
             **final_eval}
  if is_main:
    with open(summary_path, 'w') as f:
      json.dump(summary, f, indent=1)
  return summary


def print_table(summaries: dict) -> None:
  print(f'\n{"stage":<12} {"test acc":>9} {"teacher acc":>12} {"agreement":>10}')
  for name, s in summaries.items():
    fmt = lambda key: f'{100 * s[key]:.2f}' if key in s else '-'
    print(f'{name:<12} {fmt("test_accuracy"):>9} {fmt("test_teacher_accuracy"):>12} '
          f'{fmt("test_agreement"):>10}')


def run(config, workdir: str) -> dict:
  """Runs every stage of `config` in `workdir`; returns and writes the top-level summary."""
  mesh, data, plans = prepare(config, workdir)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1))
  summaries = {plan.name: run_stage(plan, data, mesh, workdir) for plan in plans}
  summary = {'stages': summaries}
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=1)
    print_table(summaries)
  return summary
