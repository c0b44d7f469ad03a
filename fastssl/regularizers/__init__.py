"""The regularizer family: terms added to an SSL loss to shape the embedding distribution.

Public API: :func:`koleo`, :class:`KoLeoLoss` (DINOv2's KoLeo, as lightly's ``KoLeoLoss``, with
DINOv3's distributed form and group size),
:func:`co2`, :class:`CO2Regularizer` (lightly's, also at ``fastssl.regularizer``). Core ops:
``koleo`` (each row's nearest neighbour and the log of its distance), ``co2``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..contrastive import MemoryBankModule
from ..runtime import distributed, registry
from ..runtime.dtypes import compute_dtype
from ..runtime.validation import (check_distributed_available, check_float_tensor, check_int_at_least, check_positive,
                                  check_temperature, check_views)
from .kmeans import kmeans, nearest_other_centroids

Tensor = torch.Tensor


def koleo(x: Tensor, p: float = 2.0, eps: float = 1e-8, *, gather_distributed: bool = False,
          group_size: Optional[int] = None, backend: str = "auto") -> Tensor:
    r"""KoLeo (Sablayrolles et al., 2019; DINOv2): −mean_i log(‖x̂_i − x̂_{n(i)} + eps‖_p + eps).

    x̂ are the rows of ``x`` scaled to unit L2 norm (``F.normalize``, eps ``eps``) and n(i) the row
    of largest cosine similarity to row i other than itself, as lightly's ``KoLeoLoss``
    (``torch.nn.PairwiseDistance(p, eps)``, which adds eps to the difference). No gradient flows
    through the choice of neighbour.

    DINOv3's ``KoLeoLossDistributed``: with ``gather_distributed`` (in a process group) each rank's
    rows search their neighbour among every rank's rows (gathered with gradient, so a neighbour on
    another rank gets its gradient there); ``group_size`` cuts the (global) batch into groups of
    that many consecutive rows (rank order) and searches within each row's group only. The loss
    stays the mean over the local rows (lightly's convention, as DINOv3's: DDP's averaging makes it
    the loss of the global batch). The defaults are lightly's: the local batch, one group.

    Degenerate batches, by lightly's formula: a group of one row is its own neighbour (value
    −log(eps·D^(1/p) + eps), gradient 0); two equal rows are each other's neighbour at distance
    eps·D^(1/p), a large finite value (≈ 18.4 − log √D at p = 2) with a finite gradient (each
    term's ≤ 1/(N·eps) in norm before the normalisation's projection; two rows that are each
    other's neighbours get exactly 0: their two terms cancel). Half inputs are
    normalised and searched in float32, where eps is representable (in float16 it rounds to 0, the
    0/0 behind dinov2's NaNs on duplicates, #314 / #492).

    Args: x: (N, D). group_size: divides the global batch W·N and is a multiple or a divisor of N.
    Returns: 0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = dino_loss + 0.1 * fastssl.functional.koleo(student_cls_tokens)
    """
    check_float_tensor("x", x, ndim=2)
    p = check_positive("p", p)
    eps = check_positive("eps", eps)
    _check_koleo_groups(x.shape[0], group_size, gather_distributed)
    _, core = registry.select("koleo", backend, (x,))
    return core(x, p, eps, group_size, bool(gather_distributed))


def _check_koleo_groups(batch: int, group_size: Optional[int], gather_distributed: bool) -> None:
    """DINOv3's rules for ``loss_group_size`` (its messages), and groups within one rank's rows."""
    if group_size is None:
        return
    check_int_at_least("group_size", group_size, 1)
    total = batch * (distributed.world_size() if gather_distributed else 1)
    if total % group_size != 0:
        raise ValueError(f"Global batch size {total} must be divisible by loss group size {group_size}.")
    if group_size % batch != 0 and batch % group_size != 0:
        raise ValueError(f"Loss group size size {group_size} must be a multiple of local batch size {batch} "
                         "(or divide it).")


class KoLeoLoss(nn.Module):
    """KoLeo, as lightly's ``KoLeoLoss(p=2, eps=1e-8)``, plus DINOv3's distributed form and group
    size (keyword-only, off by default); see :func:`fastssl.functional.koleo`.

    Example::

        >>> criterion = KoLeoLoss()
        >>> loss = criterion(features)
    """

    def __init__(self, p: float = 2, eps: float = 1e-8, *, gather_distributed: bool = False,
                 group_size: Optional[int] = None, backend: str = "auto"):
        super().__init__()
        self.p, self.eps, self.backend = check_positive("p", p), check_positive("eps", eps), backend
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.group_size = None if group_size is None else check_int_at_least("group_size", group_size, 1)
        # lightly's public attribute (the loss computes its distances without it)
        self.pairwise_distance = nn.PairwiseDistance(p=p, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return koleo(x, self.p, self.eps, gather_distributed=self.gather_distributed, group_size=self.group_size,
                     backend=self.backend)


def co2(out0: Tensor, out1: Tensor, negatives: Optional[Tensor] = None, alpha: float = 1.0,
        t_consistency: float = 0.05, *, backend: str = "auto") -> Tensor:
    r"""CO2's consistency regularizer (Wei et al., 2021), as lightly's ``CO2Regularizer``: with rows
    normalised, p_i = softmax([x0_i·x1_i, x0_i·n_j]/t) and q_i the same with the views swapped
    (n the other rows of the other view, or a memory bank ``negatives`` (K, D)),

    .. math:: \frac{\alpha}{2}\big(\mathrm{KL}(q\|p) + \mathrm{KL}(p\|q)\big)

    averaged over the batch. Unlike lightly's (which returns ``torch.tensor(...)`` of it: no
    gradient), the result carries its gradient, so it regularizes.

    A batch of one without a bank has a single candidate, the positive: exactly 0, as in lightly.

    Args: out0, out1: (N, D). Returns: 0-dim float32 tensor (float64 for float64 inputs).
    """
    check_views(("out0", "out1"), (out0, out1))
    if negatives is not None:
        check_float_tensor("negatives", negatives, ndim=2)
        if negatives.shape[1] != out0.shape[1]:
            raise ValueError(f"negatives must be (K, {out0.shape[1]}), got {tuple(negatives.shape)}")
    scale = 1.0 / check_temperature("t_consistency", t_consistency)
    _, core = registry.select("co2", backend, (out0, out1))
    return core(out0, out1, negatives, alpha, scale)


class CO2Regularizer(nn.Module):
    """CO2, as lightly's ``CO2Regularizer(alpha=1, t_consistency=0.05, memory_bank_size=0)``;
    ``forward(out0, out1)``. With a memory bank (``memory_bank_size=(K, D)``) its rows are the
    negatives and every call enqueues the normalised ``out1`` (lightly's rule). See
    :func:`fastssl.functional.co2` (the one difference: the result has its gradient)."""

    def __init__(self, alpha: float = 1, t_consistency: float = 0.05, memory_bank_size: Union[int, Sequence[int]] = 0,
                 *, backend: str = "auto"):
        super().__init__()
        self.memory_bank = MemoryBankModule(size=memory_bank_size)
        # lightly's public attributes (the loss itself never builds the N × N divergence terms)
        self.log_target = True
        self.kl_div = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
        # checked here: a bad value must fail before forward enqueues the batch
        self.t_consistency = check_temperature("t_consistency", t_consistency)
        self.alpha, self.backend = alpha, backend

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        negatives = None
        if self.memory_bank.size[0] > 0:
            check_views(("out0", "out1"), (out0, out1))
            keys = F.normalize(out1.to(compute_dtype(out0, out1)), dim=1)
            negatives = self.memory_bank.queue(keys, update=True).to(out0.device)
        return co2(out0, out1, negatives, self.alpha, self.t_consistency, backend=self.backend)


def _check_dse_arguments(weight, local_clusters, global_clusters, max_kmeans_iters, tol) -> None:
    """lightly's constructor checks, in its order, with its messages."""
    for name, value, valid, rule in (("weight", weight, weight >= 0, ">= 0"),
                                     ("local_clusters", local_clusters, local_clusters >= 1, ">= 1"),
                                     ("global_clusters", global_clusters, global_clusters >= 1, ">= 1"),
                                     ("max_kmeans_iters", max_kmeans_iters, max_kmeans_iters >= 1, ">= 1"),
                                     ("tol", tol, tol > 0, "> 0")):
        if not valid:
            raise ValueError(f"{name} must be {rule}, got {value}.")


def dse(representations: Tensor, weight: float = 1.0, normalize: bool = True, local_clusters: int = 3,
        global_clusters: int = 24, max_kmeans_iters: int = 20, tol: float = 1e-4, *, backend: str = "auto") -> Tensor:
    r"""The Dense Structure Estimator regularizer (arXiv 2510.17299), as lightly's ``DSERegularizer``:
    −weight · DSE with

    .. math:: \mathrm{DSE} = \frac{d_{inter}}{\bar r} + \frac{e^{H(\sigma/\sum\sigma)}}{\min(BN, D)}
              - \frac12\Big(\frac{R_{batch}}{\bar r} + \frac{R_{image}}{\bar r}\Big)

    on the (optionally L2-normalised) tokens: r̄ the mean distance to the batch mean; each
    image's tokens in ``local_clusters`` k-means clusters and each group of
    max(global_clusters // local_clusters, 1) images' in ``global_clusters``; R the mean centred
    singular sum Σσ(X_c)/√max(n − 1, D) of the clusters of more than one token (per image, then
    over images; over all groups' clusters); d_inter the mean distance of each token to the
    nearest centroid other than its own; the last term the effective rank of all B·N tokens.
    k-means (lightly's, without gradient) draws ``torch.randint`` / ``torch.multinomial`` in
    lightly's order: the same seed gives lightly's clusters.

    Args: representations: (B, N, D), patch tokens (a feature map (B, D, H, W) is passed as
        ``features.flatten(2).transpose(1, 2)``, as lightly's docstring shows).
    Returns: 0-dim float32 loss (float64 for float64 inputs); weight 0 gives lightly's
    ``new_zeros(())`` (no gradient).
    """
    _check_dse_arguments(weight, local_clusters, global_clusters, max_kmeans_iters, tol)
    if not isinstance(representations, Tensor) or representations.ndim != 3:
        raise ValueError("representations must have shape (batch_size, num_tokens, dim), "
                         f"got {getattr(representations, 'shape', type(representations).__name__)}.")
    if min(representations.shape) == 0:
        raise ValueError("representations must have non-empty batch, token, and feature "
                         f"dimensions, got {representations.shape}.")
    check_float_tensor("representations", representations, ndim=3)
    if weight == 0:
        return representations.new_zeros(())
    x = representations.to(compute_dtype(representations))
    if normalize:
        x = F.normalize(x, dim=-1)
    batch_size, num_tokens, dim = x.shape
    points = x.detach()
    local_labels = torch.stack([kmeans(image, local_clusters, max_kmeans_iters, tol)[1] for image in points])
    images_per_group = max(global_clusters // local_clusters, 1)
    global_labels, other_centroids = [], []
    for start in range(0, batch_size, images_per_group):
        group = points[start:start + images_per_group].reshape(-1, dim)
        centroids, labels = kmeans(group, global_clusters, max_kmeans_iters, tol)
        global_labels.append(labels)
        other_centroids.append(nearest_other_centroids(group, centroids, labels))
    global_labels = torch.cat(global_labels).view(batch_size, num_tokens)
    other_centroids = torch.cat(other_centroids).view(batch_size, num_tokens, dim)
    _, core = registry.select("dse", backend, (x, other_centroids))
    return -weight * core(x, local_labels, global_labels, other_centroids, images_per_group, global_clusters)


class DSERegularizer(nn.Module):
    """DSE, as lightly's ``DSERegularizer(weight=1.0, normalize=True, local_clusters=3,
    global_clusters=24, max_kmeans_iters=20, tol=1e-4)`` (its checks and messages);
    ``forward(representations)`` on (B, N, D); see :func:`fastssl.functional.dse`."""

    def __init__(self, weight: float = 1.0, normalize: bool = True, local_clusters: int = 3,
                 global_clusters: int = 24, max_kmeans_iters: int = 20, tol: float = 1e-4, *, backend: str = "auto"):
        super().__init__()
        _check_dse_arguments(weight, local_clusters, global_clusters, max_kmeans_iters, tol)
        self.weight = weight
        self.normalize = normalize
        self.local_clusters = local_clusters
        self.global_clusters = global_clusters
        self.max_kmeans_iters = max_kmeans_iters
        self.tol = tol
        self.backend = backend

    def forward(self, representations: Tensor) -> Tensor:
        return dse(representations, self.weight, self.normalize, self.local_clusters, self.global_clusters,
                   self.max_kmeans_iters, self.tol, backend=self.backend)
