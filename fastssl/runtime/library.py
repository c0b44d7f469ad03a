"""The ``fastssl`` op namespace: every op is defined here, with its fake and autograd, once.

Ops are defined with ``torch.library.Library`` (schema + a ``CompositeExplicitAutograd``
kernel), ``register_fake`` and ``register_autograd``, not with ``torch.library.custom_op``: a
custom op's first eager call imports ``torch._dynamo`` (and with it Triton, Inductor and sympy,
~170 MB and >1 s), which an eager CPU loss must not pay. These ops still trace under
``torch.compile(fullgraph=True)`` and pass ``torch.library.opcheck``.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

# Held for the life of the process: dropping a Library object drops its registrations.
_LIBRARY = torch.library.Library("fastssl", "FRAGMENT")


def define(name: str, schema: str, impl: Callable, fake: Optional[Callable] = None) -> torch._ops.OpOverload:
    """Define ``fastssl::<name><schema>`` running ``impl`` on every device; returns the op."""
    _LIBRARY.define(name + schema)
    _LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    op = getattr(torch.ops.fastssl, name).default
    if fake is not None:
        torch.library.register_fake(op)(fake)
    return op


def register_autograd(op, backward: Callable, setup_context: Callable) -> None:
    """``torch.library.register_autograd`` for an op defined here or by the native extension."""
    torch.library.register_autograd(op, backward, setup_context=setup_context)


def empty_grad(like: torch.Tensor) -> torch.Tensor:
    """The placeholder an op returns for a gradient nobody asked for (schemas return Tensors)."""
    return like.new_empty(0)


def gradients_or_empty(with_gradient: bool, like: Sequence[torch.Tensor], compute: Callable) -> Tuple[torch.Tensor, ...]:
    """``compute()``'s gradients, or an empty placeholder per input of ``like`` without the gradient
    (the outputs of a ``define_precomputed_gradient_op`` forward)."""
    return tuple(compute()) if with_gradient else tuple(empty_grad(t) for t in like)


def gradient_fakes(with_gradient: bool, like: Sequence[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """The fake gradient outputs of a ``define_precomputed_gradient_op`` op: one per input of ``like``."""
    return [torch.empty_like(t, dtype=dtype) if with_gradient else empty_grad(t) for t in like]


def _define_once_differentiable(name: str, schema: str, forward: Callable, fake: Callable, differentiable: int,
                                first_gradient: int, loss_per_index: bool) -> torch._ops.OpOverload:
    """Define ``fastssl::<name><schema>`` (output 0 the loss, outputs ``first_gradient:`` the
    forward's ∂loss/∂input for its first ``differentiable`` inputs) with the autograd both factories
    below share: the backward only scales those gradients by the loss's. ``loss_per_index``: the
    loss may hold one entry per leading index of the gradients (the scale broadcasts over the rest)."""
    op = define(name, schema, forward, fake)

    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        ctx.input_dtypes = [t.dtype if isinstance(t, torch.Tensor) else None for t in inputs[:differentiable]]
        ctx.num_inputs = len(inputs)
        ctx.save_for_backward(*output[first_gradient:])
        ctx.mark_non_differentiable(*output[1:])

    def scaled(grad_loss, gradient):
        if loss_per_index and grad_loss.dim():  # a 0-dim scale broadcasts as it is: no reshape op
            grad_loss = grad_loss.reshape(grad_loss.shape + (1,) * (gradient.dim() - grad_loss.dim()))
        return grad_loss * gradient

    def autograd_backward(ctx, grad_loss, *_unused):
        if grad_loss is None or not any(ctx.needs_input_grad[:differentiable]):  # nothing to scale
            return (None,) * ctx.num_inputs
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError(f"fastssl::{name} is differentiable once: its gradients are computed in closed form "
                               "without a graph, so backward(create_graph=True) through it is not supported")
        gradients = tuple(scaled(grad_loss, g).to(dtype) if need else None
                          for g, dtype, need in zip(ctx.saved_tensors, ctx.input_dtypes, ctx.needs_input_grad))
        return gradients + (None,) * (ctx.num_inputs - differentiable)

    register_autograd(op, autograd_backward, setup_context)
    return op


def define_precomputed_gradient_op(name: str, inputs: str, differentiable: int, extra_outputs: int,
                                   forward: Callable, fake: Callable) -> Callable:
    """Register ``fastssl::<name>(<inputs>, bool with_gradient=True) -> (loss, *extras, *gradients)``.

    For losses whose gradient has a closed form that costs less than autograd through their
    forward (no graph, no recompute): ``forward(*inputs, with_gradient)`` returns the loss (0-dim,
    or one per leading index of the first input: the gradient is then that entry's),
    ``extra_outputs`` tensors without gradient (TiCo's covariance state) and, when
    ``with_gradient``, ∂loss/∂input for each of the first ``differentiable`` inputs in the compute
    dtype (empty tensors otherwise); the backward only scales them. ``fake`` gives the same
    outputs' shapes. Returns ``core(*inputs)`` → loss (or (loss, *extras)), which asks for the
    gradients exactly when autograd will need them; the op is its ``.op``. Once differentiable:
    the precomputed gradients carry no graph, so a double backward (``create_graph=True``) through
    these ops would miss every second-order term and raises instead.
    """
    outputs = ", ".join(["Tensor"] * (1 + extra_outputs + differentiable))
    count = len(inputs.split(","))

    def with_default(function):  # the dispatcher drops a trailing argument that equals its default
        return lambda *args: function(*args, *([True] if len(args) == count else []))

    op = _define_once_differentiable(name, f"({inputs}, bool with_gradient=True) -> ({outputs})",
                                     with_default(forward), with_default(fake), differentiable,
                                     1 + extra_outputs, loss_per_index=True)

    def core(*args):
        with_gradient = torch.is_grad_enabled() and any(t.requires_grad for t in args[:differentiable])
        result = op(*args, with_gradient)
        return result[0] if extra_outputs == 0 else tuple(result[:1 + extra_outputs])

    core.op = op
    return core


def define_needed_gradients_op(name: str, tensors: str, params: str, forward: Callable,
                                    fake: Callable) -> Callable:
    """Register ``fastssl::<name>(<tensors>, <params>, bool[]? needs_grad=None) -> (loss, *gradients)``:
    a 0-dim loss whose forward also makes ∂loss/∂tensor for each tensor argument ``needs_grad``
    flags (None: every tensor given), in the compute dtype (empty tensors elsewhere); the
    backward only scales them. For losses whose inputs often take no gradient (a distillation
    teacher, BYOL's detached target) and whose gradients each cost passes or GEMMs the forward
    shares (the fused last layer + cross-entropy reuses its logits).

    Unlike ``define_precomputed_gradient_op`` (one flag for every gradient), a flag per tensor. ``forward`` and ``fake`` take ``(*tensors, *params, needs_grad=None)``. Returns the
    core ``(*tensors, *params) -> loss``, which asks for exactly the gradients autograd will need
    (the op is its ``.op``). Differentiable once: the gradients carry no graph.
    """
    count = len(tensors.split(","))
    op = _define_once_differentiable(
        name, f"({tensors}, {params}, bool[]? needs_grad=None) -> ({', '.join(['Tensor'] * (1 + count))})",
        forward, fake, count, 1, loss_per_index=False)

    def precomputed_gradients_core(*args):
        grad_enabled = torch.is_grad_enabled()
        needs_grad = [grad_enabled and isinstance(t, torch.Tensor) and t.requires_grad for t in args[:count]]
        return op(*args, needs_grad)[0]

    precomputed_gradients_core.op = op
    return precomputed_gradients_core
