"""The ``torch`` backend of the regularizer family: KoLeo without the N×N cosine matrix, CO2 with
its closed-form gradient (the whole batch in one GEMM when small, row blocks above).

Each row's nearest neighbour n(i) = argmax_{j≠i} x̂_i·x̂_j (within its group, DINOv3's
``loss_group_size``; the group's rows gathered from every rank with gradient when it spans ranks)
comes from tiles of rows against up to 4096 candidates with a running max (about
4 × ``runtime.blocks.BLOCK_ELEMENTS`` similarities at a time, without gradient: the choice of
neighbour has none; a large batch searched among itself computes only the tiles on and above the
diagonal of the symmetric similarity matrix), and the loss −mean log(‖x̂_i − x̂_{n(i)} + eps‖_p + eps) from the
reference's O(N·D) expression with its closed-form gradient formed in the forward (autograd
differentiates it where a group spans ranks). Memory: O(N·D + tile) instead of N·G, for the same
neighbours wherever no two candidates tie to rounding.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime import distributed, library
from ..runtime import blocks as tiling
from ..runtime.blocks import blocks
from ..runtime.library import define_precomputed_gradient_op
from ..runtime.dtypes import compute_dtype
from ..runtime.normalize import normalize, normalize_backward_
from ..spectral.torch_backend import nuclear_norm
from .reference import koleo_from_neighbours, koleo_groups

Tensor = torch.Tensor


NEIGHBOUR_TILE_COLUMNS = 4096  # candidates per similarity tile: a tile's GEMM stays efficient
# Tiles of 4 × BLOCK_ELEMENTS similarities (16 MiB of float32): each tile is some six parallel
# regions, and at 2 threads the 64 tiles of 1 × BLOCK_ELEMENTS at 8192 rows spun for 911–1350 ms of
# CPU a step against 451–638 ms with 4× tiles and 535–581 ms with 16× (lightly: 577–622 ms); at one
# thread the three were within noise (212–319 ms). Measured side by side: `fastssl.functional.koleo`
# fwd+bwd at N=8192, D=128 beside lightly's code, process clock, 4 alternating rounds, loaded 2-core Xeon.
NEIGHBOUR_TILE_SCALE = 4
# One group of at least this many rows searched among themselves (the default KoLeo) takes the
# similarity matrix's symmetry: square tiles on and above the diagonal only, each tile's row max
# serving its rows and its column max the tile's columns' rows, about half the GEMM work. Tiles of
# 768 rows: 1024 (a 4 KiB row stride) made the column max 10× slower than the row max at one
# thread. Neighbour search alone, D = 128, Xeon, median of 5, current tiles → symmetric: 1 thread
# 1024 rows 2.45 → 2.51 ms, 2048 10.9 → 9.2, 4096 42.5 → 35.4, 8192 247 → 121; 2 threads 1.35 →
# 1.41, 6.30 → 4.78, 30.8 → 17.9, 120 → 74.7.
SYMMETRIC_MIN_ROWS = 2048
SYMMETRIC_TILE_ROWS = 768


def _keep_better(best: Tensor, neighbours: Tensor, key, value: Tensor, index: Tensor, first_candidate: int) -> None:
    """The running max of a search: where a tile's ``value`` beats ``best[key]`` (strictly: ties keep
    the earlier, lower candidate), take it and its candidate ``index + first_candidate``."""
    current = best[key]
    better = value > current
    best[key] = torch.where(better, value, current)
    neighbours[key] = torch.where(better, index + first_candidate, neighbours[key])


def _best_other(queries: Tensor, candidates: Tensor, own_diagonal: int) -> Tuple[Tensor, Tensor]:
    """max and argmax over the candidates of one tile's similarities (g, q, c), the queries' own
    entries (the tile's diagonal ``own_diagonal``: an empty view where it holds none) at −2."""
    similarity = queries @ candidates.mT
    similarity.diagonal(own_diagonal, dim1=1, dim2=2).fill_(-2)
    return similarity.max(dim=2)


@torch.no_grad()
def nearest_other_symmetric(unit: Tensor) -> Tensor:
    """(n,) int64: ``nearest_other_in_groups`` of one group searched among itself, unit rows (n, D),
    from the tiles (I, J ≥ I) of S = U Uᵀ: tile (I, J) offers its row max to rows I and its column
    max to rows J. Each row's offers arrive in increasing candidate order (tiles (J', I) for J' < I
    came first), and only a strictly larger value replaces the best so far, so ties keep the
    lowest index as in one argmax. Tiles of SYMMETRIC_TILE_ROWS² similarities at most (fewer where
    a test shrinks the tile budget)."""
    n = unit.shape[0]
    tile = max(1, min(SYMMETRIC_TILE_ROWS, math.isqrt(NEIGHBOUR_TILE_SCALE * tiling.BLOCK_ELEMENTS)))
    best = torch.full((n,), -math.inf, dtype=unit.dtype, device=unit.device)
    neighbours = torch.zeros(n, dtype=torch.long, device=unit.device)
    for first in range(0, n, tile):
        block = unit[first:first + tile]
        for other in range(first, n, tile):
            similarity = block @ unit[other:other + tile].T
            if other == first:
                similarity.fill_diagonal_(-2)  # the rows themselves
            _keep_better(best, neighbours, slice(first, first + tile), *similarity.max(dim=1), other)
            if other > first:
                _keep_better(best, neighbours, slice(other, other + tile), *similarity.max(dim=0), first)
    return neighbours


@torch.no_grad()
def nearest_other_in_groups(queries: Tensor, candidates: Tensor, offset: int) -> Tensor:
    """(g, q) int64: for each unit row of ``queries`` (g, q, D), the candidate of its group
    (``candidates`` (g, G, D)) of largest dot product other than itself (query i is candidate
    ``offset + i``; a group of one row is its own neighbour, as the reference's −2 gives).

    Tiles of at most NEIGHBOUR_TILE_SCALE × BLOCK_ELEMENTS similarities (rows × up to
    NEIGHBOUR_TILE_COLUMNS candidates, or several small groups at once), with a running max per
    row across column tiles when a group has more candidates than one tile holds: O(tile) memory at
    any batch, where the reference holds q × G. Ties keep the lowest index, as ``argmax`` does.
    One group of SYMMETRIC_MIN_ROWS rows or more searched among itself (``candidates is queries``)
    takes ``nearest_other_symmetric``: half the GEMM work."""
    groups, rows, size = queries.shape[0], queries.shape[1], candidates.shape[1]
    if groups == 1 and candidates is queries and offset == 0 and rows >= SYMMETRIC_MIN_ROWS:
        return nearest_other_symmetric(queries[0])[None]
    columns = min(size, NEIGHBOUR_TILE_COLUMNS)
    rows_per_tile = max(1, NEIGHBOUR_TILE_SCALE * tiling.BLOCK_ELEMENTS // columns)  # read per call: tests shrink it
    groups_per_tile = max(1, rows_per_tile // rows)
    running = columns < size  # several column tiles per row: keep a running max across them
    if not running and rows <= rows_per_tile and groups <= groups_per_tile:
        return _best_other(queries, candidates, offset).indices  # one tile: no slicing, no copies (small batches)
    if running:
        best = torch.full((groups, rows), -math.inf, dtype=queries.dtype, device=queries.device)
    neighbours = torch.zeros(groups, rows, dtype=torch.long, device=queries.device)
    for first_group in range(0, groups, groups_per_tile):
        tile_groups = slice(first_group, first_group + groups_per_tile)
        for first_row in range(0, rows, rows_per_tile):
            tile_rows = slice(first_row, min(first_row + rows_per_tile, rows))
            for first_column in range(0, size, columns):
                value, index = _best_other(queries[tile_groups, tile_rows],
                                           candidates[tile_groups, first_column:first_column + columns],
                                           tile_rows.start + offset - first_column)
                if not running:  # the tile holds every candidate: its max is the answer
                    neighbours[tile_groups, tile_rows] = index
                    continue
                _keep_better(best, neighbours, (tile_groups, tile_rows), value, index, first_column)
    return neighbours


def _koleo_distance_grads(difference: Tensor, distances: Tensor, p: float, weights: Tensor) -> Tensor:
    """∂/∂d of Σ_i w_i‖d_i‖_p for rows d (n, D), their norms (n,) and weights w (n,): torch's
    norm backward, d_i|d_i|^(p−2)·w_i/‖d_i‖^(p−1) (sign(d) for p = 1), 0 where ‖d_i‖ = 0 (there
    d_i = 0, so a clamped norm gives the 0)."""
    if p == 1:
        return difference.sign().mul_(weights[:, None])
    tiny = torch.finfo(distances.dtype).tiny
    if p == 2:
        return difference * (weights / distances.clamp_min(tiny))[:, None]
    scale = weights / distances.clamp_min(tiny).pow(p - 1)
    return difference.sign().mul_(difference.abs().pow_(p - 1)).mul_(scale[:, None])


def koleo_local_forward(x: Tensor, p: float, eps: float, group_size: Optional[int], with_gradient: bool
                        ) -> Tuple[Tensor, Tensor]:
    """x: (N, D) → (loss, ∂loss/∂x) in the compute dtype: ``reference.koleo`` on groups of local rows
    (``group_size`` dividing N, None: one group) with its closed-form gradient, the rows'
    normalisation included (no autograd graph). With x̂ = x/max(‖x‖, eps), d_i = x̂_i − x̂_{n(i)} +
    eps and r_i = ‖d_i‖_p (``F.pairwise_distance``'s expression, the same bits), the loss is
    −mean log(r_i + eps), ∂/∂r_i = −1/(N(r_i + eps)); d_i's gradient goes to x̂_i and, negated, to
    x̂_{n(i)} (an index_add), then through the normalisation (``runtime.normalize_backward_``)."""
    rows = normalize(x.to(compute_dtype(x)), 1, eps)
    unit = rows.unit
    batch, dim = unit.shape
    size = group_size or batch
    grouped = unit.view(-1, size, dim)
    neighbours = nearest_other_in_groups(grouped, grouped, 0)
    if size < batch:  # indices within each group → row indices
        neighbours = neighbours + torch.arange(0, batch, size, device=x.device)[:, None]
    neighbours = neighbours.view(-1)
    difference = (unit - unit.index_select(0, neighbours)).add_(eps)
    distances = torch.linalg.vector_norm(difference, p, dim=1)
    shifted = distances + eps
    loss = -shifted.log().mean()
    if not with_gradient:
        return loss, library.empty_grad(x)
    grad_difference = _koleo_distance_grads(difference, distances, p, shifted.reciprocal_().mul_(-1.0 / batch))
    return loss, normalize_backward_(rows, grad_difference.index_add(0, neighbours, grad_difference, alpha=-1))


def _koleo_local_fake(x, p, eps, group_size, with_gradient):
    dtype = compute_dtype(x)
    return (x.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (x,), dtype))


koleo_local = define_precomputed_gradient_op("koleo", "Tensor x, float p, float eps, int? group_size", 1, 0,
                                             koleo_local_forward, _koleo_local_fake)


def koleo(x: Tensor, p: float, eps: float, group_size: Optional[int] = None, gather_distributed: bool = False
          ) -> Tensor:
    """``reference.koleo``'s signature and result, the neighbours from ``nearest_other_in_groups``:
    the closed-form op ``koleo_local`` where every group lies in the local rows and p ≥ 1
    (autograd's backward through the normaliser, the gather and the distance costs more than the
    forward); a group spanning ranks (its candidates' gradients go to other ranks) or p < 1
    (|d|^(p−1) is infinite at d = 0, where torch's norm backward has its own convention)
    differentiates the same expression by autograd."""
    world = distributed.world_size() if gather_distributed else 1
    if (group_size or x.shape[0] * world) <= x.shape[0] and p >= 1:
        return koleo_local(x, p, eps, group_size)
    x = F.normalize(x.to(compute_dtype(x)), p=2, dim=-1, eps=eps)
    queries, candidates, offset = koleo_groups(x, group_size, gather_distributed)
    return koleo_from_neighbours(queries, candidates, nearest_other_in_groups(queries, candidates, offset), p, eps)


koleo.op = koleo_local.op  # the registered op behind the backend (what opcheck checks)


def _divergence_and_logit_grads(p: Tensor, q: Tensor, with_gradient: bool
                                ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """p, q: (rows, K) log-softmaxes → (Σ over the rows, (rows, K), (rows, K)), the gradients None
    without ``with_gradient``. Per row KL(q‖p) + KL(p‖q) = Σ_k (q_k − p_k)(Q_k − P_k) of
    log-softmaxes p, q (P = e^p, Q = e^q), and its gradients with respect to the logits behind p and
    q: with g = ∂/∂p = −(Q − P) − (q − p)P and h = ∂/∂q = (Q − P) + (q − p)Q, through the log-softmax
    ∂/∂s = g − P Σg and ∂/∂t = h − Q Σh. In place where a temporary is not needed again: each pass
    over a block is a pass over (rows, K) memory, the cost of this loss beside its GEMMs."""
    big_p, big_q = p.exp(), q.exp()
    difference, mass = q - p, big_q - big_p
    total = torch.dot(difference.view(-1), mass.view(-1))
    if not with_gradient:
        return total, None, None
    g = (difference * big_p).add_(mass).neg_()
    h = difference.mul_(big_q).add_(mass)
    return (total, g.addcmul_(big_p, g.sum(dim=1, keepdim=True), value=-1),
            h.addcmul_(big_q, h.sum(dim=1, keepdim=True), value=-1))


# Up to this many rows (no bank, one block) the q logits are the p logits' transpose: one GEMM for
# both, and one ∂/∂logits for the two gradient GEMMs (3 GEMMs, not 6). Above it the transposed
# reads of the N × N matrices (4 KiB strides at 1024 rows) cost more than the GEMMs they save.
# Measured (``co2_forward`` alone, D=128, 1 thread, process time, Xeon AVX-512), whole batch /
# blocks: 0.40 at 128 rows, 0.61 at 256, 0.71 at 512, 1.03 at 1024.
WHOLE_BATCH_MAX_ROWS = 512


def _whole_batch_divergence(a: Tensor, b: Tensor, scale: float, gradient_scale: float, with_gradient: bool
                            ) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """Σ_i KL(q_i‖p_i) + KL(p_i‖q_i) of unit rows a, b (N, D) against the other view's rows, and its
    gradients / scale times ``gradient_scale`` (None without ``with_gradient``): s_q[i, j] = b_i·a_j
    = s_p[j, i], so one GEMM gives both logit matrices and ∂/∂s_p + (∂/∂s_q)ᵀ feeds both gradient
    GEMMs."""
    logits = (a * scale) @ b.T
    total, g_p, g_q = _divergence_and_logit_grads(F.log_softmax(logits, dim=1), F.log_softmax(logits.T, dim=1),
                                                  with_gradient)
    if not with_gradient:
        return total, None, None
    grad_logits = g_p.add_(g_q.T).mul_(gradient_scale)
    return total, grad_logits @ b, grad_logits.T @ a


def _blocked_divergence(a: Tensor, b: Tensor, bank: Optional[Tensor], scale: float, gradient_scale: float,
                        with_gradient: bool) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """``_whole_batch_divergence``'s result in blocks of rows, against the batch or a bank (K, D)."""
    scaled_a, scaled_b = a * scale, b * scale
    n = a.shape[0]
    candidates = n if bank is None else bank.shape[0] + 1
    total = a.new_zeros(())
    grad_a, grad_b = (torch.zeros_like(a), torch.zeros_like(b)) if with_gradient else (None, None)
    for rows in blocks(n, candidates):
        a_rows, b_rows = a[rows], b[rows]
        if bank is None:
            logits_p, logits_q = scaled_a[rows] @ b.T, scaled_b[rows] @ a.T
        else:
            positive = (scaled_a[rows] * b_rows).sum(dim=1, keepdim=True)
            logits_p = torch.cat([positive, scaled_a[rows] @ bank.T], dim=1)
            logits_q = torch.cat([positive, scaled_b[rows] @ bank.T], dim=1)
        block_total, g_p, g_q = _divergence_and_logit_grads(F.log_softmax(logits_p, dim=-1),
                                                            F.log_softmax(logits_q, dim=-1), with_gradient)
        total = total + block_total
        if not with_gradient:
            continue
        if bank is None:  # s_p = a_rows·bᵀ, s_q = b_rows·aᵀ
            grad_a[rows] += g_p @ b
            grad_b += g_p.T @ a_rows
            grad_b[rows] += g_q @ a
            grad_a += g_q.T @ b_rows
        else:  # the positive column is shared by both, the bank's columns only feed their own side
            positive_weight = (g_p[:, :1] + g_q[:, :1])
            grad_a[rows] += positive_weight * b_rows + g_p[:, 1:] @ bank
            grad_b[rows] += positive_weight * a_rows + g_q[:, 1:] @ bank
    if not with_gradient:
        return total, None, None
    return total, grad_a.mul_(gradient_scale), grad_b.mul_(gradient_scale)


def co2_forward(x0: Tensor, x1: Tensor, negatives: Optional[Tensor], alpha: float, scale: float,
                with_gradient: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """x0, x1: (N, D) embeddings; negatives: (K, D) or None → (loss, ∂/∂x0, ∂/∂x1) in the compute dtype.

    ``reference.co2`` with its closed-form gradient, the rows' normalisation included (no autograd
    graph at all): the whole batch at once up to WHOLE_BATCH_MAX_ROWS rows, else in blocks of
    rows (O(block) memory, where autograd would keep the N × N (or N × K) log-probabilities twice
    over). Without a bank, row i's candidates are every row of the other view with the positive at
    j = i: the same classes as lightly's [positive, others in order], permuted alike in p and q,
    which the KL does not see. The bank takes no gradient (lightly detaches it). The temperature
    scales the (N, D) rows before the GEMMs, not the (N, K) logits after them."""
    dtype = compute_dtype(x0, x1)
    rows_a, rows_b = normalize(x0.to(dtype), 1), normalize(x1.to(dtype), 1)
    a, b = rows_a.unit, rows_b.unit
    n = a.shape[0]
    factor = alpha * 0.5 / n
    if negatives is None and n <= WHOLE_BATCH_MAX_ROWS and n * n <= tiling.BLOCK_ELEMENTS:  # one block
        total, grad_a, grad_b = _whole_batch_divergence(a, b, scale, factor * scale, with_gradient)
    else:
        total, grad_a, grad_b = _blocked_divergence(a, b, None if negatives is None else negatives.to(dtype), scale,
                                                    factor * scale, with_gradient)
    if not with_gradient:
        return factor * total, library.empty_grad(x0), library.empty_grad(x1)
    return factor * total, normalize_backward_(rows_a, grad_a), normalize_backward_(rows_b, grad_b)


def _co2_fake(x0, x1, negatives, alpha, scale, with_gradient):
    dtype = compute_dtype(x0, x1)
    return (x0.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (x0, x1), dtype))


co2 = define_precomputed_gradient_op("co2", "Tensor x0, Tensor x1, Tensor? negatives, float alpha, float scale",
                                     2, 0, co2_forward, _co2_fake)


def _padded_clusters(rows: Tensor, cluster_ids: Tensor, num_ids: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The clusters of more than one row, each centred and zero-padded to the largest one:
    (C, n_max, D), their sizes (C,) and ids (C,), ids in increasing order. Zero rows change no
    singular value (nor either Gram's nonzero eigenvalues), so the padded blocks' are the clusters'."""
    counts = torch.bincount(cluster_ids, minlength=num_ids)
    order = torch.argsort(cluster_ids, stable=True)
    sorted_ids = cluster_ids[order]
    starts = torch.cumsum(counts, dim=0) - counts
    positions = torch.arange(rows.shape[0], device=rows.device) - starts[sorted_ids]
    kept = (counts > 1).nonzero().flatten()
    padded = rows.new_zeros(num_ids, int(counts.max()), rows.shape[1]).index_put((sorted_ids, positions), rows[order])
    padded, sizes = padded[kept], counts[kept]
    valid = (torch.arange(padded.shape[1], device=rows.device)[None, :] < sizes[:, None]).to(rows.dtype)[:, :, None]
    means = padded.sum(dim=1, keepdim=True) / sizes.to(rows.dtype)[:, None, None]
    return (padded - means) * valid, sizes, kept


def _centred_singular_sums(rows: Tensor, cluster_ids: Tensor, num_ids: int) -> Tuple[Tensor, Tensor]:
    """Σσ/√max(n − 1, D) of every cluster of more than one row, all in one batched nuclear norm
    (eigenvalues of each cluster's smaller float64 Gram, closed-form gradient): (C,) and their ids."""
    centred, sizes, ids = _padded_clusters(rows, cluster_ids, num_ids)
    if ids.numel() == 0:
        return rows.new_zeros(0), ids
    denominators = torch.clamp_min(sizes - 1, rows.shape[1]).to(rows.dtype).sqrt()
    return nuclear_norm(centred) / denominators, ids


def effective_dimensionality_forward(x: Tensor, with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """lightly's exp(H(σ/Σσ))/min(M, D) of (M, D) ``x`` from the eigenvalues of its smaller Gram (in
    float64: an m×m matrix, m = min(M, D)) and its gradient U·diag(∂/∂σ)·Vᵀ from the same
    eigenvectors, Q·diag(g/σ)·Qᵀ·X (or X·Q·diag(g/σ)·Qᵀ): no SVD, no autograd graph. With
    p = σ/(Σσ + ε), h_j = −log(p_j + ε) − p_j/(p_j + ε): ∂H/∂σ_k = (h_k − Σ_j h_j p_j)/(Σσ + ε).
    Eigenvalues below the Gram's rounding count as σ = 0 (as ``spectral.torch_backend.nuclear_norm``)
    and their directions get no gradient (the minimum-norm subgradient; an SVD gives them
    rounding-noise vectors)."""
    z = x.to(torch.float64)
    gram = z @ z.T if z.shape[0] <= z.shape[1] else z.T @ z
    eigenvalues, vectors = torch.linalg.eigh(gram) if with_gradient else (torch.linalg.eigvalsh(gram), None)
    noise = gram.shape[0] * max(z.shape) * torch.finfo(torch.float64).eps * eigenvalues[-1].clamp_min(0)
    above_noise = eigenvalues > noise
    singular_values = torch.where(above_noise, eigenvalues.clamp_min(0).sqrt(), 0.0)  # as ``nuclear_norm``
    total = singular_values.sum() + 1e-12
    probabilities = singular_values / total
    log_terms = torch.log(probabilities + 1e-12)
    entropy = -torch.sum(probabilities * log_terms)
    value = torch.exp(entropy) / min(x.shape)
    if not with_gradient:
        return value.to(compute_dtype(x)), library.empty_grad(x)
    weights = -log_terms - probabilities / (probabilities + 1e-12)
    grad_sigma = value * (weights - (weights * probabilities).sum()) / total
    scale = torch.where(above_noise, grad_sigma / singular_values.clamp_min(torch.finfo(torch.float64).tiny),
                        torch.zeros_like(eigenvalues))
    mixing = (vectors * scale) @ vectors.T
    direction = mixing @ z if z.shape[0] <= z.shape[1] else z @ mixing
    return value.to(compute_dtype(x)), direction.to(compute_dtype(x))


def _effective_dimensionality_fake(x, with_gradient):
    dtype = compute_dtype(x)
    return (x.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (x,), dtype))


effective_dimensionality = define_precomputed_gradient_op(
    "effective_dimensionality", "Tensor x", 1, 0, effective_dimensionality_forward, _effective_dimensionality_fake)


def dse(x: Tensor, local_labels: Tensor, global_labels: Tensor, other_centroids: Tensor, images_per_group: int,
        global_clusters: int) -> Tensor:
    """``reference.dse``'s signature and result, without its loops: every cluster's centred singular
    sum (all images' local clusters in one batched call, all groups' in another) from the
    smaller side of its centred rows, the effective dimensionality from the D×D (or M×M) Gram,
    the distances to the nearest other centroids in one pass."""
    dtype = compute_dtype(x, other_centroids)
    x, other_centroids = x.to(dtype), other_centroids.to(dtype)
    batch_size, num_tokens, dim = x.shape
    rows = x.reshape(-1, dim)
    average_norm = torch.norm(x - x.mean(dim=(0, 1), keepdim=True), dim=-1, p=2).mean() + 1e-12
    image_of_row = torch.arange(batch_size, device=x.device).repeat_interleave(num_tokens)

    local_clusters = int(local_labels.max()) + 1
    sums, ids = _centred_singular_sums(rows, image_of_row * local_clusters + local_labels.reshape(-1),
                                       batch_size * local_clusters)
    per_image = torch.zeros(batch_size, dtype=dtype, device=x.device).index_add_(0, ids // local_clusters, sums)
    clusters_per_image = torch.bincount(ids // local_clusters, minlength=batch_size)
    with_clusters = clusters_per_image > 0
    intra_image = (per_image[with_clusters] / clusters_per_image[with_clusters]).mean() if ids.numel() else \
        x.new_zeros(())

    group_of_row = image_of_row // images_per_group
    num_groups = -(-batch_size // images_per_group)
    group_clusters = int(global_labels.max()) + 1
    intra_sums, _ = _centred_singular_sums(rows, group_of_row * group_clusters + global_labels.reshape(-1),
                                           num_groups * group_clusters)
    intra_batch = intra_sums.mean() if intra_sums.numel() else x.new_zeros(())

    group_rows = torch.bincount(group_of_row, minlength=num_groups)
    has_others = torch.clamp_max(group_rows, global_clusters) > 1
    distances = (rows - other_centroids.reshape(-1, dim)).norm(dim=1)
    group_means = torch.zeros(num_groups, dtype=dtype, device=x.device).index_add_(0, group_of_row, distances)
    group_means = group_means / group_rows.to(dtype)
    inter_batch = group_means[has_others].mean() if bool(has_others.any()) else x.new_zeros(())

    return (inter_batch / average_norm + effective_dimensionality(rows)
            - 0.5 * (intra_batch / average_norm + intra_image / average_norm))
