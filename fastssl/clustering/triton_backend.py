"""The ``triton`` backend of the clustering family: Sinkhorn-Knopp (op ``fastssl::sinkhorn_triton``)
as one launch of ``fastssl.kernels.clustering.sinkhorn_codes`` (every phase of the iteration, on
(B, K) tiles with grid barriers), or — with a tolerance (a host-side test after each step) or
marginals reduced over ranks — on the per-pass kernels driven by the torch backend's iteration."""
from __future__ import annotations

import torch

from ..kernels.clustering import TritonSinkhornPasses, sinkhorn_codes
from ..runtime import distributed
from .op import define_sinkhorn_op
from .reference import marginal_logs
from .torch_backend import sinkhorn_with

Tensor = torch.Tensor


@torch.no_grad()
def sinkhorn_forward(scores: Tensor, iterations: int, epsilon: float, row_marginals, col_marginals,
                     tolerance: float, gather_distributed: bool) -> Tensor:
    """``reference.sinkhorn`` with Triton kernels; (B, K) codes in the dtype of ``scores``."""
    world = distributed.world_size() if gather_distributed else 1
    if iterations > 0 and tolerance <= 0 and world == 1:
        log_r, log_c = marginal_logs(scores, row_marginals, col_marginals, 1)
        return sinkhorn_codes(scores, iterations, epsilon, log_r, log_c)
    return sinkhorn_with(TritonSinkhornPasses, scores, iterations, epsilon, row_marginals, col_marginals,
                         tolerance, gather_distributed)


sinkhorn = define_sinkhorn_op("sinkhorn_triton", sinkhorn_forward)
