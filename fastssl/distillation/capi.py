"""CAPI (Darcet et al., 2025): a student predicts the positionwise Sinkhorn-Knopp assignments of
the teacher's cluster logits, as lightly's ``CAPILoss``.

The cross-entropy is the distillation family's ``soft_cross_entropy_pairs`` op (one target crop,
one student crop: every predicted token a row), so it gets that op's blocked closed-form
gradient and its backends. The Sinkhorn is CAPI's own, not the clustering family's ``sinkhorn``
op: it runs one problem per sequence position (a batched (S, B, K) problem the 2-D op cannot
express), in the linear domain with lightly's additive ``epsilon`` in both denominators (which
changes the result wherever a cluster's batch total is not ≫ epsilon, e.g. K ≫ B), and without
the global normalisation; equal to it only in the limit epsilon → 0.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..runtime import distributed
from ..runtime.dtypes import compute_dtype
from ..runtime.validation import check_float_tensor, check_int_at_least, check_positive, eager
from . import check_last_layer, pair_losses

Tensor = torch.Tensor


@torch.no_grad()
def capi_sinkhorn_knopp(logits: Tensor, iterations: int = 3, gather_distributed: bool = False,
                        epsilon: float = 1e-8) -> Tensor:
    r"""Positionwise Sinkhorn-Knopp of cluster logits, lightly's ``capi_loss.sinkhorn_knopp``.

    Per sequence position s, on q = exp(z_{·s·} − max_b z_{bs·}) (B, K), each of ``iterations``
    steps divides every cluster's column by (its batch total + epsilon), then every token's row by
    (its cluster total + epsilon). With ``gather_distributed`` (and a process group) the max and the
    batch totals are all-reduced, so each rank gets its rows of the global batch's assignments.

    In place on one (B, S, K) buffer (lightly makes three or four of that size per step).

    Args: logits: (B, S, K) (already divided by the teacher temperature). Returns: (B, S, K)
    assignments, float32 (float64 for float64 logits; lightly's stay in a half dtype), each row
    summing to 1 up to epsilon (0 iterations: the shifted exponentials).
    """
    check_float_tensor("logits", logits, ndim=3)
    check_int_at_least("iterations", iterations, 0)
    epsilon = check_positive("epsilon", epsilon)
    return _balance_(logits.to(compute_dtype(logits), copy=True), iterations, gather_distributed, epsilon)


def _balance_(assignments: Tensor, iterations: int, gather_distributed: bool, epsilon: float) -> Tensor:
    """:func:`capi_sinkhorn_knopp` written over its (B, S, K) argument, which it returns."""
    world = distributed.world_size() if gather_distributed else 1
    shift = assignments.amax(dim=0, keepdim=True)
    if world > 1:
        distributed.all_reduce_no_grad(shift, "max")
    assignments.sub_(shift).exp_()
    for _ in range(iterations):
        batch_totals = assignments.sum(dim=0, keepdim=True)
        if world > 1:
            distributed.all_reduce_no_grad(batch_totals, "sum")
        assignments.div_(batch_totals.add_(epsilon))
        assignments.div_(assignments.sum(dim=2, keepdim=True).add_(epsilon))
    return assignments


def _check_capi_inputs(teacher_logits: Tensor, student_logits: Tensor, teacher_index: Optional[Tensor],
                       last_layer_weight: Optional[Tensor]) -> None:
    check_float_tensor("teacher_logits", teacher_logits, ndim=3)
    check_float_tensor("student_logits", student_logits, ndim=3)
    (batch, tokens, clusters), shape = teacher_logits.shape, tuple(student_logits.shape)
    if last_layer_weight is not None:
        check_last_layer("last_layer_weight", last_layer_weight, student_logits, clusters, "cluster")
        shape = shape[:2] + (clusters,)  # the student's logits that the features make
    if teacher_index is None:
        if shape != (batch, tokens, clusters):
            raise ValueError(f"student_logits must have the shape of teacher_logits {tuple(teacher_logits.shape)} "
                             f"when teacher_index is None, got {shape}")
    else:
        if shape[0] != batch or shape[2] != clusters:
            raise ValueError(f"student_logits must be ({batch}, P, {clusters}) for teacher_logits of shape "
                             f"{tuple(teacher_logits.shape)}, got {shape}")
        if not isinstance(teacher_index, Tensor) or teacher_index.dtype != torch.long:
            raise TypeError("teacher_index must be an int64 tensor, got "
                            f"{getattr(teacher_index, 'dtype', type(teacher_index).__name__)}")
        if tuple(teacher_index.shape) != shape[:2]:
            raise ValueError(f"teacher_index must have shape {shape[:2]} (batch, predicted tokens), "
                             f"got {tuple(teacher_index.shape)}")
        if eager() and teacher_index.numel() and (teacher_index.min() < 0 or teacher_index.max() >= tokens):
            raise ValueError(f"teacher_index must lie in [0, {tokens}) for teacher_logits of shape "
                             f"{tuple(teacher_logits.shape)}")
    if teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits and student_logits must be on the same device, got "
                         f"{teacher_logits.device} and {student_logits.device}")


def capi(teacher_logits: Tensor, student_logits: Tensor, teacher_index: Optional[Tensor] = None,
         teacher_temperature: float = 0.06, student_temperature: float = 0.12, sinkhorn_iterations: int = 3,
         gather_distributed: bool = False, *, last_layer_weight: Optional[Tensor] = None,
         backend: str = "auto") -> Tensor:
    r"""CAPI's loss, as lightly's ``CAPILoss``:

    .. math:: L = -\frac{1}{BP} \sum_{b,p} \sum_k a_{b,i(b,p),k} \log\mathrm{softmax}(x_{bp}/\tau_s)_k

    with a = :func:`capi_sinkhorn_knopp` (teacher_logits / τ_t) over all teacher tokens, no
    gradient, gathered at ``teacher_index`` after the balancing (or aligned: i(b, p) = p).

    Args: teacher_logits (B, T, K); student_logits (B, P, K) (P = T without ``teacher_index``);
    teacher_index: (B, P) int64 in [0, T), or None. Returns: 0-dim float32 loss (float64 for
    float64 inputs). last_layer_weight: (K, D) the student head's last layer, or None; when given,
    ``student_logits`` are its (B, P, D) input features and the (B·P, K) logits are fused with the
    cross-entropy (made block by block, never held).

    Example::

        >>> loss = fastssl.functional.capi(teacher_logits, student_logits, teacher_index=masked)
    """
    _check_capi_inputs(teacher_logits, student_logits, teacher_index, last_layer_weight)
    teacher_temperature = check_positive("teacher_temperature", teacher_temperature)
    scale = 1.0 / check_positive("student_temperature", student_temperature)
    check_int_at_least("sinkhorn_iterations", sinkhorn_iterations, 0)
    with torch.no_grad():
        scaled = torch.div(teacher_logits.detach().to(compute_dtype(teacher_logits)), teacher_temperature)
        targets = _balance_(scaled, sinkhorn_iterations, gather_distributed, 1e-8)  # lightly's epsilon
        if teacher_index is not None:
            targets = torch.gather(targets, 1, teacher_index[:, :, None].expand(-1, -1, targets.shape[-1]))
    clusters = targets.shape[-1]
    return pair_losses(targets.reshape(1, -1, clusters), student_logits.reshape(1, -1, student_logits.shape[-1]),
                       last_layer_weight, scale, backend)[0, 0]


class CAPILoss(nn.Module):
    """CAPI, as lightly's ``CAPILoss(teacher_temperature=0.06, student_temperature=0.12,
    sinkhorn_iterations=3, gather_distributed=False)``; ``forward(teacher_logits, student_logits,
    teacher_index=None, *, last_layer_weight=None)``. See :func:`fastssl.functional.capi`.

    Example::

        >>> criterion = CAPILoss()
        >>> loss = criterion(teacher_logits, student_logits, teacher_index)
    """

    def __init__(self, teacher_temperature: float = 0.06, student_temperature: float = 0.12,
                 sinkhorn_iterations: int = 3, gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        if gather_distributed and not torch.distributed.is_available():  # lightly's check and message
            raise ValueError("gather_distributed is True but torch.distributed is not available. Please set "
                             "gather_distributed=False or use a distributed-enabled installation of PyTorch.")
        self.teacher_temperature = check_positive("teacher_temperature", teacher_temperature)
        self.student_temperature = check_positive("student_temperature", student_temperature)
        self.sinkhorn_iterations = check_int_at_least("sinkhorn_iterations", sinkhorn_iterations, 0)
        self.gather_distributed = gather_distributed
        self.backend = backend

    def forward(self, teacher_logits: Tensor, student_logits: Tensor, teacher_index: Optional[Tensor] = None, *,
                last_layer_weight: Optional[Tensor] = None) -> Tensor:
        return capi(teacher_logits, student_logits, teacher_index, self.teacher_temperature,
                    self.student_temperature, self.sinkhorn_iterations, self.gather_distributed,
                    last_layer_weight=last_layer_weight, backend=self.backend)
