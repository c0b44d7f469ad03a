"""The ``torch`` backend of the clustering family (any device).

* :func:`sinkhorn` — log-domain Sinkhorn-Knopp that keeps only the two potentials (a of size
  K, b of size B) and re-reads the (stabilised) score matrix each half-iteration, writing the
  codes once at the end. The iteration driver (:func:`sinkhorn_with`) is shared with the
  Triton backend, which supplies its own passes over the scores.
* :func:`kmeans_assign` — DeepCluster's assignment step, fused distance and argmin over blocks
  of centroids (the blocks of the distillation family's fused last layer).

Every function takes already validated tensors and computes in float32 (float64 for float64
inputs), like ``reference``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Protocol, Tuple

import torch

from ..runtime import distributed
from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype, max_exp_span
from .op import define_kmeans_assign_op, define_sinkhorn_op
from .reference import _distributed_logsumexp, marginal_logs

Tensor = torch.Tensor


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
        for rows in blocks(*scores.shape):
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
        for rows in blocks(*self.kernel.shape):
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
    fused: Optional[Callable[[Tensor, int, float, Tensor, Tensor], Tensor]] = None,
) -> Tensor:
    """Sinkhorn-Knopp with the reference's signature, on the passes ``passes_for(scores, ε)``.

    With ``gather_distributed`` the prototype LSEs are combined over ranks (a max and a sum
    all-reduce of K values per row step); the column steps are local. The tolerance test needs
    the prototype totals after a column step, which the next row step needs anyway.
    ``fused(scores, iterations, ε, log r, log c)``, where given, runs a whole iteration with
    nothing to test between steps (no tolerance, one rank, ≥ 1 iteration) instead of the
    passes; it takes the scores in any layout and returns contiguous codes.
    """
    world = distributed.world_size() if gather_distributed else 1
    log_r, log_c = marginal_logs(scores, row_marginals, col_marginals, world)
    if fused is not None and iterations > 0 and tolerance <= 0 and world == 1:
        return fused(scores, iterations, epsilon, log_r, log_c)
    scores = scores.contiguous()  # the codes come back contiguous whatever the layout of the scores
    if iterations == 0:  # the globally normalised plan, without any scaling
        logits = scores.to(log_c.dtype) / epsilon
        total = _distributed_logsumexp(logits, None, world > 1)
        return torch.exp(logits - total - log_c[:, None]).to(scores.dtype)

    passes = passes_for(scores, epsilon)

    def over_ranks(local_prototype_lse):
        if world == 1:
            return local_prototype_lse
        return _distributed_logsumexp(local_prototype_lse[None], 0, True)

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
def sinkhorn_forward(
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
# DeepCluster-style k-means assignment
# ============================================================================================
# d_bk = ‖x_b‖² − 2 x_b·c_k + ‖c_k‖², minimised over blocks of k centroids with a running
# (min, argmin) — the blocks of the fused last layer above, a running minimum instead of a
# running LSE — so the (N, K) distances never exist whole. The distance returned is then made
# exactly, ‖x_b − c_{a_b}‖², free of the cancellation of the expanded form.
@torch.no_grad()
def kmeans_assign_forward(x: Tensor, centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Nearest centroid of every row: x (N, D), centroids (K, D) → (assignments (N,) int64,
    squared distances (N,), compute dtype). Ties go to the lowest centroid index."""
    dtype = compute_dtype(x, centroids)
    x, centroids = x.to(dtype), centroids.to(dtype)
    centroid_norms = centroids.pow(2).sum(dim=1)
    best = torch.full((x.shape[0],), math.inf, dtype=dtype, device=x.device)
    assignments = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    for cols in blocks(centroids.shape[0], x.shape[0]):
        partial = torch.addmm(centroid_norms[cols], x, centroids[cols].T, alpha=-2)  # d − ‖x‖²
        block_best, block_index = partial.min(dim=1)
        better = block_best < best
        best = torch.where(better, block_best, best)
        assignments = torch.where(better, block_index + cols.start, assignments)
    return assignments, (x - centroids[assignments]).pow(2).sum(dim=1)


sinkhorn = define_sinkhorn_op("sinkhorn", sinkhorn_forward)
kmeans_assign = define_kmeans_assign_op("kmeans_assign", kmeans_assign_forward)
