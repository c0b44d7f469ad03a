"""Triton kernels of the contrastive family: InfoNCE / NT-Xent in O(N + M) memory.

Kernels and their launchers only (a leaf: torch and triton, nothing of fastssl); the op glue is
``fastssl.contrastive.triton_backend``. Same contract as ``fastssl.contrastive.reference.info_nce``.

Designed for the card (issue 17): half inputs go to tensor cores with fp32 accumulation; float32
runs IEEE FMA by default and TF32 tensor cores when ``torch.backends.cuda.matmul.allow_tf32`` is
set (the switch cuBLAS and Inductor read); every pass splits the side it streams so that small
batches (MoCo's 256 queries against 65,536 keys) still launch ≥ 2 programs per SM, and merges the
splits in a fixed order (deterministic: no atomics anywhere).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import occupancy
from .launch import fastest, on_input_device, shape_bucket

Tensor = torch.Tensor

# Every pass is written for an *owner* side (rows a, the program's BLOCK_M rows) and a *streamed*
# side (rows b, visited BLOCK_N at a time); for the row losses the owner is the queries, for the
# column losses and dK the keys. A program owns BLOCK_M rows and one split of the streamed rows:
#
#   s_ab = scale · a · b                      (tl.dot over BLOCK_D chunks of D, fp32 accumulate)
#   s_ab = -inf  where b is out of range or is the query's self_index
#
# Forward (owner = queries):
#   m_a = max_b s_ab,  l_a = Σ_b exp(s_ab - m_a)   (online: rescale l by exp(m_old - m_new))
#   P_a = {b : label_b == label_a, b not self}:  Σ_{P_a} s_ab and |P_a| accumulated
#   loss_a = (m_a - mean_{P_a} s_ab) + log l_a      (0 when P_a is empty)
# With an extra logit e_a per row (MoCo's positive q·p, computed outside), the running (m, l) of
# split 0 start at (e_a, 1) and loss_a = (m_a - e_a) + log l_a. One split: the program writes
# (loss, m, l); several: each writes its partial (m, l, Σ_P s, |P|) and ``_info_nce_merge_kernel``
# combines them in split order. Saved for the backward: m and l per row (the loss is assembled
# from m − positive so a tiny loss keeps its digits at τ = 0.01).


@triton.jit
def _logit_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, scale, stride_an, stride_ad, stride_bn, stride_bd,
                INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """scale · A[rows] B[cols]ᵀ, (BLOCK_M, BLOCK_N) fp32, accumulated over BLOCK_D chunks of D."""
    dims = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for d_start in range(0, D, BLOCK_D):
        d = d_start + dims
        a = tl.load(a_ptr + rows[:, None] * stride_an + d[None, :] * stride_ad,
                    mask=row_ok[:, None] & (d[None, :] < D), other=0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + d[None, :] * stride_bd,
                    mask=col_ok[:, None] & (d[None, :] < D), other=0.0)
        acc += tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION)
    return acc * scale


@triton.jit
def _split_range(count, per_split):
    """[begin, end) of this program's split (axis 1 of the grid) of ``count`` streamed rows."""
    begin = tl.program_id(1).to(tl.int64) * per_split
    return begin, tl.minimum(begin + per_split, count)


@triton.jit
def _store_row_results(out_ptr, extra_ptr, rows, row_ok, N, row_max, row_sum, positive_sum, positive_count,
                       HAS_EXTRA: tl.constexpr):
    """(loss, max, sum) of each row into rows 0, 1, 2 of ``out`` (3, N)."""
    log_sum = tl.log(tl.where(row_ok, row_sum, 1.0))  # padding rows saw no column
    if HAS_EXTRA:
        loss = (row_max - tl.load(extra_ptr + rows, mask=row_ok, other=0.0)) + log_sum
    else:
        loss = (row_max - positive_sum / tl.maximum(positive_count, 1.0)) + log_sum
        loss = tl.where(positive_count > 0, loss, 0.0)
    tl.store(out_ptr + rows, loss, mask=row_ok)
    tl.store(out_ptr + N + rows, row_max, mask=row_ok)
    tl.store(out_ptr + 2 * N + rows, row_sum, mask=row_ok)


@triton.jit
def _info_nce_fwd_kernel(
    # pointers
    q_ptr, k_ptr, query_label_ptr, key_label_ptr, self_index_ptr, extra_ptr, out_ptr,
    # sizes
    N, M, D, scale, keys_per_split,
    # strides
    stride_qn, stride_qd, stride_kn, stride_kd,
    # meta-parameters
    HAS_LABELS: tl.constexpr, HAS_SELF: tl.constexpr, HAS_EXTRA: tl.constexpr, SPLIT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Grid (row blocks, splits); ``out`` is (3, N) (loss, max, sum) or with SPLIT the partials
    (4, splits, N) (max, sum, Σ_P s, |P|)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_begin, col_end = _split_range(M, keys_per_split)
    if HAS_LABELS:
        query_label = tl.load(query_label_ptr + rows, mask=row_ok, other=0)
    if HAS_SELF:
        self_col = tl.load(self_index_ptr + rows, mask=row_ok, other=-1)
    row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_EXTRA:  # the positive logit counts once: in split 0
        first = tl.program_id(1) == 0
        row_max = tl.where(first, tl.load(extra_ptr + rows, mask=row_ok, other=0.0), row_max)
        row_sum = tl.where(first, 1.0, row_sum)
    positive_sum = tl.zeros((BLOCK_M,), tl.float32)
    positive_count = tl.zeros((BLOCK_M,), tl.float32)
    for col_start in range(col_begin, col_end, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < col_end
        logits = _logit_tile(q_ptr, k_ptr, rows, cols, row_ok, col_ok, D, scale, stride_qn, stride_qd,
                             stride_kn, stride_kd, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
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
    if SPLIT:
        partial = out_ptr + tl.program_id(1) * N + rows
        stride = tl.num_programs(1) * N
        tl.store(partial, row_max, mask=row_ok)
        tl.store(partial + stride, row_sum, mask=row_ok)
        tl.store(partial + 2 * stride, positive_sum, mask=row_ok)
        tl.store(partial + 3 * stride, positive_count, mask=row_ok)
    else:
        _store_row_results(out_ptr, extra_ptr, rows, row_ok, N, row_max, row_sum, positive_sum, positive_count,
                           HAS_EXTRA)


@triton.jit
def _info_nce_merge_kernel(partial_ptr, extra_ptr, out_ptr, N, SPLITS, HAS_EXTRA: tl.constexpr, BLOCK: tl.constexpr):
    """The forward's partials (4, SPLITS, N) merged in split order into (loss, max, sum) (3, N)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < N
    row_max = tl.full((BLOCK,), float("-inf"), tl.float32)
    row_sum = tl.zeros((BLOCK,), tl.float32)
    positive_sum = tl.zeros((BLOCK,), tl.float32)
    positive_count = tl.zeros((BLOCK,), tl.float32)
    stride = SPLITS * N
    for split in range(0, SPLITS):
        partial = partial_ptr + split * N + rows
        split_max = tl.load(partial, mask=row_ok, other=float("-inf"))
        new_max = tl.maximum(row_max, split_max)
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        row_sum = (row_sum * tl.exp(row_max - shift)
                   + tl.load(partial + stride, mask=row_ok, other=0.0) * tl.exp(split_max - shift))
        row_max = new_max
        positive_sum += tl.load(partial + 2 * stride, mask=row_ok, other=0.0)
        positive_count += tl.load(partial + 3 * stride, mask=row_ok, other=0.0)
    _store_row_results(out_ptr, extra_ptr, rows, row_ok, N, row_max, row_sum, positive_sum, positive_count, HAS_EXTRA)


# Backward, one pass per gradient, each owning its rows (no atomics: deterministic). With the
# owner's and the streamed side's losses (each present or not: the row loss always, the column
# loss when symmetric), each logit tile is recomputed and
#
#   G_ab = c_a · exp(s_ab - m_a) / l_a - w_a · [b ∈ P_a]      (owner's loss,    c = g·scale, w = c/|P|)
#        + c_b · exp(s_ab - m_b) / l_b - w_b · [a ∈ P_b]      (streamed side's loss)
#   dA[:, chunk] += G · B[:, chunk]                             (fp32 accumulator in registers)
#
# Grid (owner row blocks, splits of the streamed side, BLOCK_DO chunks of D): each program writes
# its own slice of ``out`` (splits, Na, D), summed over splits by the launcher (in split order).
# float16: before its cast for the tensor cores, each tile row is scaled by a power of two to
# max |G| ≈ 1 and the product scaled back, so a tile of tiny gradients (g·scale·p ≈ 3.7e-8 at
# N = M = 16,384, under fp16's subnormals) keeps its digits instead of flushing to zero.


@triton.jit
def _info_nce_grad_kernel(
    # pointers; stats are (4, rows) float32: max, sum, c, w (the owner's or the streamed side's loss)
    a_ptr, b_ptr, a_label_ptr, b_label_ptr, self_index_ptr, a_stats_ptr, b_stats_ptr, out_ptr,
    # sizes
    NA, NB, D, scale, cols_per_split,
    # strides
    stride_an, stride_ad, stride_bn, stride_bd,
    # meta-parameters
    HAS_LABELS: tl.constexpr, HAS_SELF: tl.constexpr, SELF_ON_OWNER: tl.constexpr, OWNER_LOSS: tl.constexpr,
    STREAMED_LOSS: tl.constexpr, RESCALE: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DO: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NA
    col_begin, col_end = _split_range(NB, cols_per_split)
    out_dims = tl.program_id(2) * BLOCK_DO + tl.arange(0, BLOCK_DO)
    out_ok = out_dims < D
    if HAS_LABELS:
        row_label = tl.load(a_label_ptr + rows, mask=row_ok, other=0)
    if HAS_SELF and SELF_ON_OWNER:
        row_self = tl.load(self_index_ptr + rows, mask=row_ok, other=-1)
    if OWNER_LOSS:
        row_max = tl.load(a_stats_ptr + rows, mask=row_ok, other=0.0)
        row_factor = (tl.load(a_stats_ptr + 2 * NA + rows, mask=row_ok, other=0.0)
                      / tl.load(a_stats_ptr + NA + rows, mask=row_ok, other=1.0))
        row_weight = tl.load(a_stats_ptr + 3 * NA + rows, mask=row_ok, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_DO), tl.float32)
    for col_start in range(col_begin, col_end, BLOCK_N):
        cols = col_start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < col_end
        logits = _logit_tile(a_ptr, b_ptr, rows, cols, row_ok, col_ok, D, scale, stride_an, stride_ad,
                             stride_bn, stride_bd, INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_D)
        valid = row_ok[:, None] & col_ok[None, :]
        if HAS_SELF:
            if SELF_ON_OWNER:
                valid = valid & (cols[None, :] != row_self[:, None])
            else:
                col_self = tl.load(self_index_ptr + cols, mask=col_ok, other=-1)
                valid = valid & (rows[:, None] != col_self[None, :])
        if HAS_LABELS:
            positive = row_label[:, None] == tl.load(b_label_ptr + cols, mask=col_ok, other=0)[None, :]
        grad = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if OWNER_LOSS:
            grad += tl.exp(logits - row_max[:, None]) * row_factor[:, None]
            if HAS_LABELS:
                grad -= tl.where(positive, row_weight[:, None], 0.0)
        if STREAMED_LOSS:
            col_max = tl.load(b_stats_ptr + cols, mask=col_ok, other=0.0)
            col_factor = (tl.load(b_stats_ptr + 2 * NB + cols, mask=col_ok, other=0.0)
                          / tl.load(b_stats_ptr + NB + cols, mask=col_ok, other=1.0))
            grad += tl.exp(logits - col_max[None, :]) * col_factor[None, :]
            if HAS_LABELS:
                grad -= tl.where(positive, tl.load(b_stats_ptr + 3 * NB + cols, mask=col_ok, other=0.0)[None, :], 0.0)
        grad = tl.where(valid, grad, 0.0)
        b = tl.load(b_ptr + cols[:, None] * stride_bn + out_dims[None, :] * stride_bd,
                    mask=col_ok[:, None] & out_ok[None, :], other=0.0)
        if RESCALE:
            largest = tl.max(tl.abs(grad), 1)
            exponent = tl.ceil(tl.log2(tl.where(largest > 0, largest, 1.0)))  # an all-zero row keeps 2^0
            scaled = (grad * tl.exp2(-exponent)[:, None]).to(b.dtype)
            acc += tl.dot(scaled, b) * tl.exp2(exponent)[:, None]
        else:
            acc += tl.dot(grad.to(b.dtype), b, input_precision=INPUT_PRECISION)
    out = out_ptr + (tl.program_id(1) * NA + rows)[:, None] * D + out_dims[None, :]
    tl.store(out, acc, mask=row_ok[:, None] & out_ok[None, :])


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: float32 takes "ieee" (FMA, as torch's default) unless
    ``torch.backends.cuda.matmul.allow_tf32`` is set, then "tf32" (tensor cores). Half operands get
    "tf32", Triton's default, which leaves them on the tensor cores ("ieee" sent bf16 to FMA)."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


# Largest D chunk a backward program accumulates in registers: D up to this is one chunk (each
# logit tile computed once per pass); a wider D is cut into chunks that each recompute the logits.
# Half operands: 256 on sm_90 (no spill at 64 × 64 × 32 tiles); 128 before it (256 spilled 80 B
# per thread on sm_80).
MAX_OWNED_D = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 128}
MAX_OWNED_D_BEFORE_SM90 = 128


def _blocks(n: int, m: int, d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, BLOCK_D) of either pass, each cut to the sizes (down to 16, tl.dot's
    minimum). Compiled for sm_90 and sm_80 with ``launch_options``: half tiles of 64 × 64 × 32 spill nothing (64 × 64 × 64 spilled 96 B per
    thread on sm_80, 128-wide tiles ~1 KB); float32 through IEEE FMA takes 32 × 32 × 32 (64-wide
    tiles spilled 23-65 KB per thread in the backward), through TF32 64 × 64 × 32 (wgmma)."""
    largest = (32, 32, 32) if dtype == torch.float32 and input_precision(dtype) == "ieee" else (64, 64, 32)
    return tuple(max(16, min(block, triton.next_power_of_2(size))) for block, size in zip(largest, (n, m, d)))


def launch_options(kind: str, blocks) -> dict:
    """num_warps / num_stages of a pass at ``blocks``: the backward, which also holds a
    (BLOCK_M, BLOCK_DO) fp32 accumulator, 8 warps (4 spilled 52 B per thread on sm_90 at 32-wide
    fp32 tiles); the forward 8 from 64-row tiles (4 spill 1-3 KB there), 4 below."""
    return {"num_warps": 8 if kind == "backward" or blocks[0] >= 64 else 4, "num_stages": 2}


def owned_block(d: int, dtype: torch.dtype, device: torch.device) -> int:
    """BLOCK_DO: the D chunk one backward program accumulates (all of D up to MAX_OWNED_D)."""
    largest = MAX_OWNED_D[dtype]
    if occupancy.capability_major(device) < 9:
        largest = min(largest, MAX_OWNED_D_BEFORE_SM90)
    return max(16, min(largest, triton.next_power_of_2(d)))


AUTOTUNE_CANDIDATES = ((64, 64, 32), (64, 32, 32), (32, 32, 32))  # none spills on sm_80 / sm_90
def autotune_candidates(n: int, m: int, d: int, dtype: torch.dtype) -> list:
    """The blocks ``FASTSSL_TRITON_AUTOTUNE=1`` times: the heuristic's and the candidates that fit
    D (BLOCK_D ≤ 2D) and, for float32 through IEEE FMA, 32 × 32 tiles (larger ones spill)."""
    ieee = dtype == torch.float32 and input_precision(dtype) == "ieee"
    fitting = {blocks for blocks in AUTOTUNE_CANDIDATES
               if blocks[2] <= max(16, d * 2) and not (ieee and blocks[0] * blocks[1] > 32 * 32)}
    return sorted({_blocks(n, m, d, dtype)} | fitting)


def _choose_blocks(kind: str, n: int, m: int, d: int, dtype: torch.dtype, trial) -> tuple:
    """The heuristic's blocks, or with ``FASTSSL_TRITON_AUTOTUNE=1`` the fastest candidate.

    ``trial(blocks)`` runs the kernel once on scratch outputs; timed with
    ``triton.testing.do_bench`` (median, warm-up excluded) once per process and shape bucket (N
    and M to their next power of two: ragged batches share a run), candidates that fail to compile
    or launch dropped (``launch.fastest``).
    """
    if os.environ.get("FASTSSL_TRITON_AUTOTUNE", "0") in ("", "0"):
        return _blocks(n, m, d, dtype)
    key = ("info_nce", kind, shape_bucket(n), shape_bucket(m), d, dtype, input_precision(dtype))
    return fastest(key, autotune_candidates(n, m, d, dtype),
                   lambda blocks: triton.testing.do_bench(lambda: trial(blocks)))


def forward_grid(n: int, m: int, blocks, device: torch.device):
    """(grid, keys per split) of ``_info_nce_fwd_kernel`` for N queries against M keys."""
    row_blocks = triton.cdiv(n, blocks[0])
    count, per_split = occupancy.splits(row_blocks, m, blocks[1], device)
    return (row_blocks, count), per_split


def backward_grid(na: int, nb: int, d: int, dtype: torch.dtype, blocks, device: torch.device):
    """(grid, streamed rows per split) of ``_info_nce_grad_kernel`` owning Na rows against Nb."""
    row_blocks = triton.cdiv(na, blocks[0])
    d_chunks = triton.cdiv(d, owned_block(d, dtype, device))
    count, per_split = occupancy.splits(row_blocks * d_chunks, nb, blocks[1], device)
    return (row_blocks, count, d_chunks), per_split


MERGE_BLOCK = 256


def _pointers(tensors, placeholder: Tensor) -> list:
    """The optional inputs of a launch, ``placeholder`` for those absent (its kernel never reads them)."""
    return [tensor if tensor is not None else placeholder for tensor in tensors]


@on_input_device
def info_nce_row_statistics(query: Tensor, keys: Tensor, query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                            self_index: Optional[Tensor], extra: Optional[Tensor], scale: float):
    """Launch the forward kernel (and the merge of its splits): (loss, max, sum), each (N,) float32."""
    n, d = query.shape
    m = keys.shape[0]

    def launch(blocks, out):
        block_m, block_n, block_d = blocks
        grid, per_split = forward_grid(n, m, blocks, query.device)
        count = grid[1]
        partial = torch.empty(4, count, n, dtype=torch.float32, device=query.device) if count > 1 else out
        _info_nce_fwd_kernel[grid](
            query, keys, *_pointers((query_labels, key_labels, self_index, extra), out), partial,
            n, m, d, scale, per_split,
            query.stride(0), query.stride(1), keys.stride(0), keys.stride(1),
            HAS_LABELS=query_labels is not None, HAS_SELF=self_index is not None, HAS_EXTRA=extra is not None,
            SPLIT=count > 1, INPUT_PRECISION=input_precision(query.dtype), BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_D=block_d, **launch_options("forward", blocks),
        )
        if count > 1:
            _info_nce_merge_kernel[(triton.cdiv(n, MERGE_BLOCK),)](
                partial, *_pointers((extra,), out), out, n, count, HAS_EXTRA=extra is not None,
                BLOCK=MERGE_BLOCK)

    out = torch.empty(3, n, dtype=torch.float32, device=query.device)  # loss, max, sum
    blocks = _choose_blocks("forward", n, m, d, query.dtype, lambda b: launch(b, torch.empty_like(out)))
    launch(blocks, out)
    return out[0], out[1], out[2]


def owner_gradient(owner: Tensor, streamed: Tensor, owner_labels: Optional[Tensor], streamed_labels: Optional[Tensor],
                   self_index: Optional[Tensor], self_on_owner: bool, owner_stats: Optional[Tensor],
                   streamed_stats: Optional[Tensor], scale: float) -> Tensor:
    """The gradient (Na, D) float32 of the owner side (see ``_info_nce_grad_kernel``).

    ``owner_stats`` / ``streamed_stats``: (4, rows) float32 (max, sum, c, w) of that side's loss,
    None where the side has none; ``self_index`` indexes the queries (the owner iff ``self_on_owner``).
    Split, the pass writes (splits, Na, D) float32 partial gradients: splits > 1 only while the
    programs of one split are fewer than P = PROGRAMS_PER_SM·SMs, and splits < 2⌈P / programs⌉, so
    the partials hold fewer than 4P·BLOCK_M rows (68k on an H100: 35 MB at D = 128).
    """
    na, d = owner.shape
    nb = streamed.shape[0]

    def launch(blocks):
        block_m, block_n, block_d = blocks
        grid, per_split = backward_grid(na, nb, d, owner.dtype, blocks, owner.device)
        count = grid[1]
        out = torch.empty(count, na, d, dtype=torch.float32, device=owner.device)
        _info_nce_grad_kernel[grid](
            owner, streamed, *_pointers((owner_labels, streamed_labels, self_index, owner_stats, streamed_stats), out),
            out,
            na, nb, d, scale, per_split,
            owner.stride(0), owner.stride(1), streamed.stride(0), streamed.stride(1),
            HAS_LABELS=owner_labels is not None, HAS_SELF=self_index is not None, SELF_ON_OWNER=self_on_owner,
            OWNER_LOSS=owner_stats is not None, STREAMED_LOSS=streamed_stats is not None,
            RESCALE=owner.dtype == torch.float16, INPUT_PRECISION=input_precision(owner.dtype),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DO=owned_block(d, owner.dtype, owner.device),
            **launch_options("backward", blocks),
        )
        return out[0] if count == 1 else out.sum(0)  # a fixed-order reduction: deterministic

    blocks = _choose_blocks("backward", na, nb, d, owner.dtype, launch)
    return launch(blocks)


@on_input_device
def info_nce_grads(query: Tensor, keys: Tensor, query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                   self_index: Optional[Tensor], row_stats: Tensor, col_stats: Optional[Tensor], scale: float,
                   keys_grad: bool):
    """dQ (N, D) and dK (M, D), or (0, D) without ``keys_grad``, float32: one owner pass each.

    ``row_stats`` (4, N) = (max, sum, c, c/|P|) of the row losses; ``col_stats`` (4, M) the same of
    the column losses (symmetric), or None.
    """
    grad_q = owner_gradient(query, keys, query_labels, key_labels, self_index, True, row_stats, col_stats, scale)
    if not keys_grad:
        return grad_q, grad_q.new_zeros(0, query.shape[1])
    grad_k = owner_gradient(keys, query, key_labels, query_labels, self_index, False, col_stats, row_stats, scale)
    return grad_q, grad_k
