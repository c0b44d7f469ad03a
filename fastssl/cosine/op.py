"""The cosine family's ``torch.library`` op: schema, fake and autograd, written once."""
from __future__ import annotations

from typing import Callable

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def _negative_cosine_fake(x0, x1, eps, needs_grad=None):
    dtype = compute_dtype(x0, x1)
    needs_grad = needs_grad if needs_grad is not None else (True, True)
    return (x0.new_empty((), dtype=dtype),
            *(library.gradient_fakes(need, (x,), dtype)[0] for x, need in zip((x0, x1), needs_grad)))


def define_negative_cosine_op(name: str, forward: Callable) -> Callable:
    """Register ``fastssl::<name>(x0, x1, eps, needs_grad) -> (loss, ∂loss/∂x0, ∂loss/∂x1)``.

    ``forward(x0, x1, eps, needs_grad=None)`` returns the 0-dim loss and the gradient of each input
    ``needs_grad`` flags (None: both) in the compute dtype (empty tensors otherwise; BYOL's detached
    target takes none); the backward only scales them.
    Returns ``core(x0, x1, eps)`` → loss, with ``reference``'s signature; the op is ``core.op``.
    """
    return library.define_needed_gradients_op(name, "Tensor x0, Tensor x1", "float eps", forward,
                                              _negative_cosine_fake)
