"""Regularizers: the DSE regularizer (``DSERegularizer``) on dense tokens (B, N, D); KoLeo
(``KoLeoLoss``) on (N, D) rows at N = 256 and 8192 (32,768 in the full set), D = 128.

Sizes: 256 tokens at D = 128 (B = 8, N = 32) and D = 8192 (B = 2, N = 128) — the covariance
suite's N = 256 — plus a ViT-S batch (B = 8, N = 196, D = 384, lightly's docstring) in the full
set. Its work is k-means (lightly's, sequential by its random draws) and small Grams: no GEMM floor.
"""
from __future__ import annotations

from typing import List

import fastssl

from . import core, peers

DSE_SIZES = ((8, 32, 128), (2, 128, 8192))  # (B, N, D)
DSE_MORE = ((8, 196, 384),)


def _tokens(batch: int, tokens: int, dim: int):
    def make(device, dtype):
        x = core.randn((batch, tokens, dim), device, dtype)
        return (x,), [x]

    return make


def _dse_case(batch: int, tokens: int, dim: int) -> core.Case:
    return core.Case(
        family="regularizers", loss="dse", name=f"dse-b{batch}-n{tokens}-d{dim}",
        sizes={"batch": batch, "tokens": tokens, "dim": dim}, make_inputs=_tokens(batch, tokens, dim),
        make_loss=lambda backend: fastssl.DSERegularizer(backend=backend),
        peers={"lightly": peers.lightly("DSERegularizer", "lightly.loss.regularizer")},
        series=((f"DSE, {batch * tokens} tokens", "dim"),),
    )


KOLEO_SIZES = ((256, 128), (8192, 128))  # (N, D): the contrastive suite's small and large batches
KOLEO_MORE = ((32768, 128),)  # lightly's N × N cosines: 4 GiB


def _koleo_case(batch: int, dim: int) -> core.Case:
    """GEMM floor: the N × N similarities of the neighbour search (2N²D), no GEMM backward."""
    def make(device, dtype):
        x = core.randn((batch, dim), device, dtype)
        return (x,), [x]

    return core.Case(
        family="regularizers", loss="koleo", name=f"koleo-n{batch}-d{dim}", sizes={"batch": batch, "dim": dim},
        make_inputs=make, make_loss=lambda backend: fastssl.KoLeoLoss(backend=backend),
        peers={"lightly": peers.lightly("KoLeoLoss")},
        gemm_flops={"fwd": 2 * batch * batch * dim, "bwd": 0},
        series=((f"KoLeo, D={dim}", "batch"),),
    )


def at_size(rows: int, dim: int) -> List[core.Case]:
    """The size sweep's cases (``bench.sweep``): KoLeo on ``rows`` rows, DSE on ``rows`` tokens
    of 8 images (a ViT batch's layout)."""
    return [_koleo_case(rows, dim)] + ([_dse_case(8, rows // 8, dim)] if rows >= 8 else [])


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [_dse_case(2, 6, 5), _koleo_case(6, 5)]
    if size_set == "quick":
        return [_dse_case(*size) for size in DSE_SIZES] + [_koleo_case(*size) for size in KOLEO_SIZES]
    return ([_dse_case(*size) for size in DSE_SIZES + DSE_MORE]
            + [_koleo_case(*size) for size in KOLEO_SIZES + KOLEO_MORE])


def test_regularizers(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
