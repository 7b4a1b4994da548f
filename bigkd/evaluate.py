"""Evaluation on whole images: student and teacher accuracy, top-1 agreement, KL(teacher ‖ student)."""
import jax
import numpy as np

from bigkd.sharding import put_global


def padded_batches(images, labels, batch_size):
  """Fixed-size batches (one compiled shape) with a mask marking the real examples."""
  for start in range(0, len(labels), batch_size):
    stop = min(start + batch_size, len(labels))
    pad = batch_size - (stop - start)
    mask = np.concatenate([np.ones(stop - start, np.float32), np.zeros(pad, np.float32)])
    yield (np.pad(images[start:stop], [(0, pad)] + [(0, 0)] * 3),
           np.pad(labels[start:stop], (0, pad)), mask)


def evaluate(eval_step, params, teacher_params, split, batch_size, sharding) -> dict:
  """Runs the jitted `eval_step` over a split; returns accuracies, agreement and mean KL."""
  totals = None
  for batch in padded_batches(split.images, split.labels, batch_size):
    sums = eval_step(params, teacher_params, *(put_global(x, sharding) for x in batch))
    totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals.pop('count'))
  names = {'student_correct': 'accuracy', 'teacher_correct': 'teacher_accuracy',
           'agreement': 'agreement', 'kl': 'kl'}
  return {names[k]: float(v) / count for k, v in totals.items()}
