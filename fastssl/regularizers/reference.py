"""The plain-PyTorch spec of the regularizer family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype


def koleo_from_neighbours(x: torch.Tensor, neighbours: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """−mean log(‖x_i − x_{n(i)} + eps‖_p + eps) of unit rows ``x`` (N, D) and their neighbours (N,)."""
    return -(F.pairwise_distance(x, x[neighbours], p=p, eps=eps) + eps).log().mean()


def koleo(x: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """lightly's KoLeo on (N, D) rows: neighbours by the full N×N cosine matrix (diagonal −2)."""
    x = F.normalize(x.to(compute_dtype(x)), p=2, dim=-1, eps=eps)
    cosine = (x @ x.T).detach()
    cosine = cosine.masked_fill(torch.eye(x.shape[0], dtype=torch.bool, device=x.device), -2)  # not itself
    return koleo_from_neighbours(x, cosine.argmax(dim=1), p, eps)


def _consistency_log_labels(a: torch.Tensor, b: torch.Tensor, negatives, scale: float) -> torch.Tensor:
    """log_softmax of [a_i·b_i, a_i·(negatives)] · scale per row: the negatives are the other rows
    of ``b`` (N − 1, diagonal removed, in order) or a memory bank (K, D)."""
    positive = (a * b).sum(dim=1, keepdim=True)
    if negatives is None:
        others = ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        negative = (a @ b.T).masked_select(others).view(a.shape[0], a.shape[0] - 1)
    else:
        negative = a @ negatives.T
    return F.log_softmax(torch.cat([positive, negative], dim=1) * scale, dim=-1)


def co2(x0: torch.Tensor, x1: torch.Tensor, negatives, alpha: float, scale: float) -> torch.Tensor:
    """CO2's consistency (Wei et al., 2021), lightly's ``CO2Regularizer`` on unit rows (N, D): the
    symmetric KL divergence, batch mean, between the pseudo-label distributions of x0 against x1
    and of x1 against x0, times α/2. ``negatives``: a bank (K, D) or None (the batch)."""
    dtype = compute_dtype(x0, x1)
    x0, x1 = x0.to(dtype), x1.to(dtype)
    bank = None if negatives is None else negatives.to(dtype)
    p = _consistency_log_labels(x0, x1, bank, scale)
    q = _consistency_log_labels(x1, x0, bank, scale)
    divergence = F.kl_div(p, q, reduction="batchmean", log_target=True) + F.kl_div(q, p, reduction="batchmean",
                                                                                  log_target=True)
    return alpha * 0.5 * divergence
