"""The ``torch`` backend of the masked-prediction family: each loss in one blocked pass with its
gradient in closed form, computed in the forward (``runtime.library.define_precomputed_gradient_op``).

* MAE: the per-patch statistics (``var_mean``, one read of the target), the residual
  r = pred − (target − μ)/σ written once in pred's layout, the loss from its norms, the gradient
  2·mask·r/(P·Σmask) scaled in place. Images are read through a strided view of their patches,
  never patchified into a copy; the official code makes six elementwise passes and a copy forward,
  as many again backward.
* wav2vec 2.0: a frame's K distractors are other frames of its own utterance, so its K + 1 cosine
  logits are entries of the utterance's T×T Gram x̂ŷᵀ: one batched GEMM per block of utterances,
  the logits gathered from it by index, the gradient scattered back into a T×T block and two more
  GEMMs. The official (K + 1)·B·T·C tensor of gathered distractors (T² < K·C·T whenever T < K·C)
  is never formed. A distractor equal to its positive (quantized targets repeat) is found from
  exact row groups (``torch.unique``), not from a gathered comparison.
* HuBERT: the N×V cosine logits against the code embeddings by row blocks of GEMMs with their
  log-sum-exp and softmax gradient, where fairseq's broadcast ``cosine_similarity`` multiplies a
  (V + 1)·N·D tensor.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from ..runtime import library
from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from ..runtime.library import define_precomputed_gradient_op
from ..runtime.normalize import normalize, normalize_backward_
from .reference import NORM_PIX_EPS

Tensor = torch.Tensor
COSINE_EPS = 1e-8  # torch.cosine_similarity's: each vector over max(‖v‖, eps)


def mae_forward(pred: Tensor, target: Tensor, mask: Tensor, patch_dims: int, normalize: bool,
                with_gradient: bool) -> Tuple[Tensor, Tensor]:
    """``reference.mae`` and its gradient ∂/∂pred = 2·mask·r/(P·Σmask), r = pred − t̂."""
    dtype = compute_dtype(pred, target)
    p, t = pred.to(dtype), target.to(dtype)
    patch = tuple(range(p.dim() - patch_dims, p.dim()))
    size = math.prod(p.shape[p.dim() - patch_dims:])
    residual = torch.empty_like(p)  # pred's layout: it becomes the gradient
    if normalize:
        var, mean = torch.var_mean(t, dim=patch, keepdim=True)
        torch.sub(t, mean, out=residual)
        torch.addcmul(p, residual, (var + NORM_PIX_EPS).rsqrt(), value=-1, out=residual)
    else:
        torch.sub(p, t, out=residual)
    weights = mask.to(dtype).reshape(mask.shape + (1,) * patch_dims)
    total = weights.sum()
    per_patch = torch.linalg.vector_norm(residual, dim=patch, keepdim=True).square()
    loss = (per_patch * weights).sum() / (size * total)
    if not with_gradient:
        return loss, library.empty_grad(pred)
    return loss, residual.mul_(weights * (2.0 / size) / total)


def _mae_fake(pred, target, mask, patch_dims, normalize, with_gradient):
    dtype = compute_dtype(pred, target)
    return (pred.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (pred,), dtype))


mae = define_precomputed_gradient_op("mae", "Tensor pred, Tensor target, Tensor mask, int patch_dims, bool normalize",
                                     1, 0, mae_forward, _mae_fake)


def _equal_to_positive(y: Tensor, negatives: Tensor) -> Tensor:
    """(B, T, K) bool: distractor k of frame t is exactly equal to y_t (fairseq's ``neg_is_pos``),
    from exact row groups (+ 0.0: −0.0 == 0.0 as in ``==``; NaN rows stay apart as NaN ≠ NaN)."""
    batch, frames, channels = y.shape
    _, group = torch.unique(y.reshape(-1, channels) + 0.0, dim=0, return_inverse=True)
    group = group.view(batch, frames)
    return torch.gather(group, 1, negatives.reshape(batch, -1)).view_as(negatives) == group[:, :, None]


def wav2vec2_contrastive_forward(x: Tensor, y: Tensor, negatives: Tensor, temperature: float,
                                 with_gradient: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``reference.wav2vec2_contrastive`` from each utterance's Gram S = x̂ŷᵀ/τ (T×T): logits
    [S_tt, S_t,n(t,k)], and ∂L/∂S = (softmax − e₀)/(B·T) scattered back (repeated distractors add)."""
    dtype = compute_dtype(x, y)
    x_normalized, y_normalized = normalize(x.to(dtype), -1, COSINE_EPS), normalize(y.to(dtype), -1, COSINE_EPS)
    x_unit, y_unit = x_normalized.unit, y_normalized.unit
    batch, frames, _ = x.shape
    count = batch * frames
    excluded = _equal_to_positive(y, negatives)
    total = x_unit.new_zeros(())
    grad_x = torch.empty_like(x_unit) if with_gradient else None
    grad_y = torch.empty_like(y_unit) if with_gradient else None
    for utterances in blocks(batch, frames * (frames + negatives.shape[-1])):
        scores = torch.bmm(x_unit[utterances], y_unit[utterances].mT).div_(temperature)
        index = negatives[utterances]
        logits = torch.cat([scores.diagonal(dim1=1, dim2=2)[..., None],
                            torch.gather(scores, 2, index).masked_fill_(excluded[utterances], float("-inf"))], dim=-1)
        log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
        total = total + (log_total[..., 0] - logits[..., 0]).sum()
        if with_gradient:
            weights = logits.sub_(log_total).exp_().div_(count * temperature)
            grad_scores = torch.zeros_like(scores).scatter_add_(2, index, weights[..., 1:])
            grad_scores.diagonal(dim1=1, dim2=2).add_(weights[..., 0] - 1.0 / (count * temperature))
            grad_x[utterances] = torch.bmm(grad_scores, y_unit[utterances])
            grad_y[utterances] = torch.bmm(grad_scores.mT, x_unit[utterances])
    loss = total / count
    if not with_gradient:
        return loss, library.empty_grad(x), library.empty_grad(y)
    return loss, normalize_backward_(x_normalized, grad_x), normalize_backward_(y_normalized, grad_y)


def _wav2vec2_fake(x, y, negatives, temperature, with_gradient):
    dtype = compute_dtype(x, y)
    return (x.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (x, y), dtype))


wav2vec2_contrastive = define_precomputed_gradient_op(
    "wav2vec2_contrastive", "Tensor x, Tensor y, Tensor negatives, float temperature", 2, 0,
    wav2vec2_contrastive_forward, _wav2vec2_fake)


def hubert_forward(features: Tensor, codes: Tensor, targets: Tensor, weights: Tensor, temperature: float,
                   with_gradient: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """``reference.hubert`` by row blocks of logits x̂ĉᵀ/τ (R×V): codes exactly equal to a frame's
    target embedding (other than the target) out of its softmax; ∂L/∂logits = w(softmax − e_target)."""
    dtype = compute_dtype(features, codes)
    x_normalized = normalize(features.to(dtype), -1, COSINE_EPS)
    c_normalized = normalize(codes.to(dtype), -1, COSINE_EPS)
    x_unit, c_unit = x_normalized.unit, c_normalized.unit
    _, group = torch.unique(codes + 0.0, dim=0, return_inverse=True)  # exact duplicates of a code
    w = weights.to(dtype)
    total = x_unit.new_zeros(())
    grad_x = torch.empty_like(x_unit) if with_gradient else None
    grad_c = torch.zeros_like(c_unit) if with_gradient else None
    for rows in blocks(features.shape[0], codes.shape[0]):
        target = targets[rows].long()[:, None]
        duplicate = group[None, :] == group[target]
        duplicate.scatter_(1, target, False)
        logits = (x_unit[rows] @ c_unit.T).div_(temperature).masked_fill_(duplicate, float("-inf"))
        log_total = torch.logsumexp(logits, dim=1, keepdim=True)
        total = total + (w[rows] * (log_total[:, 0] - torch.gather(logits, 1, target)[:, 0])).sum()
        if with_gradient:
            row_weights = w[rows, None] / temperature
            grad_logits = logits.sub_(log_total).exp_().mul_(row_weights)
            grad_logits.scatter_add_(1, target, -row_weights)
            grad_x[rows] = grad_logits @ c_unit
            grad_c.addmm_(grad_logits.T, x_unit[rows])
    if not with_gradient:
        return total, library.empty_grad(features), library.empty_grad(codes)
    return total, normalize_backward_(x_normalized, grad_x), normalize_backward_(c_normalized, grad_c)


def _hubert_fake(features, codes, targets, weights, temperature, with_gradient):
    dtype = compute_dtype(features, codes)
    return (features.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (features, codes), dtype))


hubert = define_precomputed_gradient_op(
    "hubert", "Tensor features, Tensor codes, Tensor targets, Tensor weights, float temperature", 2, 0,
    hubert_forward, _hubert_fake)
