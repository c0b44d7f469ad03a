"""``F.normalize`` with its backward written out, for ops whose closed-form gradient includes the
normalisation of their inputs (no autograd graph)."""
from __future__ import annotations

from typing import NamedTuple

import torch

Tensor = torch.Tensor
NORMALIZE_EPS = 1e-12  # F.normalize's default


class Normalized(NamedTuple):
    """``F.normalize(x, dim=dim, eps=eps)`` and what its backward needs (both keepdim along ``dim``)."""
    unit: Tensor  # x / max(‖x‖, eps)
    clamped: Tensor  # max(‖x‖, eps)
    unclamped: Tensor  # ‖x‖ > eps (bool)
    dim: int


def normalize(x: Tensor, dim: int, eps: float = NORMALIZE_EPS) -> Normalized:
    """``F.normalize(x, dim=dim, eps=eps)`` (``.unit``, x's shape and dtype) with the clamped norms
    and where they are not clamped, kept for ``normalize_backward_``."""
    norms = torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    clamped = norms.clamp_min(eps)
    return Normalized(x / clamped, clamped, norms > eps, dim)


def normalize_backward_(normalized: Normalized, grad: Tensor) -> Tensor:
    """∂⟨grad, x̂⟩/∂x = (g − x̂(x̂·g))/‖x‖ (g/eps where the norm is clamped: autograd through
    ``F.normalize``'s clamp gives the same), written over ``grad`` (x's shape)."""
    unit, dim = normalized.unit, normalized.dim
    along = torch.where(normalized.unclamped, torch.linalg.vecdot(unit, grad, dim=dim).unsqueeze(dim), 0.0)
    return grad.addcmul_(unit, along, value=-1).div_(normalized.clamped)
