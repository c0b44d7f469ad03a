"""The plain-PyTorch spec of the cosine family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype


def negative_cosine_similarity(x0: torch.Tensor, x1: torch.Tensor, eps: float) -> torch.Tensor:
    """-mean_i cos(x0_i, x1_i) of (N, D) inputs, cos = x0·x1 / (max(|x0|, eps) · max(|x1|, eps))."""
    dtype = compute_dtype(x0, x1)
    return -F.cosine_similarity(x0.to(dtype), x1.to(dtype), dim=1, eps=eps).mean()
