"""The plain-PyTorch spec of the clustering family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..runtime import distributed
from ..runtime.dtypes import compute_dtype


def _distributed_logsumexp(x: torch.Tensor, dim: int, gather_distributed: bool) -> torch.Tensor:
    """logsumexp over ``dim`` (None: all elements), reduced over ranks when gathering."""
    if not (gather_distributed and distributed.world_size() > 1):
        return torch.logsumexp(x, dim=dim) if dim is not None else torch.logsumexp(x.flatten(), 0)
    m = x.amax(dim=dim) if dim is not None else x.amax()
    m = distributed.all_reduce_no_grad(m.clone(), op="max")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = x - (m_safe.unsqueeze(dim) if dim is not None else m_safe)
    total = torch.exp(shifted).sum(dim=dim) if dim is not None else torch.exp(shifted).sum()
    total = distributed.all_reduce_no_grad(total, op="sum")
    return torch.log(total) + m_safe


def marginal_logs(
    scores: torch.Tensor, row_marginals: Optional[torch.Tensor], col_marginals: Optional[torch.Tensor], world: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sinkhorn's log r (K,) and log c (B,) for (B, K) scores, each normalised to total mass 1
    (c over all ``world`` ranks); uniform when not given."""
    dtype = compute_dtype(scores)
    batch, num_prototypes = scores.shape
    if col_marginals is None:
        log_c = torch.full((batch,), -math.log(batch * world), dtype=dtype, device=scores.device)
    else:
        c = col_marginals.to(dtype)
        total = distributed.all_reduce_no_grad(c.sum(), op="sum") if world > 1 else c.sum()
        log_c = torch.log(c / total)
    if row_marginals is None:
        log_r = torch.full((num_prototypes,), -math.log(num_prototypes), dtype=dtype, device=scores.device)
    else:
        r = row_marginals.to(dtype)
        log_r = torch.log(r / r.sum())
    return log_r, log_c


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    iterations: int,
    epsilon: float,
    row_marginals: Optional[torch.Tensor],
    col_marginals: Optional[torch.Tensor],
    tolerance: float,
    gather_distributed: bool,
) -> torch.Tensor:
    """Sinkhorn-Knopp soft codes of (B, K) scores, in the log domain.

    The same iteration as SwAV / lightly, whose linear form is: Q = exp(scores/ε)ᵀ (K, B);
    Q /= ΣQ; repeat {rows of Q sum to r_k; columns sum to c_b}; return (Q / c)ᵀ, so every row of
    the result sums to 1. Defaults: r uniform, c = 1/B_total. Taking logs turns every division
    into a subtraction of a logsumexp, which never overflows (fp16 scores, ε = 0.05).

    ``row_marginals`` (K,) and ``col_marginals`` (B,) are rescaled to the same total mass. With
    ``tolerance > 0`` iterations stop early once every row sum is within ``tolerance``
    (relative) of its marginal (SeLA). With ``gather_distributed`` the row and global sums run
    over all ranks, so each rank gets its slice of the codes of the gathered batch.

    Returns (B, K) codes in the dtype of ``scores`` (float32 arithmetic inside).
    """
    log_q = scores.to(compute_dtype(scores)).T / epsilon  # (K, B)
    world = distributed.world_size() if gather_distributed else 1
    log_r, log_c = marginal_logs(scores, row_marginals, col_marginals, world)
    log_q = log_q - _distributed_logsumexp(log_q, None, gather_distributed)
    for _ in range(iterations):
        log_q = log_q - _distributed_logsumexp(log_q, 1, gather_distributed)[:, None] + log_r[:, None]
        log_q = log_q - torch.logsumexp(log_q, dim=0)[None, :] + log_c[None, :]
        if tolerance > 0:
            row_error = torch.exp(_distributed_logsumexp(log_q, 1, gather_distributed) - log_r) - 1
            if row_error.abs().max().item() < tolerance:
                break
    return torch.exp(log_q - log_c[None, :]).T.to(scores.dtype)


@torch.no_grad()
def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every row (DeepCluster's k-means assignment).

    Args: x (N, D); centroids (K, D). Returns: assignments (N,) int64 (ties: lowest index) and
    squared Euclidean distances (N,), float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(x, centroids)
    distances = torch.cdist(x.to(dtype), centroids.to(dtype), compute_mode="donot_use_mm_for_euclid_dist")
    best, assignments = distances.pow(2).min(dim=1)
    return assignments, best


@torch.no_grad()
def kmeans_update(x: torch.Tensor, centroids: torch.Tensor, counts: torch.Tensor, assignments: torch.Tensor,
                  gather_distributed: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch k-means: c_k ← (n_k c_k + Σ_{b→k} x_b) / (n_k + m_k), n_k ← n_k + m_k, the sums
    and counts added over ranks when gathering. Returns (centroids, counts) in their dtypes."""
    dtype = compute_dtype(x, centroids)
    sums = torch.zeros(centroids.shape, dtype=dtype, device=x.device).index_add_(0, assignments, x.to(dtype))
    new_rows = torch.bincount(assignments, minlength=centroids.shape[0]).to(dtype)
    if gather_distributed and distributed.world_size() > 1:
        sums = distributed.all_reduce_no_grad(sums, "sum")
        new_rows = distributed.all_reduce_no_grad(new_rows, "sum")
    total = counts.to(dtype) + new_rows
    step = (sums - new_rows[:, None] * centroids.to(dtype)) / total.clamp_min(1)[:, None]
    return (centroids.to(dtype) + step).to(centroids.dtype), (counts + new_rows.to(counts.dtype))
