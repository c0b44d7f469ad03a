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


def max_exp_span(dtype: torch.dtype) -> float:
    """−½ log(tiny): exp() of any argument in [−span, 0] is ≥ sqrt(tiny), so it and its products
    with numbers ≥ sqrt(tiny) are normal numbers (arithmetic on subnormals is ~20× slower on CPUs)."""
    return -0.5 * math.log(torch.finfo(dtype).tiny)
