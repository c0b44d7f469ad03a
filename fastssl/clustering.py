"""The ``torch`` backend of the clustering & distillation family (any device).

* :func:`sinkhorn` — log-domain Sinkhorn-Knopp that keeps only the two potentials (a of size
  K, b of size B) and re-reads the (stabilised) score matrix each half-iteration, writing the
  codes once at the end. The iteration driver (:func:`sinkhorn_with`) is shared with the
  Triton backend, which supplies its own passes over the scores.
* :func:`soft_cross_entropy_pairs_forward` / ``_backward`` — the soft-target cross-entropy of
  every (target crop, student crop) pair (SwAV, DINO) with its gradient, never holding a
  (T × S × B × K) product nor the student log-probabilities.
* :func:`linear_soft_cross_entropy_pairs_forward` / ``_backward`` — the same with the last
  linear layer (SwAV prototypes, DINO head) fused in: the (S, B, K) logits are produced and
  consumed one block of K columns at a time and never exist whole.
* :func:`kmeans_assign` — DeepCluster's assignment step, fused distance and argmin over blocks
  of centroids (the same tiling as the fused last layer).

Every function takes already validated tensors (``fastssl.functional`` checks them) and
computes in float32 (float64 for float64 inputs), like ``fastssl.reference``.
"""
from __future__ import annotations

import math
from typing import Callable, List, Optional, Protocol, Sequence, Tuple

import torch

from . import distributed, reference
from .reference import compute_dtype, marginal_logs, max_exp_span

Tensor = torch.Tensor

# Blocks of the blocked passes: about BLOCK_ELEMENTS elements (4 MiB of float32), so that a
# block's temporaries stay in cache across its ~10 elementwise ops (the fastest of 2^18 to 2^24
# on one thread), but at most MAX_BLOCKS of them: each op is a parallel region, whose fork/join
# costs milliseconds where other processes share the cores (DINO's 64 one-row blocks ran 5x
# slower than 8 blocks with 2 threads on the README's shared machine).
BLOCK_ELEMENTS = 1 << 20
MAX_BLOCKS = 8


def _blocks(count: int, elements_each: int) -> List[slice]:
    """Slices of range(count) (rows or columns of ``elements_each`` elements each): blocks of
    about BLOCK_ELEMENTS elements, at most MAX_BLOCKS of them, at least one row or column each."""
    step = max(1, BLOCK_ELEMENTS // max(1, elements_each), -(-count // MAX_BLOCKS))
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


# ============================================================================================
# Sinkhorn-Knopp
# ============================================================================================
# The reference's iteration, written with potentials: log Q_kb = s_bk/ε + a_k + b_b. A row step
# sets a = log r − LSE_b(s/ε + b) (every prototype's total to r_k), a column step sets
# b = log c − LSE_k(s/ε + a) (every sample's total to c_b). The global normalisation of the
# reference only shifts a and b by opposite constants, so it is skipped. The final codes
# exp(log Q − log c) after a column step are softmax_k(s/ε + a) per sample, so the last column
# step is fused with writing the codes.
class SinkhornPasses(Protocol):
    """The passes over the (B, K) scores that the Sinkhorn driver needs."""

    def first_prototype_lse(self) -> Tensor:
        """(K,) LSE over the local samples of s/ε: the first row step's."""

    def column_step_prototype_lse(self, prototype_potential: Tensor, log_col_marginals: Tensor) -> Tensor:
        """A column step, b = log c − LSE_k(s/ε + a), then the (K,) LSE over the local samples
        of s/ε + b that the next row step (and the tolerance test) needs."""

    def codes(self, prototype_potential: Tensor) -> Tensor:
        """(B, K) softmax over the prototypes of s/ε + a, contiguous, in the scores' dtype."""


class LogDomainPasses:
    """Every pass a logsumexp over s/ε plus a potential: exact for any range of scores."""

    def __init__(self, scores: Tensor, epsilon: float):
        self.scores_dtype = scores.dtype
        self.logits = scores.to(compute_dtype(scores)) / epsilon

    def first_prototype_lse(self):
        return torch.logsumexp(self.logits, dim=0)

    def column_step_prototype_lse(self, prototype_potential, log_col_marginals):
        sample_potential = log_col_marginals - torch.logsumexp(self.logits + prototype_potential, dim=1)
        return torch.logsumexp(self.logits + sample_potential[:, None], dim=0)

    def codes(self, prototype_potential):
        return torch.softmax(self.logits + prototype_potential, dim=1).to(self.scores_dtype)


class StabilisedKernelPasses:
    """exp(s/ε) = E · exp(m) per sample, with m_b = max_k s_bk/ε and E = exp(s/ε − m) in (0, 1].

    While every sample's range max_k − min_k of s/ε is at most ``max_exp_span(dtype)`` (SwAV's cosine
    scores at ε = 0.05 span at most 40), E ≥ e^−span is a normal number and every LSE of the
    iteration is a matrix-vector product with E and a shifted exponential of the other
    potential: no exponential per element. The largest term of every such sum is
    ≥ e^−span = sqrt(tiny), so terms lost to underflow (< tiny each) change a sum of n terms by
    less than n·sqrt(tiny) relative (1e-15 for n = 10⁴ in float32).

    ``build`` returns None when some sample's range is wider (unnormalised scores, tiny ε): the
    caller then uses :class:`LogDomainPasses`. E is built in row blocks fused with the first
    row step's sums, and for float32 scores lives in the buffer that will hold the codes.
    """

    @classmethod
    def build(cls, scores: Tensor, epsilon: float) -> Optional["StabilisedKernelPasses"]:
        dtype = compute_dtype(scores)
        kernel = torch.empty(scores.shape, dtype=dtype, device=scores.device)
        shift = torch.empty(scores.shape[0], dtype=dtype, device=scores.device)
        span = torch.zeros((), dtype=dtype, device=scores.device)
        # Running Σ_b E_bk e^(m_b − β) with β the largest m_b so far: LSE_b(s/ε) = log(sum) + β.
        first_sums = torch.zeros(scores.shape[1], dtype=dtype, device=scores.device)
        beta = torch.full((), -math.inf, dtype=dtype, device=scores.device)
        for rows in _blocks(*scores.shape):
            block = kernel[rows]
            if scores.dtype == dtype:
                torch.mul(scores[rows], 1.0 / epsilon, out=block)
            else:  # upcast before scaling: fp16 scores / ε overflow fp16
                block.copy_(scores[rows]).mul_(1.0 / epsilon)
            # Reduced while the block is in cache (reading the scores for them first: 1.5x slower).
            high, low = block.amax(dim=1), block.amin(dim=1)  # 5x faster than aminmax here
            span = torch.maximum(span, (high - low).max())
            block.sub_(high[:, None]).exp_()
            shift[rows] = high
            new_beta = torch.maximum(beta, high.max())
            first_sums.mul_(torch.exp(beta - new_beta)).addmv_(block.T, torch.exp(high - new_beta))
            beta = new_beta
        if span.item() > max_exp_span(dtype):
            return None
        return cls(kernel, shift, torch.log(first_sums) + beta, scores.dtype)

    def __init__(self, kernel: Tensor, shift: Tensor, first_prototype_lse: Tensor, scores_dtype: torch.dtype):
        self.kernel, self.shift, self.scores_dtype = kernel, shift, scores_dtype
        self._first_prototype_lse = first_prototype_lse

    def first_prototype_lse(self):
        return self._first_prototype_lse

    def column_step_prototype_lse(self, prototype_potential, log_col_marginals):
        alpha = prototype_potential.max()
        sample_lse = torch.log(torch.mv(self.kernel, torch.exp(prototype_potential - alpha))) + alpha + self.shift
        shifted = log_col_marginals - sample_lse + self.shift  # b + m
        beta = shifted.max()
        return torch.log(torch.mv(self.kernel.T, torch.exp(shifted - beta))) + beta

    def codes(self, prototype_potential):
        weights = torch.exp(prototype_potential - prototype_potential.max())
        row_sums = torch.mv(self.kernel, weights)
        in_place = self.kernel.dtype == self.scores_dtype
        codes = self.kernel if in_place else torch.empty_like(self.kernel, dtype=self.scores_dtype)
        for rows in _blocks(*self.kernel.shape):
            block = self.kernel[rows].mul_(weights).div_(row_sums[rows, None])
            if not in_place:
                codes[rows] = block
        return codes


def sinkhorn_with(
    passes_for: Callable[[Tensor, float], SinkhornPasses],
    scores: Tensor,
    iterations: int,
    epsilon: float,
    row_marginals: Optional[Tensor],
    col_marginals: Optional[Tensor],
    tolerance: float,
    gather_distributed: bool,
) -> Tensor:
    """Sinkhorn-Knopp with the reference's signature, on the passes ``passes_for(scores, ε)``.

    With ``gather_distributed`` the prototype LSEs are combined over ranks (a max and a sum
    all-reduce of K values per row step); the column steps are local. The tolerance test needs
    the prototype totals after a column step, which the next row step needs anyway.
    """
    scores = scores.contiguous()  # the codes come back contiguous whatever the layout of the scores
    world = distributed.world_size() if gather_distributed else 1
    log_r, log_c = marginal_logs(scores, row_marginals, col_marginals, world)
    if iterations == 0:  # the globally normalised plan, without any scaling
        logits = scores.to(log_c.dtype) / epsilon
        total = reference._distributed_logsumexp(logits, None, world > 1)
        return torch.exp(logits - total - log_c[:, None]).to(scores.dtype)

    passes = passes_for(scores, epsilon)

    def over_ranks(local_prototype_lse):
        if world == 1:
            return local_prototype_lse
        return reference._distributed_logsumexp(local_prototype_lse[None], 0, True)

    row_lse = over_ranks(passes.first_prototype_lse())
    for iteration in range(iterations):
        prototype_potential = log_r - row_lse
        if iteration == iterations - 1:
            break
        row_lse = over_ranks(passes.column_step_prototype_lse(prototype_potential, log_c))
        if tolerance > 0:
            row_error = torch.exp(prototype_potential + row_lse - log_r) - 1
            if row_error.abs().max().item() < tolerance:
                break
    return passes.codes(prototype_potential)


def _torch_passes(scores: Tensor, epsilon: float) -> SinkhornPasses:
    return StabilisedKernelPasses.build(scores, epsilon) or LogDomainPasses(scores, epsilon)


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    iterations: int,
    epsilon: float,
    row_marginals: Optional[Tensor],
    col_marginals: Optional[Tensor],
    tolerance: float,
    gather_distributed: bool,
) -> Tensor:
    """Sinkhorn-Knopp codes of (B, K) scores; same arguments and result as ``reference.sinkhorn``.

    Returns (B, K) codes in the dtype of ``scores``, each row summing to 1.
    """
    return sinkhorn_with(_torch_passes, scores, iterations, epsilon, row_marginals, col_marginals,
                         tolerance, gather_distributed)


# ============================================================================================
# Soft-target cross-entropy of every (target crop, student crop) pair
# ============================================================================================
# loss[t, s] = −(1/B) Σ_b Σ_k q_tbk · log softmax(σ x_sb)_k
#            = −(1/B) Σ_b (σ Σ_k q_tbk x_sbk − Q_tb · L_sb),  Q_tb = Σ_k q_tbk,  L_sb = LSE_k(σ x_sb)
# so the forward is one contraction over (b, k) and one LSE per student row. With G = ∂ℓ/∂loss (T, S):
#   ∂ℓ/∂x_sbk = (σ/B) (p_sbk · Σ_t G_ts Q_tb − Σ_t G_ts q_tbk),   p_sb = softmax(σ x_sb)
#   ∂ℓ/∂q_tbk = −(1/B) (σ Σ_s G_ts x_sbk − Σ_s G_ts L_sb)
# Saved for the backward: the inputs and L (S, B). Blocks of samples b keep the temporaries of
# one block in cache; the contractions over (b, k) are one small matrix product per block.
def _flush_threshold(dtype: torch.dtype) -> float:
    """sqrt(smallest normal number): products of two numbers above it are normal numbers."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _flush_level(targets: Tensor, dtype: torch.dtype) -> float:
    """Below which magnitude target entries are dropped: sqrt(tiny) × the smallest row peak
    (max_k |q_tbk|) on CPUs, so every dropped entry is below sqrt(tiny) × its own row's peak.

    Sharp teacher distributions (DINO at τ = 0.04) are mostly subnormal numbers, and arithmetic
    on or into subnormals is ~20× slower on CPUs; the dropped entries change a row's
    contribution by less than K · sqrt(tiny) relative (7e-15 for K = 65,536 in float32).
    GPUs handle subnormals at full speed: nothing is dropped there (and nothing is synced).
    """
    if targets.device.type != "cpu":
        return 0.0
    row_peak = torch.maximum(targets.amax(dim=-1), -targets.amin(dim=-1))
    return row_peak.min().item() * _flush_threshold(dtype)


def _flushed_targets(targets: Tensor, level: float, dtype: torch.dtype) -> Tensor:
    """targets (T, b, k) as a (T, b·k) matrix in ``dtype``, entries of magnitude ≤ ``level`` set to 0."""
    return torch.nn.functional.hardshrink(targets.to(dtype), level).reshape(targets.shape[0], -1)


def _student_lse(x: Tensor, scale: float) -> Tensor:
    """LSE over the last dim of scale · x, x (..., K) in the compute dtype (scale > 0).

    Exponents below log sqrt(tiny) are raised to it: exp() of arguments that underflow runs
    ~50× slower on CPUs, and the largest term being 1, the K raised terms add at most
    K · sqrt(tiny) relative.
    """
    peak = x.amax(dim=-1, keepdim=True)
    shifted = torch.sub(x, peak).mul_(scale).clamp_min_(math.log(_flush_threshold(x.dtype)))
    return shifted.exp_().sum(dim=-1).log_().add_(peak.squeeze(-1), alpha=scale)


def _logits_grad(x: Tensor, lse: Tensor, target_weight: Tensor, q: Tensor, grad_loss: Tensor, scale: float,
                 batch: int, out: Optional[Tensor] = None) -> Tensor:
    """∂ℓ/∂x = (σ/B) (p ⊙ Σ_t G_ts Q_tb − Σ_t G_ts q_t) for a block x (S, b, k) of logits.

    lse, target_weight: (S, b, 1); q: the block's flushed targets (T, b·k); ``out``: where to
    write it (x's shape and dtype), or None. Probabilities below sqrt(tiny) become 0 (see
    _flush_level), without taking exp() of arguments that underflow (see _student_lse).
    """
    flush = _flush_threshold(x.dtype)
    p = torch.mul(x, scale, out=out).sub_(lse).clamp_min_(math.log(flush)).exp_()
    p = torch.nn.functional.threshold_(p, flush, 0.0).mul_(target_weight)
    p.view(x.shape[0], -1).addmm_(grad_loss.T, q, beta=scale / batch, alpha=-scale / batch)
    return p


def _targets_grad(x: Tensor, lse_weight: Tensor, grad_loss: Tensor, scale: float, batch: int) -> Tensor:
    """∂ℓ/∂q = −(1/B) (σ Σ_s G_ts x_s − Σ_s G_ts L_sb) for a block x (S, b, k): (T, b, k).

    lse_weight: Σ_s G_ts L_sb for the block's samples, (T, b, 1).
    """
    block = (grad_loss @ x.reshape(x.shape[0], -1)).mul_(-scale / batch)
    return block.view(grad_loss.shape[0], x.shape[1], x.shape[2]).add_(lse_weight, alpha=1.0 / batch)


def _pair_weights(grad_loss: Tensor, targets: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Σ_s G_ts L_sb (T, B, 1) and Σ_t G_ts Q_tb (S, B, 1) of the backward formulas."""
    lse_weight = (grad_loss @ lse)[:, :, None]
    target_weight = (grad_loss.T @ targets.sum(dim=-1, dtype=lse.dtype))[:, :, None]
    return lse_weight, target_weight


def soft_cross_entropy_pairs_forward(targets: Tensor, logits: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), logits (S, B, K) → (loss (T, S), student LSE (S, B)), compute dtype."""
    dtype = compute_dtype(targets, logits)
    num_targets, batch, num_classes = targets.shape
    num_students = logits.shape[0]
    lse = torch.empty(num_students, batch, dtype=dtype, device=logits.device)
    dots = torch.zeros(num_targets, num_students, dtype=dtype, device=logits.device)
    level = _flush_level(targets, dtype)
    for rows in _blocks(batch, num_students * num_classes):
        x = logits[:, rows].to(dtype)
        lse[:, rows] = _student_lse(x, scale)
        dots.addmm_(_flushed_targets(targets[:, rows], level, dtype), x.reshape(num_students, -1).T)
    loss = (targets.sum(dim=-1, dtype=dtype) @ lse.T - scale * dots) / batch
    return loss, lse


def soft_cross_entropy_pairs_backward(
    grad_loss: Tensor, targets: Tensor, logits: Tensor, lse: Tensor, scale: float, needs_grad: Sequence[bool]
) -> List[Tensor]:
    """Gradients [∂/∂targets, ∂/∂logits] in the inputs' dtypes (an empty tensor where not needed)."""
    dtype = lse.dtype
    batch, num_classes = targets.shape[1:]
    num_students = logits.shape[0]
    grad_loss = grad_loss.to(dtype)
    grad_targets = torch.empty_like(targets) if needs_grad[0] else targets.new_empty(0)
    grad_logits = torch.empty_like(logits) if needs_grad[1] else logits.new_empty(0)
    lse_weight, target_weight = _pair_weights(grad_loss, targets, lse)
    level = _flush_level(targets, dtype)
    for rows in _blocks(batch, num_students * num_classes):
        x = logits[:, rows].to(dtype)
        if needs_grad[0]:
            grad_targets[:, rows] = _targets_grad(x, lse_weight[:, rows], grad_loss, scale, batch)
        if needs_grad[1]:
            in_place = grad_logits.dtype == dtype  # write straight into the gradient
            block = _logits_grad(x, lse[:, rows, None], target_weight[:, rows],
                                 _flushed_targets(targets[:, rows], level, dtype), grad_loss, scale,
                                 batch, out=grad_logits[:, rows] if in_place else None)
            if not in_place:
                grad_logits[:, rows] = block
    return [grad_targets, grad_logits]


# ============================================================================================
# The same with the last linear layer fused: logits = features @ weightᵀ
# ============================================================================================
# features (S, B, D), weight (K, D). Blocks of k prototypes / output dims: each block's logits
# z = features @ weight[k]ᵀ (S·B, k) are made, used and dropped; the forward keeps a running
# LSE per student row, the backward makes each block's ∂ℓ/∂z (as above) and turns it into
#   ∂ℓ/∂features += ∂ℓ/∂z @ weight[k],   ∂ℓ/∂weight[k] = ∂ℓ/∂zᵀ @ features.
# Saved for the backward: the inputs and L (S, B); the logits are made again.
def linear_soft_cross_entropy_pairs_forward(
    targets: Tensor, features: Tensor, weight: Tensor, scale: float
) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), features (S, B, D), weight (K, D) → (loss (T, S), LSE (S, B))."""
    dtype = compute_dtype(targets, features, weight)
    num_targets, batch, num_classes = targets.shape
    num_students = features.shape[0]
    rows = features.to(dtype).reshape(num_students * batch, -1)
    level = _flush_level(targets, dtype)
    running_max = torch.full((rows.shape[0],), -math.inf, dtype=dtype, device=rows.device)
    running_sum = torch.zeros_like(running_max)
    dots = torch.zeros(num_targets, num_students, dtype=dtype, device=rows.device)
    for cols in _blocks(num_classes, rows.shape[0]):
        z = rows @ weight[cols].to(dtype).T
        block_lse = _student_lse(z, scale)
        new_max = torch.maximum(running_max, block_lse)
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(block_lse - new_max)
        running_max = new_max
        q = _flushed_targets(targets[:, :, cols], level, dtype)
        dots.addmm_(q, z.view(num_students, -1).T)
    lse = (running_max + torch.log(running_sum)).view(num_students, batch)
    loss = (targets.sum(dim=-1, dtype=dtype) @ lse.T - scale * dots) / batch
    return loss, lse


def linear_soft_cross_entropy_pairs_backward(
    grad_loss: Tensor, targets: Tensor, features: Tensor, weight: Tensor, lse: Tensor, scale: float,
    needs_grad: Sequence[bool],
) -> List[Tensor]:
    """Gradients [∂/∂targets, ∂/∂features, ∂/∂weight] in the inputs' dtypes (empty where not needed)."""
    dtype = lse.dtype
    batch, num_classes = targets.shape[1:]
    num_students = features.shape[0]
    grad_loss = grad_loss.to(dtype)
    rows = features.to(dtype).reshape(num_students * batch, -1)
    lse_weight, target_weight = _pair_weights(grad_loss, targets, lse)
    level = _flush_level(targets, dtype)
    grad_targets = torch.empty_like(targets) if needs_grad[0] else targets.new_empty(0)
    grad_rows = torch.zeros_like(rows) if needs_grad[1] else None
    grad_weight = torch.empty_like(weight) if needs_grad[2] else weight.new_empty(0)
    for cols in _blocks(num_classes, rows.shape[0]):
        block_weight = weight[cols].to(dtype)
        z = (rows @ block_weight.T).view(num_students, batch, -1)
        if needs_grad[0]:
            grad_targets[:, :, cols] = _targets_grad(z, lse_weight, grad_loss, scale, batch)
        if needs_grad[1] or needs_grad[2]:
            q = _flushed_targets(targets[:, :, cols], level, dtype)
            grad_z = _logits_grad(z, lse[:, :, None], target_weight, q, grad_loss, scale, batch, out=z)
            grad_z = grad_z.view(num_students * batch, -1)
            if needs_grad[1]:
                grad_rows.addmm_(grad_z, block_weight)
            if needs_grad[2]:
                grad_weight[cols] = grad_z.T @ rows
    grad_features = grad_rows.view_as(features).to(features.dtype) if needs_grad[1] else features.new_empty(0)
    return [grad_targets, grad_features, grad_weight]


# ============================================================================================
# DeepCluster-style k-means assignment
# ============================================================================================
# d_bk = ‖x_b‖² − 2 x_b·c_k + ‖c_k‖², minimised over blocks of k centroids with a running
# (min, argmin) — the blocks of the fused last layer above, a running minimum instead of a
# running LSE — so the (N, K) distances never exist whole. The distance returned is then made
# exactly, ‖x_b − c_{a_b}‖², free of the cancellation of the expanded form.
@torch.no_grad()
def kmeans_assign(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Nearest centroid of every row: x (N, D), centroids (K, D) → (assignments (N,) int64,
    squared distances (N,), compute dtype). Ties go to the lowest centroid index."""
    dtype = compute_dtype(x, centroids)
    x, centroids = x.to(dtype), centroids.to(dtype)
    centroid_norms = centroids.pow(2).sum(dim=1)
    best = torch.full((x.shape[0],), math.inf, dtype=dtype, device=x.device)
    assignments = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for cols in _blocks(centroids.shape[0], x.shape[0]):
        partial = torch.addmm(centroid_norms[cols], x, centroids[cols].T, alpha=-2)  # d − ‖x‖²
        block_best, block_index = partial.min(dim=1)
        better = block_best < best
        best = torch.where(better, block_best, best)
        assignments = torch.where(better, block_index + cols.start, assignments)
    return assignments, (x - centroids[assignments]).pow(2).sum(dim=1)
