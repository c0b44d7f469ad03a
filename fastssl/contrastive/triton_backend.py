"""The ``triton`` backend of the contrastive family: the op glue around ``fastssl.kernels.contrastive``.

Ops ``fastssl::info_nce_triton`` / ``_backward``; SimCLR's self-similarity runs the general kernels
with keys = queries. Same contract as ``reference.info_nce``.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..kernels import contrastive as kernels
from .op import define_info_nce_op
from .torch_backend import count_positives

Tensor = torch.Tensor


def _labels(labels: Optional[Tensor]) -> Optional[Tensor]:
    return labels.to(torch.int64).contiguous() if labels is not None else None


def _positive_extra(query: Tensor, positive_keys: Optional[Tensor], scale: float) -> Optional[Tensor]:
    """scale · q_i·p_i (N,) float32, MoCo's positive logit, computed outside the kernels."""
    if positive_keys is None:
        return None
    return scale * (query.float() * positive_keys.float()).sum(1)


def info_nce_forward(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
    """Triton forward: (row_loss, col_loss, row_stats (2, N), col_stats (2, M) or (2, 0)), float32."""
    query_labels, key_labels, self_index = _labels(query_labels), _labels(key_labels), _labels(self_index)
    row_loss, row_max, row_sum = kernels.info_nce_row_statistics(query, keys, query_labels, key_labels, self_index,
                                                 _positive_extra(query, positive_keys, scale), scale)
    if not symmetric:
        return row_loss, row_loss.new_zeros(0), torch.stack([row_max, row_sum]), row_loss.new_zeros(2, 0)
    col_loss, col_max, col_sum = kernels.info_nce_row_statistics(keys, query, key_labels, query_labels, None, None, scale)
    return row_loss, col_loss, torch.stack([row_max, row_sum]), torch.stack([col_max, col_sum])


def _coefficients(grad: Tensor, labels: Optional[Tensor], other_labels: Optional[Tensor],
                  self_index: Optional[Tensor], scale: float):
    """Per-row softmax factor c = g·scale (0 without positives) and positive weight c/|P|."""
    coef = grad.float() * scale
    if labels is None:
        return coef, torch.zeros_like(coef)
    count = count_positives(labels, other_labels, self_index).float()
    coef = torch.where(count > 0, coef, torch.zeros_like(coef))
    return coef, coef / count.clamp_min(1)


def info_nce_backward(grad_row, grad_col, query, keys, positive_keys, query_labels, key_labels, self_index,
                      row_stats, col_stats, scale, symmetric, keys_grad):
    """Triton backward: gradients of query, keys (empty without ``keys_grad``) and positive_keys,
    in their dtypes."""
    query_labels, key_labels, self_index = _labels(query_labels), _labels(key_labels), _labels(self_index)
    row_coef, row_weight = _coefficients(grad_row, query_labels, key_labels, self_index, scale)
    row_max, row_sum = row_stats
    owner_stats = torch.stack([row_max, row_sum, row_coef, row_weight])
    col_owner_stats = None
    if symmetric:
        col_coef, col_weight = _coefficients(grad_col, key_labels, query_labels, None, scale)
        col_owner_stats = torch.stack([col_stats[0], col_stats[1], col_coef, col_weight])
    grad_q, grad_k = kernels.info_nce_grads(query, keys, query_labels, key_labels, self_index, owner_stats,
                                            col_owner_stats, scale, keys_grad)
    grad_positive_keys = None
    if positive_keys is not None:
        extra = _positive_extra(query, positive_keys, scale)
        positive_coef = torch.exp(extra - row_max) / row_sum * row_coef - row_coef  # (p_pos − 1)·g·scale
        grad_q += positive_coef[:, None] * positive_keys.float()
        grad_positive_keys = (positive_coef[:, None] * query.float()).to(positive_keys.dtype)
    return grad_q.to(query.dtype), (grad_k if keys_grad else keys.new_empty(0)).to(keys.dtype), grad_positive_keys


def not_supported_reasons(tensors) -> list:
    reasons = []
    bad = sorted({str(t.dtype) for t in tensors if t.dtype.is_floating_point and t.dtype not in kernels.KERNEL_DTYPES})
    if bad:
        reasons.append(f"the triton InfoNCE kernels take float16, bfloat16 or float32, got {', '.join(bad)}")
    dtypes = {t.dtype for t in tensors if t.dtype.is_floating_point}
    if len(dtypes) > 1:
        reasons.append(f"the triton InfoNCE kernels need one dtype for all inputs, got {sorted(map(str, dtypes))}")
    return reasons


def auto_skip_reasons(tensors) -> list:
    """``auto`` passes float32 without TF32 to the torch backend: the kernels' IEEE dots run on the
    FMA units (no tensor cores), where cuBLAS's SGEMMs are faster than Triton's FMA code and the
    fused kernels do 5 N×M×D products to the torch backend's 4 (issue 17; judged from the sm_90
    compile, not yet timed on a card). ``backend="triton"`` still runs it; with
    ``torch.backends.cuda.matmul.allow_tf32`` set the kernels take TF32 tensor cores and ``auto``."""
    if any(t.dtype == torch.float32 for t in tensors) and kernels.input_precision(torch.float32) == "ieee":
        return ["float32 without TF32 (torch.backends.cuda.matmul.allow_tf32) runs the triton InfoNCE kernels on "
                "FMA units: the torch backend is faster"]
    return []


info_nce = define_info_nce_op("info_nce_triton", info_nce_forward, info_nce_backward)


def info_nce_self(embeddings: Tensor, labels: Tensor, exclude_self: bool, scale: float) -> Tensor:
    """SimCLR's self-similarity through the general kernels (keys = queries; autograd sums both grads)."""
    self_index = torch.arange(embeddings.shape[0], device=embeddings.device) if exclude_self else None
    return info_nce(embeddings, embeddings, None, labels, labels, self_index, scale, False)[0]

