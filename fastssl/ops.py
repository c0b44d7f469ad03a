"""``torch.library`` registration of the loss cores, and their backend table.

Each core op is a ``torch.library.custom_op`` in the ``fastssl`` namespace with a fake (meta)
implementation and an autograd formula, so that ``torch.compile(fullgraph=True)`` traces through
it and ``torch.library.opcheck`` passes. The backward is an op of its own
(``fastssl::<name>_backward``), so a compiled graph holds two opaque calls and nothing else.

The ``torch`` backend of every core is registered here. Until a kernel issue gives an op a
fused algorithm, its forward runs the reference formula without building an autograd graph and
its backward recomputes the forward under ``torch.func.vjp``: the N×M / D×D intermediates live
only inside one call instead of being saved between forward and backward.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import backends, contrastive, reference

_OP_SCHEMAS = {
    "barlow_twins": "(Tensor z_a, Tensor z_b, float lambda_param) -> Tensor",
    "vicreg_variance_covariance": "(Tensor z_a, Tensor z_b, float eps) -> Tensor",
    "soft_cross_entropy_pairs": "(Tensor targets, Tensor logits, float scale) -> Tensor",
    "negative_cosine_similarity": "(Tensor x0, Tensor x1, float eps) -> Tensor",
    "sinkhorn": "(Tensor scores, int iterations, float epsilon, Tensor? row_marginals, "
    "Tensor? col_marginals, float tolerance, bool gather_distributed) -> Tensor",
}


def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _empty_grad(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)


def define_recompute_op(name: str, impl: Callable, fake: Callable, differentiable: Sequence[int]):
    """Define ``fastssl::<name>`` running ``impl``, with a backward op that recomputes it.

    ``differentiable``: positions of the tensor arguments that receive gradients (an absent
    optional tensor gets none). Returns the forward op.
    """
    schema = _OP_SCHEMAS[name]
    op = torch.library.custom_op(f"fastssl::{name}", mutates_args=(), schema=schema)(impl)
    op.register_fake(fake)
    if not differentiable:
        return op

    arguments = schema[1 : schema.index(") ->")]
    backward_schema = f"(Tensor[] grad_outputs, {arguments}) -> Tensor[]"

    def backward_impl(grad_outputs, *args):
        present = [i for i in differentiable if args[i] is not None]

        def forward(*primals):
            full = list(args)
            for i, primal in zip(present, primals):
                full[i] = primal
            return _as_tuple(impl(*full))

        _, vjp = torch.func.vjp(forward, *[args[i] for i in present])
        grads = dict(zip(present, vjp(tuple(grad_outputs))))
        return [grads[i] if i in grads else _empty_grad(args[0]) for i in differentiable]

    def backward_fake(grad_outputs, *args):
        return [torch.empty_like(args[i]) if args[i] is not None else _empty_grad(args[0])
                for i in differentiable]

    backward_op = torch.library.custom_op(
        f"fastssl::{name}_backward", mutates_args=(), schema=backward_schema
    )(backward_impl)
    backward_op.register_fake(backward_fake)

    def setup_context(ctx, inputs, output):
        tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)]
        ctx.tensor_positions = tensor_positions
        ctx.constants = [None if i in tensor_positions else x for i, x in enumerate(inputs)]
        ctx.save_for_backward(*[inputs[i] for i in tensor_positions])

    def backward(ctx, *grad_outputs):
        args = list(ctx.constants)
        for i, saved in zip(ctx.tensor_positions, ctx.saved_tensors):
            args[i] = saved
        grads = backward_op(list(grad_outputs), *args)
        result = [None] * len(args)
        for i, grad in zip(differentiable, grads):
            if args[i] is not None:
                result[i] = grad
        return tuple(result)

    op.register_autograd(backward, setup_context=setup_context)
    return op


# --- fake (shape) functions: outputs are float32, float64 for float64 inputs -----------------
def _info_nce_fake(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
    dtype = reference.compute_dtype(query, keys, positive_keys)
    cols = keys.shape[0] if symmetric else 0
    return query.new_empty(query.shape[0], dtype=dtype), query.new_empty(cols, dtype=dtype)


def _scalar_fake(a, b, *_):
    return a.new_empty((), dtype=reference.compute_dtype(a, b))


def _vicreg_fake(z_a, z_b, eps):
    return z_a.new_empty(2, dtype=reference.compute_dtype(z_a, z_b))


def _pairs_fake(targets, logits, scale):
    return logits.new_empty(targets.shape[0], logits.shape[0], dtype=reference.compute_dtype(targets, logits))


def _sinkhorn_fake(scores, *_):
    return torch.empty_like(scores)


# --- contrastive: NT-Xent / InfoNCE --------------------------------------------------------
_INFO_NCE_INPUTS = ("Tensor query, Tensor keys, Tensor? positive_keys, Tensor? query_labels, Tensor? key_labels, "
                    "Tensor? self_index")


def define_info_nce_op(name: str, forward: Callable, backward: Callable) -> Callable:
    """Register a fused InfoNCE (``fastssl::<name>`` and ``fastssl::<name>_backward``).

    ``forward(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric)``
    returns (row_loss (N,), col_loss (M,) or (0,), row_stats (2, N), col_stats (2, M) or (2, 0)):
    the losses and, for the backward, each row's (column's) max logit and exp-sum.
    ``backward(grad_row, grad_col, <inputs>, row_stats, col_stats, scale, symmetric)`` returns
    the gradients of query, keys and positive_keys (None when absent).
    Returns a function with ``reference.info_nce``'s signature and outputs.
    """
    op = torch.library.custom_op(
        f"fastssl::{name}", mutates_args=(),
        schema=f"({_INFO_NCE_INPUTS}, float scale, bool symmetric) -> (Tensor, Tensor, Tensor, Tensor)",
    )(forward)

    @op.register_fake
    def _(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
        row_loss, col_loss = _info_nce_fake(query, keys, positive_keys, query_labels, key_labels, self_index,
                                            scale, symmetric)
        return row_loss, col_loss, row_loss.new_empty(2, row_loss.shape[0]), col_loss.new_empty(2, col_loss.shape[0])

    def backward_impl(grad_row, grad_col, query, keys, positive_keys, *rest):
        grad_query, grad_keys, grad_positive_keys = backward(grad_row, grad_col, query, keys, positive_keys, *rest)
        return grad_query, grad_keys, grad_positive_keys if grad_positive_keys is not None else _empty_grad(query)

    backward_op = torch.library.custom_op(
        f"fastssl::{name}_backward", mutates_args=(),
        schema=f"(Tensor grad_row, Tensor grad_col, {_INFO_NCE_INPUTS}, Tensor row_stats, Tensor col_stats, "
               "float scale, bool symmetric) -> (Tensor, Tensor, Tensor)",
    )(backward_impl)

    @backward_op.register_fake
    def _(grad_row, grad_col, query, keys, positive_keys, *rest):
        return (torch.empty_like(query), torch.empty_like(keys),
                torch.empty_like(positive_keys) if positive_keys is not None else _empty_grad(query))

    def setup_context(ctx, inputs, output):
        query, keys, positive_keys, query_labels, key_labels, self_index, ctx.scale, ctx.symmetric = inputs
        ctx.save_for_backward(query, keys, positive_keys, query_labels, key_labels, self_index, output[2], output[3])
        ctx.mark_non_differentiable(output[2], output[3])

    def autograd_backward(ctx, grad_row, grad_col, _grad_row_stats, _grad_col_stats):
        *inputs, row_stats, col_stats = ctx.saved_tensors
        grad_query, grad_keys, grad_positive_keys = backward_op(
            grad_row, grad_col, *inputs, row_stats, col_stats, ctx.scale, ctx.symmetric)
        return (grad_query, grad_keys, grad_positive_keys if inputs[2] is not None else None,
                None, None, None, None, None)

    op.register_autograd(autograd_backward, setup_context=setup_context)

    def info_nce_core(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
        row_loss, col_loss, _, _ = op(query, keys, positive_keys, query_labels, key_labels, self_index,
                                      scale, symmetric)
        return row_loss, col_loss

    info_nce_core.op = op
    return info_nce_core


info_nce = define_info_nce_op("info_nce", contrastive.info_nce_forward, contrastive.info_nce_backward)
backends.register("info_nce", "torch", info_nce)

# --- redundancy reduction: Barlow Twins, VICReg ---------------------------------------------
barlow_twins = define_recompute_op("barlow_twins", reference.barlow_twins, _scalar_fake, differentiable=(0, 1))
vicreg_variance_covariance = define_recompute_op(
    "vicreg_variance_covariance", reference.vicreg_variance_covariance, _vicreg_fake, differentiable=(0, 1)
)
backends.register("barlow_twins", "torch", barlow_twins)
backends.register("vicreg_variance_covariance", "torch", vicreg_variance_covariance)

# --- clustering & distillation: Sinkhorn-Knopp, SwAV / DINO cross-entropy ---------------------
sinkhorn = define_recompute_op("sinkhorn", reference.sinkhorn, _sinkhorn_fake, differentiable=())
soft_cross_entropy_pairs = define_recompute_op(
    "soft_cross_entropy_pairs", reference.soft_cross_entropy_pairs, _pairs_fake, differentiable=(0, 1)
)
backends.register("sinkhorn", "torch", sinkhorn)
backends.register("soft_cross_entropy_pairs", "torch", soft_cross_entropy_pairs)

# --- BYOL / SimSiam ------------------------------------------------------------------------
negative_cosine_similarity = define_recompute_op(
    "negative_cosine_similarity", reference.negative_cosine_similarity, _scalar_fake, differentiable=(0, 1)
)
backends.register("negative_cosine_similarity", "torch", negative_cosine_similarity)

for _name in ("info_nce", "barlow_twins", "vicreg_variance_covariance", "sinkhorn", "soft_cross_entropy_pairs",
              "negative_cosine_similarity"):
    backends.register(_name, "reference", getattr(reference, _name))
