"""The plain-PyTorch spec of the distillation family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from ..runtime import distributed
from ..runtime.dtypes import compute_dtype


def soft_cross_entropy_pairs(targets: torch.Tensor, logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Cross-entropy of every (target crop t, student crop s) pair.

    loss[t, s] = -mean_b Σ_k targets[t, b, k] · log_softmax(scale · logits[s, b])_k

    Args: targets (T, B, K) probabilities; logits (S, B, K); scale = 1/student temperature.
    Returns: (T, S) float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(targets, logits)
    log_p = F.log_softmax(scale * logits.to(dtype), dim=-1)
    return -torch.einsum("tbk,sbk->ts", targets.to(dtype), log_p) / logits.shape[1]


def linear_soft_cross_entropy_pairs(targets: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                                    scale: float) -> torch.Tensor:
    """``soft_cross_entropy_pairs(targets, features @ weightᵀ, scale)``: the last linear layer
    (SwAV prototypes, DINO head) applied to the student crops.

    Args: targets (T, B, K); features (S, B, D); weight (K, D). Returns: (T, S), as above.
    """
    dtype = compute_dtype(targets, features, weight)
    return soft_cross_entropy_pairs(targets, features.to(dtype) @ weight.to(dtype).T, scale)


def teacher_targets(teacher: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """DINO's teacher distributions softmax((t − center) / τ_t) of (crops, B, K) outputs."""
    dtype = compute_dtype(teacher)
    return F.softmax((teacher.to(dtype) - center.reshape(-1).to(dtype)) / teacher_temp, dim=-1)


CENTER_MODES = ("mean",)


@torch.no_grad()
def center_mean(x: torch.Tensor, dim: Tuple[int, ...]) -> torch.Tensor:
    """The batch center of ``x``: its mean over ``dim`` (kept, size 1), averaged over ranks when a
    process group is initialised (lightly's ``center_mean``); in the compute dtype."""
    batch_center = x.to(compute_dtype(x)).mean(dim=dim, keepdim=True)
    if distributed.world_size() > 1:
        batch_center = distributed.all_reduce_no_grad(batch_center, "sum") / distributed.world_size()
    return batch_center


@torch.no_grad()
def center_update(teacher: torch.Tensor, center: torch.Tensor, momentum: float) -> torch.Tensor:
    """DINO's center EMA: center · m + (1 − m) · mean of the (crops, B, K) teacher outputs over
    crops, rows and ranks; shaped and typed as ``center``."""
    batch_center = center_mean(teacher, (0, 1))
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


def msn_anchor_terms(targets: torch.Tensor, anchors: torch.Tensor, prototypes: torch.Tensor,
                     scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """MSN's anchor terms: the cross-entropy of every anchor's prototype softmax to its target,
    and the anchors' mean prototype probabilities.

    p_i = softmax(scale · anchors_i · prototypesᵀ); anchor i = v·B + b is view v of sample b:
    cross_entropy = −mean_i Σ_k targets[b, k] log p_ik; mean_probs = mean_i p_i.

    Args: targets (B, K) probabilities; anchors (V·B, D); prototypes (K, D); scale = 1/temperature.
    Returns: (cross_entropy (), mean_probs (K,)), float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(targets, anchors, prototypes)
    log_p = F.log_softmax(scale * (anchors.to(dtype) @ prototypes.to(dtype).T), dim=1)
    views = anchors.shape[0] // targets.shape[0]
    cross_entropy = -(targets.to(dtype).repeat(views, 1) * log_p).sum(dim=1).mean()
    return cross_entropy, log_p.exp().mean(dim=0)
