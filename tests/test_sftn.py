"""Student-friendly teacher networks (SFTN, Park et al. 2021) as a bigkd stage.

An SFTN stage trains a teacher on labels together with student branches: at each tap of
`sftn_taps`, a transform (1x1 conv + GroupNorm + ReLU) of the teacher's feature feeds the
student's layers after that tap (`from_tap`). Its loss is λ_T·CE(teacher) + λ_KL·Σ τ²·KL(q_T ‖
q_R^i) + λ_CE·Σ CE(q_R^i). Here: that loss and its gradient against NumPy; the models' `from_tap`
against their full forward; a digits run (an SFTN cnn_small with cnn_tiny branches, then a
cnn_tiny distilled from it) whose teacher loads and evaluates as an ordinary one, that resumes
bitwise, and that ends the same on a 4 x 2 data x fsdp mesh of 8 devices; bad configs.
"""
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import checkpoint, objective, stages
from bigkd.config import SFTN_LOSS_WEIGHTS, ConfigError, stage_config
from bigkd.models import features, get_model
from bigkd.models.adapters import StudentBranch
from bigkd.plan import check_config, plan_stages
from support import MIN_FSDP, finish, read_metrics, run_cli, start, tiny_config


# --- The loss and its gradient, against NumPy. ----------------------------------------------

class LinearBlock(nn.Module):
  """A "student branch" NumPy can differentiate: a bias-free dense layer on the flat feature."""
  classes: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.classes, use_bias=False)(x.reshape(x.shape[0], -1))


def np_log_softmax(z):
  z = z - z.max(1, keepdims=True)
  return z - np.log(np.exp(z).sum(1, keepdims=True))


def np_sftn(teacher_logits, feats, kernels, targets, weights, tau):
  """(L_SFTN, dL/d teacher logits, [dL/d kernel_i]) in float64, by hand: the chain rule through
  softmax, with the KL's gradient reaching the teacher's logits too (no stop-gradient)."""
  lam_t, lam_kl, lam_ce = weights
  batch = teacher_logits.shape[0]
  softmax = lambda z: np.exp(np_log_softmax(z))
  loss = lam_t * -np.mean(np.sum(targets * np_log_softmax(teacher_logits), 1))
  d_teacher = lam_t * (softmax(teacher_logits) - targets) / batch
  d_kernels = []
  for f, w in zip(feats, kernels):
    flat = f.reshape(batch, -1)
    branch = flat @ w
    log_pt, log_pr = np_log_softmax(teacher_logits / tau), np_log_softmax(branch / tau)
    pt, pr = np.exp(log_pt), np.exp(log_pr)
    kl_rows = np.sum(pt * (log_pt - log_pr), 1, keepdims=True)
    loss += lam_kl * tau ** 2 * np.mean(kl_rows)
    loss += lam_ce * -np.mean(np.sum(targets * np_log_softmax(branch), 1))
    # d KL / d (z_T / τ) = p_T (log p_T − log p_R − KL); d KL / d (z_R / τ) = p_R − p_T.
    d_teacher += lam_kl * tau * pt * (log_pt - log_pr - kl_rows) / batch
    d_branch = lam_kl * tau * (pr - pt) / batch + lam_ce * (softmax(branch) - targets) / batch
    d_kernels.append(flat.T @ d_branch)
  return loss, d_teacher, d_kernels


def test_sftn_loss_and_gradient_equal_numpy():
  rng = np.random.default_rng(0)
  batch, classes, tau, weights = 6, 5, 2.0, (1.0, 3.0, 0.5)
  teacher_logits = rng.normal(size=(batch, classes)) * 2
  feats = {'stage1': rng.normal(size=(batch, 2, 2, 3)), 'stage2': rng.normal(size=(batch, 1, 1, 4))}
  targets = np.eye(classes)[rng.integers(0, classes, batch)] * 0.8 + 0.2 / classes  # mixed
  branches = tuple(objective.SftnBranch(tap, LinearBlock(classes), f'sftn_{tap}') for tap in feats)
  kernels = {b.key: {'Dense_0': {'kernel': rng.normal(size=(feats[b.tap][0].size, classes))}}
             for b in branches}
  obj = objective.Objective((('labels', weights[0]), ('sftn_kl', weights[1]),
                             ('sftn_ce', weights[2])), options=(('sftn_temperature', tau),),
                            sftn_branches=branches)

  def loss(logits, aux):
    o = objective.Outputs(logits, {k: jnp.asarray(v, jnp.float32) for k, v in feats.items()},
                          None, [], jnp.asarray(targets, jnp.float32), aux, 0)
    return objective.loss_and_metrics(o, obj)

  f32 = lambda tree: jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  (value, metrics), (d_logits, d_aux) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
      f32(teacher_logits), f32(kernels))
  want, want_d_logits, want_d_kernels = np_sftn(
      teacher_logits, [feats[b.tap] for b in branches],
      [kernels[b.key]['Dense_0']['kernel'] for b in branches], targets, weights, tau)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  assert set(metrics) == {'loss', 'loss_labels', 'loss_sftn_kl', 'loss_sftn_ce'}
  np.testing.assert_allclose(d_logits, want_d_logits, rtol=1e-4, atol=1e-6)
  for b, want_d in zip(branches, want_d_kernels):
    np.testing.assert_allclose(d_aux[b.key]['Dense_0']['kernel'], want_d, rtol=1e-4, atol=1e-6)
  # The KL moves the teacher's output too (it is no fixed target): without its term the
  # gradient on the teacher's logits is the cross-entropy's alone.
  kl_part = want_d_logits - weights[0] * (np.exp(np_log_softmax(teacher_logits)) - targets) / batch
  assert np.abs(kl_part).max() > 1e-3


def host_params(model, example):
  """Random parameters of `model` drawn on the host (no init compile: shapes only)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), example)['params']
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(
      np.prod(s.shape[:-1]) or 1)).astype(np.float32), shapes)


def test_models_run_from_a_tap_as_their_full_forward_does():
  """`apply(feature at tap, from_tap=tap)` = the full model's logits, for each tap, and a
  branch's parameters are the full model's subtree (the same names)."""
  for name, resolution, kwargs in (('resnet8', 16, {}), ('cnn_tiny', 12, {}),
                                   ('bit_r50x1', 32, dict(base=32, block_units=(2, 1, 1, 1)))):
    model = get_model(name, 10, **kwargs)
    images = jax.random.uniform(jax.random.key(1), (2, resolution, resolution, 3), minval=-1)
    params = host_params(model, images[:1])
    feats = jax.eval_shape(lambda x: features(model, params, x), images)[1]
    taps = sorted(t for t in feats if t.startswith('stage'))
    branches = [jax.eval_shape(lambda f: model.init(jax.random.key(0), f, from_tap=tap),
                               feats[tap])['params'] for tap in taps]
    for tap, branch in zip(taps, branches):
      assert jax.tree.map(jnp.shape, branch) == jax.tree.map(
          jnp.shape, {k: params[k] for k in branch}), (name, tap)

    @jax.jit
    def both(params, images):
      logits, feats = features(model, params, images)
      return logits, [model.apply({'params': {k: params[k] for k in branch}}, feats[tap],
                                  from_tap=tap) for tap, branch in zip(taps, branches)]

    logits, from_taps = both(params, images)
    for tap, branch_logits in zip(taps, from_taps):
      np.testing.assert_allclose(branch_logits, logits, rtol=1e-5, atol=1e-5,
                                 err_msg=f'{name} {tap}')
    with pytest.raises(ValueError, match="cannot run from tap 'prelogits'"):
      jax.eval_shape(lambda f: model.apply({'params': params}, f, from_tap='prelogits'),
                     feats['prelogits'])


def test_student_branch_is_its_transform_then_the_students_later_layers():
  """A bit_tiny teacher's stage2 [4, 4, 256] at 32 px into a resnet8 student laid out at 16
  px: 1x1 conv to 32 channels, resized to [8, 8], GroupNorm, ReLU, then resnet8's stage3."""
  from test_feature_losses import np_group_norm
  student = get_model('resnet8', 10)
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 256))
  branch = StudentBranch(student, 'stage2', (8, 8, 32))
  params = host_params(branch, x[:1])
  conv = np.einsum('bhwc,cd->bhwd', np.asarray(x), params['transform_conv']['kernel'][0, 0])
  resized = np.asarray(jax.image.resize(conv, (2, 8, 8, 32), 'bilinear'))
  norm = params['transform_norm']
  y = np.maximum(np_group_norm(resized, 32, norm['scale'], norm['bias'], eps=1e-6), 0)
  want, got = jax.jit(lambda p, y, x: (
      student.apply({'params': p['student']}, y, from_tap='stage2'),
      branch.apply({'params': p}, x)))(params, jnp.asarray(y, jnp.float32), x)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert set(params['student']) == {'BasicBlock_2', 'Dense_0'}  # resnet8's stage3 and head


# --- A digits run: SFTN teacher, then a student distilled from it. ---------------------------

STEPS, CHECKPOINT_EVERY = 20, 10
BRANCHES = ('sftn_stage1', 'sftn_stage2')


def sftn_config(stage_order='sftn,student'):
  """cnn_small at 12 px with cnn_tiny branches at stage1 [6, 6, 16] -> [6, 6, 8] and stage2
  [3, 3, 32] -> [3, 3, 16] (the paper's weights), then cnn_tiny at 8 px distilled from it."""
  c = tiny_config()
  c.log_every = CHECKPOINT_EVERY
  c.checkpoint_every = CHECKPOINT_EVERY
  c.mesh.min_fsdp_size = MIN_FSDP  # the fsdp run splits the kernels (here: 1 device, no effect)
  c.stages.sftn = stage_config('cnn_small', 12, steps=STEPS, sftn_student='cnn_tiny',
                               sftn_taps=('stage1', 'stage2'), loss_weights=SFTN_LOSS_WEIGHTS,
                               augment=dict(mixup_alpha=0.0))
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'teacher': 'sftn'}, steps=6)
  c.stage_order = stage_order
  return c


RUNNER = """
import sys
from bigkd import stages
from test_sftn import sftn_config
config = sftn_config('sftn')
config.mesh.data, config.mesh.fsdp = 4, 2
stages.run(config, sys.argv[1])
"""


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(workdir, summary) of the 1-device run, and the 8-device one (a subprocess started first,
  so that the two overlap) as `eight`."""
  root = tmp_path_factory.mktemp('sftn')
  eight = start([sys.executable, '-c', RUNNER, str(root / 'eight')], devices=8)
  try:
    summary = stages.run(sftn_config(), str(root / 'one'))['stages']
  except BaseException:
    eight.kill()
    raise
  yield root / 'one', summary, (eight, root / 'eight')
  finish(eight)


def saved(stage_dir, item, like=None):
  """The latest checkpoint's `item`, on this host; `like`: a tree of its shapes (needed where
  another mesh wrote it)."""
  mngr = checkpoint.manager(str(stage_dir))
  step = mngr.latest_step()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = None if like is None else jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
  restored = mngr.restore(step, args=checkpoint.ocp.args.Composite(
      **{item: checkpoint.ocp.args.StandardRestore(target)}))[item]
  mngr.close()
  return jax.device_get(restored)


@pytest.mark.integration
def test_sftn_stage_trains_its_branches_and_exports_an_ordinary_teacher(run):
  workdir, summary, _ = run
  log = read_metrics(workdir / 'sftn')
  weights = SFTN_LOSS_WEIGHTS
  for m in log:  # the loss is λ_T·CE + λ_KL·KL + λ_CE·CE, each term logged
    assert m['loss'] == pytest.approx(sum(w * m[f'loss_{t}'] for t, w in weights.items()), 1e-6)
  assert log[-1]['loss_sftn_ce'] < log[0]['loss_sftn_ce'] and log[-1]['loss'] < log[0]['loss']
  aux = saved(workdir / 'sftn', 'aux_params')
  assert set(aux) == set(BRANCHES)  # kept in the checkpoint for resume ...
  assert aux['sftn_stage1']['transform_conv']['kernel'].shape == (1, 1, 16, 8)
  assert set(aux['sftn_stage2']['student']) == {'Dense_0'}  # cnn_tiny after stage2: its head
  # ... and not in what a teacher reads: the stage folder fits a plain cnn_small.
  checkpoint.check_fits(str(workdir / 'sftn'), 'cnn_small', {}, 10, 12, 'as a teacher')

  # The later stage's teacher is the trained model: the same logits as the SFTN stage's own
  # forward of its saved parameters, the same accuracy in its evaluation.
  from bigkd.build import load_teachers, student_model
  from bigkd.forward import forward, teacher_forward
  from bigkd.sharding import make_mesh
  c = sftn_config()
  check_config(c, 1)
  plans = {p.name: p for p in plan_stages(c, str(workdir), 1197, 10)}
  teachers, teacher_params = load_teachers(plans['student'], make_mesh())
  images = jax.random.uniform(jax.random.key(0), (16, 12, 12, 3), minval=-1)
  as_teacher = teacher_forward(teachers, teacher_params, {12: images})[0][0]
  own = forward(student_model(plans['sftn']), saved(workdir / 'sftn', 'params'), images)[0]
  np.testing.assert_array_equal(as_teacher, own)
  assert summary['student']['test_teacher_accuracy'] == summary['sftn']['test_accuracy']
  assert summary['student']['test_agreement'] > 0


@pytest.mark.integration
def test_sftn_stage_resumed_from_its_middle_equals_the_uninterrupted_run(run, tmp_path, capsys):
  workdir, summary, _ = run
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir, resumed)
  shutil.rmtree(resumed / 'sftn' / 'checkpoints' / str(STEPS))  # as if killed after step 10
  shutil.rmtree(resumed / 'student')
  for path in (resumed / 'sftn' / 'summary.json', resumed / 'summary.json'):
    os.remove(path)
  capsys.readouterr()
  assert stages.run(sftn_config(), str(resumed))['stages'] == summary
  assert f'[sftn] resuming from step {CHECKPOINT_EVERY}' in capsys.readouterr().out
  for item in ('params', 'aux_params'):
    jax.tree.map(np.testing.assert_array_equal, saved(resumed / 'sftn', item),
                 saved(workdir / 'sftn', item))
  drop = lambda log: [{k: v for k, v in m.items() if k not in ('steps_per_sec', 'uptime')}
                      for m in log]
  for stage in ('sftn', 'student'):
    assert drop(read_metrics(resumed / stage)) == drop(read_metrics(workdir / stage)), stage


@pytest.mark.integration
def test_sftn_stage_on_8_devices_with_fsdp_ends_as_on_one(run):
  import chex
  workdir, summary, (eight, eight_dir) = run
  finish(eight)
  ref, got = read_metrics(workdir / 'sftn'), read_metrics(eight_dir / 'sftn')
  assert [m['step'] for m in ref] == [m['step'] for m in got]
  for a, b in zip(ref, got):
    for key in ('loss', 'loss_labels', 'loss_sftn_kl', 'loss_sftn_ce', 'grad_norm'):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-3, atol=1e-5, err_msg=key)
  for item in ('params', 'aux_params'):
    one = saved(workdir / 'sftn', item)
    chex.assert_trees_all_close(saved(eight_dir / 'sftn', item, like=one), one, rtol=1e-3,
                                atol=1e-4, custom_message=item)
  eight_summary = json.loads((eight_dir / 'sftn' / 'summary.json').read_text())
  np.testing.assert_allclose(eight_summary['test_accuracy'], summary['sftn']['test_accuracy'],
                             atol=2e-3)


# --- Checks before any work. -----------------------------------------------------------------

def planned(model='cnn_small', resolution=12, **fields):
  c = tiny_config()
  c.data.base_size = resolution
  c.stages.teacher = stage_config(model, resolution, steps=5, **{
      'sftn_student': 'cnn_tiny', 'sftn_taps': ('stage1',), 'loss_weights': SFTN_LOSS_WEIGHTS,
      **fields})
  check_config(c, 1)
  return plan_stages(c, '/nonexistent', 1197, 10)[-1]


def test_sftn_plan_weights_and_branch_shapes():
  plan = planned(sftn_taps=('stage1', 'stage2'), sftn_resolution=16)
  assert plan.loss_terms == (('labels', 1.0), ('sftn_kl', 3.0), ('sftn_ce', 1.0))
  assert plan.sftn_branches == (('stage1', (6, 6, 16), (8, 8, 8)),
                                ('stage2', (3, 3, 32), (4, 4, 16)))
  assert planned(loss_weights=dict(sftn_kl=3.0)).loss_terms == (('labels', 1.0), ('sftn_kl', 3.0))
  assert planned(loss_weights=dict(labels=0.5, sftn_ce=1.0)).loss_terms[0] == ('labels', 0.5)
  # A BiT teacher with a CIFAR-ResNet student laid out at 16 px, and with a BiT student.
  bit = planned('bit_tiny', 32, sftn_student='resnet8', sftn_taps=('stage2',),
                sftn_resolution=16)
  assert bit.sftn_branches == (('stage2', (4, 4, 256), (8, 8, 32)),)
  assert planned('bit_tiny', 32, sftn_student='bit_tiny', sftn_taps=('stage3',)).sftn_branches == (
      ('stage3', (2, 2, 512), (2, 2, 512)),)


@pytest.mark.parametrize('fields, fragment', [
    (dict(sftn_taps=('stage7',)), "stages.teacher.sftn_taps: cnn_small has no tap 'stage7'"),
    (dict(sftn_taps=('prelogits',)), "sftn_taps: a branch cannot start at 'prelogits'"),
    (dict(sftn_student='resnet9'), "stages.teacher.sftn_student='resnet9': unknown model"),
    (dict(sftn_student='vit_tiny_test'), "sftn_student='vit_tiny_test' cannot run its layers "
     'from a tap'),
    (dict(sftn_student='resnet8', sftn_taps=('stage3',)),
     "sftn_taps: cnn_small has no tap 'stage3'"),
    (dict(sftn_taps=()), 'sftn_taps=() must name one or more distinct taps'),
    (dict(loss_weights=dict(labels=1.0)), 'sftn_student needs a weighted sftn_kl or sftn_ce'),
    (dict(sftn_student='', sftn_taps=()), 'loss_weights.sftn_kl: SFTN needs sftn_student'),
    (dict(teachers={'t': 'other'}), 'an SFTN stage trains a teacher on labels'),
    (dict(loss_options=dict(sftn_temperature=0.0)), 'sftn_temperature=0.0 must be positive'),
])
def test_bad_sftn_configs_are_one_line_config_errors(fields, fragment):
  with pytest.raises(ConfigError) as error:
    planned(**fields)
  assert fragment in str(error.value) and '\n' not in str(error.value), str(error.value)


def test_bad_sftn_config_exits_2_with_one_line_before_the_workdir(tmp_path):
  result = run_cli(['--config', 'configs/digits_sftn.py:fast', '--workdir', str(tmp_path / 'w'),
                    '--config.stages.sftn.sftn_taps=("stage1","stage9")'])
  assert result.returncode == 2, result
  assert result.stderr.strip().count('\n') == 0 and 'stage9' in result.stderr, result.stderr
  assert not (tmp_path / 'w').exists()
