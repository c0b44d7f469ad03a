"""The contrastive family's ``torch.library`` ops: schema, fake and autograd, written once.

Each backend (torch, triton) instantiates these factories with its own forward and backward, so a
compiled graph holds two opaque calls (``fastssl::<name>`` and ``fastssl::<name>_backward``) and
``torch.library.opcheck`` checks every backend against the same schema.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..runtime import library
from ..runtime.dtypes import compute_dtype


def _info_nce_fake(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
    dtype = compute_dtype(query, keys, positive_keys)
    cols = keys.shape[0] if symmetric else 0
    return query.new_empty(query.shape[0], dtype=dtype), query.new_empty(cols, dtype=dtype)


_INFO_NCE_INPUTS = ("Tensor query, Tensor keys, Tensor? positive_keys, Tensor? query_labels, Tensor? key_labels, "
                    "Tensor? self_index")


def define_info_nce_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register a fused InfoNCE (``fastssl::<name>`` and ``fastssl::<name>_backward``).

    ``forward(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric)``
    returns (row_loss (N,), col_loss (M,) or (0,), row_stats (2, N), col_stats (2, M) or (2, 0)):
    the losses and, for the backward, each row's (column's) max logit and exp-sum.
    ``backward(grad_row, grad_col, <inputs>, row_stats, col_stats, scale, symmetric, keys_grad)``
    returns the gradients of query, keys and positive_keys (None when absent); without
    ``keys_grad`` (MoCo's queue) the keys' gradient is not computed (an empty tensor), which
    saves one of the backward's three N×M×D GEMMs.
    Returns a function with ``reference.info_nce``'s signature and outputs.
    """
    op = library.define(
        name, f"({_INFO_NCE_INPUTS}, float scale, bool symmetric) -> (Tensor, Tensor, Tensor, Tensor)", forward)

    @torch.library.register_fake(op)
    def _(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
        row_loss, col_loss = _info_nce_fake(query, keys, positive_keys, query_labels, key_labels, self_index,
                                            scale, symmetric)
        return row_loss, col_loss, row_loss.new_empty(2, row_loss.shape[0]), col_loss.new_empty(2, col_loss.shape[0])

    def backward_impl(grad_row, grad_col, query, keys, positive_keys, *rest):
        grad_query, grad_keys, grad_positive_keys = backward(grad_row, grad_col, query, keys, positive_keys, *rest)
        return grad_query, grad_keys, grad_positive_keys if grad_positive_keys is not None else library.empty_grad(query)

    backward_op = library.define(
        f"{name}_backward",
        f"(Tensor grad_row, Tensor grad_col, {_INFO_NCE_INPUTS}, Tensor row_stats, Tensor col_stats, "
        "float scale, bool symmetric, bool keys_grad) -> (Tensor, Tensor, Tensor)", backward_impl)

    @torch.library.register_fake(backward_op)
    def _(grad_row, grad_col, query, keys, positive_keys, *rest):
        keys_grad = rest[-1]
        return (torch.empty_like(query), torch.empty_like(keys) if keys_grad else library.empty_grad(keys),
                torch.empty_like(positive_keys) if positive_keys is not None else library.empty_grad(query))

    def setup_context(ctx, inputs, output):
        query, keys, positive_keys, query_labels, key_labels, self_index, ctx.scale, ctx.symmetric = inputs
        ctx.save_for_backward(query, keys, positive_keys, query_labels, key_labels, self_index, output[2], output[3])
        ctx.mark_non_differentiable(output[2], output[3])

    def autograd_backward(ctx, grad_row, grad_col, _grad_row_stats, _grad_col_stats):
        *inputs, row_stats, col_stats = ctx.saved_tensors
        keys_grad = ctx.needs_input_grad[1]
        grad_query, grad_keys, grad_positive_keys = backward_op(
            grad_row, grad_col, *inputs, row_stats, col_stats, ctx.scale, ctx.symmetric, keys_grad)
        return (grad_query, grad_keys if keys_grad else None, grad_positive_keys if inputs[2] is not None else None,
                None, None, None, None, None)

    library.register_autograd(op, autograd_backward, setup_context)

    def info_nce_core(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
        row_loss, col_loss, _, _ = op(query, keys, positive_keys, query_labels, key_labels, self_index,
                                      scale, symmetric)
        return row_loss, col_loss

    info_nce_core.op = op
    return info_nce_core


def define_info_nce_self_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register SimCLR's self-similarity InfoNCE (``fastssl::<name>`` and ``_backward``).

    ``forward(embeddings, labels, exclude_self, scale)`` returns (row_loss (N,), stats (2, N)):
    each row's loss and, for ``backward(grad_row, embeddings, labels, stats, exclude_self, scale)``
    (the embeddings' gradient), its max logit and exp-sum. Returns a function with
    ``reference.info_nce_self``'s signature.
    """
    op = library.define(name, "(Tensor embeddings, Tensor labels, bool exclude_self, float scale) -> (Tensor, Tensor)",
                        forward)

    @torch.library.register_fake(op)
    def _(embeddings, labels, exclude_self, scale):
        n, dtype = embeddings.shape[0], compute_dtype(embeddings)
        return embeddings.new_empty(n, dtype=dtype), embeddings.new_empty(2, n, dtype=dtype)

    backward_op = library.define(
        f"{name}_backward",
        "(Tensor grad_row, Tensor embeddings, Tensor labels, Tensor stats, bool exclude_self, float scale) -> Tensor",
        backward, lambda grad_row, embeddings, *rest: torch.empty_like(embeddings))

    def setup_context(ctx, inputs, output):
        embeddings, labels, ctx.exclude_self, ctx.scale = inputs
        ctx.save_for_backward(embeddings, labels, output[1])
        ctx.mark_non_differentiable(output[1])

    def autograd_backward(ctx, grad_row, _grad_stats):
        embeddings, labels, stats = ctx.saved_tensors
        return backward_op(grad_row, embeddings, labels, stats, ctx.exclude_self, ctx.scale), None, None, None

    library.register_autograd(op, autograd_backward, setup_context)

    def info_nce_self_core(embeddings, labels, exclude_self, scale):
        return op(embeddings, labels, exclude_self, scale)[0]

    info_nce_self_core.op = op
    return info_nce_self_core
