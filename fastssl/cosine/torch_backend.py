"""The ``torch`` backend of the cosine family: the reference's forward and its closed-form gradient.

For rows u = x0_i, v = x1_i with norms ‖u‖, ‖v‖, clamped norms m_u = max(‖u‖, eps), m_v, and
cos = u·v / (m_u m_v), the loss is L = −mean_i cos_i and

    ∂cos/∂u = v / (m_u m_v) − cos · u / (m_u ‖u‖)        (the second term 0 where u = 0)

which is exactly what autograd differentiates through ``F.cosine_similarity`` (its clamp runs on
the norm without gradient, so the norm's own derivative u/‖u‖ stays unclamped). Written out, the
backward saves nothing but the inputs and builds no autograd graph.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..runtime.dtypes import compute_dtype
from .op import define_negative_cosine_op
from .reference import negative_cosine_similarity as negative_cosine_similarity_forward

Tensor = torch.Tensor


def _cosine_gradient(u: Tensor, v: Tensor, cos: Tensor, eps: float) -> Tensor:
    """∂cos_i/∂u_i (N, D), for rows u, v (N, D) in the compute dtype and cos (N, 1)."""
    norm_u, norm_v = u.norm(dim=1, keepdim=True), v.norm(dim=1, keepdim=True)
    clamped_u, clamped_v = norm_u.clamp_min(eps), norm_v.clamp_min(eps)
    own = torch.where(norm_u > 0, cos / (clamped_u * norm_u.clamp_min(torch.finfo(u.dtype).tiny)), torch.zeros_like(cos))
    return v / (clamped_u * clamped_v) - own * u


def negative_cosine_similarity_backward(grad: Tensor, x0: Tensor, x1: Tensor, eps: float) -> Tuple[Tensor, Tensor]:
    dtype = compute_dtype(x0, x1)
    u, v = x0.to(dtype), x1.to(dtype)
    cos = torch.nn.functional.cosine_similarity(u, v, dim=1, eps=eps)[:, None]
    scale = -grad.to(dtype) / u.shape[0]
    return ((scale * _cosine_gradient(u, v, cos, eps)).to(x0.dtype),
            (scale * _cosine_gradient(v, u, cos, eps)).to(x1.dtype))


negative_cosine_similarity = define_negative_cosine_op(
    "negative_cosine_similarity", negative_cosine_similarity_forward, negative_cosine_similarity_backward)
