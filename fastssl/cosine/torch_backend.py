"""The ``torch`` backend of the cosine family: the reference's value and its closed-form gradient,
both from one pass of row norms and row dots.

For rows u = x0_i, v = x1_i with norms ‖u‖, ‖v‖, clamped norms m_u = max(‖u‖, eps), m_v, and
cos = u·v / (m_u m_v), the loss is L = −mean_i cos_i and

    ∂cos/∂u = v / (m_u m_v) − cos · u / (m_u ‖u‖)        (the second term 0 where u = 0)

which is exactly what autograd differentiates through ``F.cosine_similarity`` (its clamp runs on
the norm without gradient, so the norm's own derivative u/‖u‖ stays unclamped). The gradients are
formed in the forward, only those asked for (``runtime.library.define_needed_gradients_op``): two norms, one row dot
and two fused multiply-adds per input over the (N, D) rows, no autograd graph and no recompute —
autograd through ``F.cosine_similarity`` makes about twice as many passes.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype
from . import reference
from .op import define_negative_cosine_op

Tensor = torch.Tensor


def _scaled_cosine_gradient(u: Tensor, v: Tensor, pair_scale: Tensor, self_scale: Tensor) -> Tensor:
    """pair_scale · v − self_scale · u (N, D): the loss's gradient for the rows u, given
    pair_scale = −1/(N m_u m_v) and self_scale = −cos/(N m_u ‖u‖) (0 where u = 0), both (N, 1)."""
    return torch.addcmul(v * pair_scale, u, self_scale, value=-1)


def _self_scale(cos: Tensor, norm: Tensor, clamped: Tensor, mean_scale: float) -> Tensor:
    # where ‖u‖ = 0 the branch not taken divides 0 by 0; no graph runs through it
    return torch.where(norm > 0, cos * mean_scale / (clamped * norm), 0.0)


def negative_cosine_similarity_forward(x0: Tensor, x1: Tensor, eps: float,
                                       needs_grad: Optional[List[bool]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(−mean_i cos_i, ∂/∂x0, ∂/∂x1) of (N, D) rows, in the compute dtype (an empty gradient for
    an input ``needs_grad`` does not flag; None: both)."""
    dtype = compute_dtype(x0, x1)
    u, v = x0.to(dtype), x1.to(dtype)
    norm_u = torch.linalg.vector_norm(u, dim=1, keepdim=True)
    norm_v = torch.linalg.vector_norm(v, dim=1, keepdim=True)
    clamped_u, clamped_v = norm_u.clamp_min(eps), norm_v.clamp_min(eps)
    clamped_product = clamped_u * clamped_v
    cos = torch.linalg.vecdot(u, v, dim=1).unsqueeze(1) / clamped_product
    loss = -cos.mean()
    need_u, need_v = needs_grad if needs_grad is not None else (True, True)
    if not (need_u or need_v):
        return loss, library.empty_grad(u), library.empty_grad(v)
    mean_scale = -1.0 / u.shape[0]
    pair_scale = mean_scale / clamped_product
    return (loss,
            _scaled_cosine_gradient(u, v, pair_scale, _self_scale(cos, norm_u, clamped_u, mean_scale)) if need_u
            else library.empty_grad(u),
            _scaled_cosine_gradient(v, u, pair_scale, _self_scale(cos, norm_v, clamped_v, mean_scale)) if need_v
            else library.empty_grad(v))


_fused_negative_cosine_similarity = define_negative_cosine_op("negative_cosine_similarity",
                                                              negative_cosine_similarity_forward)

# Up to this many entries per input a call runs the plain PyTorch code (``reference``: autograd
# through ``F.cosine_similarity``, lightly's own code) instead of the op: there the op's fixed cost
# (its autograd function, ~0.1 ms) exceeds the passes it saves. Measured with ``python -m
# bench.sweep --family byol`` (Xeon AVX-512, D=256, target detached, lightly's time / the op's):
# 0.71 at 128 rows, 0.97 at 256, 1.25 at 512, 1.58 at 1024 (1 thread); 0.70, 0.69, 1.03, 1.25 (2).
PLAIN_MAX_ENTRIES = 256 * 256


def negative_cosine_similarity(x0: Tensor, x1: Tensor, eps: float) -> Tensor:
    """−mean cos of (N, D) rows (``reference``'s signature): the op, or the plain code when small."""
    if x0.numel() <= PLAIN_MAX_ENTRIES:
        return reference.negative_cosine_similarity(x0, x1, eps)
    return _fused_negative_cosine_similarity(x0, x1, eps)


negative_cosine_similarity.op = _fused_negative_cosine_similarity.op
