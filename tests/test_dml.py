"""Deep mutual learning (online distillation, Zhang et al. 2018): a stage with peers.

The loss: a NumPy computation of its value for fixed logits (three peers, the others' mean
prediction), and each peer's gradient from its own forward alone (the others are targets).
End to end on the digits: peers cnn_tiny at 8 px and cnn_small at 12 px (two models, two
resolutions, one crop box) trained together, then a later stage distilled from peer `b`. The
same run on 8 devices (a 4 x 2 data x fsdp mesh, a subprocess started first so the two overlap)
ends with the same metrics; resumed from its middle checkpoint it ends bitwise as the
uninterrupted run (both peers' parameters and optimiser states). Bad configs: one line, exit 2.
"""
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import checkpoint, inspect, objective, report, stages
from bigkd.config import ConfigError, mutual_stage, stage_config
from bigkd.forward import forward
from bigkd.models import get_model
from bigkd.objective import Objective
from bigkd.plan import check_config, plan_stages
from bigkd.step import Peer, StepSpec, make_loss_fn
from support import final_params, finish, read_metrics, run_cli, start, tiny_config

STEPS, LOG_EVERY = 40, 10
PEERS = {'a': ('cnn_tiny', 8), 'b': ('cnn_small', 12)}


# --- The loss. --------------------------------------------------------------------------------

def softmax(x, t=1.0):
  e = np.exp((x - x.max(-1, keepdims=True)) / t)
  return e / e.sum(-1, keepdims=True)


def test_loss_matches_numpy_for_three_peers():
  """Σ_k CE(labels, p_k) + w·T²·KL(mean_{j≠k} p_j^T ‖ p_k^T), each term logged per peer."""
  rng = np.random.default_rng(0)
  logits = {name: rng.normal(size=(5, 4)).astype(np.float32) * 3 for name in 'abc'}
  targets = softmax(rng.normal(size=(5, 4)))  # soft (mixed) labels
  weight, t = 0.7, 2.5
  obj = Objective((('labels', 1.0), ('mutual_kl', weight)),
                  options=(('mutual_temperature', t),))
  loss, metrics = objective.peers_loss_and_metrics(
      objective.peer_outputs({k: jnp.asarray(v) for k, v in logits.items()},
                             jnp.asarray(targets), 0, t), obj)
  total = 0.0
  for name, own in logits.items():
    ce = -np.mean(np.sum(targets * np.log(softmax(own)), -1))
    others = np.mean([softmax(logits[o], t) for o in logits if o != name], 0)
    kl = t ** 2 * np.mean(np.sum(others * (np.log(others) - np.log(softmax(own, t))), -1))
    np.testing.assert_allclose(metrics[f'{name}/loss_labels'], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics[f'{name}/loss_mutual_kl'], kl, rtol=1e-4)
    total += ce + weight * kl
  np.testing.assert_allclose(loss, total, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss'], total, rtol=1e-5)


def test_each_peer_learns_from_its_own_forward_alone():
  """The gradient of the total loss with respect to peer a's parameters is that of a's own
  terms with b's logits held constant: b's KL towards a does not pull a (stop-gradient)."""
  models = {'a': get_model('cnn_tiny', 10), 'b': get_model('cnn_tiny', 10)}
  resolutions = {'a': 8, 'b': 6}
  keys = jax.random.split(jax.random.key(0), 4)
  params = {n: m.init(k, jnp.zeros((1, resolutions[n], resolutions[n], 3)))['params']
            for (n, m), k in zip(models.items(), keys)}
  views = {r: jax.random.normal(keys[2 + i], (6, r, r, 3)) for i, r in enumerate((8, 6))}
  targets = jax.nn.one_hot(jnp.arange(6) % 10, 10)
  weight, t = 2.0, 3.0
  obj = Objective((('labels', 1.0), ('mutual_kl', weight)),
                  options=(('mutual_temperature', t),))
  spec = StepSpec(None, 0, (), 10, (), 'function_matching', obj, 0,
                  tuple(Peer(n, models[n], resolutions[n]) for n in models))
  loss_fn = make_loss_fn(spec)
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, None, 0, None, views, targets)[0]))(params)
  logits = lambda n, p: forward(models[n], p, views[resolutions[n]])[0]
  b_logits = logits('b', params['b'])  # a constant below

  def own_loss(pa):  # a's terms alone, b's logits a constant
    la = logits('a', pa)
    return (objective.losses.cross_entropy(la, targets)
            + weight * objective.losses.kl_divergence(b_logits, la, t))

  def coupled_loss(pa):  # as if the targets carried gradients: b's KL term pulls a too
    la = logits('a', pa)
    return own_loss(pa) + weight * objective.losses.kl_divergence(la, b_logits, t)

  flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
  np.testing.assert_allclose(flat(grads['a']), flat(jax.jit(jax.grad(own_loss))(params['a'])),
                             rtol=1e-4, atol=1e-6)
  # The check can fail: without the stop-gradient the gradient would be coupled_loss's.
  coupled = flat(jax.jit(jax.grad(coupled_loss))(params['a']))
  assert np.abs(coupled - flat(grads['a'])).max() > 1e-3 * np.abs(coupled).max()


def test_a_peer_without_mutual_kl_trains_as_alone():
  """With mutual_kl=0 a peer's steps are those of its model trained alone from the same
  parameters on the same batches: the same draws, its own optimiser state, and its gradient
  clipped by its own norm (a clip by the global norm over both peers would change it: the
  norms here are above clip_norm=0.5)."""
  from bigkd import build

  def built(stage):
    c = tiny_config()
    c.stages = type(c.stages)()
    c.stages.s, c.stage_order = stage, 's'
    mesh, data, [plan] = build.setup(c, '/nonexistent')
    return build.build_stage(plan, data, mesh)

  same = dict(steps=3, augment=dict(mixup_alpha=0.5), optimizer=dict(clip_norm=0.5))
  alone = built(stage_config('cnn_tiny', 8, **same))
  mutual = built(mutual_stage({'x': ('cnn_tiny', 8), 'y': ('cnn_tiny', 6)},
                              loss_weights=dict(mutual_kl=0.0), **same))
  copy = lambda tree: jax.tree.map(lambda x: x.copy(), tree)  # the steps donate their state
  states = [alone.state, mutual.state.replace(
      params={**mutual.state.params, 'x': copy(alone.state.params)},
      opt_state={**mutual.state.opt_state, 'x': copy(alone.state.opt_state)})]
  inputs = [alone.inputs(0), mutual.inputs(0)]
  for _ in range(3):
    (states[0], m_alone), (states[1], m_mutual) = [
        s.train_step(state, s.teacher_params, *next(i))
        for s, state, i in zip((alone, mutual), states, inputs)]
    assert float(m_mutual['x/grad_norm']) == pytest.approx(float(m_alone['grad_norm']), rel=1e-5)
    assert float(m_alone['grad_norm']) > 0.5
  # (Bitwise here, but the two graphs may fuse differently: a coupled clip is off by far more.)
  for got, want in zip(jax.tree.leaves(states[1].params['x']), jax.tree.leaves(states[0].params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


# --- End to end. ------------------------------------------------------------------------------

def dml_config(with_student=True):
  c = tiny_config()
  c.log_every = LOG_EVERY
  c.checkpoint_every = STEPS // 2  # a middle checkpoint for the resume test
  c.stages.mutual = mutual_stage(PEERS, steps=STEPS, loss_weights=dict(mutual_kl=2.0),
                                 loss_options=dict(mutual_temperature=2.0))
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'peer': 'mutual/b'}, steps=20)
  c.stage_order = 'mutual,student' if with_student else 'mutual'
  return c


RUNNER = """
import sys
from test_dml import dml_config
from support import MIN_FSDP
from bigkd import stages
config = dml_config(with_student=False)
config.mesh.data, config.mesh.fsdp, config.mesh.min_fsdp_size = 4, 2, MIN_FSDP
stages.run(config, sys.argv[1])
"""


class Runs:
  """The 1-device run (in this process) and the 8-device one (a subprocess started before it)."""

  def __init__(self, root):
    self.one, self.eight = root / 'one', root / 'eight'
    self._proc = start([sys.executable, '-c', RUNNER, str(self.eight)], devices=8)
    try:
      self.summary = stages.run(dml_config(), str(self.one))['stages']
    except BaseException:
      self._proc.kill()
      raise

  def eight_devices(self):
    finish(self._proc)
    return self.eight


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  runs = Runs(tmp_path_factory.mktemp('dml'))
  yield runs
  runs.eight_devices()


def saved(stage_dir, item):
  mngr = checkpoint.manager(str(stage_dir))
  step = mngr.latest_step()
  out = mngr.restore(step, args=checkpoint.ocp.args.Composite(
      **{item: checkpoint.ocp.args.StandardRestore()}))[item]
  mngr.close()
  return jax.device_get(out)


@pytest.mark.integration
def test_peers_train_with_their_own_metrics_and_evaluation(runs):
  log, summary = read_metrics(runs.one / 'mutual'), runs.summary['mutual']
  assert [m['step'] for m in log] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  for m in log:  # the total is the sum of the peers' losses, each the weighted sum of its terms
    assert m['loss'] == pytest.approx(m['a/loss'] + m['b/loss'], rel=1e-5)
    for p in PEERS:
      assert m[f'{p}/loss'] == pytest.approx(
          m[f'{p}/loss_labels'] + 2.0 * m[f'{p}/loss_mutual_kl'], rel=1e-5)
      assert 0 <= m[f'{p}/agreement'] <= 1 and m[f'{p}/grad_norm'] > 0
  for p in PEERS:
    assert log[-1][f'{p}/loss_labels'] < log[0][f'{p}/loss_labels']
    for split in ('val', 'test'):
      assert 0.15 < summary[f'{p}/{split}_accuracy'] <= 1, summary  # above chance (0.1)
  assert summary['test_accuracy'] == pytest.approx(
      (summary['a/test_accuracy'] + summary['b/test_accuracy']) / 2)
  assert 0 < summary['test_ensemble_accuracy'] <= 1 and summary['a/test_agreement'] == \
      summary['b/test_agreement']  # two peers: each one's top-1 against the other's
  # Each peer is a stage folder of its own (as a notebook opens it), with the stage's params.
  params = saved(runs.one / 'mutual', 'params')
  assert set(params) == set(PEERS)
  run = inspect.load_run(str(runs.one))
  assert run.models() == ['mutual/a', 'mutual/b', 'student']
  for p, (model, resolution) in PEERS.items():
    jax.tree.map(np.testing.assert_array_equal,
                 final_params(str(runs.one / 'mutual' / p), model, resolution), params[p])
  assert run.stage('mutual/b').evaluate('test')['test_accuracy'] == pytest.approx(
      summary['b/test_accuracy'])
  table = report.summary_table(run, 'test')  # the report page's: the peers, the mean accuracy
  assert '<td>a: cnn_tiny 8px, b: cnn_small 12px</td>' in table
  assert f'<td>{summary["test_accuracy"]:.4f}</td>' in table


@pytest.mark.integration
def test_a_later_stage_distils_from_one_peer(runs):
  student = runs.summary['student']
  # Its teacher is peer b: the teacher's accuracy in the student's evaluation is b's.
  assert student['test_teacher_accuracy'] == pytest.approx(
      runs.summary['mutual']['b/test_accuracy'])
  log = read_metrics(runs.one / 'student')
  assert log[-1]['kl_T1'] < log[0]['kl_T1']


@pytest.mark.integration
def test_resumed_mid_way_equals_uninterrupted_bitwise(runs, tmp_path, capsys):
  resumed = tmp_path / 'resumed'
  shutil.copytree(runs.one, resumed)
  # As if killed in the middle of the mutual stage (the student's folder, left as it is, is
  # skipped as finished: its teacher, peer b, is written again bitwise, the test below says).
  for path in ('mutual/checkpoints/' + str(STEPS), 'mutual/a', 'mutual/b'):
    shutil.rmtree(resumed / path)
  for path in ('mutual/summary.json', 'summary.json'):
    os.remove(resumed / path)
  capsys.readouterr()
  summary = stages.run(dml_config(), str(resumed))['stages']
  assert f'[mutual] resuming from step {STEPS // 2}' in capsys.readouterr().out
  assert summary == runs.summary
  for item in ('params', 'opt_state', 'metric_sums'):  # both peers, their optimiser states
    jax.tree.map(np.testing.assert_array_equal, saved(resumed / 'mutual', item),
                 saved(runs.one / 'mutual', item))
  drop = lambda log: [{k: v for k, v in m.items() if k not in ('steps_per_sec', 'uptime')}
                      for m in log]
  assert drop(read_metrics(resumed / 'mutual')) == drop(read_metrics(runs.one / 'mutual'))
  for p, (model, resolution) in PEERS.items():
    jax.tree.map(np.testing.assert_array_equal,
                 final_params(str(resumed / 'mutual' / p), model, resolution),
                 final_params(str(runs.one / 'mutual' / p), model, resolution))


@pytest.mark.integration
def test_eight_devices_give_the_same_metrics(runs):  # after the others: they overlap its run
  """4 x 2 data x fsdp (the peers' kernels split over fsdp) as 1 device: every logged metric,
  both peers' parameters and the final evaluation."""
  import chex
  eight = runs.eight_devices()
  one_log, eight_log = read_metrics(runs.one / 'mutual'), read_metrics(eight / 'mutual')
  assert [m['step'] for m in one_log] == [m['step'] for m in eight_log]
  for a, b in zip(one_log, eight_log):
    keys = set(a) - {'steps_per_sec', 'uptime'}
    assert keys == set(b) - {'steps_per_sec', 'uptime'}
    for key in keys:
      np.testing.assert_allclose(b[key], a[key], rtol=2e-3, atol=1e-4, err_msg=key)
  for p, (model, resolution) in PEERS.items():
    chex.assert_trees_all_close(final_params(str(runs.one / 'mutual' / p), model, resolution),
                                final_params(str(eight / 'mutual' / p), model, resolution),
                                rtol=1e-3, atol=1e-4)
  with open(eight / 'summary.json') as f:
    eight_summary = json.load(f)['stages']['mutual']
  for key, value in runs.summary['mutual'].items():
    if isinstance(value, float):
      np.testing.assert_allclose(eight_summary[key], value, atol=2e-3, err_msg=key)


# --- Checks before any work. ------------------------------------------------------------------

def planned(config):
  check_config(config, 1)
  return plan_stages(config, '/nonexistent', 1197, 10)


def with_mutual(**fields):
  c = tiny_config()
  c.stages.mutual = mutual_stage(fields.pop('peers', PEERS), steps=5, **fields)
  c.stage_order = 'teacher,mutual'
  return c


def test_plan_of_a_mutual_stage():
  [_, plan] = planned(with_mutual(loss_weights=dict(mutual_kl=0.5)))
  assert [(p.name, p.model, p.resolution) for p in plan.peers] == [
      ('a', 'cnn_tiny', 8), ('b', 'cnn_small', 12)]
  assert plan.loss_terms == (('labels', 1.0), ('mutual_kl', 0.5)) and not plan.teachers
  [_, alone] = planned(with_mutual(loss_weights=dict(mutual_kl=0.0)))  # side by side
  assert alone.loss_terms == (('labels', 1.0),)


def bad(config_change):
  c = with_mutual()
  config_change(c)
  return c


def later_stage(source):
  def change(c):
    c.stages.student = stage_config('cnn_tiny', 8, teachers={'t': source}, steps=5)
    c.stage_order = 'teacher,mutual,student'
  return change


@pytest.mark.parametrize('config, fragments', [
    (with_mutual(peers={'a': ('cnn_tiny', 8)}),
     ('stages.mutual.peers: deep mutual learning needs at least 2 peers (has 1: a)',)),
    (with_mutual(peers={'a': ('cnn_tiny', 8), 'b': ('resnet9', 12)}),
     ("stages.mutual.peers.b.model='resnet9': unknown model",)),
    (with_mutual(peers={'a': ('cnn_tiny', 8), 'b': ('cnn_small', 16)}),
     ('stages.mutual.peers.b.resolution=16 is above the stored image size',)),
    (with_mutual(peers={'a': ('cnn_tiny', 8), 'checkpoints': ('cnn_small', 12)}),
     ('stages.mutual.peers.checkpoints: a peer name is letters',)),
    (with_mutual(teachers={'t': 'teacher'}), ('stages.mutual.teachers: a stage with peers',)),
    (with_mutual(loss_weights=dict(dkd=1.0)),
     ('stages.mutual.loss_weights.dkd: a stage with peers has the labels and mutual_kl',)),
    (with_mutual(loss_weights=dict(labels=0.0, mutual_kl=0.0)), ('nothing to train',)),
    (with_mutual(loss_options=dict(mutual_temperature=0.0)), ('mutual_temperature=0.0',)),
    (bad(lambda c: setattr(c.stages.mutual, 'model', 'cnn_tiny')),
     ("leave its model and resolution unset (model='cnn_tiny'",)),
    (bad(lambda c: setattr(c.stages.teacher.loss_weights, 'mutual_kl', 1.0)),
     ('stages.teacher.loss_weights.mutual_kl=1.0: deep mutual learning needs peers',)),
    (bad(later_stage('mutual')), ("stage 'mutual' trains peers; name one of them: 'mutual/a', "
                                  "'mutual/b'",)),
    (bad(later_stage('mutual/c')), ("teachers.t='mutual/c'", "'mutual/a', 'mutual/b'")),
    (bad(later_stage('teacher/a')), ("stage 'teacher' has no peers",)),
])
def test_bad_mutual_configs_are_one_line_config_errors(config, fragments):
  with pytest.raises(ConfigError) as error:
    planned(config)
  assert '\n' not in str(error.value) and all(f in str(error.value) for f in fragments), \
      str(error.value)


def test_bad_peer_on_the_command_line_is_exit_2_before_any_work(tmp_path):
  for override, fragment in (('--config.stages.mutual.peers.resnet.model=resnet9',
                              "stages.mutual.peers.resnet.model='resnet9': unknown model"),
                             ('--config.stages.mutual.peers.resnet.resolution=0',
                              'stages.mutual.peers.resnet.resolution must be positive')):
    result = run_cli(['--config', 'configs/digits_dml.py:fast', '--workdir',
                      str(tmp_path / 'w'), override])
    errors = [l for l in result.stderr.splitlines() if l.startswith('bigkd: error:')]
    assert result.returncode == 2 and len(errors) == 1 and fragment in errors[0], result.stderr
    assert not (tmp_path / 'w').exists()


def test_peer_shorthand_and_fields_are_checked_where_a_config_names_them():
  with pytest.raises(ConfigError, match="peers.a: unknown field 'modle'"):
    mutual_stage({'a': dict(modle='cnn_tiny', resolution=8), 'b': ('cnn_tiny', 8)})
  with pytest.raises(ConfigError, match=r'peers.a=\(.cnn_tiny.,\): give \(model, resolution\)'):
    mutual_stage({'a': ('cnn_tiny',), 'b': ('cnn_tiny', 8)})
  from bigkd.config import field_docs
  docs = field_docs()
  assert all(docs.get(k) for k in ('stages.*.peers', 'stages.*.peers.*.model',
                                   'stages.*.loss_weights.mutual_kl',
                                   'stages.*.loss_options.mutual_temperature'))


def test_digits_config_and_the_table_tool():
  """configs/digits_dml.py: the peers and each model alone for as many steps; the table tool
  reads a mutual stage's peers as rows of their own."""
  import importlib.util
  from bigkd.cli import config_module
  module = config_module('digits_dml')
  plans = planned(module.get_config('fast'))
  assert [p.name for p in plans] == ['mutual', 'cnn_alone', 'resnet_alone']
  assert [(p.model, p.resolution) for p in plans[0].peers] == [(p.model, p.resolution)
                                                              for p in plans[1:]]
  assert len({p.steps for p in plans}) == 1 and plans[0].loss_terms == (
      ('labels', 1.0), ('mutual_kl', 1.0))
  same = module.get_config('same')
  assert [p.model for p in same.stages.mutual.peers.values()] == ['cnn_small'] * 2
  with pytest.raises(ValueError, match='unknown variant'):
    module.get_config('fast,bogus')
  spec = importlib.util.spec_from_file_location(
      'dml_table', os.path.join(os.path.dirname(__file__), '..', 'tools', 'dml_table.py'))
  tool = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tool)
  rows = tool.model_rows({'mutual': {'peers': {'cnn': {}}, 'cnn/test_accuracy': 0.9,
                                     'test_ensemble_accuracy': 0.95, 'test_accuracy': 0.9},
                          'cnn_alone': {'test_accuracy': 0.8}})
  assert rows == {'mutual/cnn': {'test_accuracy': 0.9},
                  'mutual (ensemble)': {'test_accuracy': 0.95},
                  'cnn_alone': {'test_accuracy': 0.8}}


def test_a_mutual_stage_folder_from_another_run_is_not_a_teacher(tmp_path):
  """Named by its folder (not by this run's stage name), a mutual stage is refused too: its
  peers are the teachers, 'FOLDER/PEER'."""
  checkpoint.write_stage_info(tmp_path / 'mutual', '', {}, 0, 10,
                              peers={'a': dict(model='cnn_tiny', model_kwargs={}, resolution=8)})
  c = tiny_config()
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'t': str(tmp_path / 'mutual')},
                                  steps=5)
  c.stage_order = 'student'
  with pytest.raises(ConfigError, match=f"trains peers; name one of them: '{tmp_path}/mutual/a'"):
    planned(c)
