"""The redundancy-reduction family: Barlow Twins, VICReg and VICRegL on one Gram/covariance core.

Public API: :func:`barlow_twins`, :func:`vicreg`, :func:`vicregl`, :class:`BarlowTwinsLoss`,
:class:`VICRegLoss`, :class:`VICRegLLoss`.
Core ops: ``barlow_twins``, ``vicreg_variance_covariance`` and VICRegL's ``mutual_nearest_neighbors``.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..runtime import distributed, registry
from ..runtime.dtypes import compute_dtype
from ..runtime.validation import (
    check_batch_at_least,
    check_choice,
    check_distributed_available,
    check_finite_number,
    check_float_tensor,
    check_int_at_least,
    check_non_negative,
    check_same_device,
    check_same_dtype,
    check_views,
    InputError,
)
from . import reference
from .torch_backend import ALGORITHMS

# Up to this many entries per (B, D) view, ``backend="auto"`` VICReg runs lightly's own order of
# operations as plain autograd ops (``reference.vicreg``, no op), for the same bits as lightly:
# lightly's tests compare its loss with the paper's code exactly, at 2 × 32. The price, measured
# (fwd+bwd, 1 thread, process clock, 7 alternating rounds, min–median–max): at 2 × 32 the plain
# path took 608–650–726 µs, lightly 637–663–688 and the fused op 547–582–643; at 64 × 64 the op
# is 1.4× lightly (627 against 906 median), so larger views and grouped (B, G, D) ones take the op.
LIGHTLY_ORDER_MAX_ENTRIES = 256

Tensor = torch.Tensor


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

        >>> loss = fastssl.barlow_twins(projector(y1), projector(y2))
    """
    check_views(("z_a", "z_b"), (z_a, z_b))
    check_batch_at_least("z_a", z_a, 2, "batch-norm statistics need two rows")
    lambda_param = check_non_negative("lambda_param", lambda_param)
    check_choice("distributed_convention", distributed_convention, ("global", "lightly"))
    check_choice("algorithm", algorithm, ALGORITHMS)
    scale_loss = check_finite_number("scale_loss", scale_loss)
    world = distributed.world_size() if gather_distributed else 1
    if world > 1 and distributed_convention == "lightly":
        return scale_loss * reference.barlow_twins_lightly_distributed(z_a, z_b, lambda_param, world)
    if world > 1:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    chosen, core = registry.select("barlow_twins", backend, (z_a, z_b))
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

        >>> loss = fastssl.vicreg(expander(y1), expander(y2))
    """
    check_float_tensor("z_a", z_a, min_ndim=2)
    check_float_tensor("z_b", z_b, min_ndim=2)
    # lightly asserts these two, in this order: InputError is caught by `except AssertionError` too
    if z_a.shape[0] < 2 or z_b.shape[0] < 2:
        raise InputError(f"z_a and z_b must have batch size > 1 (the unbiased variance needs two rows) but "
                         f"found {z_a.shape[0]} and {z_b.shape[0]}: z_a {tuple(z_a.shape)}, z_b {tuple(z_b.shape)}")
    if z_a.shape != z_b.shape:
        raise InputError(f"z_a and z_b must have same shape but found z_a {tuple(z_a.shape)} and "
                         f"z_b {tuple(z_b.shape)}.")
    check_same_dtype(("z_a", "z_b"), (z_a, z_b))
    check_same_device(("z_a", "z_b"), (z_a, z_b))
    for name, value in (("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param)):
        check_non_negative(name, value)
    eps = check_non_negative("eps", eps)
    check_choice("algorithm", algorithm, ALGORITHMS)
    gathers = gather_distributed and distributed.world_size() > 1
    lightly_sized = z_a.dim() == 2 and z_a.numel() <= LIGHTLY_ORDER_MAX_ENTRIES
    if lightly_sized and not gathers and registry.requested_backend(backend) == "auto":
        return reference.vicreg(z_a, z_b, lambda_param, mu_param, nu_param, eps)
    grouped = [z.reshape(z.shape[0], -1, z.shape[-1]) for z in (z_a, z_b)]
    chosen = registry.select("vicreg_variance_covariance", backend, grouped)[0]
    if chosen in registry.MANIFEST["vicreg"] and not gathers:
        # the whole loss in one op (its gradients in closed form, in the same pass), where it exists
        core = registry.select("vicreg", chosen, grouped)[1]
        return core(*grouped, lambda_param, mu_param, nu_param, eps, algorithm)
    invariance = reference.invariance(z_a, z_b)
    variance, covariance = _variance_covariance(z_a, z_b, eps, gather_distributed, algorithm, backend)
    return lambda_param * invariance + mu_param * variance + nu_param * covariance


def _variance_covariance(z_a: Tensor, z_b: Tensor, eps: float, gather_distributed: bool, algorithm: str,
                         backend: str) -> Tuple[Tensor, Tensor]:
    """VICReg's (variance, covariance) terms of two validated (B, …, D) views through the fused
    ``vicreg_variance_covariance`` op, on the batch gathered from every rank when asked."""
    if gather_distributed and distributed.world_size() > 1:
        z_a, z_b = distributed.gather(z_a), distributed.gather(z_b)
    grouped = [z.reshape(z.shape[0], -1, z.shape[-1]) for z in (z_a, z_b)]
    chosen, core = registry.select("vicreg_variance_covariance", backend, grouped)
    options = () if chosen == "reference" else (algorithm,)
    variance, covariance = core(grouped[0], grouped[1], eps, *options).unbind()
    return variance, covariance


class BarlowTwinsLoss(nn.Module):
    """Barlow Twins, as lightly's ``BarlowTwinsLoss``; see :func:`fastssl.barlow_twins`.

    Example::

        >>> loss = BarlowTwinsLoss()(z_a, z_b)   # z: (N, D)
    """

    def __init__(self, lambda_param: float = 5e-3, gather_distributed: bool = False, *,
                 distributed_convention: str = "global", scale_loss: float = 1.0, algorithm: str = "auto",
                 backend: str = "auto"):
        super().__init__()
        self.lambda_param = check_non_negative("lambda_param", lambda_param)
        check_choice("distributed_convention", distributed_convention, ("global", "lightly"))
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.distributed_convention, self.scale_loss, self.backend = distributed_convention, scale_loss, backend

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return barlow_twins(
            z_a, z_b, self.lambda_param, gather_distributed=self.gather_distributed,
            distributed_convention=self.distributed_convention, scale_loss=self.scale_loss,
            algorithm=self.algorithm, backend=self.backend)


class VICRegLoss(nn.Module):
    """VICReg, as lightly's ``VICRegLoss``; see :func:`fastssl.vicreg`.

    Example::

        >>> loss = VICRegLoss()(z_a, z_b)   # z: (B, D) or (B, ..., D)
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 gather_distributed: bool = False, eps: float = 0.0001, *, algorithm: str = "auto",
                 backend: str = "auto"):
        super().__init__()
        self.lambda_param = check_non_negative("lambda_param", lambda_param)
        self.mu_param = check_non_negative("mu_param", mu_param)
        self.nu_param = check_non_negative("nu_param", nu_param)
        self.eps = check_non_negative("eps", eps)
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.backend = backend

    def forward(self, z_a: Tensor, z_b: Tensor) -> Tensor:
        return vicreg(z_a, z_b, self.lambda_param, self.mu_param, self.nu_param, self.eps,
                                 gather_distributed=self.gather_distributed, algorithm=self.algorithm,
                                 backend=self.backend)


# --------------------------------------------------------------------------------------------
# VICRegL
# --------------------------------------------------------------------------------------------
ViewFeatures = Sequence[Tuple[Tensor, Tensor]]


def vicregl(
    global_view_features: ViewFeatures,
    global_view_grids: Sequence[Tensor],
    local_view_features: Optional[ViewFeatures] = None,
    local_view_grids: Optional[Sequence[Tensor]] = None,
    lambda_param: float = 25.0,
    mu_param: float = 25.0,
    nu_param: float = 1.0,
    alpha: float = 0.75,
    eps: float = 1e-4,
    num_matches: Tuple[Optional[int], Optional[int]] = (20, 4),
    *,
    gather_distributed: bool = False,
    algorithm: str = "auto",
    backend: str = "auto",
) -> Tensor:
    r"""VICRegL: α · global VICReg + (1 − α) · local VICReg on matched feature-map cells, as lightly's
    ``VICRegLLoss``.

    Each view is a pair (global features (B, D), local feature map (B, H, W, C)) with a grid
    (B, H, W, 2) of the cells' image coordinates; global views first, local (small-crop) views
    optional, grids of any H, W per view.

    * global = λ · mean over ordered pairs (global a, view b ≠ a) of MSE + μ · mean over views of
      the variance hinge + ν · mean over views of Σ_{i≠j} Cov_ij² / D;
    * local = mean over the same pairs (a global, b any other) of ½(l2 + location), each
      ½(VICReg(a's matches) + VICReg(b's matches)) with weights (λ, μ, ν/2) (lightly's VICReg
      covariance is twice VICRegL's): every cell of a is matched to its nearest cell of b, in
      feature space (l2) or in image space (location), and the ``num_matches[0]`` closest such
      pairs are kept, in increasing distance (the order is the groups' order in VICReg's
      statistics); the same from b to a with ``num_matches[1]``. ``None``, −1 or more than the
      cells: every cell.

    Which parts are fused: the variance and covariance terms of all views (global and the
    matched local cells) go through the ``vicreg_variance_covariance`` op (Gram path when
    B < D, closed-form backward, no D×D); the views are its groups, so all global views are one
    call and all matches with the same count one call (their terms average exactly as lightly's
    per-call losses do). The nearest-neighbour search is the ``mutual_nearest_neighbors`` op: a
    global view against all same-sized views at once, both directions from one distance block per
    group of images, no gradient, O(block · Na · S · Nb) memory. Plain torch: the invariance MSEs (elementwise, nothing to fuse), the top-k of each
    image's Na match distances and the gather of the matched rows (index tensors of B · k; the
    gather is what carries the gradient back to the feature maps).

    With ``gather_distributed``, every variance and covariance term uses the batch gathered
    from all ranks (with gradient), invariance terms the local batch; matching is per image.

    Returns: a (1,)-shaped tensor (lightly's shape), float32 (float64 for float64 inputs); NaN
    where lightly's is (one global view and no local view: no pair to average).

    Example::

        >>> loss = fastssl.vicregl([(g1, l1), (g2, l2)], [grid1, grid2])
    """
    globals_, locals_ = _check_vicregl_views(global_view_features, global_view_grids, local_view_features,
                                             local_view_grids)
    for name, value in (("lambda_param", lambda_param), ("mu_param", mu_param), ("nu_param", nu_param),
                        ("eps", eps)):
        check_non_negative(name, value)
    alpha = check_finite_number("alpha", alpha)
    num_matches = _check_num_matches(num_matches)
    check_choice("algorithm", algorithm, ALGORITHMS)
    options = dict(gather_distributed=gather_distributed, algorithm=algorithm, backend=backend)
    globals_, locals_ = _in_compute_dtype(globals_, locals_)
    global_loss = _vicregl_global([view[0] for view in globals_], [view[0] for view in locals_], lambda_param,
                                  mu_param, nu_param, eps, options)
    local_loss = _vicregl_local(globals_, locals_, (lambda_param, mu_param, 0.5 * nu_param, eps), num_matches,
                                options)
    return (alpha * global_loss + (1 - alpha) * local_loss).reshape(1)


def _check_vicregl_views(global_view_features, global_view_grids, local_view_features, local_view_grids):
    """lightly's length checks (its ValueErrors, word for word), then the shapes; returns the
    global and local views as lists of (global features (B, D), local map (B, H, W, C), grid
    (B, H, W, 2))."""
    if len(global_view_features) != len(global_view_grids):
        raise ValueError(f"global_view_features and global_view_grids must have same length "
                         f"but found {len(global_view_features)} and {len(global_view_grids)}.")
    if local_view_features is not None and local_view_grids is not None:
        if len(local_view_features) != len(local_view_grids):
            raise ValueError(f"local_view_features and local_view_grids must have same length "
                             f"but found {len(local_view_features)} and {len(local_view_grids)}.")
    elif local_view_features is not None or local_view_grids is not None:
        raise ValueError(f"local_view_features and local_view_grids must either both be set or "
                         f"None but found {type(local_view_features)} and {type(local_view_grids)}.")
    if len(global_view_features) == 0:
        raise ValueError("global_view_features must hold at least one view, got 0")
    named = [("global_view", f, g) for f, g in zip(global_view_features, global_view_grids)]
    named += [("local_view", f, g) for f, g in zip(local_view_features or (), local_view_grids or ())]
    views = []
    for index, (kind, pair, grid) in enumerate(named):
        position = index if kind == "global_view" else index - len(global_view_features)
        names = (f"{kind}_features[{position}][0]", f"{kind}_features[{position}][1]", f"{kind}_grids[{position}]")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"{kind}_features[{position}] must be a (global_features, local_features) pair, "
                            f"got {type(pair).__name__}")
        features, local_map = pair
        check_float_tensor(names[0], features, ndim=2)
        check_float_tensor(names[1], local_map, ndim=4)
        check_float_tensor(names[2], grid, ndim=4)
        if grid.shape[:3] != local_map.shape[:3]:
            raise ValueError(f"{names[2]} must have the (batch, height, width) of {names[1]}, got shapes "
                             f"{tuple(grid.shape)} and {tuple(local_map.shape)}")
        views.append((names, features, local_map, grid))
    first_names, first, first_map, first_grid = views[0]
    for names, features, local_map, grid in views[1:]:
        check_views((first_names[0], names[0]), (first, features))
        check_same_dtype((first_names[1], names[1]), (first_map, local_map))
        check_same_device((first_names[0], names[1], names[2]), (first, local_map, grid))
        if local_map.shape[0] != first.shape[0] or local_map.shape[-1] != first_map.shape[-1]:
            raise ValueError(f"{names[1]} must have the batch of {first_names[0]} and the feature dimension of "
                             f"{first_names[1]}, got shapes {tuple(local_map.shape)}, {tuple(first.shape)} and "
                             f"{tuple(first_map.shape)}")
        if grid.shape[-1] != first_grid.shape[-1]:
            raise ValueError(f"{names[2]} must have the coordinates of {first_names[2]}, got shapes "
                             f"{tuple(grid.shape)} and {tuple(first_grid.shape)}")
    check_same_device((first_names[0], first_names[1], first_names[2]), (first, first_map, first_grid))
    if first.shape[0] < 2:  # lightly's VICRegLoss asserts it
        raise InputError(f"{first_names[0]} must have batch size > 1 (the unbiased variance needs two rows), got "
                         f"shape {tuple(first.shape)}")
    flat = [(features, local_map, grid) for _, features, local_map, grid in views]
    return flat[:len(global_view_features)], flat[len(global_view_features):]


def _in_compute_dtype(globals_, locals_):
    """The views' features in the compute dtype (a copy for fp16/bf16 only), so that the gradients
    a feature collects from its many terms (and a cell from its many matches) add up in float32 and
    are rounded to the input dtype once. A tensor given twice stays one tensor (lightly pairs
    views by identity)."""
    dtype = compute_dtype(globals_[0][0], globals_[0][1])
    converted = {}

    def convert(tensor):
        if id(tensor) not in converted:
            converted[id(tensor)] = tensor.to(dtype)
        return converted[id(tensor)]

    return ([(convert(features), convert(local_map), grid) for features, local_map, grid in views]
            for views in (globals_, locals_))


def _check_num_matches(num_matches) -> Tuple[Optional[int], Optional[int]]:
    """lightly's num_matches: two counts, each a positive int, or None / −1 for every cell."""
    if not isinstance(num_matches, (tuple, list)) or len(num_matches) != 2:
        raise TypeError(f"num_matches must be a pair of ints, got {num_matches!r}")
    for index, count in enumerate(num_matches):
        if count is None or count == -1:
            continue
        check_int_at_least(f"num_matches[{index}]", count, 1)
    return tuple(num_matches)


def _vicregl_global(globals_, locals_, lambda_param, mu_param, nu_param, eps, options) -> Tensor:
    """The global VICReg term of VICRegL's views' (B, D) global features (see :func:`vicregl`)."""
    terms, pairs = [], 0
    for i, a in enumerate(globals_):
        for b in globals_[i + 1:]:
            if a is not b:  # lightly skips a view paired with itself, by identity; MSE is symmetric
                terms.append(2 * reference.invariance(a, b))
                pairs += 2
        for b in locals_:
            terms.append(reference.invariance(a, b))
            pairs += 1
    views = globals_ + locals_
    # The views are the op's groups: variance = mean over views, covariance = 2 × mean over views
    # (the op sums its two operands' group means); an odd count pairs all views with themselves.
    half = len(views) // 2
    operands = (views[:half], views[half:]) if len(views) % 2 == 0 else (views, views)
    variance, covariance = _variance_covariance(*(torch.stack(part, dim=1) for part in operands), eps,
                                                options["gather_distributed"], options["algorithm"],
                                                options["backend"])
    invariance = torch.stack(terms).sum() / pairs if terms else variance.new_tensor(math.nan)
    return lambda_param * invariance + mu_param * variance + nu_param * 0.5 * covariance


def _segments(views):
    """Runs of consecutive views with the same number of cells: (first view, last view + 1)."""
    runs = []
    for index, (_, local_map, _) in enumerate(views):
        cells = local_map.shape[1] * local_map.shape[2]
        if runs and cells == runs[-1][2]:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1, cells])
    return [(first, stop) for first, stop, _ in runs]


def _match_count(count, cells):
    """lightly's num_matches rule: None, −1 or more than the cells: every cell."""
    return cells if count is None or count == -1 or count > cells else count


def _vicregl_local(globals_, locals_, vicreg_params, num_matches, options) -> Tensor:
    """The local term of :func:`vicregl`: matches by feature and by grid distance, both ways, for
    every ordered pair (global a, view b ≠ a), grouped by match count into one VICReg call each.

    All feature maps are rows of one (B, Σ H·W, C) tensor; each global view is searched against
    each run of same-sized views at once (one op call for all of them, the pairs lightly skips
    dropped after), and the matched rows of every pair with the same count are gathered at once.
    """
    views = globals_ + locals_
    batch, dim = views[0][1].shape[0], views[0][1].shape[-1]
    cells = torch.cat([local_map.flatten(1, 2) for _, local_map, _ in views], dim=1)
    points = (cells.detach(), torch.cat([grid.flatten(1, 2) for _, _, grid in views], dim=1).detach())
    offsets = [0]
    for _, local_map, _ in views:
        offsets.append(offsets[-1] + local_map.shape[1] * local_map.shape[2])
    search = registry.select("mutual_nearest_neighbors", options["backend"], points[:1])[1]
    rows_by_count = {}  # match count k → ([filtered rows (B, ·)], [matched rows (B, ·)]) into ``cells``
    pairs = 0
    for a in range(len(globals_)):
        for first, stop in _segments(views):
            kept = [b for b in range(first, stop)
                    if b != a and not (b < len(globals_) and views[a][1] is views[b][1])]
            if not kept:
                continue
            pairs += len(kept)
            keep = torch.tensor([b - first for b in kept], device=cells.device)
            size = offsets[first + 1] - offsets[first]
            segment_offsets = (offsets[first] + size * keep).view(1, -1, 1)  # each kept view's first row
            for found in points:
                segment = found[:, offsets[first]:offsets[stop]].unflatten(1, (stop - first, size))
                a_index, a_distance, b_index, b_distance = (t.index_select(1, keep)
                                                            for t in search(found[:, offsets[a]:offsets[a + 1]], segment))
                for index, distance, count, source, target in (
                        (a_index, a_distance, num_matches[0], offsets[a], segment_offsets),
                        (b_index, b_distance, num_matches[1], segment_offsets, offsets[a])):
                    k = _match_count(count, distance.shape[2])
                    closest = distance.topk(k, dim=2, largest=False).indices  # (B, kept, k), increasing distance
                    filtered, matched = rows_by_count.setdefault(k, ([], []))
                    filtered.append((closest + source).flatten(1))
                    matched.append((index.gather(2, closest) + target).flatten(1))
    if pairs == 0:
        return cells.new_tensor(math.nan)
    total = 0.0
    for k, (filtered, matched) in rows_by_count.items():
        z_a, z_b = (cells.gather(1, torch.cat(rows, dim=1).unsqueeze(-1).expand(batch, -1, dim))
                    for rows in (filtered, matched))
        # (B, calls·k, C): the calls are VICReg's groups, whose terms it averages; × calls for their sum
        total = total + z_a.shape[1] // k * vicreg(z_a, z_b, *vicreg_params, **options)
    return total / (2 * pairs)


class VICRegLLoss(nn.Module):
    """VICRegL, as lightly's ``VICRegLLoss`` (with its ``vicreg_loss`` submodule, ν halved); see
    :func:`fastssl.vicregl`.

    Example::

        >>> loss = VICRegLLoss()(global_view_features=[(g1, l1), (g2, l2)], global_view_grids=[grid1, grid2])
    """

    def __init__(self, lambda_param: float = 25.0, mu_param: float = 25.0, nu_param: float = 1.0,
                 alpha: float = 0.75, gather_distributed: bool = False, eps: float = 0.0001,
                 num_matches: Tuple[int, int] = (20, 4), *, algorithm: str = "auto", backend: str = "auto"):
        super().__init__()
        self.alpha = check_finite_number("alpha", alpha)
        self.num_matches = _check_num_matches(num_matches)
        self.lambda_param = check_non_negative("lambda_param", lambda_param)
        self.mu_param = check_non_negative("mu_param", mu_param)
        self.nu_param = check_non_negative("nu_param", nu_param)
        self.eps = check_non_negative("eps", eps)
        self.gather_distributed = check_distributed_available("gather_distributed", gather_distributed)
        self.algorithm = check_choice("algorithm", algorithm, ALGORITHMS)
        self.backend = backend
        # lightly's: VICReg's covariance is twice VICRegL's, hence ν/2 for the local terms
        self.vicreg_loss = VICRegLoss(lambda_param, mu_param, 0.5 * nu_param, gather_distributed, eps,
                                      algorithm=algorithm, backend=backend)

    def forward(self, global_view_features: ViewFeatures, global_view_grids: Sequence[Tensor],
                local_view_features: Optional[ViewFeatures] = None,
                local_view_grids: Optional[Sequence[Tensor]] = None) -> Tensor:
        return vicregl(global_view_features, global_view_grids, local_view_features, local_view_grids,
                       self.lambda_param, self.mu_param, self.nu_param, self.alpha, self.eps, self.num_matches,
                       gather_distributed=self.gather_distributed, algorithm=self.algorithm, backend=self.backend)
