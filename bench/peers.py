"""Other libraries' losses, run at the same inputs as fastssl's (optional: never a dependency).

Each function returns a factory for :attr:`bench.core.Case.peers`: it imports the library when the
case runs (ImportError when it is missing: the row says "unavailable" and why) and returns a
callable taking the case's positional arguments.
"""
from __future__ import annotations

import functools
import importlib
import types
from typing import Callable

import torch

from .lightly_import import prepare_lightly_import


def lightly_module(name: str = "lightly.loss") -> types.ModuleType:
    """``import <name>`` of lightly (with the torchvision stub where torchvision is missing)."""
    prepare_lightly_import()
    return importlib.import_module(name)


def lightly(name: str, module: str = "lightly.loss", **kwargs) -> Callable[[], Callable]:
    """``<module>.<name>(**kwargs)`` (``lightly.loss`` unless named): lightly's modules take the same
    arguments as fastssl's."""
    return lambda: getattr(lightly_module(module), name)(**kwargs)


def lightly_sinkhorn(**kwargs) -> Callable[[], Callable]:
    """lightly's ``sinkhorn(out, iterations, epsilon)`` (the function SwaVLoss calls)."""
    return lambda: functools.partial(lightly_module("lightly.loss.swav_loss").sinkhorn, **kwargs)


def linear_domain_sinkhorn(iterations: int = 3, epsilon: float = 0.05) -> Callable[[], Callable]:
    """The linear-domain Sinkhorn-Knopp of SwAV's official code and lightly (both compute this):
    Q = exp(scores / ε)ᵀ normalised to total 1, then per iteration rows to 1/K, columns to 1/B,
    codes (B·Q)ᵀ. Typed here from the algorithm, so the comparison runs without lightly; it
    overflows for scores / ε above ~88 (fp32) or ~11 (fp16)."""
    def build() -> Callable:
        def sinkhorn(scores: torch.Tensor) -> torch.Tensor:
            q = torch.exp(scores / epsilon).t()
            q /= q.sum()
            prototypes, batch = q.shape
            for _ in range(iterations):
                q /= q.sum(dim=1, keepdim=True) * prototypes
                q /= q.sum(dim=0, keepdim=True) * batch
            return (q * batch).t()

        return sinkhorn

    return build


def metric_learning_nt_xent(temperature: float) -> Callable[[], Callable]:
    """pytorch-metric-learning's ``NTXentLoss`` on two views: the 2B rows, labelled by sample."""
    def build() -> Callable:
        loss = importlib.import_module("pytorch_metric_learning.losses").NTXentLoss(temperature=temperature)

        def nt_xent(out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
            labels = torch.arange(out0.shape[0], device=out0.device).repeat(2)
            return loss(torch.cat([out0, out1]), labels)

        return nt_xent

    return build
