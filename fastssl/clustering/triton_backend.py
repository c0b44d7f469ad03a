"""The ``triton`` backend of the clustering family: Sinkhorn-Knopp on the passes of
``fastssl.kernels.clustering`` (op ``fastssl::sinkhorn_triton``), driven by the torch backend's
iteration."""
from __future__ import annotations

import torch

from ..kernels.clustering import TritonSinkhornPasses
from .op import define_sinkhorn_op
from .torch_backend import sinkhorn_with

Tensor = torch.Tensor


@torch.no_grad()
def sinkhorn_forward(scores: Tensor, iterations: int, epsilon: float, row_marginals, col_marginals,
                     tolerance: float, gather_distributed: bool) -> Tensor:
    """``reference.sinkhorn`` with Triton passes; (B, K) codes in the dtype of ``scores``."""
    return sinkhorn_with(TritonSinkhornPasses, scores, iterations, epsilon, row_marginals, col_marginals,
                         tolerance, gather_distributed)


sinkhorn = define_sinkhorn_op("sinkhorn_triton", sinkhorn_forward)
