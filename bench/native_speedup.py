"""The native extension against the torch backend, in one process (alternating runs, medians):

    python -m bench.native_speedup

builds the extension's CPU part if it is not built yet (``fastssl.runtime.native.build``, which
prints its progress and time), then times the Sinkhorn (3 iterations, ε = 0.05, cosine scores),
the soft-target cross-entropy of crop pairs (SwAV's and DINO's benchmark cases) and Barlow Twins
(forward + backward) on both backends.
"""
from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch

from fastssl.clustering import torch_backend as clustering_torch
from fastssl.runtime import native, registry

Tensor = torch.Tensor


def _alternate(runs: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median milliseconds of each run, alternating them in this process so that all see the
    same machine load."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def _row(label: str, times: Dict[str, float]) -> str:
    return f"| {label} | {times['torch']:.1f} | {times['native']:.1f} | {times['torch'] / times['native']:.2f}× |"


def _compare(batches: Sequence[int], prototypes: int, repeats: int) -> List[str]:
    """The torch and native Sinkhorn (3 iterations, ε = 0.05, cosine scores)."""
    lines = ["| B × K | torch (ms) | native (ms) | speed-up |", "|---|---|---|---|"]
    for batch in batches:
        scores = torch.nn.functional.normalize(torch.randn(batch, 128), dim=1) @ \
            torch.nn.functional.normalize(torch.randn(prototypes, 128), dim=1).T
        cores = (("torch", clustering_torch.sinkhorn_forward), ("native", registry.select("sinkhorn", "native", [scores])[1]))
        times = _alternate({name: functools.partial(run, scores, 3, 0.05, None, None, 0.0, False)
                            for name, run in cores}, repeats)
        lines.append(_row(f"{batch} × {prototypes}", times))
    return lines


def _compare_pairs(repeats: int) -> List[str]:
    """The torch and native soft-target cross-entropy of crop pairs, forward and backward (the
    student logits' gradient), on the benchmark suite's SwAV and DINO cases: SwAV's Sinkhorn
    codes of 2 crops against 2+6 crops of 256 × 3000 cosine scores (σ = 10), DINO's teacher at
    τ = 0.04 (2 crops) against 2+10 student crops of 64 × 65,536 (σ = 10)."""
    scores = torch.rand(8, 256, 3000) * 2 - 1
    swav = (torch.stack([clustering_torch.sinkhorn_forward(s, 3, 0.05, None, None, 0.0, False) for s in scores[:2]]), scores)
    dino = (torch.softmax(torch.randn(2, 64, 65536) / 0.04, dim=-1), torch.randn(12, 64, 65536))
    lines = ["| case | torch (ms) | native (ms) | speed-up |", "|---|---|---|---|"]
    for label, (targets, logits) in (("SwAV, 2 vs 8 × 256 × 3000", swav), ("DINO, 2 vs 12 × 64 × 65,536", dino)):
        logits.requires_grad_(True)
        runs = {name: functools.partial(_pair_loss_and_grad, registry.select("soft_cross_entropy_pairs", name,
                                                                             [targets, logits])[1], targets, logits)
                for name in ("torch", "native")}
        lines.append(_row(label, _alternate(runs, repeats)))
    return lines


def _pair_loss_and_grad(core: Callable, targets: Tensor, logits: Tensor) -> Tensor:
    return torch.autograd.grad(core(targets, logits, 10.0).sum(), logits)[0]


def _compare_barlow_twins(repeats: int) -> List[str]:
    """The torch and native Barlow Twins, forward and backward (both views' gradients), at the
    issue's N = 256, D = 8192 and a smaller N = 64, D = 2048."""
    lines = ["| N × D | torch (ms) | native (ms) | speed-up |", "|---|---|---|---|"]
    for n, d in ((64, 2048), (256, 8192)):
        views = [torch.randn(n, d, requires_grad=True) for _ in range(2)]
        runs = {name: functools.partial(_barlow_twins_grads, registry.select("barlow_twins", name, views)[1], *views)
                for name in ("torch", "native")}
        lines.append(_row(f"{n} × {d}", _alternate(runs, repeats)))
    return lines


def _barlow_twins_grads(core: Callable, z_a: Tensor, z_b: Tensor) -> Tuple[Tensor, ...]:
    return torch.autograd.grad(core(z_a, z_b, 5e-3, "auto"), (z_a, z_b))


def main() -> None:
    start = time.perf_counter()
    reasons = native.build(("cpu",))["cpu"]
    print(f"native extension: {'usable' if not reasons else 'unavailable: ' + '; '.join(reasons)} "
          f"(built or loaded in {time.perf_counter() - start:.1f} s; cache {native.cache_root()})")
    if not reasons:
        print(f"sinkhorn, {torch.get_num_threads()} threads, median of 15 alternating runs:")
        print("\n".join(_compare((256, 1024, 4096), 3000, repeats=15)))
        print(f"soft_cross_entropy_pairs, forward + backward, {torch.get_num_threads()} threads, median of 15 "
              "alternating runs:")
        print("\n".join(_compare_pairs(repeats=15)))
        print(f"barlow_twins, forward + backward, {torch.get_num_threads()} threads, median of 15 alternating runs:")
        print("\n".join(_compare_barlow_twins(repeats=15)))


if __name__ == "__main__":
    main()
