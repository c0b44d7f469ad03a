"""Triton kernels of the clustering & distillation family: log-domain Sinkhorn-Knopp passes and
the soft-target cross-entropy of every (target crop, student crop) pair, forward and backward.

Registered as ``fastssl::sinkhorn_triton`` and ``fastssl::soft_cross_entropy_pairs_triton``
(with its ``_backward``), the ``triton`` backend of ``sinkhorn`` and ``soft_cross_entropy_pairs``.
Inputs may be float16, bfloat16 (not under the interpreter), float32 or float64; arithmetic
runs in float32 (float64 for float64 inputs). The Sinkhorn iteration itself (marginals,
tolerance, ranks) is ``fastssl.clustering.sinkhorn_with``, shared with the torch backend.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import triton
import triton.language as tl

from fastssl import backends, clustering, ops
from fastssl.reference import compute_dtype

Tensor = torch.Tensor


def _tile(size: int, cap: int) -> int:
    """The block size along a dimension of ``size``: its next power of two, at most ``cap``."""
    return max(16, min(triton.next_power_of_2(size), cap))


@triton.jit
def _online_lse(running_max, running_sum, x, AXIS: tl.constexpr):
    """Fold a 2-D tile ``x`` (masked entries -inf) into a running max and sum of exp(x − max)
    along AXIS; lanes that have seen only -inf keep max -inf and sum 0."""
    new_max = tl.maximum(running_max, tl.max(x, axis=AXIS))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    tile_sum = tl.sum(tl.exp(x - tl.expand_dims(shift, AXIS)), axis=AXIS)
    return new_max, running_sum * tl.exp(running_max - shift) + tile_sum


# ============================================================================================
# Sinkhorn-Knopp passes over the (B, K) scores s, in the log domain
# ============================================================================================
# prototype pass:  L_k = LSE_b (s_bk / ε + v_b)          (v = 0 when HAS_POTENTIAL is False)
# sample pass:     L_b = LSE_k (s_bk / ε + u_k)
# codes pass:      Q_bk = exp(s_bk / ε + u_k − L_b)      (the sample pass, then a second sweep)
# Tiling: the prototype pass gives each program BLOCK_K prototypes and sweeps the samples in
# BLOCK_B tiles with a running max and sum (online LSE); the sample and codes passes give each
# program BLOCK_B samples and sweep the prototypes. The scores are re-read by every pass and
# never written; nothing is saved (Sinkhorn has no gradient).
@triton.jit
def _sinkhorn_prototype_lse_kernel(
    # pointers (inv_epsilon_ptr: 1/ε in the compute dtype; a float argument would be float32)
    scores_ptr, potential_ptr, lse_ptr, inv_epsilon_ptr,
    # sizes
    B, K,
    # strides
    stride_b, stride_k,
    # meta-parameters
    HAS_POTENTIAL: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    inv_epsilon = tl.load(inv_epsilon_ptr)
    k = tl.program_id(0).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = k < K
    running_max = tl.full([BLOCK_K], float("-inf"), acc_dtype)
    running_sum = tl.zeros([BLOCK_K], acc_dtype)
    for start in range(0, B, BLOCK_B):
        b = start + tl.arange(0, BLOCK_B).to(tl.int64)
        b_mask = b < B
        mask = b_mask[:, None] & k_mask[None, :]
        x = tl.load(scores_ptr + b[:, None] * stride_b + k[None, :] * stride_k, mask=mask, other=0.0)
        x = x.to(acc_dtype) * inv_epsilon
        if HAS_POTENTIAL:
            x += tl.load(potential_ptr + b, mask=b_mask, other=0.0).to(acc_dtype)[:, None]
        running_max, running_sum = _online_lse(running_max, running_sum, tl.where(mask, x, float("-inf")), 0)
    tl.store(lse_ptr + k, running_max + tl.log(tl.where(k_mask, running_sum, 1.0)), mask=k_mask)


@triton.jit
def _sample_tile(scores_ptr, potential_ptr, b, b_mask, start, K, stride_b, stride_k, inv_epsilon,
                 FP64: tl.constexpr, BLOCK_K: tl.constexpr):
    """s/ε + u for samples b and the BLOCK_K prototypes from ``start`` (-inf outside), its k and mask."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    k = start + tl.arange(0, BLOCK_K).to(tl.int64)
    mask = b_mask[:, None] & (k < K)[None, :]
    x = tl.load(scores_ptr + b[:, None] * stride_b + k[None, :] * stride_k, mask=mask, other=0.0)
    x = x.to(acc_dtype) * inv_epsilon + tl.load(potential_ptr + k, mask=k < K, other=0.0).to(acc_dtype)[None, :]
    return tl.where(mask, x, float("-inf")), k, mask


@triton.jit
def _sinkhorn_sample_kernel(
    # pointers
    scores_ptr, potential_ptr, out_ptr, inv_epsilon_ptr,
    # sizes
    B, K,
    # strides
    stride_b, stride_k,
    # meta-parameters
    WRITE_CODES: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    inv_epsilon = tl.load(inv_epsilon_ptr)
    b = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    b_mask = b < B
    running_max = tl.full([BLOCK_B], float("-inf"), acc_dtype)
    running_sum = tl.zeros([BLOCK_B], acc_dtype)
    for start in range(0, K, BLOCK_K):
        x, k, mask = _sample_tile(scores_ptr, potential_ptr, b, b_mask, start, K, stride_b, stride_k, inv_epsilon,
                                   FP64, BLOCK_K)
        running_max, running_sum = _online_lse(running_max, running_sum, x, 1)
    lse = tl.where(b_mask, running_max + tl.log(tl.where(b_mask, running_sum, 1.0)), 0.0)
    if WRITE_CODES:
        for start in range(0, K, BLOCK_K):
            x, k, mask = _sample_tile(scores_ptr, potential_ptr, b, b_mask, start, K, stride_b, stride_k, inv_epsilon,
                                   FP64, BLOCK_K)
            codes = tl.exp(x - lse[:, None])
            tl.store(out_ptr + b[:, None] * K + k[None, :], codes.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + b, lse, mask=b_mask)


class TritonSinkhornPasses:
    """``clustering.SinkhornPasses`` as Triton kernels re-reading the scores."""

    def __init__(self, scores: Tensor, epsilon: float):
        self.scores, self.dtype = scores, compute_dtype(scores)
        self.inv_epsilon = torch.full((1,), 1.0 / epsilon, dtype=self.dtype, device=scores.device)
        batch, num_prototypes = scores.shape
        self.block_b, self.block_k = _tile(batch, 32), _tile(num_prototypes, 128)
        self.meta = dict(FP64=self.dtype == torch.float64, BLOCK_B=self.block_b, BLOCK_K=self.block_k)

    def _launch_over_samples(self, potential: Tensor, out: Tensor, write_codes: bool) -> Tensor:
        batch, num_prototypes = self.scores.shape
        _sinkhorn_sample_kernel[(triton.cdiv(batch, self.block_b),)](
            self.scores, potential.contiguous(), out, self.inv_epsilon, batch, num_prototypes,
            *self.scores.stride(), WRITE_CODES=write_codes, **self.meta)
        return out

    def _prototype_lse(self, sample_potential) -> Tensor:
        batch, num_prototypes = self.scores.shape
        lse = torch.empty(num_prototypes, dtype=self.dtype, device=self.scores.device)
        potential = self.scores if sample_potential is None else sample_potential.contiguous()
        _sinkhorn_prototype_lse_kernel[(triton.cdiv(num_prototypes, self.block_k),)](
            self.scores, potential, lse, self.inv_epsilon, batch, num_prototypes, *self.scores.stride(),
            HAS_POTENTIAL=sample_potential is not None, **self.meta)
        return lse

    def first_prototype_lse(self):
        return self._prototype_lse(None)

    def column_step_prototype_lse(self, prototype_potential, log_col_marginals):
        sample_lse = torch.empty(self.scores.shape[0], dtype=self.dtype, device=self.scores.device)
        self._launch_over_samples(prototype_potential, sample_lse, write_codes=False)
        return self._prototype_lse(log_col_marginals - sample_lse)

    def codes(self, prototype_potential):
        codes = torch.empty(self.scores.shape, dtype=self.scores.dtype, device=self.scores.device)
        return self._launch_over_samples(prototype_potential, codes, write_codes=True)


@torch.no_grad()
def sinkhorn(scores: Tensor, iterations: int, epsilon: float, row_marginals, col_marginals, tolerance: float,
             gather_distributed: bool) -> Tensor:
    """``reference.sinkhorn`` with Triton passes; (B, K) codes in the dtype of ``scores``."""
    return clustering.sinkhorn_with(TritonSinkhornPasses, scores, iterations, epsilon, row_marginals,
                                    col_marginals, tolerance, gather_distributed)


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
    return block_rows, _tile(num_classes, max(64, 4096 // block_rows))


def _params(scale: float, batch: int, dtype: torch.dtype, device) -> Tensor:
    """[σ, 1/B] in the compute dtype (a float kernel argument would be float32)."""
    return torch.tensor([scale, 1.0 / batch], dtype=dtype, device=device)


def soft_cross_entropy_pairs_forward(targets: Tensor, logits: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), logits (S, B, K) → (loss (T, S), student LSE (S, B)), compute dtype."""
    dtype = compute_dtype(targets, logits)
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


sinkhorn_triton = ops.define_sinkhorn_op("sinkhorn_triton", sinkhorn)
soft_cross_entropy_pairs_triton = ops.define_pair_loss_op(
    "soft_cross_entropy_pairs_triton", "Tensor targets, Tensor logits", soft_cross_entropy_pairs_forward,
    soft_cross_entropy_pairs_backward)
backends.register("sinkhorn", "triton", sinkhorn_triton, supports=backends.triton_device_reasons)
backends.register("soft_cross_entropy_pairs", "triton", soft_cross_entropy_pairs_triton,
                  supports=backends.triton_device_reasons)
