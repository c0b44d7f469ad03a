"""Redundancy-reduction losses: Barlow Twins and VICReg on (N, D) embeddings.

Sizes (full set): D ∈ {2048, 4096, 8192} (Barlow Twins' and VICReg's projectors are 8192 wide)
at N ∈ {64, 256, 1024, 2048} rows per device; curves against N at each D and against D at each N.

GEMM floor: the cheaper of the two exact algorithms.

* Barlow Twins. Direct: C = Zaᵀ Zb (D×D) costs 2ND² forward, dZa = Zb Gᵀ and dZb = Za G 4ND²
  backward. Gram: ‖C‖²_F = tr(Ga Gb) / N² with Ga = Za Zaᵀ (N×N), so 4N²D forward (two Grams,
  the diagonal of C is O(ND)) and 4N²D backward (Gb Za, Ga Zb).
* VICReg, per view: the covariance Zcᵀ Zc (2ND²) or its Gram Zc Zcᵀ (2N²D), and the same again
  backward; two views.
"""
from __future__ import annotations

from typing import List

import fastssl

from . import core, peers

BATCHES = (64, 256, 1024, 2048)
DIMS = (2048, 4096, 8192)


def _case(loss: str, short: str, module: str, title: str, n: int, dim: int, gemm_flops: dict) -> core.Case:
    """``fastssl.<module>`` against ``lightly.loss.<module>`` (same name, same defaults)."""
    return core.Case(
        family="redundancy", loss=loss, name=f"{short}-n{n}-d{dim}",
        sizes={"batch": n, "dim": dim},
        make_inputs=core.two_views(n, dim),
        make_loss=lambda backend: getattr(fastssl, module)(backend=backend),
        peers={"lightly": peers.lightly(module)},
        gemm_flops=gemm_flops,
        series=((f"{title}, D={dim}", "batch"), (f"{title}, N={n}", "dim")),
    )


def barlow_twins(n: int, dim: int) -> core.Case:
    return _case("barlow_twins", "barlow", "BarlowTwinsLoss", "Barlow Twins", n, dim,
                 {"fwd": min(2 * n * dim * dim, 4 * n * n * dim), "bwd": min(4 * n * dim * dim, 4 * n * n * dim)})


def vicreg(n: int, dim: int) -> core.Case:
    per_view = min(2 * n * dim * dim, 2 * n * n * dim)
    return _case("vicreg", "vicreg", "VICRegLoss", "VICReg", n, dim, {"fwd": 2 * per_view, "bwd": 2 * per_view})


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [barlow_twins(6, 10), vicreg(6, 10)]
    if size_set == "quick":
        # N at D=1024, and D at N=64 (sharing the (64, 1024) point)
        return [make(n, d) for make in (barlow_twins, vicreg)
                for n, d in ((64, 1024), (256, 1024), (64, 512), (64, 2048))]
    return [make(n, d) for make in (barlow_twins, vicreg) for d in DIMS for n in BATCHES]


def test_redundancy(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
