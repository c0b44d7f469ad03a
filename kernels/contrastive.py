"""Triton kernels of the contrastive family: InfoNCE / NT-Xent in O(N + M) memory.

Kernels and their launchers only (a leaf: torch and triton, nothing of fastssl); the op glue is
``fastssl.contrastive.triton_backend``. Same contract as ``fastssl.contrastive.reference.info_nce``.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import on_input_device

Tensor = torch.Tensor

# Forward, one program per BLOCK_M query rows, streaming BLOCK_N key columns at a time:
#
#   s_ij = scale · q_i · k_j                  (tl.dot over BLOCK_D chunks of D, fp32 accumulate)
#   s_ij = -inf  where j is out of range or j == self_index[i]
#   m_i  = max_j s_ij,  l_i = Σ_j exp(s_ij - m_i)   (online: rescale l by exp(m_old - m_new))
#   P_i  = {j : key_label_j == query_label_i, j not self}:  Σ_{P_i} s_ij and |P_i| accumulated
#   loss_i = (m_i - mean_{P_i} s_ij) + log l_i      (0 when P_i is empty)
#
# With an extra logit e_i per row (MoCo's positive q_i·p_i, computed outside), the running
# (m, l) start at (e_i, 1) and loss_i = (m_i - e_i) + log l_i. Saved for the backward: m and l
# per row (the loss is assembled from m − positive so a tiny loss keeps its digits at τ = 0.01).


@triton.jit
def _logit_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, scale, stride_qn, stride_qd, stride_kn, stride_kd,
                IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """scale · Q[rows] K[cols]ᵀ, (BLOCK_M, BLOCK_N) fp32, accumulated over BLOCK_D chunks of D."""
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d = d_start + dims
        q = tl.load(q_ptr + rows[:, None] * stride_qn + d[None, :] * stride_qd,
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        k = tl.load(k_ptr + cols[:, None] * stride_kn + d[None, :] * stride_kd,
                    mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        if IEEE:
            acc += tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            acc += tl.dot(q, tl.trans(k))
    return acc * scale


@triton.jit
def _info_nce_fwd_kernel(
    # pointers
    q_ptr, k_ptr, query_label_ptr, key_label_ptr, self_index_ptr, extra_ptr,
    loss_ptr, max_ptr, sum_ptr,
    # sizes
    N, M, D, scale,
    # strides
    stride_qn, stride_qd, stride_kn, stride_kd,
    # meta-parameters
    HAS_LABELS: tl.constexpr, HAS_SELF: tl.constexpr, HAS_EXTRA: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    if HAS_LABELS:
        query_label = tl.load(query_label_ptr + rows, mask=row_ok, other=0)
    if HAS_SELF:
        self_col = tl.load(self_index_ptr + rows, mask=row_ok, other=-1)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_EXTRA:
        extra = tl.load(extra_ptr + rows, mask=row_ok, other=0.0)
        row_max = extra
        row_sum = tl.full((BLOCK_M,), 1.0, tl.float32)
    positive_sum = tl.zeros((BLOCK_M,), tl.float32)
    positive_count = tl.zeros((BLOCK_M,), tl.float32)
    for col_start in range(0, M, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < M
        logits = _logit_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, scale,
                             stride_qn, stride_qd, stride_kn, stride_kd, IEEE, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_SELF:
            valid = valid & (cols[None, :] != self_col[:, None])
        logits = tl.where(valid, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, 1))
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with nothing seen yet
        row_sum = row_sum * tl.exp(row_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), 1)
        row_max = new_max
        if HAS_LABELS:
            key_label = tl.load(key_label_ptr + cols, mask=col_ok, other=0)
            positive = valid & (query_label[:, None] == key_label[None, :])
            positive_sum += tl.sum(tl.where(positive, logits, 0.0), 1)
            positive_count += tl.sum(positive.to(tl.float32), 1)
    log_sum = tl.log(tl.where(row_ok, row_sum, 1.0))  # padding rows saw no column
    if HAS_EXTRA:
        loss = (row_max - extra) + log_sum
    else:
        loss = (row_max - positive_sum / tl.maximum(positive_count, 1.0)) + log_sum
        loss = tl.where(positive_count > 0, loss, 0.0)
    tl.store(loss_ptr + rows, loss, mask=row_ok)
    tl.store(max_ptr + rows, row_max, mask=row_ok)
    tl.store(sum_ptr + rows, row_sum, mask=row_ok)


# Backward, one program per BLOCK_N key columns (it owns dK of those columns), looping over all
# query tiles; each logit tile is recomputed once and feeds both gradients:
#
#   G_ij = c_i · exp(s_ij - m_i) / l_i - w_i · [j ∈ P_i]              c_i = g_i·scale, w_i = c_i/|P_i|
#        (+ c'_j · exp(s_ij - m'_j) / l'_j - w'_j · [i ∈ P'_j]   for the column losses, symmetric)
#   dQ_i += Σ_j G_ij k_j    (atomic add: other programs own other columns of the same rows)
#   dK_j += Σ_i G_ij q_i    (read-modify-write: only this program touches these rows of dK)
#
# D is processed in BLOCK_D chunks, so any feature size fits; dQ and dK accumulate in fp32.


@triton.jit
def _info_nce_bwd_kernel(
    # pointers
    q_ptr, k_ptr, query_label_ptr, key_label_ptr, self_index_ptr,
    row_max_ptr, row_sum_ptr, row_coef_ptr, row_weight_ptr,
    col_max_ptr, col_sum_ptr, col_coef_ptr, col_weight_ptr,
    grad_q_ptr, grad_k_ptr,
    # sizes
    N, M, D, scale,
    # strides (grad_q and grad_k are contiguous (N, D) and (M, D))
    stride_qn, stride_qd, stride_kn, stride_kd,
    # meta-parameters
    HAS_LABELS: tl.constexpr, HAS_SELF: tl.constexpr, SYMMETRIC: tl.constexpr, KEYS_GRAD: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < M
    dims = tl.arange(0, BLOCK_D)
    if HAS_LABELS:
        key_label = tl.load(key_label_ptr + cols, mask=col_ok, other=0)
    if SYMMETRIC:
        col_max = tl.load(col_max_ptr + cols, mask=col_ok, other=0.0)
        col_sum = tl.load(col_sum_ptr + cols, mask=col_ok, other=1.0)
        col_coef = tl.load(col_coef_ptr + cols, mask=col_ok, other=0.0)
        col_weight = tl.load(col_weight_ptr + cols, mask=col_ok, other=0.0)
    for row_start in range(0, N, BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < N
        logits = _logit_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, scale,
                             stride_qn, stride_qd, stride_kn, stride_kd, IEEE, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_SELF:
            self_col = tl.load(self_index_ptr + rows, mask=row_ok, other=-1)
            valid = valid & (cols[None, :] != self_col[:, None])
        row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
        row_sum = tl.load(row_sum_ptr + rows, mask=row_ok, other=1.0)
        row_coef = tl.load(row_coef_ptr + rows, mask=row_ok, other=0.0)
        grad = tl.exp(logits - row_max[:, None]) * (row_coef / row_sum)[:, None]
        if SYMMETRIC:
            grad += tl.exp(logits - col_max[None, :]) * (col_coef / col_sum)[None, :]
        if HAS_LABELS:
            query_label = tl.load(query_label_ptr + rows, mask=row_ok, other=0)
            positive = query_label[:, None] == key_label[None, :]
            row_weight = tl.load(row_weight_ptr + rows, mask=row_ok, other=0.0)
            positive_weight = row_weight[:, None]
            if SYMMETRIC:
                positive_weight = positive_weight + col_weight[None, :]
            grad -= tl.where(positive, positive_weight, 0.0)
        grad = tl.where(valid, grad, 0.0)
        for d_start in range(0, D, BLOCK_D):
            d = d_start + dims
            d_ok = d[None, :] < D
            q = tl.load(q_ptr + rows[:, None] * stride_qn + d[None, :] * stride_qd,
                        mask=row_ok[:, None] & d_ok, other=0.0)
            k = tl.load(k_ptr + cols[:, None] * stride_kn + d[None, :] * stride_kd,
                        mask=col_ok[:, None] & d_ok, other=0.0)
            if IEEE:
                grad_q_part = tl.dot(grad, k, input_precision="ieee")
            else:
                grad_q_part = tl.dot(grad.to(k.dtype), k)
            tl.atomic_add(grad_q_ptr + rows[:, None] * D + d[None, :], grad_q_part, mask=row_ok[:, None] & d_ok)
            if KEYS_GRAD:
                if IEEE:
                    grad_k_part = tl.dot(tl.trans(grad), q, input_precision="ieee")
                else:
                    grad_k_part = tl.dot(tl.trans(grad.to(q.dtype)), q)
                grad_k_ptrs = grad_k_ptr + cols[:, None] * D + d[None, :]
                grad_k_mask = col_ok[:, None] & d_ok
                tl.store(grad_k_ptrs, tl.load(grad_k_ptrs, mask=grad_k_mask, other=0.0) + grad_k_part,
                         mask=grad_k_mask)


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _blocks(n: int, m: int, d: int):
    """(BLOCK_M, BLOCK_N, BLOCK_D): tiles of at least 16 (tl.dot's minimum), 64 when the sizes allow."""
    def fit(size, largest):
        return max(16, min(largest, triton.next_power_of_2(size)))

    return fit(n, 64), fit(m, 64), fit(d, 64)


AUTOTUNE_CANDIDATES = ((64, 64, 64), (128, 64, 64), (64, 128, 64), (128, 128, 32), (64, 64, 128), (32, 32, 64))
_TUNED_BLOCKS: dict = {}


def _choose_blocks(kind: str, n: int, m: int, d: int, dtype: torch.dtype, trial) -> tuple:
    """The heuristic's blocks, or with ``FASTSSL_TRITON_AUTOTUNE=1`` the fastest candidate.

    ``trial(blocks)`` runs the kernel once on scratch outputs; each shape is timed once per process
    with ``triton.testing.do_bench`` (median, warm-up excluded).
    """
    heuristic = _blocks(n, m, d)
    if os.environ.get("FASTSSL_TRITON_AUTOTUNE", "0") in ("", "0"):
        return heuristic
    key = (kind, n, m, d, dtype)
    if key not in _TUNED_BLOCKS:
        candidates = {heuristic} | {blocks for blocks in AUTOTUNE_CANDIDATES if blocks[2] <= max(16, d * 2)}
        timings = {blocks: triton.testing.do_bench(lambda blocks=blocks: trial(blocks)) for blocks in candidates}
        _TUNED_BLOCKS[key] = min(timings, key=timings.get)
    return _TUNED_BLOCKS[key]


@on_input_device
def info_nce_row_statistics(query: Tensor, keys: Tensor, query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                    self_index: Optional[Tensor], extra: Optional[Tensor], scale: float):
    """Launch the forward kernel: (loss, max, sum), each (N,) float32."""
    n, d = query.shape
    m = keys.shape[0]

    def launch(blocks, outputs):
        block_m, block_n, block_d = blocks
        unused = outputs[0]  # a placeholder pointer for absent optional inputs (never dereferenced)
        _info_nce_fwd_kernel[(triton.cdiv(n, block_m),)](
            query, keys,
            query_labels if query_labels is not None else unused,
            key_labels if key_labels is not None else unused,
            self_index if self_index is not None else unused,
            extra if extra is not None else unused,
            *outputs,
            n, m, d, scale,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
            HAS_LABELS=query_labels is not None, HAS_SELF=self_index is not None, HAS_EXTRA=extra is not None,
            IEEE=query.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )

    outputs = torch.empty(3, n, dtype=torch.float32, device=query.device)  # loss, max, sum
    blocks = _choose_blocks("forward", n, m, d, query.dtype, lambda b: launch(b, torch.empty_like(outputs)))
    launch(blocks, outputs)
    return outputs[0], outputs[1], outputs[2]


@on_input_device
def info_nce_grads(query: Tensor, keys: Tensor, query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                   self_index: Optional[Tensor], row_stats, row_coefficients, col_stats, col_coefficients,
                   scale: float, symmetric: bool, keys_grad: bool):
    """Launch the backward kernel: (dQ (N, D), dK (M, D), or (0, D) without ``keys_grad``), float32.

    ``row_stats`` = (max, sum) of the forward, ``row_coefficients`` = (c, c/|P|) per row (see
    the kernel); the column ones are read only when ``symmetric``.
    """
    n, d = query.shape
    m = keys.shape[0]
    row_max, row_sum = row_stats
    row_coef, row_weight = row_coefficients
    col_max, col_sum = col_stats
    col_coef, col_weight = col_coefficients

    def launch(blocks, grad_q, grad_k):
        block_m, block_n, block_d = blocks
        _info_nce_bwd_kernel[(triton.cdiv(m, block_n),)](
            query, keys,
            query_labels if query_labels is not None else row_coef,
            key_labels if key_labels is not None else row_coef,
            self_index if self_index is not None else row_coef,
            row_max, row_sum, row_coef, row_weight, col_max, col_sum, col_coef, col_weight,
            grad_q, grad_k,
            n, m, d, scale,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
            HAS_LABELS=query_labels is not None, HAS_SELF=self_index is not None, SYMMETRIC=symmetric,
            KEYS_GRAD=keys_grad, IEEE=query.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d,
        )

    def zeros():  # dQ and dK accumulate, so every launch starts from zero
        return (torch.zeros(n, d, dtype=torch.float32, device=query.device),
                torch.zeros(m if keys_grad else 0, d, dtype=torch.float32, device=query.device))

    blocks = _choose_blocks("backward", n, m, d, query.dtype, lambda b: launch(b, *zeros()))
    grad_q, grad_k = zeros()
    launch(blocks, grad_q, grad_k)
    return grad_q, grad_k
