"""lightly 1.6's k-means for ``DSERegularizer``: k-means++ seeding and Lloyd iterations with its
random draws (``torch.randint`` / ``torch.multinomial`` on ``x``'s device) in its order, so the
same seed gives lightly's clusters. Runs without gradient, outside the ops (the draws depend on
the data)."""
from __future__ import annotations

from typing import Tuple

import torch

Tensor = torch.Tensor


def kmeans_plus_plus_init(x: Tensor, num_clusters: int) -> Tensor:
    """(num_clusters, D) seeds of the (M, D) points: one by ``randint``, each next one by
    ``multinomial`` on the squared distance to the nearest seed (uniform if all are 0), as
    lightly's (its full ``cdist`` against every seed, for its exact probabilities)."""
    first_index = torch.randint(x.shape[0], (1,), device=x.device)
    centroids = x[first_index]
    for _ in range(num_clusters - 1):
        probabilities = torch.cdist(x, centroids).min(dim=1).values.square()
        probabilities = probabilities / (probabilities.sum() + 1e-12)
        if torch.sum(probabilities) == 0:
            probabilities = torch.ones_like(probabilities) / probabilities.numel()
        centroids = torch.cat((centroids, x[torch.multinomial(probabilities, 1)]), dim=0)
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
        labels = torch.argmin(torch.cdist(x, centroids), dim=1)
        counts = torch.bincount(labels, minlength=num_clusters)
        sums = torch.zeros_like(centroids).index_add_(0, labels, x)
        new_centroids = sums / counts.clamp_min(1)[:, None].to(x.dtype)
        for empty in (counts == 0).nonzero().flatten().tolist():
            new_centroids[empty] = x[torch.randint(num_points, (1,), device=x.device)].squeeze(0)
        shift = (new_centroids - centroids).pow(2).sum().sqrt()
        centroids = new_centroids
        if shift < tol:
            break
    return centroids, torch.argmin(torch.cdist(x, centroids), dim=1)


@torch.no_grad()
def nearest_other_centroids(x: Tensor, centroids: Tensor, labels: Tensor) -> Tensor:
    """(M, D): for each point, the centroid nearest to it other than its own (lightly's
    ``cdist`` with the assigned one masked to inf); zeros when there is no other."""
    if centroids.shape[0] < 2:
        return torch.zeros_like(x)
    distances = torch.cdist(x, centroids).scatter_(1, labels[:, None], float("inf"))
    return centroids[distances.argmin(dim=1)]
