"""Distillation losses. Every loss returns a scalar averaged over the batch.

Logits are float32 [B, classes]; `labels` are (possibly mixed) one-hot targets [B, classes].
"""
import jax
import jax.numpy as jnp
import numpy as np

DISTILL_LOSSES = ('kl', 'hard_pseudo', 'logit_l2')
ENSEMBLE_MODES = ('logits', 'probs')
# The terms a stage's loss_weights can weigh: its logit loss (`hinton_loss`), cross-entropy on
# the labels, the feature losses (on the stage's feature pairs) and the other logit losses.
FEATURE_LOSSES = ('fitnet', 'at', 'sp', 'pkt', 'rkd_distance', 'rkd_angle', 'crd')
# Self-distillation ("be your own teacher"): classifiers on a model's own intermediate taps.
SELF_LOSSES = ('self_ce', 'self_kl', 'self_feature')
# Student-friendly teachers (SFTN): student branches on the trained model's own taps.
SFTN_LOSSES = ('sftn_kl', 'sftn_ce')
# Deep mutual learning: peers trained together, each taught by the others (stages with peers).
MUTUAL_LOSSES = ('mutual_kl',)
LOSS_TERMS = ('kl', 'labels', *FEATURE_LOSSES, 'dkd', 'dist', *SELF_LOSSES, *SFTN_LOSSES,
              *MUTUAL_LOSSES)
# (term, weight) of a distilled stage whose loss_weights are the defaults: its logit loss alone;
# a supervised stage's loss is SUPERVISED_LOSS_TERMS.
DEFAULT_LOSS_TERMS = (('kl', 1.0),)
SUPERVISED_LOSS_TERMS = (('labels', 1.0),)
# The terms that read the labels (the step's targets): cross-entropy (the model's, its own
# classifiers' and its student branches'), DKD's target class (and `kl` where label_weight > 0).
# A stage whose train data has no labels may not weigh them.
LABEL_TERMS = ('labels', 'dkd', 'self_ce', 'sftn_ce')


def cross_entropy(logits, labels):
  """Cross-entropy against soft (or one-hot) targets."""
  return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))


def per_example_kl(teacher_logits, student_logits, temperature=1.0):
  """KL(p_teacher ‖ p_student) of each example at temperature T (not scaled): [B]."""
  t_logp = jax.nn.log_softmax(teacher_logits / temperature)
  s_logp = jax.nn.log_softmax(student_logits / temperature)
  return jnp.sum(jnp.exp(t_logp) * (t_logp - s_logp), axis=-1)


def kl_divergence(teacher_logits, student_logits, temperature=1.0):
  """KL(p_teacher ‖ p_student) at temperature T, scaled by T² (Hinton et al. 2015): the T²
  keeps gradient magnitudes comparable across temperatures, so α in `hinton_loss` means the
  same thing at any T."""
  return temperature ** 2 * jnp.mean(per_example_kl(teacher_logits, student_logits, temperature))


def hard_pseudo_label_loss(teacher_logits, student_logits):
  """Cross-entropy against the teacher's argmax class."""
  pseudo = jax.nn.one_hot(jnp.argmax(teacher_logits, -1), teacher_logits.shape[-1])
  return cross_entropy(student_logits, pseudo)


def logit_l2(teacher_logits, student_logits):
  """Mean squared difference of logits (Ba & Caruana 2014), summed over classes."""
  return jnp.mean(jnp.sum((teacher_logits - student_logits) ** 2, axis=-1))


def distillation_loss(kind, teacher_logits, student_logits, temperature):
  if kind == 'kl':
    return kl_divergence(teacher_logits, student_logits, temperature)
  if kind == 'hard_pseudo':
    return hard_pseudo_label_loss(teacher_logits, student_logits)
  if kind == 'logit_l2':
    return logit_l2(teacher_logits, student_logits)
  raise ValueError(f'unknown distillation loss {kind!r}; one of {DISTILL_LOSSES}')


def hinton_loss(teacher_logits, student_logits, labels, label_weight, temperature, kind='kl'):
  """α·CE(labels) + (1 − α)·distillation: α = 0 is pure distillation, α = 1 supervised."""
  soft = distillation_loss(kind, teacher_logits, student_logits, temperature)
  return label_weight * cross_entropy(student_logits, labels) + (1 - label_weight) * soft


def compact_logits(logits, top_k: int) -> dict:
  """What a teacher cache stores of a batch of logits (`bigkd.teacher_cache`): {'values': the
  logits} or, with `top_k`, the top-k log-probabilities and their classes ('indices')."""
  if not top_k:
    return {'values': logits}
  values, indices = jax.lax.top_k(jax.nn.log_softmax(logits), top_k)
  return {'values': values, 'indices': indices.astype(jnp.int32)}


def cached_logits(cached: dict, num_classes: int):
  """[B, classes] logits of cached rows (`compact_logits`): as stored or, for top-k, the log of
  the kept probabilities and of the rest of the mass spread over the other classes."""
  if 'indices' not in cached:
    return cached['values']
  values, indices = cached['values'], cached['indices']
  rest = jnp.maximum(1.0 - jnp.sum(jnp.exp(values), -1, keepdims=True), 1e-30)
  spread = jnp.log(rest / (num_classes - values.shape[-1]))
  rows = jnp.arange(values.shape[0])[:, None]
  return jnp.broadcast_to(spread, (values.shape[0], num_classes)).at[rows, indices].set(values)


def ensemble_logits(logits_list, mode, temperature=1.0):
  """Combines teachers. 'logits': mean of logits. 'probs': mean of the tempered probabilities,
  returned as T·log(mean p) so that softmax(·/T) of the result is exactly that mean."""
  stacked = jnp.stack(logits_list)
  if mode == 'logits':
    return jnp.mean(stacked, axis=0)
  if mode == 'probs':
    log_probs = jax.nn.log_softmax(stacked / temperature, axis=-1)
    return temperature * (jax.nn.logsumexp(log_probs, axis=0) - jnp.log(len(logits_list)))
  raise ValueError(f'unknown ensemble mode {mode!r}; one of {ENSEMBLE_MODES}')


# --- Feature- and relation-based distillation, DKD, DIST, and CKA. ------------------------------
# Same convention as above: teacher first, then student; every loss is a scalar averaged over
# the batch. Features are [B, H, W, C] or [B, D]; a teacher is frozen by the caller (no
# stop_gradient here). The relation losses (SP, PKT, RKD, DIST's intra term, CKA) compare
# examples with each other, so their value depends on the batch as a whole.


def _flatten(x):
  """[B, ...] -> [B, D]."""
  return x.reshape(x.shape[0], -1)


def _l2_normalize(x, axis=-1, eps=1e-12):
  """x / max(‖x‖₂, eps): finite, with a zero gradient, where x = 0 (a dead feature map, a
  duplicated example), where x / ‖x‖ would give NaN."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps ** 2))


def _huber(x):
  """Smooth L1 (Huber, δ = 1): ½x² for |x| ≤ 1, |x| − ½ beyond."""
  abs_x = jnp.abs(x)
  return jnp.where(abs_x <= 1, 0.5 * x * x, abs_x - 0.5)


def fitnet_loss(teacher_feature, adapted_student_feature):
  """FitNets hints (Romero et al. 2015, sec. 2.2): ½‖u_h(x) − r(v_g(x))‖² between the teacher's
  hint u_h and the student's guided layer v_g mapped by the regressor r (here a
  `bigkd.models.adapters.FeatureAdapter`, so that the shapes match).

  Computed as the mean over every element, not the paper's per-example ½·sum: the two differ
  by the constant factor ½·H·W·C (left to the loss weight), and the mean does not grow with
  the feature's size.
  """
  return jnp.mean((adapted_student_feature - teacher_feature) ** 2)


def attention_map(feature, p=2, size=None):
  """Activation-based spatial attention (Zagoruyko & Komodakis 2017, sec. 3.1): F(A) = mean over
  channels of |A_c|^p, flattened and L2-normalised per example: [B, H, W, C] -> [B, H·W].
  (The paper sums over channels; after the normalisation the mean is the same map.)
  `size` (H', W'): the map is first resized to it (linear, antialiased when shrinking), for
  networks whose stages differ in resolution; the map, not the feature, so nothing is learnt."""
  spatial = jnp.mean(jnp.abs(feature) ** p, axis=-1)
  if size is not None and tuple(size) != spatial.shape[1:]:
    spatial = jax.image.resize(spatial, (spatial.shape[0], *size), 'linear')
  return _l2_normalize(_flatten(spatial))


def _adaptive_average_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in]: row i averages inputs floor(i·n/m) .. ceil((i+1)·n/m) − 1, the bins
  of PyTorch's adaptive average pooling (equal blocks when m divides n)."""
  rows = np.zeros((size_out, size_in))
  for i in range(size_out):
    start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
    rows[i, start:end] = 1 / (end - start)
  return rows


def adaptive_average_pool(feature, size):
  """[B, H, W, C] -> [B, H', W', C] by adaptive average pooling (PyTorch's
  `adaptive_avg_pool2d` bins), H' ≤ H and W' ≤ W."""
  rows = _adaptive_average_matrix(feature.shape[1], size[0])
  cols = _adaptive_average_matrix(feature.shape[2], size[1])
  return jnp.einsum('ih,jw,bhwc->bijc', rows.astype(feature.dtype), cols.astype(feature.dtype),
                    feature)


AT_MATCHES = ('pool', 'resize')


def attention_transfer(teacher_feature, student_feature, p=2, squared=False, match='pool'):
  """Attention transfer (Zagoruyko & Komodakis 2017, sec. 3.1), with Q = `attention_map`:

    squared=False (the paper): mean over the batch of ‖Q_s − Q_t‖₂;
    squared=True (the authors' code): mean over the batch and the H·W positions of
        (Q_s − Q_t)², i.e. mean_b ‖Q_s − Q_t‖₂² / (H·W); the code weights it by β/2, β = 1000.

  The paper's β/2 (and the code's) is left to the loss weight. The channel counts may differ
  (they are averaged away). Where the spatial sizes differ (the paper pairs layers of equal
  size; a student at a lower resolution has none), `match`:
    'pool' (RepDistiller's and mdistiller's AT): the larger feature is adaptive-average-pooled
        to the smaller one's size before its map is taken;
    'resize': the teacher's map is resized to the student's size (linear, antialiased when
        shrinking); the student keeps its own resolution, also when it is the larger one.
  """
  if teacher_feature.ndim != 4 or student_feature.ndim != 4:
    raise ValueError(f'attention transfer needs spatial features [B, H, W, C], got teacher '
                     f'{teacher_feature.shape[1:]} and student {student_feature.shape[1:]}')
  if match not in AT_MATCHES:
    raise ValueError(f'match={match!r}: one of {AT_MATCHES}')
  size = student_feature.shape[1:-1]
  if match == 'resize':
    diff = attention_map(student_feature, p) - attention_map(teacher_feature, p, size)
  else:
    small = tuple(min(a, b) for a, b in zip(size, teacher_feature.shape[1:-1]))
    pooled = lambda f: f if f.shape[1:-1] == small else adaptive_average_pool(f, small)
    diff = attention_map(pooled(student_feature), p) - attention_map(pooled(teacher_feature), p)
  if squared:
    return jnp.mean(diff ** 2)
  # max(·, tiny) before the root: its gradient at student == teacher is then 0, not NaN.
  return jnp.mean(jnp.sqrt(jnp.maximum(jnp.sum(diff ** 2, axis=-1), 1e-24)))


def _similarity_matrix(feature):
  """Tung & Mori 2019, sec. 3: G = Q Qᵀ over the batch, Q the flattened features [b, C·H·W],
  each row L2-normalised."""
  flat = _flatten(feature)
  return _l2_normalize(flat @ flat.T)


def similarity_preserving(teacher_feature, student_feature):
  """Similarity-preserving KD (Tung & Mori 2019, sec. 3): ‖G_t − G_s‖_F² / b², G the
  row-normalised batch similarity matrix of each network (its width may differ)."""
  batch = teacher_feature.shape[0]
  diff = _similarity_matrix(student_feature) - _similarity_matrix(teacher_feature)
  return jnp.sum(diff ** 2) / batch ** 2


PKT_FORMS = ('reference', 'per_anchor')


def _pkt_conditionals(feature, eps, keep_self):
  """Passalis & Tefas 2018, sec. 3: the cosine kernel K(a, b) = ½(cos(a, b) + 1) ∈ [0, 1]
  between the examples of the batch (each row divided by its norm + eps, as the authors' code),
  normalised into conditional probabilities p_{j|i} = K(x_i, x_j) / Σ_k K(x_i, x_k); without
  `keep_self`, over the other examples only (p_{i|i} = 0)."""
  flat = _flatten(feature)
  unit = flat / (jnp.sqrt(jnp.maximum(jnp.sum(flat * flat, -1, keepdims=True), 1e-30)) + eps)
  kernel = (unit @ unit.T + 1) / 2
  if not keep_self:
    kernel = kernel * (1 - jnp.eye(kernel.shape[0], dtype=kernel.dtype))
  return kernel / jnp.sum(kernel, axis=-1, keepdims=True)


def pkt(teacher_feature, student_feature, eps=1e-7, form='reference'):
  """Probabilistic knowledge transfer (Passalis & Tefas 2018, sec. 3): the KL divergence of the
  student's conditional probabilities q_{j|i} from the teacher's p_{j|i}, `eps` keeping the log
  finite where a kernel entry is 0 (opposite feature vectors).

    form='reference' (the authors' code, copied by RepDistiller, mdistiller and torchdistill;
        their weights, e.g. 30000, apply as they are): j runs over the whole batch, i = j
        included, and the mean is over all b² entries,
        (1/b²) Σ_i Σ_j p_{j|i} log((p_{j|i} + eps) / (q_{j|i} + eps));
    form='per_anchor': j ≠ i (an example's similarity to itself is 1 for every network and
        says nothing), and the mean is over anchors i of the per-anchor KL. About b times the
        reference, and unlike it the same size at any batch size: a weight tuned at batch 64
        still means the same at 4096 (the reference's shrinks like 1/b).
  """
  if form not in PKT_FORMS:
    raise ValueError(f'form={form!r}: one of {PKT_FORMS}')
  keep_self = form == 'reference'
  p = _pkt_conditionals(teacher_feature, eps, keep_self)
  q = _pkt_conditionals(student_feature, eps, keep_self)
  kl = p * jnp.log((p + eps) / (q + eps))
  return jnp.mean(kl) if keep_self else jnp.mean(jnp.sum(kl, axis=-1))


def _off_diagonal(n, dtype):
  return 1 - jnp.eye(n, dtype=dtype)


def _distances(x):
  """‖x_i − x_j‖₂ for the rows of x [b, D]; max(·, eps) under the root keeps the gradient
  finite on the diagonal and for duplicated examples."""
  diff = x[:, None] - x[None]
  return jnp.sqrt(jnp.maximum(jnp.sum(diff ** 2, axis=-1), 1e-12))


def rkd_distance(teacher_feature, student_feature):
  """RKD distance-wise loss (Park et al. 2019, sec. 3.2): ψ_D(x_i, x_j) = ‖x_i − x_j‖₂ / μ, μ the
  mean distance over the pairs i ≠ j of the batch; loss = Σ_{i≠j} Huber(ψ_D(s) − ψ_D(t)) / b²,
  the mean over all b² entries as the authors' code (and RepDistiller) takes it, the diagonal's
  zeros included, so that their weight (25) applies as it is. (The mean over the b(b−1) pairs
  alone would be b/(b−1) larger: 6.7% at b = 16, nothing at the paper's batch sizes.)"""
  def normalized(feature):
    flat = _flatten(feature)
    mask = _off_diagonal(flat.shape[0], flat.dtype)
    dist = _distances(flat) * mask
    return dist / (jnp.sum(dist) / jnp.sum(mask)), mask
  psi_t, mask = normalized(teacher_feature)
  psi_s, _ = normalized(student_feature)
  return jnp.sum(_huber(psi_s - psi_t) * mask) / mask.size


def _angles(feature):
  """cos ∠x_i x_j x_k = ⟨e_ij, e_kj⟩, e_ij = (x_i − x_j) / ‖x_i − x_j‖ (Park et al. 2019, sec. 3.2),
  as a [b, b, b] array indexed [i, j, k] (j the vertex)."""
  flat = _flatten(feature)
  e = _l2_normalize(flat[None, :] - flat[:, None])  # e[j, i] = e_ij
  return jnp.einsum('jid,jkd->ijk', e, e)


def rkd_angle(teacher_feature, student_feature):
  """RKD angle-wise loss (Park et al. 2019, sec. 3.2): Σ over the triplets of distinct examples
  of Huber(ψ_A(s) − ψ_A(t)) / b³, ψ_A the cosine of the angle at the middle example: the mean
  over all b³ entries as the authors' code takes it (the others are 0 for both networks), so
  that their weight (50) applies as it is. Memory: b²·D for the differences, b³ for the angles."""
  b = teacher_feature.shape[0]
  i, j, k = jnp.ogrid[:b, :b, :b]
  distinct = ((i != j) & (j != k) & (i != k)).astype(teacher_feature.dtype)
  diff = _angles(student_feature) - _angles(teacher_feature)
  return jnp.sum(_huber(diff) * distinct) / distinct.size


def rkd_loss(teacher_feature, student_feature, distance_weight=25.0, angle_weight=50.0):
  """RKD-DA (Park et al. 2019): λ_D·distance + λ_A·angle, with the paper's weights for
  image-classification distillation (λ_D = 25, λ_A = 50) as defaults."""
  return (distance_weight * rkd_distance(teacher_feature, student_feature)
          + angle_weight * rkd_angle(teacher_feature, student_feature))


def _dkd_log_probs(logits, is_target, temperature):
  """log b = log [p_t, 1 − p_t] (target vs the rest) and the log-probabilities among the
  non-target classes (0 in the target's column, so that its KL term is exactly 0), at T."""
  z = logits / temperature
  log_all = jax.nn.logsumexp(z, axis=-1)
  log_rest = jax.nn.logsumexp(z, axis=-1, where=~is_target)  # log Σ_{i≠t} e^{z_i}
  log_target = jnp.sum(jnp.where(is_target, z, 0), axis=-1) - log_all
  log_binary = jnp.stack([log_target, log_rest - log_all], axis=-1)
  return log_binary, jnp.where(is_target, 0, z - log_rest[:, None])


def _kl(log_p, log_q):
  """KL(p ‖ q) along the last axis from log-probabilities."""
  return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)


def dkd(teacher_logits, student_logits, labels, alpha=1.0, beta=8.0, temperature=4.0,
        warmup_factor=1.0):
  """Decoupled KD (Zhao et al. 2022, sec. 3): KD = TCKD + (1 − p_t^T)·NCKD split into
      TCKD = KL(b^T ‖ b^S), b = [p_t, 1 − p_t] the target-vs-rest probabilities at temperature T,
      NCKD = KL(p̂^T ‖ p̂^S), p̂ the softmax at T over the non-target classes alone,
  and reweighted: warmup_factor · T² · mean over the batch of (α·TCKD + β·NCKD). Defaults: the
  authors' CIFAR-100 settings (α = 1, β = 8, T = 4). `labels`: class indices [B] or one-hot
  [B, K]; for mixed (soft) labels the largest entry is the target. `warmup_factor`: the authors
  ramp the loss in linearly, `linear_warmup(step, warmup_steps)`.
  """
  target = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
  is_target = target[:, None] == jnp.arange(teacher_logits.shape[-1])
  t_binary, t_rest = _dkd_log_probs(teacher_logits, is_target, temperature)
  s_binary, s_rest = _dkd_log_probs(student_logits, is_target, temperature)
  per_example = alpha * _kl(t_binary, s_binary) + beta * _kl(t_rest, s_rest)
  return warmup_factor * temperature ** 2 * jnp.mean(per_example)


def linear_warmup(step, warmup_steps):
  """min(step / warmup_steps, 1); 1 when warmup_steps is 0."""
  if not warmup_steps:
    return 1.0
  return jnp.minimum(step / warmup_steps, 1.0)


def _pearson_distance(x, y, axis, eps=1e-8):
  """1 − Pearson correlation of x and y along `axis`, as the DIST authors' code computes it:
  1 − ⟨x̄, ȳ⟩ / (‖x̄‖·‖ȳ‖ + eps), x̄, ȳ the centred vectors. Where both norms are tiny (a
  class that every example gives almost no probability), eps dominates and the correlation
  goes to 0: such a class adds a constant 1 and no gradient, as in the reference."""
  x = x - jnp.mean(x, axis=axis, keepdims=True)
  y = y - jnp.mean(y, axis=axis, keepdims=True)
  norm = lambda v: jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=axis), 1e-30))  # finite gradient
  return 1 - jnp.sum(x * y, axis=axis) / (norm(x) * norm(y) + eps)


def dist_loss(teacher_logits, student_logits, beta=1.0, gamma=1.0, temperature=1.0):
  """DIST (Huang et al. 2022, sec. 3): with Y = softmax(Z / τ) [B, C] and d(u, v) = 1 − ρ(u, v),
  ρ the Pearson correlation,
      inter-class relation = mean over examples i of d(Y^s_i,:, Y^t_i,:),
      intra-class relation = mean over classes j of d(Y^s_:,j, Y^t_:,j),
  loss = τ²·(β·inter + γ·intra). Defaults: the paper's ImageNet setting (β = γ = τ = 1)."""
  y_t = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  y_s = jax.nn.softmax(student_logits / temperature, axis=-1)
  inter = jnp.mean(_pearson_distance(y_s, y_t, axis=1))
  intra = jnp.mean(_pearson_distance(y_s, y_t, axis=0))
  return temperature ** 2 * (beta * inter + gamma * intra)


# --- Linear CKA (Kornblith et al. 2019) with the minibatch-unbiased HSIC. ------------------------


def crd_info_nce(student_embedding, teacher_embedding, student_queue, teacher_queue, valid,
                 temperature=0.07):
  """Contrastive representation distillation (Tian et al. 2020) against queues of earlier
  batches' embeddings. Embeddings are L2-normalised [B, d]; queues [Q, d]; `valid` [Q] marks
  the queue rows filled so far.

  Two InfoNCE terms, as CRD's two critics: each student embedding must pick its own image's
  teacher embedding out of the teacher queue, and each teacher embedding its student's out of
  the student queue: Σ_side mean_i −log(e^{s_ii/τ} / (e^{s_ii/τ} + Σ_{k valid} e^{s_ik/τ})).
  The paper's critic is NCE against a memory bank of the whole dataset (16384 negatives drawn
  from it); a fixed-size queue of recent batches (MoCo) keeps the state small at any dataset
  size and the loss a function of (state, batch). Negatives come from the queue alone, so each
  example's term does not depend on the rest of its batch."""
  def one_side(anchor, positive, negatives):
    positive_logit = jnp.sum(anchor * positive, -1) / temperature
    negative_logits = jnp.where(valid, anchor @ negatives.T / temperature, -jnp.inf)
    logits = jnp.concatenate([positive_logit[:, None], negative_logits], axis=1)
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive_logit)

  return (one_side(student_embedding, teacher_embedding, teacher_queue) +
          one_side(teacher_embedding, student_embedding, student_queue))


def unbiased_hsic(k, l):
  """HSIC_1 (Song et al. 2012, used by Nguyen et al. 2021), unbiased for HSIC, of two n×n kernel
  matrices with their diagonals zeroed (K̃, L̃), n ≥ 4:
      [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1) / ((n−1)(n−2)) − 2/(n−2)·1ᵀK̃L̃1] / (n(n−3)).
  Unbiased, so it can be averaged over minibatches (a biased estimate could not)."""
  n = k.shape[0]
  if n < 4:
    raise ValueError(f'the unbiased HSIC needs at least 4 examples, got {n}')
  mask = _off_diagonal(n, k.dtype)
  k, l = k * mask, l * mask
  rows_k, rows_l = jnp.sum(k, axis=1), jnp.sum(l, axis=1)
  return (jnp.sum(k * l.T) + jnp.sum(rows_k) * jnp.sum(rows_l) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * jnp.dot(rows_k, rows_l)) / (n * (n - 3))


def linear_hsic_terms(x, y):
  """(HSIC_1(K, L), HSIC_1(K, K), HSIC_1(L, L)) of one minibatch, K = XXᵀ and L = YYᵀ the linear
  kernels of the flattened features x [B, ...] and y [B, ...]. Average each over minibatches and
  pass the means to `cka_from_hsic`. The features are centred first: the estimator does not
  change (it is translation-invariant), but the Gram entries lose their large common part,
  which would otherwise cancel in float32."""
  centred = lambda v: _flatten(v) - jnp.mean(_flatten(v), axis=0)
  x, y = centred(x), centred(y)
  k, l = x @ x.T, y @ y.T
  return unbiased_hsic(k, l), unbiased_hsic(k, k), unbiased_hsic(l, l)


def masked_unbiased_hsic(k, l, mask):
  """`unbiased_hsic` of the rows and columns where `mask` [n] is 1, with the shapes fixed (for a
  padded evaluation batch): the other rows and columns are zeroed, which leaves every sum of
  the estimator that of the kept submatrices, and n is the kept count. NaN when fewer than 4."""
  keep = mask[:, None] * mask[None, :] * _off_diagonal(k.shape[0], k.dtype)
  k, l, n = k * keep, l * keep, jnp.sum(mask)
  rows_k, rows_l = jnp.sum(k, axis=1), jnp.sum(l, axis=1)
  return (jnp.sum(k * l.T) + jnp.sum(rows_k) * jnp.sum(rows_l) / ((n - 1) * (n - 2))
          - 2 / (n - 2) * jnp.dot(rows_k, rows_l)) / (n * (n - 3))


def masked_linear_hsic_terms(x, y, mask):
  """`linear_hsic_terms` of the examples where `mask` [B] is 1 (padding rows do not count), as
  a [3] array; zeros when fewer than 4 examples are kept (the batch then adds nothing to the
  sums whose ratio `cka_from_hsic` takes; each other batch counts once, as in the minibatch
  estimator). Centred by the kept examples' mean, for the float32 reason above."""
  mask = mask.astype(x.dtype)
  def centred(v):
    v = _flatten(v)
    mean = jnp.sum(v * mask[:, None], axis=0) / jnp.maximum(jnp.sum(mask), 1)
    return (v - mean) * mask[:, None]
  x, y = centred(x), centred(y)
  k, l = x @ x.T, y @ y.T
  terms = jnp.stack([masked_unbiased_hsic(k, l, mask), masked_unbiased_hsic(k, k, mask),
                     masked_unbiased_hsic(l, l, mask)])
  return jnp.where(jnp.sum(mask) >= 4, terms, 0.0)


def cka_from_hsic(hsic_xy, hsic_xx, hsic_yy):
  """Minibatch CKA (Nguyen et al. 2021, sec. 3.1): mean HSIC_xy / sqrt(mean HSIC_xx · mean HSIC_yy),
  the means over the minibatches' terms (scalars or [num_batches] arrays). Being unbiased, the
  estimates can be negative over very few examples (CKA then is NaN or outside [-1, 1])."""
  return jnp.mean(hsic_xy) / jnp.sqrt(jnp.mean(hsic_xx) * jnp.mean(hsic_yy))


def linear_cka(x, y):
  """Linear CKA (Kornblith et al. 2019) of features x [B, ...] and y [B, ...] from one batch with
  the unbiased HSIC: 1 for identical representations, invariant to orthogonal transforms and
  isotropic scaling of either."""
  return cka_from_hsic(*linear_hsic_terms(x, y))
