"""The redundancy-reduction family: Barlow Twins and VICReg on one Gram/covariance core.

Public API: :func:`barlow_twins`, :func:`vicreg`, :class:`BarlowTwinsLoss`, :class:`VICRegLoss`.
Core ops: ``barlow_twins`` and ``vicreg_variance_covariance``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..runtime import distributed, registry
from ..runtime.validation import (
    check_batch_at_least,
    check_choice,
    check_distributed_available,
    check_finite_number,
    check_float_tensor,
    check_non_negative,
    check_views,
)
from . import reference
from .torch_backend import ALGORITHMS

Tensor = torch.Tensor


def barlow_twins(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 5e-3,
    *,
    gather_distributed: bool = False,
    distributed_convention: str = "global",
    scale_loss: float = 1.0,
    algorithm: str = "auto",
    backend: str = "auto",
) -> Tensor:
    r"""Barlow Twins: :math:`\sum_i (1 - C_{ii})^2 + \lambda \sum_{i \ne j} C_{ij}^2`.

    Each view is batch-normalised (biased variance, eps 1e-5, no affine) and
    :math:`C = \hat z_a^\top \hat z_b / N` (D, D), as lightly's ``BarlowTwinsLoss``.

    With ``gather_distributed`` in a process group:

    * ``distributed_convention="global"`` (default): statistics and C over the gathered global
      batch, so every rank returns the single-process loss on the concatenated batch (what the
      official code's SyncBN intends);
    * ``"lightly"``: lightly's convention — per-rank batch-norm statistics, C replaced by the
      mean over ranks of the per-rank C (autograd all-reduce). Computed with the reference
      formula whatever the backend.

    ``scale_loss`` multiplies the result (0.024 in solo-learn / VISSL).

    ``algorithm``: how the fused backends get ‖C‖²_F — ``"gram"`` from the two N×N Gram matrices
    (O(N²D), never D×D), ``"direct"`` from C itself (O(ND²)), ``"auto"`` Gram exactly when N < D.
    Same numbers to float rounding; the reference backend always builds C.

    Args: z_a, z_b: (N, D), N >= 2. Returns: 0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.barlow_twins(projector(y1), projector(y2))
    """
    check_views(("z_a", "z_b"), (z_a, z_b))
    check_batch_at_least("z_a", z_a, 2, "batch-norm statistics need two rows")
    lambda_param = check_non_negative("lambda_param", lambda_param)
    check_choice("distributed_convention", distributed_convention, ("global", "lightly"))
    check_choice("algorithm", algorithm, ALGORITHMS)
    scale_loss = check_finite_number("scale_loss", scale_loss)
    world = distributed.world_size() if gather_distributed else 1
    if world > 1 and distributed_convention == "lightly":
        return scale_loss * reference.barlow_twins_lightly_distributed(z_a, z_b, lambda_param, world)
    if world > 1:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    chosen, core = registry.select("barlow_twins", backend, (z_a, z_b))
    options = () if chosen == "reference" else (algorithm,)
    return scale_loss * core(z_a, z_b, lambda_param, *options)


def vicreg(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
    *,
    gather_distributed: bool = False,
    algorithm: str = "auto",
    backend: str = "auto",
) -> Tensor:
    r"""VICReg: λ · invariance + μ · variance + ν · covariance, as lightly's ``VICRegLoss``.

    * invariance = MSE(z_a, z_b) on the local batch;
    * variance = ½ Σ_views mean_d relu(1 − sqrt(Var_unbiased(z)_d + eps));
    * covariance = Σ_views Σ_{i≠j} Cov(z)_{ij}² / D, Cov = (z − z̄)ᵀ(z − z̄) / (B − 1).

    Inputs (B, …, D): the middle dims are independent groups; variance and covariance are
    averaged over them. With ``gather_distributed``, variance and covariance use the batch
    gathered from all ranks (with gradient); invariance stays local.

    ``algorithm``: ``"gram"`` takes ‖Cov‖²_F from the B×B Gram matrix x xᵀ (O(B²D), never D×D),
    ``"direct"`` from Cov itself (O(BD²)), ``"auto"`` Gram exactly when B < D (see
    :func:`barlow_twins`).

    Args: z_a, z_b: (B, …, D), B >= 2. Returns: 0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.vicreg(expander(y1), expander(y2))
    """
    check_views(("z_a", "z_b"), (z_a, z_b), ndim=None)
    check_float_tensor("z_a", z_a, min_ndim=2)
    check_batch_at_least("z_a", z_a, 2, "the unbiased variance needs two rows")
    for name, value in (("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param)):
        check_non_negative(name, value)
    eps = check_non_negative("eps", eps)
    check_choice("algorithm", algorithm, ALGORITHMS)
    invariance = reference.invariance(z_a, z_b)
    if gather_distributed and distributed.world_size() > 1:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    grouped = [z.reshape(z.shape[0], -1, z.shape[-1]) for z in (z_a, z_b)]
    chosen, core = registry.select("vicreg_variance_covariance", backend, grouped)
    options = () if chosen == "reference" else (algorithm,)
    variance, covariance = core(grouped[0], grouped[1], eps, *options).unbind()
    return lambda_param * invariance + mu_param * variance + nu_param * covariance


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins, as lightly's ``BarlowTwinsLoss``; see :func:`fastssl.barlow_twins`.

    Example::

        >>> loss = BarlowTwinsLoss()(z_a, z_b)   # z: (N, D)
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *,
                 distributed_convention: str = "global", scale_loss: float = 1.0, algorithm: str = "auto",
                 backend: str = "auto"):
        super().__init__()
        self.lambda_param = check_non_negative("lambda_param", lambda_param)
        check_choice("distributed_convention", distributed_convention, ("global", "lightly"))
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.distributed_convention, self.scale_loss, self.backend = distributed_convention, scale_loss, backend

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return barlow_twins(
            z_a, z_b, self.lambda_param, gather_distributed=self.gather_distributed,
            distributed_convention=self.distributed_convention, scale_loss=self.scale_loss,
            algorithm=self.algorithm, backend=self.backend)


class VICRegLoss(nn.Module):
    """VICReg, as lightly's ``VICRegLoss``; see :func:`fastssl.vicreg`.

    Example::

        >>> loss = VICRegLoss()(z_a, z_b)   # z: (B, D) or (B, ..., D)
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 0.0001, *, algorithm: str = "auto",
                 backend: str = "auto"):
        super().__init__()
        self.lambda_param = check_non_negative("lambda_param", lambda_param)
        self.mu_param = check_non_negative("mu_param", mu_param)
        self.nu_param = check_non_negative("nu_param", nu_param)
        self.eps = check_non_negative("eps", eps)
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.backend = backend

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return vicreg(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, self.eps,
                                 gather_distributed=self.gather_distributed, algorithm=self.algorithm,
                                 backend=self.backend)
