"""The ``triton`` backend of the distillation family, on ``fastssl.kernels.distillation``: the
soft-target cross-entropy of crop pairs (``fastssl::soft_cross_entropy_pairs_triton``) and the fused
last layer + soft cross-entropy (``fastssl::linear_distillation_triton``), each with ``_backward``."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..kernels import distillation as kernels
from ..runtime.dtypes import compute_dtype
from ..runtime import library
from . import torch_backend
from .op import define_fused_loss_op, define_pair_loss_op

Tensor = torch.Tensor


def soft_cross_entropy_pairs_forward(targets: Tensor, logits: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), logits (S, B, K) → (loss (T, S), student LSE (S, B)), compute dtype."""
    return kernels.soft_cross_entropy_pairs_forward(targets, logits, scale, compute_dtype(targets, logits))


soft_cross_entropy_pairs = define_pair_loss_op(
    "soft_cross_entropy_pairs_triton", "Tensor targets, Tensor logits", soft_cross_entropy_pairs_forward,
    kernels.soft_cross_entropy_pairs_backward)


def not_supported_reasons(tensors) -> list:
    """The fused linear kernels hold a row's features whole: D ≤ kernels.MAX_FEATURES."""
    if len(tensors) >= 4 and max(tensors[0].shape[-1], tensors[1].shape[-1]) > kernels.MAX_FEATURES:
        return [f"the triton linear distillation kernels take at most {kernels.MAX_FEATURES} features, got "
                f"{tensors[0].shape[-1]} and {tensors[1].shape[-1]}"]
    return []


def linear_distillation_forward(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor,
                                center: Optional[Tensor], student_scale: float, teacher_scale: float,
                                iterations: int, gather_distributed: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """student, teacher (N, D), weight, teacher_weight (K, D), center (K,) or None → (loss (),
    [L; M; m] (3, N), a (K,)): the column shift (σ_t·center, or Sinkhorn's log-domain passes) from
    the torch backend, the rows' statistics from the kernels (tiles of K with an online LSE; the
    backward makes each tile's logits again, a GPU's GEMMs being cheap next to its memory)."""
    dtype = compute_dtype(student, teacher, weight, teacher_weight, center)
    tiles = torch_backend._prototype_tiles(weight.shape[0], student.shape[0])
    shift = torch_backend._teacher_shift(teacher.to(dtype), teacher_weight, center, teacher_scale, iterations,
                                         gather_distributed, tiles, dtype)
    stats = kernels.linear_distillation_stats(student, teacher, weight, teacher_weight, shift, student_scale,
                                              teacher_scale, dtype)
    return (stats[0] - student_scale * stats[2]).mean(), stats, shift


def linear_distillation_backward(grad_loss: Tensor, student: Tensor, teacher: Tensor, weight: Tensor,
                                 teacher_weight: Tensor, center: Optional[Tensor], stats: Tensor, shift: Tensor,
                                 student_scale: float, teacher_scale: float, iterations: int,
                                 gather_distributed: bool, needs_grad: Sequence[bool]) -> List[Tensor]:
    """Gradients [∂student, ∂teacher, ∂weight, ∂teacher_weight, ∂center] (empty where not needed;
    zeros on the teacher's side with Sinkhorn targets)."""
    teacher_grad = iterations == 0 and any(needs_grad[i] for i in (1, 3, 4))
    grad_scale = grad_loss.to(stats.dtype) * (student_scale / student.shape[0])
    grads = kernels.linear_distillation_backward(grad_scale, student, teacher, weight, teacher_weight, shift, stats,
                                                 student_scale, teacher_scale, teacher_grad)
    grad_teacher, grad_teacher_weight, grad_shift = grads[2:] if teacher_grad else (
        torch.zeros_like(teacher), torch.zeros_like(teacher_weight), None)
    return [grads[0] if needs_grad[0] else library.empty_grad(student),
            grad_teacher if needs_grad[1] else library.empty_grad(teacher),
            grads[1] if needs_grad[2] else library.empty_grad(weight),
            grad_teacher_weight if needs_grad[3] else library.empty_grad(teacher_weight),
            (-grad_shift).to(center.dtype) if needs_grad[4] and grad_shift is not None else
            torch.zeros_like(center) if needs_grad[4] else library.empty_grad(student)]


def _saved_fakes(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor, center: Optional[Tensor],
                 *params) -> Tuple[Tensor, Tensor]:
    """The saved statistics' shapes: [L; M; m] (3, N) and the column shift a (K,)."""
    dtype = compute_dtype(student, teacher, weight, teacher_weight, center)
    return student.new_empty(3, student.shape[0], dtype=dtype), student.new_empty(weight.shape[0], dtype=dtype)


linear_distillation = define_fused_loss_op(
    "linear_distillation_triton",
    "Tensor student, Tensor teacher, Tensor weight, Tensor teacher_weight, Tensor? center",
    "float student_scale, float teacher_scale, int iterations, bool gather_distributed", 2,
    linear_distillation_forward, linear_distillation_backward, _saved_fakes)
