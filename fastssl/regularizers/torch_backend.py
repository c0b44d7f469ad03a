"""The ``torch`` backend of the regularizer family: KoLeo without the N×N cosine matrix, CO2 in
checkpointed row blocks.

Each row's nearest neighbour n(i) = argmax_{j≠i} x̂_i·x̂_j comes from blocks of rows against all
rows (about ``runtime.blocks.BLOCK_ELEMENTS`` similarities at a time, without gradient: the
choice of neighbour has none), and the loss −mean log(‖x̂_i − x̂_{n(i)} + eps‖_p + eps) from the
reference's O(N·D) expression, which autograd differentiates. Memory: O(N·D + block) instead of
N², for the same neighbours wherever no two candidates tie to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from .reference import koleo_from_neighbours

Tensor = torch.Tensor


@torch.no_grad()
def nearest_other_rows(x: Tensor) -> Tensor:
    """(N,) int64: for each unit row of ``x`` (N, D), the other row of largest dot product (itself
    for N = 1, as the reference's −2 on the diagonal gives)."""
    neighbours = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for rows in blocks(x.shape[0], x.shape[0]):
        similarity = x[rows] @ x.T
        similarity[torch.arange(similarity.shape[0], device=x.device), torch.arange(rows.start, rows.stop,
                                                                                     device=x.device)] = -2
        neighbours[rows] = similarity.argmax(dim=1)
    return neighbours


def koleo(x: Tensor, p: float, eps: float) -> Tensor:
    """``reference.koleo``'s signature and result."""
    x = F.normalize(x.to(compute_dtype(x)), p=2, dim=-1, eps=eps)
    return koleo_from_neighbours(x, nearest_other_rows(x), p, eps)


def _block_divergence(x0: Tensor, x1: Tensor, negatives: Optional[Tensor], rows: slice, scale: float) -> Tensor:
    """Σ over ``rows`` of KL(q_i‖p_i) + KL(p_i‖q_i). Without a bank, row i's candidates are every
    row of the other view with the positive at j = i: the same classes as lightly's [positive,
    others in order], permuted alike in p and q, which the KL does not see."""
    a0, a1 = x0[rows], x1[rows]
    if negatives is None:
        p = F.log_softmax(scale * (a0 @ x1.T), dim=-1)
        q = F.log_softmax(scale * (a1 @ x0.T), dim=-1)
    else:
        positive = (a0 * a1).sum(dim=1, keepdim=True)
        p = F.log_softmax(scale * torch.cat([positive, a0 @ negatives.T], dim=1), dim=-1)
        q = F.log_softmax(scale * torch.cat([positive, a1 @ negatives.T], dim=1), dim=-1)
    difference = q - p
    return (difference * (q.exp() - p.exp())).sum()


def co2(x0: Tensor, x1: Tensor, negatives: Optional[Tensor], alpha: float, scale: float) -> Tensor:
    """``reference.co2`` in blocks of rows, each recomputed in the backward (checkpointed): O(block)
    memory instead of the N × N (or N × K) log-probabilities twice over, and no masked copy of
    the off-diagonal logits."""
    dtype = compute_dtype(x0, x1)
    x0, x1 = x0.to(dtype), x1.to(dtype)
    bank = None if negatives is None else negatives.to(dtype)
    candidates = x0.shape[0] if bank is None else bank.shape[0] + 1
    recompute = torch.is_grad_enabled() and (x0.requires_grad or x1.requires_grad)
    total = x0.new_zeros(())
    for rows in blocks(x0.shape[0], candidates):
        if recompute:
            total = total + checkpoint(_block_divergence, x0, x1, bank, rows, scale, use_reentrant=False)
        else:
            total = total + _block_divergence(x0, x1, bank, rows, scale)
    return alpha * 0.5 * total / x0.shape[0]
