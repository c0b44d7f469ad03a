"""Redundancy-reduction losses: Barlow Twins and VICReg on (N, D) embeddings.

Sizes (full set): D ∈ {2048, 4096, 8192} (Barlow Twins' and VICReg's projectors are 8192 wide)
at N ∈ {64, 256, 1024, 2048} rows per device; curves against N at each D and against D at each N.

GEMM floor: the cheaper of the two exact algorithms.

* Barlow Twins. Direct: C = Zaᵀ Zb (D×D) costs 2ND² forward, dZa = Zb Gᵀ and dZb = Za G 4ND²
  backward. Gram: ‖C‖²_F = tr(Ga Gb) / N² with Ga = Za Zaᵀ (N×N), so 4N²D forward (two Grams,
  the diagonal of C is O(ND)) and 4N²D backward (Gb Za, Ga Zb).
* VICReg, per view: the covariance Zcᵀ Zc (2ND²) or its Gram Zc Zcᵀ (2N²D), and the same again
  backward; two views.
* VICRegL (lightly's VICRegLTransform defaults: 2 global views with 7×7 feature maps, 6 local
  views with 3×3): VICReg's term per view on the (N, D) global features, per matched group on
  the (N, C) local rows (each ordered pair of a global view and another view keeps 20 + 4 matches
  by feature and as many by location: 672 groups of two operands), and the feature-distance
  GEMMs of the searches (2·N·Na·Nb·C per pair, forward only). Sizes: N = 256 at D ∈ {256, 8192},
  local C = 128 (lightly's VICRegL example head; the paper's 8192-wide local head makes the
  matched rows alone 5.6 GB at N = 256, beyond a CPU benchmark).
"""
from __future__ import annotations

from typing import List

import torch

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


VICREGL_GRIDS = (7, 7, 3, 3, 3, 3, 3, 3)  # 2 global + 6 local views (lightly's VICRegLTransform)
VICREGL_MATCHES = (20, 4)


def _vicregl_inputs(n: int, dim: int, local_dim: int, grids=VICREGL_GRIDS, n_global: int = 2):
    """VICRegL's forward arguments: per view (N, D) global features and an (N, H, W, C) map, and an
    (N, H, W, 2) grid of a random crop's cell centres in pixels."""
    def make(device, dtype):
        features, locations = [], []
        for size in grids:
            features.append((core.randn((n, dim), device, dtype), core.randn((n, size, size, local_dim), device, dtype)))
            corner = 100 * torch.rand(n, 1, 1, 2, device=device)
            steps = torch.linspace(0, 1, size, device=device)
            cells = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1)
            locations.append(corner + (50 + 150 * torch.rand(n, 1, 1, 1, device=device)) * cells)
        args = (features[:n_global], locations[:n_global], features[n_global:], locations[n_global:])
        return args, [t for pair in features for t in pair]

    return make


def _vicregl_flops(n: int, dim: int, local_dim: int, grids=VICREGL_GRIDS, n_global: int = 2) -> dict:
    per_view = min(2 * n * dim * dim, 2 * n * n * dim)
    per_group = 2 * min(2 * n * local_dim * local_dim, 2 * n * n * local_dim)  # two operands
    cells = [size * size for size in grids]
    groups = search = 0
    for a in range(n_global):
        for b in range(len(grids)):
            if b != a:
                groups += 2 * (min(VICREGL_MATCHES[0], cells[a]) + min(VICREGL_MATCHES[1], cells[b]))
                search += 2 * n * cells[a] * cells[b] * local_dim
    return {"fwd": len(grids) * per_view + groups * per_group + search,
            "bwd": len(grids) * per_view + groups * per_group}


def vicregl(n: int, dim: int, local_dim: int = 128) -> core.Case:
    return core.Case(
        family="redundancy", loss="vicregl", name=f"vicregl-n{n}-d{dim}-c{local_dim}",
        sizes={"batch": n, "dim": dim},
        make_inputs=_vicregl_inputs(n, dim, local_dim),
        make_loss=lambda backend: fastssl.VICRegLLoss(backend=backend),
        peers={"lightly": peers.lightly("VICRegLLoss")},
        gemm_flops=_vicregl_flops(n, dim, local_dim),
        series=((f"VICRegL, N={n}, C={local_dim}", "dim"),),
    )


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [barlow_twins(6, 10), vicreg(6, 10), vicregl(6, 10, 5)]
    if size_set == "quick":
        # N at D=1024, and D at N=64 (sharing the (64, 1024) point); VICRegL at its two sizes
        return [make(n, d) for make in (barlow_twins, vicreg)
                for n, d in ((64, 1024), (256, 1024), (64, 512), (64, 2048))] + [vicregl(256, 256), vicregl(256, 8192)]
    return ([make(n, d) for make in (barlow_twins, vicreg) for d in DIMS for n in BATCHES]
            + [vicregl(256, 256), vicregl(256, 8192)])


def test_redundancy(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
