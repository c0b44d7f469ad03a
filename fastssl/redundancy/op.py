"""The redundancy family's ``torch.library`` op factory: schema, fake and autograd, written once.

Barlow Twins and VICReg are losses of two views; each backend (torch, triton, native) defines its
op through :func:`define_two_view_op` with its own forward, saved statistics and backward.
VICRegL's nearest-neighbour search (:func:`define_nearest_neighbors_op`) returns indices only.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def define_two_view_op(name: str, parameters: str, forward: Callable, forward_fake: Callable,
                       backward: Callable) -> Callable:
    """Register ``fastssl::<name>`` and ``fastssl::<name>_backward`` for a loss of two views.

    ``parameters``: the schema of the arguments after ``Tensor z_a, Tensor z_b``.
    ``forward(z_a, z_b, *params)`` returns (loss, stats, products), the last two being what the
    backward needs (saved, not differentiable); ``backward(grad, stats, products, z_a, z_b,
    *params)`` returns the gradients of z_a and z_b. Returns the core ``(z_a, z_b, *params) ->
    loss`` (the op is its ``.op``).
    """
    inputs = f"Tensor z_a, Tensor z_b, {parameters}"
    op = library.define(name, f"({inputs}) -> (Tensor, Tensor, Tensor)", forward, forward_fake)
    backward_op = library.define(f"{name}_backward", f"(Tensor grad, Tensor stats, Tensor products, {inputs}) -> (Tensor, Tensor)",
                                 backward, lambda grad, stats, products, z_a, z_b, *params: (torch.empty_like(z_a), torch.empty_like(z_b)))

    def setup_context(ctx, inputs, output):
        ctx.params = inputs[2:]
        ctx.set_materialize_grads(False)  # no zero-filled gradients for the saved outputs
        ctx.save_for_backward(output[1], output[2], inputs[0], inputs[1])
        ctx.mark_non_differentiable(output[1], output[2])

    def autograd_backward(ctx, grad, _grad_stats, _grad_products):
        if grad is None:  # the loss is not part of the graph being differentiated
            return (None,) * (2 + len(ctx.params))
        grad_a, grad_b = backward_op(grad, *ctx.saved_tensors, *ctx.params)
        return (grad_a, grad_b) + (None,) * len(ctx.params)

    library.register_autograd(op, autograd_backward, setup_context)

    def core(z_a, z_b, *params):
        return op(z_a, z_b, *params)[0]

    core.op = op
    return core


def define_nearest_neighbors_op(name: str, impl: Callable) -> Callable:
    """Register ``fastssl::<name>`` with ``reference.mutual_nearest_neighbors``'s signature: indices
    and distances only, no gradient (the losses gather the matched rows outside the op)."""

    def fake(a, b):
        dtype = compute_dtype(a, b)
        batch, sets, rows_a, rows_b = a.shape[0], b.shape[1], a.shape[1], b.shape[2]
        return (a.new_empty(batch, sets, rows_a, dtype=torch.long), a.new_empty(batch, sets, rows_a, dtype=dtype),
                a.new_empty(batch, sets, rows_b, dtype=torch.long), a.new_empty(batch, sets, rows_b, dtype=dtype))

    return library.define(name, "(Tensor a, Tensor b) -> (Tensor, Tensor, Tensor, Tensor)", impl, fake)
