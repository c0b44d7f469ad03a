"""lightly 1.6's k-means for ``DSERegularizer``: k-means++ seeding and Lloyd iterations with its
random draws (``torch.randint`` / ``torch.multinomial`` on ``x``'s device) in its order and
shapes, so the same seed gives lightly's clusters wherever no two candidates tie to rounding.
Runs without gradient, outside the ops (the draws depend on the data).

Distances as lightly's ``torch.cdist`` computes them for more than 25 rows, ‖x‖² + ‖c‖² − 2x·c
from a GEMM, with the rows' ‖x‖² computed once: k-means++ keeps each point's distance to its
nearest seed and adds one seed's column per step (lightly recomputes all k columns, O(k²MD) in
all), and a Lloyd step's assignment drops the ‖x‖² it does not depend on.
"""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def _squared_distances(x: Tensor, squared_norms: Tensor, centroids: Tensor) -> Tensor:
    """(M, k) ‖x_i − c_j‖², clamped at 0 as cdist's (the rows' ‖x‖² given)."""
    return torch.addmm(squared_norms[:, None] + centroids.square().sum(dim=1), x, centroids.T, alpha=-2).clamp_min_(0)


def _assign(x: Tensor, centroids: Tensor) -> Tensor:
    """(M,) the nearest centroid of each point: argmin ‖c‖² − 2x·c (‖x‖² is the same for every c)."""
    return torch.argmin(torch.addmm(centroids.square().sum(dim=1), x, centroids.T, alpha=-2), dim=1)


def kmeans_plus_plus_init(x: Tensor, num_clusters: int) -> Tensor:
    """(num_clusters, D) seeds of the (M, D) points: one by ``randint``, each next one by
    ``multinomial`` on the squared distance to the nearest seed (uniform if all are 0), as lightly's."""
    first_index = torch.randint(x.shape[0], (1,), device=x.device)
    centroids = x[first_index]
    squared_norms = x.square().sum(dim=1)
    nearest = _squared_distances(x, squared_norms, centroids)[:, 0]
    for _ in range(num_clusters - 1):
        probabilities = nearest / (nearest.sum() + 1e-12)
        if torch.sum(probabilities) == 0:
            probabilities = torch.ones_like(probabilities) / probabilities.numel()
        seed = x[torch.multinomial(probabilities, 1)]
        centroids = torch.cat((centroids, seed), dim=0)
        nearest = torch.minimum(nearest, _squared_distances(x, squared_norms, seed)[:, 0])
    return centroids


@torch.no_grad()
def kmeans(x: Tensor, num_clusters: int, max_iters: int, tol: float) -> Tuple[Tensor, Tensor]:
    """lightly's ``DSERegularizer._kmeans`` on (M, D) points → (centroids (k, D), labels (M,)),
    k = min(num_clusters, M). Each iteration's means come from one ``index_add_`` (lightly: a
    boolean gather per cluster); an empty cluster is re-seeded by a ``randint`` draw, clusters in
    order, as lightly's; the loop stops when the centroids move by less than ``tol``."""
    num_points = x.shape[0]
    num_clusters = min(num_clusters, num_points)
    centroids = kmeans_plus_plus_init(x, num_clusters)
    for _ in range(max_iters):
        labels = _assign(x, centroids)
        counts = torch.bincount(labels, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        new_centroids = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        for empty in (counts == 0).nonzero().flatten().tolist():
            new_centroids[empty] = x[torch.randint(num_points, (1,), device=x.device)].squeeze(0)
        shift = (new_centroids - centroids).pow(2).sum().sqrt()
        centroids = new_centroids
        if shift < tol:
            break
    return centroids, _assign(x, centroids)


@torch.no_grad()
def nearest_other_centroids(x: Tensor, centroids: Tensor, labels: Tensor) -> Tensor:
    """(M, D): for each point, the centroid nearest to it other than its own (lightly's
    distances with the assigned one masked to inf); zeros when there is no other."""
    if centroids.shape[0] < 2:
        return torch.zeros_like(x)
    scores = torch.addmm(centroids.square().sum(dim=1), x, centroids.T, alpha=-2)
    return centroids[scores.scatter_(1, labels[:, None], float("inf")).argmin(dim=1)]
