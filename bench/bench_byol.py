"""BYOL / SimSiam: negative cosine similarity of a prediction and a (stop-gradient) target.

Sizes (full set): BYOL's 256-wide projection at batch 256-4096, SimSiam's 2048-wide one at batch
256-1024. Symmetrised training calls the loss twice; one call is timed. No GEMM.
"""
from __future__ import annotations

from typing import List

import fastssl

from . import core, peers


def negative_cosine(batch: int, dim: int, method: str) -> core.Case:
    return core.Case(
        family="byol", loss="negative_cosine_similarity", name=f"{method.lower()}-b{batch}-d{dim}",
        sizes={"batch": batch, "dim": dim},
        make_inputs=core.two_views(batch, dim, second_requires_grad=False),  # the target is detached
        make_loss=lambda backend: fastssl.NegativeCosineSimilarity(backend=backend),
        peers={"lightly": peers.lightly("NegativeCosineSimilarity")},
        series=((f"{method} negative cosine, D={dim}", "batch"),),
    )


def cases(size_set: str) -> List[core.Case]:
    if size_set == "smoke":
        return [negative_cosine(b, 10, "BYOL") for b in (6, 12)]  # two sizes: a curve to draw
    if size_set == "quick":
        return [negative_cosine(b, 256, "BYOL") for b in (256, 1024)]
    return ([negative_cosine(b, 256, "BYOL") for b in (256, 1024, 4096)]
            + [negative_cosine(b, 2048, "SimSiam") for b in (256, 512, 1024)])


def test_byol(benchmark, bench_job):
    core.benchmark_job(benchmark, bench_job)
