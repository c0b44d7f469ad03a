"""Momentum (EMA) updates of a teacher / key encoder: BYOL, MoCo, DINO."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def update_momentum(model: nn.Module, model_ema: nn.Module, m: float) -> None:
    """model_ema ← m · model_ema + (1 − m) · model, over parameters (as lightly's helper).

    One fused ``torch._foreach_lerp_`` over all parameters instead of a Python loop of small ops.
    The two models must have the same parameter structure.
    """
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not 0.0 <= m <= 1.0:
        raise ValueError(f"m must be a number in [0, 1], got {m!r}")
    ema_params = list(model_ema.parameters())
    params = list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(f"model and model_ema must have the same parameters, got {len(params)} "
                         f"and {len(ema_params)} tensors")
    for i, (p, e) in enumerate(zip(params, ema_params)):
        if p.shape != e.shape:
            raise ValueError(f"parameter {i} differs in shape: model {tuple(p.shape)}, model_ema {tuple(e.shape)}")
    torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1.0 - m)


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float) -> float:
    """Cosine ramp from ``start_value`` (step 0) to ``end_value`` (step ``max_steps - 1`` and
    after), as lightly 1.6's ``cosine_schedule``.

    Used for BYOL / DINO momentum (0.996 → 1) and DINO's weight decay.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if max_steps == 1 or step >= max_steps - 1:
        return end_value
    return end_value - (end_value - start_value) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2
