"""Compute dtypes and the exponent range that keeps exp() results normal."""
from __future__ import annotations

import math
from typing import Optional

import torch


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (fp16/bf16 are upcast)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def zero_with_graph(*inputs: torch.Tensor) -> torch.Tensor:
    """An exact 0 (compute dtype) that depends on ``inputs``, so backward gives them zero gradients:
    the loss where the math is exactly 0 (a softmax over one candidate) and rounding would not be."""
    return sum(t.sum() for t in inputs).to(compute_dtype(*inputs)) * 0.0 + 0.0  # + 0.0: never −0.0


def max_exp_span(dtype: torch.dtype) -> float:
    """−½ log(tiny): exp() of any argument in [−span, 0] is ≥ sqrt(tiny), so it and its products
    with numbers ≥ sqrt(tiny) are normal numbers (arithmetic on subnormals is ~20× slower on CPUs)."""
    return -0.5 * math.log(torch.finfo(dtype).tiny)
