"""A stage's loss: a list of weighted terms, each a small pure function of the forward outputs,
summed in one place.

A supervised stage is the `labels` term alone; a distilled one by default its logit loss
(`kl`: Hinton's α mix of the labels and KL(teacher ‖ student) at T). A new method adds a term
to `TERMS` (and its name to `losses.LOSS_TERMS`); nothing else changes.
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bigkd import losses


class FeaturePair(NamedTuple):
  """A student feature and a teacher feature that the feature losses (or the CKA) compare."""
  student_tap: str
  teacher: int               # index in the stage's teachers
  teacher_tap: str
  adapter: Any = None        # FitNet: a `FeatureAdapter` module from student to teacher shape
  adapter_key: str = ''      # ... and its parameters' key in TrainState.aux_params
  terms: tuple = ()          # the feature losses that compare this pair
  heads: Any = None          # CRD: a `ContrastiveHeads` module embedding both features
  heads_key: str = ''        # ... its key in TrainState.aux_params and TrainState.loss_state


class SelfHead(NamedTuple):
  """A classifier on one of the student's own taps (self-distillation, "be your own teacher")."""
  tap: str
  module: Any                # a `ShallowClassifier`: feature -> (logits, embedding)
  key: str                   # its parameters' key in TrainState.aux_params


class SftnBranch(NamedTuple):
  """A student branch on one of the trained model's taps (a student-friendly teacher, SFTN)."""
  tap: str
  module: Any                # a `StudentBranch`: the model's feature -> branch logits
  key: str                   # its parameters' key in TrainState.aux_params


class Objective(NamedTuple):
  """Everything static about a stage's loss (hashable: jit closes over it)."""
  terms: tuple                   # (term, weight): the loss is Σ weight·term
  distill_loss: str = 'kl'       # kl | hard_pseudo | logit_l2: the `kl` term's logit loss
  temperature: float = 1.0
  label_weight: float = 0.0      # Hinton's α inside the `kl` term
  ensemble: str = 'logits'       # how several teachers' logits are combined
  options: tuple = ()            # sorted (key, value) pairs of the stage's loss_options
  feature_pairs: tuple = ()      # of FeaturePair
  self_heads: tuple = ()         # of SelfHead
  sftn_branches: tuple = ()      # of SftnBranch


class Outputs(NamedTuple):
  """What the terms read: the forward outputs of one batch, and its targets."""
  student_logits: Any
  student_feats: dict
  teacher_logits: Any            # the teachers' combined logits; None: no teachers
  teacher_feats: list            # {tap: feature} of each teacher
  targets: Any                   # (mixed) one-hot labels [B, classes]
  aux_params: dict               # parameters trained with the student (adapters, CRD heads,
                                 # shallow classifiers, SFTN branches)
  step: Any                      # the 0-based step being taken
  loss_state: dict = {}          # state the terms read, not trained (CRD's queues)


def kl_term(o: Outputs, obj: Objective):
  return losses.hinton_loss(o.teacher_logits, o.student_logits, o.targets, obj.label_weight,
                            obj.temperature, obj.distill_loss)


def labels_term(o: Outputs, obj: Objective):
  return losses.cross_entropy(o.student_logits, o.targets)


def dkd_term(o: Outputs, obj: Objective):
  opt = dict(obj.options)
  warmup = losses.linear_warmup(o.step + 1, opt['dkd_warmup_steps'])
  return losses.dkd(o.teacher_logits, o.student_logits, o.targets, opt['dkd_alpha'],
                    opt['dkd_beta'], opt['dkd_temperature'], warmup)


def dist_term(o: Outputs, obj: Objective):
  opt = dict(obj.options)
  return losses.dist_loss(o.teacher_logits, o.student_logits, opt['dist_beta'],
                          opt['dist_gamma'], opt['dist_temperature'])


def _fitnet(pair, teacher_feature, student_feature, aux_params, options):
  if pair.adapter is not None:
    student_feature = pair.adapter.apply({'params': aux_params[pair.adapter_key]},
                                         student_feature)
  return losses.fitnet_loss(teacher_feature, student_feature)


# Feature losses: fn(pair, teacher feature, student feature, aux params, options).
FEATURE_TERMS = {
    'fitnet': _fitnet,
    'at': lambda p, t, s, aux, opt: losses.attention_transfer(t, s, p=opt['at_p'],
                                                              match=opt['at_match']),
    'sp': lambda p, t, s, aux, opt: losses.similarity_preserving(t, s),
    'pkt': lambda p, t, s, aux, opt: losses.pkt(t, s, form=opt['pkt_form']),
    'rkd_distance': lambda p, t, s, aux, opt: losses.rkd_distance(t, s),
    'rkd_angle': lambda p, t, s, aux, opt: losses.rkd_angle(t, s),
}


def crd_embeddings(pair: FeaturePair, o: Outputs):
  """(student, teacher) unit embeddings of a CRD pair's features, through its heads."""
  return pair.heads.apply({'params': o.aux_params[pair.heads_key]},
                          o.student_feats[pair.student_tap],
                          o.teacher_feats[pair.teacher][pair.teacher_tap])


def crd_term(o: Outputs, obj: Objective):
  """CRD summed over the pairs it compares, each against its own queues (`loss_state`)."""
  total = 0.0
  for p in obj.feature_pairs:
    if 'crd' in p.terms:
      queue = o.loss_state[p.heads_key]
      valid = jnp.arange(queue['student'].shape[0]) < queue['filled']
      total += losses.crd_info_nce(*crd_embeddings(p, o), queue['student'], queue['teacher'],
                                   valid, dict(obj.options)['crd_temperature'])
  return total


def enqueued(o: Outputs, obj: Objective) -> dict:
  """{heads key: {'student': [B, d], 'teacher': [B, d]}}: this batch's embeddings, which join
  their queues after the step (constants: no gradient flows into a queue)."""
  return {p.heads_key: dict(zip(('student', 'teacher'), jax.lax.stop_gradient(
      crd_embeddings(p, o)))) for p in obj.feature_pairs if 'crd' in p.terms}


def initial_queues(pairs, options: dict) -> dict:
  """The empty queues of each CRD pair: [crd_queue, crd_dim] rows of zeros for each side, the
  row the next batch is written at, and how many rows hold embeddings (the rest are masked)."""
  size, dim = options.get('crd_queue'), options.get('crd_dim')
  return {p.heads_key: {'student': jnp.zeros((size, dim)), 'teacher': jnp.zeros((size, dim)),
                        'next': jnp.zeros((), jnp.int32), 'filled': jnp.zeros((), jnp.int32)}
          for p in pairs if 'crd' in p.terms}


def updated_queues(loss_state: dict, batch_embeddings: dict) -> dict:
  """`loss_state` with each queue's oldest rows replaced by the step's batch (whose size divides
  the queue's: the plan checks it), as MoCo's queue."""
  out = {}
  for key, queue in loss_state.items():
    new = batch_embeddings[key]
    rows = new['student'].shape[0]
    size = queue['student'].shape[0]
    out[key] = {side: jax.lax.dynamic_update_slice(queue[side], new[side], (queue['next'], 0))
                for side in ('student', 'teacher')}
    out[key]['next'] = (queue['next'] + rows) % size
    out[key]['filled'] = jnp.minimum(queue['filled'] + rows, size)
  return out


def feature_term(name):
  """The term of feature loss `name`: its sum over the pairs that it compares."""
  def term(o: Outputs, obj: Objective):
    options = dict(obj.options)
    return sum(FEATURE_TERMS[name](p, o.teacher_feats[p.teacher][p.teacher_tap],
                                   o.student_feats[p.student_tap], o.aux_params, options)
               for p in obj.feature_pairs if name in p.terms)
  return term


def self_outputs(o: Outputs, obj: Objective) -> list:
  """[(logits, embedding)] of each of the student's own shallow classifiers."""
  return [h.module.apply({'params': o.aux_params[h.key]}, o.student_feats[h.tap])
          for h in obj.self_heads]


def self_ce_term(o: Outputs, obj: Objective):
  """Σ over the shallow classifiers of their cross-entropy on the (mixed) labels."""
  return sum(losses.cross_entropy(logits, o.targets) for logits, _ in self_outputs(o, obj))


def self_kl_term(o: Outputs, obj: Objective):
  """Σ over the shallow classifiers of T²·KL(final classifier ‖ shallow one) at T: the model's
  own output teaches its earlier blocks (a target: no gradient flows into the final output)."""
  final = jax.lax.stop_gradient(o.student_logits)
  temperature = dict(obj.options)['self_temperature']
  return sum(losses.kl_divergence(final, logits, temperature)
             for logits, _ in self_outputs(o, obj))


def self_feature_term(o: Outputs, obj: Objective):
  """Σ over the shallow classifiers of the mean squared difference between their embedding and
  the final one (`prelogits`, a target): the hint of "be your own teacher"."""
  final = jax.lax.stop_gradient(o.student_feats['prelogits'])
  return sum(losses.fitnet_loss(final, embedding) for _, embedding in self_outputs(o, obj))


def sftn_logits(o: Outputs, obj: Objective) -> list:
  """[q_R^i]: the logits of each student branch on the trained model's feature at its tap."""
  return [b.module.apply({'params': o.aux_params[b.key]}, o.student_feats[b.tap])
          for b in obj.sftn_branches]


def sftn_kl_term(o: Outputs, obj: Objective):
  """Σ over the student branches of τ²·KL(q_T ‖ q_R^i) at τ (SFTN's L_R^KL; q_T: the trained
  model's logits, `student_logits` here, since the stage trains the teacher).

  No stop-gradient on either side, as the paper minimises L_SFTN jointly over the teacher and
  the branches: the gradient moves each branch towards the teacher, and moves the teacher both
  through q_T (its output towards what the branches can express) and through the branches'
  input (its blocks up to the tap towards features the student's later blocks can use). That
  is what makes the teacher student-friendly; "be your own teacher" (`self_kl_term`) instead
  holds its final output fixed as a target."""
  temperature = dict(obj.options)['sftn_temperature']
  return sum(losses.kl_divergence(o.student_logits, logits, temperature)
             for logits in sftn_logits(o, obj))


def sftn_ce_term(o: Outputs, obj: Objective):
  """Σ over the student branches of their cross-entropy on the (mixed) labels (L_R^CE)."""
  return sum(losses.cross_entropy(logits, o.targets) for logits in sftn_logits(o, obj))


def mutual_kl_term(o: Outputs, obj: Objective):
  """Deep mutual learning: T²·KL(the other peers' mean prediction ‖ this peer's) at T, the
  others a target: each peer's gradient comes from its own forward alone (`peer_outputs`)."""
  others = jax.lax.stop_gradient(o.teacher_logits)
  return losses.kl_divergence(others, o.student_logits, dict(obj.options)['mutual_temperature'])


TERMS = {'kl': kl_term, 'labels': labels_term, 'dkd': dkd_term, 'dist': dist_term,
         'crd': crd_term, 'self_ce': self_ce_term, 'self_kl': self_kl_term,
         'self_feature': self_feature_term, 'sftn_kl': sftn_kl_term, 'sftn_ce': sftn_ce_term,
         'mutual_kl': mutual_kl_term,
         **{name: feature_term(name) for name in FEATURE_TERMS}}


def term_values(o: Outputs, obj: Objective) -> dict:
  """{term: unweighted value} of each of the objective's terms."""
  return {name: TERMS[name](o, obj) for name, _ in obj.terms}


def weighted_sum(obj: Objective, values: dict):
  """Σ weight·value over the terms, in their order (a weight of 1 multiplies nothing)."""
  total = None
  for name, weight in obj.terms:
    value = values[name] if weight == 1 else weight * values[name]
    total = value if total is None else total + value
  return total


def logged_terms(terms) -> tuple:
  """The names of the per-term metrics (`loss_TERM`, unweighted) a stage logs beside `loss`:
  none where the loss is one term of weight 1 (it would repeat `loss`)."""
  if len(terms) == 1 and terms[0][1] == 1:
    return ()
  return tuple(f'loss_{name}' for name, _ in terms)


def per_example_agreement(teacher_logits, student_logits):
  """1.0 where the student's top-1 class is the teacher's, per example."""
  return (jnp.argmax(teacher_logits, -1) == jnp.argmax(student_logits, -1)).astype(jnp.float32)


def loss_and_metrics(o: Outputs, obj: Objective):
  """(loss, metrics) of one batch: `loss`, each term as `loss_TERM` (see `logged_terms`) and,
  with teachers, `kl_T1` (KL at T = 1 whatever the stage's T: comparable with the evaluation's
  `val_kl`) and `agreement` (top-1)."""
  values = term_values(o, obj)
  loss = weighted_sum(obj, values)
  metrics = {f'loss_{name}': values[name] for name, _ in obj.terms} if logged_terms(
      obj.terms) else {}
  if o.teacher_logits is not None:
    metrics['kl_T1'] = losses.kl_divergence(o.teacher_logits, o.student_logits)
    metrics['agreement'] = jnp.mean(per_example_agreement(o.teacher_logits, o.student_logits))
  metrics['loss'] = loss
  return loss, metrics


def peer_outputs(logits: dict, targets, step, temperature: float) -> dict:
  """{peer: Outputs} of a deep-mutual-learning stage: each peer is the student of its own
  Outputs, the mean of the others' probabilities at `temperature` (as T·log p: an ensemble of
  teachers, `losses.ensemble_logits`) its teacher. For two peers that is the other's logits."""
  return {name: Outputs(own, {}, losses.ensemble_logits(
      [other for o, other in logits.items() if o != name], 'probs', temperature), [], targets, {},
      step) for name, own in logits.items()}


def peers_loss_and_metrics(outputs: dict, obj: Objective):
  """(loss, metrics) of a stage with peers: the sum over the peers of each one's
  `loss_and_metrics` (its labels and mutual_kl terms), whose metrics are logged as
  `PEER/loss`, `PEER/loss_TERM`, `PEER/kl_T1` and `PEER/agreement` (with the others' mean
  prediction), beside the total `loss`."""
  total, metrics = 0.0, {}
  for name, o in outputs.items():
    loss, own = loss_and_metrics(o, obj)
    total = total + loss
    metrics.update({f'{name}/{key}': value for key, value in own.items()})
  metrics['loss'] = total
  return total, metrics
