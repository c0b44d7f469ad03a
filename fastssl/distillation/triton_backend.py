"""The ``triton`` backend of the distillation family: the soft-target cross-entropy of crop pairs
on ``fastssl.kernels.distillation`` (ops ``fastssl::soft_cross_entropy_pairs_triton`` / ``_backward``)."""
from __future__ import annotations

from typing import Tuple

import torch

from ..kernels import distillation as kernels
from ..runtime.dtypes import compute_dtype
from .op import define_pair_loss_op

Tensor = torch.Tensor


def soft_cross_entropy_pairs_forward(targets: Tensor, logits: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), logits (S, B, K) → (loss (T, S), student LSE (S, B)), compute dtype."""
    return kernels.soft_cross_entropy_pairs_forward(targets, logits, scale, compute_dtype(targets, logits))


soft_cross_entropy_pairs = define_pair_loss_op(
    "soft_cross_entropy_pairs_triton", "Tensor targets, Tensor logits", soft_cross_entropy_pairs_forward,
    kernels.soft_cross_entropy_pairs_backward)
