"""The ``torch`` backend of the sliced family: SIGReg's characteristic-function sums and VISReg's
sliced-Wasserstein shape loss without the (N, M, knots) and (N, S) autograd state.

* SIGReg: P = proj @ A once (N·D·M), then for blocks of knots t_k the angles t_k·P, their cos and
  sin summed over N: O(N·M) temporaries (``runtime.blocks``), where lightly's autograd keeps the
  (N, M, K) angles, cosines and sines. The backward has a closed form: with G^c, G^s the gradients
  of the cos and sin sums (…, M, K),

      ∂L/∂P_nm = Σ_k t_k (G^s_mk cos(t_k P_nm) − G^c_mk sin(t_k P_nm)),   ∂L/∂proj = ∂L/∂P · Aᵀ

  recomputed from the saved P knot block by knot block (one more sin and cos per entry, no
  (N, M, K) tensor). The sums are the op's outputs, so a caller can all-reduce them (with
  gradient) between the op and the loss: lightly's ``gather_distributed``.
* VISReg's shape loss: the normalised embeddings once (N·D), then blocks of slices: each block's
  projections sorted over N, the residuals against the Gaussian quantiles written back in the
  projections' places (the sort's backward, ``scatter_``), and ∂L/∂ẑ accumulated with one GEMM per
  block; the normalisation's backward (centring, the detached scale) closes it. The loss and its
  gradient in the forward (``runtime.library.define_precomputed_gradient_op``): no autograd graph.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..runtime import library
from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from ..runtime.library import define_precomputed_gradient_op
from .reference import gaussian_quantiles

Tensor = torch.Tensor


def _knot_angles(projections: Tensor, frequencies: Tensor, knots: slice) -> Tensor:
    """t_k·P for the knots of ``knots``: (..., k, N, M), the same products as lightly's P ⊗ t."""
    return projections.unsqueeze(-3) * frequencies[knots, None, None]


def sigreg_sums_forward(proj: Tensor, vectors: Tensor, t: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """proj (..., N, C), vectors (C, M), t (K,) → (Σ_n cos, Σ_n sin (..., M, K), P (..., N, M)),
    compute dtype; P is returned for the backward."""
    dtype = compute_dtype(proj)
    projections = torch.matmul(proj.to(dtype), vectors.to(dtype))
    frequencies = t.to(dtype)
    cos_parts, sin_parts = [], []
    for knots in blocks(frequencies.shape[0], projections.numel()):
        angles = _knot_angles(projections, frequencies, knots)
        cos_parts.append(angles.cos().sum(dim=-2))
        sin_parts.append(angles.sin_().sum(dim=-2))
    return (torch.cat(cos_parts, dim=-2).transpose(-1, -2).contiguous(),
            torch.cat(sin_parts, dim=-2).transpose(-1, -2).contiguous(), projections)


def sigreg_sums_backward(grad_cos: Tensor, grad_sin: Tensor, projections: Tensor, vectors: Tensor,
                         t: Tensor) -> Tensor:
    """∂L/∂proj (..., N, C) in the compute dtype from the sums' gradients (..., M, K) and the saved P."""
    frequencies = t.to(projections.dtype)
    weighted_cos = (grad_cos.to(projections.dtype) * frequencies).transpose(-1, -2)  # (..., K, M): t_k G^c
    weighted_sin = (grad_sin.to(projections.dtype) * frequencies).transpose(-1, -2)
    grad_projections = torch.zeros_like(projections)
    for knots in blocks(frequencies.shape[0], projections.numel()):
        angles = _knot_angles(projections, frequencies, knots)
        terms = angles.cos().mul_(weighted_sin[..., knots, None, :])
        terms.addcmul_(angles.sin_(), weighted_cos[..., knots, None, :], value=-1)
        grad_projections += terms.sum(dim=-3)
    return torch.matmul(grad_projections, vectors.to(projections.dtype).T)


def _sigreg_sums_fake(proj, vectors, t):
    dtype = compute_dtype(proj)
    sums = proj.new_empty(proj.shape[:-2] + (vectors.shape[1], t.shape[0]), dtype=dtype)
    return sums, torch.empty_like(sums), proj.new_empty(proj.shape[:-1] + (vectors.shape[1],), dtype=dtype)


_sigreg_sums_op = library.define("sigreg_sums", "(Tensor proj, Tensor vectors, Tensor t) -> (Tensor, Tensor, Tensor)",
                                 sigreg_sums_forward, _sigreg_sums_fake)
_sigreg_sums_backward_op = library.define(
    "sigreg_sums_backward", "(Tensor grad_cos, Tensor grad_sin, Tensor projections, Tensor vectors, Tensor t) -> Tensor",
    sigreg_sums_backward, lambda grad_cos, grad_sin, projections, vectors, t: projections.new_empty(
        projections.shape[:-1] + (vectors.shape[0],)))


def _sigreg_setup_context(ctx, inputs, output):
    proj, vectors, t = inputs
    ctx.proj_dtype = proj.dtype
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(output[2], vectors, t)


def _sigreg_autograd_backward(ctx, grad_cos, grad_sin, _grad_projections):
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():  # the backward op has no autograd itself
        raise RuntimeError("fastssl::sigreg_sums is differentiable once: its backward is a closed-form op without a "
                           "graph, so backward(create_graph=True) through it is not supported")
    projections, vectors, t = ctx.saved_tensors
    grad_proj = _sigreg_sums_backward_op(grad_cos, grad_sin, projections, vectors, t)
    return grad_proj.to(ctx.proj_dtype), None, None


library.register_autograd(_sigreg_sums_op, _sigreg_autograd_backward, _sigreg_setup_context)


def sigreg_sums(proj: Tensor, vectors: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
    """``reference.sigreg_sums``' signature and result: the op's two sums."""
    cos_sum, sin_sum, _ = _sigreg_sums_op(proj, vectors, t)
    return cos_sum, sin_sum


sigreg_sums.op = _sigreg_sums_op


def visreg_shape_forward(z: Tensor, slices: Tensor, eps: float, with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """``reference.visreg_shape`` and, with the gradient, ∂L/∂z (compute dtype): for residuals
    r = sort(P) − q of P = ẑ·S, ∂L/∂P = 2r/count at each entry's sorted place, ∂L/∂ẑ = ∂L/∂P·Sᵀ and,
    ẑ = (z − mean)/(std + eps) with the std detached, ∂L/∂z = (∂L/∂ẑ − mean_N ∂L/∂ẑ)/(std + eps)."""
    dtype = compute_dtype(z)
    x = z.to(dtype)
    rows, num_slices = x.shape[-2], slices.shape[1]
    normalized = x - x.mean(dim=-2, keepdim=True)
    # the biased std from the centred rows: a third of ``std``'s (Welford) time over the strided dim
    scale = normalized.square().mean(dim=-2, keepdim=True).sqrt_().add_(eps)
    normalized.div_(scale)
    quantiles = gaussian_quantiles(rows, x.device, dtype)
    directions = slices.to(dtype)
    total = x.new_zeros(())
    # every view's rows in one (R, D) matrix, so each block of slices is one GEMM each way (a
    # batched matmul of a 2-D block would copy it per view)
    flat = normalized.reshape(-1, normalized.shape[-1])
    grad_flat = torch.zeros_like(flat) if with_gradient else None
    for columns in blocks(num_slices, flat.shape[0]):
        block = directions[:, columns]
        projected = (block.T @ flat.T).view(-1, rows)  # (s·views, N): each slice's projections of a view contiguous
        values, order = projected.sort(dim=-1)
        residuals = values.sub_(quantiles)
        total = total + torch.linalg.vector_norm(residuals).square()
        if with_gradient:
            grad_flat += projected.scatter_(-1, order, residuals).view(block.shape[1], -1).T @ block.T
    count = flat.shape[0] * num_slices
    loss = total / count
    if not with_gradient:
        return loss, library.empty_grad(z)
    grad_normalized = grad_flat.view(normalized.shape).mul_(2.0 / count)
    return loss, grad_normalized.sub_(grad_normalized.mean(dim=-2, keepdim=True)).div_(scale)


def _visreg_shape_fake(z, slices, eps, with_gradient):
    dtype = compute_dtype(z)
    return (z.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (z,), dtype))


visreg_shape = define_precomputed_gradient_op("visreg_shape", "Tensor z, Tensor slices, float eps", 1, 0,
                                              visreg_shape_forward, _visreg_shape_fake)
