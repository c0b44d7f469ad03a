"""The sliced family: regularizers that compare random 1-D projections (slices) of a batch's
embeddings with a standard Gaussian — LeJEPA's SIGReg (characteristic functions), LeWM (SIGReg plus
a latent prediction loss) and VISReg (sorted projections: a sliced 2-Wasserstein distance), as
lightly 1.6's.

Public API: :func:`sigreg`, :func:`lejepa`, :func:`lejepa_invariance_loss`, :func:`lewm`,
:func:`latent_distance`, :func:`latent_prediction_loss`, :func:`visreg`, :func:`visreg_components`,
:func:`visreg_center_loss`, :func:`visreg_scale_loss`, :func:`visreg_shape_loss` and
:class:`SIGReg`, :class:`LeJEPALoss`, :class:`LeWMLoss`, :class:`VISRegLoss`,
:class:`VISRegLossComponents`. Core ops: ``sigreg_sums`` (SIGReg's cos/sin sums over the batch),
``visreg_shape``.

Random slices are drawn in the Python functions, from the global generator, exactly as lightly
draws them (shape, dtype, order), and passed to the ops as tensors: the same ``torch.manual_seed``
gives lightly's numbers.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import distributed, registry
from ..runtime.validation import check_distributed_available, check_float_tensor

Tensor = torch.Tensor


# ============================================================================================
# SIGReg (LeJEPA)
# ============================================================================================
def sigreg_grid(knots: int = 17, t_max: float = 3.0) -> Tuple[Tensor, Tensor, Tensor]:
    """lightly's SIGReg frequency grid, float32 (K,) each: t = linspace(0, t_max, K),
    φ = exp(−t²/2) and the trapezoidal weights over [−t_max, t_max] folded onto [0, t_max]
    ([dt, 2dt, …, 2dt, dt]) times φ."""
    if knots <= 1:
        raise ValueError("knots must be an integer greater than one.")
    if t_max <= 0:
        raise ValueError("t_max must be greater than zero.")
    t = torch.linspace(0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32)
    weights[[0, -1]] = dt
    window = torch.exp(-t.square() / 2.0)
    return t, window, weights * window


def _check_num_vectors(num_vectors: int) -> int:
    if num_vectors <= 0:
        raise ValueError("num_vectors must be a positive integer.")
    return num_vectors


def random_unit_columns(rows: int, columns: int, like: Tensor, shared: bool = False) -> Tensor:
    """(rows, columns) unit columns as lightly draws them: ``torch.randn`` in ``like``'s dtype and
    device, broadcast from rank 0 when ``shared`` (every rank then uses the same slices), divided by
    the columns' norms."""
    vectors = torch.randn(rows, columns, device=like.device, dtype=like.dtype)
    if shared:
        distributed.broadcast_no_grad(vectors, src=0)
    return vectors.div_(vectors.norm(p=2, dim=0))  # in place, as lightly: no second (rows, columns) buffer


def sigreg_statistic(proj: Tensor, vectors: Tensor, t: Tensor, phi: Tensor, weights: Tensor, *,
                     gather_distributed: bool = False, backend: str = "auto") -> Tensor:
    r"""SIGReg's Epps-Pulley statistic of ``proj`` (..., N, C) on given unit ``vectors`` (C, M)
    and grid (t, φ, w: (K,)): with c, s the cos/sin sums of the ``sigreg_sums`` op (over the
    batch of every rank with ``gather_distributed``: all-reduced with gradient) and N the
    (global) batch size,

    .. math:: L = \mathrm{mean}_{\ldots, m}\; N \sum_k w_k \big[(c_{mk}/N - \phi_k)^2 + (s_{mk}/N)^2\big]

    Returns: 0-dim float32 (float64 for float64 inputs)."""
    num_samples = proj.shape[-2]
    gathered = gather_distributed and distributed.world_size() > 1
    if gathered:  # float64: exact for any batch (lightly counts in the input dtype)
        num_samples = int(distributed.all_reduce_no_grad(
            torch.tensor(float(num_samples), device=proj.device, dtype=torch.float64)).item())
    _, core = registry.select("sigreg_sums", backend, (proj, vectors))
    cos_sum, sin_sum = core(proj, vectors, t)
    if gathered:  # one all-reduce for both sums; its backward all-reduces their gradients
        cos_sum, sin_sum = distributed.all_reduce_sum(torch.stack([cos_sum, sin_sum])).unbind(0)
    dtype = cos_sum.dtype
    error = (cos_sum / num_samples - phi.to(dtype)).square() + (sin_sum / num_samples).square()
    return ((error @ weights.to(dtype)) * num_samples).mean()


def sigreg(proj: Tensor, knots: int = 17, t_max: float = 3.0, num_vectors: int = 1024, *,
           gather_distributed: bool = False, backend: str = "auto") -> Tensor:
    """SIGReg (LeJEPA, Balestriero and LeCun, 2025), as lightly's ``SIGReg``: ``num_vectors``
    random unit slices (``torch.randn`` (C, M) in proj's dtype, shared from rank 0 with
    ``gather_distributed``), and :func:`sigreg_statistic` on lightly's grid (:func:`sigreg_grid`).

    Args: proj: (..., N, C), the batch on dim −2 (statistics per leading index, then averaged).
    Returns: 0-dim float32 loss (float64 for float64 inputs).
    """
    t, phi, weights = (x.to(proj.device) for x in sigreg_grid(knots, t_max))
    return _sigreg(proj, t, phi, weights, _check_num_vectors(num_vectors), gather_distributed, backend)


def _sigreg(proj: Tensor, t: Tensor, phi: Tensor, weights: Tensor, num_vectors: int, gather_distributed: bool,
            backend: str) -> Tensor:
    check_float_tensor("proj", proj, min_ndim=2)
    shared = gather_distributed and distributed.world_size() > 1
    vectors = random_unit_columns(proj.shape[-1], num_vectors, proj, shared)
    return sigreg_statistic(proj, vectors, t, phi, weights, gather_distributed=gather_distributed, backend=backend)


class SIGReg(nn.Module):
    """SIGReg, as lightly's ``SIGReg(*, knots=17, t_max=3.0, num_vectors=1024,
    gather_distributed=False)``: buffers ``t``, ``phi``, ``weights`` (K,) float32, persistent, as
    in lightly; ``forward(proj)`` on (..., N, C). See :func:`fastssl.functional.sigreg`."""

    def __init__(self, *, knots: int = 17, t_max: float = 3.0, num_vectors: int = 1024,
                 gather_distributed: bool = False, backend: str = "auto"):
        super().__init__()
        t, phi, weights = sigreg_grid(knots, t_max)
        self.num_vectors = _check_num_vectors(num_vectors)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.backend = backend
        self.t: Tensor
        self.register_buffer("t", t)
        self.phi: Tensor
        self.register_buffer("phi", phi)
        self.weights: Tensor
        self.register_buffer("weights", weights)

    def forward(self, proj: Tensor) -> Tensor:
        return _sigreg(proj, self.t, self.phi, self.weights, self.num_vectors, self.gather_distributed, self.backend)


def lejepa_invariance_loss(*, all_proj: Tensor, global_proj: Tensor) -> Tensor:
    """LeJEPA's invariance, as lightly's: mean squared distance of every view of ``all_proj``
    (V_all, N, D) to the mean of the global views ``global_proj`` (Vg, N, D)."""
    centers = global_proj.mean(0)
    return (centers - all_proj).square().mean()


def _check_view_shapes(local_proj: Tensor, global_proj: Tensor, need_views: bool) -> None:
    """lightly's shape checks of LeJEPA's (``need_views``: at least one view of each kind) and
    VISReg's (V, N, D) views, same errors in the same order, then their dtypes."""
    if local_proj.ndim != 3:
        raise ValueError(f"local_proj must have shape (V_local, N, D), got {local_proj.shape}.")
    if global_proj.ndim != 3:
        raise ValueError(f"global_proj must have shape (V_global, N, D), got {global_proj.shape}.")
    if local_proj.shape[1:] != global_proj.shape[1:]:
        raise ValueError("local_proj and global_proj must have matching batch and feature "
                         f"dimensions, got {local_proj.shape} and {global_proj.shape}.")
    for name, views, kind in (("local_proj", local_proj, "local"), ("global_proj", global_proj, "global")):
        if need_views and views.shape[0] < 1:
            raise ValueError(f"{name} must have at least one {kind} view, got {views.shape}.")
    check_float_tensor("local_proj", local_proj, min_ndim=0)
    check_float_tensor("global_proj", global_proj, min_ndim=0)


def _check_lambda_unit(lambda_param: float) -> float:
    if not 0.0 <= lambda_param <= 1.0:
        raise ValueError("lambda_param must be in the unit interval [0, 1].")
    return lambda_param


def _lejepa(local_proj: Tensor, global_proj: Tensor, lambda_param: float, regularizer) -> Tensor:
    _check_view_shapes(local_proj, global_proj, need_views=True)
    all_proj = torch.cat([global_proj, local_proj], dim=0)
    regularization = regularizer(all_proj)
    invariance = lejepa_invariance_loss(all_proj=all_proj, global_proj=global_proj)
    return lambda_param * regularization + (1.0 - lambda_param) * invariance


def lejepa(local_proj: Tensor, global_proj: Tensor, lambda_param: float = 0.05, knots: int = 17,
           t_max: float = 3.0, num_vectors: int = 1024, *, gather_distributed: bool = False,
           backend: str = "auto") -> Tensor:
    """LeJEPA, as lightly's ``LeJEPALoss``: λ·SIGReg(all views) + (1 − λ)·invariance, all views =
    [global, local] (V, N, D); see :func:`sigreg`. Returns: 0-dim float32 (float64 for float64)."""
    t, phi, weights = (x.to(global_proj.device) for x in sigreg_grid(knots, t_max))
    num_vectors = _check_num_vectors(num_vectors)
    return _lejepa(local_proj, global_proj, _check_lambda_unit(lambda_param),
                   lambda proj: _sigreg(proj, t, phi, weights, num_vectors, gather_distributed, backend))


class LeJEPALoss(nn.Module):
    """LeJEPA, as lightly's ``LeJEPALoss(lambda_param=0.05, gather_distributed=False,
    sigreg_knots=17, sigreg_t_max=3.0, sigreg_num_vectors=1024)``: the attribute ``sigreg``
    (:class:`SIGReg`); ``forward(*, local_proj, global_proj)``."""

    def __init__(self, lambda_param: float = 0.05, gather_distributed: bool = False, sigreg_knots: int = 17,
                 sigreg_t_max: float = 3.0, sigreg_num_vectors: int = 1024, *, backend: str = "auto"):
        super().__init__()
        self.lambda_param = _check_lambda_unit(lambda_param)
        self.sigreg = SIGReg(knots=sigreg_knots, t_max=sigreg_t_max, num_vectors=sigreg_num_vectors,
                             gather_distributed=gather_distributed, backend=backend)

    def forward(self, *, local_proj: Tensor, global_proj: Tensor) -> Tensor:
        return _lejepa(local_proj, global_proj, self.lambda_param, self.sigreg)


# ============================================================================================
# LeWM
# ============================================================================================
DISTANCES = ("l1", "l2")


def latent_distance(*, predicted: Tensor, target: Tensor, distance: str = "l2", normalize: bool = False) -> Tensor:
    """lightly's ``latent_distance``: mean absolute (``"l1"``) or squared (``"l2"``) error between
    ``predicted`` and the detached ``target`` (same shape), both layer-normalised over the last
    dim first with ``normalize``."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
    if predicted.shape != target.shape:
        raise ValueError("predicted and target must have the same shape, got "
                         f"{tuple(predicted.shape)} and {tuple(target.shape)}.")
    target = target.detach()
    if normalize:
        normalized_shape = (predicted.size(-1),)
        predicted = F.layer_norm(predicted, normalized_shape)
        target = F.layer_norm(target, normalized_shape)
    if distance == "l1":
        return (predicted - target).abs().mean()
    return (predicted - target).square().mean()


def latent_prediction_loss(*, predicted: Tensor, target: Tensor, normalize: bool = False) -> Tensor:
    """lightly's ``latent_prediction_loss``: :func:`latent_distance` with ``"l2"``."""
    return latent_distance(predicted=predicted, target=target, distance="l2", normalize=normalize)


def _lewm(predicted: Tensor, target: Tensor, embeddings: Tensor, lambda_param: float, normalize: bool,
          regularizer) -> Tensor:
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must have shape (B, T, D), got {tuple(embeddings.shape)}.")
    if embeddings.shape[0] != predicted.shape[0] or embeddings.shape[-1] != predicted.shape[-1]:
        raise ValueError("embeddings must share the batch size and embedding dimension of "
                         f"predicted, got {tuple(embeddings.shape)} and {tuple(predicted.shape)}.")
    prediction = latent_prediction_loss(predicted=predicted, target=target, normalize=normalize)
    # SIGReg's samples are on dim −2: the batch goes there, (B, T, D) → (T, B, D), as lightly does
    return prediction + lambda_param * regularizer(embeddings.flatten(start_dim=1, end_dim=-2).transpose(0, 1))


def _check_lambda_non_negative(lambda_param: float) -> float:
    if lambda_param < 0.0:
        raise ValueError("lambda_param must not be negative.")
    return lambda_param


def lewm(predicted: Tensor, target: Tensor, embeddings: Tensor, lambda_param: float = 0.1, normalize: bool = False,
         knots: int = 17, t_max: float = 3.0, num_vectors: int = 1024, *, gather_distributed: bool = False,
         backend: str = "auto") -> Tensor:
    """LeWM, as lightly's ``LeWMLoss``: :func:`latent_prediction_loss` + λ·SIGReg of the frame
    embeddings (B, T, D) with the batch as SIGReg's samples. Returns: 0-dim float32 (float64 for
    float64 inputs)."""
    t, phi, weights = (x.to(embeddings.device) for x in sigreg_grid(knots, t_max))
    num_vectors = _check_num_vectors(num_vectors)
    return _lewm(predicted, target, embeddings, _check_lambda_non_negative(lambda_param), normalize,
                 lambda proj: _sigreg(proj, t, phi, weights, num_vectors, gather_distributed, backend))


class LeWMLoss(nn.Module):
    """LeWM, as lightly's ``LeWMLoss(lambda_param=0.1, normalize=False, gather_distributed=False,
    sigreg_knots=17, sigreg_t_max=3.0, sigreg_num_vectors=1024)``: the attribute ``sigreg``
    (:class:`SIGReg`); ``forward(*, predicted, target, embeddings)``."""

    def __init__(self, lambda_param: float = 0.1, normalize: bool = False, gather_distributed: bool = False,
                 sigreg_knots: int = 17, sigreg_t_max: float = 3.0, sigreg_num_vectors: int = 1024, *,
                 backend: str = "auto") -> None:
        super().__init__()
        self.lambda_param = _check_lambda_non_negative(lambda_param)
        self.normalize = normalize
        self.sigreg = SIGReg(knots=sigreg_knots, t_max=sigreg_t_max, num_vectors=sigreg_num_vectors,
                             gather_distributed=gather_distributed, backend=backend)

    def forward(self, *, predicted: Tensor, target: Tensor, embeddings: Tensor) -> Tensor:
        return _lewm(predicted, target, embeddings, self.lambda_param, self.normalize, self.sigreg)


# ============================================================================================
# VISReg
# ============================================================================================
def visreg_center_loss(z: Tensor) -> Tensor:
    """lightly's ``visreg_center_loss``: mean over the dims of the squared batch mean (dim −2)."""
    return z.mean(dim=-2).square().mean()


def visreg_scale_loss(z: Tensor) -> Tensor:
    """lightly's ``visreg_scale_loss``: mean over the dims of (1 − std)², std biased over dim −2."""
    return (1.0 - z.std(dim=-2, unbiased=False)).square().mean()


def _check_shape_arguments(num_slices: int, eps: float) -> None:
    if num_slices < 1:
        raise ValueError("num_slices must be a positive integer.")
    if eps <= 0:
        raise ValueError("eps must be greater than zero.")


def visreg_shape_loss(z: Tensor, num_slices: int, eps: float = 1e-4, *, backend: str = "auto") -> Tensor:
    """lightly's ``visreg_shape_loss``: z (..., N, D) centred and scaled by its detached std + eps
    over N, projected on ``num_slices`` random unit slices (``torch.randn`` (D, S) in z's dtype,
    fresh per call, per rank), each slice's sorted projections against the standard Gaussian
    quantiles at i/(N + 1): the mean squared difference (a sliced 2-Wasserstein distance).
    Returns: 0-dim float32 (float64 for float64 inputs)."""
    _check_shape_arguments(num_slices, eps)
    check_float_tensor("z", z, min_ndim=2)
    slices = random_unit_columns(z.shape[-1], num_slices, z)
    _, core = registry.select("visreg_shape", backend, (z, slices))
    return core(z, slices, eps)


class VISRegLossComponents(NamedTuple):
    """lightly's ``VISRegLossComponents``: the total and the unweighted terms."""

    total: Tensor
    pred: Tensor
    scale: Tensor
    shape: Tensor
    center: Tensor


def _visreg_regularized_views(local_proj: Tensor, global_proj: Tensor, gather_distributed: bool
                              ) -> Tuple[Tensor, Tensor]:
    """(the invariance loss, the views the regularizers see: gathered over the batch dim with
    ``gather_distributed``), after lightly's checks."""
    _check_view_shapes(local_proj, global_proj, need_views=False)
    if local_proj.size(-2) < 2:
        raise ValueError(f"Batch size must be greater than one, got {local_proj.size(-2)}.")
    proj = torch.cat([global_proj, local_proj], dim=0)
    prediction = lejepa_invariance_loss(all_proj=proj, global_proj=global_proj)  # per rank, never gathered
    if gather_distributed and distributed.world_size() > 1:  # rank order along the batch dim, as lightly's cat
        proj = distributed.gather(proj.transpose(0, 1)).transpose(0, 1)
    return prediction, proj


def _check_visreg_arguments(lambda_param: float, num_slices: int, lambda_scale: float, lambda_shape: float,
                            lambda_center: float, eps: float) -> None:
    """lightly's ``VISRegLoss`` constructor checks, same errors and order."""
    _check_lambda_unit(lambda_param)
    if num_slices < 1:
        raise ValueError("num_slices must be a positive integer.")
    if lambda_scale < 0 or lambda_shape < 0 or lambda_center < 0:
        raise ValueError("lambda_scale, lambda_shape, and lambda_center must be non-negative.")
    _check_shape_arguments(num_slices, eps)


def visreg_components(local_proj: Tensor, global_proj: Tensor, lambda_param: float = 0.9, num_slices: int = 4096,
                      lambda_scale: float = 1.0, lambda_shape: float = 1.0, lambda_center: float = 1.0,
                      eps: float = 1e-4, *, gather_distributed: bool = False,
                      backend: str = "auto") -> VISRegLossComponents:
    """VISReg (Wu et al., 2026), as lightly's ``VISRegLoss.forward_components``: with all views
    [global, local] (V, N, D), pred = LeJEPA's invariance, and on the views (gathered over ranks
    with ``gather_distributed``) the scale, shape (:func:`visreg_shape_loss`) and center terms;
    total = (1 − λ)·pred + λ·(λ_scale·scale + λ_shape·shape + λ_center·center)."""
    _check_visreg_arguments(lambda_param, num_slices, lambda_scale, lambda_shape, lambda_center, eps)
    prediction, proj = _visreg_regularized_views(local_proj, global_proj, gather_distributed)
    scale = visreg_scale_loss(proj)
    shape = visreg_shape_loss(proj, num_slices=num_slices, eps=eps, backend=backend)
    center = visreg_center_loss(proj)
    regularization = lambda_scale * scale + lambda_shape * shape + lambda_center * center
    total = (1.0 - lambda_param) * prediction + lambda_param * regularization
    return VISRegLossComponents(total=total, pred=prediction, scale=scale, shape=shape, center=center)


def visreg(local_proj: Tensor, global_proj: Tensor, lambda_param: float = 0.9, num_slices: int = 4096,
           lambda_scale: float = 1.0, lambda_shape: float = 1.0, lambda_center: float = 1.0, eps: float = 1e-4, *,
           gather_distributed: bool = False, backend: str = "auto") -> Tensor:
    """The total of :func:`visreg_components` (lightly's ``VISRegLoss.forward``)."""
    return visreg_components(local_proj, global_proj, lambda_param, num_slices, lambda_scale, lambda_shape,
                             lambda_center, eps, gather_distributed=gather_distributed, backend=backend).total


class VISRegLoss(nn.Module):
    """VISReg, as lightly's ``VISRegLoss(lambda_param=0.9, num_slices=4096, lambda_scale=1.0,
    lambda_shape=1.0, lambda_center=1.0, gather_distributed=False, eps=1e-4)``;
    ``forward(*, local_proj, global_proj)`` → total, ``forward_components`` →
    :class:`VISRegLossComponents`."""

    def __init__(self, lambda_param: float = 0.9, num_slices: int = 4096, lambda_scale: float = 1.0,
                 lambda_shape: float = 1.0, lambda_center: float = 1.0, gather_distributed: bool = False,
                 eps: float = 1e-4, *, backend: str = "auto"):
        super().__init__()
        _check_visreg_arguments(lambda_param, num_slices, lambda_scale, lambda_shape, lambda_center, eps)
        self.lambda_param, self.num_slices, self.eps = lambda_param, num_slices, eps
        self.lambda_scale, self.lambda_shape, self.lambda_center = lambda_scale, lambda_shape, lambda_center
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.backend = backend

    def forward(self, *, local_proj: Tensor, global_proj: Tensor) -> Tensor:
        return self.forward_components(local_proj=local_proj, global_proj=global_proj).total

    def forward_components(self, *, local_proj: Tensor, global_proj: Tensor) -> VISRegLossComponents:
        return visreg_components(local_proj, global_proj, self.lambda_param, self.num_slices, self.lambda_scale,
                                 self.lambda_shape, self.lambda_center, self.eps,
                                 gather_distributed=self.gather_distributed, backend=self.backend)
