"""The plain-PyTorch spec of the contrastive family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype


def l2_normalize(x: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Rows of ``x`` (N, D) scaled to unit L2 norm (``F.normalize``, eps 1e-12), computed in the
    compute dtype and returned in it, or cast once to ``dtype`` (half inputs for half kernels).

    Each row is first divided by its largest magnitude (no gradient: normalising removes any
    positive scale), so squares cannot overflow for huge inputs (fp32 rows of ~1e20).
    """
    x = x.to(compute_dtype(x))
    peak = x.detach().abs().amax(dim=1, keepdim=True)
    unit = F.normalize(x / torch.where(peak > 0, peak, torch.ones_like(peak)), dim=1)
    return unit if dtype is None else unit.to(dtype)


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


def info_nce_self_decoupled(embeddings: torch.Tensor, labels: torch.Tensor, exclude_self: bool,
                            scale: float) -> torch.Tensor:
    """Decoupled InfoNCE (DCL) of ``embeddings`` (N, D) against themselves: row losses (N,),
    the positives left out of the denominator::

        row_loss_i = logsumexp_{j ∉ P_i, j ≠ i} s_ij − mean_{j ∈ P_i} s_ij     (0 when P_i is empty)
    """
    dtype = compute_dtype(embeddings)
    z = embeddings.to(dtype)
    logits = scale * (z @ z.T)
    positive_mask = labels[:, None] == labels[None, :]
    if exclude_self:
        own = torch.eye(z.shape[0], dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(own, float("-inf"))
        positive_mask &= ~own
    count = positive_mask.sum(dim=1)
    negatives = torch.logsumexp(logits.masked_fill(positive_mask, float("-inf")), dim=1)
    positive_mean = torch.where(positive_mask, logits, torch.zeros_like(logits)).sum(dim=1) / count.clamp_min(1)
    return torch.where(count > 0, negatives - positive_mean, torch.zeros_like(negatives))


def info_nce_masked(query: torch.Tensor, keys: torch.Tensor, query_labels: torch.Tensor,
                    positive_key_labels: torch.Tensor, excluded_key_labels: torch.Tensor, row_weights: torch.Tensor,
                    scale: float, keys_gradient: bool) -> torch.Tensor:
    """Weighted InfoNCE with label-given positives and exclusions (DetCon's pooled regions): Σᵢ wᵢ ℓᵢ.

    With s_ij = scale · q_i·k_j, P_i = {j : positive_key_labels[j] == query_labels[i]} and
    E_i = {j : excluded_key_labels[j] == query_labels[i]} (disjoint from P_i)::

        ℓ_i = logsumexp_{j ∉ E_i} s_ij − mean_{j ∈ P_i} s_ij     (0 when P_i is empty)

    Args: query (N, D), keys (M, D); the labels (N,), (M,), (M,) int64; row_weights (N,) wᵢ;
        keys_gradient: whether the keys take a gradient (a backend may skip it; here autograd decides).
    Returns: 0-dim, float32 (float64 inputs: float64).
    """
    dtype = compute_dtype(query, keys)
    logits = scale * (query.to(dtype) @ keys.to(dtype).T)
    positive_mask = query_labels[:, None] == positive_key_labels[None, :]
    logits = logits.masked_fill(query_labels[:, None] == excluded_key_labels[None, :], float("-inf"))
    count = positive_mask.sum(dim=1)
    positive_mean = torch.where(positive_mask, logits, torch.zeros_like(logits)).sum(dim=1) / count.clamp_min(1)
    rows = torch.where(count > 0, torch.logsumexp(logits, dim=1) - positive_mean, torch.zeros_like(positive_mean))
    return (row_weights.to(dtype) * rows).sum()
