"""The plain-PyTorch spec of the distillation family's core ops: obvious, differentiable, computed in
float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested against it."""
from __future__ import annotations

from typing import Optional, Tuple

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


def sinkhorn_knopp_teacher(teacher_logits: torch.Tensor, teacher_scale: float, iterations: int,
                           gather_distributed: bool = False) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` on (N, K) logits, in the log domain: Q = exp(teacher_scale ·
    logits), then ``iterations`` times every prototype's column normalised (DINOv2: to 1/K) and
    every sample's row (to 1/N); returns the rows scaled to sum 1 (DINOv2's N · Qᵀ). The constant
    factors drop out; DINOv2's exp() of raw logits / τ overflows float32 from |logits| > 88 τ.
    With ``gather_distributed`` (and a process group) a column runs over every rank's rows, as
    DINOv2 all-reduces the prototypes' sums: each rank gets its rows of the gathered batch's codes."""
    log_q = teacher_logits * teacher_scale
    for _ in range(iterations):
        column_lse = torch.logsumexp(log_q, dim=0, keepdim=True)
        if gather_distributed and distributed.world_size() > 1:  # (W, K) → the LSE over all ranks' rows
            column_lse = torch.logsumexp(distributed.gather_no_grad(column_lse), dim=0, keepdim=True)
        log_q = log_q - column_lse
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q.exp()


def linear_distillation(student: torch.Tensor, teacher: torch.Tensor, weight: torch.Tensor,
                        teacher_weight: torch.Tensor, center: Optional[torch.Tensor], student_scale: float,
                        teacher_scale: float, iterations: int, gather_distributed: bool) -> torch.Tensor:
    """Mean soft cross-entropy of teacher and student distributions over the last layer's outputs.

    loss = −(1/N) Σ_n Σ_k p_nk · log softmax(student_scale · s_n Wᵀ)_k, with teacher logits
    t = teacher · teacher_weightᵀ and p = softmax(teacher_scale · (t − center)) (``iterations`` = 0,
    differentiable) or DINOv2's Sinkhorn-Knopp targets of t (``iterations`` > 0, no gradient,
    as DINOv2 computes them under ``no_grad``; over every rank's rows with ``gather_distributed``).

    Args: student, teacher (N, D); weight, teacher_weight (K, D); center (K,) or None.
    Returns: 0-dim, float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(student, teacher, weight, teacher_weight, center)
    teacher_logits = teacher.to(dtype) @ teacher_weight.to(dtype).T
    if iterations == 0:
        shifted = teacher_logits if center is None else teacher_logits - center.to(dtype)
        targets = F.softmax(teacher_scale * shifted, dim=-1)
    else:
        with torch.no_grad():
            targets = sinkhorn_knopp_teacher(teacher_logits, teacher_scale, iterations, gather_distributed)
    log_p = F.log_softmax(student_scale * (student.to(dtype) @ weight.to(dtype).T), dim=-1)
    return -(targets * log_p).sum(dim=-1).mean()


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         labels: torch.Tensor, ignore_index: int, label_smoothing: float) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weightᵀ + bias, labels, ignore_index=..., label_smoothing=...)``,
    the mean over the rows whose label is not ``ignore_index`` (NaN when there is none).

    Args: hidden (N, D); weight (V, D); bias (V,) or None; labels (N,) int. Returns: 0-dim,
    float32 (float64 for float64 inputs).
    """
    dtype = compute_dtype(hidden, weight, bias)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, label_smoothing=label_smoothing)


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
