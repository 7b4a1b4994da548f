"""Feature- and relation-based distillation, DKD, DIST, "be your own teacher" and the CKA
evaluator, end to end on the digits (issue 13).

One stage distils the session's trained teacher (cnn_small at 12 px) into cnn_tiny at 8 px with
every method at once, each term logged on its own (`loss_TERM`), so that each method has its own
test while the run compiles one train step, not eight (compiling is what costs here):
  FitNet (through an adapter: [4, 4, 8] -> [6, 6, 16]), AT (the teacher's 6x6 map shrunk to
  4x4) and SP on student stage1 vs teacher stage1; PKT, RKD distance / angle and CRD (its
  heads and queues in the train state) on the embeddings (prelogits: 64 vs 288); KL, labels, DKD
  and DIST on the logits; a shallow classifier on the student's own stage1 (self_ce, self_kl,
  self_feature); CKA of both pairs.
The same run on 8 devices (a 4 x 2 data x fsdp mesh, a subprocess, started first so the two
overlap) ends with the same metrics; the stage resumes from its middle checkpoint bitwise,
adapters, heads and queues included, and exports only the student. Config errors are in
test_cli.py (MALFORMED) and below.
"""
import json
import math
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from bigkd import checkpoint, inspect, report, stages
from bigkd.config import ConfigError, stage_config
from bigkd.plan import check_config, plan_stages
from support import final_params, finish, random_stage, read_metrics, start, tiny_config

STEPS, LOG_EVERY = 60, 20
SPATIAL = (('student.stage1', 'teacher.stage1'),)
EMBEDDING = (('student.prelogits', 'teacher.prelogits'),)
# Weights that give each term a start near 1, so that every one of them is learnt.
WEIGHTS = dict(kl=1.0, labels=1.0, fitnet=1.0, at=5.0, sp=3000.0, pkt=3000.0, rkd_distance=25.0,
               rkd_angle=50.0, crd=0.1, dkd=0.1, dist=1.0, self_ce=0.5, self_kl=0.5,
               self_feature=1.0)
METHODS = ('fitnet', 'at', 'sp', 'pkt', 'rkd_distance', 'rkd_angle', 'crd', 'dkd', 'dist',
           'self_ce', 'self_kl', 'self_feature')
SELF_HEAD = 'self_stage1'  # the shallow classifier's key in aux_params (be your own teacher)
ADAPTER = '0_stage1_to_teacher_stage1'  # the adapter's key in aux_params
CRD = 'crd_1_prelogits_to_teacher_prelogits'  # the CRD heads' key in aux_params and loss_state
QUEUE = 256  # 8 batches: the queue fills, then wraps around several times in the run


def methods_config(teacher_dir):
  c = tiny_config()
  c.log_every = LOG_EVERY
  c.checkpoint_every = STEPS // 2  # a middle checkpoint for the resume test
  c.stages.student = stage_config(
      'cnn_tiny', 8, teachers={'teacher': teacher_dir}, steps=STEPS, loss_weights=WEIGHTS,
      feature_pairs=(SPATIAL[0] + ('fitnet,at,sp',),
                     EMBEDDING[0] + ('pkt,rkd_distance,rkd_angle,crd',)),
      loss_options=dict(crd_queue=QUEUE), self_taps=('stage1',))
  c.stage_order = 'student'
  return c


RUNNER = """
import sys
from bigkd import stages
from test_feature_distill import methods_config
config = methods_config(sys.argv[1])
config.mesh.data, config.mesh.fsdp = 4, 2  # the CRD queues replicated, the batch split over 4
stages.run(config, sys.argv[2])
"""


class MethodRuns:
  """The 1-device run (in this process) and the 8-device one (a subprocess started before it)."""

  def __init__(self, teacher_dir, root):
    self.teacher_dir, self.one, self.eight = teacher_dir, root / 'one', root / 'eight'
    self._proc = start([sys.executable, '-c', RUNNER, teacher_dir, str(self.eight)], devices=8)
    try:
      self.summary = stages.run(methods_config(teacher_dir), str(self.one))['stages']
    except BaseException:
      self._proc.kill()
      raise

  def eight_devices(self):
    finish(self._proc)
    return self.eight


@pytest.fixture(scope='module')
def runs(trained_teacher, tmp_path_factory):
  runs = MethodRuns(trained_teacher[0], tmp_path_factory.mktemp('methods'))
  yield runs
  runs.eight_devices()


@pytest.mark.integration
@pytest.mark.parametrize('method', METHODS)
def test_each_method_trains_end_to_end(runs, method):
  log = read_metrics(runs.one / 'student')
  values = [m[f'loss_{method}'] for m in log]
  assert [m['step'] for m in log] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  assert all(math.isfinite(v) for v in values), values
  if method == 'crd':  # its first interval starts with an empty queue (a loss of 0 at step 0)
    assert values[-1] < 2 * math.log(QUEUE + 1), values  # chance: the positive is one of Q + 1
  elif method in ('self_kl', 'self_feature'):  # their targets, the model's own final output and
    # embedding, move as it learns (sharper, larger): these terms can grow. Their values and
    # gradients: test_objective.py.
    assert 0 < values[-1] < 1, values
  else:
    assert values[-1] < values[0], values
  for m in log:  # the loss is the weighted sum of the logged terms, and nothing else
    assert {k for k in m if k.startswith('loss_')} == {f'loss_{t}' for t in WEIGHTS}
    assert m['loss'] == pytest.approx(sum(w * m[f'loss_{t}'] for t, w in WEIGHTS.items()),
                                      rel=1e-6)


@pytest.mark.integration
def test_student_learns_the_teacher_and_cka_is_reported(runs):
  log, summary = read_metrics(runs.one / 'student'), runs.summary['student']
  assert log[-1]['kl_T1'] < 0.9 * log[0]['kl_T1'] and summary['test_agreement'] > 0.4, summary
  labels = ['student.stage1,teacher.stage1', 'student.prelogits,teacher.prelogits']
  for split in ('val', 'test'):  # next to agreement and KL: the mean and, two pairs, each
    each = [summary[f'{split}_cka/{label}'] for label in labels]
    assert summary[f'{split}_cka'] == pytest.approx(np.mean(each))
    assert all(0 < v <= 1 for v in each), summary
  table = report.summary_table(inspect.load_run(str(runs.one)), 'test')  # the report page
  assert '<th>test cka</th>' in table and f'<td>{summary["test_cka"]:.4f}</td>' in table


def student_params(stage_dir):
  return final_params(str(stage_dir), 'cnn_tiny', 8)


def saved_item(stage_dir, item='aux_params'):
  """(The latest checkpoint's metadata, its `item`.)"""
  mngr = checkpoint.manager(str(stage_dir))
  step = mngr.latest_step()
  meta = mngr.item_metadata(step)
  restored = mngr.restore(step, args=checkpoint.ocp.args.Composite(
      **{item: checkpoint.ocp.args.StandardRestore()}))[item]
  mngr.close()
  return meta, jax.device_get(restored)


@pytest.mark.integration
def test_adapter_and_queues_are_saved_apart_exported_never_and_resume_bitwise(runs, tmp_path,
                                                                             capsys):
  stage_dir = runs.one / 'student'
  meta, adapters = saved_item(stage_dir)
  assert set(adapters) == {ADAPTER, CRD, SELF_HEAD} and 'params' in meta
  assert adapters[ADAPTER]['Conv_0']['kernel'].shape == (1, 1, 8, 16)
  assert adapters[CRD]['student']['kernel'].shape == (64, 128)
  queues = saved_item(stage_dir, 'loss_state')[1][CRD]
  assert queues['teacher'].shape == (QUEUE, 128) and queues['filled'] == QUEUE
  assert queues['next'] == STEPS * 32 % QUEUE  # batch 32
  np.testing.assert_allclose(np.linalg.norm(queues['student'], axis=1), 1, rtol=1e-5)
  # What a later stage, `init` or a notebook reads is the student alone (it fits cnn_tiny).
  student = student_params(stage_dir)
  checkpoint.check_fits(str(stage_dir), 'cnn_tiny', {}, 10, 8, 'as a teacher')  # no extra leaf
  from bigkd import inspect
  opened = inspect.load_run(str(runs.one)).stage('student')
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(opened.params), student)

  # Resumed at the middle checkpoint (as after a kill): the same adapters, student, log, summary.
  resumed = tmp_path / 'resumed'
  shutil.copytree(runs.one, resumed)
  shutil.rmtree(resumed / 'student' / 'checkpoints' / str(STEPS))
  for path in (resumed / 'student' / 'summary.json', resumed / 'summary.json'):
    os.remove(path)
  capsys.readouterr()
  summary = stages.run(methods_config(runs.teacher_dir), str(resumed))['stages']
  assert f'[student] resuming from step {STEPS // 2}' in capsys.readouterr().out
  assert summary == runs.summary
  jax.tree.map(np.testing.assert_array_equal, saved_item(resumed / 'student')[1], adapters)
  jax.tree.map(np.testing.assert_array_equal,
               saved_item(resumed / 'student', 'loss_state')[1][CRD], queues)
  jax.tree.map(np.testing.assert_array_equal, student_params(resumed / 'student'), student)
  drop = lambda log: [{k: v for k, v in m.items() if k not in ('steps_per_sec', 'uptime')}
                      for m in log]
  assert drop(read_metrics(resumed / 'student')) == drop(read_metrics(stage_dir))


# --- Checks before any work (the command-line ones: test_cli.py's MALFORMED). ----------------

@pytest.fixture(scope='module')
def random_teacher(tmp_path_factory):
  return random_stage(str(tmp_path_factory.mktemp('random_teacher') / 'teacher'))


def student_config(teacher_dir, **fields):
  c = tiny_config()
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'teacher': teacher_dir}, steps=5,
                                  **fields)
  c.stage_order = 'student'
  return c


def planned(config, workdir='/nonexistent'):
  check_config(config, 1)
  return plan_stages(config, workdir, 1197, 10)[-1]


@pytest.mark.parametrize('fields, fragments', [
    (dict(feature_pairs=(('student.stage2', 'teacher.stage2', 'sp', 'x'),),
          loss_weights=dict(sp=1.0)), ('is not a pair',)),
    (dict(feature_pairs=(('teacher.stage2', 'student.stage2'),), loss_weights=dict(sp=1.0)),
     ('must name a student feature',)),
    (dict(cka_pairs=(('student.stage2', 'teacher.stage7'),)),
     ('cka_pairs', 'teacher.stage7', 'cnn_small has no feature')),
    (dict(feature_pairs=EMBEDDING, loss_weights=dict(fitnet=1.0, at=1.0)),
     ('at compares spatial features', 'student.prelogits (64,)', 'teacher.prelogits (288,)')),
    (dict(feature_pairs=(EMBEDDING[0] + ('rkd_angle',),), loss_weights=dict(pkt=1.0)),
     ('rkd_angle is not a weighted feature loss of this stage (pkt)',)),
    (dict(feature_pairs=(EMBEDDING[0] + ('pkt',),), loss_weights=dict(pkt=1.0, sp=1.0)),
     ('loss_weights.sp: a feature loss needs feature_pairs that it compares',)),
    (dict(cka_pairs=(SPATIAL[0] + ('sp',),)), ('a CKA pair takes no loss names',)),
    (dict(feature_pairs=SPATIAL, loss_weights=dict(crd=1.0), loss_options=dict(crd_queue=64)),
     ('crd compares vector features (prelogits), not student.stage1 (4, 4, 8)',)),
    (dict(feature_pairs=EMBEDDING, loss_weights=dict(crd=1.0), loss_options=dict(crd_queue=100)),
     ('stages.student.loss_options.crd_queue=100 must be a positive multiple of the batch '
      'size 32',)),
    (dict(feature_pairs=EMBEDDING, loss_weights=dict(crd=1.0)),  # the default: 16384
     ('crd_queue=16384 is larger than the 1197 training examples',)),
    (dict(self_taps=('prelogits',), loss_weights=dict(self_ce=1.0)),
     ("stages.student.self_taps: 'prelogits' is not a spatial feature [H, W, C] of cnn_tiny",)),
    (dict(loss_weights=dict(self_kl=1.0)),
     ('loss_weights.self_kl: self-distillation terms need self_taps',)),
    (dict(self_taps=('stage1',)), ('self_taps needs a weighted self_ce, self_kl or self_feature',)),
])
def test_bad_pairs_are_config_errors_naming_them(random_teacher, fields, fragments):
  with pytest.raises(ConfigError) as error:
    planned(student_config(random_teacher, **fields))
  assert all(f in str(error.value) for f in fragments), str(error.value)


def test_unknown_terms_are_refused_where_a_config_names_them(random_teacher):
  with pytest.raises(ConfigError, match="unknown field loss_weights.'fitnett'"):
    stage_config('cnn_tiny', 8, loss_weights=dict(fitnett=1.0))
  c = student_config(random_teacher)
  c.stages.student.loss_weights.nst = 1.0  # a ConfigDict built by hand is not locked
  with pytest.raises(ConfigError, match='unknown term.* nst .*known: kl, labels, fitnet'):
    planned(c)


def test_own_classifiers_need_no_teacher():
  c = tiny_config()
  c.stages.teacher.self_taps = ('stage1', 'stage2')
  c.stages.teacher.loss_weights.self_ce = 0.5
  c.stages.teacher.loss_weights.self_feature = 0.1
  check_config(c, 1)
  [plan] = plan_stages(c, '/nonexistent', 1197, 10)
  assert plan.loss_terms == (('labels', 1.0), ('self_ce', 0.5), ('self_feature', 0.1))
  assert plan.self_taps == (('stage1', (6, 6, 16)), ('stage2', (3, 3, 32)))
  assert plan.prelogits_width == 288


def test_every_new_field_is_documented_for_fields():
  from bigkd.config import field_docs
  docs = field_docs()
  keys = ['stages.*.feature_pairs', 'stages.*.cka_pairs', 'stages.*.self_taps'] + [
      f'stages.*.loss_weights.{t}' for t in WEIGHTS] + [
      f'stages.*.loss_options.{o}' for o in stage_config('', 0).loss_options]
  assert all(docs.get(k) for k in keys), [k for k in keys if not docs.get(k)]
  assert "'student.TAP'" in docs['stages.*.feature_pairs']


def test_plan_holds_plain_values_and_adapters_only_where_shapes_differ(random_teacher):
  both = (('student.stage2', 'teacher.stage2'), ('student.stage2', 'teacher.stage2'))
  plan = planned(student_config(random_teacher, feature_pairs=SPATIAL,
                                loss_weights=dict(kl=0.5, fitnet=2.0)))
  assert plan.loss_terms == (('kl', 0.5), ('fitnet', 2.0))
  [pair] = plan.feature_pairs
  assert (pair.student_shape, pair.teacher_shape, pair.adapter) == ((4, 4, 8), (6, 6, 16), True)
  assert plan.cka_pairs[0].label == 'student.stage1,teacher.stage1'  # the feature pairs'
  same = planned(student_config(random_teacher, feature_pairs=both, loss_weights=dict(sp=1.0)))
  assert not any(p.adapter for p in same.feature_pairs)  # only FitNet has adapters
  assert len(same.cka_pairs) == 1  # a pair listed twice is measured once
  default = planned(student_config(random_teacher))
  assert (default.loss_terms, default.feature_pairs, default.cka_pairs) == ((('kl', 1.0),), (), ())


@pytest.mark.integration
def test_eight_devices_give_the_same_metrics(runs):  # after the others: they overlap its run
  """Every method, every logged metric and the final evaluation (CKA included): 8 CPU devices
  (4 x 2 data x fsdp: the batch and the relation losses' Gram matrices split over them) as 1."""
  import chex
  eight = runs.eight_devices()
  one_log, eight_log = read_metrics(runs.one / 'student'), read_metrics(eight / 'student')
  assert [m['step'] for m in one_log] == [m['step'] for m in eight_log]
  for a, b in zip(one_log, eight_log):
    keys = set(a) - {'steps_per_sec', 'uptime'}
    assert keys == set(b) - {'steps_per_sec', 'uptime'}
    for key in keys:
      np.testing.assert_allclose(b[key], a[key], rtol=2e-3, atol=1e-4, err_msg=key)
  chex.assert_trees_all_close(student_params(runs.one / 'student'),
                              student_params(eight / 'student'), rtol=1e-3, atol=1e-4)
  with open(eight / 'summary.json') as f:
    eight_summary = json.load(f)['stages']['student']
  for key, value in runs.summary['student'].items():
    if isinstance(value, float):
      np.testing.assert_allclose(eight_summary[key], value, atol=2e-3, err_msg=key)
