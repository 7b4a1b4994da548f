"""End-to-end runs on the bundled digits: teaching modes, mixup variants, resolutions, ensembles,
TAKD chains. Each distilled student must learn its teacher's function (KL falls, agreement rises)."""
import json
import os

import pytest

from bigkd import stages
from bigkd.config import stage_config
from support import tiny_config


def read_metrics(stage_dir):
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def assert_learns_teacher(stage_dir, summary, min_agreement=0.5):
  log = read_metrics(stage_dir)
  assert log[-1]['kl_T1'] < 0.7 * log[0]['kl_T1'], (log[0]['kl_T1'], log[-1]['kl_T1'])
  assert summary['test_agreement'] > min_agreement, summary  # chance is 0.1
  assert 0 <= summary['test_kl'] < log[0]['kl_T1']


def distill_config(teacher_dir, steps=60, resolution=12, **stage):
  c = tiny_config()
  c.stages.student = stage_config('cnn_small', resolution, steps=steps,
                                  teachers={'teacher': teacher_dir}, **stage)
  c.stage_order = 'student'
  return c


@pytest.mark.parametrize('mode', ['fixed_teacher', 'independent_noise', 'consistent',
                                  'function_matching'])
def test_teaching_modes(tmp_path, trained_teacher, mode):
  teacher_dir, teacher_summary = trained_teacher
  assert teacher_summary['test_accuracy'] > 0.8
  summary = stages.run(distill_config(teacher_dir, teaching_mode=mode), str(tmp_path))
  student = summary['stages']['student']
  assert_learns_teacher(tmp_path / 'student', student)
  assert student['test_teacher_accuracy'] == pytest.approx(teacher_summary['test_accuracy'])


def test_mixup_per_example_and_teacher_at_another_resolution(tmp_path, trained_teacher):
  teacher_dir, _ = trained_teacher  # trained at 12 px; the student sees 8 px
  config = distill_config(teacher_dir, resolution=8, augment=dict(mixup_per_example=True))
  summary = stages.run(config, str(tmp_path))
  assert_learns_teacher(tmp_path / 'student', summary['stages']['student'])


def test_teacher_ensemble_at_two_resolutions(tmp_path, trained_teacher, ensemble='probs'):
  # (averaged logits are the other combination; both are unit-tested in test_losses)
  teacher_dir, _ = trained_teacher  # cnn_small at 12 px, from another run
  c = tiny_config()
  c.stages.small_teacher = stage_config('cnn_tiny', 8, steps=60, label_weight=1.0,
                                        augment=dict(mixup_alpha=0.0))
  c.stages.student = stage_config('cnn_small', 12, steps=60, ensemble=ensemble, teachers={
      'a': teacher_dir, 'b': 'small_teacher'}, label_weight=0.2, temperature=2.0)
  c.stage_order = 'small_teacher,student'
  summary = stages.run(c, str(tmp_path))
  assert_learns_teacher(tmp_path / 'student', summary['stages']['student'])


def test_takd_chain_teacher_assistant_student(tmp_path, trained_teacher):
  """The session's trained teacher (a stage folder) -> an assistant stage -> a student stage."""
  teacher_dir, teacher_summary = trained_teacher
  c = tiny_config()
  c.stages.assistant = stage_config('cnn_small', 10, steps=60, teachers={'t': teacher_dir})
  c.stages.student = stage_config('cnn_tiny', 8, steps=60, teachers={'ta': 'assistant'},
                                  loss='kl', temperature=2.0)
  c.stage_order = 'assistant,student'
  summary = stages.run(c, str(tmp_path))['stages']
  assert set(summary) == {'assistant', 'student'}
  # Each stage is taught by the one before it: the student's teacher accuracy is the assistant's.
  assert summary['assistant']['test_teacher_accuracy'] == pytest.approx(
      teacher_summary['test_accuracy'])
  assert summary['student']['test_teacher_accuracy'] == pytest.approx(
      summary['assistant']['test_accuracy'])
  assert_learns_teacher(tmp_path / 'assistant', summary['assistant'])
  assert_learns_teacher(tmp_path / 'student', summary['student'], min_agreement=0.3)
  with open(tmp_path / 'summary.json') as f:
    assert json.load(f)['stages'].keys() == summary.keys()
  # A finished run re-run does nothing but report.
  again = stages.run(c, str(tmp_path))['stages']
  assert again == summary
  # log_views=False (tiny_config): no `views` image (test_newcomer.py: the default writes it).
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  events = EventAccumulator(str(tmp_path / 'student')).Reload()
  assert 'loss' in events.Tags()['scalars'] and 'views' not in events.Tags()['tensors']


def test_outputs_of_a_run(tmp_path, trained_teacher):
  teacher_dir, _ = trained_teacher
  run_dir = os.path.dirname(teacher_dir)
  for name in ('config.json', 'summary.json'):
    assert os.path.isfile(os.path.join(run_dir, name))
  for name in ('metrics.jsonl', 'summary.json', 'stage.json'):
    assert os.path.isfile(os.path.join(teacher_dir, name))
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(teacher_dir))
  assert os.listdir(os.path.join(teacher_dir, 'checkpoints'))
  steps = [m['step'] for m in read_metrics(teacher_dir)]
  assert steps == sorted(steps) and steps[-1] == 120


def test_streamed_batches_and_periodic_evaluation(tmp_path):
  c = tiny_config(steps=60)
  c.data.device_resident = False
  c.eval_every = 20
  summary = stages.run(c, str(tmp_path))['stages']['teacher']
  assert summary['test_accuracy'] > 0.5
  evals = [m for m in read_metrics(tmp_path / 'teacher') if 'val_accuracy' in m]
  assert [m['step'] for m in evals] == [20, 40, 60]  # every 20 steps, and the final evaluation
  assert evals[-1]['test_accuracy'] == summary['test_accuracy']
  assert evals[-1]['val_accuracy'] > evals[0]['val_accuracy'] - 0.05


def test_inspect_a_finished_run(trained_teacher):
  from bigkd import inspect
  from bigkd.data.sources import load_digits
  teacher_dir, teacher_summary = trained_teacher
  run = inspect.load_run(os.path.dirname(teacher_dir))
  assert run.summary['stages']['teacher'] == teacher_summary
  assert run.metrics['teacher']['step'].iloc[-1] == 120
  test = load_digits('test', 12)
  logits = inspect.predict(teacher_dir, test.images)
  accuracy = float((logits.argmax(-1) == test.labels).mean())
  assert accuracy == pytest.approx(teacher_summary['test_accuracy'], abs=1e-6)
