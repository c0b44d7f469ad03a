"""The whitening family: W-MSE (Ermolov et al., 2021), as lightly 1.6's ``WMSELoss`` and
``Whitening2d`` (``lightly.loss.wmse_loss``).

Public API: :func:`whiten`, :class:`Whitening2d`, :func:`wmse`, :class:`WMSELoss`,
:func:`norm_mse_loss`. Core ops: ``whitening`` (each (w, D) block x_c L⁻ᵀ with L the Cholesky
factor of its covariance), ``wmse`` (the blocks of a step whitened and their views' normalised
MSE). The sub-batch permutations are drawn here, outside the ops, as lightly draws them.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import nn

from ..runtime import registry
from ..runtime.validation import check_float_tensor, check_int_at_least, check_label_tensor
from .reference import norm_mse_loss

Tensor = torch.Tensor

__all__ = ["whiten", "Whitening2d", "wmse", "WMSELoss", "norm_mse_loss"]


def _running_statistics(dim: int, running_mean: Optional[Tensor],
                        running_variance: Optional[Tensor]) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """Both running statistics as (D,) and (D, D), or neither (the batch's own are used)."""
    if (running_mean is None) != (running_variance is None):
        raise ValueError("running_mean and running_variance must be given together (lightly's eval mode uses both)")
    if running_mean is None:
        return None, None
    check_float_tensor("running_mean", running_mean)
    check_float_tensor("running_variance", running_variance)
    if running_mean.numel() != dim:
        raise ValueError(f"running_mean must hold D = {dim} values ((D,) or lightly's (1, D, 1, 1)), "
                         f"got shape {tuple(running_mean.shape)}")
    if running_variance.shape != (dim, dim):
        raise ValueError(f"running_variance must be (D, D) = {(dim, dim)}, got {tuple(running_variance.shape)}")
    return running_mean.reshape(dim), running_variance


def whiten(x: Tensor, eps: float = 0.0, running_mean: Optional[Tensor] = None,
           running_variance: Optional[Tensor] = None, *, backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    r"""W-MSE's whitening, as lightly's ``Whitening2d.forward``: :math:`y = (x - m) L^{-\top}`,
    :math:`LL^\top = (1 - \epsilon)C + \epsilon I`, m and C = x_cᵀx_c/(n − 1) the batch's mean
    and covariance, or ``running_mean`` / ``running_variance`` when given (lightly's eval mode).

    Args: x: (n, D) float. running_mean: (D,) or (1, D, 1, 1); running_variance: (D, D).
    Returns: (y (n, D) in the input dtype, the mean (D,) and covariance (D, D) used — what the
    running statistics' momentum update takes; no gradient).
    """
    check_float_tensor("x", x, ndim=2)
    mean, covariance = _running_statistics(x.shape[1], running_mean, running_variance)
    _, core = registry.select("whitening", backend, (x, mean, covariance))
    whitened, means, covariances = core(x[None], mean, covariance, float(eps))
    return whitened[0].to(x.dtype), means[0], covariances[0]


def _check_wmse_sizes(input: Tensor, num_samples: int, w_size: int) -> int:
    """lightly's checks, with its error types and messages; returns the batch size per view."""
    if input.shape[0] % num_samples != 0:
        raise RuntimeError("input batch size must be divisible by num_samples")
    batch_size = input.shape[0] // num_samples
    if batch_size < w_size:
        raise ValueError("batch size must be greater than or equal to w_size")
    return batch_size


def _draw_permutations(batch_size: int, w_iter: int, w_size: int) -> Tensor:
    """(w_iter, batch_size): lightly's draws, one ``torch.randperm(batch_size)`` per iteration on the
    CPU generator (its ``.view(-1, w_size)`` raises lightly's RuntimeError if w_size does not
    divide the batch, after the first draw, as lightly's does)."""
    return torch.stack([torch.randperm(batch_size).view(-1, w_size).reshape(-1) for _ in range(w_iter)])


def _subbatches(input: Tensor, permutations: Tensor, num_samples: int, w_size: int) -> Tensor:
    """(I, S, V, w, D): for each iteration and sub-batch of its permutation, the rows of every view."""
    batch_size, dim = input.shape[0] // num_samples, input.shape[1]
    iterations = permutations.shape[0]
    views = input.view(num_samples, batch_size, dim)[:, permutations.to(input.device)]
    return views.view(num_samples, iterations, batch_size // w_size, w_size, dim).permute(1, 2, 0, 3, 4)


def _checked_permutations(permutations: Optional[Tensor], batch_size: int, w_iter: int, w_size: int) -> Tensor:
    if permutations is None:
        return _draw_permutations(batch_size, w_iter, w_size)
    if not isinstance(permutations, Tensor) or permutations.dim() != 2 or permutations.shape[0] != w_iter:
        raise ValueError(f"permutations must be (w_iter, batch size) = ({w_iter}, {batch_size}), got "
                         f"{getattr(permutations, 'shape', type(permutations).__name__)}")
    for row in permutations:
        check_label_tensor("permutations", row, batch_size)
    if batch_size % w_size != 0:
        raise RuntimeError(f"shape '[-1, {w_size}]' is invalid for input of size {batch_size}")
    return permutations


def _check_w_size(embedding_dim: int, w_size: int) -> None:
    if embedding_dim * 2 > w_size:
        raise ValueError("w_size should be at least twice the size of embedding_dim to avoid instabiliy")


def wmse(input: Tensor, num_samples: int = 2, w_iter: int = 1, w_size: int = 256, eps: float = 0.0,
         running_mean: Optional[Tensor] = None, running_variance: Optional[Tensor] = None, *,
         permutations: Optional[Tensor] = None, backend: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    r"""W-MSE (Ermolov et al., 2021), as lightly's ``WMSELoss.forward`` with its ``norm_mse_loss``:
    ``w_iter`` times, the batch is split by a random permutation into sub-batches of ``w_size``
    rows, each view's sub-batch whitened on its own statistics (:func:`whiten`; the running ones
    when given), and the loss is the mean over iterations and pairs of views of
    2 − 2·mean_rows cos(y_i, y_j).

    Args:
        input: (num_samples · B, D), the views stacked as lightly's (view v is rows v·B … v·B + B − 1).
        permutations: (w_iter, B) int64, or None: drawn as lightly does (``torch.randperm(B)`` per
            iteration, the global CPU generator), so the same seed gives lightly's sub-batches.
    Returns: (loss (0-dim float32, float64 for float64 inputs), the statistics of every block in
    lightly's update order (w_iter · B/w_size · num_samples, D) and (…, D, D), no gradient).
    """
    check_float_tensor("input", input, ndim=2)
    check_int_at_least("num_samples", num_samples, 2)
    check_int_at_least("w_iter", w_iter, 1)
    check_int_at_least("w_size", w_size, 1)
    _check_w_size(input.shape[1], w_size)
    batch_size = _check_wmse_sizes(input, num_samples, w_size)
    mean, covariance = _running_statistics(input.shape[1], running_mean, running_variance)
    permutations = _checked_permutations(permutations, batch_size, w_iter, w_size)
    blocks = _subbatches(input, permutations, num_samples, w_size)
    _, core = registry.select("wmse", backend, (blocks, mean, covariance))
    return core(blocks, mean, covariance, float(eps))


class Whitening2d(nn.Module):
    """W-MSE's whitening layer, as lightly's ``Whitening2d(num_features, momentum=0.01,
    track_running_stats=True, eps=0)``: buffers ``running_mean`` (1, D, 1, 1) and
    ``running_variance`` (D, D) (persistent, only with ``track_running_stats``); in training the
    batch statistics whiten and update them by momentum, in place; in eval mode they whiten.
    ``forward(x)`` on (n, D); see :func:`fastssl.functional.whiten`."""

    def __init__(self, num_features: int, momentum: float = 0.01, track_running_stats: bool = True,
                 eps: float = 0, *, backend: str = "auto"):
        super().__init__()
        self.running_mean: Tensor
        self.running_variance: Tensor
        self.num_features = num_features
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.eps = eps
        self.backend = backend
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros([1, self.num_features, 1, 1]))
            self.register_buffer("running_variance", torch.eye(self.num_features))

    def uses_running_statistics(self) -> bool:
        """lightly's eval mode: the running statistics whiten instead of the batch's."""
        return not self.training and self.track_running_stats

    def running_statistics(self) -> Tuple[Optional[Tensor], Optional[Tensor]]:
        return (self.running_mean, self.running_variance) if self.uses_running_statistics() else (None, None)

    @torch.no_grad()
    def update_running_statistics(self, means: Tensor, covariances: Tensor) -> None:
        """lightly's momentum update, in place, once per whitened block in order: (K, D), (K, D, D)."""
        if not (self.training and self.track_running_stats):
            return
        for mean, covariance in zip(means, covariances):
            torch.add(self.momentum * mean.view(1, -1, 1, 1), (1 - self.momentum) * self.running_mean,
                      out=self.running_mean)
            torch.add(self.momentum * covariance, (1 - self.momentum) * self.running_variance,
                      out=self.running_variance)

    def forward(self, x: Tensor) -> Tensor:
        check_float_tensor("x", x, ndim=2)
        if x.shape[1] != self.num_features:
            raise ValueError(f"x must be (n, num_features) = (n, {self.num_features}), got {tuple(x.shape)}")
        whitened, mean, covariance = whiten(x, self.eps, *self.running_statistics(), backend=self.backend)
        self.update_running_statistics(mean[None], covariance[None])
        return whitened


class WMSELoss(nn.Module):
    """W-MSE, as lightly's ``WMSELoss(embedding_dim=128, momentum=0.01, eps=0.0,
    track_running_stats=True, w_iter=1, w_size=256, loss_fn=norm_mse_loss, num_samples=2)``:
    attributes ``whitening`` (a :class:`Whitening2d`, whose buffers are the state_dict's
    ``whitening.running_mean`` / ``whitening.running_variance``), ``w_iter``, ``w_size``,
    ``loss_f``, ``num_samples``, ``num_pairs``. ``forward(input)`` on (num_samples · B, D); see
    :func:`fastssl.functional.wmse`. With lightly's default ``loss_fn`` the pairs are fused; any
    other ``loss_fn`` is called on every pair of whitened views, in lightly's row order."""

    def __init__(self, embedding_dim: int = 128, momentum: float = 0.01, eps: float = 0.0,
                 track_running_stats: bool = True, w_iter: int = 1, w_size: int = 256,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = norm_mse_loss, num_samples: int = 2, *,
                 backend: str = "auto"):
        super().__init__()
        self.whitening = Whitening2d(num_features=embedding_dim, momentum=momentum, eps=eps,
                                     track_running_stats=track_running_stats, backend=backend)
        _check_w_size(embedding_dim, w_size)
        # lightly divides by num_pairs = 0 (a NaN loss) with one sample: refused here
        check_int_at_least("num_samples", num_samples, 2)
        self.w_iter = w_iter
        self.w_size = w_size
        self.loss_f = loss_fn
        self.num_samples = num_samples
        self.num_pairs = num_samples * (num_samples - 1) // 2
        self.backend = backend

    def forward(self, input: Tensor) -> Tensor:
        check_float_tensor("input", input, ndim=2)
        if input.shape[1] != self.whitening.num_features:
            raise ValueError(f"input must be (num_samples · B, embedding_dim) = (…, {self.whitening.num_features}), "
                             f"got {tuple(input.shape)}")
        running = self.whitening.running_statistics()
        if self.loss_f is norm_mse_loss:
            loss, means, covariances = wmse(input, self.num_samples, self.w_iter, self.w_size, self.whitening.eps,
                                            *running, backend=self.backend)
        else:
            loss, means, covariances = self._custom_pair_loss(input, running)
        self.whitening.update_running_statistics(means, covariances)
        return loss

    def _custom_pair_loss(self, input: Tensor, running) -> Tuple[Tensor, Tensor, Tensor]:
        """lightly's loop for a user ``loss_fn``: the whitened views put back in row order, then
        ``loss_fn`` on every pair, summed over iterations and pairs and averaged."""
        batch_size = _check_wmse_sizes(input, self.num_samples, self.w_size)
        permutations = _draw_permutations(batch_size, self.w_iter, self.w_size)
        blocks = _subbatches(input, permutations, self.num_samples, self.w_size)
        iterations, subbatches, views, rows, dim = blocks.shape
        _, core = registry.select("whitening", self.backend, (blocks, *running))
        whitened, means, covariances = core(blocks.reshape(-1, rows, dim), *running, float(self.whitening.eps))
        whitened = whitened.view(iterations, batch_size // rows, views, rows, dim).transpose(1, 2)
        loss = torch.tensor(0.0, device=input.device, requires_grad=True)
        for permutation, iteration in zip(permutations, whitened):
            in_row_order = iteration.reshape(views, batch_size, dim)[:, torch.argsort(permutation).to(input.device)]
            for i in range(views - 1):
                for j in range(i + 1, views):
                    loss = loss + self.loss_f(in_row_order[i], in_row_order[j])
        return loss / (self.w_iter * self.num_pairs), means, covariances
