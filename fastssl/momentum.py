"""Momentum (EMA) updates of a teacher / key encoder (BYOL, MoCo, DINO) and the schedules that drive
them and the learning rate, as lightly 1.6's ``lightly.utils.scheduler``."""
from __future__ import annotations

import math
import warnings
from typing import Optional

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


def cosine_schedule(step: int, max_steps: int, start_value: float, end_value: float,
                    period: Optional[int] = None) -> float:
    """Cosine ramp from ``start_value`` (step 0) to ``end_value`` (step ``max_steps - 1`` and
    after), as lightly 1.6's ``cosine_schedule``: a Python float.

    With ``period`` the cosine instead runs full cycles of ``period`` steps (start → end → start).
    ``max_steps`` of 0 or 1 gives ``end_value``; a step past ``max_steps`` (without ``period``)
    warns (``RuntimeWarning``) and gives ``end_value``. Used for BYOL / DINO momentum (0.996 → 1)
    and DINO's weight decay.
    """
    if step < 0:
        raise ValueError(f"Current step number {step} can't be negative.")
    if max_steps < 0:
        raise ValueError(f"Total step number {max_steps} can't be negative.")
    if period is None and step > max_steps:
        warnings.warn(f"Current step number {step} exceeds max_steps {max_steps}.", category=RuntimeWarning)
    if period is not None and period <= 0:
        raise ValueError(f"Period {period} must be >= 1")
    if period is not None:
        phase = 2 * math.pi * step / period
    elif max_steps <= 1 or step >= max_steps - 1:
        return float(end_value)
    else:
        phase = math.pi * step / (max_steps - 1)
    return float(end_value - (end_value - start_value) * (math.cos(phase) + 1) / 2)


def cosine_warmup_schedule(step: int, max_steps: int, start_value: float, end_value: float, warmup_steps: int,
                           warmup_start_value: float, warmup_end_value: Optional[float] = None,
                           period: Optional[int] = None) -> float:
    """lightly 1.6's ``cosine_warmup_schedule``: a linear ramp from ``warmup_start_value`` over the
    first ``warmup_steps`` steps (reaching ``warmup_end_value``, default ``start_value``, at the
    last of them), then :func:`cosine_schedule` over the remaining steps."""
    if warmup_steps < 0:
        raise ValueError(f"Warmup steps {warmup_steps} can't be negative.")
    if warmup_steps > max_steps:
        raise ValueError(f"Warmup steps {warmup_steps} must be <= max_steps.")
    if step > max_steps:
        warnings.warn(f"Current step number {step} exceeds max_steps {max_steps}.", category=RuntimeWarning)
    if warmup_end_value is None:
        warmup_end_value = start_value
    if step < warmup_steps:
        return warmup_start_value + (warmup_end_value - warmup_start_value) * (step + 1) / warmup_steps
    remaining = max_steps - (warmup_steps if period is None else 1)
    return cosine_schedule(step - warmup_steps, remaining, start_value, end_value, period)


def linear_warmup_schedule(step: int, warmup_steps: int, start_value: float, end_value: float) -> float:
    """lightly 1.6's ``linear_warmup_schedule``: start → end over ``warmup_steps``, then ``end_value``."""
    if warmup_steps < 0:
        raise ValueError(f"Warmup steps {warmup_steps} can't be negative.")
    if step < 0:
        raise ValueError(f"Current step number {step} can't be negative.")
    if start_value < 0:
        raise ValueError(f"Start value {start_value} can't be negative.")
    if end_value <= 0:
        raise ValueError(f"End value {end_value} can't be non-positive.")
    if start_value > end_value:
        raise ValueError(f"Start value {start_value} must be less than or equal to end value {end_value}.")
    if step < warmup_steps:
        return start_value + step / warmup_steps * (end_value - start_value)
    return end_value


class CosineWarmupScheduler(torch.optim.lr_scheduler.LambdaLR):
    """lightly 1.6's ``CosineWarmupScheduler``: scales each group's learning rate by
    :func:`cosine_warmup_schedule` of the epoch (or step) count."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_epochs: int, max_epochs: int, last_epoch: int = -1,
                 start_value: float = 1.0, end_value: float = 0.001, period: Optional[int] = None,
                 warmup_start_value: float = 0.0, warmup_end_value: Optional[float] = None) -> None:
        self.warmup_epochs, self.max_epochs = warmup_epochs, max_epochs
        self.start_value, self.end_value, self.period = start_value, end_value, period
        self.warmup_start_value, self.warmup_end_value = warmup_start_value, warmup_end_value
        super().__init__(optimizer=optimizer, lr_lambda=self.scale_lr, last_epoch=last_epoch)

    def scale_lr(self, epoch: int) -> float:
        return cosine_warmup_schedule(epoch, self.max_epochs, self.start_value, self.end_value, self.warmup_epochs,
                                      self.warmup_start_value, self.warmup_end_value, self.period)
