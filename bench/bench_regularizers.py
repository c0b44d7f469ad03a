"""Regularizers: the DSE regularizer (``DSERegularizer``) on dense tokens (B, N, D).

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


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [_dse_case(2, 6, 5)]
    return [_dse_case(*size) for size in (DSE_SIZES if size_set == "quick" else DSE_SIZES + DSE_MORE)]


def test_regularizers(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
