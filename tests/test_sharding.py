"""Sharding: bad meshes are config errors; a short distillation run ends with the same parameters
on a 1-device and on 8-device meshes (8x1, 4x2, 2x4), its large params and their Adam moments
really split over fsdp; gradient accumulation gives the full batch's update."""
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigkd import checkpoint, stages
from bigkd.config import ConfigError, stage_config
from bigkd.models import get_model
from bigkd.sharding import gather_rows, make_mesh, mesh_shape, param_spec, put_rows_sharded
from bigkd.step import StepSpec, Teacher, TrainState, make_train_step
from conftest import REPO, run_cli, tiny_config
from test_cli import assert_bad_config

FAST_XLA = '--xla_backend_optimization_level=0'  # tiny models: compile time dominates
MIN_FSDP = 256  # small enough that the cnn kernels split over fsdp


def random_params(model, resolution, num_classes=10, seed=0):
  """Random parameters drawn on the host (no XLA compile, unlike `model.init`)."""
  shapes = jax.eval_shape(lambda: get_model(model, num_classes).init(
      jax.random.key(0), jnp.zeros((1, resolution, resolution, 3)))['params'])
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.standard_normal(s.shape) / np.sqrt(
      np.prod(s.shape[:-1]) or 1)).astype(np.float32), shapes)


def random_stage(stage_dir, model='cnn_small', resolution=12, num_classes=10, seed=0):
  """A bigkd stage folder with random parameters: a teacher without training one."""
  params = random_params(model, resolution, num_classes, seed)
  checkpoint.write_stage_info(stage_dir, model, {}, resolution, num_classes)
  mngr = checkpoint.manager(stage_dir)
  checkpoint.save(mngr, 1, params, {'unused': np.zeros((), np.int32)})
  mngr.wait_until_finished()
  mngr.close()
  return stage_dir


def distill_config(teacher_dir, steps=4, **overrides):
  """cnn_tiny at 8 px distilled (function matching, mixup) from the stage in `teacher_dir`."""
  c = tiny_config()
  c.mesh.min_fsdp_size = MIN_FSDP
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'teacher': teacher_dir}, steps=steps)
  c.stage_order = 'student'
  c.update_from_flattened_dict(overrides)
  return c


RUNNER = """
import json, sys
from bigkd import stages
from test_sharding import distill_config
for workdir, overrides in json.loads(sys.argv[2]):
  stages.run(distill_config(sys.argv[1], **overrides), workdir)
"""


def start_runs(teacher_dir, runs, devices):
  """Runs [(workdir, overrides)] one after another in a fresh process with `devices` CPUs."""
  env = dict(os.environ, PYTHONPATH=f'{REPO}:{REPO}/tests',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices} {FAST_XLA}')
  return subprocess.Popen([sys.executable, '-c', RUNNER, teacher_dir, json.dumps(runs)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def finish(proc, timeout=600):
  out, err = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, err[-3000:]
  return out


def final_params(stage_dir, model='cnn_tiny', resolution=8):
  """The stage's last parameters, restored (whatever mesh wrote them) onto this 1-device host."""
  target = stages.abstract_params(model, {}, 10, resolution, jnp.float32, make_mesh())
  return jax.device_get(checkpoint.load_params(stage_dir, target, 'test'))


def saved_specs(stage_dir, item):
  """{path: partition spec} of the arrays a checkpoint item was saved from."""
  mngr = checkpoint.manager(stage_dir)
  meta = mngr.item_metadata(mngr.latest_step())[item]
  mngr.close()
  return {jax.tree_util.keystr(path): tuple(leaf.sharding.partition_spec)
          for path, leaf in jax.tree_util.tree_flatten_with_path(meta)[0]}


def assert_trees_close(a, b, what):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5,
                               err_msg=f'{what} {jax.tree_util.keystr(path)}')


@pytest.mark.parametrize('data, fsdp, devices, expected', [
    (-1, 1, 8, (8, 1)), (-1, 2, 8, (4, 2)), (2, -1, 8, (2, 4)), (1, 1, 1, (1, 1))])
def test_mesh_shape_resolves_the_rest(data, fsdp, devices, expected):
  assert mesh_shape(data, fsdp, devices) == expected


@pytest.mark.parametrize('data, fsdp, fragment', [
    (3, 3, 'mesh.data=3 x mesh.fsdp=3'), (3, -1, 'mesh.data=3'), (-1, -1, 'at most one'),
    (0, 8, 'positive'), (-1, 3, 'mesh.fsdp=3')])
def test_bad_mesh_is_a_config_error(data, fsdp, fragment):
  with pytest.raises(ConfigError, match=re.escape(fragment)):
    mesh_shape(data, fsdp, 8)


def test_bad_mesh_on_the_command_line_exits_2(tmp_path):
  result = run_cli(['--config', 'configs/digits.py:fast', '--workdir', str(tmp_path),
                    '--config.mesh.data=3', '--config.mesh.fsdp=3'],
                   env_extra={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert_bad_config(result, 'mesh.data=3 x mesh.fsdp=3', '8 devices')


def test_param_spec_splits_the_largest_divisible_dimension():
  assert param_spec((3, 3, 64, 128), 4, 1000) == jax.sharding.PartitionSpec(
      None, None, None, 'fsdp')
  assert param_spec((3, 3, 64, 6), 4, 1000) == jax.sharding.PartitionSpec(None, None, 'fsdp', None)
  assert param_spec((10,), 4, 1000) == jax.sharding.PartitionSpec()  # small: replicated
  assert param_spec((3, 3, 64, 128), 1, 1) == jax.sharding.PartitionSpec()  # no fsdp axis


def test_gather_rows_equals_indexing():
  mesh = make_mesh()
  table = np.arange(7 * 2 * 2 * 3, dtype=np.uint8).reshape(7, 2, 2, 3)
  indices = jnp.array([6, 0, 3, 3], jnp.int32)
  got = jax.jit(lambda t, i: gather_rows(mesh, t, i))(put_rows_sharded(table, mesh), indices)
  np.testing.assert_array_equal(got, table[np.asarray(indices)])


def test_grad_accumulation_gives_the_full_batch_update():
  """Function matching with one mixup weight per batch: mixup pairs span microbatches, so only
  augmenting the whole batch before splitting it gives the same update."""
  teacher_model = get_model('cnn_tiny', 10)
  student = get_model('cnn_tiny', 10)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (16, 10, 10, 3)), jnp.uint8)
  labels = jnp.arange(16) % 10
  teacher_params = (random_params('cnn_tiny', 10, seed=1),)
  aug = dict(crop_area=(0.5, 1.0), crop_aspect=(0.75, 1.33), flip=True, mixup_alpha=1.0,
             mixup_per_example=False)
  spec = StepSpec(student, 8, (Teacher(teacher_model, 10),), 10, tuple(sorted(aug.items())),
                  'function_matching', 'kl', 2.0, 0.25, 'logits', 0)
  tx = optax.adam(1e-2)
  params = random_params('cnn_tiny', 8, seed=2)
  state = TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  results = {}
  for k in (1, 4):
    step = jax.jit(make_train_step(spec, tx, lambda s: 1e-2, grad_accum_steps=k),
                   compiler_options={'xla_backend_optimization_level': 0})
    results[k] = step(state, teacher_params, images, labels)
  (full, full_metrics), (accum, accum_metrics) = results[1], results[4]
  assert_trees_close(full.params, accum.params, 'params')
  for key in ('loss', 'kl', 'agreement', 'grad_norm'):
    np.testing.assert_allclose(full_metrics[key], accum_metrics[key], rtol=1e-5, err_msg=key)
  assert float(optax.global_norm(jax.tree.map(jnp.subtract, full.params, params))) > 1e-3


def test_meshes_give_the_parameters_of_one_device(tmp_path):
  teacher = random_stage(str(tmp_path / 'teacher'))
  meshes = {'8x1': {'mesh.data': 8, 'mesh.fsdp': 1},
            '4x2': {'mesh.data': 4, 'mesh.fsdp': 2, 'data.shard_resident': True},
            '2x4': {'mesh.data': -1, 'mesh.fsdp': 4, 'grad_accum_steps': 2,
                    'data.shard_resident': True}}
  runs = [(str(tmp_path / name), o) for name, o in meshes.items()]
  procs = [start_runs(teacher, runs[:2], 8), start_runs(teacher, runs[2:], 8),
           start_runs(teacher, [(str(tmp_path / 'one'), {})], 1)]  # two cores: keep both busy
  log = ''.join(finish(p) for p in procs)
  reference = final_params(str(tmp_path / 'one' / 'student'))
  for name, overrides in meshes.items():
    stage_dir = str(tmp_path / name / 'student')
    assert_trees_close(reference, final_params(stage_dir), name)
    fsdp = 8 // overrides['mesh.data'] if overrides['mesh.data'] > 0 else overrides['mesh.fsdp']
    params, opt = saved_specs(stage_dir, 'params'), saved_specs(stage_dir, 'opt_state')
    split = {k for k, v in params.items() if 'fsdp' in v}
    assert bool(split) == (fsdp > 1), (name, params)
    for key, spec in params.items():  # Adam's moments are split exactly like their params
      moments = [v for k, v in opt.items() if k.endswith(key) and ("['mu']" in k or "['nu']" in k)]
      assert moments and all(m == spec for m in moments), (name, key, spec, moments)
    line = re.search(rf'mesh data={8 // fsdp} fsdp={fsdp} .*teacher teacher: (\d+)/', log)
    assert line and (int(line.group(1)) > 0) == (fsdp > 1), log
