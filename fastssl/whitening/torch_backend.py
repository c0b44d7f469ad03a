"""The ``torch`` backend of the whitening family: every sub-batch of a step whitened in one batched
Cholesky and one triangular solve, with a closed-form gradient; the normalised-MSE pairs in one pass.

* y = x_c L⁻ᵀ is the solution Y of Y Lᵀ = x_c: one batched ``solve_triangular`` on the (w, D)
  blocks (w·D² flops each) instead of lightly's explicit inverse (D³/3 more, and its rounding)
  applied by a 1×1 ``conv2d`` on a 4-D view, block by block, then index-scattered back.
* All I·S·V blocks of a step (iterations × sub-batches × views) go through one batched GEMM
  (their covariances), one batched ``cholesky`` and one batched solve: each block is whitened on
  its own statistics, so batching them is exact.
* The pair losses: Σ_{i<j} ŷ_i·ŷ_j = (‖Σ_v ŷ_v‖² − Σ_v ‖ŷ_v‖²)/2 per row, so the V(V − 1)/2
  pairs cost one sum over views; rows need no un-permuting (the loss is a mean over rows).

Gradient of the whitening, in closed form (the op ``fastssl::whitening``): with W = L⁻¹ and
S = (1 − ε)C + εI = LLᵀ, a change δS moves L by δL = L·Φ(W δS Wᵀ) (Φ: the lower triangle,
diagonal halved), so δY = −Y·Φ(W δS Wᵀ)ᵀ and, for an upstream gradient Ḡ,

    S̄ = −Wᵀ Q W,  Q = ½(Φ(ḠᵀY) + Φ(ḠᵀY)ᵀ),    x̄_c = (Ḡ − 2(1 − ε)/(w − 1)·Y Q) W,

and x̄ = x̄_c − mean_rows x̄_c (the block mean; with running statistics x̄ = Ḡ W). Two GEMMs
of w·D² and one triangular solve per block, from the saved Y and L only; autograd through
``cholesky`` and ``solve_triangular`` costs several D×D solves and GEMMs more (measured ~2× the
backward at w = 256, D = 128) and keeps x_c too. Once differentiable, like the other
closed-form ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..runtime import library
from ..runtime.dtypes import compute_dtype

Tensor = torch.Tensor


def _whitening_forward(blocks: Tensor, mean: Optional[Tensor], covariance: Optional[Tensor],
                       eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(Y (K, n, D), L (K, D, D) — (1, D, D) with given statistics —, the batch means (K, D) and
    covariances (K, D, D), or empty placeholders when the statistics were given)."""
    dtype = compute_dtype(blocks, mean, covariance)
    x = blocks.to(dtype)
    rows, dim = x.shape[-2:]
    batch_statistics = mean is None
    block_mean = x.mean(dim=1, keepdim=True) if batch_statistics else mean.to(dtype).view(1, 1, dim)
    centred = x - block_mean
    if covariance is None:
        block_covariance = torch.bmm(centred.mT, centred).div_(rows - 1)
    else:
        block_covariance = covariance.to(dtype).view(1, dim, dim)
    shrunk = block_covariance
    if eps != 0:  # (1 − eps)C + eps·I
        shrunk = (1 - eps) * block_covariance + eps * torch.eye(dim, dtype=dtype, device=x.device)
    factor = torch.linalg.cholesky(shrunk).contiguous()  # LAPACK's column-major results, row-major (the schema's)
    # Yᵀ = L⁻¹x_cᵀ: LAPACK's column-major Yᵀ is a row-major Y, so .contiguous() copies nothing
    whitened = torch.linalg.solve_triangular(factor, centred.mT, upper=False).mT.contiguous()
    if not batch_statistics:
        return whitened, factor, library.empty_grad(whitened), library.empty_grad(whitened)
    return whitened, factor, block_mean.view(-1, dim), block_covariance


def _whitening_fake(blocks, mean, covariance, eps):
    dtype = compute_dtype(blocks, mean, covariance)
    count, _, dim = blocks.shape
    whitened = blocks.new_empty(blocks.shape, dtype=dtype)
    if mean is not None:
        return whitened, blocks.new_empty(1, dim, dim, dtype=dtype), whitened.new_empty(0), whitened.new_empty(0)
    return (whitened, blocks.new_empty(count, dim, dim, dtype=dtype), blocks.new_empty(count, dim, dtype=dtype),
            blocks.new_empty(count, dim, dim, dtype=dtype))


_whitening_op = library.define(
    "whitening", "(Tensor blocks, Tensor? mean, Tensor? covariance, float eps) -> (Tensor, Tensor, Tensor, Tensor)",
    _whitening_forward, _whitening_fake)


def _whitening_setup_context(ctx, inputs, output):
    blocks, mean, _, eps = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[0], output[1])
    ctx.batch_statistics = mean is None
    ctx.covariance_scale = 2 * (1 - eps) / (blocks.shape[1] - 1)
    ctx.input_dtype = blocks.dtype
    ctx.mark_non_differentiable(*output[1:])


def _whitening_backward(ctx, grad, *_unused):
    if grad is None:
        return None, None, None, None
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError("fastssl::whitening is differentiable once: its gradient is computed in closed form "
                           "without a graph, so backward(create_graph=True) through it is not supported")
    whitened, factor = ctx.saved_tensors
    upstream = grad.to(whitened.dtype)
    if ctx.batch_statistics:  # Ḡ − 2(1 − ε)/(w − 1)·Y·Q, Q = ½(Φ(ḠᵀY) + Φ(ḠᵀY)ᵀ)
        lower = torch.bmm(upstream.mT, whitened).tril_()
        lower.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        upstream = torch.baddbmm(upstream, whitened, lower + lower.mT, alpha=-0.5 * ctx.covariance_scale)
    centred_grad = torch.linalg.solve_triangular(factor, upstream, upper=False, left=False)  # · L⁻¹
    if ctx.batch_statistics:
        centred_grad = centred_grad - centred_grad.mean(dim=1, keepdim=True)
    return centred_grad.to(ctx.input_dtype), None, None, None


library.register_autograd(_whitening_op, _whitening_backward, _whitening_setup_context)


def whitening(blocks: Tensor, mean: Optional[Tensor], covariance: Optional[Tensor],
              eps: float) -> Tuple[Tensor, Tensor, Tensor]:
    """``reference.whitening``'s signature and result, through ``fastssl::whitening``: one batched
    covariance GEMM, Cholesky and triangular solve for the K blocks (with given statistics, one
    factor shared by all), its closed-form gradient (none to given statistics: lightly's are
    buffers)."""
    whitened, _, means, covariances = _whitening_op(blocks, mean, covariance, float(eps))
    if mean is not None:
        count, dim = blocks.shape[0], blocks.shape[-1]
        dtype = whitened.dtype
        return whitened, mean.to(dtype).reshape(1, dim).expand(count, dim), covariance.to(dtype).expand(count, dim, dim)
    return whitened, means, covariances


whitening.op = _whitening_op


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
