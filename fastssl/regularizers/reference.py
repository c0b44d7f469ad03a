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
