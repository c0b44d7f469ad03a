"""Functional forms of every fastssl loss, named like ``torch.nn.functional``.

Conventions shared by every function:

* Inputs may be float16, bfloat16, float32 or float64. Arithmetic runs in float32 (float64 for
  float64 inputs); the loss comes back as a 0-dim float32 tensor (float64 for float64 inputs)
  and gradients come back in the input dtype.
* ``backend``: ``"auto"`` (default; the ``FASTSSL_BACKEND`` environment variable replaces it),
  ``"reference"``, ``"torch"``, ``"triton"`` or ``"native"`` — see ``fastssl.backends``.
* Bad input raises ``TypeError`` / ``ValueError`` naming the argument and the shapes. Non-finite
  inputs (NaN/Inf) are not checked (that would cost a device sync per call): they propagate
  into the loss. Finite inputs never give a non-finite loss.
* ``gather_distributed=True`` inside an initialised ``torch.distributed`` process group makes
  each rank's loss and gradients those of lightly's convention: the mean over ranks of the
  returned losses equals the single-process loss on the concatenated batch, and each rank's
  input gradient is W × the single-process gradient of its rows, which DDP's gradient averaging
  turns back into the single-process gradient (see ``fastssl.distributed``). All ranks must
  hold the same batch size.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from . import backends, distributed, ops, redundancy, reference  # noqa: F401  (ops registers the backends)
from .validation import (
    check_batch_at_least,
    check_choice,
    check_float_tensor,
    check_int_at_least,
    check_label_tensor,
    check_non_negative,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_tensor_list,
)

Tensor = torch.Tensor


def check_views(names: Sequence[str], tensors: Sequence[Tensor], ndim: Optional[int] = 2) -> None:
    for name, tensor in zip(names, tensors):
        check_float_tensor(name, tensor, ndim=ndim)
    check_same_shape(names, tensors)
    check_same_dtype(names, tensors)
    check_same_device(names, tensors)


def _eager() -> bool:
    """Value checks (which read tensor data) run in eager mode only, not while compiling."""
    return not torch.compiler.is_compiling()


# ============================================================================================
# Contrastive: InfoNCE / NT-Xent / CLIP
# ============================================================================================
def info_nce(
    query: Tensor,
    keys: Tensor,
    temperature: float = 0.1,
    positive_index: Optional[Tensor] = None,
    *,
    positive_keys: Optional[Tensor] = None,
    query_labels: Optional[Tensor] = None,
    key_labels: Optional[Tensor] = None,
    self_index: Optional[Tensor] = None,
    symmetric: bool = False,
    normalize: bool = True,
    reduction: str = "mean",
    backend: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    r"""General InfoNCE: cross-entropy of each query against all keys, with chosen positives.

    With :math:`s_{ij} = q_i \cdot k_j / \tau` (``q``, ``k`` L2-normalised when ``normalize``)
    and the entry ``j = self_index[i]`` left out of row ``i``:

    .. math:: \ell_i = \log \sum_j e^{s_{ij}} - \frac{1}{|P_i|} \sum_{j \in P_i} s_{ij}

    Positives :math:`P_i`, chosen by exactly one of:

    * ``positive_index`` (N,): the key index of row i's positive (default: ``arange(N)``, the
      diagonal — SimCSE, CLIP);
    * ``query_labels`` (N,) and ``key_labels`` (M,): every key with the row's label (SupCon;
      rows without any positive contribute 0);
    * ``positive_keys`` (N, D): one extra logit :math:`q_i \cdot p_i / \tau` per row that is its
      only positive, all ``keys`` being negatives (MoCo queue / memory bank).

    ``symmetric=True`` adds the same loss per column (keys against queries: CLIP) and the mean
    reduction returns ½(mean row loss + mean column loss).

    Args:
        query: (N, D) float. keys: (M, D), same dtype and device.
        temperature: τ > 0. For CLIP's learnable logit scale, multiply the normalised ``query``
            by it yourself and pass ``temperature=1, normalize=False`` (or use :func:`clip_loss`).
        reduction: "mean" | "sum" | "none" (returns (row_loss (N,), col_loss (M,) or (0,))).
    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs), or per-row losses for "none".

    Example::

        >>> q, k = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = fastssl.functional.info_nce(q, k, temperature=0.05)  # SimCSE
    """
    check_float_tensor("query", query, ndim=2)
    check_float_tensor("keys", keys, ndim=2)
    if keys.shape[1] != query.shape[1]:
        raise ValueError(f"query and keys must have the same feature size, got query "
                         f"{tuple(query.shape)} and keys {tuple(keys.shape)}")
    check_same_dtype(("query", "keys"), (query, keys))
    check_same_device(("query", "keys"), (query, keys))
    scale = 1.0 / check_positive("temperature", temperature)
    check_choice("reduction", reduction, ("mean", "sum", "none"))
    n, m = query.shape[0], keys.shape[0]
    modes = [name for name, value in (("positive_index", positive_index), ("positive_keys", positive_keys),
                                      ("query_labels/key_labels", query_labels if query_labels is not None
                                       else key_labels)) if value is not None]
    if len(modes) > 1:
        raise ValueError(f"give at most one of positive_index, positive_keys and labels; got {modes}")
    if positive_keys is not None:
        check_float_tensor("positive_keys", positive_keys, ndim=2)
        check_same_shape(("query", "positive_keys"), (query, positive_keys))
        check_same_dtype(("query", "positive_keys"), (query, positive_keys))
        check_same_device(("query", "positive_keys"), (query, positive_keys))
        if symmetric:
            raise ValueError("symmetric=True needs label or index positives, not positive_keys")
    elif query_labels is not None or key_labels is not None:
        if query_labels is None or key_labels is None:
            raise ValueError("query_labels and key_labels must be given together")
        check_label_tensor("query_labels", query_labels, n)
        check_label_tensor("key_labels", key_labels, m)
    else:
        if positive_index is None:
            if n > m:
                raise ValueError(f"the default diagonal positives need N <= M, got query "
                                 f"{tuple(query.shape)} and keys {tuple(keys.shape)}; pass positive_index")
            positive_index = torch.arange(n, device=query.device)
        check_label_tensor("positive_index", positive_index, n)
        if _eager() and (positive_index.min() < 0 or positive_index.max() >= m):
            raise ValueError(f"positive_index must lie in [0, {m}) for keys of shape {tuple(keys.shape)}")
        query_labels, key_labels = positive_index, torch.arange(m, device=query.device)
    if self_index is not None:
        check_label_tensor("self_index", self_index, n)
        if symmetric:
            raise ValueError("symmetric=True cannot be combined with self_index")
        if _eager() and (self_index.max() >= m or self_index.min() < -1):
            raise ValueError(f"self_index must lie in [-1, {m}) for keys of shape {tuple(keys.shape)}")

    if normalize:
        query, keys = reference.l2_normalize(query), reference.l2_normalize(keys)
        if positive_keys is not None:
            positive_keys = reference.l2_normalize(positive_keys)
    _, core = backends.select("info_nce", backend, (query, keys, positive_keys))
    row_loss, col_loss = core(query, keys, positive_keys, query_labels, key_labels, self_index,
                              scale, symmetric)
    if reduction == "none":
        return row_loss, col_loss
    if reduction == "sum":
        return row_loss.sum() + col_loss.sum()
    if symmetric:
        return 0.5 * (row_loss.mean() + col_loss.mean())
    return row_loss.mean()


NT_XENT_MODES = ("simclr", "simcse", "symmetric")
NT_XENT_CONVENTIONS = ("mean", "sum", "mocov3")


def nt_xent(
    out0: Tensor,
    out1: Tensor,
    *more_views: Tensor,
    temperature: float = 0.5,
    labels: Optional[Tensor] = None,
    negatives: Optional[Tensor] = None,
    mode: str = "simclr",
    convention: str = "mean",
    gather_distributed: bool = False,
    normalize: bool = True,
    backend: str = "auto",
) -> Tensor:
    r"""NT-Xent (SimCLR) and its relatives, equal to lightly's ``NTXentLoss`` by default.

    ``mode``:

    * ``"simclr"`` (lightly): all V·B rows of the V views (B, D) against all V·B rows, the
      row's own entry removed, positives the other views of the same sample (or every sample
      with the same ``labels``: SupCon). With two views this is lightly's loss exactly.
    * ``"simcse"``: ``out0`` rows against ``out1`` rows only, one direction.
    * ``"symmetric"``: CLIP-style, ½ (``out0`` → ``out1`` + ``out1`` → ``out0``).

    With ``negatives`` (K, D) (a memory bank), the loss is MoCo's InfoNCE: ``out0`` rows are the
    queries, ``out1`` rows their positives (logit 0), the bank the negatives; two views only.

    ``convention`` scales the result: ``"mean"`` (lightly: mean over all query rows),
    ``"sum"`` (official SimCLR / MoCo v3 code: the per-direction means summed — V directions for
    "simclr", 2 for "symmetric", 1 otherwise), ``"mocov3"`` ("sum" × 2τ).

    ``gather_distributed``: rows stay local, keys (and labels) are gathered from every rank
    with gradient ("local loss, gather with grad").

    Args:
        out0, out1, *more_views: (B, D) float, same shape, dtype and device.
        labels: (B,) int class labels for supervised positives, or None.
    Returns:
        0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> z0, z1 = model(x0), model(x1)
        >>> loss = fastssl.functional.nt_xent(z0, z1, temperature=0.5)
    """
    views = (out0, out1) + more_views
    names = [f"out{i}" if i < 2 else f"more_views[{i - 2}]" for i in range(len(views))]
    check_views(names, views)
    check_choice("mode", mode, NT_XENT_MODES)
    check_choice("convention", convention, NT_XENT_CONVENTIONS)
    temperature = check_positive("temperature", temperature)
    batch = out0.shape[0]
    if labels is not None:
        check_label_tensor("labels", labels, batch)
    if mode != "simclr" and len(views) != 2:
        raise ValueError(f"mode={mode!r} takes exactly two views, got {len(views)}")
    if normalize:
        views = tuple(reference.l2_normalize(v) for v in views)
    common = dict(temperature=temperature, normalize=False, backend=backend)

    if negatives is not None:
        check_float_tensor("negatives", negatives, ndim=2)
        if negatives.shape[1] != out0.shape[1]:
            raise ValueError(f"negatives must be (K, {out0.shape[1]}), got {tuple(negatives.shape)}")
        check_same_device(("out0", "negatives"), (out0, negatives))
        if len(views) != 2 or labels is not None or mode != "simclr":
            raise ValueError("a memory bank (negatives) works with two views, mode='simclr' and no labels")
        loss = info_nce(views[0], negatives.to(views[0].dtype), positive_keys=views[1], **common)
        directions = 1
    else:
        world = distributed.world_size() if gather_distributed else 1
        rank = distributed.rank() if world > 1 else 0
        local = torch.arange(batch, device=out0.device) + rank * batch
        if labels is None:
            global_labels, local_labels = torch.arange(world * batch, device=out0.device), local
        else:
            global_labels, local_labels = distributed.gather_no_grad(labels), labels

        def gathered(view: Tensor) -> Tensor:
            return distributed.gather(view) if world > 1 else view

        if mode == "simclr" and world == 1:
            embeddings = torch.cat(views)
            _, core = backends.select("info_nce_self", backend, (embeddings,))
            loss = core(embeddings, local_labels.repeat(len(views)), True, 1.0 / temperature).mean()
            directions = len(views)
        elif mode == "simclr":
            queries = torch.cat(views)
            keys = torch.cat([gathered(v) for v in views])
            self_index = torch.cat([local + v * world * batch for v in range(len(views))])
            loss = info_nce(queries, keys, query_labels=local_labels.repeat(len(views)),
                            key_labels=global_labels.repeat(len(views)), self_index=self_index, **common)
            directions = len(views)
        elif mode == "simcse":
            loss = info_nce(views[0], gathered(views[1]), query_labels=local_labels,
                            key_labels=global_labels, **common)
            directions = 1
        elif world == 1:
            loss = info_nce(views[0], views[1], query_labels=local_labels, key_labels=global_labels,
                            symmetric=True, **common)
            directions = 2
        else:
            loss = 0.5 * sum(info_nce(q, gathered(k), query_labels=local_labels, key_labels=global_labels,
                                      **common) for q, k in ((views[0], views[1]), (views[1], views[0])))
            directions = 2
    if convention == "sum":
        loss = loss * directions
    elif convention == "mocov3":
        loss = loss * (directions * 2 * temperature)
    return loss


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Union[float, Tensor],
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""CLIP's symmetric InfoNCE with a (learnable) logit scale.

    ½ [CE(s · îᵢ·t̂ⱼ, diagonal) + CE(s · t̂ᵢ·îⱼ, diagonal)] with L2-normalised features and
    ``logit_scale`` s (a float, or a 0-dim tensor that receives its gradient; CLIP stores
    log s and passes ``logit_scale.exp()``).

    Args: image_features, text_features: (B, D). Returns: 0-dim float32 loss.
    """
    check_views(("image_features", "text_features"), (image_features, text_features))
    if isinstance(logit_scale, Tensor):
        if logit_scale.numel() != 1:
            raise ValueError(f"logit_scale must be a scalar, got shape {tuple(logit_scale.shape)}")
        if _eager():
            check_positive("logit_scale", logit_scale.detach())
    else:
        check_positive("logit_scale", logit_scale)
    image = reference.l2_normalize(image_features) * logit_scale
    text = reference.l2_normalize(text_features)
    return nt_xent(image, text, temperature=1.0, mode="symmetric", normalize=False,
                   gather_distributed=gather_distributed, backend=backend)


# ============================================================================================
# Redundancy reduction: Barlow Twins, VICReg
# ============================================================================================
def barlow_twins(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 5e-3,
    *,
    gather_distributed: bool = False,
    distributed_convention: str = "global",
    scale_loss: float = 1.0,
    algorithm: str = "auto",
    backend: str = "auto",
) -> Tensor:
    r"""Barlow Twins: :math:`\sum_i (1 - C_{ii})^2 + \lambda \sum_{i \ne j} C_{ij}^2`.

    Each view is batch-normalised (biased variance, eps 1e-5, no affine) and
    :math:`C = \hat z_a^\top \hat z_b / N` (D, D), as lightly's ``BarlowTwinsLoss``.

    With ``gather_distributed`` in a process group:

    * ``distributed_convention="global"`` (default): statistics and C over the gathered global
      batch, so every rank returns the single-process loss on the concatenated batch (what the
      official code's SyncBN intends);
    * ``"lightly"``: lightly's convention — per-rank batch-norm statistics, C replaced by the
      mean over ranks of the per-rank C (autograd all-reduce). Computed with the reference
      formula whatever the backend.

    ``scale_loss`` multiplies the result (0.024 in solo-learn / VISSL).

    ``algorithm``: how the fused backends get ‖C‖²_F — ``"gram"`` from the two N×N Gram matrices
    (O(N²D), never D×D), ``"direct"`` from C itself (O(ND²)), ``"auto"`` Gram exactly when N < D.
    Same numbers to float rounding; the reference backend always builds C.

    Args: z_a, z_b: (N, D), N >= 2. Returns: 0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.barlow_twins(projector(y1), projector(y2))
    """
    check_views(("z_a", "z_b"), (z_a, z_b))
    check_batch_at_least("z_a", z_a, 2, "batch-norm statistics need two rows")
    lambda_param = check_non_negative("lambda_param", lambda_param)
    check_choice("distributed_convention", distributed_convention, ("global", "lightly"))
    check_choice("algorithm", algorithm, redundancy.ALGORITHMS)
    if isinstance(scale_loss, bool) or not isinstance(scale_loss, (int, float)):
        raise TypeError(f"scale_loss must be a number, got {type(scale_loss).__name__}")
    world = distributed.world_size() if gather_distributed else 1
    if world > 1 and distributed_convention == "lightly":
        dtype = reference.compute_dtype(z_a)
        za = reference.batch_normalize(z_a.to(dtype))
        zb = reference.batch_normalize(z_b.to(dtype))
        c = distributed.all_reduce_sum(za.T @ zb / (z_a.shape[0] * world))
        return scale_loss * reference.barlow_twins_from_correlation(c, lambda_param)
    if world > 1:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    chosen, core = backends.select("barlow_twins", backend, (z_a, z_b))
    options = () if chosen == "reference" else (algorithm,)
    return scale_loss * core(z_a, z_b, lambda_param, *options)


def vicreg(
    z_a: Tensor,
    z_b: Tensor,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    eps: float = 1e-4,
    *,
    gather_distributed: bool = False,
    algorithm: str = "auto",
    backend: str = "auto",
) -> Tensor:
    r"""VICReg: λ · invariance + μ · variance + ν · covariance, as lightly's ``VICRegLoss``.

    * invariance = MSE(z_a, z_b) on the local batch;
    * variance = ½ Σ_views mean_d relu(1 − sqrt(Var_unbiased(z)_d + eps));
    * covariance = Σ_views Σ_{i≠j} Cov(z)_{ij}² / D, Cov = (z − z̄)ᵀ(z − z̄) / (B − 1).

    Inputs (B, …, D): the middle dims are independent groups; variance and covariance are
    averaged over them. With ``gather_distributed``, variance and covariance use the batch
    gathered from all ranks (with gradient); invariance stays local.

    ``algorithm``: ``"gram"`` takes ‖Cov‖²_F from the B×B Gram matrix x xᵀ (O(B²D), never D×D),
    ``"direct"`` from Cov itself (O(BD²)), ``"auto"`` Gram exactly when B < D (see
    :func:`barlow_twins`).

    Args: z_a, z_b: (B, …, D), B >= 2. Returns: 0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.vicreg(expander(y1), expander(y2))
    """
    check_views(("z_a", "z_b"), (z_a, z_b), ndim=None)
    check_float_tensor("z_a", z_a, min_ndim=2)
    check_batch_at_least("z_a", z_a, 2, "the unbiased variance needs two rows")
    for name, value in (("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param)):
        check_non_negative(name, value)
    eps = check_non_negative("eps", eps)
    check_choice("algorithm", algorithm, redundancy.ALGORITHMS)
    dtype = reference.compute_dtype(z_a)
    invariance = F.mse_loss(z_a.to(dtype), z_b.to(dtype))
    if gather_distributed and distributed.world_size() > 1:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    grouped = [z.reshape(z.shape[0], -1, z.shape[-1]) for z in (z_a, z_b)]
    chosen, core = backends.select("vicreg_variance_covariance", backend, grouped)
    options = () if chosen == "reference" else (algorithm,)
    variance, covariance = core(grouped[0], grouped[1], eps, *options).unbind()
    return lambda_param * invariance + mu_param * variance + nu_param * covariance


# ============================================================================================
# Clustering & distillation: Sinkhorn-Knopp, SwAV, DINO
# ============================================================================================
def sinkhorn_knopp(
    scores: Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    *,
    row_marginals: Optional[Tensor] = None,
    col_marginals: Optional[Tensor] = None,
    tolerance: Optional[float] = None,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tensor:
    r"""Sinkhorn-Knopp soft assignments (SwAV codes), computed in the log domain.

    Equal to SwAV's / lightly's linear-domain iteration on ``exp(scores / ε)`` wherever that is
    finite, and finite where it is not (fp16 scores, small ε, large scores). Each of
    ``iterations`` steps rescales the K prototypes' totals to ``row_marginals`` (default
    uniform) and then the B samples' totals to ``col_marginals`` (default uniform); the result is
    the final plan with each sample's row rescaled to sum to 1.

    SeLA-style use: many ``iterations`` with a ``tolerance`` (stop once every prototype total is
    within ``tolerance``, relative, of its marginal) and custom marginals. With
    ``gather_distributed`` the prototype totals are summed over all ranks, so each rank gets its
    rows of the codes of the gathered batch. No gradient flows through the codes.

    Args:
        scores: (B, K) prototype scores. row_marginals: (K,) > 0. col_marginals: (B,) > 0.
    Returns:
        (B, K) codes in the dtype of ``scores``, rows summing to 1.

    Example::

        >>> codes = fastssl.functional.sinkhorn_knopp(prototypes(z).detach(), iterations=3)
    """
    check_float_tensor("scores", scores, ndim=2)
    check_int_at_least("iterations", iterations, 0)
    epsilon = check_positive("epsilon", epsilon)
    tolerance = 0.0 if tolerance is None else check_non_negative("tolerance", tolerance)
    batch, num_prototypes = scores.shape
    for name, marginal, size in (("row_marginals", row_marginals, num_prototypes),
                                 ("col_marginals", col_marginals, batch)):
        if marginal is None:
            continue
        check_float_tensor(name, marginal, ndim=1)
        if marginal.shape[0] != size:
            raise ValueError(f"{name} must have shape ({size},) for scores of shape "
                             f"{tuple(scores.shape)}, got {tuple(marginal.shape)}")
        check_same_device(("scores", name), (scores, marginal))
        if _eager() and not bool(torch.all(torch.isfinite(marginal) & (marginal > 0))):
            raise ValueError(f"{name} must be finite and > 0")
    scores = scores.detach()
    _, core = backends.select("sinkhorn", backend, (scores,))
    return core(scores, iterations, epsilon, row_marginals, col_marginals, tolerance,
                bool(gather_distributed))


def sinkhorn(probabilities: Tensor, iterations: int = 3, epsilon: float = 0.05,
             gather_distributed: bool = False) -> Tensor:
    """lightly's ``sinkhorn(probabilities, iterations, epsilon, gather_distributed)`` signature."""
    return sinkhorn_knopp(probabilities, iterations, epsilon, gather_distributed=gather_distributed)


def _off_diagonal_mean(pair_loss: Tensor) -> Tensor:
    """Mean of a (T, S) pair-loss matrix over the entries with t != s."""
    rows, cols = pair_loss.shape
    diagonal = torch.diagonal(pair_loss).sum()
    return (pair_loss.sum() - diagonal) / (rows * cols - min(rows, cols))


def swav(
    high_resolution_outputs: Sequence[Tensor],
    low_resolution_outputs: Sequence[Tensor] = (),
    queue_outputs: Optional[Sequence[Tensor]] = None,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
    sinkhorn_gather_distributed: bool = False,
    prototypes: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    r"""SwAV's swapped prediction, as lightly's ``SwaVLoss``.

    For each high-resolution crop i, codes :math:`q_i` = Sinkhorn of its scores (with
    ``queue_outputs[i]`` appended, then only the batch rows kept; no gradient). Then

    .. math:: L = \frac{1}{H (V - 1)} \sum_{i < H} \sum_{v \ne i}
              -\frac{1}{B} \sum_b q_{i,b} \cdot \log\mathrm{softmax}(z_{v,b} / \tau)

    over the V = H + L crops.

    Args:
        high_resolution_outputs: H >= 1 tensors (B, K) of prototype scores.
        low_resolution_outputs: tensors (B, K). queue_outputs: H tensors (Q, K), or None.
        prototypes: (K, D) prototype weights, or None. When given, every crop (and queue entry)
            is a (B, D) embedding whose scores are ``crop @ prototypes.T``, and the
            cross-entropy is fused with that product: the (B, K) scores of the crops are
            never held for the backward (the high-resolution ones are made once, without
            gradient, for Sinkhorn).
    Returns:
        0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.swav([p1, p2], [p3, p4, p5, p6])
    """
    high = check_tensor_list("high_resolution_outputs", high_resolution_outputs, 1)
    low = check_tensor_list("low_resolution_outputs", low_resolution_outputs, 0)
    crops = high + low
    if len(crops) < 2:
        raise ValueError("high_resolution_outputs and low_resolution_outputs must hold at least two "
                         f"crops in all, got {len(crops)}")
    names = [f"high_resolution_outputs[{i}]" for i in range(len(high))] + [
        f"low_resolution_outputs[{i}]" for i in range(len(low))]
    check_views(names, crops)
    temperature = check_positive("temperature", temperature)
    check_int_at_least("sinkhorn_iterations", sinkhorn_iterations, 0)
    check_positive("sinkhorn_epsilon", sinkhorn_epsilon)
    if queue_outputs is not None:
        queue = check_tensor_list("queue_outputs", queue_outputs, len(high))
        if len(queue) != len(high):
            raise ValueError(f"queue_outputs must hold one tensor per high-resolution crop "
                             f"({len(high)}), got {len(queue)}")
        for i, q in enumerate(queue):
            check_float_tensor(f"queue_outputs[{i}]", q, ndim=2)
            if q.shape[1] != crops[0].shape[1]:
                raise ValueError(f"queue_outputs[{i}] must be (Q, {crops[0].shape[1]}), got {tuple(q.shape)}")
    if prototypes is not None:
        _check_last_layer("prototypes", prototypes, crops[0])
    batch = crops[0].shape[0]
    codes = []
    for i, scores in enumerate(high):
        scores = scores.detach()
        if queue_outputs is not None:
            scores = torch.cat([scores, queue_outputs[i].detach().to(scores.dtype)])
        if prototypes is not None:
            scores = scores @ prototypes.detach().to(scores.dtype).T
        codes.append(sinkhorn_knopp(scores, sinkhorn_iterations, sinkhorn_epsilon,
                                    gather_distributed=sinkhorn_gather_distributed,
                                    backend=backend)[:batch])
    targets = torch.stack(codes)
    return _off_diagonal_mean(_pair_losses(targets, torch.stack(crops), prototypes, 1.0 / temperature, backend))


def _check_last_layer(name: str, weight: Tensor, crop: Tensor) -> None:
    """A (K, D) weight for (B, D) crops, on their device."""
    check_float_tensor(name, weight, ndim=2)
    if weight.shape[1] != crop.shape[-1]:
        raise ValueError(f"{name} must be (K, {crop.shape[-1]}) for crops of shape {tuple(crop.shape)}, "
                         f"got {tuple(weight.shape)}")
    check_same_device(("crops", name), (crop, weight))


def _pair_losses(targets: Tensor, students: Tensor, weight: Optional[Tensor], scale: float, backend: str) -> Tensor:
    """(T, S) soft cross-entropies of targets (T, B, K) and student logits (S, B, K), or of
    student features (S, B, D) through a fused last layer ``weight`` (K, D)."""
    if weight is None:
        _, core = backends.select("soft_cross_entropy_pairs", backend, (targets, students))
        return core(targets, students, scale)
    _, core = backends.select("linear_soft_cross_entropy_pairs", backend, (targets, students, weight))
    return core(targets, students, weight, scale)


def _as_crops(name: str, value) -> Tensor:
    """A list of (B, D) crops or a stacked (crops, B, D) tensor → (crops, B, D)."""
    if isinstance(value, Tensor):
        check_float_tensor(name, value, ndim=3)
        return value
    crops = check_tensor_list(name, value, 1)
    check_views([f"{name}[{i}]" for i in range(len(crops))], crops)
    return torch.stack(crops)


def dino(
    teacher_out: Union[Sequence[Tensor], Tensor],
    student_out: Union[Sequence[Tensor], Tensor],
    center: Tensor,
    teacher_temp: float = 0.04,
    student_temp: float = 0.1,
    *,
    last_layer_weight: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    r"""DINO's cross-entropy between centred, sharpened teacher and student distributions.

    .. math:: L = \frac{1}{TS - \min(T,S)} \sum_{t \ne s} -\frac{1}{B} \sum_b
              \mathrm{softmax}((x^t_b - c)/\tau_t) \cdot \log\mathrm{softmax}(x^s_b / \tau_s)

    Pairs with the same index (the same global crop seen by teacher and student) are skipped,
    as in lightly's ``DINOLoss``; updating ``center`` is :func:`dino_center`'s job.

    Args:
        teacher_out: T crops (B, D) (list or a (T, B, D) tensor). student_out: S crops (B, D).
        center: broadcastable to (B, D), e.g. (1, 1, D) or (D,).
        last_layer_weight: (D, E) weight of the student head's last linear layer, or None.
            When given, ``student_out`` crops are its (B, E) inputs and the student outputs
            ``student_out @ last_layer_weight.T`` are fused with the cross-entropy: the
            (S, B, D) outputs are never held (a 65,536-dim head saves S·B·D·4 bytes twice).
    Returns:
        0-dim float32 loss (float64 for float64 inputs).

    Example::

        >>> loss = fastssl.functional.dino([t1, t2], [s1, s2, s3, s4], center, teacher_temp=0.04)
    """
    teacher = _as_crops("teacher_out", teacher_out)
    student = _as_crops("student_out", student_out)
    if last_layer_weight is not None:
        _check_last_layer("last_layer_weight", last_layer_weight, student)
        if last_layer_weight.shape[0] != teacher.shape[-1]:
            raise ValueError(f"last_layer_weight must have one row per output dim ({teacher.shape[-1]}), got "
                             f"{tuple(last_layer_weight.shape)}")
    if teacher.shape[1] != student.shape[1] or (last_layer_weight is None and teacher.shape[2] != student.shape[2]):
        raise ValueError(f"teacher_out and student_out crops must share (B, D), got teacher_out "
                         f"{tuple(teacher.shape)} and student_out {tuple(student.shape)}")
    check_float_tensor("center", center)
    check_same_device(("teacher_out", "student_out", "center"), (teacher, student, center))
    if center.shape[-1] != teacher.shape[-1] or center[..., 0].numel() != 1:
        raise ValueError(f"center must hold one value per output dim ({teacher.shape[-1]}), "
                         f"got shape {tuple(center.shape)}")
    teacher_temp = check_positive("teacher_temp", teacher_temp)
    student_temp = check_positive("student_temp", student_temp)
    if teacher.shape[0] * student.shape[0] - min(teacher.shape[0], student.shape[0]) == 0:
        raise ValueError("DINO needs at least one (teacher, student) pair of different crops, got "
                         f"{teacher.shape[0]} teacher and {student.shape[0]} student crop(s)")
    dtype = reference.compute_dtype(teacher)
    targets = F.softmax((teacher.to(dtype) - center.reshape(-1).to(dtype)) / teacher_temp, dim=-1)
    return _off_diagonal_mean(_pair_losses(targets, student, last_layer_weight, 1.0 / student_temp, backend))


@torch.no_grad()
def dino_center(teacher_out: Union[Sequence[Tensor], Tensor], center: Tensor, momentum: float = 0.9) -> Tensor:
    """DINO's center EMA: center · m + (1 − m) · mean(teacher outputs), the mean all-reduced.

    The mean runs over every teacher crop and row, averaged over ranks when a process group is
    initialised (as lightly and the official code do). Returns the new center, shaped as
    ``center``.
    """
    teacher = _as_crops("teacher_out", teacher_out)
    batch_center = teacher.to(reference.compute_dtype(teacher)).mean(dim=(0, 1))
    if distributed.world_size() > 1:
        batch_center = distributed.all_reduce_no_grad(batch_center, "sum") / distributed.world_size()
    return center * momentum + batch_center.reshape(center.shape).to(center.dtype) * (1 - momentum)


def _check_points_and_centroids(x: Tensor, centroids: Tensor) -> None:
    check_float_tensor("x", x, ndim=2)
    check_float_tensor("centroids", centroids, ndim=2)
    if centroids.shape[1] != x.shape[1]:
        raise ValueError(f"centroids must be (K, {x.shape[1]}) for x of shape {tuple(x.shape)}, "
                         f"got {tuple(centroids.shape)}")
    check_same_device(("x", "centroids"), (x, centroids))


def kmeans_assign(x: Tensor, centroids: Tensor, *, backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """Nearest centroid of every row (DeepCluster's k-means assignment step), without gradient.

    The torch backend fuses the distances with the argmin over blocks of centroids, so the
    (N, K) distance matrix never exists; it ranks centroids by ‖c‖² − 2 x·c, so centroids whose
    squared distances differ by less than the rounding of that form (~1e-7 · (‖x‖² + ‖c‖²) in
    float32) may be ranked either way. The distance returned is computed directly.

    Args: x (N, D); centroids (K, D). Returns: assignments (N,) int64 (ties: lowest index) and
    squared Euclidean distances (N,), float32 (float64 for float64 inputs).

    Example::

        >>> labels, _ = fastssl.functional.kmeans_assign(features, centroids)  # pseudo-labels
    """
    _check_points_and_centroids(x, centroids)
    x, centroids = x.detach(), centroids.detach()
    _, core = backends.select("kmeans_assign", backend, (x, centroids))
    return core(x, centroids)


@torch.no_grad()
def kmeans_update(
    x: Tensor,
    centroids: Tensor,
    counts: Tensor,
    assignments: Optional[Tensor] = None,
    *,
    gather_distributed: bool = False,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """One mini-batch k-means step (Sculley, 2010): each centroid becomes the mean of every row
    ever assigned to it, c_k ← (n_k c_k + Σ_{b→k} x_b) / (n_k + m_k), n_k ← n_k + m_k.

    Equal to the per-row updates c_k += (x_b − c_k) / n_k taken one row at a time. Centroids
    that no row has reached keep their value. With ``gather_distributed`` the sums and counts
    of every rank are added (all ranks get the same centroids).

    Args:
        x: (N, D). centroids: (K, D). counts: (K,) rows assigned so far (any number type).
        assignments: (N,) int64 from :func:`kmeans_assign`, or None to compute them here.
    Returns:
        (new centroids (K, D) in the dtype of ``centroids``, new counts (K,) like ``counts``).
    """
    _check_points_and_centroids(x, centroids)
    if not isinstance(counts, Tensor) or counts.shape != (centroids.shape[0],):
        raise ValueError(f"counts must be a tensor of shape ({centroids.shape[0]},), got "
                         f"{tuple(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__}")
    if assignments is None:
        assignments, _ = kmeans_assign(x, centroids, backend=backend)
    check_label_tensor("assignments", assignments, x.shape[0])
    if _eager() and (assignments.min() < 0 or assignments.max() >= centroids.shape[0]):
        raise ValueError(f"assignments must lie in [0, {centroids.shape[0]}) for centroids of shape "
                         f"{tuple(centroids.shape)}")
    dtype = reference.compute_dtype(x, centroids)
    sums = torch.zeros(centroids.shape, dtype=dtype, device=x.device).index_add_(0, assignments, x.to(dtype))
    new_rows = torch.bincount(assignments, minlength=centroids.shape[0]).to(dtype)
    if gather_distributed and distributed.world_size() > 1:
        sums = distributed.all_reduce_no_grad(sums, "sum")
        new_rows = distributed.all_reduce_no_grad(new_rows, "sum")
    total = counts.to(dtype) + new_rows
    step = (sums - new_rows[:, None] * centroids.to(dtype)) / total.clamp_min(1)[:, None]
    return (centroids.to(dtype) + step).to(centroids.dtype), (counts + new_rows.to(counts.dtype))


# ============================================================================================
# BYOL / SimSiam
# ============================================================================================
def negative_cosine_similarity(x0: Tensor, x1: Tensor, dim: int = 1, eps: float = 1e-8, *,
                               backend: str = "auto") -> Tensor:
    r"""−mean cos(x0, x1) along ``dim`` (BYOL / SimSiam), as lightly's ``NegativeCosineSimilarity``.

    cos = x0·x1 / (max(‖x0‖, eps) · max(‖x1‖, eps)); the mean runs over every other position.
    Stop-gradient and symmetrisation are the caller's.

    Args: x0, x1: same shape, e.g. (B, D). Returns: 0-dim float32 loss.

    Example::

        >>> loss = 0.5 * (negative_cosine_similarity(p0, z1.detach())
        ...               + negative_cosine_similarity(p1, z0.detach()))
    """
    check_views(("x0", "x1"), (x0, x1), ndim=None)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x0.dim() <= dim < x0.dim():
        raise ValueError(f"dim must be an int in [{-x0.dim()}, {x0.dim()}) for shape {tuple(x0.shape)}, got {dim}")
    eps = check_positive("eps", eps)
    rows = [x.movedim(dim, -1).reshape(-1, x.shape[dim]) for x in (x0, x1)]
    _, core = backends.select("negative_cosine_similarity", backend, rows)
    return core(rows[0], rows[1], eps)


__all__ = [
    "info_nce", "nt_xent", "clip_loss", "barlow_twins", "vicreg", "sinkhorn_knopp", "sinkhorn",
    "swav", "dino", "dino_center", "kmeans_assign", "kmeans_update", "negative_cosine_similarity",
]
