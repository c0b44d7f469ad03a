"""The cosine family's ``torch.library`` op: schema, fake and autograd, written once."""
from __future__ import annotations

from typing import Callable

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def _negative_cosine_fake(x0, x1, eps, with_gradient):
    dtype = compute_dtype(x0, x1)
    return (x0.new_empty((), dtype=dtype), *library.gradient_fakes(with_gradient, (x0, x1), dtype))


def define_negative_cosine_op(name: str, forward: Callable) -> Callable:
    """Register ``fastssl::<name>(x0, x1, eps, with_gradient) -> (loss, ∂loss/∂x0, ∂loss/∂x1)``.

    ``forward(x0, x1, eps, with_gradient)`` returns the 0-dim loss and, when ``with_gradient``,
    both gradients in the compute dtype (empty tensors otherwise); the backward only scales them.
    Returns ``core(x0, x1, eps)`` → loss, with ``reference``'s signature; the op is ``core.op``.
    """
    return library.define_precomputed_gradient_op(name, "Tensor x0, Tensor x1, float eps", 2, 0, forward,
                                                  _negative_cosine_fake)
