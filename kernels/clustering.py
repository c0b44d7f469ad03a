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

from . import occupancy
from .launch import float64_parts, from_float64_parts, on_device

Tensor = torch.Tensor


def block_size(size: int, cap: int) -> int:
    """The block size along a dimension of ``size``: its next power of two, at most ``cap``."""
    return max(16, min(triton.next_power_of_2(size), cap))


@triton.jit
def _lse_shift(running_max):
    """The shift of a running LSE: its max, or 0 while that is -inf (so exp(-inf − shift) is 0, not NaN)."""
    return tl.where(running_max == float("-inf"), 0.0, running_max)


@triton.jit
def _tile_lse(x, floor, AXIS: tl.constexpr):
    """A 2-D tile ``x`` (masked entries -inf) along AXIS: its max m, at least ``floor`` (-inf or a
    running max), the shift (``_lse_shift``) and the sum of exp(x − shift), 0 where m is -inf."""
    tile_max = tl.maximum(floor, tl.max(x, axis=AXIS))
    shift = _lse_shift(tile_max)
    return tile_max, shift, tl.sum(tl.exp(x - tl.expand_dims(shift, AXIS)), axis=AXIS)


@triton.jit
def _online_lse(running_max, running_sum, x, AXIS: tl.constexpr):
    """Fold a 2-D tile ``x`` (masked entries -inf) into a running max and sum of exp(x − max)
    along AXIS; lanes that have seen only -inf keep max -inf and sum 0."""
    new_max, shift, tile_sum = _tile_lse(x, running_max, AXIS)
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
    # pointers
    scores_ptr, potential_ptr, lse_ptr,
    # 1/ε in float32 parts (a float argument is float32; see launch.from_float64_parts)
    inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low,
    # sizes
    B, K,
    # strides
    stride_b, stride_k,
    # meta-parameters
    HAS_POTENTIAL: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    inv_epsilon = from_float64_parts(inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low, FP64)
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
    inv_epsilon = from_float64_parts(inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low, FP64)
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
        self.block_b, self.block_k = phase_blocks(self.dtype, batch, num_prototypes)
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


# ============================================================================================
# The whole iteration in one launch: phases over (BLOCK_B × BLOCK_K) tiles with grid barriers
# ============================================================================================
# Phase 0 (prototype):  partial_k[i, k] = LSE_{b ∈ rows i} (s_bk/ε + v_b)   (v = 0 at phase 0)
# odd phases (sample):  partial_b[j, b] = LSE_{k ∈ prototypes j} (s_bk/ε + u_k)
# even phases > 0 are prototype phases again, the last (2·iterations) writes the codes:
#   Q_bk = exp(s_bk/ε + u_k − L_b).
# Before every phase but the first, a merge step combines the previous phase's partials once for
# the whole grid, each entry's in a fixed order (i = 0, 1, …, or j = 0, 1, …), into the (K,) / (B,)
# LSEs the phase's tiles read: before a sample phase L_k = LSE_i partial_k[i, k], so that
# u_k = log r_k − L_k; before a prototype or the codes phase L_b = LSE_j partial_b[j, b], so that
# v_b = log c_b − L_b (the codes phase reuses the L_k of the sample phase before it). So a launch
# runs 4·iterations + 1 steps (2·iterations + 1 phases and 2·iterations merges) with a grid barrier
# between steps. A tile thus reads BLOCK_K (BLOCK_B) merged values rather than merging
# tiles_b × BLOCK_K (tiles_k × BLOCK_B) partials itself: a phase's merge work is tiles_b (tiles_k)
# times less, 128× (24×) at 4096 × 3000, for one more barrier per phase. No atomics on values, so
# the result is deterministic and the same for one launch per call or one per step (the merge
# folds the partials in the order each tile did). Tiles split both axes, so 4096 × 3000
# gives 128 × 24 tiles where the passes above gave 24 (prototype) / 128 (sample) programs; the
# merge steps share the K (or B) entries among the programs in blocks of BLOCK_K (BLOCK_B).
@triton.jit
def _merge_partials(max_ptr, sum_ptr, lse_ptr, count, parts, acc_dtype, BLOCK: tl.constexpr):
    """lse (count,) = LSE over the ``parts`` partials (max, sum), each (parts, count), of every
    entry, folded in order 0, 1, …; the grid's programs take blocks of BLOCK entries in turn."""
    for start in range(tl.program_id(0) * BLOCK, count, tl.num_programs(0) * BLOCK):
        index = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = index < count
        best = tl.full([BLOCK], float("-inf"), acc_dtype)
        total = tl.zeros([BLOCK], acc_dtype)
        part_max_ptrs, part_sum_ptrs = max_ptr + index, sum_ptr + index  # advanced a part (count) at a time
        for _ in range(0, parts):
            part_max = tl.load(part_max_ptrs, mask=mask, other=float("-inf"))
            part_sum = tl.load(part_sum_ptrs, mask=mask, other=0.0)
            new_max = tl.maximum(best, part_max)
            shift = _lse_shift(new_max)
            total = total * tl.exp(best - shift) + part_sum * tl.exp(part_max - shift)
            best = new_max
            part_max_ptrs += count
            part_sum_ptrs += count
        tl.store(lse_ptr + index, best + tl.log(tl.where(mask, total, 1.0)), mask=mask)


@triton.jit
def _grid_barrier(counter_ptr, target):
    """Wait until ``target`` arrivals (programs × barriers so far) have reached the counter, this
    program's own included: release its stores, acquire everyone's (a cooperative launch keeps all
    programs resident, so the spin ends)."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    while arrived < target:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _sinkhorn_phases_kernel(
    # pointers: scores (B, K), log r (K,), log c (B,), codes (B, K) contiguous, partials of the
    # prototype LSEs (tiles_b, K) and of the sample LSEs (tiles_k, B) as (max, sum), their merged
    # LSEs L_k (K,) and L_b (B,), the barrier counter
    scores_ptr, log_r_ptr, log_c_ptr, codes_ptr, proto_max_ptr, proto_sum_ptr, sample_max_ptr, sample_sum_ptr,
    proto_lse_ptr, sample_lse_ptr, counter_ptr,
    # 1/ε in float32 parts
    inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low,
    # sizes, strides, the steps this launch runs [first, last) of 4·iterations + 1 (step 2p is
    # phase p, step 2p − 1 the merge before it), the codes phase (2·iterations)
    B, K, stride_b, stride_k, first_step, last_step, codes_phase,
    # meta-parameters
    GRID_SYNC: tl.constexpr, FP64: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr,
):
    acc_dtype = tl.float64 if FP64 else tl.float32
    inv_epsilon = from_float64_parts(inv_epsilon_high, inv_epsilon_middle, inv_epsilon_low, FP64)
    tiles_b = tl.cdiv(B, BLOCK_B)
    tiles_k = tl.cdiv(K, BLOCK_K)
    programs = tl.num_programs(0)
    for step in range(first_step, last_step):
        phase = (step + 1) // 2
        if step % 2 == 1:  # the merge before a phase
            if phase % 2 == 1:  # a sample phase: L_k over the row tiles
                _merge_partials(proto_max_ptr, proto_sum_ptr, proto_lse_ptr, K, tiles_b, acc_dtype, BLOCK_K)
            else:  # a prototype or the codes phase: L_b over the prototype tiles
                _merge_partials(sample_max_ptr, sample_sum_ptr, sample_lse_ptr, B, tiles_k, acc_dtype, BLOCK_B)
        else:
            for tile in range(tl.program_id(0), tiles_b * tiles_k, programs):
                tile_b = tile // tiles_k
                tile_k = tile % tiles_k
                b = tile_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
                k = tile_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
                b_mask, k_mask = b < B, k < K
                mask = b_mask[:, None] & k_mask[None, :]
                x = tl.load(scores_ptr + b[:, None] * stride_b + k[None, :] * stride_k, mask=mask, other=0.0)
                x = x.to(acc_dtype) * inv_epsilon
                if phase % 2 == 0 and phase != codes_phase:  # prototype phase: rows' potentials, partial over rows
                    if phase > 0:
                        v = tl.load(log_c_ptr + b, mask=b_mask, other=0.0).to(acc_dtype) - tl.load(
                            sample_lse_ptr + b, mask=b_mask, other=0.0)
                        x += v[:, None]
                    part_max, _, part_sum = _tile_lse(tl.where(mask, x, float("-inf")), float("-inf"), 0)
                    tl.store(proto_max_ptr + tile_b * K + k, part_max, mask=k_mask)
                    tl.store(proto_sum_ptr + tile_b * K + k, part_sum, mask=k_mask)
                else:  # sample or codes phase: prototypes' potentials
                    u = tl.load(log_r_ptr + k, mask=k_mask, other=0.0).to(acc_dtype) - tl.load(
                        proto_lse_ptr + k, mask=k_mask, other=0.0)
                    x = tl.where(mask, x + u[None, :], float("-inf"))
                    if phase == codes_phase:
                        lse = tl.load(sample_lse_ptr + b, mask=b_mask, other=0.0)
                        codes = tl.exp(x - lse[:, None])
                        tl.store(codes_ptr + b[:, None] * K + k[None, :], codes.to(codes_ptr.dtype.element_ty),
                                 mask=mask)
                    else:
                        part_max, _, part_sum = _tile_lse(x, float("-inf"), 1)
                        tl.store(sample_max_ptr + tile_k * B + b, part_max, mask=b_mask)
                        tl.store(sample_sum_ptr + tile_k * B + b, part_sum, mask=b_mask)
        if GRID_SYNC:
            if step + 1 < last_step:
                _grid_barrier(counter_ptr, (step - first_step + 1) * programs)


# Programs a cooperative launch keeps resident per SM: 4 warps each, registers ≤ 65,536 / (4 · 128)
# = 128 per thread (tests/runtime/test_gpu_static.py checks the compiled kernel against it)
RESIDENT_PROGRAMS_PER_SM = 4
PHASE_WARPS = 4


def phase_blocks(dtype: torch.dtype, batch: int, num_prototypes: int):
    """(BLOCK_B, BLOCK_K) of ``_sinkhorn_phases_kernel``: 32 × 128 tiles (16 × 128 in float64, whose
    32 × 128 tile of the sample pass spilled 4 KB per thread), smaller for a small problem."""
    return block_size(batch, 16 if dtype == torch.float64 else 32), block_size(num_prototypes, 128)


def persistent(scores: Tensor) -> bool:
    """Whether the whole iteration runs in one cooperative launch: on a card (the interpreter runs
    programs one after another, so a grid barrier could never be passed: one launch per phase)."""
    return scores.device.type != "cpu"


def sinkhorn_codes(scores: Tensor, iterations: int, epsilon: float, log_r: Tensor, log_c: Tensor) -> Tensor:
    """Sinkhorn-Knopp codes (B, K) in the scores' dtype after ``iterations`` ≥ 1 row steps, with
    log marginals log r (K,) and log c (B,) in the compute dtype, no tolerance: one launch of
    4·iterations + 1 steps (2·iterations + 1 phases, a merge before each but the first) on a card,
    one launch per step under the interpreter."""
    batch, num_prototypes = scores.shape
    dtype = log_r.dtype
    block_b, block_k = phase_blocks(dtype, batch, num_prototypes)
    tiles_b, tiles_k = triton.cdiv(batch, block_b), triton.cdiv(num_prototypes, block_k)
    device = scores.device
    proto = torch.empty(2, tiles_b, num_prototypes, dtype=dtype, device=device)
    sample = torch.empty(2, tiles_k, batch, dtype=dtype, device=device)
    proto_lse = torch.empty(num_prototypes, dtype=dtype, device=device)
    sample_lse = torch.empty(batch, dtype=dtype, device=device)
    codes = torch.empty(scores.shape, dtype=scores.dtype, device=device)
    counter = torch.zeros(1, dtype=torch.int32, device=device)
    steps, codes_phase = 4 * iterations + 1, 2 * iterations
    cooperative = persistent(scores)
    programs = min(tiles_b * tiles_k, RESIDENT_PROGRAMS_PER_SM * occupancy.multiprocessors(device)) if cooperative \
        else tiles_b * tiles_k
    arguments = (scores, log_r.contiguous(), log_c.contiguous(), codes, proto[0], proto[1], sample[0], sample[1],
                 proto_lse, sample_lse, counter, *float64_parts(1.0 / epsilon), batch, num_prototypes,
                 *scores.stride())
    meta = dict(FP64=dtype == torch.float64, BLOCK_B=block_b, BLOCK_K=block_k, num_warps=PHASE_WARPS)
    with on_device(scores):
        if cooperative:
            _sinkhorn_phases_kernel[(programs,)](*arguments, 0, steps, codes_phase, GRID_SYNC=True,
                                                 launch_cooperative_grid=True, **meta)
        else:
            for step in range(steps):
                _sinkhorn_phases_kernel[(programs,)](*arguments, step, step + 1, codes_phase, GRID_SYNC=False, **meta)
    return codes
