"""ViTs in a stage (issue 26): a ViT student distilled on the digits by function matching from a
ViT teacher at another resolution (the same crop box rendered at 16 px for the teacher and 12 px
for the student: each model's position embedding is for its own patch grid, 4 x 4 and 3 x 3),
with a FitNet term between their last blocks (3 x 3 -> 4 x 4 tokens through an adapter) and RKD
distances between their prelogits. The teacher is an AugReg-layout .npz of random ViT weights
(drawn on the host: no training to compile) made for 8 px: its position embedding is resized
from a 2 x 2 to the teacher's 4 x 4 patch grid when it is loaded. ViTs trained on labels, and
ResNets and ViTs teaching each other: configs/digits_vit.py (the test below plans it).

The stage on 1 device (this process) and on 8 (a 4 x 2 data x fsdp mesh with the ViT kernels
split over fsdp; a subprocess started first, so the two overlap) logs the same metrics and ends
with the same parameters; resumed from its middle checkpoint (as after a kill) it ends bitwise
where the uninterrupted run ends. The bfloat16 compute option reaches a ViT stage.
"""
import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import build
from bigkd.models import vit
from bigkd.config import stage_config
from bigkd.plan import check_config, plan_stages
from support import (MIN_FSDP, finish, final_params, random_params, read_metrics, start,
                     tiny_config)

STEPS, LOG_EVERY = 40, 10
MODEL, TEACHER_RES, STUDENT_RES = 'vit_tiny_test', 16, 12  # patch 4: 4 x 4 and 3 x 3 patches
FILE_RES = 8  # the teacher file's position embedding: a 2 x 2 patch grid
POS = 'Transformer/posembed_input/pos_embedding'
WEIGHTS = dict(kl=1.0, fitnet=1.0, rkd_distance=10.0)


def vit_config(teacher_file):
  """The student (ViT at 12 px) distilled from the ViT .npz `teacher_file` run at 16 px."""
  c = tiny_config()
  c.data.base_size = TEACHER_RES
  c.log_every = LOG_EVERY
  c.checkpoint_every = STEPS // 2  # a middle checkpoint for the resume test
  c.mesh.min_fsdp_size = MIN_FSDP  # the ViT's larger kernels split over fsdp on 8 devices
  c.stages.student = stage_config(
      MODEL, STUDENT_RES, steps=STEPS,
      teachers={'teacher': dict(source=teacher_file, model=MODEL, resolution=TEACHER_RES)},
      teaching_mode='function_matching', loss_weights=WEIGHTS,
      feature_pairs=(('student.block2', 'teacher.block2', 'fitnet'),
                     ('student.prelogits', 'teacher.prelogits', 'rkd_distance')))
  c.stage_order = 'student'
  return c


RUNNER = """
import sys
from bigkd import stages
from test_vit_stages import vit_config
config = vit_config(sys.argv[1])
config.mesh.data, config.mesh.fsdp = 4, 2
stages.run(config, sys.argv[2])
"""


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(1-device workdir, its summary, the 8-device subprocess, its workdir, the teacher)."""
  from bigkd import stages
  root = tmp_path_factory.mktemp('vit_stages')
  teacher = str(root / 'teacher.npz')
  vit.save_npz(random_params(MODEL, FILE_RES), teacher)
  proc = start([sys.executable, '-c', RUNNER, teacher, str(root / 'eight')], devices=8)
  try:
    summary = stages.run(vit_config(teacher), str(root / 'one'))['stages']
  except BaseException:
    proc.kill()
    raise
  yield root / 'one', summary, proc, root / 'eight', teacher
  proc.kill()  # ended already unless a test failed before waiting for it


def params(stage_dir, resolution):
  return final_params(str(stage_dir), MODEL, resolution)


@pytest.mark.integration
def test_vit_student_learns_the_vit_teacher_with_each_model_at_its_resolution(runs):
  one, summary, _, _, teacher = runs
  log = read_metrics(one / 'student')
  assert [m['step'] for m in log] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
  assert log[-1]['kl_T1'] < 0.8 * log[0]['kl_T1'], log
  for term in WEIGHTS:
    assert np.isfinite([m[f'loss_{term}'] for m in log]).all(), term
  assert log[-1]['loss_fitnet'] < log[0]['loss_fitnet'], log
  assert summary['student']['test_agreement'] > 0.3, summary  # 10 classes
  # Each model's position embedding covers its own patch grid (plus the class token).
  with np.load(teacher) as f:
    assert f[POS].shape == (1, 1 + 2 * 2, 32)
  for source, res in ((teacher, TEACHER_RES), (one / 'student', STUDENT_RES)):
    pos = params(source, res)['Transformer']['posembed_input']['pos_embedding']
    assert pos.shape == (1, 1 + (res // 4) ** 2, 32), (source, pos.shape)


@pytest.mark.integration
def test_resumed_from_its_middle_checkpoint_it_ends_bitwise_the_same(runs, tmp_path, capsys):
  """As after a kill: the stage resumes at step 20 (adapter and optimiser state included)."""
  from bigkd import stages
  one, summary, _, _, teacher = runs
  resumed = tmp_path / 'resumed'
  shutil.copytree(one, resumed)
  shutil.rmtree(resumed / 'student' / 'checkpoints' / str(STEPS))
  for path in (resumed / 'student' / 'summary.json', resumed / 'summary.json'):
    os.remove(path)
  capsys.readouterr()
  again = stages.run(vit_config(teacher), str(resumed))['stages']
  assert f'[student] resuming from step {STEPS // 2}' in capsys.readouterr().out
  assert again == summary
  jax.tree.map(np.testing.assert_array_equal, params(resumed / 'student', STUDENT_RES),
               params(one / 'student', STUDENT_RES))
  drop = lambda log: [{k: v for k, v in m.items() if k not in ('steps_per_sec', 'uptime')}
                      for m in log]
  assert drop(read_metrics(resumed / 'student')) == drop(read_metrics(one / 'student'))


def test_bfloat16_compute_reaches_a_vit_stage():
  """`stages.X.compute_dtype` (the paper configs' bfloat16 students) builds the ViT computing in
  bfloat16 with float32 parameters and logits, close to the float32 forward; so is the forward
  of a bfloat16 teacher (`teacher_dtype`: its parameters stored in bfloat16 too)."""
  c = tiny_config()
  c.stages.teacher = stage_config(MODEL, STUDENT_RES, steps=5, compute_dtype='bfloat16')
  check_config(c, 1)
  [plan] = plan_stages(c, '/nonexistent', 1197, 10)
  half = build.student_model(plan)
  full = build.student_model(dataclasses.replace(plan, compute_dtype='float32'))
  assert (half.dtype, full.dtype) == (jnp.bfloat16, jnp.float32)
  x = np.random.default_rng(0).uniform(-1, 1, (4, STUDENT_RES, STUDENT_RES, 3)).astype(np.float32)
  p = random_params(MODEL, STUDENT_RES)  # a random head: the model's own starts at zero
  as_teacher = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)  # teacher_dtype's parameters
  want, got, teacher = (jax.jit(m.apply)({'params': q}, x)
                        for m, q in ((full, p), (half, p), (half, as_teacher)))
  assert got.dtype == teacher.dtype == jnp.float32
  for logits in (got, teacher):
    err = float(jnp.max(jnp.abs(logits - want)) / jnp.max(jnp.abs(want)))
    assert 0 < err < 3e-2, err  # bfloat16 differs, a little


def without_key_bias(tree):
  """`tree` less the attention's key biases. Their gradient is zero in exact arithmetic (a key
  bias adds the same q.b to a query's logits over every key, which the softmax cancels), so
  Adam moves them by normalised rounding noise, which differs with the device count. (Where a
  true gradient is tiny, as into the final norm while the zero-initialised head is small, Adam
  amplifies rounding too: hence the parameters' tolerance of a third of one step, lr 3e-3.)"""
  for name, block in tree['Transformer'].items():
    if name.startswith('encoderblock_'):
      del block['MultiHeadDotProductAttention_1']['key']['bias']
  return tree


@pytest.mark.integration
def test_eight_devices_give_the_same_metrics(runs):  # last: the others overlap its run
  import chex
  one, summary, proc, eight, _ = runs
  finish(proc)
  for stage, res in (('student', STUDENT_RES),):
    a, b = read_metrics(one / stage), read_metrics(eight / stage)
    assert [m['step'] for m in a] == [m['step'] for m in b]
    for x, y in zip(a, b):
      keys = set(x) - {'steps_per_sec', 'uptime'}
      assert keys == set(y) - {'steps_per_sec', 'uptime'}
      for key in keys:  # agreement is a count: the device counts may differ by one example
        atol = 1 / (LOG_EVERY * tiny_config().batch_size) if key == 'agreement' else 1e-4
        np.testing.assert_allclose(y[key], x[key], rtol=2e-3, atol=atol, err_msg=f'{stage} {key}')
    chex.assert_trees_all_close(
        *(without_key_bias(params(run / stage, res)) for run in (one, eight)), rtol=1e-3,
        atol=1e-3)
  with open(eight / 'summary.json') as f:
    eight_summary = json.load(f)['stages']
  for stage in summary:
    for key, value in summary[stage].items():
      if isinstance(value, float):
        np.testing.assert_allclose(eight_summary[stage][key], value, atol=2e-3,
                                   err_msg=f'{stage} {key}')


def test_digits_vit_config_pairs_each_family_with_the_other():
  """configs/digits_vit.py: each student has the other family's teacher, and a baseline of its
  own model, resolution and budget trained on labels (that teacher of the other student)."""
  from bigkd import cli
  c = cli.config_module('digits_vit').get_config('steps=50')
  check_config(c, 1)
  plans = {p.name: p for p in plan_stages(c, '/nonexistent', 1197, 10)}
  assert list(plans) == ['resnet8', 'vit', 'vit_from_resnet8', 'resnet8_from_vit']
  for student, baseline in (('vit_from_resnet8', 'vit'), ('resnet8_from_vit', 'resnet8')):
    s, b = plans[student], plans[baseline]
    assert (s.model, s.resolution) == (b.model, b.resolution) and s.steps == b.steps == 50
    assert not b.teachers and b.label_weight == 1.0
    [t] = s.teachers
    assert t.model == plans[student.split('_from_')[1]].model != s.model
    assert s.teaching_mode == 'function_matching'
  with pytest.raises(ValueError, match="unknown variant 'steps=0'"):
    cli.config_module('digits_vit').get_config('steps=0')
