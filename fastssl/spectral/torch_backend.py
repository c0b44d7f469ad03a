"""The ``torch`` backend of the spectral family: each loss from its smaller side, with closed-form
gradients.

* Gram identities: for Z (N, D), ZZᵀ and ZᵀZ share their nonzero eigenvalues, so
  ‖ZᵀZ‖_F = ‖ZZᵀ‖_F, logdet(I_D + cZᵀZ) = logdet(I_N + cZZᵀ) and ‖Z‖_* = Σ √λ(ZZᵀ): when N < D
  the D×D matrix is never formed (EMP-SSL's D×D logdet costs D³; from the N side it is N²D + N³).
* Closed-form gradients instead of autograd through the GEMMs that built a Gram (each GEMM's
  backward is two more): ∂‖ZZᵀ‖²_F/∂Z = 4ZZᵀZ, ∂logdet(I + cZZᵀ)/∂Z = 2c(I + cZZᵀ)⁻¹Z (one
  Cholesky solve), ∂‖Z‖_*/∂Z = (ZZᵀ)^(−1/2) Z = UVᵀ, TiCo's ∂(ρ/N Σ ẑCẑᵀ)/∂ẑ = 2ρ/N ẑS (S the
  symmetric part of C) — one GEMM
  each, attached with :func:`with_gradient`.
* Nuclear norms from the eigenvalues of the smaller Gram, formed and decomposed in float64
  (small: m² entries): its rounding (≈ n·u64·σ_max²) moves a singular value σ by at most
  ≈ √(n·u64)·σ_max, where an SVD of the float32 matrix has its own u32·σ_max.
* Hypersphere uniformity in row blocks: ‖x_i − x_j‖² = ‖x_i‖² + ‖x_j‖² − 2x_i·x_j from a GEMM per
  block and a logsumexp, never the N(N − 1)/2 pair distances of ``torch.pdist`` (whose CPU
  backward is a slow scalar loop); the backward recomputes each block once.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from .op import define_nuclear_norm_op, define_pairwise_uniformity_op

Tensor = torch.Tensor


def with_gradient(value: Tensor, x: Tensor, gradient: Tensor) -> Tensor:
    """``value`` (0-dim), which autograd differentiates with respect to ``x`` as ``gradient``
    (same shape as x): the closed form replaces the backward of the ops that computed the value.
    The two added sums are the same ops on the same numbers, so they cancel exactly."""
    gradient = gradient.detach()
    return value.detach() + (x * gradient).sum() - (x.detach() * gradient).sum()


def tico(z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor], beta: float, rho: float) -> Tuple[Tensor, Tensor]:
    """``reference.tico``: two GEMMs of N·D² (the batch covariance, which the state needs, and ẑC'),
    where autograd through ẑC' would add a third."""
    dtype = compute_dtype(z_a, z_b)
    a, b = F.normalize(z_a.to(dtype), dim=1), F.normalize(z_b.to(dtype), dim=1)
    n = a.shape[0]
    with torch.no_grad():
        batch_covariance = (a.T @ a) / n
        updated = (1 - beta) * batch_covariance if covariance is None else (
            beta * covariance.to(dtype) + (1 - beta) * batch_covariance)
        # Σ_i ẑ_i C' ẑ_iᵀ only sees C''s symmetric part S, and its gradient is 2ẑS: one GEMM
        projected = a @ (0.5 * (updated + updated.T))
    contrast = with_gradient(rho / n * (a * projected).sum(), a, (2 * rho / n) * projected)
    return 1.0 - (a * b).sum(dim=1).mean() + contrast, updated


def _smaller_gram(z: Tensor) -> Tuple[Tensor, bool]:
    """(..., m, m) Gram of the trailing (m, n) matrices from their smaller side, and whether it is
    ZZᵀ (rows) rather than ZᵀZ."""
    rows = z.shape[-2] <= z.shape[-1]
    return (z @ z.mT if rows else z.mT @ z), rows


def nuclear_norm_forward(x: Tensor) -> Tensor:
    gram, _ = _smaller_gram(x.to(torch.float64))
    return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().sum(dim=-1).to(compute_dtype(x))


def nuclear_norm_backward(grad: Tensor, x: Tensor, result: Tensor) -> Tensor:
    """UVᵀ = (ZZᵀ)^(−1/2) Z (or Z (ZᵀZ)^(−1/2)); directions whose eigenvalue is below the Gram's
    rounding (rank deficiency) get 0, as the pseudo-inverse would."""
    z = x.to(torch.float64)
    gram, rows = _smaller_gram(z)
    eigenvalues, vectors = torch.linalg.eigh(gram)
    noise = gram.shape[-1] * max(z.shape[-2:]) * torch.finfo(torch.float64).eps
    floor = noise * eigenvalues[..., -1:].clamp_min(0)
    inverse_root = torch.where(eigenvalues > floor, eigenvalues.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(),
                               torch.zeros_like(eigenvalues))
    whitening = (vectors * inverse_root[..., None, :]) @ vectors.mT
    direction = whitening @ z if rows else z @ whitening
    return (grad.to(torch.float64)[..., None, None] * direction).to(x.dtype)


nuclear_norm = define_nuclear_norm_op("nuclear_norm", nuclear_norm_forward, nuclear_norm_backward)


def mmcr(online: Tensor, momentum: Tensor, lmda: float) -> Tensor:
    """``reference.mmcr`` with eigenvalue nuclear norms (B Grams of 2k×2k and one of the centroids)."""
    dtype = compute_dtype(online, momentum)
    z = torch.cat([online.to(dtype), momentum.to(dtype)], dim=1)
    return -nuclear_norm(z.mean(dim=1)) + lmda * nuclear_norm(z).sum() / z.shape[0]


def frossl(views: Tensor, invariance_weight: float) -> Tensor:
    """``reference.frossl``: ‖K‖_F from the smaller Gram of each view (one batched GEMM), its
    gradient 4KZ (one more) instead of autograd's two; tr K = Σ ẑ² (= the number of nonzero
    columns) without forming K's diagonal."""
    dtype = compute_dtype(views)
    unit = F.normalize(views.to(dtype), p=2, dim=1)
    num_views, rows, dim = unit.shape
    with torch.no_grad():
        gram, by_rows = _smaller_gram(unit)
        squared_norm = gram.square().sum(dim=(1, 2))
        trace = unit.square().sum(dim=(1, 2))
        # ∂ log‖K‖²_F / ∂Z = 4KZ / ‖K‖²_F (K = ZZᵀ), or 4ZK / ‖K‖²_F (K = ZᵀZ)
        direction = (gram @ unit if by_rows else unit @ gram) * (4 / squared_norm)[:, None, None]
    regularization = with_gradient((squared_norm.log() - 2 * trace.log()).sum(), unit, direction)
    invariance = num_views * dim * (unit - unit.mean(dim=0)).square().mean(dim=(1, 2)).sum()
    return regularization + invariance_weight * invariance


def emp_ssl(views: Tensor, tcr_eps: float, inv_coef: float) -> Tensor:
    """``reference.emp_ssl``: logdet(I + cZZᵀ) = 2 Σ log diag(chol) from the smaller side, its
    gradient 2c(I + cZZᵀ)⁻¹Z from the same Cholesky factor."""
    dtype = compute_dtype(views)
    z = views.to(dtype)
    num_views, rows, dim = z.shape
    c = dim / (rows * tcr_eps)
    with torch.no_grad():
        gram, by_rows = _smaller_gram(z)
        identity = torch.eye(gram.shape[-1], dtype=dtype, device=z.device)
        factor = torch.linalg.cholesky(identity + c * gram)
        logdet = 2 * factor.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1)
        solved = torch.cholesky_solve(z if by_rows else z.mT, factor)
        direction = (2 * c * 0.5 / num_views) * (solved if by_rows else solved.mT)
    total_coding_rate = with_gradient(0.5 * logdet.mean(), z, direction)
    invariance = -F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()
    return total_coding_rate + inv_coef * invariance


def _negative_scaled_distances(z: Tensor, squared_norms: Tensor, rows: slice, t: float) -> Tensor:
    """−t‖z_i − z_j‖² for the rows i of ``rows`` against all j, −inf where i = j."""
    logits = torch.addmm(squared_norms[rows, None] + squared_norms[None, :], z[rows], z.T, alpha=-2)
    logits.clamp_min_(0).mul_(-t)
    own = torch.arange(rows.stop - rows.start, device=z.device)
    logits[own, own + rows.start] = float("-inf")
    return logits


def pairwise_uniformity_forward(x: Tensor, t: float) -> Tensor:
    z = x.to(compute_dtype(x))
    n = z.shape[0]
    squared_norms = z.square().sum(dim=1)
    row_logsumexp = torch.cat([torch.logsumexp(_negative_scaled_distances(z, squared_norms, rows, t), dim=1)
                               for rows in blocks(n, n)])
    # Σ_{i≠j} counts every pair twice; the mean over the N(N − 1)/2 pairs divides by N(N − 1)
    return torch.logsumexp(row_logsumexp, dim=0) - math.log(n * (n - 1))


def pairwise_uniformity_backward(grad: Tensor, x: Tensor, result: Tensor, t: float) -> Tensor:
    """∂/∂x_i = −4t Σ_j p_ij (x_i − x_j), p_ij = e^(−t d²_ij) / Σ_{k≠l} e^(−t d²_kl) (each block once)."""
    z = x.to(compute_dtype(x))
    n = z.shape[0]
    squared_norms = z.square().sum(dim=1)
    shift = result.to(z.dtype) + math.log(n * (n - 1))
    gradient = torch.empty_like(z)
    for rows in blocks(n, n):
        weights = _negative_scaled_distances(z, squared_norms, rows, t).sub_(shift).exp_()
        gradient[rows] = torch.addmm(weights.sum(dim=1, keepdim=True) * z[rows], weights, z, alpha=-1)
    return (gradient * (-4 * t * grad.to(z.dtype))).to(x.dtype)


hypersphere_uniformity = define_pairwise_uniformity_op(
    "hypersphere_uniformity", pairwise_uniformity_forward, pairwise_uniformity_backward)
