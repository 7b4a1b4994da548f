"""Evaluation on a whole split: student and teacher accuracy, top-1 agreement and
KL(teacher ‖ student), each model on its evaluation view (`augment.central_boxes`)."""
import grain
import jax
import numpy as np


def local_positions(start, batch_size):
  """This process's share of the global batch positions start .. start + batch_size."""
  positions = np.arange(start, start + batch_size)
  return np.array_split(positions, jax.process_count())[jax.process_index()]


def eval_batches(split, batch_size, sharding):
  """The split in order as fixed-size global batches (one compiled shape), the last one padded
  and masked. Each process reads only its rows; grain's threads read (and, for a streamed
  split, decode) the next batches while the current one is evaluated."""
  n = len(split)

  def batch(start):
    positions = local_positions(start, batch_size)
    images, sizes, labels = split.rows(np.minimum(positions, n - 1))
    mask = (positions < n).astype(np.float32)
    return tuple(jax.make_array_from_process_local_data(sharding, x)
                 for x in (images, sizes, labels, mask))

  return grain.MapDataset.range(0, n, batch_size).map(batch).to_iter_dataset(
      grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))


def evaluate(eval_step, params, teacher_params, split, batch_size, sharding) -> dict:
  """Runs the jitted `eval_step` over a split; returns accuracies, agreement, mean KL and, for
  the stage's CKA pairs, linear CKA (`cka`: their mean; `cka/LABEL` each, when several)."""
  totals = None
  for batch in eval_batches(split, batch_size, sharding):
    sums = eval_step(params, teacher_params, *batch)
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop('count'))
  hsic = {k.split('/', 1)[1]: totals.pop(k) for k in sorted(totals) if k.startswith('hsic/')}
  names = {'student_correct': 'accuracy', 'teacher_correct': 'teacher_accuracy',
           'agreement': 'agreement', 'kl': 'kl', 'ensemble_correct': 'ensemble_accuracy'}
  renamed = lambda key: '/'.join(key.split('/')[:-1] + [names[key.split('/')[-1]]])  # PEER/...
  results = {renamed(k): float(v) / count for k, v in totals.items()}
  return {**results, **cka_results(hsic)}


def cka_results(hsic: dict) -> dict:
  """{'cka': mean over the pairs, 'cka/LABEL': each (when several)} from the summed minibatch
  HSIC terms [xy, xx, yy] of each pair: the minibatch CKA (Nguyen et al. 2021) is the ratio of
  the terms' means over the batches, and the batch count cancels in it."""
  cka = {label: float(xy / np.sqrt(xx * yy)) if xx * yy > 0 else float('nan')
         for label, (xy, xx, yy) in hsic.items()}
  if not cka:
    return {}
  out = {'cka': float(np.mean(list(cka.values())))}
  if len(cka) > 1:
    out.update({f'cka/{label}': value for label, value in cka.items()})
  return out
