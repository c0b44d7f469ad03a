"""The spectral family: losses on the spectrum of a batch's Gram/covariance matrix — TiCo, MMCR,
FroSSL, EMP-SSL, the hypersphere (alignment + uniformity) loss and patch kernel alignment, as
lightly 1.6's.

Public API: :func:`tico`, :func:`mmcr`, :func:`frossl`, :func:`emp_ssl`, :func:`hypersphere` and
:class:`TiCoLoss`, :class:`MMCRLoss`, :class:`FroSSLLoss`, :class:`EMPSSLLoss`,
:class:`HypersphereLoss`, :func:`patch_kernel_alignment`, :class:`PatchKernelAlignmentLoss`,
:func:`gram_anchoring_loss`, :class:`GramAnchoringLoss` (DINOv3's). Core ops: ``tico``, ``mmcr``,
``frossl``, ``emp_ssl``, ``hypersphere_uniformity``, ``patch_kernel_alignment``, ``gram_anchoring``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import distributed, registry
from ..runtime.dtypes import compute_dtype
from ..runtime.validation import (
    InputError,
    check_distributed_available,
    check_finite_number,
    check_float_tensor,
    check_non_negative,
    check_positive,
    check_tensor_list,
    check_views,
    eager,
)

Tensor = torch.Tensor


def tico(z_a: Tensor, z_b: Tensor, covariance: Optional[Tensor] = None, beta: float = 0.9, rho: float = 8.0, *,
         gather_distributed: bool = False, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    r"""TiCo (Zhu et al., 2022), as lightly's ``TiCoLoss``: with rows normalised (ẑ),
    :math:`C' = \beta C + (1 - \beta)\,\hat z_a^\top \hat z_a / N` (no gradient) and

    .. math:: L = 1 - \frac1N \sum_i \hat z_{a,i} \cdot \hat z_{b,i}
                  + \rho \frac1N \sum_i \hat z_{a,i} C' \hat z_{a,i}^\top

    Args:
        z_a, z_b: (N, D) float, N > 1. covariance: the running C (D, D), symmetric (TiCo's own
            state always is; the fused gradient takes it so), or None (zeros: the first step). gather_distributed: both views gathered from every rank (with gradient).
    Returns:
        (loss (0-dim float32, float64 for float64 inputs), C' (D, D), to pass to the next call).
    """
    check_float_tensor("z_a", z_a, ndim=2)
    check_float_tensor("z_b", z_b, ndim=2)
    if z_a.shape[0] < 2 or z_b.shape[0] < 2:
        raise InputError(f"z_a and z_b must have batch size > 1 but found {z_a.shape[0]} and {z_b.shape[0]}")
    if z_a.shape != z_b.shape:
        raise InputError(f"z_a and z_b must have same shape but found {z_a.shape} and {z_b.shape}.")
    check_views(("z_a", "z_b"), (z_a, z_b))
    if covariance is not None:
        check_float_tensor("covariance", covariance, ndim=2)
        if covariance.shape != (z_a.shape[1],) * 2:
            raise ValueError(f"covariance must be (D, D) = {(z_a.shape[1],) * 2} for z_a {tuple(z_a.shape)}, "
                             f"got {tuple(covariance.shape)}")
    beta, rho = check_finite_number("beta", beta), check_finite_number("rho", rho)
    if gather_distributed and distributed.world_size() > 1:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    _, core = registry.select("tico", backend, (z_a, z_b))
    return core(z_a, z_b, covariance, beta, rho)


def mmcr(online: Tensor, momentum: Tensor, lmda: float = 5e-3, *, backend: str = "auto") -> Tensor:
    r"""MMCR (Yerxa et al., 2023), as lightly's ``MMCRLoss``: z = [online, momentum] along the view
    axis (B, 2k, D), c its mean over views (B, D), :math:`L = -\|c\|_* + \lambda \sum_b \|z_b\|_* / B`
    (nuclear norms).

    Args: online, momentum: (B, k, D). Returns: 0-dim float32 loss (float64 for float64 inputs).
    """
    check_float_tensor("online", online)
    check_float_tensor("momentum", momentum)
    if online.shape != momentum.shape:
        raise InputError(f"online and momentum need to have the same shape, got online {tuple(online.shape)} and "
                         f"momentum {tuple(momentum.shape)}")
    check_views(("online", "momentum"), (online, momentum), ndim=3)
    lmda = check_non_negative("lmda", lmda)
    _, core = registry.select("mmcr", backend, (online, momentum))
    return core(online, momentum, lmda)


def _stacked_views(z_views: Sequence[Tensor]) -> Tensor:
    views = check_tensor_list("z_views", z_views)
    if len(views) < 2:
        raise ValueError(f"z_views must contain at least two views but found {len(views)}.")
    check_views([f"z_views[{i}]" for i in range(len(views))], views)
    return torch.stack(views)


def frossl(z_views: Sequence[Tensor], invariance_weight: float = 1.0, *, backend: str = "auto") -> Tensor:
    r"""FroSSL (Skean et al., 2024), as lightly's ``FroSSLLoss``: each view's columns normalised,
    :math:`L = \sum_v 2\log\|K_v / \mathrm{tr} K_v\|_F + w \sum_v V D\,\mathrm{mse}(\hat z_v, \bar z)`
    with K_v the view's smaller Gram and z̄ the mean of the views.

    Args: z_views: V ≥ 2 tensors (N, D). Returns: 0-dim float32 loss (float64 for float64 inputs).
    """
    views = _stacked_views(z_views)
    _, core = registry.select("frossl", backend, (views,))
    return core(views, check_finite_number("invariance_weight", invariance_weight))


def emp_ssl(z_views: Sequence[Tensor], tcr_eps: float = 0.2, inv_coef: float = 200.0, *,
            backend: str = "auto") -> Tensor:
    r"""EMP-SSL (Tong et al., 2023), as lightly's ``EMPSSLLoss``: the total coding rate
    :math:`\frac12 \mathrm{mean}_v \log\det(I + \frac{D}{N\epsilon} Z_v^\top Z_v)` plus ``inv_coef``
    times −mean cos(z_v,i, z̄_i).

    Args: z_views: V ≥ 2 tensors (N, D). Returns: 0-dim float32 loss (float64 for float64 inputs).
    """
    views = _stacked_views(z_views)
    tcr_eps = check_positive("tcr_eps", tcr_eps)
    _, core = registry.select("emp_ssl", backend, (views,))
    return core(views, tcr_eps, check_finite_number("inv_coef", inv_coef))


def hypersphere(z_a: Tensor, z_b: Tensor, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0, *,
                backend: str = "auto") -> Tensor:
    r"""Wang and Isola's alignment and uniformity, as lightly's ``HypersphereLoss``: with rows
    normalised (x, y),

    .. math:: L = \mathrm{mean}_i \|x_i - y_i\|^\alpha
                  + \frac{\lambda}{2}\Big(\log \mathrm{mean}_{i<j} e^{-t\|x_i - x_j\|^2}
                  + \log \mathrm{mean}_{i<j} e^{-t\|y_i - y_j\|^2}\Big)

    Args: z_a, z_b: (N, D), N ≥ 2 (uniformity needs a pair; lightly returns NaN for N = 1).
    Returns: 0-dim float32 loss (float64 for float64 inputs).
    """
    check_views(("z_a", "z_b"), (z_a, z_b))
    if z_a.shape[0] < 2:
        raise ValueError(f"z_a and z_b need at least 2 rows (uniformity averages over pairs of rows), got "
                         f"{tuple(z_a.shape)}")
    t, lam, alpha = (check_finite_number(name, value) for name, value in (("t", t), ("lam", lam), ("alpha", alpha)))
    dtype = compute_dtype(z_a, z_b)  # half inputs are normalised in float32 too
    x, y = F.normalize(z_a.to(dtype)), F.normalize(z_b.to(dtype))
    views = torch.stack([x, y])
    _, core = registry.select("hypersphere_uniformity", backend, (views,))
    alignment = (x - y).norm(dim=1).pow(alpha).mean()
    return alignment + lam * core(views, t).sum() / 2.0


class TiCoLoss(nn.Module):
    """TiCo, as lightly's ``TiCoLoss(beta=0.9, rho=8.0, gather_distributed=False)``.

    The running covariance is the attribute ``C`` ((D, D) tensor, or None before the first call;
    not a buffer, as in lightly). ``forward(z_a, z_b, update_covariance_matrix=True)``; see
    :func:`fastssl.functional.tico`.
    """

    def __init__(self, beta: float = 0.9, rho: float = 8.0, gather_distributed: bool = False, *,
                 backend: str = "auto"):
        super().__init__()
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.beta, self.rho, self.backend = beta, rho, backend
        self.C: Optional[Tensor] = None

    def forward(self, z_a: Tensor, z_b: Tensor, update_covariance_matrix: bool = True) -> Tensor:
        loss, covariance = tico(z_a, z_b, self.C, self.beta, self.rho, gather_distributed=self.gather_distributed,
                                backend=self.backend)
        if update_covariance_matrix:
            self.C = covariance
        return loss


class MMCRLoss(nn.Module):
    """MMCR, as lightly's ``MMCRLoss(lmda=0.005)``; ``forward(online, momentum)`` on (B, k, D)."""

    def __init__(self, lmda: float = 0.005, *, backend: str = "auto"):
        super().__init__()
        if lmda < 0:
            raise ValueError("lmda must be greater than or equal to 0")
        self.lmda, self.backend = lmda, backend

    def forward(self, online: Tensor, momentum: Tensor) -> Tensor:
        return mmcr(online, momentum, self.lmda, backend=self.backend)


class FroSSLLoss(nn.Module):
    """FroSSL, as lightly's ``FroSSLLoss(invariance_weight=1.0)``; ``forward(z_views)``."""

    def __init__(self, invariance_weight: float = 1.0, *, backend: str = "auto"):
        super().__init__()
        self.invariance_weight, self.backend = invariance_weight, backend

    def forward(self, z_views: Sequence[Tensor]) -> Tensor:
        return frossl(z_views, self.invariance_weight, backend=self.backend)


class EMPSSLLoss(nn.Module):
    """EMP-SSL, as lightly's ``EMPSSLLoss(tcr_eps=0.2, inv_coef=200.0)``; ``forward(z_views)``."""

    def __init__(self, tcr_eps: float = 0.2, inv_coef: float = 200.0, *, backend: str = "auto"):
        super().__init__()
        self.tcr_eps, self.inv_coef, self.backend = tcr_eps, inv_coef, backend

    def forward(self, z_views: Sequence[Tensor]) -> Tensor:
        return emp_ssl(z_views, self.tcr_eps, self.inv_coef, backend=self.backend)


class HypersphereLoss(nn.Module):
    """Alignment + uniformity, as lightly's ``HypersphereLoss(t=1.0, lam=1.0, alpha=2.0)``;
    ``forward(z_a, z_b)``; see :func:`fastssl.functional.hypersphere`."""

    def __init__(self, t: float = 1.0, lam: float = 1.0, alpha: float = 2.0, *, backend: str = "auto"):
        super().__init__()
        self.t, self.lam, self.alpha, self.backend = t, lam, alpha, backend

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return hypersphere(z_a, z_b, self.t, self.lam, self.alpha, backend=self.backend)


def patch_kernel_alignment(student_features: Tensor, teacher_features: Tensor, mask: Optional[Tensor] = None,
                           max_tokens: Optional[int] = None, *, backend: str = "auto") -> Tensor:
    r"""Dense relational distillation, as lightly's ``PatchKernelAlignmentLoss``: per image, 1 − linear
    CKA between the double-centred patch kernels K = XXᵀ of student and teacher (the teacher
    detached), averaged over the images with at least 2 valid tokens (a differentiable 0 when none).

    Args:
        student_features, teacher_features: (B, N, D). mask: (B, N) bool, True for tokens to
            ignore, or None. max_tokens: subsample that many tokens per image (valid ones first,
            drawn with ``torch.rand`` exactly as lightly does), or None.
    Returns: 0-dim float32 loss (float64 for float64 inputs).
    """
    for name, value in (("student_features", student_features), ("teacher_features", teacher_features)):
        check_float_tensor(name, value, min_ndim=0)
        if value.dim() != 3:
            raise ValueError(f"{name} must have shape (B, N, D) but has shape {tuple(value.shape)}.")
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"student_features and teacher_features must have the same shape but have "
                         f"{tuple(student_features.shape)} and {tuple(teacher_features.shape)}.")
    batch, tokens, _ = student_features.shape
    if mask is not None:
        if mask.shape != (batch, tokens):
            raise ValueError(f"mask must have shape {(batch, tokens)} but has shape {tuple(mask.shape)}.")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must have dtype torch.bool but has dtype {mask.dtype}.")
    student, teacher = student_features, teacher_features.detach()
    valid = student.new_ones(batch, tokens) if mask is None else (~mask).to(student.dtype)
    if max_tokens is not None and tokens > max_tokens:  # lightly's draw, so the same tokens are kept
        scores = torch.rand(batch, tokens, device=student.device).masked_fill(valid == 0, torch.inf)
        indices = scores.topk(max_tokens, dim=1, largest=False).indices
        student, teacher = (torch.gather(x, 1, indices[:, :, None].expand(-1, -1, x.shape[-1]))
                            for x in (student, teacher))
        valid = torch.gather(valid, 1, indices)
    _, core = registry.select("patch_kernel_alignment", backend, (student, teacher))
    per_image = core(student, teacher, valid)
    enough = (valid.sum(dim=-1) >= 2).to(per_image.dtype)
    if eager() and not bool(enough.any()):
        return (student_features * 0.0).sum().to(per_image.dtype)
    return (per_image * enough).sum() / enough.sum().clamp(min=1.0)


class PatchKernelAlignmentLoss(nn.Module):
    """Patch kernel alignment, as lightly's ``PatchKernelAlignmentLoss(max_tokens=None)``;
    ``forward(student_features, teacher_features, mask=None)``; see
    :func:`fastssl.functional.patch_kernel_alignment`."""

    def __init__(self, max_tokens: Optional[int] = None, *, backend: str = "auto") -> None:
        super().__init__()
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2 or None but is {max_tokens}.")
        self.max_tokens, self.backend = max_tokens, backend

    def forward(self, student_features: Tensor, teacher_features: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return patch_kernel_alignment(student_features, teacher_features, mask, self.max_tokens,
                                      backend=self.backend)


def gram_anchoring_loss(output_feats: Tensor, target_feats: Tensor, apply_norm: bool = True, img_level: bool = True,
                        remove_neg: bool = True, remove_only_teacher_neg: bool = False, *,
                        backend: str = "auto") -> Tensor:
    r"""DINOv3's Gram anchoring (Siméoni et al., 2025, ``GramLoss``): the MSE between the patch
    similarity (Gram) matrices of the student and of the Gram teacher,

    .. math:: L = \frac{1}{G N^2} \sum_g \| f(\hat S_g \hat S_g^\top) - f(\hat T_g \hat T_g^\top) \|_F^2

    with rows L2-normalised (``apply_norm``), one N×N Gram per image (``img_level``) or one over all
    B·N patches, and f the clamp at 0 of both (``remove_neg``) or of the teacher only, the student's
    entries zeroed where both are negative (``remove_only_teacher_neg``).

    It lives in the spectral family beside patch kernel alignment, the other patch-kernel loss:
    both compare X Xᵀ kernels from the token side. The clamps make the entries non-polynomial,
    so the loss has no D×D form: the torch backend sums it over tiles of the N×N Grams (a row
    block against a column block, a few thousand entries; several images per tile when N is
    small), with its closed-form gradient from the same tiles, so the (B·N)² Gram of
    ``img_level=False`` is never held. The Gram teacher takes no gradient (DINOv3's is a frozen
    checkpoint run without gradient).

    Args: output_feats, target_feats: (B, N, D) (or (M, D) with ``img_level=False``); computed in
    float32 (float64 for float64 inputs), as DINOv3's ``.float()``. Returns: 0-dim loss.

    Example::

        >>> loss = fastssl.functional.gram_anchoring_loss(student_patches, gram_teacher_patches)
    """
    if remove_neg and remove_only_teacher_neg:
        raise InputError("remove_neg and remove_only_teacher_neg cannot both be True")
    for name, value in (("output_feats", output_feats), ("target_feats", target_feats)):
        check_float_tensor(name, value, min_ndim=2)
        if value.dim() != 3 and (img_level or value.dim() != 2):
            raise InputError(f"{name} must have shape (B, N, D){'' if img_level else ' or (M, D)'}, "
                             f"got {tuple(value.shape)}")
    check_views(("output_feats", "target_feats"), (output_feats, target_feats), ndim=None)
    dtype = compute_dtype(output_feats, target_feats)
    student, teacher = output_feats.to(dtype), target_feats.detach().to(dtype)
    if apply_norm:
        student, teacher = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    if not img_level:  # one Gram over every patch of the batch
        student, teacher = student.reshape(1, -1, student.shape[-1]), teacher.reshape(1, -1, teacher.shape[-1])
    mode = 1 if remove_neg else 2 if remove_only_teacher_neg else 0
    _, core = registry.select("gram_anchoring", backend, (student, teacher))
    return core(student, teacher, mode)


class GramAnchoringLoss(nn.Module):
    """DINOv3's ``GramLoss(apply_norm=True, img_level=True, remove_neg=True,
    remove_only_teacher_neg=False)``; ``forward(output_feats, target_feats, img_level=None)``, where
    None takes the constructor's ``img_level`` (DINOv3's forward ignores the constructor's and
    defaults to True: the same default). See :func:`fastssl.functional.gram_anchoring_loss`."""

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        if remove_neg and remove_only_teacher_neg:  # DINOv3 asserts remove_neg != remove_only_teacher_neg
            raise InputError("remove_neg and remove_only_teacher_neg cannot both be True")
        self.apply_norm, self.img_level = apply_norm, img_level
        self.remove_neg, self.remove_only_teacher_neg = remove_neg, remove_only_teacher_neg
        self.mse_loss = nn.MSELoss()  # DINOv3's attribute (the loss is computed without it)
        self.backend = backend

    def forward(self, output_feats: Tensor, target_feats: Tensor, img_level: Optional[bool] = None) -> Tensor:
        return gram_anchoring_loss(output_feats, target_feats, self.apply_norm,
                                   self.img_level if img_level is None else img_level, self.remove_neg,
                                   self.remove_only_teacher_neg, backend=self.backend)
