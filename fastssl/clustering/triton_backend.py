"""The ``triton`` backend of the clustering family: Sinkhorn-Knopp (op ``fastssl::sinkhorn_triton``)
as one launch of ``fastssl.kernels.clustering.sinkhorn_codes`` (every phase of the iteration, on
(B, K) tiles with grid barriers), or — with a tolerance (a host-side test after each step) or
marginals reduced over ranks — on the per-pass kernels. Both run through the torch backend's
driver ``sinkhorn_with``, the one launch as its ``fused`` hook."""
from __future__ import annotations

import torch

from ..kernels.clustering import TritonSinkhornPasses, sinkhorn_codes
from .op import define_sinkhorn_op
from .torch_backend import sinkhorn_with

Tensor = torch.Tensor


@torch.no_grad()
def sinkhorn_forward(scores: Tensor, iterations: int, epsilon: float, row_marginals, col_marginals,
                     tolerance: float, gather_distributed: bool) -> Tensor:
    """``reference.sinkhorn`` with Triton kernels; (B, K) codes in the dtype of ``scores``."""
    return sinkhorn_with(TritonSinkhornPasses, scores, iterations, epsilon, row_marginals, col_marginals,
                         tolerance, gather_distributed, fused=sinkhorn_codes)


sinkhorn = define_sinkhorn_op("sinkhorn_triton", sinkhorn_forward)
