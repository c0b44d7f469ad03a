"""The distillation family's ``torch.library`` ops: schema, fake and autograd, written once, for
every backend's soft-target cross-entropy of crop pairs (the native extension's C++ ops get their
fakes and autograd here too: ``set_python_module("fastssl.distillation.op")``)."""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def define_pair_loss_op(name: str, inputs: str, forward: Callable, backward: Callable) -> Callable:
    """Register a soft-target cross-entropy of crop pairs (``fastssl::<name>`` and ``_backward``).

    ``inputs``: the schema of the tensor arguments, the first being ``targets`` (T, B, K) and
    the second the student crops (S, B, ...); a ``float scale`` follows them.
    ``forward(*tensors, scale)`` returns (loss (T, S), student LSE (S, B)), the LSE saved for
    ``backward(grad_loss, *tensors, lse, scale, needs_grad)``, which returns one gradient per
    tensor (an empty tensor where ``needs_grad`` is False). Returns the core ``(*tensors,
    scale) -> loss`` (the op is its ``.op``).
    """
    op = library.define(name, f"({inputs}, float scale) -> (Tensor, Tensor)", forward)
    backward_op = library.define(
        f"{name}_backward", f"(Tensor grad_loss, {inputs}, Tensor lse, float scale, bool[] needs_grad) -> Tensor[]",
        backward)
    return register_pair_loss_op(op, backward_op)


def register_pair_loss_op(op, backward_op) -> Callable:
    """Fake functions and autograd of a pair-loss op and its backward op, with the schemas of
    :func:`define_pair_loss_op`: ops made there, or the C++ ops of the native
    extension (whose schemas name this module as the home of their fakes). Returns the core ``(*tensors, scale) -> loss``.
    """
    @torch.library.register_fake(op)
    def _(targets, students, *rest):
        dtype = compute_dtype(targets, students, *rest[:-1])
        return (targets.new_empty(targets.shape[0], students.shape[0], dtype=dtype),
                targets.new_empty(students.shape[0], students.shape[1], dtype=dtype))

    @torch.library.register_fake(backward_op)
    def _(grad_loss, *args):
        tensors, needs_grad = args[:-3], args[-1]
        return [torch.empty_like(t) if need else library.empty_grad(t) for t, need in zip(tensors, needs_grad)]

    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[-1]
        ctx.save_for_backward(*inputs[:-1], output[1])
        ctx.mark_non_differentiable(output[1])

    def autograd_backward(ctx, grad_loss, _grad_lse):
        *tensors, lse = ctx.saved_tensors
        needs_grad = list(ctx.needs_input_grad[:-1])
        grads = backward_op(grad_loss, *tensors, lse, ctx.scale, needs_grad)
        return tuple(g if need else None for g, need in zip(grads, needs_grad)) + (None,)

    library.register_autograd(op, autograd_backward, setup_context)

    def pair_loss_core(*args):
        return op(*args)[0]

    pair_loss_core.op = op
    return pair_loss_core


def define_anchor_terms_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register MSN's anchor terms (``fastssl::<name>`` and ``_backward``): the cross-entropy of
    the anchors' prototype softmax to their targets and the anchors' mean prototype probabilities.

    ``forward(targets (B, K), anchors (V·B, D), prototypes (K, D), scale)`` returns
    (cross-entropy (), mean probabilities (K,), anchor LSE (V·B,)), the LSE saved for
    ``backward(grad_cross_entropy, grad_mean_probs, targets, anchors, prototypes, lse, scale,
    needs_grad)``, which returns one gradient per tensor (an empty tensor where not needed).
    Returns the core ``(targets, anchors, prototypes, scale) -> (cross-entropy, mean
    probabilities)`` (the op is its ``.op``).
    """
    op = library.define(name, "(Tensor targets, Tensor anchors, Tensor prototypes, float scale) "
                              "-> (Tensor, Tensor, Tensor)", forward)
    backward_op = library.define(
        f"{name}_backward", "(Tensor grad_cross_entropy, Tensor grad_mean_probs, Tensor targets, Tensor anchors, "
                            "Tensor prototypes, Tensor lse, float scale, bool[] needs_grad) -> Tensor[]", backward)

    @torch.library.register_fake(op)
    def _(targets, anchors, prototypes, scale):
        dtype = compute_dtype(targets, anchors, prototypes)
        return (anchors.new_empty((), dtype=dtype), anchors.new_empty(prototypes.shape[0], dtype=dtype),
                anchors.new_empty(anchors.shape[0], dtype=dtype))

    @torch.library.register_fake(backward_op)
    def _(grad_cross_entropy, grad_mean_probs, targets, anchors, prototypes, lse, scale, needs_grad):
        return [torch.empty_like(t) if need else library.empty_grad(t)
                for t, need in zip((targets, anchors, prototypes), needs_grad)]

    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[-1]
        ctx.save_for_backward(*inputs[:-1], output[2])
        ctx.mark_non_differentiable(output[2])

    def autograd_backward(ctx, grad_cross_entropy, grad_mean_probs, _grad_lse):
        needs_grad = list(ctx.needs_input_grad[:-1])
        grads = backward_op(grad_cross_entropy, grad_mean_probs, *ctx.saved_tensors, ctx.scale, needs_grad)
        return tuple(g if need else None for g, need in zip(grads, needs_grad)) + (None,)

    library.register_autograd(op, autograd_backward, setup_context)

    def anchor_terms_core(targets, anchors, prototypes, scale):
        cross_entropy, mean_probs, _ = op(targets, anchors, prototypes, scale)
        return cross_entropy, mean_probs

    anchor_terms_core.op = op
    return anchor_terms_core


def define_fused_loss_op(name: str, tensors: str, params: str, saved: int, forward: Callable, backward: Callable,
                         saved_fakes: Callable) -> Callable:
    """Register a 0-dim loss with a hand-written backward (``fastssl::<name>`` and ``_backward``):
    the fused last layer + cross-entropy cores, whose backward remakes the logits tile by tile.

    ``tensors``: the schema of the tensor arguments (``Tensor?`` for optional ones), ``params``: of
    the others. ``forward(*tensors, *params)`` returns (loss, *saved): ``saved`` tensors of
    statistics per row or column (never one of the logits' size) for ``backward(grad_loss,
    *tensors, *saved, *params, needs_grad)``, which returns one gradient per tensor argument (an
    empty tensor where ``needs_grad`` is False). ``saved_fakes(*tensors, *params)``: empty tensors
    shaped as the saved ones. Returns the core ``(*tensors, *params) -> loss`` (the op is its ``.op``).
    """
    count = len(tensors.split(","))
    saved_schema = ", ".join(f"Tensor saved{i}" for i in range(saved))
    op = library.define(name, f"({tensors}, {params}) -> ({', '.join(['Tensor'] * (1 + saved))})", forward)
    backward_op = library.define(
        f"{name}_backward", f"(Tensor grad_loss, {tensors}, {saved_schema}, {params}, bool[] needs_grad) -> Tensor[]",
        backward)

    @torch.library.register_fake(op)
    def _(*args):
        dtype = compute_dtype(*[t for t in args[:count] if isinstance(t, torch.Tensor) and t.is_floating_point()])
        return (args[0].new_empty((), dtype=dtype), *saved_fakes(*args))

    @torch.library.register_fake(backward_op)
    def _(grad_loss, *args):
        return [torch.empty_like(t) if need else library.empty_grad(grad_loss)
                for t, need in zip(args[:count], args[-1])]

    def setup_context(ctx, inputs, output):
        ctx.params = inputs[count:]
        ctx.save_for_backward(*inputs[:count], *output[1:])
        ctx.mark_non_differentiable(*output[1:])

    def autograd_backward(ctx, grad_loss, *_unused):
        tensors = ctx.saved_tensors
        needs_grad = list(ctx.needs_input_grad[:count])
        grads = backward_op(grad_loss, *tensors, *ctx.params, needs_grad)
        return tuple(g if need else None for g, need in zip(grads, needs_grad)) + (None,) * len(ctx.params)

    library.register_autograd(op, autograd_backward, setup_context)

    def fused_loss_core(*args):
        return op(*args)[0]

    fused_loss_core.op = op
    return fused_loss_core
