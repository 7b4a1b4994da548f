"""Cached teacher outputs (`bigkd.teacher_cache`): a fixed_teacher stage that reads its teacher's
logits from a cache trains exactly as the one that runs the teacher; the cache is made chunk by
chunk and resumes; top-k is an approximation that is exact for the classes it keeps; a cache made
for something else is refused, never used."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigkd import losses, stages, teacher_cache
from bigkd.config import ConfigError, stage_config
from bigkd.plan import check_config, plan_stages
from support import final_params, random_stage, read_metrics, run_cli, tiny_config

STEPS = 12


def cached_config(teacher_dir, cache='', top_k=0, **data):
  c = tiny_config(log_every=4)
  c.data.update(data)
  c.stages.student = stage_config('cnn_tiny', 8, teachers={'teacher': teacher_dir}, steps=STEPS,
                                  teaching_mode='fixed_teacher', teacher_cache=cache,
                                  teacher_cache_top_k=top_k)
  c.stage_order = 'student'
  return c


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  return random_stage(str(tmp_path_factory.mktemp('cache_teacher') / 'teacher'))


@pytest.fixture(scope='module')
def runs(teacher, tmp_path_factory):
  """Live runs and runs that read a full cache (made by the first), on device-resident and on
  streamed data (the device and the host path), and a run that reads a top-k cache; CHUNK small,
  so that the cache has several chunks."""
  root = tmp_path_factory.mktemp('cache_runs')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(teacher_cache, 'CHUNK', 256)  # 1,197 examples: 5 chunks
    for name, cache, top_k, resident in (('live', '', 0, True), ('cached', 'cache', 0, True),
                                         ('streamed_live', '', 0, False),
                                         ('streamed_cached', 'cache', 0, False),
                                         ('top_k', 'cache_top3', 3, True)):
      stages.run(cached_config(teacher, str(root / cache) if cache else '', top_k,
                               device_resident=resident), str(root / name))
  return root


def logged(root, name):
  return [{k: v for k, v in m.items() if k not in ('steps_per_sec', 'uptime')}
          for m in read_metrics(root / name / 'student')]


@pytest.mark.parametrize('live, cached', [('live', 'cached'),
                                          ('streamed_live', 'streamed_cached')])
def test_cached_logits_train_exactly_as_the_live_teacher(runs, live, cached):
  root = runs
  live_log, cached_log = logged(root, live), logged(root, cached)
  assert [m['step'] for m in live_log] == [4, 8, 12] and live_log[0]['kl_T1'] > 0.01
  for a, b in zip(live_log, cached_log, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               final_params(str(root / live / 'student')),
               final_params(str(root / cached / 'student')))


def test_a_top_k_cache_is_close_to_the_live_teacher_not_equal(runs):
  live, top_k = logged(runs, 'live'), logged(runs, 'top_k')
  assert top_k[-1]['kl_T1'] != pytest.approx(live[-1]['kl_T1'], rel=1e-3)


def test_the_cache_holds_what_it_was_made_for_and_resumes_by_chunk(runs, teacher, capsys):
  root = runs
  folder = root / 'cache'
  info = json.loads((folder / 'cache.json').read_text())
  assert info['data']['examples'] == 1197 and info['top_k'] == 0
  assert len(info['teacher_checksums']) == 1 and info['teachers'][0]['model'] == 'cnn_small'
  chunks = sorted(p.name for p in folder.glob('rows-*.npz'))
  assert chunks[0] == 'rows-0000000-0000256.npz' and chunks[-1] == 'rows-0001024-0001197.npz'
  assert len(chunks) == 5 and info['chunks'][-1] == [1024, 1197]
  before = teacher_cache.load(str(folder))
  assert before['values'].shape == (1197, 10)
  top3 = teacher_cache.load(str(root / 'cache_top3'))
  assert top3['values'].shape == top3['indices'].shape == (1197, 3)
  # Interrupted after chunk 1 of 5: a re-run computes only the missing chunks, to equal values.
  for name in ['cache.json'] + chunks[2:]:
    os.remove(folder / name)
  kept = (folder / chunks[0]).stat().st_mtime_ns
  capsys.readouterr()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(teacher_cache, 'CHUNK', 256)
    stages.run(cached_config(teacher, str(folder)), str(root / 'again'))
  made = [line for line in capsys.readouterr().out.splitlines() if 'teacher cache' in line]
  assert [line.split()[-1] for line in made] == ['3/5', '4/5', '5/5'], made
  assert (folder / chunks[0]).stat().st_mtime_ns == kept
  np.testing.assert_array_equal(teacher_cache.load(str(folder))['values'], before['values'])


def test_a_cache_made_for_other_weights_or_data_is_refused(runs, teacher, tmp_path):
  root = runs
  cache = str(root / 'cache_top3')
  other = random_stage(str(tmp_path / 'other'), seed=1)  # same model, other weights
  config = str(tmp_path / 'config.py')
  with open(config, 'w') as f:
    f.write('import sys\nsys.path.insert(0, %r)\nfrom test_teacher_cache import cached_config\n'
            'def get_config(teacher):\n  return cached_config(teacher, %r, top_k=3)\n'
            % (os.path.dirname(__file__), cache))
  result = run_cli([f'--config={config}:{other}', f'--workdir={tmp_path / "run"}'])
  assert result.returncode == 2, result.stderr
  [line] = result.stderr.strip().splitlines()
  assert 'stages.student.teacher_cache=' in line and 'teacher_checksums' in line, line
  assert 'refusing to use or overwrite it' in line
  assert not (tmp_path / 'run' / 'student').exists()
  with pytest.raises(ConfigError, match=r'data.base_size: the cache has 12, this stage needs 14'):
    planned(cached_config(teacher, cache, top_k=3, base_size=14))
  with pytest.raises(ConfigError, match=r'top_k: the cache has 3, this stage needs 2'):
    planned(cached_config(teacher, cache, top_k=2))
  assert (root / 'cache_top3' / 'cache.json').exists()  # refused, not overwritten


def planned(config):
  check_config(config, 1)
  return plan_stages(config, '/nonexistent', 1197, 10)[-1]


@pytest.mark.parametrize('fields, fragment', [
    (dict(teaching_mode='function_matching'), "needs teaching_mode='fixed_teacher'"),
    (dict(teacher_cache_top_k=10), 'teacher_cache_top_k=10 must be below the 10 classes'),
    (dict(teacher_cache_top_k=-1), 'teacher_cache_top_k=-1 must be an integer >= 0'),
    (dict(loss_weights=dict(sp=1.0), feature_pairs=(('student.stage1', 'teacher.stage1'),)),
     'sp read(s) teacher features at every step'),
])
def test_configs_a_cache_cannot_serve_are_refused(teacher, fields, fragment):
  c = cached_config(teacher, '/nonexistent/cache')
  for key, value in fields.items():
    c.stages.student[key] = value
  with pytest.raises(ConfigError, match=fragment.replace('(', r'\(').replace(')', r'\)')):
    planned(c)


def test_top_k_keeps_its_classes_exactly_and_spreads_the_rest():
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(6, 10)) * 3, jnp.float32)
  probs = jax.nn.softmax(logits)
  errors = []
  for k in (1, 3, 9):
    approx = jax.nn.softmax(losses.cached_logits(losses.compact_logits(logits, k), 10))
    top = np.argsort(-np.asarray(probs), axis=1)[:, :k]
    np.testing.assert_allclose(np.take_along_axis(np.asarray(approx), top, 1),
                               np.take_along_axis(np.asarray(probs), top, 1), rtol=1e-5)
    np.testing.assert_allclose(np.sum(approx, 1), 1, rtol=1e-5)
    errors.append(float(teacher_cache.kl_of_top_k(logits, k)))
  assert errors[0] > errors[1] > 0 and errors[2] < 1e-6  # k = classes - 1: the rest is exact
  full = losses.cached_logits(losses.compact_logits(logits, 0), 10)
  np.testing.assert_array_equal(full, logits)


def test_an_unfinished_cache_is_not_read(tmp_path):
  os.makedirs(tmp_path / 'c')
  assert teacher_cache.read_identity(str(tmp_path / 'c')) is None
  shutil.rmtree(tmp_path / 'c')
  assert teacher_cache.read_identity(str(tmp_path / 'c')) is None
