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

from .clustering import block_size

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
    targets_ptr, logits_ptr, lse_ptr, contrib_ptr, params_ptr,  # params: [σ, 1/B]
    # sizes
    T, S, B, K,
    # meta-parameters
    FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    scale = tl.load(params_ptr)
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
    grad_loss_ptr, targets_ptr, logits_ptr, lse_ptr, target_weight_ptr, grad_logits_ptr, params_ptr,
    # sizes
    T, S, B, K,
    # meta-parameters
    FP64: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    scale, inv_batch = tl.load(params_ptr), tl.load(params_ptr + 1)
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
    grad_loss_ptr, logits_ptr, lse_weight_ptr, grad_targets_ptr, params_ptr,
    # sizes
    T, S, B, K,
    # meta-parameters
    FP64: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    scale, inv_batch = tl.load(params_ptr), tl.load(params_ptr + 1)
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


def _params(scale: float, batch: int, dtype: torch.dtype, device) -> Tensor:
    """[σ, 1/B] in the compute dtype (a float kernel argument would be float32)."""
    return torch.tensor([scale, 1.0 / batch], dtype=dtype, device=device)


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
        targets, logits, lse, contrib, _params(scale, batch, dtype, logits.device), num_targets, num_students,
        batch, num_classes, FP64=dtype == torch.float64, BLOCK_T=block_t, BLOCK_K=block_k)
    return contrib.sum(dim=-1) / batch, lse


def soft_cross_entropy_pairs_backward(grad_loss: Tensor, targets: Tensor, logits: Tensor, lse: Tensor, scale: float,
                                      needs_grad: Sequence[bool]) -> List[Tensor]:
    """Gradients [∂/∂targets, ∂/∂logits] in the inputs' dtypes (an empty tensor where not needed)."""
    dtype = lse.dtype
    targets, logits = targets.contiguous(), logits.contiguous()
    grad_loss = grad_loss.to(dtype).contiguous()
    num_targets, batch, num_classes = targets.shape
    num_students = logits.shape[0]
    sizes = (num_targets, num_students, batch, num_classes)
    params = _params(scale, batch, dtype, logits.device)
    fp64 = dtype == torch.float64
    grad_targets, grad_logits = targets.new_empty(0), logits.new_empty(0)
    if needs_grad[0]:
        grad_targets = torch.empty_like(targets)
        block_s, block_k = _row_tile(num_students, num_classes)
        _soft_ce_pairs_targets_grad_kernel[(batch * num_targets,)](
            grad_loss, logits, (grad_loss @ lse).contiguous(), grad_targets, params, *sizes,
            FP64=fp64, BLOCK_S=block_s, BLOCK_K=block_k)
    if needs_grad[1]:
        grad_logits = torch.empty_like(logits)
        target_weight = (grad_loss.T @ targets.sum(dim=-1, dtype=dtype)).contiguous()
        block_t, block_k = _row_tile(num_targets, num_classes)
        _soft_ce_pairs_logits_grad_kernel[(batch * num_students,)](
            grad_loss, targets, logits, lse.contiguous(), target_weight, grad_logits, params, *sizes,
            FP64=fp64, BLOCK_T=block_t, BLOCK_K=block_k)
    return [grad_targets, grad_logits]
