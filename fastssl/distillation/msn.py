"""MSN and PMSN (lightly's ``MSNLoss``, ``PMSNLoss``, ``PMSNCustomLoss``): the cross-entropy of the
anchors' prototype distributions to sharpened, Sinkhorn-balanced target distributions, plus a
regulariser on the anchors' mean distribution (mean-entropy maximisation, or a KL to a prior).

What is fused: the anchors' cosine logits, their softmax, the cross-entropy to the targets and
the mean prototype probabilities are one op (``msn_anchor_terms``) that makes the (V·B, K)
logits one block of samples at a time, in the forward and again in the backward, so no
(V·B, K) tensor is held for autograd (lightly holds three: the softmax, the repeated
targets and their power). The targets' (B, K) distributions are
made once, without gradient, and balanced by the clustering family's log-domain Sinkhorn.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import registry
from ..runtime.dtypes import compute_dtype
from ..runtime.validation import (
    check_distributed_available,
    check_float_tensor,
    check_int_at_least,
    check_positive,
    check_same_device,
)

Tensor = torch.Tensor


def _check_features(names, tensors) -> None:
    """2-D floating-point features of one dim, on one device."""
    for name, tensor in zip(names, tensors):
        check_float_tensor(name, tensor, ndim=2)
    if len({tensor.shape[1] for tensor in tensors}) != 1:
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in zip(names, tensors))
        raise ValueError(f"{', '.join(names)} must share their dim, got {shapes}")
    check_same_device(names, tensors)


@torch.no_grad()
def msn_targets(targets: Tensor, prototypes: Tensor, temperature: float = 0.1,
                target_sharpen_temperature: float = 0.25, sinkhorn_iterations: int = 3,
                gather_distributed: bool = False, *, backend: str = "auto") -> Tensor:
    """MSN's target distributions: sharpen(softmax(t̂ · p̂ᵀ / τ), T), then ``sinkhorn_iterations``
    Sinkhorn steps (lightly's ``sinkhorn``; its row and global sums over ranks with
    ``gather_distributed``).

    The sharpened softmax p^(1/T) / Σ p^(1/T) is softmax(t̂ · p̂ᵀ / (τT)); its log goes to the
    clustering family's log-domain Sinkhorn (ε = 1), which is lightly's linear-domain iteration
    in exact arithmetic, and finite where p^(1/T) underflows.

    Args: targets (B, D); prototypes (K, D). Returns: (B, K) rows summing to 1, no gradient,
    float32 (float64 for float64 inputs).
    """
    _check_features(("targets", "prototypes"), (targets, prototypes))
    temperature = check_positive("temperature", temperature)
    target_sharpen_temperature = check_positive("target_sharpen_temperature", target_sharpen_temperature)
    check_int_at_least("sinkhorn_iterations", sinkhorn_iterations, 0)
    dtype = compute_dtype(targets, prototypes)
    logits = F.normalize(targets.to(dtype), dim=1) @ F.normalize(prototypes.to(dtype), dim=1).T
    log_probs = F.log_softmax(logits / (temperature * target_sharpen_temperature), dim=1)
    if sinkhorn_iterations == 0:
        return log_probs.exp_()
    return balanced_probabilities(log_probs, sinkhorn_iterations, gather_distributed, backend)


def balanced_probabilities(log_probs: Tensor, iterations: int, gather_distributed: bool = False,
                           backend: str = "auto") -> Tensor:
    """lightly's MSN ``sinkhorn`` (``iterations`` ≥ 1 rounds: each prototype's mass to 1/K, then
    each row's to 1) of the (B, K) probabilities exp(``log_probs``), in the log domain. Returns
    (B, K) rows summing to 1, no gradient, in the compute dtype."""
    # The clustering family's op (through the registry: that family imports this one). Its
    # uniform column marginals 1 / (B_rank · W) are proportional to lightly's 1 / B_rank on every
    # rank, so the result is lightly's for unequal batches too.
    _, sinkhorn = registry.select("sinkhorn", backend, (log_probs,))
    return sinkhorn(log_probs, iterations, 1.0, None, None, 0.0, bool(gather_distributed))


def msn_terms(anchors: Tensor, targets: Tensor, prototypes: Tensor, target_sharpen_temperature: float = 0.25,
              temperature: float = 0.1, sinkhorn_iterations: int = 3, gather_distributed: bool = False, *,
              backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """MSN's cross-entropy and the anchors' mean prototype distribution, before any regulariser.

    CE = −mean_i Σ_k q_bk log softmax(â_i · p̂ᵀ / τ)_k, with q = :func:`msn_targets` of the
    targets (no gradient) and anchor i = v·B + b view v of sample b (lightly's
    ``target_probs.repeat((num_views, 1))``); mean_probs = mean_i softmax(â_i · p̂ᵀ / τ).
    Gradients flow to ``anchors`` and ``prototypes`` through the anchors' side only.

    Args: anchors (V·B, D); targets (B, D); prototypes (K, D).
    Returns: (cross_entropy (), mean_probs (K,)), float32 (float64 for float64 inputs).
    """
    _check_features(("anchors", "targets", "prototypes"), (anchors, targets, prototypes))
    if anchors.shape[0] % targets.shape[0] != 0:
        raise ValueError(f"anchors must hold a whole number of views of the targets' batch (V·B rows, view-major), "
                         f"got anchors {tuple(anchors.shape)} for targets {tuple(targets.shape)}")
    target_probs = msn_targets(targets, prototypes, temperature, target_sharpen_temperature, sinkhorn_iterations,
                               gather_distributed, backend=backend)
    dtype = compute_dtype(anchors, prototypes)
    unit_anchors = F.normalize(anchors.to(dtype), dim=1)
    unit_prototypes = F.normalize(prototypes.to(dtype), dim=1)
    _, core = registry.select("msn_anchor_terms", backend, (target_probs, unit_anchors, unit_prototypes))
    return core(target_probs, unit_anchors, unit_prototypes, 1.0 / check_positive("temperature", temperature))


def mean_entropy_regularization(mean_anchor_probs: Tensor) -> Tensor:
    """MSN's regulariser: log K − H(p̄) = Σ_k p̄_k log p̄_k + log K (KL(p̄ ‖ uniform)); 0 log 0 = 0."""
    return torch.xlogy(mean_anchor_probs, mean_anchor_probs).sum() + math.log(float(len(mean_anchor_probs)))


def power_law_distribution(size: int, exponent: float, device: Optional[torch.device] = None,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """PMSN's prior: π_k ∝ k^(−exponent), k = 1 … size, summing to 1 (lightly's
    ``_power_law_distribution``, in ``dtype``)."""
    power_dist = torch.arange(1, size + 1, device=device, dtype=dtype).pow_(-exponent)
    return power_dist / power_dist.sum()


def prior_regularization(mean_anchor_probs: Tensor, target_dist: Tensor) -> Tensor:
    """PMSN's regulariser KL(π ‖ p̄) = Σ_k π_k (log π_k − log p̄_k), as lightly's
    ``F.kl_div(p̄.log(), π, reduction="sum")`` (gradients to p̄, and to π if it has any)."""
    return F.kl_div(input=mean_anchor_probs.log(), target=target_dist, reduction="sum")


def _msn_with(regularization: Callable[[Tensor], Tensor], anchors: Tensor, targets: Tensor, prototypes: Tensor,
              target_sharpen_temperature: float, temperature: float, sinkhorn_iterations: int,
              regularization_weight: float, gather_distributed: bool, backend: str) -> Tensor:
    cross_entropy, mean_anchor_probs = msn_terms(anchors, targets, prototypes, target_sharpen_temperature,
                                                 temperature, sinkhorn_iterations, gather_distributed,
                                                 backend=backend)
    if regularization_weight > 0:  # lightly skips the regulariser for any weight <= 0
        return cross_entropy + regularization_weight * regularization(mean_anchor_probs)
    return cross_entropy


def msn(anchors: Tensor, targets: Tensor, prototypes: Tensor, target_sharpen_temperature: float = 0.25,
        temperature: float = 0.1, sinkhorn_iterations: int = 3, regularization_weight: float = 1.0,
        gather_distributed: bool = False, *, backend: str = "auto") -> Tensor:
    r"""MSN's loss (lightly's ``MSNLoss``): :func:`msn_terms`' cross-entropy plus
    ``regularization_weight`` × (log K − H(p̄)) when the weight is > 0.

    Args: anchors (V·B, D), V views stacked view-major; targets (B, D); prototypes (K, D).
    Returns: 0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.msn(anchors_out, targets_out, prototypes=model.prototypes.weight)
    """
    return _msn_with(mean_entropy_regularization, anchors, targets, prototypes, target_sharpen_temperature,
                     temperature, sinkhorn_iterations, regularization_weight, gather_distributed, backend)


def power_law_regularization(mean_anchor_probs: Tensor, power_law_exponent: float = 0.25) -> Tensor:
    """PMSN's regulariser: KL(π ‖ p̄) to π = :func:`power_law_distribution` (K, power_law_exponent)."""
    prior = power_law_distribution(len(mean_anchor_probs), power_law_exponent, mean_anchor_probs.device,
                                   mean_anchor_probs.dtype)
    return prior_regularization(mean_anchor_probs, prior)


def custom_prior_regularization(mean_anchor_probs: Tensor, target_distribution: Callable[[Tensor], Tensor]) -> Tensor:
    """PMSN's regulariser with a custom prior: KL(π ‖ p̄), π = ``target_distribution(p̄)`` (called
    with the graph of p̄, so a prior made from it passes gradients, as in lightly)."""
    return prior_regularization(mean_anchor_probs, target_distribution(mean_anchor_probs).to(mean_anchor_probs.device))


def pmsn(anchors: Tensor, targets: Tensor, prototypes: Tensor, target_sharpen_temperature: float = 0.25,
         temperature: float = 0.1, sinkhorn_iterations: int = 3, regularization_weight: float = 1.0,
         power_law_exponent: float = 0.25, gather_distributed: bool = False, *, backend: str = "auto") -> Tensor:
    """PMSN's loss (lightly's ``PMSNLoss``): the regulariser is KL(π ‖ p̄) to the power law
    π_k ∝ k^(−power_law_exponent) (:func:`power_law_regularization`). Shapes and result as :func:`msn`."""
    return _msn_with(functools.partial(power_law_regularization, power_law_exponent=power_law_exponent), anchors,
                     targets, prototypes, target_sharpen_temperature, temperature, sinkhorn_iterations,
                     regularization_weight, gather_distributed, backend)


def pmsn_custom(anchors: Tensor, targets: Tensor, prototypes: Tensor, target_distribution: Callable[[Tensor], Tensor],
                target_sharpen_temperature: float = 0.25, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                regularization_weight: float = 1.0, gather_distributed: bool = False, *,
                backend: str = "auto") -> Tensor:
    """PMSN's loss with a custom prior (lightly's ``PMSNCustomLoss``): the regulariser is
    KL(π ‖ p̄), π = ``target_distribution(p̄)`` (:func:`custom_prior_regularization`). Shapes and
    result as :func:`msn`."""
    return _msn_with(functools.partial(custom_prior_regularization, target_distribution=target_distribution),
                     anchors, targets, prototypes, target_sharpen_temperature, temperature, sinkhorn_iterations,
                     regularization_weight, gather_distributed, backend)


class MSNLoss(nn.Module):
    """MSN's loss, as lightly's ``MSNLoss`` (arguments, attributes, checks; no state).

    ``forward(anchors (V·B, D), targets (B, D), prototypes (K, D), target_sharpen_temperature=0.25)``
    → 0-dim loss: :func:`msn_terms`' cross-entropy plus ``regularization_weight`` ×
    ``self.regularization_loss(mean_anchor_probs)`` when the weight is > 0 (subclasses override
    ``regularization_loss``, as in lightly).

    Example::

        >>> criterion = MSNLoss()
        >>> loss = criterion(anchors_out, targets_out, prototypes=model.prototypes.weight)
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, regularization_weight: float = 1.0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be in (0, inf) but is {temperature}.")
        if sinkhorn_iterations < 0:
            raise ValueError(f"sinkhorn_iterations must be >= 0 but is {sinkhorn_iterations}.")
        self.temperature = temperature
        self.sinkhorn_iterations = sinkhorn_iterations
        self.regularization_weight = regularization_weight
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.backend = backend

    def forward(self, anchors: Tensor, targets: Tensor, prototypes: Tensor,
                target_sharpen_temperature: float = 0.25) -> Tensor:
        return _msn_with(self.regularization_loss, anchors, targets, prototypes, target_sharpen_temperature,
                         self.temperature, self.sinkhorn_iterations, self.regularization_weight,
                         self.gather_distributed, self.backend)

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """log K − H(p̄) of the (K,) mean anchor probabilities (:func:`mean_entropy_regularization`)."""
        return mean_entropy_regularization(mean_anchor_probs)


class PMSNLoss(MSNLoss):
    """PMSN's loss with a power-law prior, as lightly's ``PMSNLoss``: MSN with the regulariser
    KL(π ‖ p̄), π_k ∝ k^(−power_law_exponent), k = 1 … K."""

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, regularization_weight: float = 1,
                 power_law_exponent: float = 0.25, gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                         regularization_weight=regularization_weight, gather_distributed=gather_distributed,
                         backend=backend)
        self.power_law_exponent = power_law_exponent

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """KL(π ‖ p̄) to the power law (:func:`power_law_regularization`)."""
        return power_law_regularization(mean_anchor_probs, self.power_law_exponent)


class PMSNCustomLoss(MSNLoss):
    """PMSN's loss with a custom prior, as lightly's ``PMSNCustomLoss``: MSN with the regulariser
    KL(π ‖ p̄), π = ``target_distribution(p̄)`` ((K,) → (K,), summing to 1)."""

    def __init__(self, target_distribution: Callable[[Tensor], Tensor], temperature: float = 0.1,
                 sinkhorn_iterations: int = 3, regularization_weight: float = 1, gather_distributed: bool = False,
                 *, backend: str = "auto"):
        super().__init__(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                         regularization_weight=regularization_weight, gather_distributed=gather_distributed,
                         backend=backend)
        self.target_distribution = target_distribution

    def regularization_loss(self, mean_anchor_probs: Tensor) -> Tensor:
        """KL(π ‖ p̄), π = ``target_distribution(p̄)`` (:func:`custom_prior_regularization`)."""
        return custom_prior_regularization(mean_anchor_probs, self.target_distribution)
