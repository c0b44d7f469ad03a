"""The ``native`` backend of the clustering family: ``fastssl::sinkhorn_native`` from
``csrc/clustering/`` (CPU, OpenMP; CUDA where the extension's cuda part is loaded).

Imported by the registry only once the extension is loaded (``fastssl.runtime.native``); the
C++ schema names this module as the home of the op's fake.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..runtime import distributed, native
from . import torch_backend
from .reference import marginal_logs

native.require("cpu")

Tensor = torch.Tensor


def not_supported_reasons(tensors: Sequence[Tensor]) -> List[str]:
    devices = {t.device.type for t in tensors}
    with_cuda = not native.status("cuda") if "cuda" in devices else False
    allowed = {"cpu", "cuda"} if with_cuda else {"cpu"}
    if devices - allowed:
        return [f"the native extension runs on {' and '.join(sorted(allowed))} tensors here "
                f"(cuda part: {'; '.join(native.status('cuda')) or 'loaded'}), got {sorted(devices)}"]
    return []


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    iterations: int,
    epsilon: float,
    row_marginals: Optional[Tensor],
    col_marginals: Optional[Tensor],
    tolerance: float,
    gather_distributed: bool,
) -> Tensor:
    """Sinkhorn-Knopp codes of (B, K) scores; same arguments and result as ``reference.sinkhorn``.

    One ``fastssl::sinkhorn_native`` call runs every iteration. Across ranks the prototype
    sums need an all-reduce per iteration and 0 iterations need no iteration at all: those
    calls run the torch backend's passes.
    """
    world = distributed.world_size() if gather_distributed else 1
    if world > 1 or iterations == 0:
        return torch_backend.sinkhorn_forward(scores, iterations, epsilon, row_marginals, col_marginals,
                                              tolerance, gather_distributed)
    log_r, log_c = marginal_logs(scores, row_marginals, col_marginals, world)
    return torch.ops.fastssl.sinkhorn_native(scores, iterations, epsilon, log_r, log_c, tolerance)


@torch.library.register_fake("fastssl::sinkhorn_native")
def _sinkhorn_fake(scores, iterations, epsilon, log_row_marginals, log_col_marginals, tolerance):
    return scores.new_empty(scores.shape)
