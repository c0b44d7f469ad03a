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

from . import backends, clustering, contrastive, redundancy, reference

_OP_SCHEMAS = {
    "negative_cosine_similarity": "(Tensor x0, Tensor x1, float eps) -> Tensor",
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


# --- contrastive: NT-Xent / InfoNCE --------------------------------------------------------
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
               "float scale, bool symmetric, bool keys_grad) -> (Tensor, Tensor, Tensor)",
    )(backward_impl)

    @backward_op.register_fake
    def _(grad_row, grad_col, query, keys, positive_keys, *rest):
        keys_grad = rest[-1]
        return (torch.empty_like(query), torch.empty_like(keys) if keys_grad else _empty_grad(keys),
                torch.empty_like(positive_keys) if positive_keys is not None else _empty_grad(query))

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

    op.register_autograd(autograd_backward, setup_context=setup_context)

    def info_nce_core(query, keys, positive_keys, query_labels, key_labels, self_index, scale, symmetric):
        row_loss, col_loss, _, _ = op(query, keys, positive_keys, query_labels, key_labels, self_index,
                                      scale, symmetric)
        return row_loss, col_loss

    info_nce_core.op = op
    return info_nce_core


info_nce = define_info_nce_op("info_nce", contrastive.info_nce_forward, contrastive.info_nce_backward)
backends.register("info_nce", "torch", info_nce)


@torch.library.custom_op("fastssl::info_nce_self", mutates_args=(),
                         schema="(Tensor embeddings, Tensor labels, bool exclude_self, float scale) -> (Tensor, Tensor)")
def _info_nce_self(embeddings, labels, exclude_self, scale):
    return contrastive.info_nce_self_forward(embeddings, labels, exclude_self, scale)


@_info_nce_self.register_fake
def _(embeddings, labels, exclude_self, scale):
    n, dtype = embeddings.shape[0], reference.compute_dtype(embeddings)
    return embeddings.new_empty(n, dtype=dtype), embeddings.new_empty(2, n, dtype=dtype)


@torch.library.custom_op("fastssl::info_nce_self_backward", mutates_args=(),
                         schema="(Tensor grad_row, Tensor embeddings, Tensor labels, Tensor stats, bool exclude_self, "
                                "float scale) -> Tensor")
def _info_nce_self_backward(grad_row, embeddings, labels, stats, exclude_self, scale):
    return contrastive.info_nce_self_backward(grad_row, embeddings, labels, stats, exclude_self, scale)


@_info_nce_self_backward.register_fake
def _(grad_row, embeddings, *rest):
    return torch.empty_like(embeddings)


def _info_nce_self_setup(ctx, inputs, output):
    embeddings, labels, ctx.exclude_self, ctx.scale = inputs
    ctx.save_for_backward(embeddings, labels, output[1])
    ctx.mark_non_differentiable(output[1])


def _info_nce_self_autograd(ctx, grad_row, _grad_stats):
    embeddings, labels, stats = ctx.saved_tensors
    return _info_nce_self_backward(grad_row, embeddings, labels, stats, ctx.exclude_self, ctx.scale), None, None, None


_info_nce_self.register_autograd(_info_nce_self_autograd, setup_context=_info_nce_self_setup)


def info_nce_self(embeddings, labels, exclude_self, scale):
    return _info_nce_self(embeddings, labels, exclude_self, scale)[0]


info_nce_self.op = _info_nce_self
backends.register("info_nce_self", "torch", info_nce_self)

# --- redundancy reduction: Barlow Twins, VICReg ---------------------------------------------
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
    op = torch.library.custom_op(f"fastssl::{name}", mutates_args=(),
                                 schema=f"({inputs}) -> (Tensor, Tensor, Tensor)")(forward)
    op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(
        f"fastssl::{name}_backward", mutates_args=(),
        schema=f"(Tensor grad, Tensor stats, Tensor products, {inputs}) -> (Tensor, Tensor)")(backward)

    @backward_op.register_fake
    def _(grad, stats, products, z_a, z_b, *params):
        return torch.empty_like(z_a), torch.empty_like(z_b)

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

    op.register_autograd(autograd_backward, setup_context=setup_context)

    def core(z_a, z_b, *params):
        return op(z_a, z_b, *params)[0]

    core.op = op
    return core


barlow_twins = define_two_view_op("barlow_twins", 'float lambda_param, str algorithm="auto"',
                                  redundancy.barlow_twins_forward, redundancy.barlow_twins_forward_fake,
                                  redundancy.barlow_twins_backward)
vicreg_variance_covariance = define_two_view_op(
    "vicreg_variance_covariance", 'float eps, str algorithm="auto"',
    redundancy.vicreg_variance_covariance_forward, redundancy.vicreg_variance_covariance_forward_fake,
    redundancy.vicreg_variance_covariance_backward)
backends.register("barlow_twins", "torch", barlow_twins)
backends.register("vicreg_variance_covariance", "torch", vicreg_variance_covariance)

# --- clustering & distillation: Sinkhorn-Knopp, SwAV / DINO cross-entropy ---------------------
def define_sinkhorn_op(name: str, impl: Callable) -> Callable:
    """Register ``fastssl::<name>`` with ``reference.sinkhorn``'s signature (codes carry no gradient)."""
    op = torch.library.custom_op(
        f"fastssl::{name}", mutates_args=(),
        schema="(Tensor scores, int iterations, float epsilon, Tensor? row_marginals, Tensor? col_marginals, "
               "float tolerance, bool gather_distributed) -> Tensor")(impl)

    @op.register_fake
    def _(scores, *_):
        return scores.new_empty(scores.shape)  # contiguous, whatever the layout of the scores

    return op


def define_pair_loss_op(name: str, inputs: str, forward: Callable, backward: Callable) -> Callable:
    """Register a soft-target cross-entropy of crop pairs (``fastssl::<name>`` and ``_backward``).

    ``inputs``: the schema of the tensor arguments, the first being ``targets`` (T, B, K) and
    the second the student crops (S, B, ...); a ``float scale`` follows them.
    ``forward(*tensors, scale)`` returns (loss (T, S), student LSE (S, B)), the LSE saved for
    ``backward(grad_loss, *tensors, lse, scale, needs_grad)``, which returns one gradient per
    tensor (an empty tensor where ``needs_grad`` is False). Returns the core ``(*tensors,
    scale) -> loss`` (the op is its ``.op``).
    """
    op = torch.library.custom_op(f"fastssl::{name}", mutates_args=(),
                                 schema=f"({inputs}, float scale) -> (Tensor, Tensor)")(forward)
    backward_op = torch.library.custom_op(
        f"fastssl::{name}_backward", mutates_args=(),
        schema=f"(Tensor grad_loss, {inputs}, Tensor lse, float scale, bool[] needs_grad) -> Tensor[]")(backward)
    return register_pair_loss_op(op, backward_op)


def register_pair_loss_op(op, backward_op) -> Callable:
    """Fake functions and autograd of a pair-loss op and its backward op, with the schemas of
    :func:`define_pair_loss_op`: custom ops made there, or ops defined elsewhere (the C++ ops of
    ``fastssl.native``, passed as ``OpOverload``). Returns the core ``(*tensors, scale) -> loss``.
    """
    @torch.library.register_fake(op)
    def _(targets, students, *rest):
        dtype = reference.compute_dtype(targets, students, *rest[:-1])
        return (targets.new_empty(targets.shape[0], students.shape[0], dtype=dtype),
                targets.new_empty(students.shape[0], students.shape[1], dtype=dtype))

    @torch.library.register_fake(backward_op)
    def _(grad_loss, *args):
        tensors, needs_grad = args[:-3], args[-1]
        return [torch.empty_like(t) if need else _empty_grad(t) for t, need in zip(tensors, needs_grad)]

    def setup_context(ctx, inputs, output):
        ctx.scale = inputs[-1]
        ctx.save_for_backward(*inputs[:-1], output[1])
        ctx.mark_non_differentiable(output[1])

    def autograd_backward(ctx, grad_loss, _grad_lse):
        *tensors, lse = ctx.saved_tensors
        needs_grad = list(ctx.needs_input_grad[:-1])
        grads = backward_op(grad_loss, *tensors, lse, ctx.scale, needs_grad)
        return tuple(g if need else None for g, need in zip(grads, needs_grad)) + (None,)

    torch.library.register_autograd(op, autograd_backward, setup_context=setup_context)

    def pair_loss_core(*args):
        return op(*args)[0]

    pair_loss_core.op = op
    return pair_loss_core


sinkhorn = define_sinkhorn_op("sinkhorn", clustering.sinkhorn)
soft_cross_entropy_pairs = define_pair_loss_op(
    "soft_cross_entropy_pairs", "Tensor targets, Tensor logits", clustering.soft_cross_entropy_pairs_forward,
    clustering.soft_cross_entropy_pairs_backward)
linear_soft_cross_entropy_pairs = define_pair_loss_op(
    "linear_soft_cross_entropy_pairs", "Tensor targets, Tensor features, Tensor weight",
    clustering.linear_soft_cross_entropy_pairs_forward, clustering.linear_soft_cross_entropy_pairs_backward)
backends.register("sinkhorn", "torch", sinkhorn)
backends.register("soft_cross_entropy_pairs", "torch", soft_cross_entropy_pairs)
backends.register("linear_soft_cross_entropy_pairs", "torch", linear_soft_cross_entropy_pairs)
backends.register("linear_soft_cross_entropy_pairs", "reference", reference.linear_soft_cross_entropy_pairs)

kmeans_assign = torch.library.custom_op("fastssl::kmeans_assign", mutates_args=(),
                                        schema="(Tensor x, Tensor centroids) -> (Tensor, Tensor)")(
    clustering.kmeans_assign)


@kmeans_assign.register_fake
def _(x, centroids):
    dtype = reference.compute_dtype(x, centroids)
    return x.new_empty(x.shape[0], dtype=torch.long), x.new_empty(x.shape[0], dtype=dtype)


backends.register("kmeans_assign", "torch", kmeans_assign)
backends.register("kmeans_assign", "reference", reference.kmeans_assign)

# --- BYOL / SimSiam ------------------------------------------------------------------------
negative_cosine_similarity = define_recompute_op(
    "negative_cosine_similarity", reference.negative_cosine_similarity, _scalar_fake, differentiable=(0, 1)
)
backends.register("negative_cosine_similarity", "torch", negative_cosine_similarity)

for _name in ("info_nce", "info_nce_self", "barlow_twins", "vicreg_variance_covariance", "sinkhorn", "soft_cross_entropy_pairs",
              "negative_cosine_similarity"):
    backends.register(_name, "reference", getattr(reference, _name))
