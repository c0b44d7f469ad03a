"""The plain-PyTorch specification of every fastssl loss.

These functions are the spec: obvious, differentiable, and computed in float32 (float64 inputs
stay float64, so ``gradcheck`` works). Every faster backend is tested against them. They
materialise every intermediate (N×M logits, D×D correlations), so they are the slowest and
largest backend; they are also the one that always works.

The *core* functions here (``info_nce``, ``barlow_twins``, ``vicreg_variance_covariance``,
``sinkhorn``, ``soft_cross_entropy_pairs``, ``negative_cosine_similarity``) take already
validated, flattened tensors; ``fastssl.functional`` composes them into the public losses and is
the same for every backend.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import distributed


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def max_exp_span(dtype: torch.dtype) -> float:
    """−½ log(tiny): exp() of any argument in [−span, 0] is ≥ sqrt(tiny), so it and its products
    with numbers ≥ sqrt(tiny) are normal numbers (arithmetic on subnormals is ~20× slower on CPUs)."""
    return -0.5 * math.log(torch.finfo(dtype).tiny)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (N, D) scaled to unit L2 norm, in the compute dtype (``F.normalize``, eps 1e-12).

    Each row is first divided by its largest magnitude (no gradient: normalising removes any
    positive scale), so squares cannot overflow for huge inputs (fp32 rows of ~1e20).
    """
    x = x.to(compute_dtype(x))
    peak = x.detach().abs().amax(dim=1, keepdim=True)
    return F.normalize(x / torch.where(peak > 0, peak, torch.ones_like(peak)), dim=1)


# --------------------------------------------------------------------------------------------
# Contrastive: NT-Xent / InfoNCE
# --------------------------------------------------------------------------------------------
def info_nce(
    query: torch.Tensor,
    keys: torch.Tensor,
    positive_keys: Optional[torch.Tensor],
    query_labels: Optional[torch.Tensor],
    key_labels: Optional[torch.Tensor],
    self_index: Optional[torch.Tensor],
    scale: float,
    symmetric: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-row (and per-column) InfoNCE losses.

    With s_ij = scale · q_i·k_j (entries j = self_index[i] removed, when given):

    * ``positive_keys`` given (N, D): each row gets one extra logit s_i+ = scale · q_i·p_i, its
      only positive, and the keys are all negatives (MoCo / memory bank)::

          row_loss_i = logsumexp([s_i+, s_i1, ..., s_iM]) - s_i+

    * otherwise the positives of row i are P_i = {j : key_labels[j] == query_labels[i], j not
      self}; several positives are averaged outside the log (SupCon "L_out")::

          row_loss_i = logsumexp_j s_ij - mean_{j in P_i} s_ij       (0 when P_i is empty)

      and with ``symmetric`` the same per column (CLIP): col_loss_j over the rows.

    Args:
        query: (N, D). keys: (M, D). positive_keys: (N, D) or None.
        query_labels: (N,) int, key_labels: (M,) int (required without positive_keys).
        self_index: (N,) int64, the key index of row i's own entry (-1 for none), or None.
    Returns:
        row_loss (N,), col_loss (M,) when ``symmetric`` else (0,); float32 (float64 inputs: float64).
    """
    dtype = compute_dtype(query, keys, positive_keys)
    logits = scale * (query.to(dtype) @ keys.to(dtype).T)
    self_mask = None
    if self_index is not None:
        rows = torch.arange(query.shape[0], device=query.device)
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        has_self = self_index >= 0
        self_mask[rows[has_self], self_index[has_self]] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
    empty = logits.new_zeros(0)

    # -log_softmax, not logsumexp - positive: at low temperature both terms are ~1/τ and their
    # difference would lose every digit of a small loss.
    if positive_keys is not None:
        positive = scale * (query.to(dtype) * positive_keys.to(dtype)).sum(dim=1, keepdim=True)
        return -F.log_softmax(torch.cat([positive, logits], dim=1), dim=1)[:, 0], empty

    positive_mask = query_labels[:, None] == key_labels[None, :]
    if self_mask is not None:
        positive_mask &= ~self_mask

    def side_loss(dim: int) -> torch.Tensor:
        log_probs = F.log_softmax(logits, dim=dim)
        count = positive_mask.sum(dim)
        positive_sum = torch.where(positive_mask, log_probs, torch.zeros_like(log_probs)).sum(dim)
        return -positive_sum / count.clamp_min(1)  # 0 for rows without a positive

    return side_loss(1), (side_loss(0) if symmetric else empty)


def info_nce_self(embeddings: torch.Tensor, labels: torch.Tensor, exclude_self: bool, scale: float) -> torch.Tensor:
    """InfoNCE of ``embeddings`` (N, D) against themselves (SimCLR): row losses (N,).

    ``info_nce(z, z, None, labels, labels, arange(N) if exclude_self else None, scale, False)``;
    a separate op because keys that *are* the queries let a backend halve its work.
    """
    self_index = torch.arange(embeddings.shape[0], device=embeddings.device) if exclude_self else None
    return info_nce(embeddings, embeddings, None, labels, labels, self_index, scale, False)[0]


# --------------------------------------------------------------------------------------------
# Redundancy reduction: Barlow Twins, VICReg
# --------------------------------------------------------------------------------------------
def batch_normalize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(z - mean) / sqrt(biased var + eps) over the batch (dim 0), as ``F.batch_norm`` in training."""
    mean = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_from_correlation(c: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 for a (D, D) cross-correlation."""
    diagonal = torch.diagonal(c)
    off_diagonal_sq = c.pow(2).sum() - diagonal.pow(2).sum()
    return (1 - diagonal).pow(2).sum() + lambda_param * off_diagonal_sq


def barlow_twins(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """Barlow Twins on (N, D) views: each view batch-normalised, C = z_aᵀ z_b / N (D, D).

    Returns a 0-dim float32 loss (float64 for float64 inputs).
    """
    dtype = compute_dtype(z_a, z_b)
    za = batch_normalize(z_a.to(dtype))
    zb = batch_normalize(z_b.to(dtype))
    c = za.T @ zb / z_a.shape[0]
    return barlow_twins_from_correlation(c, lambda_param)


def vicreg_variance_covariance(z_a: torch.Tensor, z_b: torch.Tensor, eps: float) -> torch.Tensor:
    """VICReg's variance and covariance terms of two (B, G, D) views (G groups, 1 for 2-D input).

    variance   = ½ Σ_views mean_{g,d} relu(1 - sqrt(Var_unbiased_b(z)_{g,d} + eps))
    covariance = Σ_views mean_g Σ_{c≠d} Cov_g(z)_{cd}² / D,  Cov_g = z̄_gᵀ z̄_g / (B - 1)

    Returns a (2,) tensor [variance, covariance], float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(z_a, z_b)
    variance = 0.0
    covariance = 0.0
    for z in (z_a.to(dtype), z_b.to(dtype)):
        batch, dim = z.shape[0], z.shape[-1]
        std = torch.sqrt(z.var(dim=0) + eps)
        variance = variance + 0.5 * F.relu(1 - std).mean()
        centred = z - z.mean(dim=0)
        cov = torch.einsum("bgc,bgd->gcd", centred, centred) / (batch - 1)
        off_diagonal_sq = cov.pow(2).sum(dim=(1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(-1)
        covariance = covariance + (off_diagonal_sq / dim).mean()
    return torch.stack([variance, covariance])


# --------------------------------------------------------------------------------------------
# Clustering & distillation: Sinkhorn-Knopp, SwAV, DINO
# --------------------------------------------------------------------------------------------
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


def soft_cross_entropy_pairs(targets: torch.Tensor, logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy of every (target crop t, student crop s) pair.

    loss[t, s] = -mean_b Σ_k targets[t, b, k] · log_softmax(scale · logits[s, b])_k

    Args: targets (T, B, K) probabilities; logits (S, B, K); scale = 1/student temperature.
    Returns: (T, S) float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(targets, logits)
    log_p = F.log_softmax(scale * logits.to(dtype), dim=-1)
    return -torch.einsum("tbk,sbk->ts", targets.to(dtype), log_p) / logits.shape[1]


def linear_soft_cross_entropy_pairs(targets: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                    scale: float) -> torch.Tensor:
    """``soft_cross_entropy_pairs(targets, features @ weightᵀ, scale)``: the last linear layer
    (SwAV prototypes, DINO head) applied to the student crops.

    Args: targets (T, B, K); features (S, B, D); weight (K, D). Returns: (T, S), as above.
    """
    dtype = compute_dtype(targets, features, weight)
    return soft_cross_entropy_pairs(targets, features.to(dtype) @ weight.to(dtype).T, scale)


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


# --------------------------------------------------------------------------------------------
# BYOL / SimSiam
# --------------------------------------------------------------------------------------------
def negative_cosine_similarity(x0: torch.Tensor, x1: torch.Tensor, eps: float) -> torch.Tensor:
    """-mean_i cos(x0_i, x1_i) of (N, D) inputs, cos = x0·x1 / (max(|x0|, eps) · max(|x1|, eps))."""
    dtype = compute_dtype(x0, x1)
    return -F.cosine_similarity(x0.to(dtype), x1.to(dtype), dim=1, eps=eps).mean()
