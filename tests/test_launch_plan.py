"""bigkd-plan: the trainer's step compiled by libtpu for TPU slices this machine does not have
(requirements-plan.txt; the suite installs it). Per-device numbers are checked by the relations
they must obey, not against hard-coded values."""
import json

import jax
import pytest

from bigkd import launch_plan
from bigkd.config import ConfigError, stage_config
from support import run_main, tiny_config

TARGET = 'v5e:2x2'  # 4 abstract v5e chips


def test_digits_config_compiles_for_a_tpu_slice(tmp_path):
  out = tmp_path / 'plan.json'
  result = run_main('bigkd.launch_plan', ['--config', 'configs/digits.py:fast', '--target',
                                          'v5e-4', '--out', str(out)])
  assert result.returncode == 0, result.stderr
  plan = json.loads(out.read_text())
  assert plan['topology'] == TARGET and plan['devices'] == 4
  assert plan['device_kind'] == 'TPU v5 lite' and plan['train_examples'] == 1197
  assert list(plan['stages']) == ['teacher', 'student', 'baseline']
  for name, stage in plan['stages'].items():
    assert stage['fits'] and 0 < stage['peak_bytes'] < plan['device_memory_bytes'], name
    assert stage['flops'] > 0 and stage['params_bytes'] > 0 and stage['opt_state_bytes'] > 0
    assert stage['peak_bytes'] >= stage['argument_bytes'] + stage['temp_bytes'] - stage[
        'alias_bytes']
  assert plan['stages']['student']['teacher_bytes'] > 0 == plan['stages']['baseline'][
      'teacher_bytes']
  assert 'XLA memory analysis' in result.stdout and 'fits' in result.stdout

  # A GPU node: the same step compiled for as many v5p chips (95 GiB: XLA:TPU refuses a program
  # larger than the chip, so not v5e's 16), checked against the GPU's memory.
  result = run_main('bigkd.launch_plan', ['--config', 'configs/digits.py:fast', '--target',
                                          '4xA100-40', '--stage', 'student', '--out', str(out)])
  assert result.returncode == 0, result.stderr
  gpu = json.loads(out.read_text())
  assert 'jax compiles for CUDA only where a GPU is' in result.stdout
  assert (gpu['device_kind'], gpu['estimated_from']) == ('A100-40 (GPU)',
                                                         'XLA:TPU compile for v5p:2x2x1')
  assert gpu['device_memory_bytes'] == 40 * 2 ** 30 and list(gpu['stages']) == ['student']
  assert gpu['stages']['student']['fits'] and gpu['stages']['student']['peak_bytes'] > 0
  for key in ('flops', 'params_bytes'):  # the same program; its layout is v5p's
    assert gpu['stages']['student'][key] == plan['stages']['student'][key], key
  assert gpu['stages']['student']['xla_step_seconds'] is None  # TPU's cost model: not a GPU's

  # One byte less than the student's peak: the levers are added one by one until it fits, and
  # the overrides printed give that peak when planned as a config.
  peak = plan['stages']['student']['peak_bytes']
  args = ['--config', 'configs/digits.py:fast', '--target', 'v5e-4', '--stage', 'student']
  result = run_main('bigkd.launch_plan', [*args, '--device_memory_gib', str((peak - 1) / 2 ** 30),
                                          '--out', str(out)])
  assert result.returncode == 0, result.stderr
  student = json.loads(out.read_text())['stages']['student']
  assert not student['fits'] and 'compiling again with the levers' in result.stdout
  fix = student['fits_with']
  assert fix and fix['peak_bytes'] < peak and list(fix['overrides']) == ['optimizer.mu_dtype']
  flags = launch_plan.flags_of(fix['overrides'])
  assert f'fits with: {flags}' in result.stdout
  again = run_main('bigkd.launch_plan', [*args, *flags.split(), '--out', str(out)])
  assert again.returncode == 0, again.stderr
  planned = json.loads(out.read_text())['stages']['student']
  assert planned['peak_bytes'] == fix['peak_bytes']
  # The same program as the lever's: its analyses come from the plan cache, compiled once.
  assert planned['from_cache'] and 'read from the plan cache' in again.stdout


def test_levers_in_the_order_of_their_cost():
  c = tiny_config(steps=10, batch_size=64)
  assert launch_plan.levers(c, 'teacher', 4) == [
      {'optimizer.mu_dtype': 'bfloat16'}, {'stages.teacher.compute_dtype': 'bfloat16'},
      {'mesh.data': 1, 'mesh.fsdp': -1}, {'stages.teacher.model_kwargs.remat': True},
      {'stages.teacher.grad_accum_steps': 2}, {'stages.teacher.grad_accum_steps': 4},
      {'stages.teacher.grad_accum_steps': 8}]
  changed = launch_plan.with_overrides(c, {'stages.teacher.model_kwargs.remat': True,
                                           'mesh.fsdp': -1})
  assert changed.stages.teacher.model_kwargs.remat and changed.mesh.fsdp == -1
  assert 'remat' not in c.stages.teacher.model_kwargs and c.mesh.fsdp == 1  # a copy
  assert launch_plan.levers(changed, 'teacher', 4)[2:3] == [
      {'stages.teacher.grad_accum_steps': 2}]


def planned(config, **kwargs):
  return launch_plan.plan(config, TARGET, out=lambda *_: None, **kwargs)['stages']['teacher']


def relation_config(batch=256, **top):
  """cnn_base at 64 px, data parallel over the 4 chips: a small model whose XLA:TPU temporaries
  grow with the batch and shrink in bfloat16 (at 32 px, cnn_base, cnn_small and resnet8 keep
  them at 2-6 MiB whatever the batch or dtype), with kernels large enough to split over fsdp; it
  compiles in about 5 s here (resnet8x2 at 32 px, which also obeys the relations: 18 s)."""
  c = tiny_config(steps=10, batch_size=batch, **top)
  c.data.base_size, c.data.device_resident = 64, False
  c.mesh.min_fsdp_size = 256  # every conv kernel splits over fsdp
  c.stages.teacher = stage_config('cnn_base', 64, steps=10, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  return c


@pytest.fixture(scope='module')
def base():
  """The plan of relation_config(), which the relations below compare with."""
  return planned(relation_config())


def test_fsdp_divides_parameter_and_optimiser_bytes(base):
  c = relation_config()
  c.mesh.data, c.mesh.fsdp = 1, 4
  split = planned(c)
  for key in ('params_bytes', 'opt_state_bytes'):
    assert 3.5 < base[key] / split[key] <= 4.0, (key, base[key], split[key])


def test_a_larger_batch_costs_more_temporaries_and_twice_the_flops(base):
  """Measured: 146 MiB of temporaries at batch 256, 200 MiB at 512 (1.37x); only the direction
  and the FLOPs are checked."""
  large = planned(relation_config(batch=512))
  assert large['temp_bytes'] > 1.1 * base['temp_bytes']
  assert 1.9 < large['flops'] / base['flops'] < 2.1
  assert large['params_bytes'] == base['params_bytes']


def test_a_bfloat16_model_costs_fewer_temporaries_and_keeps_float32_parameters(base):
  """Measured: 146 MiB of temporaries in float32, 6 MiB in bfloat16; the parameters and Adam's
  state stay float32 (the master copy)."""
  c = relation_config()
  c.stages.teacher.compute_dtype = 'bfloat16'
  half = planned(c)
  assert half['temp_bytes'] < 0.8 * base['temp_bytes'], (half['temp_bytes'], base['temp_bytes'])
  for key in ('params_bytes', 'opt_state_bytes'):
    assert half[key] == base[key], key


@pytest.mark.slow
def test_remat_costs_fewer_temporaries_and_more_flops():
  """Remat (BiT's blocks; the CIFAR ResNets have none) recomputes the blocks' activations in
  the backward pass instead of keeping them. Below 64 px and batch 512 XLA:TPU keeps these
  small models' activations at a few MiB whatever remat does, and above it a compile takes about
  a minute here, so this is a slow test (measured: 33.6 -> 31.8 MiB, FLOPs x1.16); the README's
  fit table shows it for the paper's pair at batch 4096."""
  def config(remat):
    c = relation_config(batch=512)
    c.stages.teacher = stage_config(
        'bit_r50x1', 64, steps=10, label_weight=1.0, augment=dict(mixup_alpha=0.0),
        model_kwargs=dict(base=32, block_units=(1, 1, 1, 1), **({'remat': True} if remat else {})))
    return c
  kept, remat = planned(config(False)), planned(config(True))
  assert remat['temp_bytes'] < kept['temp_bytes'] and remat['flops'] > 1.05 * kept['flops']
  assert remat['params_bytes'] == kept['params_bytes']


def test_slice_names_translate_to_topologies():
  assert launch_plan.topology_of('v4-32') == ('v4', 'v4:2x2x4')
  assert launch_plan.topology_of('v5p-32') == ('v5p', 'v5p:2x2x4')
  assert launch_plan.topology_of('v5e-16') == ('v5e', 'v5e:4x4')
  assert launch_plan.topology_of('v6e-256') == ('v6e', 'v6e:16x16')
  assert launch_plan.topology_of('v2-8') == ('v2', 'v2:2x2')
  assert launch_plan.topology_of('v5e:2x4') == ('v5e', 'v5e:2x4')
  assert launch_plan.topology_of('v4-8') == ('v4', 'v4:2x2x1')  # the smallest v4 slice
  for name, devices in (('v4-32', 32), ('v5p-32', 16), ('v5e-16', 16), ('v2-8', 8),
                        ('v3-32', 32), ('v4-8', 8), ('v5p-8', 4), ('v4-16', 16)):
    assert len(launch_plan.tpu_devices(launch_plan.topology_of(name)[1])) == devices, name
  for bad in ('v4-12', 'h100', 'v5e-0', 'v7-8'):
    with pytest.raises(ConfigError, match='--target'):
      launch_plan.topology_of(bad)
  assert launch_plan.gpu_of('8xH100-80') == (8, 'H100-80') and launch_plan.gpu_of('v5e-4') is None
  for bad in ('3xH100-80', '8xV100-16', '32xA100-80'):
    with pytest.raises(ConfigError, match='COUNTxMODEL'):
      launch_plan.gpu_of(bad)


def test_bad_input_is_one_line_and_exit_2():
  for args, says in ((['--config', 'configs/digits.py:fast'], '--target is required'),
                     (['--config', 'configs/digits.py:fast', '--target', 'v4-12'], 'v4-12'),
                     (['--config', 'configs/digits.py:fast', '--target', TARGET, '--stage',
                       'nope'], "--stage='nope'")):
    result = run_main('bigkd.launch_plan', args)
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# --- The ViT pair of configs/vit_imagenet.py: ViT-B/16 at 384 px teaching ViT-S/16 at 224 px. --

VIT_PAIR = ['--config', 'configs/vit_imagenet.py:b16_384_s16_224', '--train_examples', '1255544']


def test_vit_pair_plans_its_real_models_without_their_files():
  """bigkd-plan's path for the ViT pair up to XLA (the compile itself, a minute or more of CPU
  for ViT-B/16 even at a tiny batch, is the slow test below): real models at real resolutions,
  the teacher's .npz a placeholder that planning does not need, the step lowered for 4 v5e
  chips with the shardings of the config's mesh."""
  from bigkd import build, cli
  from bigkd.models import param_shapes
  c = cli.config_module('vit_imagenet').get_config('b16_384_s16_224')
  c.batch_size = 8  # the lowered program's shapes, not its size, are checked here
  devices = launch_plan.tpu_devices(TARGET)
  plans, mesh = launch_plan.stages_and_mesh(c, devices, launch_plan.DataSizes(1255544, 1000, {}))
  [p] = plans
  assert (p.model, p.resolution, p.compute_dtype) == ('vit_s16', 224, 'bfloat16')
  assert [(t.model, t.resolution) for t in p.teachers] == [('vit_b16', 384)]
  step, args = build.abstract_stage(p, mesh, 1255544, c.data.base_size)
  state, teacher_params, *_ = args
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert count(state.params) == count(param_shapes('vit_s16', 1000, 224))
  # The teacher's position embedding is for its own 24 x 24 patch grid (and the class token).
  pos = teacher_params[0]['Transformer']['posembed_input']['pos_embedding']
  assert pos.shape == (1, 1 + 24 * 24, 768) and str(pos.dtype) == 'bfloat16'
  assert 'mhlo.num_partitions = 4' in step.lower(*args).as_text()  # one program, 4 chips


@pytest.mark.slow
def test_vit_pair_compiles_for_a_tpu_slice(tmp_path):
  """The whole bigkd-plan for the ViT pair at batch 8 (XLA:TPU compile, about a minute of CPU):
  per chip, the float32 ViT-S/16 and the bfloat16 ViT-B/16 weigh what their parameter counts
  say."""
  from bigkd.models import param_shapes
  out = tmp_path / 'plan.json'
  result = run_main('bigkd.launch_plan', [*VIT_PAIR, '--target', 'v5e-4', '--nolevers',
                                          '--config.batch_size=8', '--out', str(out)])
  assert result.returncode == 0, result.stderr
  student = json.loads(out.read_text())['stages']['student']
  count = lambda name, res: sum(x.size for x in jax.tree.leaves(param_shapes(name, 1000, res)))
  assert student['params_bytes'] == 4 * count('vit_s16', 224)
  assert student['teacher_bytes'] == 2 * count('vit_b16', 384)
  assert student['fits'] and student['flops'] > 0


def test_stages_with_their_own_train_data_plan_with_their_sources_sizes():
  """configs/digits_ood.py: a stage's train_data sources are read for their sizes (its batch
  rows, its steps, the resident images the step holds); where the data is not readable here,
  --train_examples stands for each source, and the plan says so. (The compile itself is the
  same as any stage's: not repeated here.)"""
  from bigkd import build, cli
  c = cli.config_module('digits_ood').get_config('fast')
  sizes = launch_plan.data_sizes(c, 0)
  task, ood = sizes.train, sizes.stage_sources['student_ood'][0]  # the digits 0-4; 5-9
  assert sizes.stage_sources['student_mixed'] == (ood, task) and 500 < task < 700  # by name
  assert set(sizes.stage_sources) == {'student_ood', 'student_mixed'} and 500 < ood < 700
  devices = launch_plan.tpu_devices(TARGET)
  plans, mesh = launch_plan.stages_and_mesh(c, devices, sizes)
  mixed = next(p for p in plans if p.name == 'student_mixed')
  assert [(d.name, d.examples) for d in mixed.train_data] == [('ood', ood), ('task', task)]
  assert sum(d.rows for d in mixed.train_data) == mixed.batch_size
  _, (_, _, images, _, _) = build.abstract_stage(mixed, mesh, sizes.of_stage(mixed),
                                                 c.data.base_size)
  assert images.shape[0] == task + ood  # both sources resident

  said = []
  c.data.num_classes = 5
  given = launch_plan.data_sizes(c, 5000, said.append)
  assert given.train == 5000 and given.stage_sources['student_mixed'] == (5000, 5000)
  assert any('stages.student_mixed.train_data' in line and '5000' in line for line in said)


def test_an_image_folders_canvas_is_chosen_as_the_trainer_chooses_it(jpeg_folder):
  """configs/folder.py (data.base_size=0): the canvas comes from the folder's images when they
  are here, as `bigkd-train` chooses it; when they are not, the plan asks for it in one line."""
  from bigkd import cli
  c = cli.config_module('folder').get_config('bit')
  c.data.data_dir = jpeg_folder
  resolved = launch_plan.with_canvas(c).data.base_size
  assert resolved >= c.stages.student.resolution and c.data.base_size == 0  # (a copy)
  c.data.data_dir = '/nonexistent'
  with pytest.raises(ConfigError, match='give it with --config.data.base_size=N'):
    launch_plan.with_canvas(c)


def test_fit_table_plans_each_cell_once_and_resumes(tmp_path, capsys):
  """tools/fit_table.py (the README's "Where the paper's runs fit"): each cell is bigkd-plan's
  own plan of the student stage, kept in the cache; a re-run reuses it, and a cell not asked
  to be computed is printed as such."""
  import importlib.util
  import os
  spec = importlib.util.spec_from_file_location(
      'fit_table', os.path.join(os.path.dirname(__file__), '..', 'tools', 'fit_table.py'))
  fit_table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(fit_table)
  args = ['--config', 'digits', '--configs', 'fast', '--targets', 'v5e-4', '--cache',
          str(tmp_path)]
  fit_table.main([*args, '--variants', 'default'])
  first = capsys.readouterr().out
  [path] = tmp_path.iterdir()
  cell = json.loads(path.read_text())
  assert (cell['topology'], cell['variant'], cell['libtpu']) == (TARGET, 'default',
                                                                launch_plan.libtpu_version())
  student = cell['stages']['student']
  assert student['fits'] and student['peak_bytes'] > 0 and 'compiling' in first
  gib = f'{student["peak_bytes"] / 2 ** 30:.2f} of 16 GiB per device | yes |'
  assert f'| fast | v5e-4 | default | {gib}' in first
  path.write_text(path.read_text().replace('"fits": true', '"fits": false'))  # marks the reuse
  fit_table.main([*args, '--variants', 'default,fsdp', '--table_only'])
  again = capsys.readouterr().out
  assert 'compiling' not in again and '| fast | v5e-4 | default |' in again
  assert '| **no** |' in again and '| fast | v5e-4 | fsdp | not computed |' in again
  assert '1 of 2 cells computed' in again
  assert fit_table.overrides_of('fsdp+f32') == {
      'mesh.data': 1, 'mesh.fsdp': -1, 'stages.student.compute_dtype': 'float32'}


def test_a_step_larger_than_the_chip_is_refused_by_xla_and_planned_as_not_fitting():
  """XLA:TPU will not compile a program whose temporaries exceed the chip's HBM (a
  RESOURCE_EXHAUSTED error, not a memory analysis): the plan says it does not fit, with the
  temporaries XLA says it needs. resnet8x2 at 256 px, batch 1196 on 4 v5e chips: about 18 GiB of
  temporaries per chip (XLA refuses it in about 10 s)."""
  c = tiny_config(steps=10, batch_size=1196)
  c.data.base_size, c.data.device_resident = 256, False
  c.stages.teacher = stage_config('resnet8x2', 256, steps=10, label_weight=1.0,
                                  augment=dict(mixup_alpha=0.0))
  lines = []
  teacher = launch_plan.plan(c, TARGET, out=lines.append, try_levers=False)['stages']['teacher']
  assert not teacher['fits'] and 'RESOURCE_EXHAUSTED' in teacher['compile_error']
  assert teacher['temp_bytes'] > 16 * 2 ** 30 and teacher['peak_bytes'] > teacher['temp_bytes']
  assert teacher['run_hours_at_mfu'] is None and any('refused' in line for line in lines)
