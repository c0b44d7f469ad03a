"""The spectral family's ``torch.library`` ops: schema, fake and autograd, written once."""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def _scalar_fake(x, *rest):
    return x.new_empty((), dtype=compute_dtype(x))


def define_unary_op(name: str, arguments: str, forward: Callable, backward: Callable, fake: Callable) -> Callable:
    """Register ``fastssl::<name>(Tensor x, <arguments>) -> Tensor`` and its ``_backward``.

    ``forward(x, *args)`` returns the result (compute dtype, shape from ``fake``);
    ``backward(grad, x, result, *args)`` the gradient of x in its dtype. The input, the result
    and the non-tensor ``args`` are kept for the backward. Returns the op.
    """
    extra = f", {arguments}" if arguments else ""
    op = library.define(name, f"(Tensor x{extra}) -> Tensor", forward, fake)
    backward_op = library.define(f"{name}_backward", f"(Tensor grad, Tensor x, Tensor result{extra}) -> Tensor",
                                 backward, lambda grad, x, *rest: torch.empty_like(x))

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0], output)
        ctx.arguments = inputs[1:]

    def autograd_backward(ctx, grad):
        x, result = ctx.saved_tensors
        return (backward_op(grad, x, result, *ctx.arguments),) + (None,) * len(ctx.arguments)

    library.register_autograd(op, autograd_backward, setup_context)
    return op


def define_nuclear_norm_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """``fastssl::<name>(x (..., m, n)) -> (...)``: the nuclear norm of each trailing matrix."""
    return define_unary_op(name, "", forward, backward,
                           lambda x: x.new_empty(x.shape[:-2], dtype=compute_dtype(x)))


def define_pairwise_uniformity_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """``fastssl::<name>(x (N, D), float t) -> ()``: log mean_{i<j} exp(−t‖x_i − x_j‖²)."""
    return define_unary_op(name, "float t", forward, backward, _scalar_fake)
