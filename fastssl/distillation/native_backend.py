"""The ``native`` backend of the distillation family: ``fastssl::soft_cross_entropy_pairs_native``
and its ``_backward`` from ``csrc/distillation/`` (CPU, OpenMP), with the fakes and autograd of
``op.register_pair_loss_op``. Imported by the registry only once the extension is loaded."""
from __future__ import annotations

import torch

from ..runtime import native
from .op import register_pair_loss_op

native.require("cpu")

not_supported_reasons = native.cpu_only_reasons

soft_cross_entropy_pairs = register_pair_loss_op(
    torch.ops.fastssl.soft_cross_entropy_pairs_native.default,
    torch.ops.fastssl.soft_cross_entropy_pairs_native_backward.default)
