"""Sharding: bad meshes are config errors; a short distillation run ends with the same parameters,
metrics and evaluation on 8-device meshes (8x1, 4x2, 2x4) as on one device (the shared reference
run of conftest), its large params and their Adam moments really split over fsdp; gradient
accumulation gives the full batch's update."""
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigkd import checkpoint
from bigkd.config import ConfigError
from bigkd.models import get_model
from bigkd.plan import check_config
from bigkd.sharding import gather_rows, make_mesh, mesh_shape, param_spec, put_rows_sharded
from bigkd.step import Objective, StepSpec, Teacher, TrainState, make_train_step, summed_metrics
from support import assert_same_run, finish, random_params, start_runs, tiny_config


def saved_specs(stage_dir, item):
  """{path: partition spec} of the arrays a checkpoint item was saved from."""
  mngr = checkpoint.manager(stage_dir)
  meta = mngr.item_metadata(mngr.latest_step())[item]
  mngr.close()
  return {jax.tree_util.keystr(path): tuple(leaf.sharding.partition_spec)
          for path, leaf in jax.tree_util.tree_flatten_with_path(meta)[0]}


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


def test_bad_mesh_in_a_config_is_named_with_the_device_count():
  c = tiny_config()
  c.mesh.data, c.mesh.fsdp = 3, 3
  with pytest.raises(ConfigError, match=re.escape('mesh.data=3 x mesh.fsdp=3 does not match the '
                                                  '8 devices')):
    check_config(c, 8)


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
                  'function_matching', Objective((('kl', 1.0),), 'kl', 2.0, 0.25, 'logits'), 0)
  tx = optax.adam(1e-2)
  params = random_params('cnn_tiny', 8, seed=2)
  state = TrainState.create(params, tx.init(params), summed_metrics(True, spec.objective.terms))
  results = {}
  for k in (1, 4):
    step = jax.jit(make_train_step(spec, tx, lambda s: 1e-2, grad_accum_steps=k),
                   compiler_options={'xla_backend_optimization_level': 0})
    results[k] = step(state, teacher_params, images, jnp.full((16, 2), 10), labels)
  (full, full_metrics), (accum, accum_metrics) = results[1], results[4]
  chex.assert_trees_all_close(full.params, accum.params, rtol=1e-4, atol=2e-5)
  for key in ('loss', 'kl_T1', 'agreement', 'grad_norm'):
    np.testing.assert_allclose(full_metrics[key], accum_metrics[key], rtol=1e-5, err_msg=key)
  assert float(optax.global_norm(jax.tree.map(jnp.subtract, full.params, params))) > 1e-3


MESHES = {'8x1': {'mesh.data': 8, 'mesh.fsdp': 1},
          '4x2': {'mesh.data': 4, 'mesh.fsdp': 2, 'data.shard_resident': True},
          '2x4': {'mesh.data': -1, 'mesh.fsdp': 4, 'grad_accum_steps': 2,
                  'data.shard_resident': True}}


@pytest.mark.integration
def test_meshes_give_the_run_of_one_device(reference_run, tmp_path):
  runs = [(f'{tmp_path}/{name}', overrides) for name, overrides in MESHES.items()]
  log = finish(start_runs(reference_run.teacher, runs, 8))
  for name, overrides in MESHES.items():
    stage_dir = f'{tmp_path}/{name}/student'
    assert_same_run(reference_run.stage_dir(), stage_dir, name)
    fsdp = 8 // overrides['mesh.data'] if overrides['mesh.data'] > 0 else overrides['mesh.fsdp']
    params, opt = saved_specs(stage_dir, 'params'), saved_specs(stage_dir, 'opt_state')
    split = {k for k, v in params.items() if 'fsdp' in v}
    assert bool(split) == (fsdp > 1), (name, params)
    for key, spec in params.items():  # Adam's moments are split exactly like their params
      moments = [v for k, v in opt.items() if k.endswith(key) and ("['mu']" in k or "['nu']" in k)]
      assert moments and all(m == spec for m in moments), (name, key, spec, moments)
    line = re.search(rf'mesh data={8 // fsdp} fsdp={fsdp} .*teachers.teacher: (\d+)/', log)
    assert line and (int(line.group(1)) > 0) == (fsdp > 1), log
