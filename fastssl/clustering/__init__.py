"""The clustering family: log-domain Sinkhorn-Knopp, SwAV (Sinkhorn codes scored by the
distillation family's soft-target cross-entropy) and DeepCluster's k-means.

Public API: :func:`sinkhorn_knopp`, :func:`sinkhorn`, :func:`swav`, :class:`SwaVLoss`,
:func:`kmeans_assign`, :func:`kmeans_update`. Core ops: ``sinkhorn`` and ``kmeans_assign``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..distillation import check_last_layer, off_diagonal_mean, pair_losses
from ..runtime import registry
from ..runtime.validation import (
    check_distributed_available,
    check_float_tensor,
    check_int_at_least,
    check_label_tensor,
    check_non_negative,
    check_positive,
    check_same_device,
    check_tensor_list,
    check_views,
    eager,
)
from . import reference

Tensor = torch.Tensor


def sinkhorn_knopp(
    scores: Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    *,
    row_marginals: Optional[Tensor] = None,
    col_marginals: Optional[Tensor] = None,
    tolerance: Optional[float] = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Sinkhorn-Knopp soft assignments (SwAV codes), computed in the log domain.

    Equal to SwAV's / lightly's linear-domain iteration on ``exp(scores / ε)`` wherever that is
    finite, and finite where it is not (fp16 scores, small ε, large scores). Each of
    ``iterations`` steps rescales the K prototypes' totals to ``row_marginals`` (default
    uniform) and then the B samples' totals to ``col_marginals`` (default uniform); the result is
    the final plan with each sample's row rescaled to sum to 1.

    SeLA-style use: many ``iterations`` with a ``tolerance`` (stop once every prototype total is
    within ``tolerance``, relative, of its marginal) and custom marginals. With
    ``gather_distributed`` the prototype totals are summed over all ranks, so each rank gets its
    rows of the codes of the gathered batch. No gradient flows through the codes.

    Args:
        scores: (B, K) prototype scores. row_marginals: (K,) > 0. col_marginals: (B,) > 0.
    Returns:
        (B, K) codes in the dtype of ``scores``, rows summing to 1.

    Example::

        >>> codes = fastssl.sinkhorn_knopp(prototypes(z).detach(), iterations=3)
    """
    check_float_tensor("scores", scores, ndim=2)
    check_int_at_least("iterations", iterations, 0)
    epsilon = check_positive("epsilon", epsilon)
    tolerance = 0.0 if tolerance is None else check_non_negative("tolerance", tolerance)
    batch, num_prototypes = scores.shape
    for name, marginal, size in (("row_marginals", row_marginals, num_prototypes),
                                 ("col_marginals", col_marginals, batch)):
        if marginal is None:
            continue
        check_float_tensor(name, marginal, ndim=1)
        if marginal.shape[0] != size:
            raise ValueError(f"{name} must have shape ({size},) for scores of shape "
                             f"{tuple(scores.shape)}, got {tuple(marginal.shape)}")
        check_same_device(("scores", name), (scores, marginal))
        if eager() and not bool(torch.all(torch.isfinite(marginal) & (marginal > 0))):
            raise ValueError(f"{name} must be finite and > 0")
    scores = scores.detach()
    _, core = registry.select("sinkhorn", backend, (scores,))
    return core(scores, iterations, epsilon, row_marginals, col_marginals, tolerance,
                bool(gather_distributed))


def sinkhorn(probabilities: Tensor, iterations: int = 3, epsilon: float = 0.05,
             gather_distributed: bool = False) -> Tensor:
    """lightly's ``sinkhorn(probabilities, iterations, epsilon, gather_distributed)`` signature."""
    return sinkhorn_knopp(probabilities, iterations, epsilon, gather_distributed=gather_distributed)


def swav(
    high_resolution_outputs: Sequence[Tensor],
    low_resolution_outputs: Sequence[Tensor] = (),
    queue_outputs: Optional[Sequence[Tensor]] = None,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
    sinkhorn_gather_distributed: bool = False,
    prototypes: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    r"""SwAV's swapped prediction, as lightly's ``SwaVLoss``.

    For each high-resolution crop i, codes :math:`q_i` = Sinkhorn of its scores (with
    ``queue_outputs[i]`` appended, then only the batch rows kept; no gradient). Then

    .. math:: L = \frac{1}{H (V - 1)} \sum_{i < H} \sum_{v \ne i}
              -\frac{1}{B} \sum_b q_{i,b} \cdot \log\mathrm{softmax}(z_{v,b} / \tau)

    over the V = H + L crops.

    Args:
        high_resolution_outputs: H >= 1 tensors (B, K) of prototype scores.
        low_resolution_outputs: tensors (B, K). queue_outputs: H tensors (Q, K), or None.
        prototypes: (K, D) prototype weights, or None. When given, every crop (and queue entry)
            is a (B, D) embedding whose scores are ``crop @ prototypes.T``, and the
            cross-entropy is fused with that product: the (B, K) scores of the crops are
            never held for the backward (the high-resolution ones are made once, without
            gradient, for Sinkhorn).
    Returns:
        0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.swav([p1, p2], [p3, p4, p5, p6])
    """
    high = check_tensor_list("high_resolution_outputs", high_resolution_outputs, 1)
    low = check_tensor_list("low_resolution_outputs", low_resolution_outputs, 0)
    crops = high + low
    if len(crops) < 2:
        raise ValueError("high_resolution_outputs and low_resolution_outputs must hold at least two "
                         f"crops in all, got {len(crops)}")
    names = [f"high_resolution_outputs[{i}]" for i in range(len(high))] + [
        f"low_resolution_outputs[{i}]" for i in range(len(low))]
    check_views(names, crops)
    temperature = check_positive("temperature", temperature)
    check_int_at_least("sinkhorn_iterations", sinkhorn_iterations, 0)
    check_positive("sinkhorn_epsilon", sinkhorn_epsilon)
    if queue_outputs is not None:
        queue = check_tensor_list("queue_outputs", queue_outputs, len(high))
        if len(queue) != len(high):
            raise ValueError(f"queue_outputs must hold one tensor per high-resolution crop "
                             f"({len(high)}), got {len(queue)}")
        for i, q in enumerate(queue):
            check_float_tensor(f"queue_outputs[{i}]", q, ndim=2)
            if q.shape[1] != crops[0].shape[1]:
                raise ValueError(f"queue_outputs[{i}] must be (Q, {crops[0].shape[1]}), got {tuple(q.shape)}")
    if prototypes is not None:
        check_last_layer("prototypes", prototypes, crops[0])
    batch = crops[0].shape[0]
    codes = []
    for i, scores in enumerate(high):
        scores = scores.detach()
        if queue_outputs is not None:
            scores = torch.cat([scores, queue_outputs[i].detach().to(scores.dtype)])
        if prototypes is not None:
            scores = scores @ prototypes.detach().to(scores.dtype).T
        codes.append(sinkhorn_knopp(scores, sinkhorn_iterations, sinkhorn_epsilon,
                                    gather_distributed=sinkhorn_gather_distributed,
                                    backend=backend)[:batch])
    targets = torch.stack(codes)
    return off_diagonal_mean(pair_losses(targets, torch.stack(crops), prototypes, 1.0 / temperature, backend))


def _check_points_and_centroids(x: Tensor, centroids: Tensor) -> None:
    check_float_tensor("x", x, ndim=2)
    check_float_tensor("centroids", centroids, ndim=2)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids must be (K, {x.shape[1]}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(centroids.shape)}")
    check_same_device(("x", "centroids"), (x, centroids))


def kmeans_assign(x: Tensor, centroids: Tensor, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Nearest centroid of every row (DeepCluster's k-means assignment step), without gradient.

    The torch backend fuses the distances with the argmin over blocks of centroids, so the
    (N, K) distance matrix never exists; it ranks centroids by ‖c‖² − 2 x·c, so centroids whose
    squared distances differ by less than the rounding of that form (~1e-7 · (‖x‖² + ‖c‖²) in
    float32) may be ranked either way. The distance returned is computed directly.

    Args: x (N, D); centroids (K, D). Returns: assignments (N,) int64 (ties: lowest index) and
    squared Euclidean distances (N,), float32 (float64 for float64 inputs).

    Example::

        >>> labels, _ = fastssl.kmeans_assign(features, centroids)  # pseudo-labels
    """
    _check_points_and_centroids(x, centroids)
    x, centroids = x.detach(), centroids.detach()
    _, core = registry.select("kmeans_assign", backend, (x, centroids))
    return core(x, centroids)

@torch.no_grad()
def kmeans_update(
    x: Tensor,
    centroids: Tensor,
    counts: Tensor,
    assignments: Optional[Tensor] = None,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One mini-batch k-means step (Sculley, 2010): each centroid becomes the mean of every row
    ever assigned to it, c_k ← (n_k c_k + Σ_{b→k} x_b) / (n_k + m_k), n_k ← n_k + m_k.

    Equal to the per-row updates c_k += (x_b − c_k) / n_k taken one row at a time. Centroids
    that no row has reached keep their value. With ``gather_distributed`` the sums and counts
    of every rank are added (all ranks get the same centroids).

    Args:
        x: (N, D). centroids: (K, D). counts: (K,) rows assigned so far (any number type).
        assignments: (N,) int64 from :func:`kmeans_assign`, or None to compute them here.
    Returns:
        (new centroids (K, D) in the dtype of ``centroids``, new counts (K,) like ``counts``).
    """
    _check_points_and_centroids(x, centroids)
    if not isinstance(counts, Tensor) or counts.shape != (centroids.shape[0],):
        raise ValueError(f"counts must be a tensor of shape ({centroids.shape[0]},), got "
                         f"{tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__}")
    if assignments is None:
        assignments, _ = kmeans_assign(x, centroids, backend=backend)
    check_label_tensor("assignments", assignments, x.shape[0])
    if eager() and (assignments.min() < 0 or assignments.max() >= centroids.shape[0]):
        raise ValueError(f"assignments must lie in [0, {centroids.shape[0]}) for centroids of shape "
                         f"{tuple(centroids.shape)}")
    return reference.kmeans_update(x, centroids, counts, assignments, gather_distributed)


class SwaVLoss(nn.Module):
    """SwAV's swapped prediction with Sinkhorn-Knopp codes, as lightly's ``SwaVLoss``.

    ``forward(high_resolution_outputs, low_resolution_outputs, queue_outputs=None)`` on lists of
    (B, K) prototype scores; see :func:`fastssl.swav`.

    Example::

        >>> loss = SwaVLoss()([p_hi1, p_hi2], [p_lo1, p_lo2, p_lo3, p_lo4])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        check_distributed_available("sinkhorn_gather_distributed", sinkhorn_gather_distributed)
        self.temperature = check_positive("temperature", temperature)
        self.sinkhorn_iterations = check_int_at_least("sinkhorn_iterations", sinkhorn_iterations, 0)
        self.sinkhorn_epsilon = check_positive("sinkhorn_epsilon", sinkhorn_epsilon)
        self.sinkhorn_gather_distributed, self.backend = sinkhorn_gather_distributed, backend

    def forward(self, high_resolution_outputs: Sequence[Tensor], low_resolution_outputs: Sequence[Tensor],
                queue_outputs: Optional[Sequence[Tensor]] = None) -> Tensor:
        return swav(
            high_resolution_outputs, low_resolution_outputs, queue_outputs, temperature=self.temperature,
            sinkhorn_iterations=self.sinkhorn_iterations, sinkhorn_epsilon=self.sinkhorn_epsilon,
            sinkhorn_gather_distributed=self.sinkhorn_gather_distributed, backend=self.backend)
