"""The configs of Beyer et al. 2022 (configs/bit_imagenet.py, configs/bit_transfer.py): every
variant resolves to the paper's settings, and variants run 2 steps on `tfds.testing.mock_data`
(ImageNet, Flowers and Food in the default run; every other trainable variant in the `slow` tests).

Resolution (no training, every variant): `get_config(variant)` passes `bigkd.plan.check_config`
and `bigkd.plan.plan_stages` with the real model names, resolutions and batch sizes, and each
number is checked against the table below (restated here from the paper's released settings,
independently of bigkd/bit_recipes.py), including epochs -> steps for the real train-split sizes.
The teacher and init paths are placeholders, so there `plan_stages` runs without its check of
external checkpoints (which would reject them); a separate test checks that it does.

Training (2 steps, in one subprocess with the suite's fast-compiling XLA flags; compiles dominate):
the real registry names bit_r152x2 (teachers) and bit_r50x1 (student), with tiny models only
through an explicit override, `model_kwargs=TINY_BIT` (32 root channels x width, one unit), at
batch 4 and resolutions scaled down from the config's (a teacher resolution that differs from the
student's still differs). The `slow` tests train every other variant, and one variant at the real
BiT depth (tiny width only).
"""
import json
import math
import os
import sys

import numpy as np
import pytest

from bigkd import checkpoint, cli, plan, stages
from bigkd.config import ConfigError
from bigkd.plan import check_config, plan_stages
from support import finish, start

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER, STUDENT = 'bit_r152x2', 'bit_r50x1'
TINY_BIT = dict(base=32, block_units=(1,))  # explicit override: root 32·width channels, 1 unit
TINY_WIDTH = dict(base=32)                   # the slow real-depth run: real units, tiny width
SMALL_RES = {384: 32, 224: 24, 160: 20, 128: 16, 512: 40, 320: 28, 192: 20}  # real resolution -> test resolution
MOCK_EXAMPLES = 8                            # per split (mock_data ignores split slicing)

# The paper's settings, restated: (config, variant) -> expectations. lr, wd (big_vision's
# decoupled convention: decay per step = wd · schedule normalised to 1 at its peak, stored as is
# with optimizer.weight_decay_scaled_by_lr=False), temperature and epochs as released with the
# paper (big_vision configs/proj/distill: bit_i1k.py, bigsweep_flowers_pet.py,
# bigsweep_food_sun.py); batch 512 / 4096 on ImageNet (paper Sec. 3).
IMAGENET = dict(tfds='imagenet2012', classes=1000, batch=4096, epochs=1200, lr=0.03, wd=3e-4,
                T=1.0, warmup=5000, streamed=True, eval_fraction=224 / 256,
                splits=('train[:98%]', 'train[99%:]', 'validation'))
SMALL = dict(batch=512, warmup=1500, base=192, student=128, teachers={'teacher': 128},
             eval_fraction=128 / 160)
FLOWERS = dict(SMALL, tfds='oxford_flowers102', classes=102, streamed=False,
               splits=('train', 'validation', 'test'))
PETS = dict(SMALL, tfds='oxford_iiit_pet', classes=37, streamed=False,
            splits=('train[:90%]', 'train[90%:]', 'test'))
FOOD = dict(SMALL, tfds='food101', classes=101, streamed=True,
            splits=('train[:90%]', 'train[90%:]', 'validation'))
SUN = dict(SMALL, tfds='sun397', classes=397, streamed=True, splits=('train', 'validation', 'test'))
EXPECTED = {
    ('bit_imagenet', 't224_s224'): dict(IMAGENET, base=320, student=224, teachers={'teacher': 224}),
    ('bit_imagenet', 't384_s224'): dict(IMAGENET, base=512, student=224, teachers={'teacher': 384}),
    ('bit_imagenet', 't224_s160'): dict(IMAGENET, base=320, student=160, teachers={'teacher': 224}),
    ('bit_imagenet', 't384_t224_s224'): dict(IMAGENET, base=512, student=224,
                                             teachers={'t384': 384, 't224': 224}),
    ('bit_transfer', 'flowers,fast'): dict(FLOWERS, epochs=10_000, lr=3e-3, wd=3e-4, T=10.0),
    ('bit_transfer', 'flowers,medium'): dict(FLOWERS, epochs=100_000, lr=1e-3, wd=1e-4, T=1.0),
    ('bit_transfer', 'flowers,long'): dict(FLOWERS, epochs=1_000_000, lr=3e-4, wd=1e-5, T=1.0),
    ('bit_transfer', 'pets,fast'): dict(PETS, epochs=1_000, lr=1e-2, wd=1e-3, T=5.0),
    ('bit_transfer', 'pets,medium'): dict(PETS, epochs=3_000, lr=3e-3, wd=3e-4, T=10.0),
    ('bit_transfer', 'pets,long'): dict(PETS, epochs=30_000, lr=3e-3, wd=1e-5, T=2.0),
    ('bit_transfer', 'food,fast'): dict(FOOD, epochs=100, lr=1e-2, wd=1e-3, T=10.0),
    ('bit_transfer', 'food,medium'): dict(FOOD, epochs=1_000, lr=1e-3, wd=3e-4, T=10.0),
    ('bit_transfer', 'food,long'): dict(FOOD, epochs=3_000, lr=1e-2, wd=1e-4, T=5.0),
    ('bit_transfer', 'sun,fast'): dict(SUN, epochs=100, lr=1e-2, wd=1e-3, T=10.0),
    ('bit_transfer', 'sun,medium'): dict(SUN, epochs=1_000, lr=1e-3, wd=1e-4, T=10.0),
    ('bit_transfer', 'sun,long'): dict(SUN, epochs=3_000, lr=1e-2, wd=3e-5, T=10.0),
}
# Per config: its variant grammar, and (a variant with its defaults left out, the full variant).
GRAMMAR = {'bit_imagenet': '[PRESET][,epochs=N][,init[=PATH.npz]]',
           'bit_transfer': 'DATASET[,BUDGET][,epochs=N][,init[=PATH.npz]]'}
DEFAULTS = {'bit_imagenet': [('', 't224_s224')],
            'bit_transfer': [(d, f'{d},fast') for d in ('flowers', 'pets', 'food', 'sun')]}
# Per config: (bad variant, what the message must say besides the config and the grammar).
BAD_VARIANTS = {
    'bit_imagenet': [
        ('no_such_preset', "unknown preset 'no_such_preset'; presets: t224_s224, t384_s224, "
                           't224_s160, t384_t224_s224')],
    'bit_transfer': [
        ('', 'no dataset given; datasets: flowers, pets, food, sun'),
        ('fast', "unknown dataset 'fast'; datasets: flowers, pets, food, sun"),
        ('imagenet,fast', "unknown dataset 'imagenet'; datasets: flowers, pets, food, sun"),
        ('flowers,huge', "unknown budget 'huge'; budgets: fast, medium, long"),
        ('epochs=10', 'no dataset given; datasets: flowers, pets, food, sun')],
}
# Train-split sizes (tfds catalog) for epochs -> steps; SUN397's is approximate.
TRAIN_EXAMPLES = {'imagenet2012': 1_255_544, 'oxford_flowers102': 1_020,
                  'oxford_iiit_pet': 3_312, 'food101': 68_175, 'sun397': 76_128}

# Trained in the default run (about 15 s each on 2 busy cores), together covering two teachers at
# two resolutions, a teacher at another resolution than the student, streamed (ImageNet) and
# device-resident (Flowers) data, and a student initialised from a .npz. Pets and Food take the
# same paths and train in the slow test with every other variant; SUN397's loading is tested on
# its own below.
SMOKE = [('bit_imagenet', 't384_t224_s224,init'), ('bit_transfer', 'flowers,medium')]


def without_options(variant):
  """'food,fast,init' -> 'food,fast': the names that key EXPECTED."""
  return ','.join(t for t in variant.split(',') if '=' not in t and t != 'init')


SLOW_SMOKE = [key for key in EXPECTED
              if key not in {(c, without_options(v)) for c, v in SMOKE}]


def load(config_name, variant):
  return cli.config_module(config_name).get_config(variant)


# --- Resolution: every variant, no training. -------------------------------------------------

def ids(pairs):
  return [f'{config_name}:{variant}' for config_name, variant in pairs]


@pytest.mark.parametrize('config_name, variant', list(EXPECTED), ids=ids(EXPECTED))
def test_variant_resolves_to_the_paper_settings(config_name, variant, monkeypatch):
  want = EXPECTED[config_name, variant]
  c = load(config_name, variant)
  for devices in (1, 8):
    check_config(c, devices)
  assert (c.data.source, c.data.name, c.data.num_classes) == ('tfds', want['tfds'], want['classes'])
  assert (c.data.train_split, c.data.val_split, c.data.test_split) == want['splits']
  assert c.data.base_size == want['base'] and c.data.device_resident == (not want['streamed'])
  assert c.teacher_dtype == 'bfloat16' and c.batch_size == want['batch']
  assert c.stages.student.compute_dtype == 'bfloat16'  # the student's convs and matmuls
  opt = c.optimizer
  assert (opt.name, opt.schedule, opt.clip_norm) == ('adam', 'cosine', 1.0)
  assert opt.mu_dtype == 'bfloat16'
  assert (opt.b1, opt.b2) == (0.9, 0.999) and opt.lr == pytest.approx(want['lr'])
  # big_vision's weight decay as released; bigkd.optim converts it with the lr in use.
  assert opt.weight_decay == want['wd'] and opt.weight_decay_scaled_by_lr is False
  aug = c.augment
  # The released inception crop: tf.image.sample_distorted_bounding_box, area 5-100 %,
  # aspect 0.75-1.33, 100 attempts; the released eval: resize_small + central_crop.
  assert (aug.crop_sampler, tuple(aug.crop_area), tuple(aug.crop_aspect), aug.crop_attempts) == (
      'tf', (0.05, 1.0), (0.75, 1.33), 100)
  assert aug.flip and aug.mixup_alpha == 1.0
  assert c.data.eval_crop_fraction == pytest.approx(want['eval_fraction'])

  num_train = TRAIN_EXAMPLES[want['tfds']]
  # The teacher files are placeholders: test_placeholders_fail_in_plan_stages checks those.
  monkeypatch.setattr(plan, 'check_external_checkpoints', lambda plans, workdir: None)
  [p] = plan_stages(c, '/unused', num_train, want['classes'])
  assert (p.name, p.model, p.resolution, p.init) == ('student', STUDENT, want['student'], '')
  assert p.num_classes == want['classes']
  assert p.steps == round(want['epochs'] * num_train / want['batch'])
  assert p.warmup_steps == want['warmup'] and p.batch_size == want['batch']
  assert (p.optimizer['weight_decay'], p.optimizer['weight_decay_scaled_by_lr']) == (want['wd'],
                                                                                   False)
  assert (p.teaching_mode, p.loss, p.label_weight) == ('function_matching', 'kl', 0.0)
  assert p.temperature == want['T']
  assert {t.name: t.resolution for t in p.teachers} == want['teachers']
  for t in p.teachers:
    assert t.model == TEACHER and t.source.endswith('.npz')
  if len(p.teachers) > 1:
    assert p.ensemble == 'probs'


@pytest.mark.parametrize('config_name, variant', [('bit_imagenet', 't384_t224_s224,init'),
                                                  ('bit_transfer', 'pets,init')])
def test_placeholders_fail_in_plan_stages(config_name, variant):
  c = load(config_name, variant)
  with pytest.raises(ConfigError, match=r'^stages\.student\.teachers\.\w+: checkpoint file '
                     r"'/path/to/bit_models/R152x2_T_\w+\.npz' does not exist"):
    plan_stages(c, '/unused', TRAIN_EXAMPLES[c.data.name], c.data.num_classes)
  c.stages.student.teachers = {}  # then the bare `init`'s placeholder is the first one checked
  with pytest.raises(ConfigError, match=r"^stages\.student\.init: checkpoint file "
                     r"'/path/to/bit_models/BiT-M-R50x1\.npz' does not exist"):
    plan_stages(c, '/unused', TRAIN_EXAMPLES[c.data.name], c.data.num_classes)


@pytest.mark.parametrize('config_name', sorted(DEFAULTS))
def test_default_variant_and_options(config_name):
  for short, full in DEFAULTS[config_name]:
    assert load(config_name, short or None).to_dict() == load(config_name, full).to_dict()
    c = load(config_name, f'{full},epochs=300,init')
    assert c.stages.student.epochs == 300
    assert c.stages.student.init.endswith('/BiT-M-R50x1.npz')
    c = load(config_name, ','.join(filter(None, [short, 'epochs=600,init=/data/BiT-M-R50x1.npz'])))
    assert (c.stages.student.epochs, c.stages.student.init) == (600, '/data/BiT-M-R50x1.npz')
    assert c.to_dict() == load(config_name, f'{full},epochs=600,init=/data/BiT-M-R50x1.npz'
                               ).to_dict()
  full = DEFAULTS[config_name][0][1]
  bad_options = [
      (f'{full},epochs=soon', "option 'epochs=soon': epochs must be a positive number"),
      (f'{full},epochs=0', "option 'epochs=0': epochs must be a positive number"),
      (f'{full},lr=1', "unknown option 'lr=1'; options: epochs=N, init[=PATH.npz]")]
  for bad, says in BAD_VARIANTS[config_name] + bad_options:
    with pytest.raises(ValueError) as e:
      load(config_name, bad)
    where = f'configs/{config_name}.py' + (f':{bad}' if bad else ' without a variant')
    assert str(e.value) == f'{where}: {says} (variants: {GRAMMAR[config_name]})'


def test_placeholder_teacher_fails_clearly_in_the_trainer(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  c = shrink(load('bit_transfer', 'flowers,fast'), str(tmp_path))  # teacher left a placeholder
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES), \
       pytest.raises(ConfigError, match=r'stages\.student\.teachers\.teacher: .*does not exist'):
    stages.run(c, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'student')  # nothing was started


# --- Datasets without supervised keys; BiT-M initialisations with another head. -------------

def test_sun397_loads(tmp_path):
  import tensorflow_datasets as tfds
  from bigkd.data import sources
  c = load('bit_transfer', 'sun,fast')
  c.data.data_dir, c.data.base_size = str(tmp_path), 16
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    split = sources.load_split(c.data, 'train_split')  # streamed: tfds.data_source
    images, sizes, labels = split.rows([0, MOCK_EXAMPLES - 1])
  assert len(split) == MOCK_EXAMPLES and images.shape == (2, 16, 16, 3)
  assert sizes.max() == 16 and labels.max() < 397


def test_student_init_from_a_checkpoint_with_another_head(tmp_path):
  """A BiT-M-like init file with a 21-class head (the public one has 21,843) initialises the
  102-class Flowers student: the head becomes zeros for 102 classes, the rest is the file's."""
  import jax.numpy as jnp
  from bigkd.build import param_targets
  from bigkd.models import bit
  from bigkd.sharding import make_mesh
  c = shrink(load('bit_transfer', 'flowers,fast'), str(tmp_path))
  c.stages.student.teachers.teacher.source = write_params(
      TEACHER, c.data.num_classes, TINY_BIT, str(tmp_path / 'teacher.npz'))
  init = c.stages.student.init = write_params(STUDENT, 21, TINY_BIT, str(tmp_path / 'bit_m.npz'))
  [p] = plan_stages(c, str(tmp_path), MOCK_EXAMPLES, c.data.num_classes)  # accepts the file
  assert (p.init, p.num_classes) == (init, 102)
  targets = param_targets(p.model, p.model_kwargs, p.num_classes, p.resolution, jnp.float32,
                          make_mesh(1, 1), p.min_fsdp_size)
  loaded = bit.flatten(checkpoint.load_params(init, targets, 'init', new_head_classes=102))
  with np.load(init) as f:
    file = dict(f)
  kernel, bias = 'resnet/head/conv2d/kernel', 'resnet/head/conv2d/bias'
  head = {kernel, bias}
  assert set(loaded) == set(file) and head < set(file)
  channels = file[kernel].shape[2]
  assert file[kernel].shape == (1, 1, channels, 21)
  assert (loaded[kernel].shape, loaded[bias].shape) == ((1, 1, channels, 102), (102,))
  for key in head:
    assert not np.any(file[key] == 0) and not np.any(loaded[key])  # zeros replace random values
  for key in set(file) - head:
    np.testing.assert_array_equal(np.asarray(loaded[key]), file[key], err_msg=key)


# --- Training: 2 steps per config, in a subprocess. ------------------------------------------

def small(resolution):
  return SMALL_RES[resolution]


def shrink(c, workspace, model_kwargs=TINY_BIT):
  """Explicit test overrides: batch 4, 2 steps, scaled-down resolutions, tiny BiT models."""
  c.batch_size, c.eval_batch_size = 4, 8
  c.log_every, c.eval_every, c.checkpoint_every, c.log_views = 1, 0, 1000, False
  c.data.data_dir = os.path.join(workspace, 'tfds')
  c.data.base_size = small(c.data.base_size)
  c.optimizer.warmup_steps = 1
  student = c.stages.student
  student.steps, student.epochs = 2, 0.0
  student.resolution = small(student.resolution)
  student.model_kwargs = dict(model_kwargs)
  for teacher in student.teachers.values():
    teacher.resolution = small(teacher.resolution)
    teacher.model_kwargs = dict(model_kwargs)
  return c


def write_params(model_name, num_classes, model_kwargs, path, seed=0):
  """A released-layout .npz for `model_name(**model_kwargs)` with random weights (no compile)."""
  import jax
  import jax.numpy as jnp
  from bigkd.models import bit, get_model
  model = get_model(model_name, num_classes, **model_kwargs)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))
  rng = np.random.default_rng(seed)
  leaf = lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == 'scale'
                          else (0.3 * rng.normal(size=s.shape)).astype(np.float32))
  bit.save_npz(jax.tree_util.tree_map_with_path(leaf, shapes['params']), path)
  return path


def smoke_one(config_name, variant, workspace, model_kwargs):
  """Runs 2 steps of one variant with the test overrides; returns what the checks need."""
  import tensorflow_datasets as tfds
  c = shrink(load(config_name, variant), workspace, model_kwargs)
  for name, teacher in c.stages.student.teachers.items():
    teacher.source = write_params(TEACHER, c.data.num_classes, model_kwargs,
                                  os.path.join(workspace, f'{name}.npz'))
  if c.stages.student.init:
    c.stages.student.init = write_params(STUDENT, c.data.num_classes, model_kwargs,
                                         os.path.join(workspace, 'student_init.npz'), seed=1)
  workdir = os.path.join(workspace, 'run')
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES):
    summary = stages.run(c, workdir)['stages']['student']
  stage_dir = os.path.join(workdir, 'student')
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    metrics = [json.loads(line) for line in f]
  with open(os.path.join(stage_dir, 'stage.json')) as f:
    info = json.load(f)
  return dict(summary=summary, metrics=metrics, stage=info,
              student_resolution=c.stages.student.resolution,
              teachers=sorted(c.stages.student.teachers))


def smoke_main(spec_path):
  """Subprocess entry: runs every (config, variant) in the JSON spec; writes results as JSON."""
  with open(spec_path) as f:
    spec = json.load(f)
  results = {}
  for config_name, variant in spec['runs']:
    workspace = os.path.join(spec['root'], f'{config_name}-{variant}'.replace(',', '_'))
    os.makedirs(workspace)
    results[f'{config_name}:{variant}'] = smoke_one(config_name, variant, workspace,
                                                    spec['model_kwargs'])
  with open(spec['out'], 'w') as f:
    json.dump(results, f)


def start_smoke(root, runs, model_kwargs):
  """All `runs` in one fresh process (with the suite's fast-compiling XLA flags: tiny models,
  compile time dominates); its results are in ROOT/results.json when it ends."""
  os.makedirs(root, exist_ok=True)
  spec = dict(runs=runs, root=root, model_kwargs=model_kwargs,
              out=os.path.join(root, 'results.json'))
  with open(os.path.join(root, 'spec.json'), 'w') as f:
    json.dump(spec, f)
  code = 'import sys, test_paper_configs as t; t.smoke_main(sys.argv[1])'
  return start([sys.executable, '-c', code, os.path.join(root, 'spec.json')])


def run_smoke(root, runs, model_kwargs, timeout):
  finish(start_smoke(root, runs, model_kwargs), timeout)
  with open(os.path.join(root, 'results.json')) as f:
    return json.load(f)


def check_two_steps(result, model_kwargs):
  summary, metrics, info = result['summary'], result['metrics'], result['stage']
  assert summary['steps'] == 2 and summary['model'] == STUDENT
  assert summary['resolution'] == result['student_resolution']
  assert info['model'] == STUDENT and info['model_kwargs'] == json.loads(json.dumps(model_kwargs))
  for split in ('val', 'test'):
    for key in ('accuracy', 'teacher_accuracy', 'agreement'):
      assert 0.0 <= summary[f'{split}_{key}'] <= 1.0, summary
    assert math.isfinite(summary[f'{split}_kl']) and summary[f'{split}_kl'] >= 0, summary
  assert [m['step'] for m in metrics] == [1, 2]
  for m in metrics:
    assert math.isfinite(m['loss']) and m['kl_T1'] > 0 and math.isfinite(m['grad_norm']), m


@pytest.fixture(scope='module')
def smoke_results(tmp_path_factory):
  return run_smoke(str(tmp_path_factory.mktemp('smoke')), SMOKE, TINY_BIT, timeout=600)


@pytest.mark.integration
@pytest.mark.parametrize('config_name, variant', SMOKE, ids=ids(SMOKE))
def test_two_steps_on_mock_data(smoke_results, config_name, variant):
  result = smoke_results[f'{config_name}:{variant}']
  check_two_steps(result, TINY_BIT)
  want = EXPECTED[config_name, without_options(variant)]
  assert result['teachers'] == sorted(want['teachers'])


@pytest.mark.slow
def test_two_steps_every_other_variant(tmp_path):
  results = run_smoke(str(tmp_path), SLOW_SMOKE, TINY_BIT, timeout=3600)
  for (config_name, variant) in SLOW_SMOKE:
    check_two_steps(results[f'{config_name}:{variant}'], TINY_BIT)


@pytest.mark.slow
def test_two_steps_at_real_bit_depth(tmp_path):
  """bit_r152x2 (50 units) teaching bit_r50x1 (16 units) at their real depths, tiny width."""
  runs = [('bit_imagenet', 't384_s224,init')]
  results = run_smoke(str(tmp_path), runs, TINY_WIDTH, timeout=3600)
  check_two_steps(results['bit_imagenet:t384_s224,init'], TINY_WIDTH)


# --- configs/vit_imagenet.py: the paper's ImageNet schedule for a ViT-B/16 -> ViT-S/16 pair. ----

@pytest.mark.parametrize('variant, teacher_res', [('b16_384_s16_224', 384),
                                                  ('b16_224_s16_224', 224)])
def test_vit_pair_resolves_to_the_paper_schedule_with_vit_models(variant, teacher_res,
                                                                 monkeypatch):
  c = load('vit_imagenet', variant)
  for devices in (1, 8):
    check_config(c, devices)
  bit = load('bit_imagenet', f't{teacher_res}_s224')  # the paper's: everything but the models
  for block in ('data', 'augment'):
    assert c[block].to_dict() == bit[block].to_dict(), block
  assert (c.batch_size, c.teacher_dtype, c.stages.student.compute_dtype) == (4096, 'bfloat16',
                                                                             'bfloat16')
  opt = c.optimizer  # big_vision's ImageNet ViT recipe (vit_i1k.py), not BiT's lr 0.03
  assert (opt.name, opt.schedule, opt.clip_norm, opt.mu_dtype) == ('adam', 'cosine', 1.0,
                                                                    'bfloat16')
  assert (opt.lr, opt.weight_decay, opt.weight_decay_scaled_by_lr, opt.warmup_steps) == (
      1e-3, 1e-4, False, 10_000)
  monkeypatch.setattr(plan, 'check_external_checkpoints', lambda plans, workdir: None)
  [p] = plan_stages(c, '/unused', TRAIN_EXAMPLES['imagenet2012'], 1000)
  assert (p.model, p.resolution, p.init) == ('vit_s16', 224, '')
  assert p.steps == round(1200 * TRAIN_EXAMPLES['imagenet2012'] / 4096)
  assert (p.teaching_mode, p.loss, p.temperature, p.label_weight) == ('function_matching', 'kl',
                                                                      1.0, 0.0)
  [t] = p.teachers
  assert (t.model, t.resolution) == ('vit_b16', teacher_res)
  assert t.source.endswith(f'res_{teacher_res}.npz')
  assert load('vit_imagenet', None).to_dict() == load('vit_imagenet', 'b16_384_s16_224').to_dict()
  assert load('vit_imagenet', 'epochs=300,init').stages.student.init.endswith(
      '/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz')
  with pytest.raises(ValueError, match="unknown preset 't384_s224'; presets: b16_384_s16_224, "
                                       'b16_224_s16_224'):
    load('vit_imagenet', 't384_s224')
