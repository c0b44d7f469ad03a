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

from ..clustering.reference import _distributed_logsumexp
from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from ..runtime import library
from .op import define_anchor_terms_op, define_fused_loss_op, define_pair_loss_op

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


def _softmax_from_lse_(x: Tensor, lse: Tensor) -> Tensor:
    """exp(x − lse) in place over x: a softmax from its LSE (broadcast against x). Probabilities
    below sqrt(tiny) become 0 (see _flush_level), without exp() of arguments that underflow (see
    _student_lse)."""
    flush = _flush_threshold(x.dtype)
    p = x.sub_(lse).clamp_min_(math.log(flush)).exp_()
    return torch.nn.functional.threshold_(p, flush, 0.0)


def _logits_grad(x: Tensor, lse: Tensor, target_weight: Tensor, q: Tensor, grad_loss: Tensor, scale: float,
                 batch: int, out: Optional[Tensor] = None) -> Tensor:
    """∂ℓ/∂x = (σ/B) (p ⊙ Σ_t G_ts Q_tb − Σ_t G_ts q_t) for a block x (S, b, k) of logits.

    lse, target_weight: (S, b, 1); q: the block's flushed targets (T, b·k); ``out``: where to
    write it (x's shape and dtype), or None.
    """
    p = _softmax_from_lse_(torch.mul(x, scale, out=out), lse).mul_(target_weight)
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


# ============================================================================================
# Fused last layer + soft cross-entropy of one teacher and one student distribution per row
# ============================================================================================
# With the temperatures folded into the features (s' = σ_s s, t' = σ_t t): z = s' Wᵀ (N, K)
# student logits; u = t' W_tᵀ − a (N, K) teacher logits, a (K,) the column shift: σ_t · center
# (mean centring) or the log column scaling of DINOv2's Sinkhorn-Knopp (_sinkhorn_shift).
# q = softmax(u) the teacher's probabilities, p = softmax(z), L_n = LSE_k(z_n):
#   loss = (1/N) Σ_n (L_n − Σ_k q_nk z_nk)
#   ∂ℓ/∂z = (1/N) (p − q),   ∂ℓ/∂u = (1/N) q ⊙ (m − z),  m_n = Σ_k q_nk z_nk
# and ∂ℓ/∂s = σ_s ∂ℓ/∂z W, ∂ℓ/∂W = ∂ℓ/∂zᵀ s', ∂ℓ/∂t = σ_t ∂ℓ/∂u W_t, ∂ℓ/∂W_t = ∂ℓ/∂uᵀ t',
# ∂ℓ/∂center = −σ_t Σ_n ∂ℓ/∂u_n. Blocks of rows × every prototype: a block's z and u are made in
# two reused buffers, its softmaxes are exact (no merge over tiles of K), and its gradients are
# made at once: the forward does every GEMM (student's and teacher's logits, then the two
# gradient products per side that needs one) and the backward only scales the saved gradients.
# Sinkhorn's shift needs every row's teacher logits per iteration: passes over tiles of K first.
def _prototype_tiles(prototypes: int, rows: int) -> List[slice]:
    """Tiles of prototypes (or classes) for ``rows`` rows: ~4 · BLOCK_ELEMENTS logits each (16 MiB
    of float32), as many as that takes: a tile's matrix product dwarfs its elementwise passes'
    fork/join, and the few live tiles stay far below the N × K logits."""
    return blocks(prototypes, rows, scale=4, max_blocks=None)


def _row_blocks(rows: int, prototypes: int) -> List[slice]:
    """Blocks of rows × all ``prototypes``: ~16 · BLOCK_ELEMENTS logits each (64 MiB of float32
    per buffer, two buffers): enough rows that the weight-gradient GEMM's read-modify-write of
    the (K, D) gradient per block stays small against its arithmetic (256 rows at K = 65,536)."""
    return blocks(rows, prototypes, scale=16, max_blocks=None)


def _tile_logits(rows: Tensor, weight: Tensor, cols: slice, dtype: torch.dtype) -> Tensor:
    """rows (N, D) @ weight[cols]ᵀ: the (N, k) logits of one tile, in ``dtype``."""
    return rows @ weight[cols].to(dtype).T


def _teacher_tile(rows: Tensor, weight: Tensor, cols: slice, scale: float, shift: Optional[Tensor],
                  dtype: torch.dtype) -> Tensor:
    """u = σ_t · rows @ weight[cols]ᵀ − shift[cols], (N, k)."""
    u = _tile_logits(rows, weight, cols, dtype).mul_(scale)
    return u if shift is None else u.sub_(shift[cols])


def _sinkhorn_shift(rows: Tensor, weight: Tensor, scale: float, iterations: int, gather_distributed: bool,
                    tiles: Sequence[slice], dtype: torch.dtype) -> Tensor:
    """a (K,): DINOv2's Sinkhorn-Knopp in the log domain, its targets being softmax_k(σ_t t_n − a).

    Q_nk = exp(σ_t t_nk − a_k − b_n) (constant factors drop out of every normalisation); each
    iteration sets a_k = LSE_n(σ_t t_nk − b_n) (the prototypes' normalisation) in one pass over the
    tiles, which also accumulates b_n = LSE_k(σ_t t_nk − a_k) (the samples') for the next one;
    b starts at 0. The final row normalisation is the softmax of the main pass. With
    ``gather_distributed`` a_k's LSE runs over every rank's rows (DINOv2's all-reduced prototype
    sums), b_n staying local: each rank gets its rows of the gathered batch's targets.
    """
    row_shift = torch.zeros(rows.shape[0], dtype=dtype, device=rows.device)
    shift = torch.empty(weight.shape[0], dtype=dtype, device=rows.device)
    for _ in range(iterations):
        next_row_shift = torch.full_like(row_shift, -math.inf)
        for cols in tiles:
            u = _teacher_tile(rows, weight, cols, scale, None, dtype)
            shift[cols] = _distributed_logsumexp(u - row_shift[:, None], 0, gather_distributed)
            next_row_shift = torch.logaddexp(next_row_shift, _student_lse(u.sub_(shift[cols]), 1.0))
        row_shift = next_row_shift
    return shift


def _teacher_shift(teacher: Tensor, teacher_weight: Tensor, center: Optional[Tensor], scale: float, iterations: int,
                   gather_distributed: bool, tiles: Sequence[slice], dtype: torch.dtype) -> Tensor:
    """a (K,): σ_t · center (zeros without one) for mean centring, Sinkhorn's for ``iterations`` > 0."""
    if iterations > 0:
        return _sinkhorn_shift(teacher, teacher_weight, scale, iterations, gather_distributed, tiles, dtype)
    if center is None:
        return torch.zeros(teacher_weight.shape[0], dtype=dtype, device=teacher.device)
    return center.to(dtype) * scale


def _shift_to_peak_(x: Tensor) -> Tensor:
    """x − max_k x in place (rows of logits, the softmax and cross-entropy being shift-invariant)."""
    return x.sub_(x.amax(dim=-1, keepdim=True))


def _exp_sums_(x: Tensor) -> Tensor:
    """exp(x) in place for rows x ≤ 0, exponents below log sqrt(tiny) raised to it (see
    _student_lse); returns the rows' sums of the exponentials (rows, 1)."""
    x.clamp_min_(math.log(_flush_threshold(x.dtype))).exp_()
    return x.sum(dim=-1, keepdim=True)


def _softmax_terms_(z: Tensor, q: Tensor, shift: Optional[Tensor], teacher_grad: Optional[Tensor],
                    student_side: bool) -> Tensor:
    """Rows' student logits z and teacher logits q (b, K), in place: q becomes the teacher's
    softmax(q − shift), then q − p (p = softmax(z)) where ``student_side``; ``teacher_grad``
    (b, K) or None receives q ⊙ (m − z) (N ∂ℓ/∂u). Returns Σ_rows (L − Σ_k q z)."""
    q.div_(_exp_sums_(_shift_to_peak_(q if shift is None else q.sub_(shift))))
    _shift_to_peak_(z)
    if teacher_grad is not None:
        centred = torch.linalg.vecdot(q, z)[:, None]  # m − max z
        torch.sub(centred, z, out=teacher_grad).mul_(q)
        cross = centred.sum()
    else:
        cross = torch.dot(q.view(-1), z.view(-1))
    sums = _exp_sums_(z)
    terms = sums.log().sum() - cross
    if student_side:
        q.addcmul_(z, sums.reciprocal_(), value=-1.0)
    return terms


def _outputs(tensors: Sequence[Optional[Tensor]], needs_grad: Optional[Sequence[bool]]
             ) -> Tuple[List[bool], torch.dtype, Tensor, List[Tensor]]:
    """The set-up :func:`linear_distillation_forward` and its fake share: (one flag per tensor,
    whether its gradient is made (None: every tensor given); the compute dtype; the 0-dim loss
    and the gradients as zeros in it, an empty tensor where not made)."""
    need = [t is not None for t in tensors] if needs_grad is None else list(needs_grad)
    dtype, device = compute_dtype(*tensors), tensors[0].device
    grads = [torch.zeros(t.shape, dtype=dtype, device=device) if wanted else library.empty_grad(tensors[0])
             for t, wanted in zip(tensors, need)]
    return need, dtype, torch.zeros((), dtype=dtype, device=device), grads


def linear_distillation_forward(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor,
                                center: Optional[Tensor], student_scale: float, teacher_scale: float,
                                iterations: int, gather_distributed: bool,
                                needs_grad: Optional[Sequence[bool]] = None) -> Tuple[Tensor, ...]:
    """student, teacher (N, D), weight, teacher_weight (K, D), center (K,) or None → (loss (),
    ∂loss/∂student, ∂teacher, ∂weight, ∂teacher_weight, ∂center), compute dtype; a gradient is
    made where ``needs_grad`` (one flag per tensor; None: every tensor given) asks for it, an
    empty tensor elsewhere; the teacher's side is zeros with Sinkhorn targets (constants)."""
    tensors = (student, teacher, weight, teacher_weight, center)
    need, dtype, loss, grads = _outputs(tensors, needs_grad)
    rows, prototypes = student.shape[0], weight.shape[0]
    weight_c, teacher_weight_c = weight.to(dtype), teacher_weight.to(dtype)
    teacher_c = teacher.to(dtype)
    student_rows, teacher_rows = student.to(dtype) * student_scale, teacher_c * teacher_scale
    shift = _teacher_shift(teacher_c, teacher_weight, center, teacher_scale, iterations, gather_distributed,
                           _prototype_tiles(prototypes, rows), dtype)
    has_shift = iterations > 0 or center is not None
    student_side = need[0] or need[2]
    teacher_side = iterations == 0 and (need[1] or need[3] or need[4])
    row_blocks = _row_blocks(rows, prototypes)
    size = row_blocks[0].stop
    logits = student.new_empty((size, prototypes), dtype=dtype)  # z, then exp(z − max z)
    targets = torch.empty_like(logits)  # u, then q, then q − p
    teacher_logits_grad = torch.empty_like(logits) if teacher_side else None
    for block in row_blocks:
        count = block.stop - block.start
        z, q = logits[:count], targets[:count]
        torch.mm(student_rows[block], weight_c.T, out=z)
        torch.mm(teacher_rows[block], teacher_weight_c.T, out=q)
        gu = teacher_logits_grad[:count] if teacher_side else None  # N ∂ℓ/∂u
        for part in blocks(count, prototypes, max_blocks=None):  # cache-sized rows for the elementwise passes
            loss += _softmax_terms_(z[part], q[part], shift if has_shift else None, None if gu is None else gu[part],
                                    student_side)
        if teacher_side:
            if need[1]:
                torch.mm(gu, teacher_weight_c, out=grads[1][block]).mul_(teacher_scale / rows)
            if need[3]:
                grads[3].addmm_(gu.T, teacher_rows[block], alpha=1.0 / rows)
            if need[4]:
                grads[4].sub_(gu.sum(dim=0), alpha=teacher_scale / rows)
        if student_side:  # q holds q − p = −N ∂ℓ/∂z
            if need[0]:
                torch.mm(q, weight_c, out=grads[0][block]).mul_(-student_scale / rows)
            if need[2]:
                grads[2].addmm_(q.T, student_rows[block], alpha=-1.0 / rows)
    return (loss / rows, *grads)


def _linear_distillation_fakes(student: Tensor, teacher: Tensor, weight: Tensor, teacher_weight: Tensor,
                               center: Optional[Tensor], student_scale: float, teacher_scale: float, iterations: int,
                               gather_distributed: bool, needs_grad: Optional[Sequence[bool]] = None
                               ) -> Tuple[Tensor, ...]:
    """The outputs' shapes and dtypes of :func:`linear_distillation_forward`."""
    _, _, loss, grads = _outputs((student, teacher, weight, teacher_weight, center), needs_grad)
    return (loss, *grads)

# ============================================================================================
# Fused last layer + cross-entropy with hard labels (masked language modelling)
# ============================================================================================
# The same tiles with implicit targets y = (1 − ε) onehot(label) + ε/V, over the rows whose label
# is not ignore_index only (M of them). With L_n = LSE_k(z_n):
#   loss = (1/M) Σ_n (L_n − (1 − ε) z_{n,label} − (ε/V) Σ_k z_nk),   ∂ℓ/∂z = (G/M) (softmax(z) − y)
# Saved: L (N, 0 at ignored rows); the backward remakes each tile's z.
def _class_tile(rows: Tensor, weight: Tensor, bias: Optional[Tensor], cols: slice, dtype: torch.dtype) -> Tensor:
    """rows @ weight[cols]ᵀ + bias[cols]: one tile's (M, k) logits, in ``dtype``."""
    z = _tile_logits(rows, weight, cols, dtype)
    return z if bias is None else z.add_(bias[cols].to(dtype))


def _labels_in_tile(labels: Tensor, cols: slice) -> Tuple[Tensor, Tensor]:
    """(whether each row's label is in the tile, its column in the tile (0 where it is not))."""
    in_tile = (labels >= cols.start) & (labels < cols.stop)
    return in_tile, torch.where(in_tile, labels - cols.start, 0)


def _kept_rows(hidden: Tensor, labels: Tensor, ignore_index: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(indices of the rows to compute, those rows of hidden in ``dtype``, their labels)."""
    kept = torch.nonzero(labels != ignore_index).squeeze(1)
    return kept, hidden.index_select(0, kept).to(dtype), labels.index_select(0, kept)


def linear_cross_entropy_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                 ignore_index: int, label_smoothing: float) -> Tuple[Tensor, Tensor]:
    """hidden (N, D), weight (V, D), bias (V,) or None, labels (N,) → (loss (), L (N,)), compute
    dtype; NaN when every label is ignored (as F.cross_entropy)."""
    dtype = compute_dtype(hidden, weight, bias)
    kept, rows, kept_labels = _kept_rows(hidden, labels, ignore_index, dtype)
    lse = torch.full((rows.shape[0],), -math.inf, dtype=dtype, device=hidden.device)
    label_logit = torch.zeros_like(lse)
    logit_sum = torch.zeros_like(lse)
    for cols in _prototype_tiles(weight.shape[0], rows.shape[0]):
        z = _class_tile(rows, weight, bias, cols, dtype)
        lse = torch.logaddexp(lse, _student_lse(z, 1.0))
        in_tile, column = _labels_in_tile(kept_labels, cols)
        label_logit += torch.where(in_tile, z.gather(1, column[:, None]).squeeze(1), 0.0)
        if label_smoothing:
            logit_sum += z.sum(dim=1)
    row_loss = lse - (1 - label_smoothing) * label_logit - (label_smoothing / weight.shape[0]) * logit_sum
    return row_loss.mean(), torch.zeros(hidden.shape[0], dtype=dtype, device=hidden.device).index_copy_(0, kept, lse)


def linear_cross_entropy_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor],
                                  labels: Tensor, lse: Tensor, ignore_index: int, label_smoothing: float,
                                  needs_grad: Sequence[bool]) -> List[Tensor]:
    """Gradients [∂/∂hidden, ∂/∂weight, ∂/∂bias, (labels: empty)] in the inputs' dtypes."""
    dtype = lse.dtype
    kept, rows, kept_labels = _kept_rows(hidden, labels, ignore_index, dtype)
    kept_lse = lse.index_select(0, kept)[:, None]
    factor = grad_loss.to(dtype) / rows.shape[0]
    grad_rows = torch.zeros_like(rows) if needs_grad[0] else None
    grad_weight = torch.empty_like(weight) if needs_grad[1] else library.empty_grad(weight)
    grad_bias = torch.empty_like(bias) if needs_grad[2] else library.empty_grad(hidden)
    row_index = torch.arange(rows.shape[0], device=hidden.device)
    for cols in _prototype_tiles(weight.shape[0], rows.shape[0]):
        grad_z = _softmax_from_lse_(_class_tile(rows, weight, bias, cols, dtype), kept_lse)
        if label_smoothing:
            grad_z.sub_(label_smoothing / weight.shape[0])
        in_tile, column = _labels_in_tile(kept_labels, cols)
        grad_z.index_put_((row_index[in_tile], column[in_tile]), grad_z.new_tensor(label_smoothing - 1.0),
                          accumulate=True)
        grad_z.mul_(factor)
        if needs_grad[0]:
            grad_rows.addmm_(grad_z, weight[cols].to(dtype))
        if needs_grad[1]:
            grad_weight[cols] = grad_z.T @ rows
        if needs_grad[2]:
            grad_bias[cols] = grad_z.sum(dim=0)
    grad_hidden = (torch.zeros_like(hidden).index_copy_(0, kept, grad_rows.to(hidden.dtype)) if needs_grad[0]
                   else library.empty_grad(hidden))
    return [grad_hidden, grad_weight, grad_bias, library.empty_grad(hidden)]


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
linear_distillation = library.define_needed_gradients_op(
    "linear_distillation", "Tensor student, Tensor teacher, Tensor weight, Tensor teacher_weight, Tensor? center",
    "float student_scale, float teacher_scale, int iterations, bool gather_distributed", linear_distillation_forward,
    _linear_distillation_fakes)
linear_cross_entropy = define_fused_loss_op(
    "linear_cross_entropy", "Tensor hidden, Tensor weight, Tensor? bias, Tensor labels",
    "int ignore_index, float label_smoothing", 1, linear_cross_entropy_forward, linear_cross_entropy_backward,
    lambda hidden, weight, bias, *_: (hidden.new_empty(hidden.shape[0], dtype=compute_dtype(hidden, weight, bias)),))
