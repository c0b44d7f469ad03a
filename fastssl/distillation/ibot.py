"""iBOT's masked-patch self-distillation (DINOv2's patch loss) and TIPSv2's iBOT++, as lightly's
``IBOTPatchLoss`` and ``IBOTPlusPlusPatchLoss``, on the family's soft-target cross-entropy core.

Per-row weights are folded into the teacher targets (the cross-entropy is linear in them), so one
call of the core over the rows that count gives the weighted sum: no (rows, K) student
log-probabilities, no products, and with ``last_layer_weight`` no student logits either.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..runtime.dtypes import compute_dtype, zero_with_graph
from ..runtime.validation import check_finite_number, check_float_tensor, check_positive, eager
from . import (TEACHER_CENTERINGS, Center, check_center, check_center_mode, check_last_layer, pair_losses,
               teacher_probabilities)

Tensor = torch.Tensor


def _check_rows(teacher: Tensor, student: Tensor, last_layer_weight: Optional[Tensor]) -> None:
    """Student rows matching the (..., K) teacher rows: logits (..., K), or features (..., D)
    for a (K, D) ``last_layer_weight``."""
    if last_layer_weight is None:
        return
    check_last_layer("last_layer_weight", last_layer_weight, student, teacher.shape[-1])


def _check_mask(mask: Tensor) -> Tensor:
    """A boolean (B, H, W) or (B, N) token mask, as (B, H·W)."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() not in (2, 3):
        raise ValueError(f"mask must be a boolean (B, H, W) or (B, N) tensor, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} of shape {tuple(getattr(mask, 'shape', ()))}")
    return mask.flatten(1)


def weighted_patch_loss(teacher: Tensor, student: Tensor, center: Optional[Tensor], row_weights: Optional[Tensor],
                        teacher_temp: float, student_temp: float, center_mode: str,
                        last_layer_weight: Optional[Tensor], backend: str) -> Tensor:
    """Σ_n w_n · H(q_n, softmax(s_n / τ_s)) over (N, K) teacher logits and (N, K) student logits
    (or (N, D) features through ``last_layer_weight`` (K, D)); ``row_weights`` (N,) or None for
    the mean over rows. The targets are scaled by N·w_n and the core takes their mean over N.
    Returns a 0-dim loss in the compute dtype."""
    targets = teacher_probabilities(teacher, center, teacher_temp, center_mode, backend)
    if row_weights is not None:
        scale = (row_weights * teacher.shape[0])[:, None]
        targets = targets * scale if targets.requires_grad else targets.mul_(scale)
    return pair_losses(targets[None], student[None], last_layer_weight, 1.0 / student_temp, backend)[0, 0]


def _check_common(center: Optional[Tensor], teacher: Tensor, teacher_temp: float, student_temp: float,
                  center_mode: str) -> None:
    if check_center_mode(center_mode, TEACHER_CENTERINGS) == "mean":
        check_center(center, teacher)
    check_positive("teacher_temp", teacher_temp)
    check_positive("student_temp", student_temp)


def ibot_patch(teacher_out: Tensor, student_out: Tensor, center: Optional[Tensor], mask: Tensor,
               teacher_temp: float = 0.04, student_temp: float = 0.1, *, center_mode: str = "mean",
               last_layer_weight: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    r"""iBOT's patch loss (lightly's ``IBOTPatchLoss`` before its center update).

    .. math:: L = \frac{1}{B} \sum_b \frac{1}{\max(n_b, 1)} \sum_{m \in b}
              -\mathrm{softmax}((t_m - c)/\tau_t) \cdot \log\mathrm{softmax}(s_m / \tau_s)

    Args:
        teacher_out: (M, K) teacher outputs of the M masked tokens, in the row-major order of
            ``mask``'s True entries. student_out: (M, K) student outputs of the same tokens, or
            their (M, D) features before the last layer when ``last_layer_weight`` (K, D) is given
            (fused: the (M, K) student logits are never held).
        center: broadcastable to (M, K) (one value per output dim); unused with
            ``center_mode="sinkhorn_knopp"`` (DINOv2's Sinkhorn-Knopp teacher over the M masked
            tokens of every rank; no gradient to the teacher then).
        mask: boolean (B, H, W) (or (B, N)) token mask with exactly M True entries; n_b = the
            count of image b.
    Returns:
        0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.ibot_patch(teacher_patches[mask], student_patches[mask], center, mask)
    """
    check_float_tensor("teacher_out", teacher_out, ndim=2)
    check_float_tensor("student_out", student_out, ndim=2)
    _check_rows(teacher_out, student_out, last_layer_weight)
    if student_out.shape[0] != teacher_out.shape[0] or (last_layer_weight is None
                                                        and student_out.shape != teacher_out.shape):
        raise ValueError(f"teacher_out and student_out must hold the same masked tokens, got teacher_out "
                         f"{tuple(teacher_out.shape)} and student_out {tuple(student_out.shape)}")
    tokens = _check_mask(mask)
    _check_common(center, teacher_out, teacher_temp, student_temp, center_mode)
    counts = tokens.sum(dim=1)  # n_b
    num_masked = teacher_out.shape[0]
    if eager() and int(counts.sum()) != num_masked:
        raise ValueError(f"mask must have one True entry per row of teacher_out ({num_masked}), got "
                         f"{int(counts.sum())} in a mask of shape {tuple(mask.shape)}")
    # the image of each masked token, without boolean indexing (a fixed output size: compiles)
    image = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=num_masked)
    dtype = compute_dtype(teacher_out, student_out, last_layer_weight)
    image_weights = 1.0 / (counts.to(dtype).clamp(min=1.0) * len(counts))
    return weighted_patch_loss(teacher_out, student_out, center, image_weights[image], teacher_temp, student_temp,
                               center_mode, last_layer_weight, backend)


def ibot_plus_plus_patch(teacher_out: Tensor, student_out: Tensor, center: Optional[Tensor],
                         mask: Optional[Tensor] = None, teacher_temp: float = 0.04, student_temp: float = 0.1,
                         visible_loss_weight: float = 1.0, *, center_mode: str = "mean",
                         last_layer_weight: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    r"""TIPSv2's iBOT++ patch loss (lightly's ``IBOTPlusPlusPatchLoss`` before its center update).

    With a mask: L = mean_b(masked_b + visible_loss_weight · visible_b), each term the mean
    cross-entropy over the image's masked (visible) tokens (a count of 0 counts as 1); without:
    the mean over all tokens. With ``visible_loss_weight=0`` only the masked tokens' rows are
    gathered and computed (iBOT's loss on full patch outputs).

    Args:
        teacher_out: (B, N, K) or (B·N, K) teacher patch outputs. student_out: the same shape,
            or (…, D) features before the last layer when ``last_layer_weight`` (K, D) is given.
        center: broadcastable to (…, K); unused with ``center_mode="sinkhorn_knopp"`` (the
            Sinkhorn-Knopp teacher then runs over the rows that count: all, or with
            ``visible_loss_weight=0`` the masked ones).
        mask: boolean (B, H, W) or (B, N), True = masked; needed for (B·N, K) inputs.
    Returns:
        0-dim float32 loss (float64 for float64 inputs).
    """
    check_float_tensor("teacher_out", teacher_out)
    check_float_tensor("student_out", student_out)
    _check_rows(teacher_out, student_out, last_layer_weight)
    compared = (teacher_out.shape, student_out.shape) if last_layer_weight is None else (
        teacher_out.shape[:-1], student_out.shape[:-1])
    if compared[0] != compared[1]:
        raise ValueError(f"teacher_out and student_out must have the same shape but got "
                         f"{tuple(teacher_out.shape)} and {tuple(student_out.shape)}.")
    if teacher_out.dim() not in (2, 3):
        raise ValueError(f"teacher_out must be rank 2 or 3 but got rank {teacher_out.dim()}.")
    if teacher_out.dim() == 3:
        batch = teacher_out.shape[0]
    elif mask is None:
        raise ValueError("mask is required when teacher_out has rank 2 so that the batch size B can be inferred.")
    else:
        batch = mask.shape[0]
        if teacher_out.shape[0] % batch != 0:
            raise ValueError(f"teacher_out length {teacher_out.shape[0]} is not divisible by batch size {batch} "
                             f"inferred from mask.")
    _check_common(center, teacher_out, teacher_temp, student_temp, center_mode)
    visible_loss_weight = check_finite_number("visible_loss_weight", visible_loss_weight)
    teacher = teacher_out.reshape(-1, teacher_out.shape[-1])
    student = student_out.reshape(-1, student_out.shape[-1])
    if mask is None:
        return weighted_patch_loss(teacher, student, center, None, teacher_temp, student_temp, center_mode,
                                   last_layer_weight, backend)
    tokens = _check_mask(mask)
    if tokens.shape != (batch, teacher.shape[0] // batch):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not match {batch} images of "
                         f"{teacher.shape[0] // batch} tokens (teacher_out {tuple(teacher_out.shape)})")
    dtype = compute_dtype(teacher_out, student_out, last_layer_weight)
    masked = tokens.to(dtype)
    masked_weight = 1.0 / (masked.sum(dim=1, keepdim=True).clamp(min=1.0) * batch)
    visible_weight = visible_loss_weight / ((1.0 - masked).sum(dim=1, keepdim=True).clamp(min=1.0) * batch)
    row_weights = torch.where(tokens, masked_weight, visible_weight).reshape(-1)
    if visible_loss_weight == 0:  # only the masked rows count: gather them, compute nothing else
        rows = tokens.reshape(-1).nonzero().squeeze(1)
        if rows.numel() == 0:  # no masked token: every image's term is 0 / 1
            return zero_with_graph(teacher_out, student_out)
        teacher, student, row_weights = teacher[rows], student[rows], row_weights[rows]
    return weighted_patch_loss(teacher, student, center, row_weights, teacher_temp, student_temp, center_mode,
                               last_layer_weight, backend)


class IBOTPatchLoss(nn.Module):
    """iBOT's patch loss as used in DINOv2, as lightly's ``IBOTPatchLoss``.

    The center (``center``: a :class:`Center` of size (1, output_dim), state_dict key
    ``center.center``) is updated after each loss with the (all-reduced) mean of the teacher
    outputs. Beyond lightly: ``center_mode="sinkhorn_knopp"`` (DINOv2's Sinkhorn-Knopp teacher;
    the center is then kept but neither used nor updated, as in DINOv2) and
    ``forward(..., last_layer_weight=W)`` (student features before the last layer, fused).

    Example::

        >>> criterion = IBOTPatchLoss(output_dim=65536)
        >>> loss = criterion(teacher_out, student_out, mask)   # (M, K), (M, K), (B, H, W)
    """

    def __init__(self, output_dim: int = 65536, teacher_temp: float = 0.04, student_temp: float = 0.1,
                 center_mode: str = "mean", center_momentum: float = 0.9, *, backend: str = "auto"):
        super().__init__()
        self.center_mode = check_center_mode(center_mode, TEACHER_CENTERINGS)
        self.teacher_temp = check_positive("teacher_temp", teacher_temp)
        self.student_temp = check_positive("student_temp", student_temp)
        self.center = Center(size=(1, output_dim), mode="mean", momentum=center_momentum)
        self.backend = backend

    def _teacher_temp(self, teacher_temp: Optional[float]) -> float:
        return teacher_temp if teacher_temp is not None else self.teacher_temp

    def _update_center(self, teacher: Tensor) -> None:
        if self.center_mode == "mean":
            self.center.update(teacher)

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Tensor, teacher_temp: Optional[float] = None,
                *, last_layer_weight: Optional[Tensor] = None) -> Tensor:
        loss = ibot_patch(teacher_out, student_out, self.center.value, mask, self._teacher_temp(teacher_temp),
                          self.student_temp, center_mode=self.center_mode, last_layer_weight=last_layer_weight,
                          backend=self.backend)
        self._update_center(teacher_out)
        return loss


class IBOTPlusPlusPatchLoss(IBOTPatchLoss):
    """TIPSv2's iBOT++ patch loss, as lightly's ``IBOTPlusPlusPatchLoss``: iBOT's loss on every
    patch token, the visible ones weighted by ``visible_loss_weight`` (see
    :func:`fastssl.ibot_plus_plus_patch`); the center is updated with every teacher row.

    Example::

        >>> criterion = IBOTPlusPlusPatchLoss(output_dim=8192)
        >>> loss = criterion(teacher_out, student_out, mask)   # (B, N, K), (B, N, K), (B, N)
    """

    def forward(self, teacher_out: Tensor, student_out: Tensor, mask: Optional[Tensor] = None,
                teacher_temp: Optional[float] = None, visible_loss_weight: float = 1.0, *,
                last_layer_weight: Optional[Tensor] = None) -> Tensor:
        loss = ibot_plus_plus_patch(teacher_out, student_out, self.center.value, mask,
                                    self._teacher_temp(teacher_temp), self.student_temp, visible_loss_weight,
                                    center_mode=self.center_mode, last_layer_weight=last_layer_weight,
                                    backend=self.backend)
        self._update_center(teacher_out.reshape(-1, teacher_out.shape[-1]))
        return loss
