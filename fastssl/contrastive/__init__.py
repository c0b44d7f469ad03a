"""The contrastive family: InfoNCE / NT-Xent on one tiled core (SimCLR, MoCo's memory bank,
SimCSE, CLIP, SupCon, MoCo v3).

Public API: :func:`info_nce`, :func:`nt_xent`, :func:`clip_loss`, :func:`dcl`, :class:`NTXentLoss`,
:class:`MemoryBankModule`, :class:`DCLLoss`, :class:`DCLWLoss`, :class:`DirectCLRLoss`, :func:`macl`,
:class:`MACLLoss`, :func:`detcon`, :class:`DetConBLoss`, :class:`DetConSLoss`. Core ops (``fastssl.runtime.registry``):
``info_nce`` (queries against keys, optional positive keys and labels), ``info_nce_self`` (a batch
against itself) and ``info_nce_self_decoupled`` (the same, positives out of the denominator: DCL).
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import distributed, registry
from ..runtime.dtypes import compute_dtype, zero_with_graph
from ..runtime.validation import (
    check_choice,
    check_distributed_available,
    check_finite_number,
    check_float_tensor,
    check_label_tensor,
    check_positive,
    check_same_device,
    check_same_dtype,
    check_same_shape,
    check_temperature,
    check_views,
    eager,
)
from . import reference

Tensor = torch.Tensor

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _normalized(op: str, backend: str, *tensors: Optional[Tensor], chosen: Optional[str] = None
                ) -> Tuple[Optional[Tensor], ...]:
    """``tensors`` (None kept) with L2-normalised rows, computed in float32 for half inputs; cast back
    once to the half input dtype where the backend that runs ``op`` on them (``chosen`` when the
    caller has selected it already, else selected here, for half inputs only) runs half operands
    (the triton kernels: half dots on tensor cores), else left in float32, whose rounding the torch
    path's accuracy relies on."""
    first = next(t for t in tensors if t is not None)
    keep = first.dtype in HALF_DTYPES and (chosen or registry.select(op, backend, tensors)[0]) == "triton"
    return tuple(None if t is None else reference.l2_normalize(t, t.dtype if keep else None) for t in tensors)


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
        temperature: τ with |τ| ≥ 1e-8 (lightly's rule: a negative τ is allowed). For CLIP's learnable logit scale, multiply the normalised ``query``
            by it yourself and pass ``temperature=1, normalize=False`` (or use :func:`clip_loss`).
        reduction: "mean" | "sum" | "none" (returns (row_loss (N,), col_loss (M,) or (0,))).
    Returns:
        A 0-dim float32 tensor (float64 for float64 inputs), or per-row losses for "none".

    Example::

        >>> q, k = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = fastssl.info_nce(q, k, temperature=0.05)  # SimCSE
    """
    check_float_tensor("query", query, ndim=2)
    check_float_tensor("keys", keys, ndim=2)
    if keys.shape[1] != query.shape[1]:
        raise ValueError(f"query and keys must have the same feature size, got query "
                         f"{tuple(query.shape)} and keys {tuple(keys.shape)}")
    check_same_dtype(("query", "keys"), (query, keys))
    check_same_device(("query", "keys"), (query, keys))
    scale = 1.0 / check_temperature("temperature", temperature)
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
        if eager() and (positive_index.min() < 0 or positive_index.max() >= m):
            raise ValueError(f"positive_index must lie in [0, {m}) for keys of shape {tuple(keys.shape)}")
        query_labels, key_labels = positive_index, torch.arange(m, device=query.device)
    if self_index is not None:
        check_label_tensor("self_index", self_index, n)
        if symmetric:
            raise ValueError("symmetric=True cannot be combined with self_index")
        if eager() and (self_index.max() >= m or self_index.min() < -1):
            raise ValueError(f"self_index must lie in [-1, {m}) for keys of shape {tuple(keys.shape)}")

    # chosen on the inputs: their normalised rows keep dtype (half for triton), device and shape
    chosen, core = registry.select("info_nce", backend, (query, keys, positive_keys))
    if normalize:
        query, keys, positive_keys = _normalized("info_nce", backend, query, keys, positive_keys, chosen=chosen)
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
        >>> loss = fastssl.nt_xent(z0, z1, temperature=0.5)
    """
    views = (out0, out1) + more_views
    names = [f"out{i}" if i < 2 else f"more_views[{i - 2}]" for i in range(len(views))]
    check_views(names, views)
    check_choice("mode", mode, NT_XENT_MODES)
    check_choice("convention", convention, NT_XENT_CONVENTIONS)
    temperature = check_temperature("temperature", temperature)
    batch = out0.shape[0]
    if labels is not None:
        check_label_tensor("labels", labels, batch)
    if mode != "simclr" and len(views) != 2:
        raise ValueError(f"mode={mode!r} takes exactly two views, got {len(views)}")
    world = distributed.world_size() if gather_distributed and negatives is None else 1
    if normalize:  # the half cast is decided by the op that runs: one device's SimCLR runs info_nce_self
        self_similarity = negatives is None and mode == "simclr" and world == 1
        views = _normalized("info_nce_self" if self_similarity else "info_nce", backend, *views)
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
        rank = distributed.rank() if world > 1 else 0
        local = torch.arange(batch, device=out0.device) + rank * batch
        if labels is None:
            global_labels, local_labels = torch.arange(world * batch, device=out0.device), local
        else:
            global_labels, local_labels = distributed.gather_no_grad(labels), labels

        def gathered(view: Tensor) -> Tensor:
            return distributed.gather(view) if world > 1 else view

        if mode == "simclr" and world == 1 and batch * len(views) == 2:
            # one sample, two views: each row's only candidate is its positive, −log 1 = 0 (lightly's exact 0)
            loss = zero_with_graph(*views)
            directions = 2
        elif mode == "simclr" and world == 1:
            embeddings = torch.cat(views)
            _, core = registry.select("info_nce_self", backend, (embeddings,))
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
        if eager():
            check_positive("logit_scale", logit_scale.detach())
    else:
        check_positive("logit_scale", logit_scale)
    image, text = _normalized("info_nce", backend, image_features, text_features)
    image = image * logit_scale
    return nt_xent(image, text, temperature=1.0, mode="symmetric", normalize=False,
                   gather_distributed=gather_distributed, backend=backend)


class MemoryBankModule(nn.Module):
    """A queue of past embeddings (MoCo's queue), lightly 1.6's ``MemoryBankModule`` to the letter.

    ``size`` is ``(rows, D)`` (the bank is created at construction: random L2-normalised float32
    rows) or ``0`` (disabled: forward returns ``None`` for the bank); a bare ``rows > 0`` raises,
    as in lightly, because D cannot be guessed. ``bank`` and ``bank_ptr`` are non-persistent
    buffers (not in ``state_dict``, as in lightly: a lightly checkpoint loads with
    ``strict=True``); they move with ``.to()``. ``forward(output, labels=None, update=False)``
    returns ``output`` and a detached copy of the bank from *before* ``output`` is enqueued, as
    (D, rows) when ``feature_dim_first`` (lightly's default) or (rows, D). Enqueueing writes the
    batch at the pointer; a batch that reaches the end is cut there and the pointer goes back
    to 0 (lightly's rule). With ``gather_distributed`` every rank's batch is enqueued.

    Shapes: output (B, D) → (output, bank (D, rows) or (rows, D), or None).
    """

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if isinstance(size, int) and size > 0:
            raise ValueError(f"Memory bank size 'size={size}' does not specify the feature dimension. Set it with "
                             f"'size=({size}, dim)', or pass 'size=0' to disable the memory bank.")
        if size_tuple != (0,) and len(size_tuple) != 2:
            raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) tuple, or 'size=0' "
                             "to disable the memory bank.")
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("bank", torch.empty(size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long), persistent=False)
        if len(size_tuple) == 2:
            self.bank = F.normalize(torch.randn(size_tuple), dim=-1)

    @torch.no_grad()
    def enqueue(self, batch: Tensor) -> None:
        """Write ``batch`` (B, D) at the pointer, cut at the end of the bank (then the pointer is 0)."""
        if self.gather_distributed:
            batch = distributed.gather_no_grad(batch)
        rows, start = self.size[0], int(self.bank_ptr)
        if start + batch.shape[0] >= rows:
            self.bank[start:] = batch[: rows - start].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[start:start + batch.shape[0]] = batch.detach()
            self.bank_ptr[0] = start + batch.shape[0]

    def queue(self, output: Tensor, update: bool = False) -> Optional[Tensor]:
        """The bank (rows, D) before ``output`` is enqueued (when ``update``); None if disabled."""
        if self.size[0] == 0:
            return None
        check_float_tensor("output", output, ndim=2)
        if output.shape[1] != self.size[1]:
            raise ValueError(f"output must be (B, {self.size[1]}) to match the memory bank of size {self.size}, "
                             f"got {tuple(output.shape)}")
        bank = self.bank.clone()
        if update:
            self.enqueue(output)
        return bank

    def forward(self, output: Tensor, labels: Optional[Tensor] = None,
                update: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        del labels  # lightly's signature: always None, ignored
        bank = self.queue(output, update)
        if bank is not None and self.feature_dim_first:
            bank = bank.transpose(0, -1)
        return output, bank


class NTXentLoss(nn.Module):
    """NT-Xent / InfoNCE (SimCLR; MoCo with ``memory_bank_size``), as lightly's ``NTXentLoss``.

    ``forward(out0, out1, *more_views, labels=None)`` on (B, D) views; see
    :func:`fastssl.nt_xent` for the formula, ``mode`` ("simclr", "simcse",
    "symmetric"), ``convention`` ("mean", "sum", "mocov3"), SupCon ``labels`` and more than two
    views. With ``memory_bank_size > 0`` the loss is MoCo's: ``out0`` are the queries, ``out1``
    the positive keys, the bank the negatives; ``out1`` (normalised) is enqueued after use
    whenever ``out0`` requires a gradient, as in lightly.

    Example::

        >>> criterion = NTXentLoss(temperature=0.5)
        >>> loss = criterion(model(x0), model(x1))
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, mode: str = "simclr", convention: str = "mean",
                 normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)
        check_choice("mode", mode, NT_XENT_MODES)
        check_choice("convention", convention, NT_XENT_CONVENTIONS)
        self.memory_bank = MemoryBankModule(size=memory_bank_size, gather_distributed=gather_distributed)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.mode, self.convention, self.normalize, self.backend = mode, convention, normalize, backend
        # lightly's public attributes (the loss itself never materialises lightly's logits)
        self.eps = 1e-8
        self.cross_entropy = nn.CrossEntropyLoss(reduction="mean")

    def forward(self, out0: Tensor, out1: Tensor, *more_views: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if self.memory_bank.size[0] == 0:
            return self._loss(out0, out1, *more_views, labels=labels)
        check_views(("out0", "out1"), (out0, out1))
        keys = reference.l2_normalize(out1) if self.normalize else out1
        loss = self._loss(out0, out1, *more_views, labels=labels, negatives=self.memory_bank.queue(keys).to(out0.device))
        if out0.requires_grad:  # lightly's rule: a loss without gradient leaves the bank as it is
            self.memory_bank.enqueue(keys)
        return loss

    def _loss(self, *views: Tensor, labels: Optional[Tensor], negatives: Optional[Tensor] = None) -> Tensor:
        return nt_xent(
            *views, temperature=self.temperature, labels=labels, negatives=negatives, mode=self.mode,
            convention=self.convention, gather_distributed=self.gather_distributed,
            normalize=self.normalize, backend=self.backend)


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """DCLW's weights (lightly's ``negative_mises_fisher_weights``): 2 − N·softmax_i(x0_i·x1_i / σ)
    over the batch, without gradient. out0, out1: (N, D) → (N,)."""
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return 2 - out0.shape[0] * F.softmax(similarity, dim=0)


def _dcl_gathered_rows(x0: Tensor, x1: Tensor, scale: float) -> Tensor:
    """DCL's row losses with negatives from every rank (gathered with gradient): each local row
    against both views of the global batch, its own entry and its positive left out. Dense
    (local B × 2·W·B logits), as lightly computes it; one process takes the fused path."""
    batch = x0.shape[0]
    own = torch.arange(batch, device=x0.device)
    columns = own + distributed.rank() * batch
    all0, all1 = distributed.gather(x0), distributed.gather(x1)  # once each: both sides use both

    def side(a: Tensor, b: Tensor, a_all: Tensor, b_all: Tensor) -> Tensor:
        same, other = scale * (a @ a_all.T), scale * (a @ b_all.T)
        same[own, columns] = float("-inf")
        other[own, columns] = float("-inf")
        return torch.logsumexp(torch.cat([same, other], dim=1), dim=1) - scale * (a * b).sum(dim=1)

    return torch.cat([side(x0, x1, all0, all1), side(x1, x0, all1, all0)])


def dcl(out0: Tensor, out1: Tensor, temperature: float = 0.1, weight_fn: Optional[Callable] = None, *,
        gather_distributed: bool = False, backend: str = "auto") -> Tensor:
    r"""Decoupled contrastive learning (Yeh et al., 2021), as lightly's ``DCLLoss``: with rows
    normalised and :math:`s = x\cdot y/\tau`, each row of either view against both views of the
    batch, its own entry and its positive (the other view of the sample) left out of the
    denominator:

    .. math:: \ell_i = -w_i\, s_{i,i^+} + \log \sum_{j \ne i, i^+} e^{s_{ij}}

    averaged over the 2N rows; ``weight_fn(x0, x1)`` (normalised views, (N,) result) gives w for
    the rows of view 0 and ``weight_fn(x1, x0)`` for view 1 (None: w = 1; DCLW:
    :func:`negative_mises_fisher_weights`). On one process the fused self-similarity core runs
    (O(N) memory); ``gather_distributed`` takes negatives from every rank (dense per rank).

    Args: out0, out1: (N, D), N ≥ 2. temperature: |τ| ≥ 1e-8. Returns: 0-dim float32 loss.
    """
    check_views(("out0", "out1"), (out0, out1))
    if out0.shape[0] < 2:
        raise ValueError(f"out0 and out1 need at least 2 rows (DCL's negatives are the other samples), got "
                         f"{tuple(out0.shape)}")
    scale = 1.0 / check_temperature("temperature", temperature)
    x0, x1 = reference.l2_normalize(out0), reference.l2_normalize(out1)
    batch = x0.shape[0]
    if gather_distributed and distributed.world_size() > 1:
        rows = _dcl_gathered_rows(x0, x1, scale)
    else:
        embeddings = torch.cat([x0, x1])
        _, core = registry.select("info_nce_self_decoupled", backend, (embeddings,))
        rows = core(embeddings, torch.arange(batch, device=x0.device).repeat(2), True, scale)
    if weight_fn is None:
        return rows.mean()
    weights = []
    for a, b, name in ((x0, x1, "weight_fn(out0, out1)"), (x1, x0, "weight_fn(out1, out0)")):
        weight = weight_fn(a, b)
        try:  # lightly multiplies the (N,) positive term by it: anything that broadcasts to (N,)
            weights.append(torch.broadcast_to(torch.as_tensor(weight, device=a.device), (batch,)))
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"{name} must return weights that broadcast to ({batch},), got "
                             f"{tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__}") from None
    positive = scale * (x0 * x1).sum(dim=1)
    # ℓ − (w − 1)·s₊: the core's rows hold −s₊ + log Σ_neg
    return (rows - (torch.cat(weights).to(rows.dtype) - 1) * positive.repeat(2)).mean()


class DCLLoss(nn.Module):
    """DCL, as lightly's ``DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False)``;
    see :func:`fastssl.functional.dcl`."""

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__()
        self.temperature = check_temperature("temperature", temperature)
        self.weight_fn = weight_fn
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.backend = backend

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return dcl(out0, out1, self.temperature, self.weight_fn, gather_distributed=self.gather_distributed,
                   backend=self.backend)


class DCLWLoss(DCLLoss):
    """DCLW, as lightly's ``DCLWLoss(temperature=0.1, sigma=0.5, gather_distributed=False)``: DCL
    weighted by :func:`negative_mises_fisher_weights` with ``sigma``."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False, *,
                 backend: str = "auto"):
        super().__init__(temperature, functools.partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed, backend=backend)


class DirectCLRLoss(NTXentLoss):
    """DirectCLR (Jing et al., 2022), as lightly's ``DirectCLRLoss(loss_dim=64, temperature=0.5,
    memory_bank_size=0, gather_distributed=False)``: NT-Xent on the first ``loss_dim`` entries of
    the flattened representations (no projector)."""

    def __init__(self, loss_dim: int = 64, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto"):
        super().__init__(temperature=temperature, memory_bank_size=memory_bank_size,
                         gather_distributed=gather_distributed, backend=backend)
        self.loss_dim = loss_dim

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        return super().forward(out0.flatten(start_dim=1)[:, :self.loss_dim],
                               out1.flatten(start_dim=1)[:, :self.loss_dim])


def check_macl_parameters(temperature: float, alpha: float, A_0: float) -> None:
    """lightly's ``MACLLoss`` checks, with its messages."""
    if check_finite_number("temperature", temperature) < 1e-8:
        raise ValueError(f"Illegal initial temperature: abs({temperature}) < 1e-8")
    if not 0 <= check_finite_number("alpha", alpha) <= 1:
        raise ValueError("Alpha must be in the range [0, 1].")
    if not 0 <= check_finite_number("A_0", A_0) <= 1:
        raise ValueError("A_0 must be in the range [0, 1].")


# Up to this many rows (2B: both views) MACL runs lightly's direct form on the 2B × 2B logits
# (``_macl_plain_losses``) instead of the blocked op: there the op's fixed costs (its autograd
# wrapper, finding the positives from labels, the masks of the general label path) exceed its
# arithmetic. Measured (AMD EPYC, 1 thread, process clock, D=128, fwd+bwd, lightly's time / this
# path's, median of 7 alternating rounds; in parentheses the blocked op's): 1.30 at 128 rows per
# view (0.75), 1.57 at 256 (0.98), 1.81 at 512 (1.59), 1.69 at 768 (1.52), 1.67 at 1024 (2.18).
MACL_PLAIN_MAX_ROWS = 2 * 768


def _macl_plain_losses(x0: Tensor, x1: Tensor, inverse_t: Tensor) -> Tensor:
    """MACL's row losses −log p₊ (2B,) from the dense 2B × 2B logits of the normalised views
    x0, x1 (B, D) at 1/t = ``inverse_t`` (0-dim, no gradient): lightly's computation without its
    masked_select copy of the negatives (the row's own entry is −inf instead) and with 1/t applied
    to the 2B × D rows before the GEMM, not to the logits; one GEMM and one cross-entropy."""
    batch = x0.shape[0]
    rows = torch.cat([x0, x1])
    logits = ((rows * inverse_t) @ rows.T).fill_diagonal_(float("-inf"))
    other_view = torch.arange(2 * batch, device=rows.device).roll(batch)
    return F.cross_entropy(logits, other_view, reduction="none")


def macl(z0: Tensor, z1: Tensor, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0, *,
         backend: str = "auto") -> Tensor:
    r"""Model-aware contrastive learning (Huang et al., 2023), as lightly's ``MACLLoss``: NT-Xent's
    rows at the adaptive temperature :math:`t = \tau(1 + \alpha(A - A_0))`, A the batch's mean
    positive cosine (no gradient), each row's loss :math:`\ell_i = -\log p_{i^+}` weighted by
    :math:`V_i = 1/(1 - p_{i^+} + 10^{-8})` (no gradient): mean_i V_i ℓ_i.

    On the general InfoNCE core (O(N) memory): the rows are scaled by √|1/t| and one side by the
    sign of t, so the data-dependent temperature needs no host sync and compiles. On the torch
    backend, up to ``MACL_PLAIN_MAX_ROWS`` rows run the dense 2B × 2B logits instead (faster there).

    t = 0 (A = A₀ − 1/α, possible only with α·(1 + A₀) ≥ 1) is the formula's pole: the loss is
    not finite there, as in lightly.

    Args: z0, z1: (N, D). Returns: 0-dim float32 loss.
    """
    check_views(("z0", "z1"), (z0, z1))
    check_macl_parameters(temperature, alpha, A_0)
    chosen, core = registry.select("info_nce", backend, (z0, z1))
    x0, x1 = _normalized("info_nce", backend, z0, z1, chosen=chosen)
    batch = x0.shape[0]
    mean_positive = (x0.detach() * x1.detach()).sum(dim=1, dtype=compute_dtype(x0)).mean()  # half rows: triton's
    inverse_t = 1.0 / (temperature * (1 + alpha * (mean_positive - A_0)))
    if chosen == "torch" and 2 * batch <= MACL_PLAIN_MAX_ROWS:
        losses = _macl_plain_losses(x0, x1, inverse_t)
    else:
        keys = torch.cat([x0, x1]) * inverse_t.abs().sqrt()
        labels = torch.arange(batch, device=x0.device).repeat(2)
        losses = core(keys * inverse_t.sign(), keys, None, labels, labels, torch.arange(2 * batch, device=x0.device),
                      1.0, False)[0]
    weights = 1.0 / (1.0 - torch.exp(-losses.detach()) + 1e-8)
    return (weights * losses).mean()


class MACLLoss(nn.Module):
    """MACL, as lightly's ``MACLLoss(temperature=0.1, alpha=0.5, A_0=0.0)``; see
    :func:`fastssl.functional.macl`."""

    def __init__(self, temperature: float = 0.1, alpha: float = 0.5, A_0: float = 0.0, *, backend: str = "auto"):
        super().__init__()
        check_macl_parameters(temperature, alpha, A_0)
        self.temperature, self.alpha, self.A_0, self.backend = temperature, alpha, A_0, backend
        self.eps = 1e-08  # lightly's attribute

    def forward(self, z0: Tensor, z1: Tensor) -> Tensor:
        return macl(z0, z1, self.temperature, self.alpha, self.A_0, backend=self.backend)


def _check_region_masks(masks: Sequence[Tensor], shape: Tuple[int, int]) -> None:
    for name, mask in zip(("mask_view0", "mask_view1"), masks):
        if not isinstance(mask, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype.is_floating_point or mask.dtype.is_complex:
            raise TypeError(f"{name} must be an integer tensor of region indices, got {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{name} must have shape (B, M) = {shape} for views of shape (B, M, D), got "
                             f"{tuple(mask.shape)}")


def detcon(pred_view0: Tensor, pred_view1: Tensor, target_view0: Tensor, target_view1: Tensor,
           mask_view0: Tensor, mask_view1: Tensor, temperature: float = 0.1, *, gather_distributed: bool = False,
           backend: str = "auto") -> Tensor:
    r"""DetCon (Hénaff et al., 2021), as lightly's ``DetConBLoss``: region-level InfoNCE between the
    mask-pooled, normalised region embeddings of a prediction and a target branch (DetConS: both
    the same). For region i of view 0 of image b (row), with :math:`s = p\cdot t/\tau`, the
    positives are the target regions of view 1 of image b with the same mask index, and the
    target regions of view 0 of image b with the same index leave the denominator:

    .. math:: \ell_i = \frac{1}{A_i}\Big(\log\sum_{j \notin E_i} e^{s_{ij}} - \frac{1}{|P_i|}\sum_{j\in P_i} s_{ij}\Big)

    over the keys of both target views of every image (0 when :math:`P_i` is empty), with
    :math:`A_i` the number of view-0 regions of image b sharing i's index; the loss is the mean
    over view-0 rows plus the same with the views swapped.

    On the masked InfoNCE core (``info_nce_masked``): O(B·M) extra memory, where lightly forms
    four (B, M, B·W, M) logit tensors. The region labels are canonical indices (the first region
    of the image with the same mask index), so any integer mask indices work.

    Args:
        pred_view0, pred_view1, target_view0, target_view1: (B, M, D) float.
        mask_view0, mask_view1: (B, M) integer region indices (repeats allowed).
        temperature: |τ| ≥ 1e-8. gather_distributed: targets from every rank (with gradient).
    Returns:
        0-dim float32 loss (float64 for float64 inputs).
    """
    views = (pred_view0, pred_view1, target_view0, target_view1)
    check_views(("pred_view0", "pred_view1", "target_view0", "target_view1"), views, ndim=3)
    batch, regions, dim = pred_view0.shape
    _check_region_masks((mask_view0, mask_view1), (batch, regions))
    scale = 1.0 / check_temperature("temperature", temperature)
    world = distributed.world_size() if gather_distributed else 1
    first_image = distributed.rank() * batch if world > 1 else 0
    if world > 1:
        target_view0, target_view1 = distributed.gather(target_view0), distributed.gather(target_view1)

    def normalized(x: Tensor) -> Tensor:
        return reference.l2_normalize(x.reshape(-1, dim))

    queries = torch.cat([normalized(pred_view0), normalized(pred_view1)])
    keys = torch.cat([normalized(target_view0), normalized(target_view1)])
    # One label per (image, region index, view): the canonical index of a region is its image's
    # first region (of either view) with the same mask index.
    masks = torch.cat([mask_view0, mask_view1], dim=1)
    same = masks[:, :, None] == masks[:, None, :]  # (B, 2M, 2M)
    canonical = same.to(torch.int8).argmax(dim=2)
    image = torch.arange(batch, device=masks.device)[:, None] + first_image

    def label(view: int, canonical_index: Tensor) -> Tensor:
        return (((image + 1) * 2 + view) * (2 * regions) + canonical_index).reshape(-1)

    region0, region1 = canonical[:, :regions], canonical[:, regions:]
    query_labels = torch.cat([label(0, region0), label(1, region1)])
    # keys: [target view 0 of every image, target view 1 of every image]; a view-0 row's
    # positives are its image's view-1 targets (labelled as view-0 rows) and its exclusions
    # its image's view-0 targets; the other images' keys match no row (label −1).
    block = world * batch * regions
    positive_key_labels = torch.full((2 * block,), -1, dtype=torch.long, device=masks.device)
    excluded_key_labels = positive_key_labels.clone()
    local = slice(first_image * regions, (first_image + batch) * regions)
    positive_key_labels[local] = label(1, region0)
    positive_key_labels[block:][local] = label(0, region1)
    excluded_key_labels[local] = label(0, region0)
    excluded_key_labels[block:][local] = label(1, region1)
    # A_i: the view's regions of the image sharing row i's index; rows: view 0, then view 1
    area = torch.stack([same[:, :regions, :regions].sum(2), same[:, regions:, regions:].sum(2)]).reshape(-1)
    row_weights = 1.0 / (area * (batch * regions)).to(queries.dtype)  # each view's mean over its rows
    _, core = registry.select("info_nce_masked", backend, (queries, keys))
    return core(queries, keys, query_labels, positive_key_labels, excluded_key_labels, row_weights, scale,
                keys.requires_grad)


class DetConBLoss(nn.Module):
    """DetConB, as lightly's ``DetConBLoss(temperature=0.1, gather_distributed=True)``; see
    :func:`fastssl.functional.detcon`. forward(pred_view0, pred_view1, target_view0, target_view1,
    mask_view0, mask_view1)."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True, *, backend: str = "auto"):
        super().__init__()
        self.eps = 1e-8  # lightly's attribute
        self.temperature = check_temperature("temperature", temperature)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.backend = backend

    def forward(self, pred_view0: Tensor, pred_view1: Tensor, target_view0: Tensor, target_view1: Tensor,
                mask_view0: Tensor, mask_view1: Tensor) -> Tensor:
        return detcon(pred_view0, pred_view1, target_view0, target_view1, mask_view0, mask_view1, self.temperature,
                      gather_distributed=self.gather_distributed, backend=self.backend)


class DetConSLoss(nn.Module):
    """DetConS, as lightly's ``DetConSLoss(temperature=0.1, gather_distributed=True)``: DetConB with
    each view its own target. forward(view0, view1, mask_view0, mask_view1)."""

    def __init__(self, temperature: float = 0.1, gather_distributed: bool = True, *, backend: str = "auto"):
        super().__init__()
        self.detconbloss = DetConBLoss(temperature, gather_distributed, backend=backend)

    def forward(self, view0: Tensor, view1: Tensor, mask_view0: Tensor, mask_view1: Tensor) -> Tensor:
        return self.detconbloss(view0, view1, view0, view1, mask_view0, mask_view1)
