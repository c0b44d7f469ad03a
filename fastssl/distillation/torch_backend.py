"""The ``torch`` backend of the distillation family (any device).

* :func:`soft_cross_entropy_pairs_forward` / ``_backward`` — the soft-target cross-entropy of
  every (target crop, student crop) pair (SwAV, DINO) with its gradient, never holding a
  (T × S × B × K) product nor the student log-probabilities.
* :func:`linear_soft_cross_entropy_pairs_forward` / ``_backward`` — the same with the last
  linear layer (SwAV prototypes, DINO head) fused in: the (S, B, K) logits are produced and
  consumed one block of K columns at a time and never exist whole.
* :func:`msn_anchor_terms_forward` / ``_backward`` — MSN's anchor cross-entropy and mean
  prototype probabilities from the anchors and prototypes, the (V·B, K) logits made one block
  of samples at a time.

Every function takes already validated tensors and computes in float32 (float64 for float64
inputs), like ``reference``.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch

from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from .op import define_anchor_terms_op, define_pair_loss_op

Tensor = torch.Tensor


# ============================================================================================
# Soft-target cross-entropy of every (target crop, student crop) pair
# ============================================================================================
# loss[t, s] = −(1/B) Σ_b Σ_k q_tbk · log softmax(σ x_sb)_k
#            = −(1/B) Σ_b (σ Σ_k q_tbk x_sbk − Q_tb · L_sb),  Q_tb = Σ_k q_tbk,  L_sb = LSE_k(σ x_sb)
# so the forward is one contraction over (b, k) and one LSE per student row. With G = ∂ℓ/∂loss (T, S):
#   ∂ℓ/∂x_sbk = (σ/B) (p_sbk · Σ_t G_ts Q_tb − Σ_t G_ts q_tbk),   p_sb = softmax(σ x_sb)
#   ∂ℓ/∂q_tbk = −(1/B) (σ Σ_s G_ts x_sbk − Σ_s G_ts L_sb)
# Saved for the backward: the inputs and L (S, B). Blocks of samples b keep the temporaries of
# one block in cache; the contractions over (b, k) are one small matrix product per block.
def _flush_threshold(dtype: torch.dtype) -> float:
    """sqrt(smallest normal number): products of two numbers above it are normal numbers."""
    return math.sqrt(torch.finfo(dtype).tiny)


def _flush_level(targets: Tensor, dtype: torch.dtype) -> float:
    """Below which magnitude target entries are dropped: sqrt(tiny) × the smallest row peak
    (max_k |q_tbk|) on CPUs, so every dropped entry is below sqrt(tiny) × its own row's peak.

    Sharp teacher distributions (DINO at τ = 0.04) are mostly subnormal numbers, and arithmetic
    on or into subnormals is ~20× slower on CPUs; the dropped entries change a row's
    contribution by less than K · sqrt(tiny) relative (7e-15 for K = 65,536 in float32).
    GPUs handle subnormals at full speed: nothing is dropped there (and nothing is synced).
    """
    if targets.device.type != "cpu":
        return 0.0
    row_peak = torch.maximum(targets.amax(dim=-1), -targets.amin(dim=-1))
    return row_peak.min().item() * _flush_threshold(dtype)


def _flushed_targets(targets: Tensor, level: float, dtype: torch.dtype) -> Tensor:
    """targets (T, b, k) as a (T, b·k) matrix in ``dtype``, entries of magnitude ≤ ``level`` set to 0."""
    return torch.nn.functional.hardshrink(targets.to(dtype), level).reshape(targets.shape[0], -1)


def _student_lse(x: Tensor, scale: float) -> Tensor:
    """LSE over the last dim of scale · x, x (..., K) in the compute dtype (scale > 0).

    Exponents below log sqrt(tiny) are raised to it: exp() of arguments that underflow runs
    ~50× slower on CPUs, and the largest term being 1, the K raised terms add at most
    K · sqrt(tiny) relative.
    """
    peak = x.amax(dim=-1, keepdim=True)
    shifted = torch.sub(x, peak).mul_(scale).clamp_min_(math.log(_flush_threshold(x.dtype)))
    return shifted.exp_().sum(dim=-1).log_().add_(peak.squeeze(-1), alpha=scale)


def _logits_grad(x: Tensor, lse: Tensor, target_weight: Tensor, q: Tensor, grad_loss: Tensor, scale: float,
                 batch: int, out: Optional[Tensor] = None) -> Tensor:
    """∂ℓ/∂x = (σ/B) (p ⊙ Σ_t G_ts Q_tb − Σ_t G_ts q_t) for a block x (S, b, k) of logits.

    lse, target_weight: (S, b, 1); q: the block's flushed targets (T, b·k); ``out``: where to
    write it (x's shape and dtype), or None. Probabilities below sqrt(tiny) become 0 (see
    _flush_level), without taking exp() of arguments that underflow (see _student_lse).
    """
    flush = _flush_threshold(x.dtype)
    p = torch.mul(x, scale, out=out).sub_(lse).clamp_min_(math.log(flush)).exp_()
    p = torch.nn.functional.threshold_(p, flush, 0.0).mul_(target_weight)
    p.view(x.shape[0], -1).addmm_(grad_loss.T, q, beta=scale / batch, alpha=-scale / batch)
    return p


def _targets_grad(x: Tensor, lse_weight: Tensor, grad_loss: Tensor, scale: float, batch: int) -> Tensor:
    """∂ℓ/∂q = −(1/B) (σ Σ_s G_ts x_s − Σ_s G_ts L_sb) for a block x (S, b, k): (T, b, k).

    lse_weight: Σ_s G_ts L_sb for the block's samples, (T, b, 1).
    """
    block = (grad_loss @ x.reshape(x.shape[0], -1)).mul_(-scale / batch)
    return block.view(grad_loss.shape[0], x.shape[1], x.shape[2]).add_(lse_weight, alpha=1.0 / batch)


def _pair_weights(grad_loss: Tensor, targets: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor]:
    """Σ_s G_ts L_sb (T, B, 1) and Σ_t G_ts Q_tb (S, B, 1) of the backward formulas."""
    lse_weight = (grad_loss @ lse)[:, :, None]
    target_weight = (grad_loss.T @ targets.sum(dim=-1, dtype=lse.dtype))[:, :, None]
    return lse_weight, target_weight


def soft_cross_entropy_pairs_forward(targets: Tensor, logits: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), logits (S, B, K) → (loss (T, S), student LSE (S, B)), compute dtype."""
    dtype = compute_dtype(targets, logits)
    num_targets, batch, num_classes = targets.shape
    num_students = logits.shape[0]
    lse = torch.empty(num_students, batch, dtype=dtype, device=logits.device)
    dots = torch.zeros(num_targets, num_students, dtype=dtype, device=logits.device)
    level = _flush_level(targets, dtype)
    for rows in blocks(batch, num_students * num_classes):
        x = logits[:, rows].to(dtype)
        lse[:, rows] = _student_lse(x, scale)
        dots.addmm_(_flushed_targets(targets[:, rows], level, dtype), x.reshape(num_students, -1).T)
    loss = (targets.sum(dim=-1, dtype=dtype) @ lse.T - scale * dots) / batch
    return loss, lse


def soft_cross_entropy_pairs_backward(
    grad_loss: Tensor, targets: Tensor, logits: Tensor, lse: Tensor, scale: float, needs_grad: Sequence[bool]
) -> List[Tensor]:
    """Gradients [∂/∂targets, ∂/∂logits] in the inputs' dtypes (an empty tensor where not needed)."""
    dtype = lse.dtype
    batch, num_classes = targets.shape[1:]
    num_students = logits.shape[0]
    grad_loss = grad_loss.to(dtype)
    grad_targets = torch.empty_like(targets) if needs_grad[0] else targets.new_empty(0)
    grad_logits = torch.empty_like(logits) if needs_grad[1] else logits.new_empty(0)
    lse_weight, target_weight = _pair_weights(grad_loss, targets, lse)
    level = _flush_level(targets, dtype)
    for rows in blocks(batch, num_students * num_classes):
        x = logits[:, rows].to(dtype)
        if needs_grad[0]:
            grad_targets[:, rows] = _targets_grad(x, lse_weight[:, rows], grad_loss, scale, batch)
        if needs_grad[1]:
            in_place = grad_logits.dtype == dtype  # write straight into the gradient
            block = _logits_grad(x, lse[:, rows, None], target_weight[:, rows],
                                 _flushed_targets(targets[:, rows], level, dtype), grad_loss, scale,
                                 batch, out=grad_logits[:, rows] if in_place else None)
            if not in_place:
                grad_logits[:, rows] = block
    return [grad_targets, grad_logits]


# ============================================================================================
# The same with the last linear layer fused: logits = features @ weightᵀ
# ============================================================================================
# features (S, B, D), weight (K, D). Blocks of k prototypes / output dims: each block's logits
# z = features @ weight[k]ᵀ (S·B, k) are made, used and dropped; the forward keeps a running
# LSE per student row, the backward makes each block's ∂ℓ/∂z (as above) and turns it into
#   ∂ℓ/∂features += ∂ℓ/∂z @ weight[k],   ∂ℓ/∂weight[k] = ∂ℓ/∂zᵀ @ features.
# Saved for the backward: the inputs and L (S, B); the logits are made again.
def linear_soft_cross_entropy_pairs_forward(
    targets: Tensor, features: Tensor, weight: Tensor, scale: float
) -> Tuple[Tensor, Tensor]:
    """targets (T, B, K), features (S, B, D), weight (K, D) → (loss (T, S), LSE (S, B))."""
    dtype = compute_dtype(targets, features, weight)
    num_targets, batch, num_classes = targets.shape
    num_students = features.shape[0]
    rows = features.to(dtype).reshape(num_students * batch, -1)
    level = _flush_level(targets, dtype)
    running_max = torch.full((rows.shape[0],), -math.inf, dtype=dtype, device=rows.device)
    running_sum = torch.zeros_like(running_max)
    dots = torch.zeros(num_targets, num_students, dtype=dtype, device=rows.device)
    for cols in blocks(num_classes, rows.shape[0]):
        z = rows @ weight[cols].to(dtype).T
        block_lse = _student_lse(z, scale)
        new_max = torch.maximum(running_max, block_lse)
        running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(block_lse - new_max)
        running_max = new_max
        q = _flushed_targets(targets[:, :, cols], level, dtype)
        dots.addmm_(q, z.view(num_students, -1).T)
    lse = (running_max + torch.log(running_sum)).view(num_students, batch)
    loss = (targets.sum(dim=-1, dtype=dtype) @ lse.T - scale * dots) / batch
    return loss, lse


def linear_soft_cross_entropy_pairs_backward(
    grad_loss: Tensor, targets: Tensor, features: Tensor, weight: Tensor, lse: Tensor, scale: float,
    needs_grad: Sequence[bool],
) -> List[Tensor]:
    """Gradients [∂/∂targets, ∂/∂features, ∂/∂weight] in the inputs' dtypes (empty where not needed)."""
    dtype = lse.dtype
    batch, num_classes = targets.shape[1:]
    num_students = features.shape[0]
    grad_loss = grad_loss.to(dtype)
    rows = features.to(dtype).reshape(num_students * batch, -1)
    lse_weight, target_weight = _pair_weights(grad_loss, targets, lse)
    level = _flush_level(targets, dtype)
    grad_targets = torch.empty_like(targets) if needs_grad[0] else targets.new_empty(0)
    grad_rows = torch.zeros_like(rows) if needs_grad[1] else None
    grad_weight = torch.empty_like(weight) if needs_grad[2] else weight.new_empty(0)
    for cols in blocks(num_classes, rows.shape[0]):
        block_weight = weight[cols].to(dtype)
        z = (rows @ block_weight.T).view(num_students, batch, -1)
        if needs_grad[0]:
            grad_targets[:, :, cols] = _targets_grad(z, lse_weight, grad_loss, scale, batch)
        if needs_grad[1] or needs_grad[2]:
            q = _flushed_targets(targets[:, :, cols], level, dtype)
            grad_z = _logits_grad(z, lse[:, :, None], target_weight, q, grad_loss, scale, batch, out=z)
            grad_z = grad_z.view(num_students * batch, -1)
            if needs_grad[1]:
                grad_rows.addmm_(grad_z, block_weight)
            if needs_grad[2]:
                grad_weight[cols] = grad_z.T @ rows
    grad_features = grad_rows.view_as(features).to(features.dtype) if needs_grad[1] else features.new_empty(0)
    return [grad_targets, grad_features, grad_weight]


soft_cross_entropy_pairs = define_pair_loss_op(
    "soft_cross_entropy_pairs", "Tensor targets, Tensor logits", soft_cross_entropy_pairs_forward,
    soft_cross_entropy_pairs_backward)
linear_soft_cross_entropy_pairs = define_pair_loss_op(
    "linear_soft_cross_entropy_pairs", "Tensor targets, Tensor features, Tensor weight",
    linear_soft_cross_entropy_pairs_forward, linear_soft_cross_entropy_pairs_backward)


# ============================================================================================
# MSN's anchor terms: cross-entropy to the targets and mean probabilities, prototypes fused
# ============================================================================================
# Anchor i = (v, b), view v of sample b (M = V·B rows); x_i = anchors_i · prototypesᵀ (K,),
# p_i = softmax(σ x_i), L_i = LSE(σ x_i), T_b = Σ_k t_bk:
#   CE = (1/M) Σ_i (T_b L_i − σ Σ_k t_bk x_ik),   p̄ = (1/M) Σ_i p_i.
# With g = ∂ℓ/∂CE and G = ∂ℓ/∂p̄ (K,) (the regulariser's gradient):
#   ∂ℓ/∂x_ik = (σ/M) (p_ik (g T_b + G_k − p_i·G) − g t_bk),   ∂ℓ/∂t_bk = (g/M) Σ_v (L_vb − σ x_vbk)
#   ∂ℓ/∂anchors_i = Σ_k ∂ℓ/∂x_ik prototypes_k,   ∂ℓ/∂prototypes_k = Σ_i ∂ℓ/∂x_ik anchors_i.
# Blocks of samples b (all V views of each): a block's logits are made, used and dropped; saved
# for the backward: the inputs and L (M,); the backward makes the logits again.
def msn_anchor_terms_forward(targets: Tensor, anchors: Tensor, prototypes: Tensor,
                             scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    """targets (B, K), anchors (V·B, D), prototypes (K, D) → (cross-entropy (), mean
    probabilities (K,), LSE (V·B,)), in the compute dtype."""
    dtype = compute_dtype(targets, anchors, prototypes)
    batch, num_prototypes = targets.shape
    views = anchors.shape[0] // batch
    samples = anchors.view(views, batch, -1)
    weight = prototypes.to(dtype)
    level = _flush_level(targets, dtype)
    lse = torch.empty(views, batch, dtype=dtype, device=anchors.device)
    probability_sum = torch.zeros(num_prototypes, dtype=dtype, device=anchors.device)
    dots = torch.zeros((), dtype=dtype, device=anchors.device)  # Σ_i Σ_k t_bk x_ik
    for rows in blocks(batch, views * num_prototypes):
        x = samples[:, rows].to(dtype) @ weight.T  # (V, b, K)
        lse[:, rows] = _student_lse(x, scale)
        dots += _flushed_targets(targets[None, rows], level, dtype).view(-1) @ x.sum(dim=0).view(-1)
        probability_sum += x.mul_(scale).sub_(lse[:, rows, None]).exp_().sum(dim=(0, 1))
    count = anchors.shape[0]
    cross_entropy = (targets.sum(dim=-1, dtype=dtype) @ lse.sum(dim=0) - scale * dots) / count
    return cross_entropy, probability_sum / count, lse.view(-1)


def msn_anchor_terms_backward(
    grad_cross_entropy: Tensor, grad_mean_probs: Tensor, targets: Tensor, anchors: Tensor, prototypes: Tensor,
    lse: Tensor, scale: float, needs_grad: Sequence[bool],
) -> List[Tensor]:
    """Gradients [∂/∂targets, ∂/∂anchors, ∂/∂prototypes] in the inputs' dtypes (empty where not needed)."""
    dtype = lse.dtype
    batch, num_prototypes = targets.shape
    count = anchors.shape[0]
    views = count // batch
    samples = anchors.view(views, batch, -1)
    weight = prototypes.to(dtype)
    lse = lse.view(views, batch, 1)
    grad_cross_entropy, grad_mean_probs = grad_cross_entropy.to(dtype), grad_mean_probs.to(dtype)
    target_weight = grad_cross_entropy * targets.sum(dim=-1, dtype=dtype)[:, None]  # g T_b (B, 1)
    level = _flush_level(targets, dtype)
    grad_targets = torch.empty_like(targets) if needs_grad[0] else targets.new_empty(0)
    grad_samples = torch.empty(samples.shape, dtype=dtype, device=anchors.device) if needs_grad[1] else None
    grad_weight = torch.zeros_like(weight) if needs_grad[2] else None
    for rows in blocks(batch, views * num_prototypes):
        block = samples[:, rows].to(dtype)
        x = block @ weight.T  # (V, b, K)
        if needs_grad[0]:
            grad_targets[rows] = (lse[:, rows] - scale * x).sum(dim=0).mul_(grad_cross_entropy / count)
        if needs_grad[1] or needs_grad[2]:
            p = x.mul_(scale).sub_(lse[:, rows]).exp_()
            grad_x = p * (grad_mean_probs - (p @ grad_mean_probs)[..., None] + target_weight[rows])
            q = _flushed_targets(targets[None, rows], level, dtype).view(-1, num_prototypes)
            grad_x = grad_x.sub_(q * grad_cross_entropy).mul_(scale / count)
            if needs_grad[1]:
                grad_samples[:, rows] = grad_x @ weight
            if needs_grad[2]:
                grad_weight.addmm_(grad_x.reshape(-1, num_prototypes).T, block.reshape(-1, block.shape[-1]))
    grad_anchors = grad_samples.view_as(anchors).to(anchors.dtype) if needs_grad[1] else anchors.new_empty(0)
    grad_prototypes = grad_weight.to(prototypes.dtype) if needs_grad[2] else prototypes.new_empty(0)
    return [grad_targets, grad_anchors, grad_prototypes]


msn_anchor_terms = define_anchor_terms_op("msn_anchor_terms", msn_anchor_terms_forward, msn_anchor_terms_backward)
