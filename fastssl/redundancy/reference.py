"""The plain-PyTorch spec of the redundancy family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..runtime import distributed
from ..runtime.dtypes import compute_dtype


def batch_normalize(z: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """(z - mean) / sqrt(biased var + eps) over the batch (dim 0), as ``F.batch_norm`` in training."""
    mean = z.mean(dim=0)
    var = z.var(dim=0, unbiased=False)
    return (z - mean) / torch.sqrt(var + eps)


def barlow_twins_from_correlation(c: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 for a (D, D) cross-correlation."""
    diagonal = torch.diagonal(c)
    off_diagonal_sq = c.pow(2).sum() - diagonal.pow(2).sum()
    return (1 - diagonal).pow(2).sum() + lambda_param * off_diagonal_sq


def barlow_twins(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float) -> torch.Tensor:
    """Barlow Twins on (N, D) views: each view batch-normalised, C = z_aᵀ z_b / N (D, D).

    Returns a 0-dim float32 loss (float64 for float64 inputs).
    """
    dtype = compute_dtype(z_a, z_b)
    za = batch_normalize(z_a.to(dtype))
    zb = batch_normalize(z_b.to(dtype))
    c = za.T @ zb / z_a.shape[0]
    return barlow_twins_from_correlation(c, lambda_param)


def vicreg_variance_covariance(z_a: torch.Tensor, z_b: torch.Tensor, eps: float) -> torch.Tensor:
    """VICReg's variance and covariance terms of two (B, G, D) views (G groups, 1 for 2-D input).

    variance   = ½ Σ_views mean_{g,d} relu(1 - sqrt(Var_unbiased_b(z)_{g,d} + eps))
    covariance = Σ_views mean_g Σ_{c≠d} Cov_g(z)_{cd}² / D,  Cov_g = z̄_gᵀ z̄_g / (B - 1)

    Returns a (2,) tensor [variance, covariance], float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(z_a, z_b)
    variance = 0.0
    covariance = 0.0
    for z in (z_a.to(dtype), z_b.to(dtype)):
        batch, dim = z.shape[0], z.shape[-1]
        std = torch.sqrt(z.var(dim=0) + eps)
        variance = variance + 0.5 * F.relu(1 - std).mean()
        centred = z - z.mean(dim=0)
        cov = torch.einsum("bgc,bgd->gcd", centred, centred) / (batch - 1)
        off_diagonal_sq = cov.pow(2).sum(dim=(1, 2)) - torch.diagonal(cov, dim1=1, dim2=2).pow(2).sum(-1)
        covariance = covariance + (off_diagonal_sq / dim).mean()
    return torch.stack([variance, covariance])


def barlow_twins_lightly_distributed(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float,
                                     world: int) -> torch.Tensor:
    """lightly's distributed Barlow Twins: each rank batch-normalises its own (N, D) views and the
    correlation C = Σ_ranks aᵀb / (N · world) is all-reduced (with its gradient)."""
    dtype = compute_dtype(z_a)
    a, b = batch_normalize(z_a.to(dtype)), batch_normalize(z_b.to(dtype))
    c = distributed.all_reduce_sum(a.T @ b / (z_a.shape[0] * world))
    return barlow_twins_from_correlation(c, lambda_param)


def invariance(z_a: torch.Tensor, z_b: torch.Tensor) -> torch.Tensor:
    """VICReg's invariance term: the mean squared difference of the two views."""
    dtype = compute_dtype(z_a)
    return F.mse_loss(z_a.to(dtype), z_b.to(dtype))


def vicreg(z_a: torch.Tensor, z_b: torch.Tensor, lambda_param: float, mu_param: float, nu_param: float,
           eps: float, algorithm: str = "auto") -> torch.Tensor:
    """VICReg of two (B, G, D) views: λ · MSE + μ · variance + ν · covariance (the terms of
    :func:`vicreg_variance_covariance`), in lightly's order of operations, op for op: on float32
    inputs the same bits as lightly's ``VICRegLoss``, gradients included. ``algorithm`` (the op's
    Gram-or-direct choice) is taken so the spec has the op's signature; the spec always forms Cov
    directly, as lightly does.

    Returns a 0-dim float32 loss (float64 for float64 inputs).
    """
    dtype = compute_dtype(z_a, z_b)
    z_a, z_b = z_a.to(dtype), z_b.to(dtype)
    invariance = F.mse_loss(z_a, z_b)
    variance = 0.5 * (_lightly_variance(z_a, eps) + _lightly_variance(z_b, eps))
    covariance = _lightly_covariance(z_a) + _lightly_covariance(z_b)
    return lambda_param * invariance + mu_param * variance + nu_param * covariance


def _lightly_variance(x: torch.Tensor, eps: float) -> torch.Tensor:
    """lightly's ``variance_loss``: mean relu(1 − sqrt(Var_unbiased(x) + eps))."""
    std = torch.sqrt(x.var(dim=0) + eps)
    return torch.mean(F.relu(1.0 - std))


def _lightly_covariance(x: torch.Tensor) -> torch.Tensor:
    """lightly's ``covariance_loss`` of (B, …, D): mean over groups of Σ_{c≠d} Cov_cd² / D."""
    x = x - x.mean(dim=0)
    batch, dim = x.size(0), x.size(-1)
    cov = torch.einsum("b...c,b...d->...cd", x, x) / (batch - 1)
    # lightly's cov[..., ~eye] without the mask: the flat (D·D) row minus its first entry, read as
    # (D − 1) rows of D + 1, drops the diagonal as their last column. The same values in the same
    # order, copied contiguous, so the sum has lightly's bits; no eye, no nonzero.
    off_diagonal = cov.flatten(-2)[..., 1:].unflatten(-1, (dim - 1, dim + 1))[..., :-1].flatten(-2)
    return (off_diagonal.pow(2).sum(-1) / dim).mean()


def mutual_nearest_neighbors(a: torch.Tensor, b: torch.Tensor):
    """VICRegL's nearest-neighbour search, both ways, between the (B, Na, C) points of a and each
    of S sets of (B, ·, Nb, C) points b (image by image).

    Returns (a_index (B, S, Na) int64: each a point's nearest point of set s, a_distance (B, S, Na):
    its squared Euclidean distance, b_index (B, S, Nb), b_distance (B, S, Nb): each set's points'
    nearest a point and distance); distances in float32 (float64 for float64 inputs); ties go to
    the lowest index. No gradient.
    """
    dtype = compute_dtype(a, b)
    batch, sets = b.shape[0], b.shape[1]
    repeated = a.detach().to(dtype).unsqueeze(1).expand(-1, sets, -1, -1).flatten(0, 1)
    distances = torch.cdist(repeated, b.detach().to(dtype).flatten(0, 1),
                            compute_mode="donot_use_mm_for_euclid_dist").pow(2).unflatten(0, (batch, sets))
    a_distance, a_index = distances.min(dim=3)
    b_distance, b_index = distances.min(dim=2)
    return a_index, a_distance, b_index, b_distance
