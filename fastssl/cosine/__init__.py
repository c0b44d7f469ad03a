"""The cosine family: BYOL's and SimSiam's negative cosine similarity.

Public API: :func:`negative_cosine_similarity`, :class:`NegativeCosineSimilarity`. Core op:
``negative_cosine_similarity``.
"""
from __future__ import annotations

import torch
from torch import nn

from ..runtime import registry
from ..runtime.validation import FLOAT_DTYPES, check_positive, check_views

Tensor = torch.Tensor


def negative_cosine_similarity(x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8, *,
                               backend: str = "auto") -> Tensor:
    r"""−mean cos(x0, x1) along ``dim`` (BYOL / SimSiam), as lightly's ``NegativeCosineSimilarity``.

    cos = x0·x1 / (max(‖x0‖, eps) · max(‖x1‖, eps)); the mean runs over every other position.
    Stop-gradient and symmetrisation are the caller's.

    Args: x0, x1: same shape, e.g. (B, D). Returns: 0-dim float32 loss.

    Example::

        >>> loss = 0.5 * (negative_cosine_similarity(p0, z1.detach())
        ...               + negative_cosine_similarity(p1, z0.detach()))
    """
    if not _valid_views(x0, x1):  # the common call in a few attribute reads; any other gets every check's message
        check_views(("x0", "x1"), (x0, x1), ndim=None)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x0.dim() <= dim < x0.dim():
        raise ValueError(f"dim must be an int in [{-x0.dim()}, {x0.dim()}) for shape {tuple(x0.shape)}, got {dim}")
    eps = check_positive("eps", eps)
    # (B, D) along dim 1 are the rows already: no view nodes for autograd to walk
    rows = ([x0, x1] if x0.dim() == 2 and dim in (1, -1) else
            [x.movedim(dim, -1).reshape(-1, x.shape[dim]) for x in (x0, x1)])
    _, core = registry.select("negative_cosine_similarity", backend, rows)  # cached: cheap for small calls
    return core(rows[0], rows[1], eps)


def _valid_views(x0, x1) -> bool:
    """Whether ``check_views(("x0", "x1"), (x0, x1), ndim=None)`` would pass, in fewer steps."""
    return (isinstance(x0, Tensor) and isinstance(x1, Tensor) and x0.dtype in FLOAT_DTYPES and x1.dtype == x0.dtype
            and x0.shape == x1.shape and x0.numel() > 0 and x0.device == x1.device)


class NegativeCosineSimilarity(nn.Module):
    """−mean cosine similarity (BYOL / SimSiam), as lightly's ``NegativeCosineSimilarity``.

    Example::

        >>> criterion = NegativeCosineSimilarity()
        >>> loss = 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8, *, backend: str = "auto"):
        super().__init__()
        self.dim, self.eps, self.backend = dim, check_positive("eps", eps), backend

    def forward(self, x0: Tensor, x1: Tensor) -> Tensor:
        return negative_cosine_similarity(x0, x1, self.dim, self.eps, backend=self.backend)
