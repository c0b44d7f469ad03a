"""The ``torch`` backend of InfoNCE: blocked, O(N + M) memory, recompute in backward.

Same contract as ``reference.info_nce`` (see there for the formula). The N×M logit matrix
never exists: rows are processed in blocks of ``rows_per_block(M)`` rows (a block of logits is
~2 MiB of fp32, sized for a core's L2 cache), each block does one GEMM, and the forward keeps
only two numbers per row: the row max m_i and the row sum l_i = Σ_j exp(s_ij − m_i). The
backward recomputes each block of logits once and feeds both gradients from it:

    dL/ds_ij = g_i · (exp(s_ij − m_i) / l_i − [j ∈ P_i] / |P_i|)        (+ the column term)
    dQ_blk = (scale · dL/ds) @ K,      dK += (scale · dL/ds)ᵀ @ Q_blk

so the algorithm does four GEMMs of N×M×D (one forward, three backward) and a few passes over
a cache-sized block. When no logit can make exp() leave the normal numbers (cosine logits at
τ ≥ 0.046, see ``exps_stay_normal``) the shift m is 0 and the max passes disappear. The loss
is assembled as (m_i − mean_p s_ip) + log l_i, never as logsumexp − positive: at τ = 0.01 both
of those are ~100 and their difference would lose the digits of a small loss (the reference's
``log_softmax`` keeps them the same way).

Positives are found once per call from the labels: as an explicit list of (row, column) pairs
when there are few per row (SimCLR, SimCSE, CLIP, MoCo: one or V − 1), or as a per-block label
comparison when there are many (SupCon with few classes).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype, max_exp_span
from . import reference
from .op import define_info_nce_op, define_info_nce_self_op

Tensor = torch.Tensor

BLOCK_ELEMENTS = 1 << 19  # logits per block: 2 MiB of fp32
MAX_PAIRS_PER_ROW = 16  # above this many positives per row on average, compare labels per block


def rows_per_block(num_keys: int) -> int:
    return max(16, min(4096, BLOCK_ELEMENTS // max(num_keys, 1)))


def exps_stay_normal(scale: float, queries: Tensor, *key_sets: Tensor) -> bool:
    """True when every logit s = scale · q_i·k_j, k_j a row of any of ``key_sets``, has exp(±s)
    normal: |s| ≤ ½ ``max_exp_span`` (bounded by |scale| · max‖q_i‖ · max‖k_j‖; lightly allows a
    negative temperature).

    Then exp(s) needs no shift: no running max is kept, and in the self-similarity path exp(S)
    of a tile serves the exp-sums of its rows and of its columns alike and the backward's two
    orientations of a tile share one exp() — one elementwise exp pass per tile instead of two
    max passes and two exp passes. Cosine logits (|s| ≤ scale) take this path for τ ≥ 0.046
    in float32. The loss keeps the precision of the logits themselves: log Σ exp(s) − s_pos
    cancels digits of size |s|, which the logits' own rounding already has.
    """
    rows = [keys for keys in key_sets if keys.shape[0]]
    if queries.shape[0] == 0 or not rows:
        return True
    largest = [torch.linalg.vector_norm(x, dim=1).max() for x in [queries] + rows]  # pow(2): ~4x slower on CPU
    bound = abs(scale) * (largest[0] * torch.stack(largest[1:]).max()).item()
    return 2 * bound <= max_exp_span(queries.dtype)


@dataclass
class Positives:
    """Where the positives of each row are. count: (N,) float, number of positives per row.

    Sparse form: ``pair_rows``/``pair_cols`` (P,) sorted by row and ``row_start`` (N + 1 ints) so
    that rows [a, b) own pairs [row_start[a], row_start[b]). Dense form (``pair_rows`` None):
    compare ``query_labels`` with ``key_labels`` per block, minus self.
    """

    count: Tensor
    query_labels: Tensor
    key_labels: Tensor
    self_index: Optional[Tensor]
    pair_rows: Optional[Tensor] = None
    pair_cols: Optional[Tensor] = None
    row_start: Optional[list] = None

    def block_pairs(self, start: int, stop: int) -> Tuple[Tensor, Tensor]:
        """(rows relative to ``start``, columns) of the pairs of rows [start, stop)."""
        a, b = self.row_start[start], self.row_start[stop]
        return self.pair_rows[a:b] - start, self.pair_cols[a:b]

    def block_mask(self, start: int, stop: int) -> Tensor:
        """(stop − start, M) bool: positive entries of rows [start, stop) (dense form)."""
        mask = self.query_labels[start:stop, None] == self.key_labels[None, :]
        if self.self_index is not None:
            _mask_self(mask, self.self_index[start:stop], False)
        return mask


def _label_ranges(query_labels: Tensor, key_labels: Tensor):
    """Keys sorted by label, and each row's [low, high) range of keys with its label."""
    sorted_labels, order = torch.sort(key_labels)
    low = torch.searchsorted(sorted_labels, query_labels, right=False)
    high = torch.searchsorted(sorted_labels, query_labels, right=True)
    return order, low, high


def count_positives(query_labels: Tensor, key_labels: Tensor, self_index: Optional[Tensor],
                    ranges=None) -> Tensor:
    """(N,) float64: the number of keys with each row's label, its own entry excluded."""
    _, low, high = ranges if ranges is not None else _label_ranges(query_labels, key_labels)
    per_row = high - low
    if self_index is not None:
        own_label = key_labels[self_index.clamp_min(0)]
        per_row = per_row - ((self_index >= 0) & (own_label == query_labels)).long()
    return per_row.to(torch.float64)


def find_positives(query_labels: Tensor, key_labels: Tensor, self_index: Optional[Tensor]) -> Positives:
    """Positives of every row: keys with the row's label, its own entry excluded. O((N + M) log M)."""
    n = query_labels.shape[0]
    order, low, high = ranges = _label_ranges(query_labels, key_labels)
    count = count_positives(query_labels, key_labels, self_index, ranges)
    total = int((high - low).sum())
    positives = Positives(count, query_labels, key_labels, self_index)
    if total > MAX_PAIRS_PER_ROW * max(n, 1):
        return positives
    with_self = high - low
    rows = torch.repeat_interleave(torch.arange(n, device=query_labels.device), with_self)
    first = torch.cumsum(with_self, 0) - with_self
    cols = order[low[rows] + torch.arange(total, device=query_labels.device) - first[rows]]
    if self_index is not None:
        keep = cols != self_index[rows]
        rows, cols = rows[keep], cols[keep]
    row_start = torch.cat([torch.zeros(1, dtype=torch.long, device=rows.device),
                           torch.cumsum(torch.bincount(rows, minlength=n), 0)])
    positives.pair_rows, positives.pair_cols, positives.row_start = rows, cols, row_start.tolist()
    return positives


def _mask_self(block: Tensor, self_index: Tensor, value) -> None:
    """block[i, self_index[i]] = value for the rows that have a self entry (in place)."""
    rows = torch.nonzero(self_index >= 0).squeeze(1)
    block[rows, self_index[rows]] = value


def _block_logits(scaled_query: Tensor, keys: Tensor, self_index: Optional[Tensor], start: int, stop: int,
                  excluded: Optional[Positives] = None) -> Tensor:
    """scale · Q[start:stop] Kᵀ with self entries (and ``excluded``'s pairs) set to −inf: (stop − start, M)."""
    logits = scaled_query[start:stop] @ keys.T
    if self_index is not None:
        _mask_self(logits, self_index[start:stop], float("-inf"))
    if excluded is not None:
        if excluded.pair_rows is not None:
            logits[excluded.block_pairs(start, stop)] = float("-inf")
        else:
            logits.masked_fill_(excluded.block_mask(start, stop), float("-inf"))
    return logits


def _positive_logit_sums(logits: Tensor, positives: Positives, start: int, stop: int, with_columns: bool = False
                         ) -> Tuple[Tensor, Optional[Tensor], Union[Tuple[Tensor, Tensor], Tensor]]:
    """Σ of each block row's positive logits (stop − start,), with ``with_columns`` each key
    column's (M,) too (else None), and where the positives are: (rows, cols) pairs of the block
    (sparse) or its (stop − start, M) mask."""
    if positives.pair_rows is not None:
        rows, cols = positives.block_pairs(start, stop)
        values = logits[rows, cols]
        row_sums = logits.new_zeros(stop - start).index_add_(0, rows, values)
        col_sums = logits.new_zeros(logits.shape[1]).index_add_(0, cols, values) if with_columns else None
        return row_sums, col_sums, (rows, cols)
    mask = positives.block_mask(start, stop)
    kept = torch.where(mask, logits, logits.new_zeros(()))
    return kept.sum(dim=1), (kept.sum(dim=0) if with_columns else None), mask


def _row_statistics(scaled_query: Tensor, keys: Tensor, extra: Optional[Tensor], positives: Optional[Positives],
                    self_index: Optional[Tensor], unshifted: bool,
                    columns: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, shift m and sum l = Σ exp(s − m) (the extra logit included), all (N,).

    m is the row max, or 0 when ``unshifted`` (see ``exps_stay_normal``). ``columns`` (unshifted,
    symmetric, labels only): (M,) sums of each column's positive logits and of its exp(s), added
    to in place from the same blocks — the symmetric loss then needs no second pass.
    """
    n = scaled_query.shape[0]
    dtype = scaled_query.dtype
    loss, row_max, row_sum = (torch.empty(n, dtype=dtype, device=keys.device) for _ in range(3))
    step = rows_per_block(keys.shape[0])
    for start in range(0, n, step):
        stop = min(start + step, n)
        logits = _block_logits(scaled_query, keys, self_index, start, stop)
        if unshifted:
            m = torch.zeros(stop - start, dtype=dtype, device=keys.device)
        else:
            m = logits.amax(dim=1)
            if extra is not None:
                m = torch.maximum(m, extra[start:stop])
            logits.sub_(m[:, None])  # shifted logits s − m: exactly 0 at the row max
        if extra is not None:
            positive_shifted = extra[start:stop] - m
        else:  # same labels: the pair (i, j) is also column j's positive i
            positive_sum, column_sums, _ = _positive_logit_sums(logits, positives, start, stop, columns is not None)
            positive_shifted = positive_sum / positives.count[start:stop].clamp_min(1).to(dtype)
            if columns is not None:
                columns[0].add_(column_sums)
        total = logits.exp_().sum(dim=1)
        if columns is not None:
            columns[1].add_(logits.sum(dim=0))
        if extra is not None:
            total += torch.exp(positive_shifted)
        block_loss = torch.log(total) - positive_shifted
        if positives is not None:
            block_loss = torch.where(positives.count[start:stop] > 0, block_loss, torch.zeros_like(block_loss))
        loss[start:stop], row_max[start:stop], row_sum[start:stop] = block_loss, m, total
    return loss, row_max, row_sum


def _positive_labels(query_labels, key_labels, self_index) -> Optional[Positives]:
    return None if query_labels is None else find_positives(query_labels, key_labels, self_index)


def info_nce_forward(query: Tensor, keys: Tensor, positive_keys: Optional[Tensor], query_labels: Optional[Tensor],
                     key_labels: Optional[Tensor], self_index: Optional[Tensor], scale: float, symmetric: bool
                     ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Blocked forward. Returns (row_loss (N,), col_loss (M,) or (0,), row_stats (2, N), col_stats (2, M) or (2, 0)).

    ``*_stats`` stack the max and the exp-sum of each row (column) for the backward.
    """
    dtype = compute_dtype(query, keys, positive_keys)
    q, k = query.to(dtype), keys.to(dtype)
    extra_keys = [] if positive_keys is None else [positive_keys.to(dtype)]  # the extra logit's keys
    extra = scale * (q * extra_keys[0]).sum(1) if extra_keys else None
    unshifted = exps_stay_normal(scale, q, k, *extra_keys)
    columns = (k.new_zeros(k.shape[0]), k.new_zeros(k.shape[0])) if symmetric and unshifted else None
    row_loss, row_max, row_sum = _row_statistics(
        q * scale, k, extra, _positive_labels(query_labels, key_labels, self_index), self_index, unshifted, columns)
    if not symmetric:
        empty = q.new_zeros(0)
        return row_loss, empty, torch.stack([row_max, row_sum]), q.new_zeros(2, 0)
    if columns is not None:
        col_positive_sum, col_sum = columns
        col_count = count_positives(key_labels, query_labels, None).to(dtype)
        col_loss = torch.log(col_sum) - col_positive_sum / col_count.clamp_min(1)
        col_loss = torch.where(col_count > 0, col_loss, torch.zeros_like(col_loss))
        return row_loss, col_loss, torch.stack([row_max, row_sum]), torch.stack([torch.zeros_like(col_sum), col_sum])
    col_loss, col_max, col_sum = _row_statistics(
        k * scale, q, None, _positive_labels(key_labels, query_labels, None), None, unshifted)
    return row_loss, col_loss, torch.stack([row_max, row_sum]), torch.stack([col_max, col_sum])


def info_nce_backward(grad_row: Tensor, grad_col: Tensor, query: Tensor, keys: Tensor,
                      positive_keys: Optional[Tensor], query_labels: Optional[Tensor], key_labels: Optional[Tensor],
                      self_index: Optional[Tensor], row_stats: Tensor, col_stats: Tensor, scale: float,
                      symmetric: bool, keys_grad: bool) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Blocked backward: one recompute of each logit block feeds dQ and dK. Returns input-dtype grads
    (for the keys an empty tensor without ``keys_grad``: MoCo's queue takes no gradient)."""
    dtype = compute_dtype(query, keys, positive_keys)
    q, k = query.to(dtype), keys.to(dtype)
    n = q.shape[0]
    row_max, row_sum = row_stats.to(dtype)
    positives = _positive_labels(query_labels, key_labels, self_index)
    # per-row factor of the softmax term: g_i · scale / l_i (0 for rows without positives)
    row_coef = grad_row.to(dtype) * scale
    if positives is not None:
        row_coef = torch.where(positives.count > 0, row_coef, torch.zeros_like(row_coef))
        row_positive_weight = row_coef / positives.count.clamp_min(1).to(dtype)
    row_softmax_coef = row_coef / row_sum
    unshifted = not bool(row_max.any())  # the forward's shift was 0 for every row (exps_stay_normal)
    if symmetric:
        col_max, col_sum = col_stats.to(dtype)
        unshifted = unshifted and not bool(col_max.any())
        col_count = count_positives(key_labels, query_labels, None)
        col_coef = torch.where(col_count > 0, grad_col.to(dtype) * scale, torch.zeros_like(col_sum))
        col_positive_weight = col_coef / col_count.clamp_min(1).to(dtype)
        col_softmax_coef = col_coef / col_sum

    grad_q = torch.empty_like(q)
    grad_k = torch.zeros_like(k) if keys_grad else k.new_empty(0)
    scaled_q = q * scale
    step = rows_per_block(k.shape[0])
    for start in range(0, n, step):
        stop = min(start + step, n)
        logits = _block_logits(scaled_q, k, self_index, start, stop)
        if symmetric and unshifted:  # one exp() serves both directions
            logits.exp_()
            grad_logits = torch.mul(logits, col_softmax_coef[None, :])
            grad_logits.addcmul_(logits, row_softmax_coef[start:stop, None])
        elif symmetric:
            grad_logits = torch.exp(logits - col_max[None, :]).mul_(col_softmax_coef[None, :])
            grad_logits.addcmul_(logits.sub_(row_max[start:stop, None]).exp_(), row_softmax_coef[start:stop, None])
        elif unshifted:
            grad_logits = logits.exp_().mul_(row_softmax_coef[start:stop, None])
        else:
            grad_logits = logits.sub_(row_max[start:stop, None]).exp_().mul_(row_softmax_coef[start:stop, None])
        if positives is not None:
            if positives.pair_rows is not None:
                rows, cols = positives.block_pairs(start, stop)
                weight = row_positive_weight[start:stop][rows]
                if symmetric:
                    weight = weight + col_positive_weight[cols]
                grad_logits.index_put_((rows, cols), -weight, accumulate=True)
            else:
                mask = positives.block_mask(start, stop).to(dtype)
                grad_logits.sub_(mask * row_positive_weight[start:stop, None])
                if symmetric:
                    grad_logits.sub_(mask * col_positive_weight[None, :])
        torch.mm(grad_logits, k, out=grad_q[start:stop])
        if keys_grad:
            grad_k.addmm_(grad_logits.T, q[start:stop])

    grad_positive_keys = None
    if positive_keys is not None:
        p = positive_keys.to(dtype)
        extra = scale * (q * p).sum(1)
        positive_coef = torch.exp(extra - row_max) / row_sum * row_coef - row_coef  # (p_pos − 1) · g · scale
        grad_q += positive_coef[:, None] * p
        grad_positive_keys = (positive_coef[:, None] * q).to(positive_keys.dtype)
    return grad_q.to(query.dtype), grad_k.to(keys.dtype), grad_positive_keys


def info_nce_masked_forward(query: Tensor, keys: Tensor, query_labels: Tensor, positive_key_labels: Tensor,
                            excluded_key_labels: Tensor, row_weights: Tensor, scale: float, keys_gradient: bool,
                            with_gradient: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``reference.info_nce_masked`` (Σᵢ wᵢ ℓᵢ, positives and exclusions given by labels: DetCon's
    pooled regions) in blocks of rows, its gradient from the same blocks. Returns (loss, ∂/∂query,
    ∂/∂keys) in the compute dtype (empty gradients without ``with_gradient``; the keys' also
    without ``keys_gradient``: BYOL's targets take none).

    Each block holds all M logits of its rows, so its log-sum-exps are complete and
    G = wᵢ(softmax − 1_P/|P|) follows at once: dQ_b = scale · G K, dK += scale · Gᵀ Q_b. Two GEMMs
    per block without the keys' gradient, three with it (autograd, or a backward that recomputes
    the logits, needs one more); O(block) memory. The positives and exclusions are found in
    O((N + M) log M) by label (``find_positives``); excluded logits are −inf in the block."""
    dtype = compute_dtype(query, keys)
    q, k, weights = query.to(dtype), keys.to(dtype), row_weights.to(dtype)
    positives = find_positives(query_labels, positive_key_labels, None)
    excluded = find_positives(query_labels, excluded_key_labels, None)
    unshifted = exps_stay_normal(scale, q, k)
    scaled_q = q * scale
    total = q.new_zeros(())
    grad_q = torch.empty_like(q) if with_gradient else library.empty_grad(q)
    grad_k = torch.zeros_like(k) if with_gradient and keys_gradient else library.empty_grad(k)
    # rows without a positive add nothing (lightly's weight 0)
    weights = torch.where(positives.count > 0, weights, torch.zeros_like(weights))
    positive_weights = weights / positives.count.clamp_min(1).to(dtype)
    n = q.shape[0]
    step = rows_per_block(k.shape[0])
    for start in range(0, n, step):
        stop = min(start + step, n)
        logits = _block_logits(scaled_q, k, None, start, stop, excluded)
        if not unshifted:
            logits.sub_(logits.amax(dim=1)[:, None])
        positive_sum, _, where_positive = _positive_logit_sums(logits, positives, start, stop)
        exp_sum = logits.exp_().sum(dim=1)
        row_loss = torch.log(exp_sum) - positive_sum / positives.count[start:stop].clamp_min(1).to(dtype)
        total = total + (weights[start:stop] * row_loss).sum()
        if not with_gradient:
            continue
        grad_logits = logits.mul_((weights[start:stop] / exp_sum * scale)[:, None])  # wᵢ·softmax·scale
        if isinstance(where_positive, tuple):
            rows, _ = where_positive
            grad_logits.index_put_(where_positive, -scale * positive_weights[start:stop][rows], accumulate=True)
        else:
            grad_logits.sub_(where_positive.to(dtype) * (scale * positive_weights[start:stop])[:, None])
        torch.mm(grad_logits, k, out=grad_q[start:stop])
        if keys_gradient:
            grad_k.addmm_(grad_logits.T, q[start:stop])
    return total, grad_q, grad_k


def _info_nce_masked_fake(query, keys, query_labels, positive_key_labels, excluded_key_labels, row_weights, scale,
                          keys_gradient, with_gradient):
    dtype = compute_dtype(query, keys)
    grad_q, grad_k = library.gradient_fakes(with_gradient, (query, keys), dtype)
    return query.new_empty((), dtype=dtype), grad_q, (grad_k if keys_gradient else library.empty_grad(keys))


# --------------------------------------------------------------------------------------------
# Self-similarity (SimCLR): keys are the queries themselves, so S = scale · Z Zᵀ is symmetric.
# Only tiles on and above the diagonal are computed; each serves the rows of both of its blocks
# (online max / exp-sum merges, as flash attention does along a row; on the shift-free path one
# exp() of the tile gives both its row and its column sums). The backward folds the two
# orientations of a tile into W = G_IJ + G_JIᵀ and needs two GEMMs per tile:
#     dZ_I += W Z_J,   dZ_J += Wᵀ Z_I
# — half the GEMM work of the general path (which must treat Q and K as different tensors).
# --------------------------------------------------------------------------------------------
TILE_ELEMENTS = 1 << 18  # logits per tile: 1 MiB of fp32


def tile_size(n: int) -> int:
    return max(16, min(n, int(TILE_ELEMENTS ** 0.5)))


def _merge_statistics(row_max: Tensor, row_sum: Tensor, start: int, tile: Tensor, dim: int) -> None:
    """Fold a tile into the running max / exp-sum of the rows it covers along ``dim`` (in place)."""
    stop = start + tile.shape[1 - dim]
    old_max = row_max[start:stop]
    new_max = torch.maximum(old_max, tile.amax(dim=dim))
    # a row with no finite entry yet (all masked) shifts by 0: −inf − (−inf) would be NaN
    shift = torch.where(new_max == float("-inf"), torch.zeros_like(new_max), new_max)
    shifted = tile - (shift[:, None] if dim == 1 else shift[None, :])
    row_sum[start:stop] = row_sum[start:stop] * torch.exp(old_max - shift) + shifted.exp_().sum(dim=dim)
    row_max[start:stop] = new_max


def _pairs_by_tile(positives: Positives, n: int) -> dict:
    """Positive pairs grouped by the tile of ``_tiles(n)`` that holds them: {(row start, column
    start): (rows, cols relative to the tile's corner, the same absolute)}, only tiles that have pairs.

    Pairs below the diagonal tiles are left out: labels make the pairs symmetric, so each is the
    mirror of one above. Grouped once per call, so a tile without pairs costs one dict lookup.
    """
    if positives.pair_rows is None:
        return {}
    step = tile_size(n)
    tiles_per_side = n // step + 1
    above = positives.pair_rows // step <= positives.pair_cols // step
    rows, cols = positives.pair_rows[above], positives.pair_cols[above]
    tile_keys, order = torch.sort((rows // step) * tiles_per_side + cols // step, stable=True)
    keys, counts = torch.unique_consecutive(tile_keys, return_counts=True)
    groups = {}
    for key, tile_rows, tile_cols in zip(keys.tolist(), rows[order].split(counts.tolist()),
                                         cols[order].split(counts.tolist())):
        i0, j0 = (step * t for t in divmod(key, tiles_per_side))
        groups[i0, j0] = (tile_rows - i0, tile_cols - j0, tile_rows, tile_cols)
    return groups


def _tile_mask(positives: Positives, row_start: int, row_stop: int, col_start: int, col_stop: int) -> Tensor:
    """(rows, cols) bool: same label (dense form), the diagonal of a diagonal tile excluded."""
    mask = positives.query_labels[row_start:row_stop, None] == positives.key_labels[None, col_start:col_stop]
    if row_start == col_start and positives.self_index is not None:
        mask.fill_diagonal_(False)
    return mask


def _tiles(n: int):
    """(row block, column block, i0, i1, j0, j1) of every tile on and above the diagonal."""
    step = tile_size(n)
    for bi, i in enumerate(range(0, n, step)):
        for bj, j in enumerate(range(i, n, step), start=bi):
            yield bi, bj, i, min(i + step, n), j, min(j + step, n)


def _shaped_views(buffer: Tensor):
    """(rows, cols) → a (rows, cols) view of the start of ``buffer`` (reused across tiles: no
    allocation per tile), each shape's view made once (a call has at most four shapes)."""
    views = {}

    def view(rows: int, cols: int) -> Tensor:
        if (rows, cols) not in views:
            views[rows, cols] = buffer[: rows * cols].view(rows, cols)
        return views[rows, cols]

    return view


def _add_positive_logits(positive_sum: Tensor, positives: Positives, pairs: dict, tile: Tensor, i0: int, i1: int,
                         j0: int, j1: int) -> None:
    """Add the tile's positive logits to the sums of the rows they belong to, both orientations."""
    if positives.pair_rows is not None:
        if (i0, j0) not in pairs:
            return
        rows, cols, absolute_rows, absolute_cols = pairs[i0, j0]
        values = tile[rows, cols]
        positive_sum.index_add_(0, absolute_rows, values)
        if i0 != j0:  # the mirrored pair (col, row) lies in the tile below the diagonal
            positive_sum.index_add_(0, absolute_cols, values)
    else:
        kept = torch.where(_tile_mask(positives, i0, i1, j0, j1), tile, torch.zeros((), dtype=tile.dtype))
        positive_sum[i0:i1].add_(kept.sum(1))  # in place on the view: `+=` would copy back
        if i0 != j0:
            positive_sum[j0:j1].add_(kept.sum(0))


def _self_positives(embeddings: Tensor, labels: Tensor, exclude_self: bool) -> Tuple[Tensor, Positives, dict]:
    """The embeddings in the compute dtype, their positives and those grouped by tile."""
    z = embeddings.to(compute_dtype(embeddings))
    self_index = torch.arange(z.shape[0], device=z.device) if exclude_self else None
    positives = find_positives(labels, labels, self_index)
    return z, positives, _pairs_by_tile(positives, z.shape[0])


def _drop_positives(tile: Tensor, positives: Positives, pairs: dict, i0: int, i1: int, j0: int, j1: int,
                    value: float) -> None:
    """Write ``value`` over the tile's positive entries (decoupled InfoNCE: not in the denominator)."""
    if positives.pair_rows is not None:
        if (i0, j0) in pairs:
            rows, cols, _, _ = pairs[i0, j0]
            tile[rows, cols] = value
    else:
        tile.masked_fill_(_tile_mask(positives, i0, i1, j0, j1), value)


def info_nce_self_forward(embeddings: Tensor, labels: Tensor, exclude_self: bool, scale: float,
                          decoupled: bool = False) -> Tuple[Tensor, Tensor]:
    """Row losses (N,) and (max, exp-sum) stats (2, N) of InfoNCE of ``embeddings`` against itself.

    The "max" of the stats is the shift of the row's exp-sum: the running row max, or 0 for
    every row when ``exps_stay_normal`` (which the backward recognises). ``decoupled`` (DCL)
    leaves the positives out of the exp-sums: masked in each tile before it is summed, never
    subtracted afterwards (at τ = 0.05 the positive holds nearly all of a row's sum).
    """
    z, positives, pairs = _self_positives(embeddings, labels, exclude_self)
    dtype, n = z.dtype, z.shape[0]
    scaled = z * scale
    unshifted = exps_stay_normal(scale, z, z)
    row_max = torch.full((n,), 0.0 if unshifted else float("-inf"), dtype=dtype, device=z.device)
    row_sum = torch.zeros(n, dtype=dtype, device=z.device)
    positive_sum = torch.zeros(n, dtype=dtype, device=z.device)
    # per-block views made once (one split each), not sliced again for every tile
    step = tile_size(n)
    scaled_blocks, transposed_blocks, row_sum_blocks = scaled.split(step), z.T.split(step, dim=1), row_sum.split(step)
    tile_view = _shaped_views(torch.empty(step ** 2, dtype=dtype, device=z.device))
    for bi, bj, i0, i1, j0, j1 in _tiles(n):
        tile = torch.mm(scaled_blocks[bi], transposed_blocks[bj], out=tile_view(i1 - i0, j1 - j0))  # scale · Z_I Z_Jᵀ
        _add_positive_logits(positive_sum, positives, pairs, tile, i0, i1, j0, j1)
        if decoupled:
            _drop_positives(tile, positives, pairs, i0, i1, j0, j1, float("-inf"))
        if unshifted:
            tile.exp_()
            if i0 == j0 and exclude_self:
                tile.fill_diagonal_(0.0)
            row_sum_blocks[bi].add_(tile.sum(dim=1))  # in place on the view: `+=` would copy back
            if i0 != j0:
                row_sum_blocks[bj].add_(tile.sum(dim=0))
        else:
            if i0 == j0 and exclude_self:
                tile.fill_diagonal_(float("-inf"))
            _merge_statistics(row_max, row_sum, i0, tile, dim=1)
            if i0 != j0:
                _merge_statistics(row_max, row_sum, j0, tile, dim=0)
    count = positives.count.to(dtype)
    # (m − mean_p s_ip) + log l: at τ = 0.01 the logits are ~100 and the loss may be tiny
    loss = (row_max - positive_sum / count.clamp_min(1)) + torch.log(row_sum)
    loss = torch.where(count > 0, loss, torch.zeros_like(loss))
    return loss, torch.stack([row_max, row_sum])


def info_nce_self_backward(grad_row: Tensor, embeddings: Tensor, labels: Tensor, stats: Tensor,
                           exclude_self: bool, scale: float, decoupled: bool = False) -> Tensor:
    """Gradient of Σ_i grad_row_i · loss_i with respect to ``embeddings`` (its dtype)."""
    z, positives, pairs = _self_positives(embeddings, labels, exclude_self)
    dtype, n = z.dtype, z.shape[0]
    row_max, row_sum = stats.to(dtype)
    count = positives.count.to(dtype)
    coef = torch.where(count > 0, grad_row.to(dtype) * scale, torch.zeros_like(row_sum))
    softmax_coef = coef / row_sum
    positive_weight = coef / count.clamp_min(1)
    scaled = z * scale
    # the forward's shift was 0 for every row (exps_stay_normal): one exp() per tile serves both orientations
    unshifted = not bool(row_max.any())
    grad = torch.zeros_like(z)
    # per-block views made once (one split each), not sliced again for every tile
    step = tile_size(n)
    z_blocks, transposed_blocks, scaled_blocks, grad_blocks = (
        z.split(step), z.T.split(step, dim=1), scaled.split(step), grad.split(step))
    row_coefs = softmax_coef[:, None].split(step)
    col_coefs = softmax_coef[None, :].split(step, dim=1) if n > step else ()  # for tiles off the diagonal
    tile_view, weight_view = (_shaped_views(torch.empty(step ** 2, dtype=dtype, device=z.device)) for _ in range(2))
    negative_weight = -positive_weight
    for bi, bj, i0, i1, j0, j1 in _tiles(n):
        tile = torch.mm(scaled_blocks[bi], transposed_blocks[bj], out=tile_view(i1 - i0, j1 - j0))
        if i0 == j0 and exclude_self:
            tile.fill_diagonal_(float("-inf"))
        if decoupled:  # positives have no softmax term, only their −1/|P| (added below)
            _drop_positives(tile, positives, pairs, i0, i1, j0, j1, float("-inf"))
        # W = G_IJ (rows of block I) + G_JIᵀ (rows of block J, seen through the tile's columns)
        if unshifted:
            tile.exp_()
            weights = torch.mul(tile, row_coefs[bi], out=weight_view(i1 - i0, j1 - j0))
            if i0 != j0:
                weights.addcmul_(tile, col_coefs[bj])
        else:
            weights = torch.exp(tile - row_max[i0:i1, None]).mul_(row_coefs[bi])
            if i0 != j0:
                weights.addcmul_(tile.sub_(row_max[None, j0:j1]).exp_(), col_coefs[bj])
        if (i0, j0) in pairs:
            rows, cols, absolute_rows, absolute_cols = pairs[i0, j0]
            weight = negative_weight[absolute_rows]
            if i0 != j0:
                weight.add_(negative_weight[absolute_cols])
            weights.index_put_((rows, cols), weight, accumulate=True)
        elif positives.pair_rows is None:
            mask = _tile_mask(positives, i0, i1, j0, j1).to(dtype)
            weights.sub_(mask * positive_weight[i0:i1, None])
            if i0 != j0:
                weights.sub_(mask * positive_weight[None, j0:j1])
        if i0 == j0:
            grad_blocks[bi].addmm_(weights + weights.T, z_blocks[bi])
        else:
            grad_blocks[bi].addmm_(weights, z_blocks[bj])
            grad_blocks[bj].addmm_(weights.T, z_blocks[bi])
    return grad.to(embeddings.dtype)


# Up to this many logits (N·M; N² against itself) a call runs the plain PyTorch code (``reference``,
# autograd through one GEMM and log_softmax) instead of the fused op: there the op's fixed costs
# (its autograd wrapper, finding the positives by sort and searchsorted, the exps_stay_normal
# check) exceed its arithmetic, and the N×M logits are no more than one tile of the blocked path.
# Measured (Xeon AVX-512, 1 thread, process clock, D=128, fwd+bwd, fused time / plain time, median
# of 5 alternating rounds; 2·batch rows against as many keys): NT-Xent 1.85 at 128 rows, 1.32 at 256,
# 0.68 at 512, 0.41 at 1024; DCL 1.17 at 256, 0.68 at 512; MACL (the general op) 1.63 at 128, 1.08
# at 256, 0.70 at 512. ``python -m bench.sweep`` re-measures it against lightly at every size.
PLAIN_MAX_LOGITS = 256 * 256


def _plain_when_small(fused, plain, logits):
    """``fused`` (a core whose op is ``.op``), or ``plain`` for calls with at most
    ``PLAIN_MAX_LOGITS`` logits (``logits(*args)``)."""
    def core(*args):
        return (plain if logits(*args) <= PLAIN_MAX_LOGITS else fused)(*args)

    core.op = fused.op
    return core


def _self_logits(embeddings, *_):
    return embeddings.shape[0] ** 2


info_nce = _plain_when_small(define_info_nce_op("info_nce", info_nce_forward, info_nce_backward), reference.info_nce,
                             lambda query, keys, *_: query.shape[0] * keys.shape[0])
info_nce_self = _plain_when_small(define_info_nce_self_op("info_nce_self", info_nce_self_forward,
                                                          info_nce_self_backward), reference.info_nce_self, _self_logits)
info_nce_masked = library.define_precomputed_gradient_op(
    "info_nce_masked", "Tensor query, Tensor keys, Tensor query_labels, Tensor positive_key_labels, "
    "Tensor excluded_key_labels, Tensor row_weights, float scale, bool keys_gradient", 2, 0, info_nce_masked_forward,
    _info_nce_masked_fake)
info_nce_self_decoupled = _plain_when_small(define_info_nce_self_op(
    "info_nce_self_decoupled", functools.partial(info_nce_self_forward, decoupled=True),
    functools.partial(info_nce_self_backward, decoupled=True)), reference.info_nce_self_decoupled, _self_logits)
