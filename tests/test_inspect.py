"""bigkd.inspect: a run read while it trains, stages at a checkpoint, the batches of a step; and
the figures of bigkd.plots on known inputs. All share one digits demo run (`demo_run`)."""
import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import inspect, plots, views
from bigkd import step as step_module
from bigkd.data import augment
from bigkd.data.sampling import step_batch_indices


def test_load_run_while_training(demo_run):
  """First in this file, so the demo is still being written: every read parses, and every
  checkpoint a read lists restores (checksum included) the moment it is listed."""
  loaded, snapshots = set(), []
  while demo_run.running():
    if os.path.isfile(os.path.join(demo_run.path, 'config.json')):
      run = inspect.load_run(demo_run.path)
      for name, frame in run.metrics.items():
        assert frame.empty or (frame['step'].is_monotonic_increasing
                               and frame['loss'].notna().all()), name
      for name, steps in run.checkpoints.items():
        for step in steps:
          if (name, step) not in loaded:
            assert run.stage(name, step).step == step
            loaded.add((name, step))
      snapshots.append(tuple((n, len(run.checkpoints[n]), n in run.summary['stages'])
                             for n in run.stages))
    time.sleep(0.2)  # leave the CPU to the writer
  workdir = demo_run.workdir()  # the writer exited 0
  final = inspect.load_run(workdir)
  assert final.checkpoints == {name: [20, 40] for name in ('teacher', 'student', 'baseline')}
  # It read the run mid-stage (a stage with some checkpoints, unfinished) and at many points.
  assert any(count and not done for snap in snapshots for _, count, done in snap)
  assert len(set(snapshots)) >= 4, snapshots
  assert len(loaded) >= 4  # most checkpoints were loaded while the run went on


@pytest.fixture(scope='module')
def run(demo_run, demo_notebook):
  """The finished demo run. Asking for `demo_notebook` starts the notebook's own run of it
  now, in a subprocess, so that it overlaps the tests below (test_report.py checks it)."""
  return inspect.load_run(demo_run.workdir())


def test_a_run_caught_mid_write_is_read_as_it_was(demo_run, tmp_path):
  """What a reader can meet in a running workdir: a half-written metrics line, summary.json or
  stage.json, and orbax's temporary folder of a checkpoint being saved. The half-written parts
  are left out; the temporary folder is neither listed nor removed (the writer renames it)."""
  workdir = str(tmp_path / 'copy')
  shutil.copytree(demo_run.workdir(), workdir)
  with open(os.path.join(workdir, 'teacher', 'metrics.jsonl'), 'a') as f:
    f.write('{"step": 41, "loss": 1.')
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    f.write('{"stages": {"teacher"')
  with open(os.path.join(workdir, 'baseline', 'stage.json'), 'w') as f:
    f.write('{"model": "cnn_')
  os.remove(os.path.join(workdir, 'baseline', 'summary.json'))
  tmp = os.path.join(workdir, 'teacher', 'checkpoints', '50.orbax-checkpoint-tmp-1700000000')
  os.makedirs(os.path.join(tmp, 'params'))

  run = inspect.load_run(workdir)
  assert run.metrics['teacher']['step'].tolist() == [20, 40]
  assert run.stages == ['teacher', 'student']  # baseline's stage.json is not complete yet
  assert set(run.summary['stages']) == {'teacher', 'student'}  # from the stages' summaries
  assert run.checkpoints['teacher'] == [20, 40]
  assert run.stage('teacher').step == 40
  assert os.path.isdir(tmp)


def test_a_stage_predicts_and_evaluates_like_the_run(run):
  """At the final step, `evaluate` gives back summary.json's numbers and `predict` (the same
  evaluation view, batched and padded) its accuracy; an earlier step has other parameters."""
  summary = run.summary['stages']['student']
  student = run.stage('student')
  assert student.step == 40 and student.class_names == [str(d) for d in range(10)]
  assert student.evaluate('test') == {k: v for k, v in summary.items() if k.startswith('test_')}
  logits, labels = student.predict_split('test')
  assert logits.shape == (300, 10)
  assert np.mean(logits.argmax(-1) == labels) == summary['test_accuracy']
  test = run.data.test
  np.testing.assert_allclose(student.predict(test.images[:5], test.sizes[:5]), logits[:5],
                             rtol=1e-5, atol=1e-5)
  earlier = run.stage('student', step=20)
  assert not np.allclose(earlier.params['Dense_0']['kernel'], student.params['Dense_0']['kernel'])
  with pytest.raises(ValueError, match='no complete checkpoint at step 25'):
    run.stage('student', step=25)


def test_class_names_come_from_stage_json(run, tmp_path):
  workdir = str(tmp_path / 'copy')
  shutil.copytree(run.workdir, workdir)
  path = os.path.join(workdir, 'teacher', 'stage.json')
  with open(path) as f:
    info = json.load(f)
  with open(path, 'w') as f:
    json.dump({**info, 'class_names': [f'digit {i}' for i in range(10)]}, f)
  assert inspect.load_run(workdir).stage('teacher').class_names[3] == 'digit 3'


def test_views_are_the_batch_the_step_trained_on(run, monkeypatch):
  """The jitted train step of logged step s (state.step = s - 1, its batch gathered on device)
  is run once with its `augmented_batch` watched: `views(run, 'student', s)` is what it saw."""
  s = 7
  seen = {}
  real = step_module.augmented_batch

  def watched(spec, images, sizes, labels, key):
    out = real(spec, images, sizes, labels, key)
    jax.debug.callback(lambda *xs: seen.update(zip(('student', 'teachers', 'targets',
                                                     'labels'), xs)), *out, labels)
    return out

  monkeypatch.setattr(step_module, 'augmented_batch', watched)
  stage = run.built_stage('student')
  state = jax.tree.map(jnp.copy, stage.state)
  state = state.replace(step=jax.device_put(jnp.int32(s - 1), stage.state.step.sharding))
  jax.block_until_ready(stage.train_step(state, stage.teacher_params, *next(stage.inputs(s - 1))))
  jax.effects_barrier()
  monkeypatch.undo()

  got = inspect.views(run, 'student', s)
  assert got.step == s and got.student.shape == (64, 12, 12, 3)
  np.testing.assert_allclose(got.student, seen['student'], atol=1e-5)
  assert set(got.teachers) == set(seen['teachers']) == {16}
  np.testing.assert_allclose(got.teachers[16], seen['teachers'][16], atol=1e-5)
  np.testing.assert_allclose(got.targets, seen['targets'], atol=1e-6)
  np.testing.assert_array_equal(got.labels, seen['labels'])
  np.testing.assert_array_equal(got.images, run.data.train.images[got.indices])
  assert not np.allclose(got.student, inspect.views(run, 'student', s + 1).student)
  with pytest.raises(ValueError, match='outside 1..40'):
    inspect.views(run, 'student', 0)


def test_streamed_batches_are_the_ones_the_loader_reads(run):
  """Streamed data: the examples of logged step s are those `build.streamed_inputs` reads for
  state.step = s - 1 (host-side indices, another order than the device-resident one)."""
  import dataclasses
  from bigkd import build
  from bigkd.sharding import batch_sharding
  plan = dataclasses.replace(run.plans['baseline'], device_resident=False)
  train = run.data.train
  images, sizes, labels = jax.device_get(next(build.streamed_inputs(
      train, plan.step_seed, plan.batch_size, batch_sharding(run.mesh), 4, 5)))
  indices = step_batch_indices(plan, 5, len(train))
  np.testing.assert_array_equal(train.images[indices], images)
  np.testing.assert_array_equal(train.labels[indices], labels)
  assert not np.array_equal(indices, inspect.step_batch(run, 'baseline', 5).indices)


def test_teaching_mode_views(run):
  """A row per teaching mode, teacher view second in each pair: under fixed_teacher the teacher
  sees the whole image at its own resolution, while the student's crop is shared by every mode
  without mixup."""
  spec = run.built_stage('student').spec
  v = inspect.views(run, 'student', 3)
  images, sizes = v.images[:4], v.sizes[:4]  # 4: the report's, so it finds this compiled
  modes = inspect.teaching_mode_views(spec, images, sizes, v.labels[:4], 3)
  assert list(modes) == list(augment.TEACHING_MODES)
  student, teacher = modes['fixed_teacher']
  assert student.shape == (4, 12, 12, 3) and teacher.shape == (4, 16, 16, 3)
  whole = augment.render_boxes(images, augment.full_boxes(4), 16, sizes)
  np.testing.assert_allclose(teacher, whole, atol=1e-5)
  np.testing.assert_allclose(modes['consistent'][0], student, atol=1e-6)
  assert not np.allclose(modes['independent_noise'][1], modes['consistent'][1])
  grid = views.views_grid_image(spec, v.images, v.sizes, v.labels, 3, examples=4, cell=32)
  cell, gap, pair_gap = 32, views.GAP, views.PAIR_GAP
  assert grid.dtype == np.uint8 and grid.shape == (4 * cell + 3 * pair_gap,
                                                   4 * (2 * cell + gap) + 3 * pair_gap, 3)
  np.testing.assert_array_equal(grid[:cell, cell + gap:2 * cell + gap],
                                views._cell(student[0], cell))


# --- Figures, on inputs whose answers are known. ---------------------------------------------

def axes_titles(fig):
  return [a['title'] for a in plots.figure_facts(fig)['axes']]


def test_training_curves_show_what_was_logged(run):
  student = plots.training_curves(run.metrics['student'], 'student')
  assert axes_titles(student) == ['loss', 'kl_T1', 'agreement', 'accuracy', 'lr']
  facts = plots.figure_facts(student)
  accuracy = facts['axes'][3]
  assert accuracy['legend'] == ['val_accuracy', 'val_teacher_accuracy']
  assert accuracy['points'] == 2 * 2  # evaluations at steps 20 and 40
  assert axes_titles(plots.training_curves(run.metrics['teacher'])) == ['loss', 'accuracy',
                                                                         'lr']
  assert len(plots.to_png(student)) > 1000


def test_calibration_and_ece():
  labels = np.array([0, 0, 1, 1])
  sure = np.log(np.array([[0.9, 0.1]] * 4))  # 90 % sure of class 0, right half of the time
  c = plots.calibration(sure, labels, bins=10)
  assert c['ece'] == pytest.approx(0.4)
  assert c['count'][9] == 4 and c['accuracy'][9] == pytest.approx(0.5)
  honest = np.log(np.array([[0.75, 0.25]] * 4))  # 75 % sure, right 3 times out of 4
  assert plots.calibration(honest, np.array([0, 0, 0, 1]))['ece'] == pytest.approx(0.0)
  fig = plots.reliability_diagram({'a': sure, 'b': honest}, labels)
  assert plots.figure_facts(fig)['axes'][0]['legend'] == ['calibrated', 'a (ECE 0.400)',
                                                          'b (ECE 0.250)']


def test_agreement_matrix_and_per_class_accuracy():
  teacher = np.eye(3)[[0, 1, 2, 2]]
  student = np.eye(3)[[0, 1, 1, 2]]
  fig = plots.agreement_matrix(teacher, student, ['a', 'b', 'c'])
  (facts,) = plots.figure_facts(fig)['axes']
  assert facts['title'] == 'teacher vs student: agreement 75.0%' and facts['images'] == 1
  counts = fig.axes[0].images[0].get_array()
  assert counts[2, 1] == 1 and counts[2, 2] == 1 and counts.sum() == 4
  fig = plots.per_class_accuracy({'teacher': teacher, 'student': student}, np.array([0, 1, 2, 1]))
  heights = [bar.get_height() for bar in fig.axes[0].patches]
  np.testing.assert_allclose(heights, [1, 0.5, 1, 1, 0.5, 0])  # teacher's 3 bars, student's 3
  assert plots.figure_facts(fig)['axes'][0]['legend'] == ['teacher (75.0%)', 'student (50.0%)']
