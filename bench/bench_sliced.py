"""Sliced regularizers: SIGReg, LeJEPA, LeWM and VISReg on (N, D) embeddings (lightly's defaults:
1024 SIGReg slices over 17 knots, 4096 VISReg slices).

Sizes: N = 256 at D ∈ {256, 8192} (the small and the large covariance-type size); LeJEPA and VISReg
on 2 global + 2 local views, LeWM on clips of 4 frames (the batch of N clips).

GEMM floor: SIGReg's projections P = proj·A (2·rows·D·M) and, backward, ∂L/∂P·Aᵀ (as much again);
VISReg's projections of the normalised views (2·rows·D·S) and their gradient product.
"""
from __future__ import annotations

from typing import List

import fastssl

from . import core, peers

SIZES = ((256, 256), (256, 8192))
SIGREG_SLICES, VISREG_SLICES, VIEWS, FRAMES = 1024, 4096, 4, 4


def _single(n: int, dim: int):
    """(proj (N, D),) leaf."""
    def make(device, dtype):
        proj = core.randn((n, dim), device, dtype)
        return (proj,), [proj]
    return make


def _views(n: int, dim: int):
    """(local (2, N, D), global (2, N, D)) leaves."""
    def make(device, dtype):
        local, global_ = (core.randn((VIEWS // 2, n, dim), device, dtype) for _ in range(2))
        return (local, global_), [local, global_]
    return make


def _clip(n: int, dim: int):
    """(predicted (N, T − 1, D), embeddings (N, T, D)) leaves; the target is embeddings[:, 1:]."""
    def make(device, dtype):
        predicted, embeddings = core.randn((n, FRAMES - 1, dim), device, dtype), core.randn((n, FRAMES, dim), device, dtype)
        return (predicted, embeddings), [predicted, embeddings]
    return make


def _multi_view(loss):
    return lambda local, global_: loss(local_proj=local, global_proj=global_)


def _world_model(loss):
    return lambda predicted, embeddings: loss(predicted=predicted, target=embeddings[:, 1:], embeddings=embeddings)


def _case(loss: str, module: str, title: str, n: int, dim: int, rows: int, slices: int, make_inputs, wrap=None):
    wrap = wrap or (lambda f: f)
    gemm = 2 * rows * dim * slices
    return core.Case(
        family="sliced", loss=loss, name=f"{loss}-n{n}-d{dim}", sizes={"batch": n, "dim": dim},
        make_inputs=make_inputs, make_loss=lambda backend: wrap(getattr(fastssl, module)(backend=backend)),
        peers={"lightly": lambda: wrap(peers.lightly(module)())}, gemm_flops={"fwd": gemm, "bwd": gemm},
        series=((f"{title}, N={n}", "dim"),))


def cases(size_set: str) -> List[core.Case]:
    sizes = ((6, 10),) if size_set == "smoke" else SIZES
    result = []
    for n, d in sizes:
        result += [
            _case("sigreg", "SIGReg", "SIGReg", n, d, n, SIGREG_SLICES, _single(n, d)),
            _case("lejepa", "LeJEPALoss", "LeJEPA", n, d, VIEWS * n, SIGREG_SLICES, _views(n, d), _multi_view),
            _case("lewm", "LeWMLoss", "LeWM", n, d, FRAMES * n, SIGREG_SLICES, _clip(n, d), _world_model),
            _case("visreg", "VISRegLoss", "VISReg", n, d, VIEWS * n, VISREG_SLICES, _views(n, d), _multi_view),
        ]
    return result


def test_sliced(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
