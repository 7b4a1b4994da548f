"""The loop: run each stage of a plan (teacher → student, or teacher → assistant → student
chains, TAKD) with logging, evaluation, checkpoints and resume.

`run` checks the whole config (`bigkd.plan`) before any work, then runs the stages in order,
skipping finished ones and resuming an unfinished one from its latest checkpoint. Everything a
stage computes with is made by `bigkd.build.build_stage`; this module only steps it.
"""
import json
import signal
import threading

import jax

from bigkd.tf_quiet import import_tensorflow

import_tensorflow()  # before clu, whose TensorBoard writer imports it: no start-up notices
from clu import metric_writers, periodic_actions  # noqa: E402

from bigkd import checkpoint, paths, views  # noqa: E402
from bigkd import workdir as workdir_guard  # noqa: E402
from bigkd.build import RunData, build_stage, setup  # noqa: E402
from bigkd.config import ConfigError  # noqa: E402
from bigkd.data.sampling import step_batch_indices  # noqa: E402
from bigkd.plan import StagePlan  # noqa: E402
from bigkd.sharding import describe  # noqa: E402
from bigkd.step import logged_means  # noqa: E402


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
  the lines written after that checkpoint, so a resumed run's log equals an uninterrupted one.
  Each record is appended locally; in a bucket (no append) the file is written again whole,
  once per logged step (a log of 10,000 records is about 3 MB)."""

  def __init__(self, path, resume_step: int = 0):
    super().__init__()
    self._path = paths.Path(path)
    self._lines = []
    if resume_step and self._path.exists():
      self._lines = [l + '\n' for l in self._path.read_text().splitlines()
                     if l.strip() and json.loads(l)['step'] <= resume_step]
    paths.write_text(self._path, ''.join(self._lines))

  def emit(self, step, record):
    line = json.dumps({'step': step, **record}) + '\n'
    self._lines.append(line)
    if paths.is_bucket(self._path):
      paths.write_text(self._path, ''.join(self._lines))
    else:
      paths.append_text(self._path, line)


class ScalarSummaryWriter(metric_writers.SummaryWriter):
  """clu's TensorBoard writer with scalars written as classic `simple_value` summaries:
  TensorBoard lists them under Scalars and its `EventAccumulator(...).Scalars(tag)` reads them
  (tf.summary.scalar writes tensor summaries, which the accumulator files under Tensors)."""

  def write_scalars(self, step, scalars):
    tf = import_tensorflow()
    from tensorboard.compat.proto import summary_pb2
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                                         for k, v in scalars.items()])
    with self._summary_writer.as_default():
      tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)


class ConsoleWriter(StepRecordWriter):
  """The terminal line of a logged step: loss, KL, agreement, steps/s and the ETA."""

  def __init__(self, name: str, total_steps: int):
    super().__init__()
    self.name, self.total = name, total_steps

  def emit(self, step, record):
    if 'loss' not in record:
      return
    extra = ''.join(f' {k} {record[k]:.4f}' for k in ('kl_T1', 'agreement', 'val_accuracy')
                    if k in record)
    rate = record.get('steps_per_sec')
    timing = ''
    if rate:
      eta = int((self.total - step) / rate)
      timing = f' {rate:.1f} steps/s ETA {eta // 60}m{eta % 60:02d}s'
    print(f'[{self.name}] step {step}/{self.total} loss {record["loss"]:.4f}{extra}{timing}',
          flush=True)


def make_writer(stage_dir, plan: StagePlan, resume_step: int, tensorboard: bool):
  """TensorBoard events (through TensorFlow's file system, which knows gs:// too),
  metrics.jsonl and the console, on process 0; nothing elsewhere."""
  if jax.process_index() != 0:
    return metric_writers.MultiWriter([])
  events = [ScalarSummaryWriter(str(stage_dir))] if tensorboard else []
  return metric_writers.MultiWriter(events + [
      JsonlWriter(paths.Path(stage_dir) / 'metrics.jsonl', resume_step),
      ConsoleWriter(plan.name, plan.steps)])


PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by SIGTERM/SIGINT with a checkpoint; re-run
NONFINITE_EXIT_CODE = 3   # the loss, gradients or parameters went NaN/Inf; nothing bad saved


class Preempted(Exception):
  """SIGTERM or SIGINT (or, multi-process, jax's preemption notice) stopped a stage after it
  wrote a checkpoint at `step`: re-running the same command resumes there."""

  def __init__(self, stage: str, step: int, cause: str):
    super().__init__(f'stage {stage}: {cause}: stopped at step {step} with a checkpoint there; '
                     'run the same command again to resume')
    self.stage, self.step = stage, step


class NonFinite(Exception):
  """A stage's loss, gradients or parameters became NaN/Inf at `step`; the run stops without
  saving that state (the checkpoints before it are kept) and without a summary."""

  def __init__(self, stage: str, step: int, last_good):
    super().__init__(f'stage {stage}: non-finite loss/gradients at step {step} '
                     f'(last good checkpoint: step {last_good if last_good else "none"})')
    self.stage, self.step, self.last_good = stage, step, last_good


class PreemptionWatch:
  """Notes SIGTERM/SIGINT so the loop can stop at a step boundary with a checkpoint.

  One process: Python handlers set a flag, checked once per step (no sync). Several processes:
  each may be signalled at a different step, so the handlers are left to jax.distributed's
  preemption notifier (SIGTERM) and orbax's `reached_preemption(step)` says, on every process
  at the same step, when to save and stop. A second signal stops at once (KeyboardInterrupt)."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received, self._previous = None, {}

  def __enter__(self):
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._note) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc_info):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    self._previous = {}

  def _note(self, signum, frame):
    if self.received is not None:
      self.__exit__()
      raise KeyboardInterrupt
    self.received = signal.Signals(signum).name

  def reached(self, mngr, step: int) -> str | None:
    """The cause ('SIGTERM', ...) when the loop must save at `step` and stop; else None."""
    if jax.process_count() > 1:
      return 'preemption notice' if mngr.reached_preemption(step) else None
    return self.received


def logged_metrics(state, metrics) -> dict:
  """What a log step writes: loss, kl_T1, agreement and grad_norm (and each weighted loss term,
  `loss_TERM`) averaged over the steps since the previous log (`step.MEAN_METRICS`), the
  learning rate at this step and, when updates are skipped, their running count."""
  sums, now = jax.device_get((state.metric_sums, metrics))
  return {**{k: v for k, v in now.items() if k in ('lr', 'skipped_updates')},
          **logged_means(sums)}


def write_views(writer, stage, data: RunData) -> None:
  """TensorBoard image `views`: what the teacher and the student of a distilled stage are shown
  at step 1 under each teaching mode (`views.views_grid_image`), for a user watching the run."""
  train = data.train_for(stage.plan.name)
  indices = step_batch_indices(stage.plan, 1, len(train))[:4]
  grid = views.views_grid_image(stage.spec, *train.rows(indices), step=1)
  writer.write_images(1, {'views': grid[None]})


def stop_if_nonfinite(state, mngr, stage: str) -> None:
  """Raises NonFinite when a step so far went non-finite, after the saves in flight end (they
  hold earlier, good steps)."""
  bad = int(state.first_nonfinite_step)  # a host sync: only where the loop syncs anyway
  if bad:
    mngr.wait_until_finished()
    raise NonFinite(stage, bad, mngr.latest_step())


def run_stage(plan: StagePlan, data: RunData, mesh, workdir: str) -> dict:
  """Trains one stage to `plan.steps` (resuming from its newest readable checkpoint); returns
  and writes its summary (final val/test evaluation). Raises Preempted (a checkpoint was written
  where it stopped) or NonFinite (nothing bad was written)."""
  stage_dir = paths.Path(workdir) / plan.name
  summary_path = stage_dir / 'summary.json'
  if summary_path.exists():
    print(f'[{plan.name}] already finished; skipping', flush=True)
    return paths.read_json(summary_path)
  is_main = jax.process_index() == 0
  stage = build_stage(plan, data, mesh)  # may refuse a teacher (or its cache): nothing written yet
  if is_main:
    checkpoint.write_stage_info(stage_dir, plan.model, plan.model_kwargs, plan.resolution,
                                plan.num_classes, data.class_names,
                                workdir_guard.peer_records(plan))
  mngr = checkpoint.manager(stage_dir, plan.keep_checkpoints)
  try:
    state, start_step = checkpoint.restore_newest_good(mngr, stage.state, plan.name)
  except BaseException:
    mngr.close()
    raise
  if start_step:
    print(f'[{plan.name}] resuming from step {start_step}', flush=True)
  if is_main:
    print(f'[{plan.name}] mesh data={mesh.shape["data"]} fsdp={mesh.shape["fsdp"]} over '
          f'{jax.process_count()} process(es): {describe(state.params)}'
          + ''.join(f'; teachers.{t.name}: {describe(p)}'
                    for t, p in zip(plan.teachers, stage.teacher_params)), flush=True)

  writer = make_writer(stage_dir, plan, start_step, plan.tensorboard)
  if plan.teachers and plan.log_views and plan.tensorboard and not start_step and is_main:
    write_views(writer, stage, data)
  # Logging steps (and checkpoints) are the only host syncs: metrics and the non-finite flag
  # are fetched there and nowhere else.
  progress = periodic_actions.ReportProgress(num_train_steps=plan.steps, writer=writer,
                                             every_steps=plan.log_every, every_secs=None)
  train = data.train_for(plan.name)
  decoded_before = getattr(train, 'decoded', None)
  inputs = stage.inputs(start_step, plan.steps)
  try:
    with PreemptionWatch() as watch:
      for step in range(start_step + 1, plan.steps + 1):
        state, metrics = stage.train_step(state, stage.teacher_params, *next(inputs))
        logged = step % plan.log_every == 0 or step == plan.steps
        evaluated = plan.eval_every and step % plan.eval_every == 0 and step != plan.steps
        preempted = watch.reached(mngr, step)
        saved = step % plan.checkpoint_every == 0 or step == plan.steps or preempted
        if logged or saved:
          stop_if_nonfinite(state, mngr, plan.name)
        if logged:
          writer.write_scalars(step, logged_metrics(state, metrics))
        progress(step)
        if evaluated:
          writer.write_scalars(step, stage.evaluate(state.params))
        if (logged or evaluated) and step != plan.steps:  # the last record takes the final eval
          writer.flush()
        if saved:
          checkpoint.save(mngr, step, state)
        if preempted:
          mngr.wait_until_finished()
          raise Preempted(plan.name, step, preempted)
      mngr.wait_until_finished()
    if plan.peers:  # each peer as a stage folder of its own, before the summary says "done"
      checkpoint.save_peers(stage_dir, plan.steps, state.params, workdir_guard.peer_records(plan),
                            plan.num_classes, data.class_names)
    final_eval = stage.evaluate(state.params)
    writer.write_scalars(plan.steps, final_eval)
  finally:
    mngr.close()
    writer.close()
  if decoded_before is not None:  # streamed: each process reads only its rows of each batch
    print(f'[{plan.name}] process {jax.process_index()} read and decoded '
          f'{train.decoded - decoded_before} training images', flush=True)
  summary = {'steps': plan.steps, 'model': plan.model, 'resolution': plan.resolution,
             **({'peers': workdir_guard.peer_records(plan)} if plan.peers else {}), **final_eval}
  if is_main:
    paths.write_json(summary_path, summary)
  return summary


def table_rows(summaries: dict) -> dict:
  """{row: summary}: each stage, then a mutual stage's peers ('STAGE/PEER', their `PEER/...`
  metrics; agreement with the other peers' mean prediction)."""
  rows = {}
  for name, s in summaries.items():
    rows[name] = s
    for peer in s.get('peers', {}):
      rows[f'{name}/{peer}'] = {k[len(peer) + 1:]: v for k, v in s.items()
                                if k.startswith(f'{peer}/')}
  return rows


def print_table(summaries: dict) -> None:
  summaries = table_rows(summaries)
  width = max([12, *map(len, summaries)])
  print(f'\n{"stage":<{width}} {"test acc":>9} {"teacher acc":>12} {"agreement":>10}')
  for name, s in summaries.items():
    fmt = lambda key: f'{100 * s[key]:.2f}' if key in s else '-'
    print(f'{name:<{width}} {fmt("test_accuracy"):>9} {fmt("test_teacher_accuracy"):>12} '
          f'{fmt("test_agreement"):>10}')


def checked_everywhere(check):
  """`check()`'s result when it passed on every process; else this process's error (bad config
  or workdir: exit code 2), or a ConfigError saying another process refused. Multi-host, a host
  that cannot reach the bucket stops every process before any of them writes a file. Call it
  before anything that synchronises the processes (orbax does, when it opens a teacher)."""
  try:
    result, error = check(), None
  except ConfigError as e:
    result, error = None, e
  if not checkpoint.agreed(error is None):
    raise error or ConfigError('another process refused the run (its error says why); '
                               'nothing was written')
  return result


def run(config, workdir: str) -> dict:
  """Runs every stage of `config` in `workdir`; returns and writes the top-level summary.
  Every check (the workdir, the config against the one it was started with, the config itself,
  the data) comes before the workdir is touched: a refused run leaves it as it was."""
  def check_workdir():
    workdir_guard.check_path(workdir)
    return workdir_guard.check_config(config, workdir)

  changes = checked_everywhere(check_workdir)
  kind, count = jax.devices()[0].device_kind, jax.device_count()
  if tight := workdir_guard.planned_not_to_fit(workdir, kind, count):
    checkpoint.warn(f'plan.json in the workdir (made for {count} x {kind}, these devices) says '
                    f'stage(s) {", ".join(tight)} do not fit in device memory')
  mesh, data, plans = setup(config, workdir)
  workdir_guard.check_started_stages(plans, workdir)
  workdir_guard.start(config, workdir, changes, is_main=jax.process_index() == 0)
  summaries = {plan.name: run_stage(plan, data, mesh, workdir) for plan in plans}
  summary = {'stages': summaries}
  if jax.process_index() == 0:
    paths.write_json(paths.Path(workdir) / 'summary.json', summary)
    print_table(summaries)
    print(f'\nreport: bigkd-report {workdir} writes {paths.Path(workdir) / "report.html"} '
          '(or python -m bigkd.report)', flush=True)
  return summary
