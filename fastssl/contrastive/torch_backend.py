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
    compare ``query_labels`` with ``key_labels`` per block (``self_index``: the entries that the
    caller leaves out).
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
        """(stop − start, M) bool: entries of rows [start, stop) with the row's label (dense form;
        self entries included)."""
        return self.query_labels[start:stop, None] == self.key_labels[None, :]


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
    with_self = high - low
    total = int(with_self.sum())
    if total > MAX_PAIRS_PER_ROW * max(n, 1):
        return Positives(count_positives(query_labels, key_labels, self_index, ranges), query_labels, key_labels,
                         self_index)
    # pair p of row r is the key order[low[r] + (p − first pair of r)]
    rows = torch.repeat_interleave(with_self, output_size=total)
    first_pair = torch.cumsum(with_self, 0) - with_self
    cols = order[torch.arange(total, device=query_labels.device) + (low - first_pair)[rows]]
    if self_index is not None:
        keep = cols != self_index[rows]
        rows, cols = rows[keep], cols[keep]
    per_row = torch.bincount(rows, minlength=n)
    row_start = [0] + torch.cumsum(per_row, 0).tolist()
    return Positives(per_row.to(torch.float64), query_labels, key_labels, self_index, rows, cols, row_start)


def _block_logits(scaled_query: Tensor, keys: Tensor, start: int, stop: int, excluded: Positives) -> Tensor:
    """scale · Q[start:stop] Kᵀ with ``excluded``'s pairs set to −inf: (stop − start, M)."""
    logits = scaled_query[start:stop] @ keys.T
    if excluded.pair_rows is not None:
        logits[excluded.block_pairs(start, stop)] = float("-inf")
    else:
        logits.masked_fill_(excluded.block_mask(start, stop), float("-inf"))
    return logits


def _positive_logit_sums(logits: Tensor, positives: Positives, start: int, stop: int
                         ) -> Tuple[Tensor, Union[Tuple[Tensor, Tensor], Tensor]]:
    """Σ of each block row's positive logits (stop − start,) and where the positives are: (rows,
    cols) pairs of the block (sparse) or its (stop − start, M) mask."""
    if positives.pair_rows is not None:
        rows, cols = positives.block_pairs(start, stop)
        return logits.new_zeros(stop - start).index_add_(0, rows, logits[rows, cols]), (rows, cols)
    mask = positives.block_mask(start, stop)
    return torch.where(mask, logits, logits.new_zeros(())).sum(dim=1), mask


class _Buffer:
    """One buffer that every block of a call reuses (no allocation per block), its (rows, cols)
    views made once per shape (a call has at most four shapes)."""

    def __init__(self, elements: int, dtype: torch.dtype, device: torch.device):
        self.storage = torch.empty(elements, dtype=dtype, device=device)
        self.views = {}

    def matrix(self, rows: int, cols: int) -> Tensor:
        if (rows, cols) not in self.views:
            self.views[rows, cols] = self.storage[: rows * cols].view(rows, cols)
        return self.views[rows, cols]


class _RowBlocks:
    """Rows of N queries against M keys in blocks of ``rows_per_block(M)``, and where each block's
    self entries (``self_index``) and positive pairs lie in its logits: flat indices of the block's
    (rows, M) matrix, found once per call for all blocks (the loop then writes or reads them with one
    ``put_``/``take`` per block instead of selecting rows per block)."""

    def __init__(self, n: int, num_keys: int, positives: Optional[Positives], self_index: Optional[Tensor],
                 dtype: torch.dtype):
        self.step = rows_per_block(num_keys)
        self.num_keys = num_keys
        self.bounds = [(start, min(start + self.step, n)) for start in range(0, n, self.step)]
        self.self_entries = self.pair_entries = None
        if self_index is not None:
            rows = torch.nonzero(self_index >= 0).squeeze(1)
            self.self_sizes, self.self_entries = self._flat_entries(rows, self_index[rows])
            self.self_minus_inf = self.fill_self(float("-inf"), dtype, self_index.device)  # ``logits``' source
        self.sparse = positives is not None and positives.pair_rows is not None
        if self.sparse:
            self.pair_sizes = [positives.row_start[stop] - positives.row_start[start] for start, stop in self.bounds]
            self.pair_entries = self._flat_entries(positives.pair_rows, positives.pair_cols, self.pair_sizes)[1]
        elif positives is not None and self_index is not None:  # ``positive_mask``'s source for the self entries
            self.self_unmasked = self.fill_self(False, torch.bool, self_index.device)

    def _flat_entries(self, rows: Tensor, cols: Tensor, sizes: Optional[list] = None
                      ) -> Tuple[list, Tuple[Tensor, ...]]:
        """Entries (rows, cols), rows sorted, as (number per block, flat indices per block)."""
        if sizes is None:
            sizes = torch.bincount(torch.div(rows, self.step, rounding_mode="floor"),
                                   minlength=len(self.bounds)).tolist()
        return sizes, torch.add(cols, rows % self.step, alpha=self.num_keys).split(sizes)

    def split(self, values: Tensor, dim: int = 0) -> Tuple[Tensor, ...]:
        """``values`` (N along ``dim``) in the blocks' pieces: views, made with one op."""
        return values.split(self.step, dim=dim)

    def fill_self(self, value, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, ...]:
        """Per block, ``value`` as many times as the block has self entries: ``put_``'s source."""
        return torch.full((sum(self.self_sizes),), value, dtype=dtype, device=device).split(self.self_sizes)

    def logits(self, b: int, query_blocks: Tuple[Tensor, ...], keys_t: Tensor, buffer: _Buffer) -> Tensor:
        """Block ``b``'s logits Q_b Kᵀ (rows, M) into ``buffer``, its self entries −inf."""
        start, stop = self.bounds[b]
        logits = torch.mm(query_blocks[b], keys_t, out=buffer.matrix(stop - start, self.num_keys))
        if self.self_entries is not None:
            logits.put_(self.self_entries[b], self.self_minus_inf[b])
        return logits

    def positive_mask(self, positives: Positives, b: int) -> Tensor:
        """(rows, M) bool: block ``b``'s entries with the row's label, its self entries left out
        (dense form)."""
        mask = positives.block_mask(*self.bounds[b])
        if self.self_entries is not None:
            mask.put_(self.self_entries[b], self.self_unmasked[b])
        return mask

    def buffer(self, dtype: torch.dtype, device: torch.device) -> _Buffer:
        rows = max((stop - start for start, stop in self.bounds), default=0)
        return _Buffer(rows * self.num_keys, dtype, device)


def _row_statistics(scaled_query: Tensor, keys: Tensor, extra: Optional[Tensor], positives: Optional[Positives],
                    self_index: Optional[Tensor], unshifted: bool,
                    columns: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-row loss, shift m and sum l = Σ exp(s − m) (the extra logit included), all (N,).

    m is the row max, or 0 when ``unshifted`` (see ``exps_stay_normal``). ``columns`` (unshifted,
    symmetric, labels only): (M,) sums of each column's positive logits and of its exp(s), added
    to in place from the same blocks — the symmetric loss then needs no second pass. Each block:
    one GEMM into the reused buffer, its self entries set to −inf (``put_``), its positive logits
    copied out (``take``, sparse form), and exp and the row sum (shifted: the max and the shift
    before): the loss is assembled from those (N,) sums after the loop.
    """
    n, dtype, device = scaled_query.shape[0], scaled_query.dtype, keys.device
    blocks = _RowBlocks(n, keys.shape[0], positives, self_index, dtype)
    row_max = torch.zeros(n, dtype=dtype, device=device) if unshifted else torch.empty(n, dtype=dtype, device=device)
    row_sum = torch.empty(n, dtype=dtype, device=device)
    buffer, keys_t = blocks.buffer(dtype, device), keys.T
    query_blocks, sum_blocks = blocks.split(scaled_query), blocks.split(row_sum)
    if not unshifted:
        max_blocks = blocks.split(row_max[:, None])
        extra_blocks = blocks.split(extra[:, None]) if extra is not None else None
    if blocks.sparse:
        positive_logits = keys.new_empty(positives.pair_rows.shape[0])
        positive_blocks = positive_logits.split(blocks.pair_sizes)
    elif positives is not None:
        positive_sum = keys.new_empty(n)
        positive_sum_blocks = blocks.split(positive_sum)
    for b in range(len(blocks.bounds)):
        logits = blocks.logits(b, query_blocks, keys_t, buffer)
        if blocks.sparse:
            torch.take(logits, blocks.pair_entries[b], out=positive_blocks[b])
        elif positives is not None:  # same labels: the pair (i, j) is also column j's positive i
            kept = torch.where(blocks.positive_mask(positives, b), logits, logits.new_zeros(()))
            torch.sum(kept, dim=1, out=positive_sum_blocks[b])
            if columns is not None:
                columns[0].add_(kept.sum(dim=0))
        if not unshifted:
            torch.amax(logits, dim=1, keepdim=True, out=max_blocks[b])
            if extra is not None:
                torch.maximum(max_blocks[b], extra_blocks[b], out=max_blocks[b])
            logits.sub_(max_blocks[b])  # shifted logits s − m: exactly 0 at the row max
        torch.sum(logits.exp_(), dim=1, out=sum_blocks[b])
        if columns is not None:
            columns[1].add_(logits.sum(dim=0))
    if extra is not None:
        positive_shifted = extra - row_max
        row_sum += torch.exp(positive_shifted)
        return torch.log(row_sum) - positive_shifted, row_max, row_sum
    if blocks.sparse:
        positive_sum = keys.new_zeros(n).index_add_(0, positives.pair_rows, positive_logits)
        if columns is not None:
            columns[0].index_add_(0, positives.pair_cols, positive_logits)
    count = positives.count.to(dtype)
    # (m − mean_p s_ip) + log l: at τ = 0.01 the logits are ~100 and the loss may be tiny
    loss = (row_max - positive_sum / count.clamp_min(1)) + torch.log(row_sum)
    return torch.where(count > 0, loss, torch.zeros_like(loss)), row_max, row_sum


def _positive_labels(query_labels, key_labels, self_index) -> Optional[Positives]:
    return None if query_labels is None else find_positives(query_labels, key_labels, self_index)


def _column_counts(positives: Positives, query_labels: Tensor, key_labels: Tensor) -> Tensor:
    """(M,) float64: the number of rows with each key's label (symmetric losses: no self entries)."""
    if positives.pair_rows is not None and positives.self_index is None:  # the pairs, seen from their columns
        return torch.bincount(positives.pair_cols, minlength=key_labels.shape[0]).to(torch.float64)
    return count_positives(key_labels, query_labels, None)


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
    positives = _positive_labels(query_labels, key_labels, self_index)
    row_loss, row_max, row_sum = _row_statistics(q * scale, k, extra, positives, self_index, unshifted, columns)
    if not symmetric:
        empty = q.new_zeros(0)
        return row_loss, empty, torch.stack([row_max, row_sum]), q.new_zeros(2, 0)
    if columns is not None:
        col_positive_sum, col_sum = columns
        col_count = _column_counts(positives, query_labels, key_labels).to(dtype)
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
    (for the keys an empty tensor without ``keys_grad``: MoCo's queue takes no gradient).

    Each block, as in the forward: one GEMM into the reused buffer, −inf over its self entries,
    exp (shifted: less the row max) times the per-row factor, the positives' −weights added at
    their flat indices (``put_``, sparse form), then dQ_b = G K and dKᵀ += Q_bᵀ G (a GEMM into the
    transposed view: no transpose per block)."""
    dtype = compute_dtype(query, keys, positive_keys)
    q, k = query.to(dtype), keys.to(dtype)
    n, m = q.shape[0], k.shape[0]
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
        col_count = _column_counts(positives, query_labels, key_labels)
        col_coef = torch.where(col_count > 0, grad_col.to(dtype) * scale, torch.zeros_like(col_sum))
        col_positive_weight = col_coef / col_count.clamp_min(1).to(dtype)
        col_softmax_coef, col_max_row = col_coef[None, :] / col_sum, col_max[None, :]

    blocks = _RowBlocks(n, m, positives, self_index, dtype)
    grad_q = torch.empty_like(q)
    grad_k = torch.zeros_like(k) if keys_grad else k.new_empty(0)
    grad_k_t = grad_k.T if keys_grad else None
    buffer, keys_t = blocks.buffer(dtype, device=q.device), k.T
    # symmetric: G = (both directions' softmax terms) needs the logits once more beside it
    gradient_buffer = blocks.buffer(dtype, device=q.device) if symmetric else buffer
    query_blocks, transposed_query_blocks = blocks.split(q * scale), blocks.split(q.T, dim=1)
    grad_q_blocks, coef_blocks = blocks.split(grad_q), blocks.split(row_softmax_coef[:, None])
    max_blocks = blocks.split(row_max[:, None]) if not unshifted else None
    if blocks.sparse:
        pair_weight = row_positive_weight[positives.pair_rows]
        if symmetric:
            pair_weight += col_positive_weight[positives.pair_cols]
        pair_weight_blocks = pair_weight.neg_().split(blocks.pair_sizes)
    elif positives is not None:
        positive_weight_blocks = blocks.split(row_positive_weight[:, None])
    for b, (start, stop) in enumerate(blocks.bounds):
        logits = blocks.logits(b, query_blocks, keys_t, buffer)
        grad_logits = gradient_buffer.matrix(stop - start, m)
        if symmetric and unshifted:  # one exp() serves both directions
            torch.mul(logits.exp_(), col_softmax_coef, out=grad_logits).addcmul_(logits, coef_blocks[b])
        elif symmetric:
            torch.sub(logits, col_max_row, out=grad_logits).exp_().mul_(col_softmax_coef)
            grad_logits.addcmul_(logits.sub_(max_blocks[b]).exp_(), coef_blocks[b])
        elif unshifted:
            logits.exp_().mul_(coef_blocks[b])
        else:
            logits.sub_(max_blocks[b]).exp_().mul_(coef_blocks[b])
        if blocks.sparse:
            grad_logits.put_(blocks.pair_entries[b], pair_weight_blocks[b], accumulate=True)
        elif positives is not None:
            mask = blocks.positive_mask(positives, b).to(dtype)
            grad_logits.sub_(mask * positive_weight_blocks[b])
            if symmetric:
                grad_logits.sub_(mask * col_positive_weight[None, :])
        torch.mm(grad_logits, k, out=grad_q_blocks[b])
        if keys_grad:
            grad_k_t.addmm_(transposed_query_blocks[b], grad_logits)

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
        logits = _block_logits(scaled_q, k, start, stop, excluded)
        if not unshifted:
            logits.sub_(logits.amax(dim=1)[:, None])
        positive_sum, where_positive = _positive_logit_sums(logits, positives, start, stop)
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
    tiles = _Buffer(step ** 2, dtype, z.device)
    for bi, bj, i0, i1, j0, j1 in _tiles(n):
        # scale · Z_I Z_Jᵀ
        tile = torch.mm(scaled_blocks[bi], transposed_blocks[bj], out=tiles.matrix(i1 - i0, j1 - j0))
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
    tiles, weights_buffer = (_Buffer(step ** 2, dtype, z.device) for _ in range(2))
    negative_weight = -positive_weight
    for bi, bj, i0, i1, j0, j1 in _tiles(n):
        tile = torch.mm(scaled_blocks[bi], transposed_blocks[bj], out=tiles.matrix(i1 - i0, j1 - j0))
        if i0 == j0 and exclude_self:
            tile.fill_diagonal_(float("-inf"))
        if decoupled:  # positives have no softmax term, only their −1/|P| (added below)
            _drop_positives(tile, positives, pairs, i0, i1, j0, j1, float("-inf"))
        # W = G_IJ (rows of block I) + G_JIᵀ (rows of block J, seen through the tile's columns)
        if unshifted:
            tile.exp_()
            weights = torch.mul(tile, row_coefs[bi], out=weights_buffer.matrix(i1 - i0, j1 - j0))
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
