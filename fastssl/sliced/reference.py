"""The plain-PyTorch spec of the sliced family's core ops: lightly 1.6's formulas, written plainly
and differentiable, in float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend
is tested against them, and they against float64 formulas in the tests."""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..runtime.dtypes import compute_dtype

Tensor = torch.Tensor


def sigreg_sums(proj: Tensor, vectors: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """SIGReg's empirical characteristic function sums, as lightly's ``SIGReg``: with
    P = proj @ vectors (..., N, M) and x = P ⊗ t (..., N, M, K), Σ_n cos x and Σ_n sin x, each
    (..., M, K). Materialises x, cos x and sin x, as lightly does."""
    dtype = compute_dtype(proj)
    angles = (proj.to(dtype) @ vectors.to(dtype)).unsqueeze(-1) * t.to(dtype)
    return angles.cos().sum(-3), angles.sin().sum(-3)


def gaussian_quantiles(count: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(count,) standard Gaussian quantiles at i / (count + 1), i = 1..count, computed in float32
    as lightly's ``Normal(0, 1).icdf`` (erfinv(2p − 1)·√2), then cast to ``dtype``."""
    positions = torch.arange(start=1, end=count + 1, device=device, dtype=torch.float32) / (count + 1)
    return (torch.erfinv(2 * positions - 1) * math.sqrt(2)).to(dtype)


def visreg_shape(z: Tensor, slices: Tensor, eps: float) -> Tensor:
    """VISReg's sliced-Wasserstein shape loss, as lightly's ``visreg_shape_loss`` with its
    (D, S) unit ``slices``: z (..., N, D) centred and divided by its (detached, biased) standard
    deviation + eps over N, projected on the slices, each column sorted over N and compared with
    the Gaussian quantiles: mean of the squared differences."""
    dtype = compute_dtype(z)
    x = z.to(dtype)
    mean = x.mean(dim=-2, keepdim=True)
    std = x.std(dim=-2, unbiased=False, keepdim=True)
    projections = ((x - mean) / (std.detach() + eps)) @ slices.to(dtype)
    quantiles = gaussian_quantiles(x.shape[-2], x.device, dtype).unsqueeze(-1)
    return (projections.sort(dim=-2).values - quantiles).square().mean()
