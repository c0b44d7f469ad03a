"""Triton kernels of the redundancy-reduction family: Barlow Twins and VICReg.

Kernels and their launchers only (a leaf: torch and triton, nothing of fastssl); the op glue is
``fastssl.redundancy.triton_backend``. Same contracts and algebra as the torch backend
(``fastssl.redundancy.torch_backend``: the formulas and the Gram / direct choice); what the
kernels add:

* the forward never writes a normalised view nor a product matrix: one kernel takes the column
  statistics of both views (with the diagonal terms of Barlow Twins and the variance hinge of
  VICReg), one more multiplies tiles of the normalised views — normalising them as they are
  loaded — and reduces each tile of the Gram or correlation matrix to its share of ‖·‖²_F;
* so the forward saves O(D) statistics only, and the backward rebuilds what it needs: the
  normalised views (a kernel), the products (torch GEMMs, cuBLAS being the better GEMM), and
  the input gradients (one fused kernel per loss).

Inputs of any float dtype are read as they are and computed in float32 (float64 for float64);
the product kernels hand normalised half inputs to the tensor cores in their own dtype.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from . import occupancy
from .launch import flat_grid, on_input_device

Tensor = torch.Tensor

BLOCK_ROWS = 32  # rows of a view per step of the column kernels
BLOCK_COLUMNS = 64  # columns per program of the column kernels
BLOCK_REDUCED = 32  # step along the reduced dimension of a product tile


def _tile(size: int, dtype: torch.dtype) -> int:
    """Side of a square product tile: 16 (tl.dot's minimum) to 64 (32 in float64), no larger than
    needed. Compiled for sm_90, a float64 tile of 64 needs 360,448 B of shared memory (an H100 has
    232,448 per block); 32 needs 180,224 (``tests/runtime/test_gpu_static.py`` checks every choice)."""
    return max(16, min(32 if dtype == torch.float64 else 64, triton.next_power_of_2(size)))


def product_launch_options(block: int) -> dict:
    """num_warps / num_stages of ``_product_frobenius_kernel`` at tile side ``block``: with 4 warps
    its two (block × block) accumulators and four operand tiles spill registers (up to 1.9 KB per
    thread at 64 on sm_80), and 3 stages need 180,224 B of shared memory (sm_80 has 166,912); 8
    warps and 2 stages: no spill, ≤ 98,304 B at every tile and dtype."""
    return {"num_warps": 8 if block >= 32 else 4, "num_stages": 2}


def product_reduced_step(block: int, two_products: bool, dtype: torch.dtype, device: torch.device) -> int:
    """BLOCK_REDUCED of the product kernels: BLOCK_REDUCED, but 16 for two half-precision products
    of 64-wide tiles on a pre-Hopper card. There, with 32, the two accumulators and four 64 × 32
    operand tiles of 8 warps spill 88 B per thread on sm_80 (255 registers); 16 halves the operand
    tiles: no spill at 181 registers, the 2 stages kept (16 warps still spill 48 B, 1 stage would
    lose the pipelining). sm_90 keeps 32 (no spill there: 185 registers)."""
    if two_products and block == 64 and dtype.itemsize == 2 and occupancy.capability_major(device) < 9:
        return 16
    return BLOCK_REDUCED


@triton.jit
def _row_block(start, cols, batch, columns, BLOCK_ROWS: tl.constexpr):
    """Rows [start, start + BLOCK_ROWS) of columns ``cols`` of a (batch, columns) matrix:
    (rows, element offsets, in-bounds mask)."""
    rows = start + tl.arange(0, BLOCK_ROWS).to(tl.int64)
    return rows, rows[:, None] * columns + cols[None, :], (rows[:, None] < batch) & (cols[None, :] < columns)


# Column statistics, one program per BLOCK_COLUMNS columns of both views (B, C), C = G·D:
#
#   pass 1:  mean = Σ_n z / B
#   pass 2:  ss = Σ_n (z − mean)² − (Σ_n (z − mean))² / B,  cross = Σ_n (z_a − mean_a)(z_b − mean_b)
#            (the corrected two-pass algorithm: stable, and free of the rounding of the mean)
#
#   Barlow Twins (biased variance):  rstd = 1 / sqrt(ss / B + bn_eps),  c = cross · rstd_a · rstd_b / B
#       stats = [mean_a, rstd_a, mean_b, rstd_b, c, (1 − c)² − λ c²]       (the diagonal terms)
#   VICReg (unbiased variance):      var = ss / (B − 1),  hinge = relu(1 − sqrt(var + eps))
#       stats = [mean_a, var_a, mean_b, var_b, hinge_a, hinge_b]
#
# Accumulates in the dtype of ``stats`` (float32, float64 for float64 inputs).
@triton.jit
def _column_stats_kernel(
    # pointers
    za_ptr, zb_ptr, stats_ptr,
    # sizes
    batch, columns,
    # parameters: Barlow Twins λ and batch-norm eps, or VICReg's eps (second unused)
    param, bn_eps,
    # meta-parameters
    BARLOW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    acc_dtype = stats_ptr.dtype.element_ty
    cols = tl.program_id(0).to(tl.int64) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    col_ok = cols < columns
    sum_a = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    sum_b = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    for start in range(0, batch, BLOCK_ROWS):
        _, offsets, mask = _row_block(start, cols, batch, columns, BLOCK_ROWS)
        sum_a += tl.sum(tl.load(za_ptr + offsets, mask=mask, other=0.0).to(acc_dtype), axis=0)
        sum_b += tl.sum(tl.load(zb_ptr + offsets, mask=mask, other=0.0).to(acc_dtype), axis=0)
    mean_a = sum_a / batch
    mean_b = sum_b / batch
    ss_a = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    ss_b = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    residual_a = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    residual_b = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    cross = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    for start in range(0, batch, BLOCK_ROWS):
        _, offsets, mask = _row_block(start, cols, batch, columns, BLOCK_ROWS)
        xa = tl.where(mask, tl.load(za_ptr + offsets, mask=mask, other=0.0).to(acc_dtype) - mean_a[None, :], 0.0)
        xb = tl.where(mask, tl.load(zb_ptr + offsets, mask=mask, other=0.0).to(acc_dtype) - mean_b[None, :], 0.0)
        ss_a += tl.sum(xa * xa, axis=0)
        ss_b += tl.sum(xb * xb, axis=0)
        residual_a += tl.sum(xa, axis=0)
        residual_b += tl.sum(xb, axis=0)
        if BARLOW:
            cross += tl.sum(xa * xb, axis=0)
    ss_a -= residual_a * residual_a / batch
    ss_b -= residual_b * residual_b / batch
    tl.store(stats_ptr + cols, mean_a, mask=col_ok)
    tl.store(stats_ptr + 2 * columns + cols, mean_b, mask=col_ok)
    if BARLOW:
        rstd_a = 1.0 / tl.sqrt(ss_a / batch + bn_eps)
        rstd_b = 1.0 / tl.sqrt(ss_b / batch + bn_eps)
        c = cross * rstd_a * rstd_b / batch
        tl.store(stats_ptr + columns + cols, rstd_a, mask=col_ok)
        tl.store(stats_ptr + 3 * columns + cols, rstd_b, mask=col_ok)
        tl.store(stats_ptr + 4 * columns + cols, c, mask=col_ok)
        tl.store(stats_ptr + 5 * columns + cols, (1.0 - c) * (1.0 - c) - param * c * c, mask=col_ok)
    else:
        var_a = ss_a / (batch - 1)
        var_b = ss_b / (batch - 1)
        tl.store(stats_ptr + columns + cols, var_a, mask=col_ok)
        tl.store(stats_ptr + 3 * columns + cols, var_b, mask=col_ok)
        tl.store(stats_ptr + 4 * columns + cols, tl.maximum(1.0 - tl.sqrt(var_a + param), 0.0), mask=col_ok)
        tl.store(stats_ptr + 5 * columns + cols, tl.maximum(1.0 - tl.sqrt(var_b + param), 0.0), mask=col_ok)


@triton.jit
def _load_normalized(z_ptr, stats_ptr, mean_row, batch_index, feature_index, group,
                     batch, dim, columns, SCALED: tl.constexpr):
    """(z − mean) [· scale] at (batch_index, group·dim + feature_index), 0 outside the view.

    mean and scale are rows ``mean_row`` and ``mean_row + 1`` of ``stats``; the result has
    the dtype of ``stats``.
    """
    mask = (batch_index < batch) & (feature_index < dim)
    column = group * dim + feature_index
    z = tl.load(z_ptr + batch_index * columns + column, mask=mask, other=0.0)
    mean = tl.load(stats_ptr + mean_row * columns + column, mask=mask, other=0.0)
    x = z.to(stats_ptr.dtype.element_ty) - mean
    if SCALED:
        x = x * tl.load(stats_ptr + (mean_row + 1) * columns + column, mask=mask, other=0.0)
    return tl.where(mask, x, 0.0)


# Squared Frobenius norm of a product, tile by tile, without writing the product. For views
# u, v (B, G, D), normalised as they are loaded (rows ``U_ROW`` / ``V_ROW`` of stats):
#
#   GRAM:  P = u vᵀ (B×B per group, reduced over D)     else  P = uᵀ v (D×D, reduced over B)
#   TWO_PRODUCTS:  partial = Σ_tile (u ⋆ u) ⊙ (v ⋆ v)      (Barlow Gram: ⟨a aᵀ, b bᵀ⟩)
#   otherwise:     partial = Σ_tile (u ⋆ v)²                (Barlow direct ‖aᵀb‖², VICReg ‖x xᵀ‖²)
#
# One-axis grid over (G, tiles, tiles) (``product_grid``); each program accumulates its
# BLOCK×BLOCK tile(s) over BLOCK_REDUCED steps with tl.dot and writes one partial sum. A SYMMETRIC product skips the tiles below the
# diagonal and counts those above it twice. Nothing is saved: the forward keeps O(D) statistics.
@triton.jit
def _product_frobenius_kernel(
    # pointers
    u_ptr, v_ptr, stats_ptr, partial_ptr,
    # sizes
    batch, dim, columns,
    # meta-parameters
    U_ROW: tl.constexpr, V_ROW: tl.constexpr, GRAM: tl.constexpr, TWO_PRODUCTS: tl.constexpr,
    SYMMETRIC: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_REDUCED: tl.constexpr,
):
    acc_dtype = stats_ptr.dtype.element_ty
    tiles = tl.cdiv(batch if GRAM else dim, BLOCK)
    program = tl.program_id(0).to(tl.int64)  # flat over (group, i, j): see product_grid
    group = program // (tiles * tiles)
    pid_i = (program // tiles) % tiles
    pid_j = program % tiles
    rows_i = pid_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows_j = pid_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    reduced = dim if GRAM else batch
    weight = 1.0
    if SYMMETRIC:
        weight = tl.where(pid_j > pid_i, 2.0, tl.where(pid_j == pid_i, 1.0, 0.0))
        reduced = tl.where(pid_j >= pid_i, reduced, 0)
    first, second = _product_tiles(u_ptr, v_ptr, stats_ptr, rows_i, rows_j, group, 0, reduced, batch, dim, columns,
                                   U_ROW, V_ROW, GRAM, TWO_PRODUCTS, SCALED, acc_dtype, BLOCK, BLOCK_REDUCED)
    if TWO_PRODUCTS:
        tile = first * second
    else:
        tile = second * second
    tl.store(partial_ptr + (group * tiles + pid_i) * tiles + pid_j, weight * tl.sum(tl.sum(tile, axis=1), axis=0))


# What the product kernels share, and the split path. Half inputs are normalised in float32 and
# handed to tl.dot in their own dtype (tensor cores, float32 accumulation), as a half-precision
# peer multiplies them. When the tiles are too few to fill the card (Barlow N = 256, D = 8192:
# 10 tiles), the reduction is split: ``_product_partial_kernel`` writes each split's raw tiles
# and ``_frobenius_merge_kernel`` sums them in split order before squaring (deterministic).


@triton.jit
def _operand_dot(left, right, z_ptr):
    """left @ right (float32 or float64 accumulate): in the input's dtype when that is a half dtype
    (Triton's default precision: tensor cores), else IEEE in the statistics' dtype."""
    if z_ptr.dtype.element_ty.primitive_bitwidth == 16:
        product = tl.dot(left.to(z_ptr.dtype.element_ty), right.to(z_ptr.dtype.element_ty))
    else:
        product = tl.dot(left, right, input_precision="ieee")
    return product


@triton.jit
def _product_tiles(u_ptr, v_ptr, stats_ptr, rows_i, rows_j, group, start, end, batch, dim, columns,
                   U_ROW: tl.constexpr, V_ROW: tl.constexpr, GRAM: tl.constexpr, TWO_PRODUCTS: tl.constexpr,
                   SCALED: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_REDUCED: tl.constexpr):
    """(first, second): tile (rows_i, rows_j) of u ⋆ u and v ⋆ v (TWO_PRODUCTS; else first is
    zero and second is u ⋆ v), reduced over [start, end) in ACC_DTYPE (the statistics' dtype)."""
    first = tl.zeros((BLOCK, BLOCK), ACC_DTYPE)
    second = tl.zeros((BLOCK, BLOCK), ACC_DTYPE)
    for step in range(start, end, BLOCK_REDUCED):
        steps = step + tl.arange(0, BLOCK_REDUCED).to(tl.int64)
        if GRAM:  # tile[i, j] = Σ_d u[i, d] v[j, d]: left (BLOCK, R) over rows, right (BLOCK, R)ᵀ
            left_batch, left_feature = rows_i[:, None], steps[None, :]
            right_batch, right_feature = rows_j[:, None], steps[None, :]  # loaded along D, transposed
        else:  # tile[i, j] = Σ_n u[n, i] v[n, j]: left (BLOCK, R) over features, right (R, BLOCK)
            left_batch, left_feature = steps[None, :], rows_i[:, None]
            right_batch, right_feature = steps[:, None], rows_j[None, :]
        left = _load_normalized(u_ptr, stats_ptr, U_ROW, left_batch, left_feature, group,
                                batch, dim, columns, SCALED)
        if TWO_PRODUCTS:
            right = _load_normalized(u_ptr, stats_ptr, U_ROW, right_batch, right_feature, group,
                                     batch, dim, columns, SCALED)
            first += _operand_dot(left, tl.trans(right) if GRAM else right, u_ptr)
            left = _load_normalized(v_ptr, stats_ptr, V_ROW, left_batch, left_feature, group,
                                    batch, dim, columns, SCALED)
        right = _load_normalized(v_ptr, stats_ptr, V_ROW, right_batch, right_feature, group,
                                 batch, dim, columns, SCALED)
        second += _operand_dot(left, tl.trans(right) if GRAM else right, u_ptr)
    return first, second


@triton.jit
def _tile_rows(BLOCK: tl.constexpr):
    """Rows of tile (program_id(0), program_id(1)) and its weight in a SYMMETRIC sum (0 below the
    diagonal, 1 on it, 2 above; 1 for every tile otherwise)."""
    pid_i = tl.program_id(0)
    pid_j = tl.program_id(1)
    rows_i = pid_i.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rows_j = pid_j.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return rows_i, rows_j, tl.where(pid_j > pid_i, 2.0, tl.where(pid_j == pid_i, 1.0, 0.0))


@triton.jit
def _scratch_tile(scratch_ptr, group, split, product, splits, products, BLOCK: tl.constexpr):
    """Offsets of tile (program_id(0), program_id(1)) of ``product`` in scratch
    (G, splits, products, tiles, tiles, BLOCK, BLOCK)."""
    tiles = tl.num_programs(0)
    index = (((group * splits + split) * products + product) * tiles + tl.program_id(0)) * tiles + tl.program_id(1)
    cells = tl.arange(0, BLOCK)
    return scratch_ptr + index * BLOCK * BLOCK + cells[:, None] * BLOCK + cells[None, :]


@triton.jit
def _product_partial_kernel(
    # pointers
    u_ptr, v_ptr, stats_ptr, scratch_ptr,
    # sizes
    batch, dim, columns, splits, reduced_per_split,
    # meta-parameters
    U_ROW: tl.constexpr, V_ROW: tl.constexpr, GRAM: tl.constexpr, TWO_PRODUCTS: tl.constexpr,
    SYMMETRIC: tl.constexpr, SCALED: tl.constexpr, BLOCK: tl.constexpr, BLOCK_REDUCED: tl.constexpr,
):
    """Grid (tiles, tiles, G·splits): the raw tile(s) of one split of the reduction into scratch
    (split only while G · working tiles < PROGRAMS_PER_SM·SMs, so no axis nears CUDA's 65,535)."""
    rows_i, rows_j, symmetric_weight = _tile_rows(BLOCK)
    group = (tl.program_id(2) // splits).to(tl.int64)
    split = tl.program_id(2) % splits
    start = split * reduced_per_split
    end = tl.minimum(start + reduced_per_split, dim if GRAM else batch)
    if SYMMETRIC:
        end = tl.where(symmetric_weight > 0, end, start)  # below the diagonal: nothing (the merge skips it)
    first, second = _product_tiles(u_ptr, v_ptr, stats_ptr, rows_i, rows_j, group, start, end, batch, dim, columns,
                                   U_ROW, V_ROW, GRAM, TWO_PRODUCTS, SCALED, stats_ptr.dtype.element_ty, BLOCK,
                                   BLOCK_REDUCED)
    products = 2 if TWO_PRODUCTS else 1
    tl.store(_scratch_tile(scratch_ptr, group, split, products - 1, splits, products, BLOCK), second)
    if TWO_PRODUCTS:
        tl.store(_scratch_tile(scratch_ptr, group, split, 0, splits, products, BLOCK), first)


@triton.jit
def _frobenius_merge_kernel(
    scratch_ptr, partial_ptr, splits,
    TWO_PRODUCTS: tl.constexpr, SYMMETRIC: tl.constexpr, BLOCK: tl.constexpr,
):
    """Grid (tiles, tiles, G): the splits' tiles summed in split order, then reduced as
    ``_product_frobenius_kernel`` reduces its tiles, into partial (G, tiles, tiles)."""
    _, _, symmetric_weight = _tile_rows(BLOCK)
    group = tl.program_id(2).to(tl.int64)
    acc_dtype = scratch_ptr.dtype.element_ty
    first = tl.zeros((BLOCK, BLOCK), acc_dtype)
    second = tl.zeros((BLOCK, BLOCK), acc_dtype)
    weight = 1.0
    count = splits
    if SYMMETRIC:
        weight = symmetric_weight
        count = tl.where(weight > 0, splits, 0)  # those tiles were never written
    products = 2 if TWO_PRODUCTS else 1
    for split in range(0, count):
        second += tl.load(_scratch_tile(scratch_ptr, group, split, products - 1, splits, products, BLOCK))
        if TWO_PRODUCTS:
            first += tl.load(_scratch_tile(scratch_ptr, group, split, 0, splits, products, BLOCK))
    square = (first if TWO_PRODUCTS else second) * second
    tiles = tl.num_programs(0)
    tl.store(partial_ptr + (group * tiles + tl.program_id(0)) * tiles + tl.program_id(1), weight * tl.sum(square))


# (z − mean) [· scale] of one view (B, C) into ``out`` in the stats' dtype (for the GEMMs of
# the backward). One-axis grid over (row blocks, column blocks) (``normalize_grid``).
@triton.jit
def _normalize_kernel(
    # pointers
    z_ptr, stats_ptr, out_ptr,
    # sizes
    batch, columns,
    # meta-parameters
    MEAN_ROW: tl.constexpr, SCALED: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    program = tl.program_id(0).to(tl.int64)  # flat over (row blocks, column blocks): see normalize_grid
    column_blocks = tl.cdiv(columns, BLOCK_COLUMNS)
    cols = (program % column_blocks) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    rows, offsets, mask = _row_block((program // column_blocks) * BLOCK_ROWS, cols, batch, columns, BLOCK_ROWS)
    x = _load_normalized(z_ptr, stats_ptr, MEAN_ROW, rows[:, None], cols[None, :], 0, batch, columns, columns,
                         SCALED)
    tl.store(out_ptr + offsets, x, mask=mask)


# Barlow Twins input gradient of one view, one program per BLOCK_COLUMNS columns (B, D):
#
#   g = coef ⊙ partner + α · product       (∂L/∂a; product = (b bᵀ) a or b Cᵀ, from torch)
#   coef = 2 ((c − 1) − λ c) / B,  projection = mean_n(g ⊙ a) = coef ⊙ c + α · mean_n(product ⊙ a)
#   dz = grad · rstd ⊙ (g − mean_n g − a ⊙ projection)       (batch-norm backward)
#
# Two passes over the rows: mean_n g and the projection, then dz in the input's dtype.
@triton.jit
def _barlow_input_gradient_kernel(
    # pointers
    product_ptr, own_ptr, partner_ptr, stats_ptr, grad_ptr, out_ptr,
    # sizes
    batch, dim,
    # parameters
    lambda_param, alpha,
    # meta-parameters
    RSTD_ROW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    acc_dtype = stats_ptr.dtype.element_ty
    cols = tl.program_id(0).to(tl.int64) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    col_ok = cols < dim
    c = tl.load(stats_ptr + 4 * dim + cols, mask=col_ok, other=0.0)
    coefficient = 2.0 * ((c - 1.0) - lambda_param * c) / batch
    scale = tl.load(stats_ptr + RSTD_ROW * dim + cols, mask=col_ok, other=0.0) * tl.load(grad_ptr).to(acc_dtype)
    dot = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    grad_sum = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    for start in range(0, batch, BLOCK_ROWS):
        _, offsets, mask = _row_block(start, cols, batch, dim, BLOCK_ROWS)
        product = tl.load(product_ptr + offsets, mask=mask, other=0.0)
        dot += tl.sum(product * tl.load(own_ptr + offsets, mask=mask, other=0.0), axis=0)
        grad_sum += tl.sum(alpha * product + coefficient[None, :] * tl.load(partner_ptr + offsets, mask=mask,
                                                                            other=0.0), axis=0)
    mean_grad = grad_sum / batch
    projection = coefficient * c + alpha * dot / batch
    for start in range(0, batch, BLOCK_ROWS):
        _, offsets, mask = _row_block(start, cols, batch, dim, BLOCK_ROWS)
        g = (alpha * tl.load(product_ptr + offsets, mask=mask, other=0.0)
             + coefficient[None, :] * tl.load(partner_ptr + offsets, mask=mask, other=0.0)
             - mean_grad[None, :] - projection[None, :] * tl.load(own_ptr + offsets, mask=mask, other=0.0))
        tl.store(out_ptr + offsets, (scale[None, :] * g).to(out_ptr.dtype.element_ty), mask=mask)


# VICReg input gradient of one view (B, G, D), one program per BLOCK_COLUMNS columns of G·D:
#
#   dx = α · product + column ⊙ x,   product = (x xᵀ) x or x (xᵀx) per group (from torch)
#   α = 4 g_cov / (G D (B − 1)²)
#   column = −g_var [s < 1] / (2 G D (B − 1) s) − 4 g_cov v / (G D (B − 1))
#   dz = dx − mean_b dx               (the centring's backward)
#
# with v the unbiased variance and s = sqrt(v + eps) (the variance hinge's gradient). Two passes
# over the rows: mean_b dx, then dz in the input's dtype.
@triton.jit
def _vicreg_input_gradient_kernel(
    # pointers
    product_ptr, x_ptr, stats_ptr, grad_ptr, out_ptr,
    # sizes
    batch, groups, dim,
    # strides of product (G, B, D); x and out are (B, G·D)
    stride_product_group, stride_product_row,
    # parameters
    eps,
    # meta-parameters
    VAR_ROW: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_COLUMNS: tl.constexpr,
):
    acc_dtype = stats_ptr.dtype.element_ty
    columns = groups * dim
    cols = tl.program_id(0).to(tl.int64) * BLOCK_COLUMNS + tl.arange(0, BLOCK_COLUMNS)
    col_ok = cols < columns
    grad_variance = tl.load(grad_ptr).to(acc_dtype)
    grad_covariance = tl.load(grad_ptr + 1).to(acc_dtype)
    var = tl.load(stats_ptr + VAR_ROW * columns + cols, mask=col_ok, other=1.0)
    std = tl.sqrt(var + eps)
    normaliser = groups * dim * (batch - 1.0)
    hinge = tl.where(std < 1.0, 1.0 / (2.0 * normaliser * std), 0.0)
    column = -grad_variance * hinge - grad_covariance * 4.0 * var / normaliser
    alpha = grad_covariance * 4.0 / (normaliser * (batch - 1.0))
    product_columns = (cols // dim) * stride_product_group + cols % dim
    grad_sum = tl.zeros((BLOCK_COLUMNS,), acc_dtype)
    for start in range(0, batch, BLOCK_ROWS):
        rows, offsets, mask = _row_block(start, cols, batch, columns, BLOCK_ROWS)
        product = tl.load(product_ptr + rows[:, None] * stride_product_row + product_columns[None, :], mask=mask,
                          other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        grad_sum += tl.sum(alpha * product + column[None, :] * x, axis=0)
    mean_grad = grad_sum / batch
    for start in range(0, batch, BLOCK_ROWS):
        rows, offsets, mask = _row_block(start, cols, batch, columns, BLOCK_ROWS)
        product = tl.load(product_ptr + rows[:, None] * stride_product_row + product_columns[None, :], mask=mask,
                          other=0.0)
        x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
        grad = alpha * product + column[None, :] * x - mean_grad[None, :]
        tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def product_grid(size: int, block: int, groups: int) -> Tuple[int]:
    """The grid of ``_product_frobenius_kernel``: one axis over (groups, tiles, tiles), since CUDA
    limits axes 1 and 2 to 65,535 programs (VICReg's groups, or the tiles of a large product)."""
    tiles = triton.cdiv(size, block)
    return flat_grid(groups, tiles, tiles)


def normalize_grid(batch: int, columns: int) -> Tuple[int]:
    """The grid of ``_normalize_kernel``: one axis over (row blocks, column blocks)."""
    return flat_grid(triton.cdiv(batch, BLOCK_ROWS), triton.cdiv(columns, BLOCK_COLUMNS))


@on_input_device
def column_stats(z_a: Tensor, z_b: Tensor, barlow: bool, param: float, bn_eps: float, dtype: torch.dtype) -> Tensor:
    """(6, C) statistics of two (B, C) views in ``dtype`` (layout: see ``_column_stats_kernel``)."""
    batch, columns = z_a.shape
    stats = torch.empty(6, columns, dtype=dtype, device=z_a.device)
    _column_stats_kernel[(triton.cdiv(columns, BLOCK_COLUMNS),)](
        z_a, z_b, stats, batch, columns, param, bn_eps,
        BARLOW=barlow, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
    return stats


SPLIT_TILE = 32  # largest tile of the split path: ``_product_partial_kernel`` holds two raw tiles
# until it stores them, and 64-wide ones spill (up to 300 B per thread on sm_90); 32-wide, none.


def _reduction_split(size: int, block: int, groups: int, symmetric: bool, reduced: int, device: torch.device):
    """(tiles per side, splits, reduced length per split) of a product of side ``size`` in tiles of
    ``block``: the reduction split until the working tiles give PROGRAMS_PER_SM programs per SM."""
    tiles = triton.cdiv(size, block)
    working_tiles = tiles * (tiles + 1) // 2 if symmetric else tiles * tiles
    return (tiles, *occupancy.splits(working_tiles * groups, reduced, BLOCK_REDUCED, device))


@on_input_device
def squared_norms(u: Tensor, v: Tensor, stats: Tensor, rows: Tuple[int, int], groups: int, gram: bool,
                  two_products: bool, symmetric: bool, scaled: bool) -> Tensor:
    """(G,) Σ over tiles of ``_product_frobenius_kernel`` for views u, v (B, G·D); the reduction
    split (``_product_partial_kernel`` + ``_frobenius_merge_kernel``, tiles of at most SPLIT_TILE)
    where the tiles alone would not give every SM PROGRAMS_PER_SM programs."""
    batch, columns = u.shape
    dim = columns // groups
    size, reduced = (batch, dim) if gram else (dim, batch)
    block = _tile(size, stats.dtype)
    tiles, splits, per_split = _reduction_split(size, block, groups, symmetric, reduced, u.device)
    if splits > 1 and block > SPLIT_TILE:
        block = SPLIT_TILE
        tiles, splits, per_split = _reduction_split(size, block, groups, symmetric, reduced, u.device)
    partial = torch.empty(groups, tiles, tiles, dtype=stats.dtype, device=u.device)
    meta = dict(U_ROW=rows[0], V_ROW=rows[1], GRAM=gram, TWO_PRODUCTS=two_products, SYMMETRIC=symmetric,
                SCALED=scaled, BLOCK=block, BLOCK_REDUCED=product_reduced_step(block, two_products, u.dtype, u.device),
                **product_launch_options(block))
    if splits == 1:
        _product_frobenius_kernel[product_grid(size, block, groups)](u, v, stats, partial, batch, dim, columns,
                                                                     **meta)
    else:
        products = 2 if two_products else 1
        scratch = torch.empty(groups, splits, products, tiles, tiles, block, block, dtype=stats.dtype, device=u.device)
        _product_partial_kernel[(tiles, tiles, groups * splits)](u, v, stats, scratch, batch, dim, columns, splits,
                                                                 per_split, **meta)
        _frobenius_merge_kernel[(tiles, tiles, groups)](scratch, partial, splits, TWO_PRODUCTS=two_products,
                                                        SYMMETRIC=symmetric, BLOCK=block)
    return partial.flatten(1).sum(dim=1)


@on_input_device
def normalize(z: Tensor, stats: Tensor, mean_row: int, scaled: bool) -> Tensor:
    batch, columns = z.shape
    out = torch.empty(batch, columns, dtype=stats.dtype, device=z.device)
    _normalize_kernel[normalize_grid(batch, columns)](z, stats, out, batch, columns, MEAN_ROW=mean_row,
                                                      SCALED=scaled, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
    return out


@on_input_device
def barlow_input_gradient(product: Tensor, own: Tensor, partner: Tensor, stats: Tensor, grad: Tensor, z: Tensor,
                          lambda_param: float, alpha: float, rstd_row: int) -> Tensor:
    """One view's Barlow Twins gradient (B, D) in the dtype of ``z`` (see the kernel)."""
    batch, dim = z.shape
    out = torch.empty_like(z)
    _barlow_input_gradient_kernel[(triton.cdiv(dim, BLOCK_COLUMNS),)](
        product, own, partner, stats, grad, out, batch, dim, lambda_param, alpha,
        RSTD_ROW=rstd_row, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
    return out


@on_input_device
def vicreg_input_gradient(product: Tensor, x: Tensor, stats: Tensor, grad: Tensor, shape, dtype: torch.dtype,
                          eps: float, var_row: int) -> Tensor:
    """One view's VICReg variance + covariance gradient, (B, G, D) ``shape`` in ``dtype``."""
    batch, groups, dim = shape
    out = torch.empty(batch, groups, dim, dtype=dtype, device=x.device)
    _vicreg_input_gradient_kernel[(triton.cdiv(groups * dim, BLOCK_COLUMNS),)](
        product, x, stats, grad, out, batch, groups, dim, product.stride(0), product.stride(1), eps,
        VAR_ROW=var_row, BLOCK_ROWS=BLOCK_ROWS, BLOCK_COLUMNS=BLOCK_COLUMNS)
    return out
