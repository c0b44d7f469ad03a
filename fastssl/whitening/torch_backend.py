"""The ``torch`` backend of the whitening family: every sub-batch of a step whitened in one batched
Cholesky and one triangular solve, the normalised-MSE pairs in one pass.

* y = x_c L⁻ᵀ is the solution Y of Y Lᵀ = x_c: one batched ``solve_triangular`` on the (w, D)
  blocks (w·D² flops each) instead of lightly's explicit inverse (D³/3 more, and its rounding)
  applied by a 1×1 ``conv2d`` on a 4-D view, block by block, then index-scattered back.
* All I·S·V blocks of a step (iterations × sub-batches × views) go through one batched GEMM
  (their covariances), one batched ``cholesky`` and one batched solve: each block is whitened on
  its own statistics, so batching them is exact.
* The pair losses: Σ_{i<j} ŷ_i·ŷ_j = (‖Σ_v ŷ_v‖² − Σ_v ‖ŷ_v‖²)/2 per row, so the V(V − 1)/2
  pairs cost one sum over views; rows need no un-permuting (the loss is a mean over rows).

Gradient: torch autograd through ``cholesky`` and ``solve_triangular`` (both have exact,
LAPACK-backed backwards). A closed form (Φ(Lᵀ·ḡL) of the Cholesky backward written out) would
save nothing here: autograd already keeps only x_c, L and y — O(w·D + D²) per block, what any
closed form needs — and its backward is the same two triangular solves and GEMMs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype

Tensor = torch.Tensor


def whitening(blocks: Tensor, mean: Optional[Tensor], covariance: Optional[Tensor],
              eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``reference.whitening``'s signature and result: one batched covariance GEMM, Cholesky and
    triangular solve for the K blocks (with given statistics, one factor shared by all)."""
    dtype = compute_dtype(blocks, mean, covariance)
    x = blocks.to(dtype)
    rows, dim = x.shape[-2:]
    block_mean = x.mean(dim=1, keepdim=True) if mean is None else mean.to(dtype).view(1, 1, dim)
    centred = x - block_mean
    if covariance is None:
        block_covariance = torch.bmm(centred.mT, centred).div_(rows - 1)
    else:
        block_covariance = covariance.to(dtype).view(1, dim, dim)
    shrunk = block_covariance
    if eps != 0:  # (1 − eps)C + eps·I
        shrunk = (1 - eps) * block_covariance + eps * torch.eye(dim, dtype=dtype, device=x.device)
    factor = torch.linalg.cholesky(shrunk)
    whitened = torch.linalg.solve_triangular(factor.mT, centred, upper=True, left=False)
    count = x.shape[0]
    return (whitened, block_mean.detach().reshape(-1, dim).expand(count, dim),
            block_covariance.detach().expand(count, dim, dim))


def wmse(blocks: Tensor, mean: Optional[Tensor], covariance: Optional[Tensor],
         eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``reference.wmse``'s signature and result: all blocks whitened at once, then every pair's
    cosine from the sum over views."""
    iterations, subbatches, views, rows, dim = blocks.shape
    whitened, means, covariances = whitening(blocks.reshape(-1, rows, dim), mean, covariance, eps)
    unit = F.normalize(whitened.view(iterations * subbatches, views, rows, dim), dim=-1)
    pair_sum = (unit.sum(dim=1).square().sum() - unit.square().sum()) / 2
    pairs = views * (views - 1) // 2
    return 2 - 2 * pair_sum / (iterations * pairs * subbatches * rows), means, covariances
