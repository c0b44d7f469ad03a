"""The regularizer family: terms added to an SSL loss to shape the embedding distribution.

Public API: :func:`koleo`, :class:`KoLeoLoss` (DINOv2's KoLeo, as lightly's ``KoLeoLoss``). Core
op: ``koleo`` (each row's nearest neighbour and the log of its distance).
"""
from __future__ import annotations

import torch
from torch import nn

from ..runtime import registry
from ..runtime.validation import check_float_tensor, check_positive

Tensor = torch.Tensor


def koleo(x: Tensor, p: float = 2.0, eps: float = 1e-8, *, backend: str = "auto") -> Tensor:
    r"""KoLeo (Sablayrolles et al., 2019; DINOv2): −mean_i log(‖x̂_i − x̂_{n(i)} + eps‖_p + eps).

    x̂ are the rows of ``x`` scaled to unit L2 norm (``F.normalize``, eps ``eps``) and n(i) the row
    of largest cosine similarity to row i other than itself, as lightly's ``KoLeoLoss``
    (``torch.nn.PairwiseDistance(p, eps)``, which adds eps to the difference). No gradient flows
    through the choice of neighbour. A batch of one row is its own neighbour (lightly's answer:
    −log(eps·D^(1/p) + eps)); duplicate rows give distance eps·D^(1/p), a large but finite loss.

    Args: x: (N, D). Returns: 0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = dino_loss + 0.1 * fastssl.functional.koleo(student_cls_tokens)
    """
    check_float_tensor("x", x, ndim=2)
    p = check_positive("p", p)
    eps = check_positive("eps", eps)
    _, core = registry.select("koleo", backend, (x,))
    return core(x, p, eps)


class KoLeoLoss(nn.Module):
    """KoLeo, as lightly's ``KoLeoLoss(p=2, eps=1e-8)``; see :func:`fastssl.functional.koleo`.

    Example::

        >>> criterion = KoLeoLoss()
        >>> loss = criterion(features)
    """

    def __init__(self, p: float = 2, eps: float = 1e-8, *, backend: str = "auto"):
        super().__init__()
        self.p, self.eps, self.backend = check_positive("p", p), check_positive("eps", eps), backend

    def forward(self, x: Tensor) -> Tensor:
        return koleo(x, self.p, self.eps, backend=self.backend)
