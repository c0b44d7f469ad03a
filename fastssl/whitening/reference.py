"""The plain-PyTorch spec of the whitening family's core ops, as lightly 1.6's ``Whitening2d`` and
``WMSELoss`` compute them (one block at a time, the whitening matrix L⁻¹ formed explicitly),
in float32 (float64 inputs stay float64, so ``gradcheck`` works). Every backend is tested
against it."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime.dtypes import compute_dtype

Tensor = torch.Tensor


def whitening(blocks: Tensor, mean: Optional[Tensor], covariance: Optional[Tensor],
              eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """lightly's ``Whitening2d`` on each (n, D) block of ``blocks`` (K, n, D): x_c = x − m,
    C = x_cᵀx_c/(n − 1), L = chol((1 − eps)C + eps·I), y = x_c L⁻ᵀ. With ``mean`` (D,) and
    ``covariance`` (D, D) given (lightly's eval mode with running statistics) those replace m
    and C. Returns (y (K, n, D), the means (K, D) and covariances (K, D, D) used, detached)."""
    dtype = compute_dtype(blocks, mean, covariance)
    dim = blocks.shape[-1]
    identity = torch.eye(dim, dtype=dtype, device=blocks.device)
    outputs, means, covariances = [], [], []
    for block in blocks.to(dtype):
        block_mean = block.mean(dim=0) if mean is None else mean.to(dtype)
        centred = block - block_mean
        block_covariance = centred.T @ centred / (block.shape[0] - 1) if covariance is None else covariance.to(dtype)
        shrunk = (1 - eps) * block_covariance + eps * identity
        inverse_root = torch.linalg.solve_triangular(torch.linalg.cholesky(shrunk), identity, upper=False)
        outputs.append(centred @ inverse_root.T)
        means.append(block_mean.detach())
        covariances.append(block_covariance.detach())
    return torch.stack(outputs), torch.stack(means), torch.stack(covariances)


def norm_mse_loss(x0: Tensor, x1: Tensor) -> Tensor:
    """lightly's ``norm_mse_loss``: 2 − 2·mean_i cos(x0_i, x1_i) (rows normalised, eps 1e-12)."""
    return 2 - 2 * (F.normalize(x0) * F.normalize(x1)).sum(dim=-1).mean()


def wmse(blocks: Tensor, mean: Optional[Tensor], covariance: Optional[Tensor],
         eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """lightly's ``WMSELoss`` on the sub-batches ``blocks`` (I, S, V, w, D) — iteration, sub-batch,
    view, row, feature — each whitened on its own (``whitening``), then ``norm_mse_loss`` of every
    pair of views over all I·S·w rows of an iteration, averaged over iterations and pairs.
    Returns (loss, the statistics of each block in lightly's update order (I·S·V, D) and
    (I·S·V, D, D))."""
    iterations, subbatches, views, rows, dim = blocks.shape
    whitened, means, covariances = whitening(blocks.reshape(-1, rows, dim), mean, covariance, eps)
    whitened = whitened.reshape(iterations, subbatches, views, rows, dim)
    pair_losses = [norm_mse_loss(whitened[t, :, i].reshape(-1, dim), whitened[t, :, j].reshape(-1, dim))
                   for t in range(iterations) for i in range(views - 1) for j in range(i + 1, views)]
    return torch.stack(pair_losses).mean(), means, covariances
