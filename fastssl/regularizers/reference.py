"""The plain-PyTorch spec of the regularizer family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime import distributed
from ..runtime.dtypes import compute_dtype


def koleo_groups(unit: torch.Tensor, group_size: Optional[int], gather_distributed: bool
                 ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """DINOv3's neighbour sets: the global batch (every rank's unit rows (N, D), rank order, when
    gathering) cut into groups of ``group_size`` consecutive rows (None: one group), each row's
    candidates its own group. Returns the local rows as (groups, q, D), each group's candidates
    (groups, G, D) and the position of the first local row in its group (so row i of a group is
    candidate ``offset + i``). Groups within the local rows need no gather; a group spanning ranks
    takes the gathered rows with their gradient (``runtime.distributed.gather``), so each rank's
    neighbours on other ranks receive their share under DDP."""
    batch, dim = unit.shape
    world = distributed.world_size() if gather_distributed else 1
    size = group_size or batch * world
    if size <= batch:  # whole groups of local rows (the caller checked that size divides N)
        grouped = unit.view(-1, size, dim)
        return grouped, grouped, 0
    everyone = distributed.gather(unit) if world > 1 else unit
    start = distributed.rank() * batch
    first = start - start % size
    return unit[None], everyone[None, first:first + size], start - first


def koleo_from_neighbours(queries: torch.Tensor, candidates: torch.Tensor, neighbours: torch.Tensor, p: float,
                          eps: float) -> torch.Tensor:
    """−mean log(‖x_i − c_{n(i)} + eps‖_p + eps) of unit rows ``queries`` (g, q, D), their groups'
    ``candidates`` (g, G, D) and neighbours (g, q) (indices into the group)."""
    if queries.shape[0] == 1:  # one group: a row gather, whose backward (index_add) is cheaper than gather's
        queries, chosen = queries[0], candidates[0].index_select(0, neighbours[0])
    else:
        chosen = torch.gather(candidates, 1, neighbours[:, :, None].expand(-1, -1, candidates.shape[2]))
    return -(F.pairwise_distance(queries, chosen, p=p, eps=eps) + eps).log().mean()


def koleo(x: torch.Tensor, p: float, eps: float, group_size: Optional[int] = None,
          gather_distributed: bool = False) -> torch.Tensor:
    """lightly's KoLeo on (N, D) rows, in DINOv3's groups (``koleo_groups``): neighbours by the
    full cosine matrix of the local rows against their group (−2 at the row itself)."""
    x = F.normalize(x.to(compute_dtype(x)), p=2, dim=-1, eps=eps)
    queries, candidates, offset = koleo_groups(x, group_size, gather_distributed)
    cosine = (queries @ candidates.mT).detach()
    own = torch.arange(queries.shape[1], device=x.device)
    cosine[:, own, own + offset] = -2  # not itself
    return koleo_from_neighbours(queries, candidates, cosine.argmax(dim=2), p, eps)


def _consistency_log_labels(a: torch.Tensor, b: torch.Tensor, negatives, scale: float) -> torch.Tensor:
    """log_softmax of [a_i·b_i, a_i·(negatives)] · scale per row: the negatives are the other rows
    of ``b`` (N − 1, diagonal removed, in order) or a memory bank (K, D)."""
    positive = (a * b).sum(dim=1, keepdim=True)
    if negatives is None:
        others = ~torch.eye(a.shape[0], dtype=torch.bool, device=a.device)
        negative = (a @ b.T).masked_select(others).view(a.shape[0], a.shape[0] - 1)
    else:
        negative = a @ negatives.T
    return F.log_softmax(torch.cat([positive, negative], dim=1) * scale, dim=-1)


def co2(x0: torch.Tensor, x1: torch.Tensor, negatives, alpha: float, scale: float) -> torch.Tensor:
    """CO2's consistency (Wei et al., 2021), lightly's ``CO2Regularizer`` on (N, D) embeddings, rows
    normalised first (``F.normalize``): the symmetric KL divergence, batch mean, between the
    pseudo-label distributions of x0 against x1 and of x1 against x0, times α/2. ``negatives``: a
    bank (K, D) (used as it is: lightly's holds normalised rows) or None (the batch)."""
    dtype = compute_dtype(x0, x1)  # half inputs are normalised in float32 too
    x0, x1 = F.normalize(x0.to(dtype), dim=1), F.normalize(x1.to(dtype), dim=1)
    bank = None if negatives is None else negatives.to(dtype)
    p = _consistency_log_labels(x0, x1, bank, scale)
    q = _consistency_log_labels(x1, x0, bank, scale)
    divergence = F.kl_div(p, q, reduction="batchmean", log_target=True) + F.kl_div(q, p, reduction="batchmean",
                                                                                  log_target=True)
    return alpha * 0.5 * divergence


def centred_singular_sum(rows: torch.Tensor) -> torch.Tensor:
    """lightly's ``_centered_singular_sum``: Σσ(X − mean X) / √max(n − 1, D) of (n, D) rows."""
    centred = rows - rows.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(centred).sum() / math.sqrt(max(rows.shape[0] - 1, rows.shape[1]))


def effective_dimensionality(x: torch.Tensor) -> torch.Tensor:
    """lightly's ``_effective_dimensionality`` of (M, D): exp(entropy of σ/Σσ) / min(M, D)."""
    singular_values = torch.linalg.svdvals(x)
    probabilities = singular_values / (singular_values.sum() + 1e-12)
    entropy = -torch.sum(probabilities * torch.log(probabilities + 1e-12))
    return torch.exp(entropy) / min(x.shape)


def _mean_or_zero(terms, like: torch.Tensor) -> torch.Tensor:
    return torch.stack(terms).mean() if terms else like.new_zeros(())


def _cluster_singular_sums(rows: torch.Tensor, labels: torch.Tensor) -> list:
    """``centred_singular_sum`` of every cluster of ``labels`` with more than one row, in label order."""
    clusters = [rows[labels == label] for label in torch.unique(labels)]
    return [centred_singular_sum(cluster) for cluster in clusters if cluster.shape[0] > 1]


def dse(x: torch.Tensor, local_labels: torch.Tensor, global_labels: torch.Tensor, other_centroids: torch.Tensor,
        images_per_group: int, global_clusters: int) -> torch.Tensor:
    """lightly's DSE score (``DSERegularizer.forward`` before −weight) of dense features ``x``
    (B, N, D), already normalised if asked, given the k-means results (no gradient): each
    image's clusters ``local_labels`` (B, N); each group of ``images_per_group`` images' clusters
    ``global_labels`` (B, N) and, per token, the nearest centroid other than its own
    ``other_centroids`` (B, N, D) (used where the group has min(global_clusters, its tokens) > 1
    centroids). Image by image, cluster by cluster, by SVD, as lightly."""
    dtype = compute_dtype(x, other_centroids)
    x, other_centroids = x.to(dtype), other_centroids.to(dtype)
    batch_size, num_tokens, dim = x.shape
    average_norm = torch.norm(x - x.mean(dim=(0, 1), keepdim=True), dim=-1, p=2).mean() + 1e-12
    image_terms = []
    for image, labels in zip(x, local_labels):
        ranks = _cluster_singular_sums(image, labels)
        if ranks:
            image_terms.append(torch.stack(ranks).mean())
    inter_terms, intra_terms = [], []
    for start in range(0, batch_size, images_per_group):
        group = x[start:start + images_per_group].reshape(-1, dim)
        if min(global_clusters, group.shape[0]) > 1:
            others = other_centroids[start:start + images_per_group].reshape(-1, dim)
            inter_terms.append((group - others).norm(dim=1).mean())
        intra_terms += _cluster_singular_sums(group, global_labels[start:start + images_per_group].reshape(-1))
    inter_batch, intra_batch, intra_image = (_mean_or_zero(terms, x) for terms in (inter_terms, intra_terms,
                                                                                    image_terms))
    return (inter_batch / average_norm + effective_dimensionality(x.reshape(-1, dim))
            - 0.5 * (intra_batch / average_norm + intra_image / average_norm))
