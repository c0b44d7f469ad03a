"""The ``torch`` backend of the regularizer family: KoLeo without the N×N cosine matrix.

Each row's nearest neighbour n(i) = argmax_{j≠i} x̂_i·x̂_j comes from blocks of rows against all
rows (about ``runtime.blocks.BLOCK_ELEMENTS`` similarities at a time, without gradient: the
choice of neighbour has none), and the loss −mean log(‖x̂_i − x̂_{n(i)} + eps‖_p + eps) from the
reference's O(N·D) expression, which autograd differentiates. Memory: O(N·D + block) instead of
N², for the same neighbours wherever no two candidates tie to rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

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
