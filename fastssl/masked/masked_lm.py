"""BERT's masked language-model loss with the output layer fused: :func:`masked_lm_loss` and
:class:`MaskedLMLoss`, on the distillation family's blocked linear cross-entropy core."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..distillation import check_last_layer
from ..runtime import registry
from ..runtime.validation import check_float_tensor, check_same_device, eager

Tensor = torch.Tensor


def _check_label_smoothing(label_smoothing) -> float:
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:  # F.cross_entropy's rule and error type
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    return float(label_smoothing)


def masked_lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Optional[Tensor] = None,
                   ignore_index: int = -100, label_smoothing: float = 0.0, backend: str = "auto") -> Tensor:
    r"""``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index=ignore_index,
    label_smoothing=label_smoothing)`` without the (N, V) logits: only the rows whose label is not
    ``ignore_index`` (BERT's masked positions) are computed, V in tiles, the smoothed targets
    implicit.

    .. math:: L = \frac1M \sum_{n: y_n \ne \text{ignore}} \Big(\mathrm{LSE}(z_n) - (1-\varepsilon) z_{n,y_n}
              - \frac{\varepsilon}{V} \sum_k z_{nk}\Big),\quad z = hW^\top + b

    Args:
        hidden: (N, D) or (B, T, D) inputs of the output layer. weight: (V, D) the output layer
            (BERT ties it to the token embedding). labels: (N,) or (B, T) integer, in [0, V) or
            ``ignore_index``. bias: (V,) or None. label_smoothing: ε in [0, 1].
    Returns:
        0-dim float32 loss (float64 for float64 inputs); NaN when every label is ignored, as
        ``F.cross_entropy``.

    Example::

        >>> loss = fastssl.masked_lm_loss(encoder(tokens), embedding.weight, labels, bias=mlm_bias)
    """
    check_float_tensor("hidden", hidden, min_ndim=2)
    if hidden.dim() > 3:
        raise ValueError(f"hidden must be (N, D) or (B, T, D), got shape {tuple(hidden.shape)}")
    check_last_layer("weight", weight, hidden)
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got "
                        f"{labels.dtype if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} for hidden of shape "
                         f"{tuple(hidden.shape)}, got {tuple(labels.shape)}")
    check_same_device(("hidden", "labels"), (hidden, labels))
    if bias is not None:
        check_float_tensor("bias", bias, ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be ({weight.shape[0]},) for weight {tuple(weight.shape)}, "
                             f"got {tuple(bias.shape)}")
        check_same_device(("hidden", "bias"), (hidden, bias))
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    label_smoothing = _check_label_smoothing(label_smoothing)
    hidden, labels = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1)
    if eager():  # reads the labels: eager calls only
        wrong = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if wrong.any():
            raise IndexError(f"Target {labels[wrong][0].item()} is out of bounds (labels must be in "
                             f"[0, {weight.shape[0]}) or ignore_index={ignore_index}).")
    _, core = registry.select("linear_cross_entropy", backend, (hidden, weight, bias))
    return core(hidden, weight, bias, labels.long(), ignore_index, label_smoothing)


class MaskedLMLoss(nn.Module):
    """:func:`masked_lm_loss` as a module, with ``torch.nn.CrossEntropyLoss``'s ``ignore_index``
    and ``label_smoothing``; ``forward(hidden, weight, labels, bias=None)``.

    Example::

        >>> criterion = MaskedLMLoss(label_smoothing=0.1)
        >>> loss = criterion(encoder(tokens), embedding.weight, labels)
    """

    def __init__(self, ignore_index: int = -100, label_smoothing: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        self.ignore_index = ignore_index
        self.label_smoothing = _check_label_smoothing(label_smoothing)
        self.backend = backend

    def forward(self, hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None) -> Tensor:
        return masked_lm_loss(hidden, weight, labels, bias=bias, ignore_index=self.ignore_index,
                              label_smoothing=self.label_smoothing, backend=self.backend)
