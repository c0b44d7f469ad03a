"""The ``torch`` backend of the regularizer family: KoLeo without the N×N cosine matrix, CO2 in
row blocks with its closed-form gradient.

Each row's nearest neighbour n(i) = argmax_{j≠i} x̂_i·x̂_j comes from blocks of rows against all
rows (about ``runtime.blocks.BLOCK_ELEMENTS`` similarities at a time, without gradient: the
choice of neighbour has none), and the loss −mean log(‖x̂_i − x̂_{n(i)} + eps‖_p + eps) from the
reference's O(N·D) expression, which autograd differentiates. Memory: O(N·D + block) instead of
N², for the same neighbours wherever no two candidates tie to rounding.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime import library
from ..runtime.blocks import blocks
from ..runtime.library import define_precomputed_gradient_op
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


def _divergence_logit_grads(p: Tensor, q: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """p, q: (rows, K) log-softmaxes → (Σ over the rows, (rows, K), (rows, K)). Per row KL(q‖p) + KL(p‖q) = Σ_k (q_k − p_k)(Q_k − P_k) of log-softmaxes p, q (P = e^p,
    Q = e^q), and its gradients with respect to the logits behind p and q: with
    g = ∂/∂p = −(Q − P) − (q − p)P and h = ∂/∂q = (Q − P) + (q − p)Q, through the log-softmax
    ∂/∂s = g − P Σg and ∂/∂t = h − Q Σh."""
    big_p, big_q = p.exp(), q.exp()
    difference, mass = q - p, big_q - big_p
    g = -mass - difference * big_p
    h = mass + difference * big_q
    return ((difference * mass).sum(), g - big_p * g.sum(dim=1, keepdim=True),
            h - big_q * h.sum(dim=1, keepdim=True))


def co2_forward(x0: Tensor, x1: Tensor, negatives: Optional[Tensor], alpha: float, scale: float,
                with_gradient: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """x0, x1: (N, D) unit rows; negatives: (K, D) or None → (loss, ∂/∂x0, ∂/∂x1) in the compute dtype.

    ``reference.co2`` in blocks of rows, with its closed-form gradient from the same blocks: O(block)
    memory, where autograd would keep the N × N (or N × K) log-probabilities twice over. Without a
    bank, row i's candidates are every row of the other view with the positive at j = i: the same
    classes as lightly's [positive, others in order], permuted alike in p and q, which the KL does
    not see. The bank takes no gradient (lightly detaches it)."""
    dtype = compute_dtype(x0, x1)
    a, b = x0.to(dtype), x1.to(dtype)
    bank = None if negatives is None else negatives.to(dtype)
    n = a.shape[0]
    candidates = n if bank is None else bank.shape[0] + 1
    total = a.new_zeros(())
    grad_a, grad_b = (torch.zeros_like(a), torch.zeros_like(b)) if with_gradient else (None, None)
    for rows in blocks(n, candidates):
        a_rows, b_rows = a[rows], b[rows]
        if bank is None:
            logits_p, logits_q = a_rows @ b.T, b_rows @ a.T
        else:
            positive = (a_rows * b_rows).sum(dim=1, keepdim=True)
            logits_p = torch.cat([positive, a_rows @ bank.T], dim=1)
            logits_q = torch.cat([positive, b_rows @ bank.T], dim=1)
        block_total, g_p, g_q = _divergence_logit_grads(F.log_softmax(scale * logits_p, dim=-1),
                                                        F.log_softmax(scale * logits_q, dim=-1))
        total = total + block_total
        if not with_gradient:
            continue
        if bank is None:  # s_p = a_rows·bᵀ, s_q = b_rows·aᵀ
            grad_a[rows] += g_p @ b
            grad_b += g_p.T @ a_rows
            grad_b[rows] += g_q @ a
            grad_a += g_q.T @ b_rows
        else:  # the positive column is shared by both, the bank's columns only feed their own side
            positive_weight = (g_p[:, :1] + g_q[:, :1])
            grad_a[rows] += positive_weight * b_rows + g_p[:, 1:] @ bank
            grad_b[rows] += positive_weight * a_rows + g_q[:, 1:] @ bank
    factor = alpha * 0.5 / n
    if not with_gradient:
        return factor * total, library.empty_grad(x0), library.empty_grad(x1)
    return factor * total, grad_a.mul_(factor * scale), grad_b.mul_(factor * scale)


def _co2_fake(x0, x1, negatives, alpha, scale, with_gradient):
    dtype = compute_dtype(x0, x1)
    return (x0.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (x0, x1), dtype))


co2 = define_precomputed_gradient_op("co2", "Tensor x0, Tensor x1, Tensor? negatives, float alpha, float scale",
                                     2, 0, co2_forward, _co2_fake)
