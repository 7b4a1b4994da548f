"""Distillation data (issue 26): a stage's training images from other sources than the labelled
train split (an unlabeled image folder, the digits of other classes, a mixture by weight), while
its evaluation stays on the task's val/test.

Two small runs, each a supervised cnn_tiny teacher (on the task's labels) and distilled cnn_tiny
students, share the compiles of the whole module:
  streamed   the digits task; `folder_only` distils on a flat folder of PNGs alone, `mixed` on
             the task's train images and that folder (1:3), both read image by image;
  resident   the digits 0-4 as the task; `mixed` distils on the task's images and the digits
             5-9 (out of domain, unlabeled), all on the device.
Each `mixed` stage is then re-run from its middle checkpoint (as after a kill) and must end
bitwise where it ended.
"""
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow as tf

from bigkd import build, checkpoint, inspect, stages
from bigkd.config import ConfigError, stage_config
from bigkd.data import sampling, sources
from bigkd.plan import check_config, plan_stages
from bigkd.sharding import make_mesh
from support import read_metrics, run_cli, run_main, tiny_config

STEPS = 8
FOLDER_IMAGES = 16


def write_flat_folder(root, count=FOLDER_IMAGES, seed=0):
  """`count` PNGs of several sizes directly in `root` (no class folders), and a note."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  for i in range(count):
    h, w = [(20, 30), (30, 20), (24, 24)][i % 3]
    tf.io.write_file(os.path.join(root, f'{i:03d}.png'), tf.io.encode_png(
        rng.integers(0, 256, (h, w, 3)).astype(np.uint8)))
  open(os.path.join(root, 'notes.txt'), 'w').write('not an image')
  os.makedirs(os.path.join(root, 'ignored_subfolder'), exist_ok=True)
  return root


def student(**fields):
  return stage_config('cnn_tiny', 8, teachers={'teacher': 'teacher'}, steps=STEPS, **fields)


def run_config(kind, folder=None):
  """The module's two runs (see the docstring): a teacher, then distilled students."""
  c = tiny_config(steps=20)
  c.log_every, c.checkpoint_every = 4, STEPS // 2  # a middle checkpoint to resume from
  c.batch_size = 16
  c.stages.teacher = stage_config('cnn_tiny', 8, steps=20, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  if kind == 'streamed':
    c.data.device_resident = False
    c.log_views = True  # the views of step 1, drawn from the stage's own train data
    images = dict(source='images', data_dir=folder)
    c.stages.folder_only = student(train_data=dict(flat=images))
    c.stages.mixed = student(train_data=dict(task=dict(source='task'),
                                             flat=dict(images, weight=3.0)))
    c.stage_order = 'teacher,folder_only,mixed'
  else:
    c.data.classes = '0-4'
    c.stages.mixed = student(train_data=dict(task=dict(source='task'),
                                             ood=dict(source='digits', classes='5-9')))
    c.stage_order = 'teacher,mixed'
  return c


def final_params(workdir, classes):
  target = build.param_targets('cnn_tiny', {}, classes, 8, np.float32, make_mesh())
  return jax.device_get(checkpoint.load_params(os.path.join(workdir, 'mixed'), target, 'test'))


class Run:
  def __init__(self, kind, root):
    self.kind, self.root = kind, root
    self.classes = 5 if kind == 'resident' else 10
    self.folder = write_flat_folder(str(root / 'flat')) if kind == 'streamed' else None
    self.workdir = str(root / 'run')
    self.summary = stages.run(self.config(), self.workdir)['stages']

  def config(self):
    return run_config(self.kind, self.folder)


@pytest.fixture(scope='module', params=['streamed', 'resident'])
def run(request, tmp_path_factory):
  return Run(request.param, tmp_path_factory.mktemp(request.param))


def test_students_distil_from_their_own_data_and_are_evaluated_on_the_task(run):
  """The students learn (KL falls) from data with no label; their evaluation is the task's:
  the teacher's accuracy that a student's summary reports is the one the teacher's own stage
  measured on the task's val/test (on the unlabeled images it would be 0)."""
  teacher = run.summary['teacher']
  for name in [n for n in run.summary if n != 'teacher']:
    log = read_metrics(os.path.join(run.workdir, name))
    assert log[-1]['kl_T1'] < log[0]['kl_T1'], (name, log)
    for split in ('val', 'test'):
      assert run.summary[name][f'{split}_teacher_accuracy'] == pytest.approx(
          teacher[f'{split}_accuracy'], abs=1e-6), name
  data = inspect.load_run(run.workdir).data
  task_classes = run.classes
  assert data.num_classes == task_classes and len(data.class_names) == task_classes
  assert set(np.unique(data.test.labels)) == set(range(task_classes))
  # The sources in name order (flat or ood, then task): the task's images alone have labels.
  mixed = data.stage_train['mixed']
  labels = mixed.split.rows(np.arange(len(mixed.split)))[2]
  other = mixed.sizes[0]
  assert mixed.sizes[1] == len(data.train)
  assert (labels[:other] == -1).all() and (labels[other:] >= 0).all()
  if run.kind == 'streamed':
    assert other == FOLDER_IMAGES and data.stage_train['folder_only'].sizes == (FOLDER_IMAGES,)
  else:
    assert other == np.sum(sources.load_digits('train', 12).labels >= 5)


def test_a_mixture_takes_each_source_its_share_of_every_batch(run):
  """The logged batches (drawn as the step draws them): each holds its weight's rows of each
  source, shuffled together; the same for a given (seed, step), another at the next step."""
  opened = inspect.load_run(run.workdir)
  plan = opened.plans['mixed']
  rows = (12, 4) if run.kind == 'streamed' else (8, 8)  # weights 3:1 (flat, task) and 1:1
  assert tuple(d.rows for d in plan.train_data) == rows
  other = plan.train_data[0].examples
  batches = [inspect.step_batch(opened, 'mixed', s).indices for s in (1, 2, 1)]
  np.testing.assert_array_equal(batches[0], batches[2])
  assert not np.array_equal(batches[0], batches[1])
  for b in batches:
    assert (np.sum(b < other), np.sum(b >= other)) == rows
    assert not np.array_equal(np.sort(b), b)  # the sources' rows are mixed, not in blocks


def test_resumed_mixture_stage_ends_bitwise_where_it_ended(run, tmp_path, capsys):
  resumed = tmp_path / 'resumed'
  shutil.copytree(run.workdir, resumed)
  shutil.rmtree(resumed / 'mixed' / 'checkpoints' / str(STEPS))
  for path in (resumed / 'mixed' / 'summary.json', resumed / 'summary.json'):
    os.remove(path)
  capsys.readouterr()
  summary = stages.run(run.config(), str(resumed))['stages']
  assert f'[mixed] resuming from step {STEPS // 2}' in capsys.readouterr().out
  assert summary == run.summary
  jax.tree.map(np.testing.assert_array_equal, final_params(resumed, run.classes),
               final_params(run.workdir, run.classes))
  drop = lambda log: [{k: v for k, v in m.items() if k not in ('steps_per_sec', 'uptime')}
                      for m in log]
  assert drop(read_metrics(resumed / 'mixed')) == drop(
      read_metrics(os.path.join(run.workdir, 'mixed')))


# --- The sampling rule, alone. -----------------------------------------------------------------

@pytest.mark.parametrize('draw', [sampling.host_step_indices,
                                  lambda *a: np.asarray(sampling.device_step_indices(*a))])
def test_mixture_indices_are_a_pure_function_of_seed_and_step(draw):
  sizes, rows = (7, 30, 5), sampling.batch_rows(12, (1.0, 2.0, 1.0))
  assert rows == (3, 6, 3)
  offsets = np.cumsum((0,) + sizes[:-1])
  steps = [draw(3, s, rows, sizes) for s in range(35)]
  np.testing.assert_array_equal(draw(3, 17, rows, sizes), steps[17])
  assert not np.array_equal(draw(4, 17, rows, sizes), steps[17])  # the seed changes it
  for k, (n, size, offset) in enumerate(zip(rows, sizes, offsets)):
    mine = [b[(b >= offset) & (b < offset + size)] - offset for b in steps]
    assert all(len(m) == n for m in mine)
    # Each source epoch by epoch: in steps that hold whole epochs, each example equally often.
    whole = np.lcm(n, size) // n
    for start in range(0, len(mine) - whole + 1, whole):
      counts = np.bincount(np.concatenate(mine[start:start + whole]), minlength=size)
      assert (counts == whole * n // size).all(), (k, counts)


def test_batch_rows_round_by_largest_remainder():
  assert sampling.batch_rows(16, (1, 3)) == (4, 12)
  assert sampling.batch_rows(10, (1, 2)) == (3, 7)
  assert sampling.batch_rows(3, (1, 1, 1, 1)) == (1, 1, 1, 0)
  assert sum(sampling.batch_rows(1000, (0.1, 0.7, 0.2))) == 1000


# --- Checks before any work. -------------------------------------------------------------------

def distil_config(**fields):
  c = tiny_config()
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'t': 'teacher'}, steps=5, **fields)
  c.stage_order = 'teacher,student'
  return c


UNLABELED = dict(ood=dict(source='digits', classes='5-9'))


@pytest.mark.parametrize('fields, fragment', [
    (dict(label_weight=0.5),
     'stages.student.label_weight=0.5 reads labels, but its train_data.ood has no labels'),
    (dict(loss_weights=dict(kl=1.0, labels=1.0)), 'stages.student.loss_weights.labels=1.0 reads'),
    (dict(loss_weights=dict(dkd=1.0)), 'stages.student.loss_weights.dkd=1.0 reads labels'),
    (dict(train_data=dict(ood=dict(source='imagenet'))),
     "train_data.ood.source='imagenet': one of task, digits, folder, images, records, tfds"),
    (dict(train_data=dict(ood=dict(source='folder'))), 'train_data.ood: source=folder needs'),
    (dict(train_data=dict(ood=dict(source='images', data_dir='x', labels=True))),
     'source=images has no labels'),
    (dict(train_data=dict(ood=dict(source='task', classes='5-9'))),
     'only the digits source keeps some classes'),
    (dict(train_data=dict(ood=dict(source='digits', classes='nine'))),
     "train_data.ood.classes: 'nine' is not a list of classes"),
    (dict(train_data=dict(ood=dict(source='task', weight=0.0))), 'weight=0.0 must be a number > 0'),
])
def test_bad_train_data_is_one_config_error(fields, fragment):
  fields.setdefault('train_data', UNLABELED)
  with pytest.raises(ConfigError) as error:
    check_config(distil_config(**fields), 1)
  assert fragment in str(error.value) and '\n' not in str(error.value), str(error.value)


def test_a_stage_without_teachers_needs_labelled_data():
  c = tiny_config()
  c.stages.teacher = stage_config('cnn_tiny', 8, steps=5, label_weight=1.0, train_data=UNLABELED)
  with pytest.raises(ConfigError, match='stages.teacher: a stage without teachers trains on '
                                        'labels, but its train_data.ood has no labels'):
    check_config(c, 1)
  c.stages.teacher.train_data.ood.labels = True
  check_config(c, 1)
  with pytest.raises(ConfigError, match='unknown field .lables'):
    stage_config('cnn_tiny', 8, train_data=dict(ood=dict(source='task', lables=True)))


def test_shares_that_a_source_cannot_fill_are_refused():
  c = distil_config(train_data=dict(a=dict(source='task'), b=dict(source='task', weight=0.01)))
  check_config(c, 1)
  with pytest.raises(ConfigError, match=r'train_data.b.weight=0.01 gives it no row of the batch '
                                        'of 32'):
    plan_stages(c, '/nowhere', 1197, 10, train_sizes={'student': (1197, 1197)})
  c.stages.student.train_data.b.weight = 1.0
  with pytest.raises(ConfigError, match=r'train_data.b: 5 examples, fewer than its 16 rows'):
    plan_stages(c, '/nowhere', 1197, 10, train_sizes={'student': (1197, 5)})
  c.stages.student.epochs = 2.0  # epochs count the examples of all the sources
  plan = plan_stages(c, '/nowhere', 1197, 10, train_sizes={'student': (1197, 203)})[-1]
  assert plan.steps == round(2 * 1400 / 32)


def test_labelled_sources_must_have_the_tasks_classes(tmp_path):
  c = tiny_config()
  c.data.classes = '0-4'
  with pytest.raises(sources.DataError, match=r'labels up to 9, but the task has 5 classes'):
    build.load_data(c.data, {'student': {'all': dict(
        source='digits', data_dir='', name='', split='train', classes='', labels=True,
        weight=1.0)}})


def test_command_line_refuses_labels_on_unlabeled_data_and_documents_the_fields(tmp_path):
  result = run_cli(['--config', 'configs/digits_ood.py:fast', '--workdir', str(tmp_path / 'w'),
                    '--config.stages.student_ood.label_weight=0.3'])
  errors = [l for l in result.stderr.splitlines() if l.startswith('bigkd: error:')]
  assert result.returncode == 2 and len(errors) == 1, result.stderr[-2000:]
  assert 'student_ood.label_weight=0.3 reads labels, but its train_data.ood' in errors[0]
  assert not os.path.exists(tmp_path / 'w')
  fields = run_main('bigkd.train', ['--config', 'configs/digits_ood.py:fast', '--fields'])
  assert fields.returncode == 0, fields.stderr
  lines = {line.split()[0]: line for line in fields.stdout.splitlines() if line.strip()}
  assert "'5-9'" in lines['stages.student_ood.train_data.ood.classes']
  assert 'unlabeled' in lines['stages.student_ood.train_data.ood.labels']
  assert 'epochs' in lines['stages.student_task.train_data']  # {}: the data block's split
  assert "'0-4'" in lines['data.classes'] and 'only these classes' in lines['data.classes']
  assert '[safe to change]' in lines['stages.student_ood.train_data.ood.data_dir']  # it may move
  assert '[safe to change]' not in lines['stages.student_ood.train_data.ood.source']
