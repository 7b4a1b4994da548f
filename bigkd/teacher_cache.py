"""Cached teacher outputs: under `fixed_teacher` a teacher sees each training image in one view
(the whole image, unflipped, no mixup), so its logits are a function of the image alone. They
are computed once into a folder (a stage's `teacher_cache`) and the stage reads them instead of
running the teacher at every step; the evaluation still runs the teacher (val / test only).

  CACHE/rows-0000000-0004096.npz  train examples [0, 4096) (`CHUNK` per file): `values` [n, classes]
                          float32 (the teachers' combined logits, exactly what the step would
                          compute) or, with `teacher_cache_top_k` k, `values` [n, k] float32
                          log-probabilities of the k most likely classes and `indices` [n, k]
  CACHE/cache.json        what it was made for (`identity`: the teachers and their parameters'
                          checksums, the data, the form); written last, so a folder without it
                          is unfinished: the next run computes only the missing chunks.

Top-k is an approximation: the k classes' probabilities are kept and the rest of the mass is
spread evenly over the other classes (`losses.cached_logits`); `kl_of_top_k` measures its KL to
the teacher's distribution. A cache whose identity differs from the stage's
(another teacher, other weights, other data, another form) is refused, never used or overwritten.
"""
import io
import json

import jax
import numpy as np

from bigkd import checkpoint, losses, paths
from bigkd.config import ConfigError

CHUNK = 4096        # examples per file: one write per chunk, resumable chunk by chunk
FORMAT_VERSION = 1
INFO = 'cache.json'


def identity(plan, data_cfg, num_examples: int, teacher_checksums=None) -> dict:
  """What a cache of `plan`'s teachers on its train split (or train_data) depends on. `teacher_checksums`
  None: all but the weights (known before any teacher is loaded: checked with the config)."""
  out = {
      'format': FORMAT_VERSION, 'top_k': plan.teacher_cache_top_k,
      'num_classes': plan.num_classes, 'ensemble': plan.ensemble,
      'temperature': plan.temperature, 'teacher_dtype': plan.teacher_dtype,
      'teachers': [{'model': t.model, 'model_kwargs': t.model_kwargs,
                    'resolution': t.resolution} for t in plan.teachers],
      'data': {'source': data_cfg.source, 'name': data_cfg.name,
               'train_split': data_cfg.train_split, 'base_size': data_cfg.base_size,
               'examples': num_examples}}
  if data_cfg.get('classes'):  # (only where set: the identity of earlier caches stays)
    out['data']['classes'] = data_cfg.classes
  if getattr(plan, 'train_data', ()):  # the stage's own train data, by its sources' fields
    out['data']['train_data'] = {d.name: d.spec for d in plan.train_data}
  if teacher_checksums is not None:
    out['teacher_checksums'] = [int(c) for c in teacher_checksums]
  return out


def read_identity(folder: str) -> dict | None:
  """FOLDER/cache.json, or None when the cache is absent or unfinished."""
  path = paths.Path(folder) / INFO
  return paths.read_json(path) if path.exists() else None


def mismatch(have: dict, want: dict, prefix: str = '') -> str:
  """'' when `have` (a cache's identity) is `want` in every key that `want` has, else the first
  (dotted) key that differs, with both values."""
  for key, value in want.items():
    got = have.get(key)
    if isinstance(value, dict) and isinstance(got, dict):
      reason = mismatch(got, value, f'{prefix}{key}.')
      if reason:
        return reason
    elif json.dumps(got, sort_keys=True) != json.dumps(value, sort_keys=True):
      return f'{prefix}{key}: the cache has {got!r}, this stage needs {value!r}'
  return ''


def check_reusable(folder: str, want: dict, what: str) -> None:
  """Raises ConfigError when FOLDER holds a finished cache made for something else."""
  have = read_identity(folder)
  reason = mismatch(have, want) if have else ''
  if reason:
    raise ConfigError(f'{what}={folder} was made for another teacher or data ({reason}); '
                      'refusing to use or overwrite it')


def _chunk_path(folder, start, stop):
  return paths.Path(folder) / f'rows-{start:07d}-{stop:07d}.npz'


def _chunks(num_examples: int) -> list[tuple[int, int]]:
  return [(start, min(start + CHUNK, num_examples)) for start in range(0, num_examples, CHUNK)]


def _write_chunk(path, arrays: dict) -> None:
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  paths.write_bytes(path, buffer.getvalue())


def make(folder: str, want: dict, logits_of_rows, num_devices: int) -> None:
  """Computes the chunks FOLDER lacks, then writes cache.json. `logits_of_rows(indices)`: the
  teachers' combined logits of those train examples (a global batch, split over the devices)."""
  chunks = _chunks(want['data']['examples'])
  paths.make_dirs(folder)
  compact = jax.jit(losses.compact_logits, static_argnums=1)
  for i, (start, stop) in enumerate(chunks):
    path = _chunk_path(folder, start, stop)
    if path.exists():  # done by an earlier, interrupted run
      continue
    rows = np.arange(start, stop)
    padded = np.resize(rows, -(-len(rows) // num_devices) * num_devices)  # repeats, cut below
    stored = jax.device_get(compact(logits_of_rows(padded), want['top_k']))
    if jax.process_index() == 0:
      _write_chunk(path, {k: v[:len(rows)] for k, v in stored.items()})
    print(f'bigkd: teacher cache {folder}: chunk {i + 1}/{len(chunks)}', flush=True)
  if jax.process_index() == 0:
    paths.write_json(paths.Path(folder) / INFO, dict(want, chunks=chunks))


def load(folder: str) -> dict:
  """The whole cache in host memory: {'values': [N, ...], ('indices': [N, k])}."""
  parts = []
  for start, stop in read_identity(folder)['chunks']:
    with _chunk_path(folder, start, stop).open('rb') as f:
      with np.load(f) as z:
        parts.append({k: z[k] for k in z.files})
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def teacher_checksums(teacher_params) -> list[int]:
  """The bits of each teacher's parameters (`checkpoint.checksum`): what ties a cache to them."""
  return [int(checkpoint.checksum(p)) for p in teacher_params]


def kl_of_top_k(logits, top_k: int, temperature: float = 1.0):
  """Mean KL(teacher ‖ its top-k reconstruction) at `temperature`: the approximation's error."""
  approx = losses.cached_logits(losses.compact_logits(logits, top_k), logits.shape[-1])
  return losses.kl_divergence(logits, approx, temperature) / temperature ** 2
