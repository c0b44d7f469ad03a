"""The cosine family's ``torch.library`` op: schema, fake and autograd, written once."""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def define_negative_cosine_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register ``fastssl::<name>(x0, x1, eps) -> loss`` and its ``_backward``.

    ``forward(x0, x1, eps)`` returns the 0-dim loss (compute dtype); ``backward(grad, x0, x1, eps)``
    the gradients of x0 and x1 in their dtypes. Returns the op, with ``reference``'s signature.
    """
    op = library.define(name, "(Tensor x0, Tensor x1, float eps) -> Tensor", forward,
                        lambda x0, x1, eps: x0.new_empty((), dtype=compute_dtype(x0, x1)))
    backward_op = library.define(f"{name}_backward", "(Tensor grad, Tensor x0, Tensor x1, float eps) -> (Tensor, Tensor)",
                                 backward, lambda grad, x0, x1, eps: (torch.empty_like(x0), torch.empty_like(x1)))

    def setup_context(ctx, inputs, output):
        x0, x1, ctx.eps = inputs
        ctx.save_for_backward(x0, x1)

    def autograd_backward(ctx, grad):
        grad_x0, grad_x1 = backward_op(grad, *ctx.saved_tensors, ctx.eps)
        return grad_x0, grad_x1, None

    library.register_autograd(op, autograd_backward, setup_context)
    return op
