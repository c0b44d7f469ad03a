"""Triton kernels of the distillation family: the soft-target cross-entropy of every (target crop,
student crop) pair, forward and backward.

Kernels and their launchers only (a leaf: torch and triton, nothing of fastssl); the op glue is
``fastssl.distillation.triton_backend``. Inputs may be float16, bfloat16 (not under the
interpreter), float32 or float64; arithmetic runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .clustering import _online_lse, block_size
from .launch import from_float64_parts, float64_parts, on_input_device

Tensor = torch.Tensor


# ============================================================================================
# Soft-target cross-entropy of every (target crop t, student crop s) pair
# ============================================================================================
# Forward, one program per (sample b, student crop s), sweeping K in BLOCK_K tiles with all T
# target rows of sample b in a (BLOCK_T, BLOCK_K) tile:
#   L_sb = LSE_k(σ x_sbk),  c_tsb = Q_tb L_sb − σ Σ_k q_tbk x_sbk,   Q_tb = Σ_k q_tbk
# and loss[t, s] = Σ_b c_tsb / B (= −(1/B) Σ_b Σ_k q_tbk log softmax(σ x_sb)_k), summed by torch.
# Saved for the backward: L (S, B). Backward, with G = ∂ℓ/∂loss (T, S):
#   ∂ℓ/∂x_sbk = (σ/B) (p_sbk W_sb − Σ_t G_ts q_tbk),   p_sb = softmax(σ x_sb), W_sb = Σ_t G_ts Q_tb
#     one program per (b, s), the T target rows in a tile;
#   ∂ℓ/∂q_tbk = −(1/B) (σ Σ_s G_ts x_sbk − V_tb),      V_tb = Σ_s G_ts L_sb
#     one program per (b, t), the S student rows in a (BLOCK_S, BLOCK_K) tile.
# Programs of the same sample b run next to each other, so the rows they share stay in cache.
@triton.jit
def _soft_ce_pairs_forward_kernel(
    # pointers
    targets_ptr, logits_ptr, lse_ptr, contrib_ptr,
    # σ's float32 parts (launch.float64_parts)
    scale_high, scale_middle, scale_low,
    # sizes
    T, S, B, K,
    # meta-parameters
    FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    scale = from_float64_parts(scale_high, scale_middle, scale_low, FP64)
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // S, pid % S
    t = tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < T
    running_max = tl.full([1], float("-inf"), acc_dtype)
    running_sum = tl.zeros([1], acc_dtype)
    dots = tl.zeros([BLOCK_T], acc_dtype)
    mass = tl.zeros([BLOCK_T], acc_dtype)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        x = tl.load(logits_ptr + (s * B + b) * K + k, mask=k_mask, other=0.0).to(acc_dtype)
        q = tl.load(targets_ptr + (t[:, None] * B + b) * K + k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                    other=0.0).to(acc_dtype)
        dots += tl.sum(q * x[None, :], axis=1)
        mass += tl.sum(q, axis=1)
        scaled = tl.where(k_mask, x * scale, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scaled, axis=0))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(scaled - new_max), axis=0)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(lse_ptr + s * B + b + tl.arange(0, 1), lse)
    tl.store(contrib_ptr + (t * S + s) * B + b, mass * lse - scale * dots, mask=t_mask)


@triton.jit
def _soft_ce_pairs_logits_grad_kernel(
    # pointers
    grad_loss_ptr, targets_ptr, logits_ptr, lse_ptr, target_weight_ptr, grad_logits_ptr,
    # σ's and 1/B's float32 parts (launch.float64_parts)
    scale_high, scale_middle, scale_low, inv_batch_high, inv_batch_middle, inv_batch_low,
    # sizes
    T, S, B, K,
    # meta-parameters
    FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    scale = from_float64_parts(scale_high, scale_middle, scale_low, FP64)
    inv_batch = from_float64_parts(inv_batch_high, inv_batch_middle, inv_batch_low, FP64)
    pid = tl.program_id(0).to(tl.int64)
    b, s = pid // S, pid % S
    t = tl.arange(0, BLOCK_T).to(tl.int64)
    t_mask = t < T
    g = tl.load(grad_loss_ptr + t * S + s, mask=t_mask, other=0.0).to(acc_dtype)
    lse = tl.load(lse_ptr + s * B + b).to(acc_dtype)
    weight = tl.load(target_weight_ptr + s * B + b).to(acc_dtype)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        x = tl.load(logits_ptr + (s * B + b) * K + k, mask=k_mask, other=0.0).to(acc_dtype)
        q = tl.load(targets_ptr + (t[:, None] * B + b) * K + k[None, :], mask=t_mask[:, None] & k_mask[None, :],
                    other=0.0).to(acc_dtype)
        p = tl.exp(x * scale - lse)
        grad = scale * inv_batch * (p * weight - tl.sum(g[:, None] * q, axis=0))
        tl.store(grad_logits_ptr + (s * B + b) * K + k, grad.to(grad_logits_ptr.dtype.element_ty), mask=k_mask)


@triton.jit
def _soft_ce_pairs_targets_grad_kernel(
    # pointers
    grad_loss_ptr, logits_ptr, lse_weight_ptr, grad_targets_ptr,
    # σ's and 1/B's float32 parts (launch.float64_parts)
    scale_high, scale_middle, scale_low, inv_batch_high, inv_batch_middle, inv_batch_low,
    # sizes
    T, S, B, K,
    # meta-parameters
    FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    scale = from_float64_parts(scale_high, scale_middle, scale_low, FP64)
    inv_batch = from_float64_parts(inv_batch_high, inv_batch_middle, inv_batch_low, FP64)
    pid = tl.program_id(0).to(tl.int64)
    b, t = pid // T, pid % T
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    s_mask = s < S
    g = tl.load(grad_loss_ptr + t * S + s, mask=s_mask, other=0.0).to(acc_dtype)
    lse_weight = tl.load(lse_weight_ptr + t * B + b).to(acc_dtype)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        x = tl.load(logits_ptr + (s[:, None] * B + b) * K + k[None, :], mask=s_mask[:, None] & k_mask[None, :],
                    other=0.0).to(acc_dtype)
        grad = (lse_weight - scale * tl.sum(g[:, None] * x, axis=0)) * inv_batch
        tl.store(grad_targets_ptr + (t * B + b) * K + k, grad.to(grad_targets_ptr.dtype.element_ty), mask=k_mask)


def _row_tile(rows: int, num_classes: int) -> Tuple[int, int]:
    """(BLOCK_T or BLOCK_S, BLOCK_K) of the pair kernels: every target (student) row of a sample
    in one tile, of at most 4096 elements (BLOCK_K ≥ 64)."""
    block_rows = triton.next_power_of_2(rows)
    return block_rows, block_size(num_classes, max(64, 4096 // block_rows))


def _params(scale: float, batch: int) -> Tuple[float, ...]:
    """σ's and 1/B's float32 parts (launch.float64_parts): float arguments, no host → device copy."""
    return (*float64_parts(scale), *float64_parts(1.0 / batch))


@on_input_device
def soft_cross_entropy_pairs_forward(targets: Tensor, logits: Tensor, scale: float, dtype: torch.dtype
                                     ) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), logits (S, B, K) → (loss (T, S), student LSE (S, B)), in ``dtype`` (the
    compute dtype: float32, or float64)."""
    targets, logits = targets.contiguous(), logits.contiguous()
    num_targets, batch, num_classes = targets.shape
    num_students = logits.shape[0]
    lse = torch.empty(num_students, batch, dtype=dtype, device=logits.device)
    contrib = torch.empty(num_targets, num_students, batch, dtype=dtype, device=logits.device)
    block_t, block_k = _row_tile(num_targets, num_classes)
    _soft_ce_pairs_forward_kernel[(batch * num_students,)](
        targets, logits, lse, contrib, *float64_parts(scale), num_targets, num_students,
        batch, num_classes, FP64=dtype == torch.float64, BLOCK_T=block_t, BLOCK_K=block_k)
    return contrib.sum(dim=-1) / batch, lse


@on_input_device
def soft_cross_entropy_pairs_backward(grad_loss: Tensor, targets: Tensor, logits: Tensor, lse: Tensor, scale: float,
                                      needs_grad: Sequence[bool]) -> List[Tensor]:
    """Gradients [∂/∂targets, ∂/∂logits] in the inputs' dtypes (an empty tensor where not needed)."""
    dtype = lse.dtype
    targets, logits = targets.contiguous(), logits.contiguous()
    grad_loss = grad_loss.to(dtype).contiguous()
    num_targets, batch, num_classes = targets.shape
    num_students = logits.shape[0]
    sizes = (num_targets, num_students, batch, num_classes)
    params = _params(scale, batch)
    fp64 = dtype == torch.float64
    grad_targets, grad_logits = targets.new_empty(0), logits.new_empty(0)
    if needs_grad[0]:
        grad_targets = torch.empty_like(targets)
        block_s, block_k = _row_tile(num_students, num_classes)
        _soft_ce_pairs_targets_grad_kernel[(batch * num_targets,)](
            grad_loss, logits, (grad_loss @ lse).contiguous(), grad_targets, *params, *sizes,
            FP64=fp64, BLOCK_S=block_s, BLOCK_K=block_k)
    if needs_grad[1]:
        grad_logits = torch.empty_like(logits)
        target_weight = (grad_loss.T @ targets.sum(dim=-1, dtype=dtype)).contiguous()
        block_t, block_k = _row_tile(num_targets, num_classes)
        _soft_ce_pairs_logits_grad_kernel[(batch * num_students,)](
            grad_loss, targets, logits, lse.contiguous(), target_weight, grad_logits, *params, *sizes,
            FP64=fp64, BLOCK_T=block_t, BLOCK_K=block_k)
    return [grad_targets, grad_logits]


# ============================================================================================
# Fused last layer + soft cross-entropy of one teacher and one student distribution per row
# ============================================================================================
# z = s Wᵀ, u = σ_t t Wₜᵀ − a (a: the column shift, σ_t·center or Sinkhorn's), both (N, K);
# L_n = LSE_k(σ_s z_n), M_n = LSE_k(u_n), p = exp(u − M), m_n = Σ_k p_nk z_nk:
#   loss = (1/N) Σ_n (L_n − σ_s m_n)
#   ∂ℓ/∂z = g (softmax(σ_s z) − p),  σ_t ∂ℓ/∂u = g σ_t p (m − z),  g = G σ_s / N
# Forward: one program per BLOCK_N rows (their s and t in registers, all of D), sweeping K in
# BLOCK_K tiles: z and u with tl.dot, online LSEs and the running p-weighted sum of z. Saved:
# L, M, m. Backward: the rows kernel (one program per BLOCK_N rows) remakes the tiles and
# accumulates ∂s = Σ_k ∂z W, ∂t = Σ_k σ_t ∂u Wₜ; the columns kernel (one program per BLOCK_K
# prototypes, sweeping N) accumulates ∂W = ∂zᵀ s, ∂Wₜ = σ_t ∂uᵀ t and ∂center = −σ_t Σ_n ∂u.
@triton.jit
def _linear_distillation_tiles(s, t, w_ptr, wt_ptr, shift_ptr, k, k_mask, d, d_mask, dt, dt_mask, D, DT,
                               student_scale, teacher_scale, acc_dtype):
    """(z, σ_s z, u) of one (BLOCK_N, BLOCK_K) tile, masked prototypes at −inf in σ_s z and u."""
    w = tl.load(w_ptr + k[:, None] * D + d[None, :], mask=k_mask[:, None] & d_mask[None, :], other=0.0)
    wt = tl.load(wt_ptr + k[:, None] * DT + dt[None, :], mask=k_mask[:, None] & dt_mask[None, :], other=0.0)
    z = tl.dot(s, tl.trans(w.to(acc_dtype)))
    u = tl.dot(t, tl.trans(wt.to(acc_dtype))) * teacher_scale - tl.load(shift_ptr + k, mask=k_mask, other=0.0)[None, :]
    return z, tl.where(k_mask[None, :], z * student_scale, float("-inf")), tl.where(k_mask[None, :], u, float("-inf"))


@triton.jit
def _scales(student_scale_high, student_scale_middle, student_scale_low, teacher_scale_high, teacher_scale_middle,
            teacher_scale_low, FP64: tl.constexpr):
    """(σ_s, σ_t) from their float32 parts (launch.float64_parts)."""
    return (from_float64_parts(student_scale_high, student_scale_middle, student_scale_low, FP64),
            from_float64_parts(teacher_scale_high, teacher_scale_middle, teacher_scale_low, FP64))


@triton.jit
def _row_features(s_ptr, t_ptr, n, n_mask, D, DT, acc_dtype, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr):
    """(s, t) of rows n: (BLOCK_N, BLOCK_D) and (BLOCK_N, BLOCK_DT) in ``acc_dtype``, 0 where masked."""
    d, dt = tl.arange(0, BLOCK_D).to(tl.int64), tl.arange(0, BLOCK_DT).to(tl.int64)
    s = tl.load(s_ptr + n[:, None] * D + d[None, :], mask=n_mask[:, None] & (d < D)[None, :], other=0.0)
    t = tl.load(t_ptr + n[:, None] * DT + dt[None, :], mask=n_mask[:, None] & (dt < DT)[None, :], other=0.0)
    return s.to(acc_dtype), t.to(acc_dtype)


@triton.jit
def _row_stats(stats_ptr, n, n_mask, N):
    """(L, M, m) of rows n; padded rows at L = M = +inf (p = q = 0: no gradient)."""
    return (tl.load(stats_ptr + n, mask=n_mask, other=float("inf")),
            tl.load(stats_ptr + N + n, mask=n_mask, other=float("inf")),
            tl.load(stats_ptr + 2 * N + n, mask=n_mask, other=0.0))


@triton.jit
def _linear_distillation_forward_kernel(
    # pointers
    s_ptr, t_ptr, w_ptr, wt_ptr, shift_ptr, stats_ptr,  # stats: (3, N) L, M, m
    # σ_s's and σ_t's float32 parts (launch.float64_parts)
    student_scale_high, student_scale_middle, student_scale_low,
    teacher_scale_high, teacher_scale_middle, teacher_scale_low,
    # sizes
    N, K, D, DT,
    # meta-parameters
    FP64: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    student_scale, teacher_scale = _scales(student_scale_high, student_scale_middle, student_scale_low,
                                           teacher_scale_high, teacher_scale_middle, teacher_scale_low, FP64)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = n < N
    d, dt = tl.arange(0, BLOCK_D).to(tl.int64), tl.arange(0, BLOCK_DT).to(tl.int64)
    s, t = _row_features(s_ptr, t_ptr, n, n_mask, D, DT, acc_dtype, BLOCK_D, BLOCK_DT)
    student_max = tl.full([BLOCK_N], float("-inf"), acc_dtype)
    student_sum = tl.zeros([BLOCK_N], acc_dtype)
    teacher_max = tl.full([BLOCK_N], float("-inf"), acc_dtype)
    teacher_sum = tl.zeros([BLOCK_N], acc_dtype)
    weighted = tl.zeros([BLOCK_N], acc_dtype)  # Σ_k exp(u − teacher_max) z
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        z, scaled, u = _linear_distillation_tiles(s, t, w_ptr, wt_ptr, shift_ptr, k, k_mask, d, d < D, dt, dt < DT,
                                                  D, DT, student_scale, teacher_scale, acc_dtype)
        student_max, student_sum = _online_lse(student_max, student_sum, scaled, 1)
        new_max = tl.maximum(teacher_max, tl.max(u, axis=1))
        rescale = tl.exp(teacher_max - new_max)
        e = tl.exp(u - new_max[:, None])
        teacher_sum = teacher_sum * rescale + tl.sum(e, axis=1)
        weighted = weighted * rescale + tl.sum(e * tl.where(k_mask[None, :], z, 0.0), axis=1)
        teacher_max = new_max
    tl.store(stats_ptr + n, student_max + tl.log(student_sum), mask=n_mask)
    tl.store(stats_ptr + N + n, teacher_max + tl.log(teacher_sum), mask=n_mask)
    tl.store(stats_ptr + 2 * N + n, weighted / teacher_sum, mask=n_mask)


@triton.jit
def _linear_distillation_gradients(s, t, w_ptr, wt_ptr, shift_ptr, student_lse, teacher_lse, teacher_mean,
                                   gradient_scale, k, k_mask, D, DT, student_scale, teacher_scale, acc_dtype,
                                   BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr):
    """(∂ℓ/∂z, σ_t ∂ℓ/∂u) of the (BLOCK_N, BLOCK_K) tile of rows n and prototypes k (masked
    entries 0), its logits made again, from the rows' (L, M, m) and g, which the callers load
    (the rows kernel once for all its K tiles): the two backward kernels' common part."""
    d, dt = tl.arange(0, BLOCK_D).to(tl.int64), tl.arange(0, BLOCK_DT).to(tl.int64)
    z, scaled, u = _linear_distillation_tiles(s, t, w_ptr, wt_ptr, shift_ptr, k, k_mask, d, d < D, dt, dt < DT,
                                              D, DT, student_scale, teacher_scale, acc_dtype)
    p = tl.exp(u - teacher_lse[:, None])
    grad_z = gradient_scale * (tl.exp(scaled - student_lse[:, None]) - p)
    grad_u = gradient_scale * teacher_scale * p * (teacher_mean[:, None] - z)
    return grad_z, tl.where(k_mask[None, :], grad_u, 0.0)


@triton.jit
def _linear_distillation_rows_kernel(
    # pointers
    s_ptr, t_ptr, w_ptr, wt_ptr, shift_ptr, stats_ptr, grad_scale_ptr, grad_s_ptr, grad_t_ptr,  # grad_scale: g
    # σ_s's and σ_t's float32 parts (launch.float64_parts)
    student_scale_high, student_scale_middle, student_scale_low,
    teacher_scale_high, teacher_scale_middle, teacher_scale_low,
    # sizes
    N, K, D, DT,
    # meta-parameters
    FP64: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    student_scale, teacher_scale = _scales(student_scale_high, student_scale_middle, student_scale_low,
                                           teacher_scale_high, teacher_scale_middle, teacher_scale_low, FP64)
    n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = n < N
    d, dt = tl.arange(0, BLOCK_D).to(tl.int64), tl.arange(0, BLOCK_DT).to(tl.int64)
    s, t = _row_features(s_ptr, t_ptr, n, n_mask, D, DT, acc_dtype, BLOCK_D, BLOCK_DT)
    student_lse, teacher_lse, teacher_mean = _row_stats(stats_ptr, n, n_mask, N)
    gradient_scale = tl.load(grad_scale_ptr).to(acc_dtype)
    grad_s = tl.zeros([BLOCK_N, BLOCK_D], acc_dtype)
    grad_t = tl.zeros([BLOCK_N, BLOCK_DT], acc_dtype)
    for start in range(0, K, BLOCK_K):
        k = start + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        grad_z, grad_u = _linear_distillation_gradients(s, t, w_ptr, wt_ptr, shift_ptr, student_lse, teacher_lse,
                                                        teacher_mean, gradient_scale, k, k_mask, D, DT, student_scale,
                                                        teacher_scale, acc_dtype, BLOCK_D, BLOCK_DT)
        w = tl.load(w_ptr + k[:, None] * D + d[None, :], mask=k_mask[:, None] & (d < D)[None, :], other=0.0)
        grad_s += tl.dot(grad_z, w.to(acc_dtype))
        if TEACHER_GRAD:
            wt = tl.load(wt_ptr + k[:, None] * DT + dt[None, :], mask=k_mask[:, None] & (dt < DT)[None, :], other=0.0)
            grad_t += tl.dot(grad_u, wt.to(acc_dtype))
    tl.store(grad_s_ptr + n[:, None] * D + d[None, :], grad_s.to(grad_s_ptr.dtype.element_ty),
             mask=n_mask[:, None] & (d < D)[None, :])
    if TEACHER_GRAD:
        tl.store(grad_t_ptr + n[:, None] * DT + dt[None, :], grad_t.to(grad_t_ptr.dtype.element_ty),
                 mask=n_mask[:, None] & (dt < DT)[None, :])


@triton.jit
def _linear_distillation_columns_kernel(
    # pointers
    s_ptr, t_ptr, w_ptr, wt_ptr, shift_ptr, stats_ptr, grad_scale_ptr, grad_w_ptr, grad_wt_ptr, grad_shift_ptr,
    # σ_s's and σ_t's float32 parts (launch.float64_parts)
    student_scale_high, student_scale_middle, student_scale_low,
    teacher_scale_high, teacher_scale_middle, teacher_scale_low,
    # sizes
    N, K, D, DT,
    # meta-parameters
    FP64: tl.constexpr, TEACHER_GRAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DT: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    student_scale, teacher_scale = _scales(student_scale_high, student_scale_middle, student_scale_low,
                                           teacher_scale_high, teacher_scale_middle, teacher_scale_low, FP64)
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K).to(tl.int64)
    k_mask = k < K
    d, dt = tl.arange(0, BLOCK_D).to(tl.int64), tl.arange(0, BLOCK_DT).to(tl.int64)
    grad_w = tl.zeros([BLOCK_K, BLOCK_D], acc_dtype)
    grad_wt = tl.zeros([BLOCK_K, BLOCK_DT], acc_dtype)
    grad_shift = tl.zeros([BLOCK_K], acc_dtype)  # Σ_n σ_t ∂ℓ/∂u: ∂center = −this
    gradient_scale = tl.load(grad_scale_ptr).to(acc_dtype)
    for start in range(0, N, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N).to(tl.int64)
        n_mask = n < N
        s, t = _row_features(s_ptr, t_ptr, n, n_mask, D, DT, acc_dtype, BLOCK_D, BLOCK_DT)
        student_lse, teacher_lse, teacher_mean = _row_stats(stats_ptr, n, n_mask, N)
        grad_z, grad_u = _linear_distillation_gradients(s, t, w_ptr, wt_ptr, shift_ptr, student_lse, teacher_lse,
                                                        teacher_mean, gradient_scale, k, k_mask, D, DT, student_scale,
                                                        teacher_scale, acc_dtype, BLOCK_D, BLOCK_DT)
        grad_w += tl.dot(tl.trans(grad_z), s)
        if TEACHER_GRAD:
            grad_wt += tl.dot(tl.trans(grad_u), t)
            grad_shift += tl.sum(grad_u, axis=0)
    tl.store(grad_w_ptr + k[:, None] * D + d[None, :], grad_w.to(grad_w_ptr.dtype.element_ty),
             mask=k_mask[:, None] & (d < D)[None, :])
    if TEACHER_GRAD:
        tl.store(grad_wt_ptr + k[:, None] * DT + dt[None, :], grad_wt.to(grad_wt_ptr.dtype.element_ty),
                 mask=k_mask[:, None] & (dt < DT)[None, :])
        tl.store(grad_shift_ptr + k, grad_shift, mask=k_mask)


MAX_FEATURES = 1024  # the features of a row block are held whole in registers


def _distillation_blocks(student: Tensor, teacher: Tensor, weight: Tensor, dtype: torch.dtype) -> dict:
    """Tiles of 32 rows × 64 prototypes; float64 (twice the bytes, no tensor cores to feed) in 16 × 32,
    so that its tiles fit sm_80's shared memory and the columns kernel's accumulators its registers."""
    rows, prototypes = (16, 32) if dtype == torch.float64 else (32, 64)
    return dict(BLOCK_N=block_size(student.shape[0], rows), BLOCK_K=block_size(weight.shape[0], prototypes),
                BLOCK_D=block_size(student.shape[1], MAX_FEATURES), BLOCK_DT=block_size(teacher.shape[1], MAX_FEATURES))


@on_input_device
def linear_distillation_stats(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor, shift: Tensor,
                              student_scale: float, teacher_scale: float, dtype: torch.dtype) -> Tensor:
    """[L; M; m] (3, N) in ``dtype`` (float32 or float64): the student's and the teacher's LSEs
    and the teacher-weighted mean student logit of every row."""
    student, teacher, weight, teacher_weight = (x.contiguous() for x in (student, teacher, weight, teacher_weight))
    rows, prototypes = student.shape[0], weight.shape[0]
    stats = torch.empty(3, rows, dtype=dtype, device=student.device)
    blocks = _distillation_blocks(student, teacher, weight, dtype)
    _linear_distillation_forward_kernel[(triton.cdiv(rows, blocks["BLOCK_N"]),)](
        student, teacher, weight, teacher_weight, shift.to(dtype).contiguous(), stats, *float64_parts(student_scale),
        *float64_parts(teacher_scale), rows, prototypes,
        student.shape[1], teacher.shape[1], FP64=dtype == torch.float64, **blocks)
    return stats


@on_input_device
def linear_distillation_backward(grad_scale: Tensor, student: Tensor, teacher: Tensor, weight: Tensor,
                                 teacher_weight: Tensor, shift: Tensor, stats: Tensor, student_scale: float,
                                 teacher_scale: float, teacher_grad: bool) -> Tuple[Tensor, ...]:
    """(∂s, ∂W, and when ``teacher_grad`` ∂t, ∂Wₜ, Σ_n σ_t ∂ℓ/∂u (= −∂center)), for ``grad_scale``
    = G σ_s / N (a one-element tensor in the stats' dtype, no host sync)."""
    dtype = stats.dtype
    student, teacher, weight, teacher_weight = (x.contiguous() for x in (student, teacher, weight, teacher_weight))
    rows, prototypes = student.shape[0], weight.shape[0]
    blocks = _distillation_blocks(student, teacher, weight, dtype)
    shift = shift.to(dtype).contiguous()
    grad_s, grad_w = torch.empty_like(student), torch.empty_like(weight)
    grad_t = torch.empty_like(teacher) if teacher_grad else grad_s
    grad_wt = torch.empty_like(teacher_weight) if teacher_grad else grad_w
    grad_shift = torch.empty(prototypes, dtype=dtype, device=student.device)
    sizes = (rows, prototypes, student.shape[1], teacher.shape[1])
    common = (student, teacher, weight, teacher_weight, shift, stats, grad_scale.reshape(1).to(dtype))
    scales = (*float64_parts(student_scale), *float64_parts(teacher_scale))
    _linear_distillation_rows_kernel[(triton.cdiv(rows, blocks["BLOCK_N"]),)](
        *common, grad_s, grad_t, *scales, *sizes, FP64=dtype == torch.float64, TEACHER_GRAD=teacher_grad, **blocks)
    _linear_distillation_columns_kernel[(triton.cdiv(prototypes, blocks["BLOCK_K"]),)](
        *common, grad_w, grad_wt, grad_shift, *scales, *sizes, FP64=dtype == torch.float64, TEACHER_GRAD=teacher_grad, **blocks)
    return (grad_s, grad_w) + ((grad_t, grad_wt, grad_shift) if teacher_grad else ())
