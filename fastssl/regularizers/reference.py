"""The plain-PyTorch spec of the regularizer family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype


def koleo_from_neighbours(x: torch.Tensor, neighbours: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """−mean log(‖x_i − x_{n(i)} + eps‖_p + eps) of unit rows ``x`` (N, D) and their neighbours (N,)."""
    return -(F.pairwise_distance(x, x[neighbours], p=p, eps=eps) + eps).log().mean()


def koleo(x: torch.Tensor, p: float, eps: float) -> torch.Tensor:
    """lightly's KoLeo on (N, D) rows: neighbours by the full N×N cosine matrix (diagonal −2)."""
    x = F.normalize(x.to(compute_dtype(x)), p=2, dim=-1, eps=eps)
    cosine = (x @ x.T).detach()
    cosine = cosine.masked_fill(torch.eye(x.shape[0], dtype=torch.bool, device=x.device), -2)  # not itself
    return koleo_from_neighbours(x, cosine.argmax(dim=1), p, eps)


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
    """CO2's consistency (Wei et al., 2021), lightly's ``CO2Regularizer`` on unit rows (N, D): the
    symmetric KL divergence, batch mean, between the pseudo-label distributions of x0 against x1
    and of x1 against x0, times α/2. ``negatives``: a bank (K, D) or None (the batch)."""
    dtype = compute_dtype(x0, x1)
    x0, x1 = x0.to(dtype), x1.to(dtype)
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
