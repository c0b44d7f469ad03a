"""The plain-PyTorch spec of the spectral family's core ops: lightly 1.6's formulas, written
plainly and differentiable, in float32 (float64 inputs stay float64, so ``gradcheck`` works).
Every backend is tested against them, and they against float64 formulas in the tests."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype

Tensor = torch.Tensor


def tico(z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor], beta: float, rho: float) -> Tuple[Tensor, Tensor]:
    """TiCo (Zhu et al., 2022) as lightly's ``TiCoLoss``, on (N, D) views and the running (D, D)
    covariance C (None: zeros). With rows normalised, B = ẑ_aᵀẑ_a / N (no gradient) and
    C' = β C + (1 − β) B:

        loss = 1 − mean_i ẑ_a,i·ẑ_b,i + ρ · mean_i ẑ_a,i C' ẑ_a,iᵀ

    Returns (loss, C' detached)."""
    dtype = compute_dtype(z_a, z_b)
    a, b = F.normalize(z_a.to(dtype), dim=1), F.normalize(z_b.to(dtype), dim=1)
    batch_covariance = (a.T @ a).detach() / a.shape[0]
    previous = torch.zeros_like(batch_covariance) if covariance is None else covariance.to(dtype)
    updated = beta * previous + (1 - beta) * batch_covariance
    loss = 1.0 - (a * b).sum(dim=1).mean() + rho * ((a @ updated) * a).sum(dim=1).mean()
    return loss, updated.detach()


def mmcr(online: Tensor, momentum: Tensor, lmda: float) -> Tensor:
    """MMCR (Yerxa et al., 2023) as lightly's ``MMCRLoss``, on (B, k, D) views: with z the (B, 2k, D)
    concatenation and c its mean over the 2k views (B, D),

        loss = −‖c‖_* + λ · Σ_b ‖z_b‖_* / B

    (‖·‖_* the nuclear norm: the sum of singular values)."""
    dtype = compute_dtype(online, momentum)
    z = torch.cat([online.to(dtype), momentum.to(dtype)], dim=1)
    centroids = z.mean(dim=1)
    return -torch.linalg.svdvals(centroids).sum() + lmda * torch.linalg.svdvals(z).sum() / z.shape[0]


def frossl(views: Tensor, invariance_weight: float) -> Tensor:
    """FroSSL (Skean et al., 2024) as lightly's ``FroSSLLoss``, on stacked views (V, N, D): each
    view's columns normalised (ẑ), K its smaller Gram (ẑẑᵀ or ẑᵀẑ) over its trace (no gradient
    through the trace, as lightly's ``.item()``), z̄ the views' mean:

        loss = Σ_v 2 log ‖K_v / tr K_v‖_F + w · Σ_v V·D·mean((ẑ_v − z̄)²)"""
    dtype = compute_dtype(views)
    unit = F.normalize(views.to(dtype), p=2, dim=1)
    mean = unit.mean(dim=0)
    num_views, rows, dim = unit.shape
    total = unit.new_zeros(())
    for z in unit:
        gram = z.T @ z if rows > dim else z @ z.T
        gram = gram / torch.trace(gram).detach()
        total = total + 2 * torch.log(torch.linalg.norm(gram, ord="fro"))
        total = total + invariance_weight * num_views * dim * F.mse_loss(z, mean)
    return total


def emp_ssl(views: Tensor, tcr_eps: float, inv_coef: float) -> Tensor:
    """EMP-SSL (Tong et al., 2023) as lightly's ``EMPSSLLoss``, on stacked views (V, N, D):

        loss = ½ mean_v logdet(I_D + D/(N ε) Z_vᵀZ_v) − c · mean_{v,i} cos(z_v,i, z̄_i)

    with z̄ the mean of the views."""
    dtype = compute_dtype(views)
    z = views.to(dtype)
    _, rows, dim = z.shape
    identity = torch.eye(dim, dtype=dtype, device=z.device)
    total_coding_rate = 0.5 * torch.logdet(identity + dim / (rows * tcr_eps) * z.transpose(1, 2) @ z).mean()
    invariance = -F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()
    return total_coding_rate + inv_coef * invariance


def hypersphere_uniformity(x: Tensor, t: float) -> Tensor:
    """log mean_{i<j} exp(−t ‖x_i − x_j‖²) of the rows of each view of ``x`` (V, N, D) → (V,):
    Wang and Isola's uniformity (lightly's ``lunif``, with ``torch.pdist``)."""
    x = x.to(compute_dtype(x))
    return torch.stack([torch.pdist(view, p=2).pow(2).mul(-t).exp().mean().log() for view in x])


def patch_kernel_alignment(student: Tensor, teacher: Tensor, valid: Tensor) -> Tensor:
    """1 − linear CKA between the patch kernels of each image, as lightly's
    ``PatchKernelAlignmentLoss``: student, teacher (B, N, D), valid (B, N) 1/0 weights; with K = XXᵀ
    double-centred over the valid tokens (entries of invalid tokens 0),

        loss_b = 1 − ⟨K_s, K_t⟩ / (√max(⟨K_s, K_s⟩, 1e-6) · √max(⟨K_t, K_t⟩, 1e-6))

    → (B,) per-image losses."""
    dtype = compute_dtype(student, teacher)
    w = valid.to(dtype)
    count = w.sum(dim=-1).clamp(min=1.0)

    def centred_kernel(x):
        kernel = x.to(dtype) @ x.to(dtype).transpose(-2, -1)
        row = (kernel * w[:, None, :]).sum(dim=-1) / count[:, None]
        col = (kernel * w[:, :, None]).sum(dim=1) / count[:, None]
        total = (kernel * w[:, None, :] * w[:, :, None]).sum(dim=(1, 2)) / (count * count)
        return (kernel - row[:, :, None] - col[:, None, :] + total[:, None, None]) * w[:, :, None] * w[:, None, :]

    k_s, k_t = centred_kernel(student), centred_kernel(teacher)
    cross = (k_s * k_t).sum(dim=(1, 2))
    norm = (k_s * k_s).sum(dim=(1, 2)).clamp_min(1e-6).sqrt() * (k_t * k_t).sum(dim=(1, 2)).clamp_min(1e-6).sqrt()
    return 1.0 - cross / norm


GRAM_MODES = ("all", "remove_neg", "remove_only_teacher_neg")


def gram_anchoring(student: torch.Tensor, teacher: torch.Tensor, mode: int) -> torch.Tensor:
    """DINOv3's Gram loss on (G, N, D) rows (already L2-normalised if asked): the mean over G·N·N
    entries of (S − T)² with S = XXᵀ of the student, T of the teacher, both clamped at 0 where
    ``GRAM_MODES[mode]`` is "remove_neg"; with "remove_only_teacher_neg" T is clamped and S is 0
    where both are negative."""
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    student_sim, teacher_sim = s @ s.mT, t @ t.mT
    if GRAM_MODES[mode] == "remove_neg":
        student_sim, teacher_sim = student_sim.clamp_min(0), teacher_sim.clamp_min(0)
    elif GRAM_MODES[mode] == "remove_only_teacher_neg":
        student_sim = student_sim.masked_fill((student_sim < 0) & (teacher_sim < 0), 0.0)
        teacher_sim = teacher_sim.clamp_min(0)
    return F.mse_loss(student_sim, teacher_sim)
