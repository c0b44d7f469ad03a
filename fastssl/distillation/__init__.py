"""The distillation family: the soft-target cross-entropy of every (target crop, student crop)
pair, optionally through a fused last layer, and DINO on it.

Public API: :func:`dino`, :func:`dino_center`, :class:`DINOLoss`, :class:`Center`; for compositions (SwAV):
:func:`pair_losses`, :func:`off_diagonal_mean`, :func:`check_last_layer`. Core ops:
``soft_cross_entropy_pairs`` and ``linear_soft_cross_entropy_pairs``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..runtime import distributed, registry
from ..runtime.dtypes import compute_dtype, zero_with_graph
from ..runtime.validation import (
    check_float_tensor,
    check_int_at_least,
    check_non_negative,
    check_positive,
    check_same_device,
    check_tensor_list,
    check_views,
)
from . import reference

Tensor = torch.Tensor


def off_diagonal_mean(pair_loss: Tensor) -> Tensor:
    """Mean of a (T, S) pair-loss matrix over the entries with t != s."""
    rows, cols = pair_loss.shape
    diagonal = torch.diagonal(pair_loss).sum()
    return (pair_loss.sum() - diagonal) / (rows * cols - min(rows, cols))


def check_last_layer(name: str, weight: Tensor, crop: Tensor, outputs: Optional[int] = None,
                     output_name: str = "output dim") -> None:
    """A (K, D) weight for (..., D) crops, on their device; with ``outputs``, K = ``outputs`` (one
    row per ``output_name``: the teacher's output dims, clusters, prototypes)."""
    check_float_tensor(name, weight, ndim=2)
    if weight.shape[1] != crop.shape[-1]:
        raise ValueError(f"{name} must be (K, {crop.shape[-1]}) for crops of shape {tuple(crop.shape)}, "
                         f"got {tuple(weight.shape)}")
    if outputs is not None and weight.shape[0] != outputs:
        raise ValueError(f"{name} must have one row per {output_name} ({outputs}), got {tuple(weight.shape)}")
    check_same_device(("crops", name), (crop, weight))


def pair_losses(targets: Tensor, students: Tensor, weight: Optional[Tensor], scale: float, backend: str) -> Tensor:
    """(T, S) soft cross-entropies of targets (T, B, K) and student logits (S, B, K), or of
    student features (S, B, D) through a fused last layer ``weight`` (K, D)."""
    if weight is None:
        if students.shape[-1] == 1:  # a softmax over one class is exactly 1: every loss is −log 1 = 0
            return zero_with_graph(targets, students).expand(targets.shape[0], students.shape[0])
        _, core = registry.select("soft_cross_entropy_pairs", backend, (targets, students))
        return core(targets, students, scale)
    _, core = registry.select("linear_soft_cross_entropy_pairs", backend, (targets, students, weight))
    return core(targets, students, weight, scale)


def _as_crops(name: str, value) -> Tensor:
    """A list of (B, D) crops or a stacked (crops, B, D) tensor → (crops, B, D)."""
    if isinstance(value, Tensor):
        check_float_tensor(name, value, ndim=3)
        return value
    crops = check_tensor_list(name, value, 1)
    check_views([f"{name}[{i}]" for i in range(len(crops))], crops)
    return torch.stack(crops)


def check_center(center: Tensor, crops: Tensor) -> None:
    """A center holding one value per output dim of the (..., K) teacher crops, on their device."""
    check_float_tensor("center", center)
    check_same_device(("teacher_out", "center"), (crops, center))
    if center.shape[-1] != crops.shape[-1] or center[..., 0].numel() != 1:
        raise ValueError(f"center must hold one value per output dim ({crops.shape[-1]}), "
                         f"got shape {tuple(center.shape)}")


# DINOv2's names (``train.centering``): lightly's EMA center, or Sinkhorn-Knopp on the teacher's batch
TEACHER_CENTERINGS = ("mean", "sinkhorn_knopp")
SINKHORN_TEACHER_ITERATIONS = 3  # DINOv2's sinkhorn_knopp_teacher(n_iterations=3)


def teacher_probabilities(teacher: Tensor, center: Optional[Tensor], teacher_temp: float, center_mode: str,
                          backend: str) -> Tensor:
    """The teacher's targets for (..., K) outputs, in the compute dtype.

    ``"mean"``: softmax((t − center) / τ_t), lightly's (differentiable). ``"sinkhorn_knopp"``:
    DINOv2's ``sinkhorn_knopp_teacher`` — 3 Sinkhorn-Knopp iterations on exp(t / τ_t) over all
    rows (every crop, every rank: the prototype and total sums are all-reduced), each row of the
    result summing to 1; run on the clustering family's log-domain ``sinkhorn`` op, so it stays
    finite where exp(t / τ_t) overflows; no gradient (DINOv2 computes it under no_grad).
    """
    if center_mode == "mean":
        return reference.teacher_targets(teacher, center, teacher_temp)
    scores = teacher.detach().reshape(-1, teacher.shape[-1]).to(compute_dtype(teacher))
    # DINOv2 divides by the number of rows of all ranks, which may differ per rank (iBOT's masked
    # patches): unit column marginals are normalised by their all-reduced total
    col_marginals = scores.new_ones(scores.shape[0]) if distributed.world_size() > 1 else None
    _, sinkhorn = registry.select("sinkhorn", backend, (scores,))
    codes = sinkhorn(scores, SINKHORN_TEACHER_ITERATIONS, teacher_temp, None, col_marginals, 0.0, True)
    return codes.view(teacher.shape)


def dino(
    teacher_out: Union[Sequence[Tensor], Tensor],
    student_out: Union[Sequence[Tensor], Tensor],
    center: Optional[Tensor],
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    *,
    center_mode: str = "mean",
    last_layer_weight: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    r"""DINO's cross-entropy between centred, sharpened teacher and student distributions.

    .. math:: L = \frac{1}{TS - \min(T,S)} \sum_{t \ne s} -\frac{1}{B} \sum_b
              \mathrm{softmax}((x^t_b - c)/\tau_t) \cdot \log\mathrm{softmax}(x^s_b / \tau_s)

    Pairs with the same index (the same global crop seen by teacher and student) are skipped,
    as in lightly's ``DINOLoss``; updating ``center`` is :func:`dino_center`'s job.

    Args:
        teacher_out: T crops (B, D) (list or a (T, B, D) tensor). student_out: S crops (B, D).
        center: broadcastable to (B, D), e.g. (1, 1, D) or (D,); unused (may be None) with
            ``center_mode="sinkhorn_knopp"``.
        center_mode: ``"mean"`` (lightly's) or ``"sinkhorn_knopp"`` (DINOv2's Sinkhorn-Knopp
            teacher, see :func:`teacher_probabilities`; no gradient to the teacher then).
        last_layer_weight: (D, E) weight of the student head's last linear layer, or None.
            When given, ``student_out`` crops are its (B, E) inputs and the student outputs
            ``student_out @ last_layer_weight.T`` are fused with the cross-entropy: the
            (S, B, D) outputs are never held (a 65,536-dim head saves S·B·D·4 bytes twice).
    Returns:
        0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.dino([t1, t2], [s1, s2, s3, s4], center, teacher_temp=0.04)
    """
    teacher = _as_crops("teacher_out", teacher_out)
    student = _as_crops("student_out", student_out)
    if last_layer_weight is not None:
        check_last_layer("last_layer_weight", last_layer_weight, student, teacher.shape[-1])
    if teacher.shape[1] != student.shape[1] or (last_layer_weight is None and teacher.shape[2] != student.shape[2]):
        raise ValueError(f"teacher_out and student_out crops must share (B, D), got teacher_out "
                         f"{tuple(teacher.shape)} and student_out {tuple(student.shape)}")
    check_same_device(("teacher_out", "student_out"), (teacher, student))
    if check_center_mode(center_mode, TEACHER_CENTERINGS) == "mean":
        check_center(center, teacher)
    teacher_temp = check_positive("teacher_temp", teacher_temp)
    student_temp = check_positive("student_temp", student_temp)
    if teacher.shape[0] * student.shape[0] - min(teacher.shape[0], student.shape[0]) == 0:
        raise ValueError("DINOLoss requires at least two views in total (the diagonal matching the same view index "
                         f"is excluded), but got {teacher.shape[0]} teacher view(s) and {student.shape[0]} student "
                         "view(s), which leaves no cross-view terms to compute the loss from.")
    targets = teacher_probabilities(teacher, center, teacher_temp, center_mode, backend)
    return off_diagonal_mean(pair_losses(targets, student, last_layer_weight, 1.0 / student_temp, backend))

@torch.no_grad()
def dino_center(teacher_out: Union[Sequence[Tensor], Tensor], center: Tensor, momentum: float = 0.9) -> Tensor:
    """DINO's center EMA: center · m + (1 − m) · mean(teacher outputs), the mean all-reduced.

    The mean runs over every teacher crop and row, averaged over ranks when a process group is
    initialised (as lightly and the official code do). Returns the new center, shaped as
    ``center``.
    """
    return reference.center_update(_as_crops("teacher_out", teacher_out), center, momentum)


class DINOLoss(nn.Module):
    """DINO's loss with teacher centring and temperature warm-up, as lightly's ``DINOLoss``.

    The teacher temperature rises linearly from ``warmup_teacher_temp`` to ``teacher_temp`` over
    the first ``warmup_teacher_temp_epochs`` epochs (``forward(..., epoch=e)``) unless
    ``teacher_temp`` is given to ``forward``. After the loss, the center (1, 1, output_dim) is
    updated with the (all-reduced) mean of the teacher outputs; see
    :func:`fastssl.dino` and :func:`fastssl.dino_center`. ``center_mode="sinkhorn_knopp"``
    (beyond lightly): DINOv2's Sinkhorn-Knopp teacher instead, the center buffer kept (same
    state_dict) but neither used nor updated, as in DINOv2.

    Example::

        >>> criterion = DINOLoss(output_dim=65536)
        >>> loss = criterion([t1, t2], [s1, s2, s3, s4], epoch=epoch)
    """

    def __init__(self, output_dim: int = 65536, warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.04,
                 warmup_teacher_temp_epochs: int = 30, student_temp: float = 0.1, center_momentum: float = 0.9,
                 center_mode: str = "mean", *, backend: str = "auto"):
        super().__init__()
        self.center_mode = check_center_mode(center_mode, TEACHER_CENTERINGS)
        check_int_at_least("output_dim", output_dim, 1)
        self.warmup_teacher_temp = check_positive("warmup_teacher_temp", warmup_teacher_temp)
        self.teacher_temp = check_positive("teacher_temp", teacher_temp)
        self.warmup_teacher_temp_epochs = check_int_at_least("warmup_teacher_temp_epochs",
                                                             warmup_teacher_temp_epochs, 0)
        self.student_temp = check_positive("student_temp", student_temp)
        self.center_momentum = check_non_negative("center_momentum", center_momentum)
        self.backend = backend
        self.register_buffer("center", torch.zeros(1, 1, output_dim))
        self.teacher_temp_schedule = torch.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)

    def teacher_temperature(self, epoch: Optional[int] = None) -> float:
        """The scheduled teacher temperature at ``epoch`` (``teacher_temp`` after the warm-up)."""
        if epoch is not None and epoch < self.warmup_teacher_temp_epochs:
            return float(self.teacher_temp_schedule[epoch])
        return self.teacher_temp

    def forward(self, teacher_out: Sequence[Tensor], student_out: Sequence[Tensor],
                teacher_temp: Optional[float] = None, epoch: Optional[int] = None) -> Tensor:
        temperature = teacher_temp if teacher_temp is not None else self.teacher_temperature(epoch)
        loss = dino(teacher_out, student_out, self.center, temperature, self.student_temp,
                    center_mode=self.center_mode, backend=self.backend)
        if self.center_mode == "mean":
            self.update_center(teacher_out)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_out: Union[Sequence[Tensor], Tensor]) -> None:
        """The center EMA from the teacher outputs: (crops, B, K) stacked or a list of (B, K) crops
        (the mean over crops and rows), or any tensor, whose mean over its first two dimensions is
        taken as lightly does (a (B, K) tensor: one value, broadcast to every output dim)."""
        if isinstance(teacher_out, Tensor) and teacher_out.dim() != 3:
            check_float_tensor("teacher_out", teacher_out, min_ndim=2)
            batch_center = reference.center_mean(teacher_out, (0, 1))
            self.center.copy_(self.center * self.center_momentum + batch_center.to(self.center.dtype)
                              * (1 - self.center_momentum))
            return
        self.center.copy_(dino_center(teacher_out, self.center, self.center_momentum))


def check_center_mode(mode: str, modes: Sequence[str] = reference.CENTER_MODES) -> str:
    if mode not in modes:
        raise ValueError(f"Unknown mode '{mode}'. Valid modes are {sorted(modes)}.")
    return mode


class Center(nn.Module):
    """lightly's ``Center``: an EMA center buffer of shape ``size``; ``update(x)`` averages ``x``
    over the dimensions where ``size`` is 1 (over ranks too), ``center ← center · m + mean · (1 − m)``.

    Example::

        >>> center = Center(size=(1, 1, 65536))
        >>> center.update(teacher_out)          # (crops, B, 65536)
        >>> logits = teacher_out - center.value
    """

    def __init__(self, size: Tuple[int, ...], mode: str = "mean", momentum: float = 0.9):
        super().__init__()
        self.mode = check_center_mode(mode)
        self.size = size
        self.dim = tuple(i for i, s in enumerate(size) if s == 1)
        self.register_buffer("center", torch.zeros(self.size))
        self.momentum = momentum

    @property
    def value(self) -> Tensor:
        return self.center

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        batch_center = reference.center_mean(x, self.dim)
        self.center = self.center * self.momentum + batch_center.to(self.center.dtype) * (1 - self.momentum)
# the losses in their own files, composed on the ops above (imported last: they use this module's helpers)
from .capi import CAPILoss, capi, capi_sinkhorn_knopp  # noqa: E402
from .msn import MSNLoss, PMSNCustomLoss, PMSNLoss, msn, msn_targets, msn_terms, pmsn, pmsn_custom  # noqa: E402
from .ibot import IBOTPatchLoss, IBOTPlusPlusPatchLoss, ibot_patch, ibot_plus_plus_patch  # noqa: E402
from .heads import DINOProjectionHead  # noqa: E402

__all__ = ["dino", "dino_center", "DINOLoss", "Center", "pair_losses", "off_diagonal_mean", "check_last_layer",
           "CAPILoss", "capi", "capi_sinkhorn_knopp",
           "MSNLoss", "PMSNLoss", "PMSNCustomLoss", "msn", "msn_targets", "msn_terms", "pmsn", "pmsn_custom",
           "IBOTPatchLoss", "IBOTPlusPlusPatchLoss", "ibot_patch", "ibot_plus_plus_patch", "DINOProjectionHead"]
