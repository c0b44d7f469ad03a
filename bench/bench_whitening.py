"""W-MSE (``WMSELoss``) on two stacked views (2B, D); the size sweep (``at_size``) also times the
whitening layer (``Whitening2d``) alone on (N, D).

Sizes. W-MSE needs w_size ≥ 2D (lightly refuses smaller sub-batches), so the covariance suite's
large case (N = 256, D = 8192) is not a valid W-MSE call: the small case is B = 256, D = 128 with
lightly's w_size = 256, the large one B = 4096, D = 1024 with w_size = 2048 (two sub-batches per
view).

GEMM floor, per (w, D) block: its covariance (2wD²), the Cholesky (D³/3) and the triangular
solve (wD²); backward about twice that.
"""
from __future__ import annotations

from typing import List

import fastssl

from . import core, peers

WMSE_SIZES = ((256, 128, 256), (4096, 1024, 2048))  # (B, D, w_size)


def _stacked_views(batch: int, dim: int):
    def make(device, dtype):
        stacked = core.randn((2 * batch, dim), device, dtype)
        return (stacked,), [stacked]

    return make


def _wmse_case(batch: int, dim: int, w_size: int) -> core.Case:
    blocks = 2 * batch // w_size
    forward = blocks * (3 * w_size * dim * dim + dim ** 3 / 3)
    return core.Case(
        family="whitening", loss="wmse", name=f"wmse-b{batch}-d{dim}-w{w_size}",
        sizes={"batch": batch, "dim": dim, "w_size": w_size}, make_inputs=_stacked_views(batch, dim),
        make_loss=lambda backend: fastssl.WMSELoss(embedding_dim=dim, w_size=w_size, backend=backend),
        peers={"lightly": peers.lightly("WMSELoss", embedding_dim=dim, w_size=w_size)},
        gemm_flops={"fwd": forward, "bwd": 2 * forward}, series=((f"W-MSE, w_size={w_size}", "dim"),),
    )


def _whitening2d_case(rows: int, dim: int) -> core.Case:
    """The layer's output summed into a 0-dim value to time its backward (the same for both)."""
    def summed(build):
        def make():
            layer = build()
            return lambda x: layer(x).sum()

        return make

    def make_inputs(device, dtype):
        x = core.randn((rows, dim), device, dtype)
        return (x,), [x]

    forward = 2 * rows * dim * dim + dim ** 3 / 3 + rows * dim * dim  # covariance, Cholesky, solve
    return core.Case(
        family="whitening", loss="whitening2d", name=f"whitening2d-n{rows}-d{dim}", sizes={"batch": rows, "dim": dim},
        make_inputs=make_inputs,
        make_loss=lambda backend: summed(lambda: fastssl.Whitening2d(dim, backend=backend))(),
        peers={"lightly": summed(peers.lightly("Whitening2d", "lightly.loss.wmse_loss", num_features=dim))},
        gemm_flops={"fwd": forward, "bwd": 2 * forward}, series=((f"Whitening2d, N={rows}", "dim"),),
    )


def at_size(rows: int, dim: int) -> List[core.Case]:
    """The size sweep's whitening cases (``bench.sweep``) at ``rows`` rows per view: W-MSE needs
    w_size >= 2D and w_size dividing the rows, so D is at most rows / 2 and w_size = 2D (lightly's
    default 256 at D = 128); sizes where no such w_size divides the rows have none."""
    dim = min(dim, rows // 2)
    if dim < 1 or rows % (2 * dim):
        return []
    return [_wmse_case(rows, dim, 2 * dim), _whitening2d_case(rows, dim)]


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [_wmse_case(12, 3, 6)]
    return [_wmse_case(*size) for size in WMSE_SIZES]


def test_whitening(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
