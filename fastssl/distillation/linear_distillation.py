"""The fused last layer + soft-target cross-entropy, public: :func:`linear_distillation_loss`
(DINO's, iBOT's and MSN's core on the features before the prototype layer)."""
from __future__ import annotations

from typing import Optional

import torch

from ..runtime import registry
from ..runtime.validation import (check_choice, check_distributed_available, check_float_tensor, check_int_at_least,
                                  check_positive, check_same_device)
from . import check_last_layer

Tensor = torch.Tensor

CENTERINGS = ("mean", "sinkhorn")


def linear_distillation_loss(student_features: Tensor, teacher_features: Tensor, weight: Tensor, *,
                             teacher_weight: Optional[Tensor] = None, student_temp: float, teacher_temp: float,
                             center: Optional[Tensor] = None, centering: str = "mean", iterations: int = 3,
                             gather_distributed: bool = False, backend: str = "auto") -> Tensor:
    r"""Mean soft cross-entropy between teacher and student distributions over K prototypes,
    with the last layer fused: the (N, K) logits are made tile by tile and never held whole.

    .. math:: L = -\frac1N \sum_n \sum_k p_{nk} \log\mathrm{softmax}(s_n W^\top / \tau_s)_k

    with teacher targets p = softmax((t Wₜᵀ − center) / τ_t) (``centering="mean"``, differentiable
    in t, Wₜ and center) or DINOv2's Sinkhorn-Knopp targets of t Wₜᵀ / τ_t after ``iterations``
    normalisations (``centering="sinkhorn"``: constants, as DINOv2 computes them under no_grad;
    the normalisations run over this process's rows, or with ``gather_distributed`` over every
    rank's).

    Args:
        student_features: (N, D) inputs of the student's last layer. teacher_features: (N, Dₜ).
        weight: (K, D) the student's last layer (prototypes). teacher_weight: (K, Dₜ) the
            teacher's (its EMA copy), or None: ``weight`` for both.
        student_temp, teacher_temp: τ_s, τ_t > 0. center: K values ((K,), (1, K), (1, 1, K)) or
            None (no centring); ``centering="mean"`` only.
        iterations: Sinkhorn-Knopp iterations (≥ 1), ``centering="sinkhorn"`` only.
        gather_distributed: with ``centering="sinkhorn"`` and a process group, each prototype's
            normalisation sums over the rows of every rank (DINOv2 all-reduces those sums), so
            each rank's targets are its rows of the targets of the gathered batch, which may hold
            a different number of rows per rank; the loss stays the mean over this rank's rows
            (DDP's gradient averaging makes it the gathered batch's loss when the counts are
            equal). No effect with ``centering="mean"``: no batch statistic enters it there.
    Returns:
        0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.linear_distillation_loss(
        ...     student_patches, teacher_patches, head.last_layer.weight,
        ...     teacher_weight=teacher_head.last_layer.weight, student_temp=0.1, teacher_temp=0.04,
        ...     centering="sinkhorn")
    """
    check_float_tensor("student_features", student_features, ndim=2)
    check_float_tensor("teacher_features", teacher_features, ndim=2)
    check_last_layer("weight", weight, student_features)
    teacher_weight_given = teacher_weight is not None
    teacher_weight = teacher_weight if teacher_weight_given else weight
    check_last_layer("teacher_weight" if teacher_weight_given else "weight (teacher_weight=None)", teacher_weight,
                     teacher_features, weight.shape[0], "prototype of weight")
    if teacher_features.shape[0] != student_features.shape[0]:
        raise ValueError(f"student_features and teacher_features must have the same number of rows, got "
                         f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}")
    check_same_device(("student_features", "teacher_features"), (student_features, teacher_features))
    student_scale = 1.0 / check_positive("student_temp", student_temp)
    teacher_scale = 1.0 / check_positive("teacher_temp", teacher_temp)
    check_choice("centering", centering, CENTERINGS)
    check_distributed_available("gather_distributed", gather_distributed)
    if centering == "sinkhorn":
        check_int_at_least("iterations", iterations, 1)
        if center is not None:
            raise ValueError("center is for centering='mean'; Sinkhorn-Knopp centring takes none")
        # the targets are constants: no gradient reaches the teacher's side
        teacher_features, teacher_weight = teacher_features.detach(), teacher_weight.detach()
    if center is not None:
        check_float_tensor("center", center)
        check_same_device(("student_features", "center"), (student_features, center))
        if center.shape[-1] != weight.shape[0] or center.numel() != weight.shape[0]:
            raise ValueError(f"center must hold one value per prototype ({weight.shape[0]}), got shape "
                             f"{tuple(center.shape)}")
        center = center.reshape(-1)
    _, core = registry.select("linear_distillation", backend,
                              (student_features, teacher_features, weight, teacher_weight, center))
    return core(student_features, teacher_features, weight, teacher_weight, center, student_scale, teacher_scale,
                iterations if centering == "sinkhorn" else 0, bool(gather_distributed))
