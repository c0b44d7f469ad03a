"""Triton kernels of the clustering family: the passes of log-domain Sinkhorn-Knopp.

Kernels and their launcher class only (a leaf: torch and triton, nothing of fastssl); the
iteration itself (marginals, tolerance, ranks) is ``fastssl.clustering.torch_backend.sinkhorn_with``
and the op glue ``fastssl.clustering.triton_backend``. Scores may be float16, bfloat16 (not under
the interpreter), float32 or float64; arithmetic runs in float32 (float64 for float64 scores).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import float64_parts, on_device

Tensor = torch.Tensor


def block_size(size: int, cap: int) -> int:
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


@triton.jit
def _inverse_epsilon(inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low, FP64: tl.constexpr):
    """1/ε from its float32 parts (``launch.float64_parts``): their float64 sum, or the first."""
    inv_epsilon = tl.cast(inv_epsilon_high, tl.float32)
    if FP64:
        inv_epsilon = ((tl.cast(inv_epsilon_high, tl.float64) + tl.cast(inv_epsilon_middle, tl.float64))
                       + tl.cast(inv_epsilon_low, tl.float64))
    return inv_epsilon


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
    # pointers
    scores_ptr, potential_ptr, lse_ptr,
    # 1/ε in float32 parts (a float argument is float32; see _inverse_epsilon)
    inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low,
    # sizes
    B, K,
    # strides
    stride_b, stride_k,
    # meta-parameters
    HAS_POTENTIAL: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    inv_epsilon = _inverse_epsilon(inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low, FP64)
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
    scores_ptr, potential_ptr, out_ptr,
    # 1/ε in float32 parts
    inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low,
    # sizes
    B, K,
    # strides
    stride_b, stride_k,
    # meta-parameters
    WRITE_CODES: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    inv_epsilon = _inverse_epsilon(inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low, FP64)
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
    """The Sinkhorn driver's passes over the (B, K) scores (``fastssl.clustering.torch_backend.
    SinkhornPasses``) as Triton kernels re-reading the scores; float32 arithmetic (float64 for
    float64 scores). A pass allocates its output and launches, on the scores' device: no host
    to device copy, no synchronisation (CUDA-graph capturable)."""

    def __init__(self, scores: Tensor, epsilon: float):
        self.scores, self.dtype = scores, torch.float64 if scores.dtype == torch.float64 else torch.float32
        batch, num_prototypes = scores.shape
        self.block_b, self.block_k = block_size(batch, 32), block_size(num_prototypes, 128)
        self.inv_epsilon = float64_parts(1.0 / epsilon)
        self.meta = dict(FP64=self.dtype == torch.float64, BLOCK_B=self.block_b, BLOCK_K=self.block_k)

    def _launch_over_samples(self, potential: Tensor, out: Tensor, write_codes: bool) -> Tensor:
        batch, num_prototypes = self.scores.shape
        with on_device(self.scores):
            _sinkhorn_sample_kernel[(triton.cdiv(batch, self.block_b),)](
                self.scores, potential.contiguous(), out, *self.inv_epsilon, batch, num_prototypes,
                *self.scores.stride(), WRITE_CODES=write_codes, **self.meta)
        return out

    def _prototype_lse(self, sample_potential) -> Tensor:
        batch, num_prototypes = self.scores.shape
        lse = torch.empty(num_prototypes, dtype=self.dtype, device=self.scores.device)
        potential = self.scores if sample_potential is None else sample_potential.contiguous()
        with on_device(self.scores):
            _sinkhorn_prototype_lse_kernel[(triton.cdiv(num_prototypes, self.block_k),)](
                self.scores, potential, lse, *self.inv_epsilon, batch, num_prototypes, *self.scores.stride(),
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
