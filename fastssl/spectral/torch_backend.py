"""The ``torch`` backend of the spectral family: each loss from its smaller side, with closed-form
gradients.

* Gram identities: for Z (N, D), ZZᵀ and ZᵀZ share their nonzero eigenvalues, so
  ‖ZᵀZ‖_F = ‖ZZᵀ‖_F, logdet(I_D + cZᵀZ) = logdet(I_N + cZZᵀ) and ‖Z‖_* = Σ √λ(ZZᵀ): when N < D
  the D×D matrix is never formed (EMP-SSL's D×D logdet costs D³; from the N side it is N²D + N³).
* Closed-form gradients instead of autograd through the GEMMs that built a Gram (each GEMM's
  backward is two more): ∂‖ZZᵀ‖²_F/∂Z = 4ZZᵀZ, ∂logdet(I + cZZᵀ)/∂Z = 2c(I + cZZᵀ)⁻¹Z (one
  Cholesky solve), ∂‖Z‖_*/∂Z = (ZZᵀ)^(−1/2) Z = UVᵀ, TiCo's ∂(ρ/N Σ ẑC'ẑᵀ)/∂ẑ = 2ρ/N ẑC' — one
  GEMM each. TiCo, FroSSL and the total coding rate compute theirs in the forward, with the
  normalisation's backward written out (``runtime.normalize``; ops from
  ``runtime.library.define_precomputed_gradient_op``): no autograd graph, and their backward is one multiply.
* Nuclear norms from the eigenvalues of the smaller Gram, formed and decomposed in float64
  (small: m² entries): its rounding (≈ n·u64·σ_max²) moves a singular value σ by at most
  ≈ √(n·u64)·σ_max, where an SVD of the float32 matrix has its own u32·σ_max.
* Hypersphere uniformity in row blocks: ‖x_i − x_j‖² = ‖x_i‖² + ‖x_j‖² − 2x_i·x_j from a GEMM per
  block and a logsumexp, never the N(N − 1)/2 pair distances of ``torch.pdist`` (whose CPU
  backward is a slow scalar loop); the gradient recomputes each block once (or reuses the only one).
* Patch kernel alignment in closed form: the N×N kernels (or D×D cross-products when D < N), the
  gradient one GEMM of the double-centred ∂loss/∂K with the centred features.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime import blocks as tiling
from ..runtime import library
from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from ..runtime.library import define_precomputed_gradient_op
from ..runtime.normalize import normalize, normalize_backward_

Tensor = torch.Tensor


def tico_forward(z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor], beta: float, rho: float,
                 with_gradient: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``reference.tico`` and its gradient: two GEMMs of N·D² (C', which the state needs, as one
    GEMM with its scaling and sum fused — a D×D elementwise pass costs about as much as a GEMM
    on a CPU — and ẐC'), where lightly's autograd adds a third and several D×D passes. The
    gradient 2ρ/N·ẐC' of ρ/N Σ_i ẑ_i C' ẑ_iᵀ takes C' symmetric, as a covariance is (TiCo's own
    state always is)."""
    dtype = compute_dtype(z_a, z_b)
    rows_a, rows_b = normalize(z_a.to(dtype), 1), normalize(z_b.to(dtype), 1)
    a, b = rows_a.unit, rows_b.unit
    n = a.shape[0]
    if covariance is None:
        updated = torch.mm(a.T * ((1 - beta) / n), a)
    else:
        updated = torch.addmm(covariance.to(dtype), a.T, a, beta=beta, alpha=(1 - beta) / n)
    projected = a @ updated
    loss = 1.0 - (a * b).sum(dim=1).mean() + rho / n * (a * projected).sum()
    gradients = library.gradients_or_empty(with_gradient, (z_a, z_b), lambda: (
        normalize_backward_(rows_a, torch.add(b, projected, alpha=-2 * rho).div_(-n)),
        normalize_backward_(rows_b, a / -n)))
    return (loss, updated) + gradients


def _tico_fake(z_a, z_b, covariance, beta, rho, with_gradient):
    dtype = compute_dtype(z_a, z_b)
    return (z_a.new_empty((), dtype=dtype), z_a.new_empty(z_a.shape[1], z_a.shape[1], dtype=dtype),
            *library.gradient_fakes(with_gradient, (z_a, z_b), dtype))


tico = define_precomputed_gradient_op(
    "tico", "Tensor z_a, Tensor z_b, Tensor? covariance, float beta, float rho", 2, 1, tico_forward, _tico_fake)


def _smaller_gram(z: Tensor) -> Tuple[Tensor, bool]:
    """(..., m, m) Gram of the trailing (m, n) matrices from their smaller side, and whether it is
    ZZᵀ (rows) rather than ZᵀZ."""
    rows = z.shape[-2] <= z.shape[-1]
    return (z @ z.mT if rows else z.mT @ z), rows


def _nuclear_norm_float64(z: Tensor, with_gradient: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """Σσ and UVᵀ of float64 matrices (m, n) from a QR of the long side and an SVD of the m×m
    factor R (same singular values): a float64 input has no wider type for its Gram, whose
    rounding δλ ≈ n·u·σ₁² moves σ_i by δλ/2σ_i and UVᵀ by ≈ n·u·κ² (κ = σ₁/σ_min) — 3e-14 at
    κ = 66, fifty times the SVD's own ≈ n·u·κ — while R keeps A's conditioning. Directions whose σ
    is below the SVD's rounding max(m, n)·u·σ₁ (rank deficiency) get 0, as the pseudo-inverse
    would. ~3× the Gram route's time, float64 inputs only."""
    rows = z.shape[-2] <= z.shape[-1]
    orthogonal, triangular = torch.linalg.qr(z.mT if rows else z)  # A = Rᵀ Qᵀ (rows) or Q R
    small = triangular.mT if rows else triangular
    left, sigma, right = torch.linalg.svd(small) if with_gradient else (None, torch.linalg.svdvals(small), None)
    kept = sigma > max(z.shape[-2:]) * torch.finfo(torch.float64).eps * sigma[..., :1]
    value = torch.where(kept, sigma, 0.0).sum(dim=-1)
    if not with_gradient:
        return value, None
    polar = (left * kept[..., None, :]) @ right  # U·diag(kept)·Wᵀ of the small factor
    return value, (polar @ orthogonal.mT if rows else orthogonal @ polar)


def nuclear_norm_forward(x: Tensor, with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """‖A‖_* of each trailing (m, n) matrix of ``x`` and, with the gradient, UVᵀ = (AAᵀ)^(−1/2) A
    (or A (AᵀA)^(−1/2)) from the same eigendecomposition of the float64 Gram (float64 inputs:
    ``_nuclear_norm_float64``); directions whose eigenvalue is below the Gram's rounding (rank
    deficiency) get 0, as the pseudo-inverse would, and add 0 to the value (√ of a rounding-noise
    eigenvalue u64·σ₁² would add ≈ 1e-8·σ₁: the error of a float64 input)."""
    if x.dtype == torch.float64:
        value, direction = _nuclear_norm_float64(x, with_gradient)
        return value, direction if with_gradient else library.empty_grad(x)
    z = x.to(torch.float64)
    gram, rows = _smaller_gram(z)
    eigenvalues, vectors = torch.linalg.eigh(gram) if with_gradient else (torch.linalg.eigvalsh(gram), None)
    noise = gram.shape[-1] * max(z.shape[-2:]) * torch.finfo(torch.float64).eps
    floor = noise * eigenvalues[..., -1:].clamp_min(0)
    value = torch.where(eigenvalues > floor, eigenvalues.clamp_min(0).sqrt(), 0.0).sum(dim=-1).to(compute_dtype(x))
    if not with_gradient:
        return value, library.empty_grad(x)
    inverse_root = torch.where(eigenvalues > floor, eigenvalues.clamp_min(torch.finfo(torch.float64).tiny).rsqrt(),
                               torch.zeros_like(eigenvalues))
    whitening = (vectors * inverse_root[..., None, :]) @ vectors.mT
    direction = whitening @ z if rows else z @ whitening
    return value, direction.to(compute_dtype(x))


def _nuclear_norm_fake(x, with_gradient):
    dtype = compute_dtype(x)
    return (x.new_empty(x.shape[:-2], dtype=dtype), *library.gradient_fakes(with_gradient, (x,), dtype))


nuclear_norm = define_precomputed_gradient_op("nuclear_norm", "Tensor x", 1, 0, nuclear_norm_forward,
                                              _nuclear_norm_fake)


def mmcr(online: Tensor, momentum: Tensor, lmda: float) -> Tensor:
    """``reference.mmcr`` with eigenvalue nuclear norms (B Grams of 2k×2k and one of the centroids)."""
    dtype = compute_dtype(online, momentum)
    z = torch.cat([online.to(dtype), momentum.to(dtype)], dim=1)
    return -nuclear_norm(z.mean(dim=1)) + lmda * nuclear_norm(z).sum() / z.shape[0]


def frossl_forward(views: Tensor, invariance_weight: float, with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """``reference.frossl`` and its gradient: ‖K‖_F from the smaller Gram of each view (one
    batched GEMM) and ∂log‖K‖²_F/∂ẑ = 4Kẑ/‖K‖²_F (one more), where autograd's backward of the
    Gram is two; tr K = Σẑ² (the number of nonzero columns) without K's diagonal; the
    invariance's gradient 2wV/N·(ẑ_v − z̄) (Σ_v(ẑ_v − z̄) = 0 removes z̄'s own share)."""
    dtype = compute_dtype(views)
    normalized = normalize(views.to(dtype), 1)
    unit = normalized.unit
    num_views, rows, dim = unit.shape
    gram, by_rows = _smaller_gram(unit)
    squared_norm = gram.square().sum(dim=(1, 2))
    trace = unit.square().sum(dim=(1, 2))
    difference = unit - unit.mean(dim=0)
    invariance = num_views / rows * torch.linalg.vector_norm(difference, dim=(1, 2)).square().sum()
    loss = (squared_norm.log() - 2 * trace.log()).sum() + invariance_weight * invariance

    def gradient():  # in place on one temporary: this runs at the loss's peak memory
        direction = (torch.bmm(gram, unit) if by_rows else torch.bmm(unit, gram)).mul_((4 / squared_norm)[:, None, None])
        direction.add_(difference, alpha=2 * invariance_weight * num_views / rows)
        return [normalize_backward_(normalized, direction)]

    return (loss,) + library.gradients_or_empty(with_gradient, (views,), gradient)


def _views_fake(views, *args):
    with_gradient = args[-1]
    dtype = compute_dtype(views)
    return (views.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (views,), dtype))


frossl = define_precomputed_gradient_op("frossl", "Tensor views, float invariance_weight", 1, 0, frossl_forward,
                                        _views_fake)


def total_coding_rate_forward(views: Tensor, tcr_eps: float, with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """½ mean_v logdet(I + cZ_vᵀZ_v), c = D/(Nε), as 2Σ log diag(chol) from the smaller side, and
    its gradient c/V·(I + cZZᵀ)⁻¹Z (or c/V·Z(I + cZᵀZ)⁻¹) from the same Cholesky factor."""
    dtype = compute_dtype(views)
    z = views.to(dtype)
    num_views, rows, dim = z.shape
    c = dim / (rows * tcr_eps)
    gram, by_rows = _smaller_gram(z)
    identity = torch.eye(gram.shape[-1], dtype=dtype, device=z.device)
    factor = torch.linalg.cholesky(torch.add(identity, gram, alpha=c))
    value = factor.diagonal(dim1=-2, dim2=-1).log().sum(dim=-1).mean()

    def gradient():  # M⁻¹ from the factor, then a GEMM: 2-4× faster than LAPACK's cholesky_solve here
        inverse = torch.cholesky_inverse(factor).mul_(c / num_views)
        return [torch.bmm(inverse, z) if by_rows else torch.bmm(z, inverse)]

    return (value,) + library.gradients_or_empty(with_gradient, (views,), gradient)


total_coding_rate = define_precomputed_gradient_op(
    "total_coding_rate", "Tensor views, float tcr_eps", 1, 0, total_coding_rate_forward, _views_fake)


def emp_ssl(views: Tensor, tcr_eps: float, inv_coef: float) -> Tensor:
    """``reference.emp_ssl``: the total coding rate op (N side, closed-form gradient) and the
    cosine invariance (O(VND), through autograd)."""
    z = views.to(compute_dtype(views))
    invariance = -F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()
    return total_coding_rate(views, tcr_eps) + inv_coef * invariance


def _negative_scaled_distances(z: Tensor, squared_norms: Tensor, rows: slice, t: float) -> Tensor:
    """−t‖z_i − z_j‖² for the rows i of ``rows`` against all j, −inf where i = j."""
    logits = torch.addmm(squared_norms[rows, None] + squared_norms[None, :], z[rows], z.T, alpha=-2)
    logits.clamp_min_(0).mul_(-t)
    own = torch.arange(rows.stop - rows.start, device=z.device)
    logits[own, own + rows.start] = float("-inf")
    return logits


def _view_uniformity(z: Tensor, t: float, with_gradient: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """One view (N, D): log mean_{i<j} e^(−t d²_ij) and, with the gradient, −4t Σ_j p_ij (x_i − x_j)."""
    n = z.shape[0]
    squared_norms = z.square().sum(dim=1)
    row_blocks = blocks(n, n)
    row_logsumexp, kept = [], None
    for rows in row_blocks:
        logits = _negative_scaled_distances(z, squared_norms, rows, t)
        row_logsumexp.append(torch.logsumexp(logits, dim=1))
        kept = logits if len(row_blocks) == 1 else None
    log_total = torch.logsumexp(torch.cat(row_logsumexp), dim=0)
    # Σ_{i≠j} counts every pair twice; the mean over the N(N − 1)/2 pairs divides by N(N − 1)
    value = log_total - math.log(n * (n - 1))
    if not with_gradient:
        return value, None
    gradient = torch.empty_like(z)
    for rows in row_blocks:
        logits = kept if kept is not None else _negative_scaled_distances(z, squared_norms, rows, t)
        weights = logits.sub_(log_total).exp_()
        gradient[rows] = torch.addmm(weights.sum(dim=1, keepdim=True) * z[rows], weights, z, alpha=-1)
    return value, gradient.mul_(-4 * t)


def pairwise_uniformity_forward(x: Tensor, t: float, with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """Per view of ``x`` (V, N, D): log mean_{i<j} e^(−t d²_ij) from row blocks of −t d² (a
    logsumexp each), and its gradient ∂/∂x_i = −4t Σ_j p_ij (x_i − x_j), p_ij = e^(−t d²_ij) /
    Σ_{k≠l} e^(−t d²_kl): one more pass over the blocks, which reuses the forward's block when
    there is one (N² ≤ a block). All views in one op call: its dispatch costs ~0.1 ms."""
    z = x.to(compute_dtype(x))
    results = [_view_uniformity(view, t, with_gradient) for view in z]
    values = torch.stack([value for value, _ in results])
    if not with_gradient:
        return values, library.empty_grad(x)
    return values, torch.stack([gradient for _, gradient in results])


def _uniformity_fake(x, t, with_gradient):
    dtype = compute_dtype(x)
    return (x.new_empty(x.shape[0], dtype=dtype), *library.gradient_fakes(with_gradient, (x,), dtype))


hypersphere_uniformity = define_precomputed_gradient_op("hypersphere_uniformity", "Tensor x, float t", 1, 0,
                                                        pairwise_uniformity_forward, _uniformity_fake)


# Patch kernel alignment, per image (B images of N tokens, D dims; w the (N,) valid weights):
#   X_c = P X with P = W − w wᵀ/n (n = Σ w): the rows of X minus their weighted mean μ, times w, so
#   the double-centred kernel is K = X_c X_cᵀ; c = ⟨K_s, K_t⟩, a = √max(⟨K_s, K_s⟩, 1e-6), b likewise
#   for t, loss = 1 − c / (a b).
# Gradient (the teacher is detached): G = ∂loss/∂K_s = −K_t/(ab) + [a² > 1e-6] c K_s/(a³b) and
#   ∂loss/∂X_s = 2 P G P X_s = 2 (P G P)(X_s − 1μᵀ)   (P G P 1 = 0).
# From the smaller side: D < N takes K's inner products as ‖X_sᵀX_t‖²_F from D×D cross-products;
# D ≥ N forms the N×N kernels, with w applied to the kernel (w_i w_j) rather than to the features,
# and P G P as an N×N double centring, so the features see one subtraction pass each and the
# gradient one GEMM (autograd through X_c X_cᵀ does two and adds their strided results: the slower
# half of the step at D = 8192, where every pass over the (N, D) features counts).
def _weighted_mean(x: Tensor, w: Tensor, count: Tensor) -> Tensor:
    """(B, 1, C): the w-weighted mean of the rows of x (B, N, C); w (B, N, 1), count (B, 1, 1)."""
    return torch.bmm(w.transpose(1, 2), x) / count


def _double_centre(kernel: Tensor, w: Tensor, count: Tensor) -> Tensor:
    """P K P for a symmetric (B, N, N) kernel: w_i w_j (K_ij − k_i − k_j + k̄), k = K w / n."""
    row_mean = _weighted_mean(kernel, w, count)
    total = _weighted_mean(row_mean.transpose(1, 2), w, count)
    return (kernel - row_mean - row_mean.transpose(1, 2) + total) * w * w.transpose(1, 2)


def patch_kernel_alignment_forward(student: Tensor, teacher: Tensor, valid: Tensor,
                                   with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """``reference.patch_kernel_alignment`` (B,) and, when ``with_gradient``, its gradient for
    ``student`` (B, N, D) in closed form; see the formulas above."""
    dtype = compute_dtype(student, teacher)
    w = valid.to(dtype)[:, :, None]
    count = w.sum(dim=1, keepdim=True).clamp(min=1.0)
    s, t = (x.to(dtype) - _weighted_mean(x.to(dtype), w, count) for x in (student, teacher))
    small_features = s.shape[-1] < s.shape[-2]
    if small_features:  # ⟨X_sX_sᵀ, X_tX_tᵀ⟩ = ‖X_sᵀX_t‖²_F
        s, t = s * w, t * w
        s_t, s_s, t_t = (a.transpose(-2, -1) @ b for a, b in ((s, t), (s, s), (t, t)))
        cross, s_self, t_self = (m.square().sum(dim=(1, 2)) for m in (s_t, s_s, t_t))
    else:
        mask = w * w.transpose(1, 2)
        k_s, k_t = (s @ s.transpose(-2, -1)).mul_(mask), (t @ t.transpose(-2, -1)).mul_(mask)
        cross, s_self, t_self = ((a * b).sum(dim=(1, 2)) for a, b in ((k_s, k_t), (k_s, k_s), (k_t, k_t)))
    s_norm, t_norm = s_self.clamp_min(1e-6).sqrt(), t_self.clamp_min(1e-6).sqrt()
    loss = 1.0 - cross / (s_norm * t_norm)
    if not with_gradient:
        return loss, library.empty_grad(student)
    teacher_weight = (-2.0 / (s_norm * t_norm))[:, None, None]
    self_weight = torch.where(s_self > 1e-6, 2.0 * cross / (s_norm ** 3 * t_norm), 0.0)[:, None, None]
    if small_features:  # 2 G X_{s,c} = 2 (−X_{t,c}(X_{t,c}ᵀX_{s,c})/(ab) + c X_{s,c}(X_{s,c}ᵀX_{s,c})/(a³b)), then P
        g_s = (t @ s_t.transpose(-2, -1)).mul_(teacher_weight).add_(s @ s_s * self_weight)
        return loss, (g_s - _weighted_mean(g_s, w, count)) * w
    return loss, _double_centre(k_t.mul_(teacher_weight).add_(k_s.mul_(self_weight)), w, count) @ s


def _patch_kernel_alignment_fake(student, teacher, valid, with_gradient):
    dtype = compute_dtype(student, teacher)
    return (student.new_empty(student.shape[0], dtype=dtype),
            *library.gradient_fakes(with_gradient, (student,), dtype))


patch_kernel_alignment = define_precomputed_gradient_op(
    "patch_kernel_alignment", "Tensor student, Tensor teacher, Tensor valid", 1, 0,
    patch_kernel_alignment_forward, _patch_kernel_alignment_fake)


# ============================================================================================
# Gram anchoring (DINOv3)
# ============================================================================================
# L = (1/(G·N²)) Σ_g Σ_ij R_ij², R = f(S) − f(T), S = s sᵀ, T = t tᵀ per group g (f the clamp of
# the mode). The clamps leave no identity that would give the loss from D×D products, so it is
# summed over tiles of S and T, each a GEMM of a row block against a column block, never an N×N
# matrix. With M = G·N², ∂L/∂S_ij = (2/M) R_ij·[S_ij kept]; S symmetric, so
#   ∂L/∂s_i = (4/M) Σ_j R_ij [S_ij kept] s_j,
# accumulated from the same tiles (one more GEMM each): no graph, no second pass.
def _gram_residual(student_sim: Tensor, teacher_sim: Tensor, mode: int) -> Tuple[Tensor, Tensor]:
    """f(S) − f(T) of a tile and the mask of the student entries that f passes (their derivative 1)."""
    if mode == 0:
        return student_sim - teacher_sim, None
    teacher_kept = teacher_sim.clamp_min(0)
    if mode == 1:
        kept = student_sim >= 0
    else:  # remove_only_teacher_neg: S is zeroed only where both are negative
        kept = (student_sim >= 0) | (teacher_sim >= 0)
    return torch.where(kept, student_sim, 0.0) - teacher_kept, kept


def gram_anchoring_forward(student: Tensor, teacher: Tensor, mode: int, with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """``reference.gram_anchoring``'s value on (G, N, D) unit rows from tiles of at most
    ``runtime.blocks.BLOCK_ELEMENTS`` Gram entries (several small groups per tile, or row × column
    blocks of a large one), and ∂/∂student (the Gram teacher takes none)."""
    dtype = compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    groups, rows, _ = s.shape
    side = min(rows, max(1, math.isqrt(tiling.BLOCK_ELEMENTS)))
    groups_per_tile = max(1, tiling.BLOCK_ELEMENTS // (side * side)) if side == rows else 1
    total = s.new_zeros(())
    gradient = torch.zeros_like(s) if with_gradient else None
    for first_group in range(0, groups, groups_per_tile):
        g = slice(first_group, first_group + groups_per_tile)
        for first_row in range(0, rows, side):
            r = slice(first_row, first_row + side)
            for first_column in range(0, rows, side):
                c = slice(first_column, first_column + side)
                residual, kept = _gram_residual(s[g, r] @ s[g, c].mT, t[g, r] @ t[g, c].mT, mode)
                total = total + residual.square().sum()
                if with_gradient:
                    weight = residual if kept is None else residual.mul_(kept)
                    gradient[g, r] += weight @ s[g, c]
    scale = 1.0 / (groups * rows * rows)
    if not with_gradient:
        return total * scale, library.empty_grad(student)
    return total * scale, gradient.mul_(4 * scale)


def _gram_anchoring_fake(student, teacher, mode, with_gradient):
    dtype = compute_dtype(student, teacher)
    return (student.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (student,), dtype))


gram_anchoring = define_precomputed_gradient_op("gram_anchoring", "Tensor student, Tensor teacher, int mode", 1, 0,
                                                gram_anchoring_forward, _gram_anchoring_fake)
