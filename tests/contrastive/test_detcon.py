"""DetConB and DetConS (region-level InfoNCE over mask-pooled embeddings) on every backend of the
masked InfoNCE core, against lightly 1.6's formula in float64 (tests/oracles.py), within bounds
derived from the computation (tests/helpers.py)."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import DetConBLoss, DetConSLoss
from fastssl.contrastive import torch_backend as contrastive

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_within, backend_params, ce_bound,
                     half_error_within_twice_reference, info_nce_grad_bound, seeded_views, unit_roundoff)
from oracles import lightly_detcon64

# (batch B, regions M, dim D, distinct mask indices): few indices repeat within an image
SHAPES = [pytest.param((4, 5, 8, 3), id="4x5x8-repeats"), pytest.param((3, 7, 6, 40), id="3x7x6-distinct"),
          pytest.param((1, 4, 5, 2), id="batch-1")]
TEMPERATURES = [pytest.param(0.1, id="tau0.1"), pytest.param(0.05, id="tau0.05"), pytest.param(-0.3, id="tau-0.3")]


@pytest.fixture(params=["one-block", "small-blocks-sparse", "small-blocks-dense"])
def blocking(request, monkeypatch):
    """All rows in one block, or blocks of 16 rows with the positives and exclusions as explicit
    pairs or as a label comparison per block (the two ways the core finds them)."""
    if request.param != "one-block":
        monkeypatch.setattr(contrastive, "BLOCK_ELEMENTS", 1)
    if request.param.endswith("dense"):
        monkeypatch.setattr(contrastive, "MAX_PAIRS_PER_ROW", 0)
    return request.param


def region_inputs(b, m, d, distinct, dtype=torch.float32, seed=0):
    """Four correlated (B, M, D) views (two predictions, two targets) and two (B, M) masks."""
    views = seeded_views(b, m, d, count=4, noise=0.6, dtype=dtype, seed=seed, grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    masks = [torch.randint(0, distinct, (b, m), generator=g) for _ in range(2)]
    return views, masks


def detcon_blocks(masks, b, m, weights, shared):
    """``info_nce_grad_bound``'s blocks of DetCon: rows [p0; p1] against keys [t0; t1] (after the
    rows in ``vectors``, or the rows themselves when ``shared``: DetConS), positives the other
    view's regions of the image with the same index, the own view's out of the softmax."""
    mask0, mask1 = (mk.reshape(-1) for mk in masks)
    image = torch.arange(b).repeat_interleave(m)
    same_image = image[:, None] == image[None, :]
    rows_of = [torch.arange(b * m), torch.arange(b * m, 2 * b * m)]
    keys = torch.arange(2 * b * m) + (0 if shared else 2 * b * m)
    blocks = []
    for view, (mask, other) in enumerate(((mask0, mask1), (mask1, mask0))):
        positive_other = same_image & (mask[:, None] == other[None, :])
        excluded_own = same_image & (mask[:, None] == mask[None, :])
        own_first = view == 0  # keys: [t0; t1]
        positive = torch.cat([torch.zeros_like(positive_other), positive_other] if own_first
                             else [positive_other, torch.zeros_like(positive_other)], dim=1)
        allowed = ~torch.cat([excluded_own, torch.zeros_like(excluded_own)] if own_first
                             else [torch.zeros_like(excluded_own), excluded_own], dim=1)
        blocks.append((rows_of[view], keys, allowed, positive, weights[view * b * m:(view + 1) * b * m, None]))
    return blocks


def detcon_value_bound(rows, weights, d, temperature, candidates, u):
    """Σ wᵢ/R · ce_bound(ℓᵢ) over the 2·B·M rows (R = B·M per view's mean)."""
    per_row = ce_bound(rows, d, abs(1 / temperature), candidates, rows=rows.numel(), u=u)
    return (weights * per_row).sum().item() / (rows.numel() // 2)


@pytest.mark.parametrize("backend", backend_params("info_nce_masked"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_detconb_equals_float64(backend, dtype, shape, temperature, blocking):
    b, m, d, distinct = shape
    views, masks = region_inputs(b, m, d, distinct, dtype)
    loss = DetConBLoss(temperature, gather_distributed=False, backend=backend)(*views, *masks)
    exact_views = [v.detach().double().requires_grad_(True) for v in views]
    exact, rows, weights = lightly_detcon64(*exact_views, *masks, temperature)
    u = unit_roundoff(dtype)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_within(loss, exact, detcon_value_bound(rows.detach(), weights, d, temperature, 4 * b * m, u), "loss")
    grads = torch.autograd.grad(loss, views)
    exact_grads = torch.autograd.grad(exact, exact_views)
    vectors = torch.cat([v.detach().reshape(-1, d) for v in exact_views])
    bound = info_nce_grad_bound(vectors, detcon_blocks(masks, b, m, weights / (b * m), False), 1 / temperature, u)
    for index, (got, want) in enumerate(zip(grads, exact_grads)):
        assert_within(got, want, bound[index * b * m:(index + 1) * b * m].reshape(b, m, 1), f"gradient {index}")


@pytest.mark.parametrize("backend", backend_params("info_nce_masked"))
@pytest.mark.parametrize("shape", SHAPES)
def test_detcons_is_detconb_with_each_view_its_own_target(backend, shape, blocking):
    b, m, d, distinct = shape
    (v0, v1, _, _), masks = region_inputs(b, m, d, distinct)
    loss = DetConSLoss(0.1, gather_distributed=False, backend=backend)(v0, v1, *masks)
    x0, x1 = (v.detach().double().requires_grad_(True) for v in (v0, v1))
    exact, rows, weights = lightly_detcon64(x0, x1, x0, x1, *masks, 0.1)
    assert_within(loss, exact, detcon_value_bound(rows.detach(), weights, d, 0.1, 4 * b * m, unit_roundoff(v0.dtype)),
                  "loss")
    grads = torch.autograd.grad(loss, (v0, v1))
    exact_grads = torch.autograd.grad(exact, (x0, x1))
    vectors = torch.cat([x0.detach().reshape(-1, d), x1.detach().reshape(-1, d)])
    bound = info_nce_grad_bound(vectors, detcon_blocks(masks, b, m, weights / (b * m), True), 10.0)
    for index, (got, want) in enumerate(zip(grads, exact_grads)):
        assert_within(got, want, bound[index * b * m:(index + 1) * b * m].reshape(b, m, 1), f"gradient {index}")


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_detcon_half_inputs_within_twice_a_half_peers_error(dtype):
    views, masks = region_inputs(4, 6, 16, 4, dtype)
    loss = DetConBLoss(0.1, gather_distributed=False)(*views, *masks)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, views)
    assert all(g.dtype == dtype for g in grads)
    exact_views = [v.detach().double().requires_grad_(True) for v in views]
    exact = lightly_detcon64(*exact_views, *masks, 0.1)[0]
    half_views = [v.detach().clone().requires_grad_(True) for v in views]
    naive = lightly_detcon64(*half_views, *masks, 0.1, dtype=dtype)[0]
    half_error_within_twice_reference(loss.detach(), naive.detach(), exact.detach())
    exact_grads = torch.autograd.grad(exact, exact_views)
    for got, ref, want in zip(grads, torch.autograd.grad(naive, half_views), exact_grads):
        half_error_within_twice_reference(got, ref, want)


def test_detcon_mask_indices_are_only_compared():
    """Any integer indices (large, negative, int32) give the loss of their equality pattern."""
    views, (mask0, mask1) = region_inputs(3, 6, 5, 3)
    base = fn.detcon(*views, mask0, mask1)
    for relabel in (lambda x: x * 1_000_003 - 7, lambda x: -x, lambda x: x.to(torch.int32) + 2 ** 30):
        torch.testing.assert_close(fn.detcon(*views, relabel(mask0), relabel(mask1)), base, rtol=0, atol=0)


def test_detcon_region_without_a_positive_adds_nothing():
    """A view-0 region whose index is absent from view 1 has no positive: lightly's weight 0."""
    views, _ = region_inputs(2, 3, 4, 3)
    mask0 = torch.tensor([[0, 1, 2], [0, 1, 2]])
    mask1 = torch.tensor([[0, 1, 1], [5, 6, 7]])  # image 1: no region of either view matches
    loss = fn.detcon(*views, mask0, mask1, 0.2)
    exact, rows, weights = lightly_detcon64(*(v.detach().double() for v in views), mask0, mask1, 0.2)
    assert (weights.view(2, 2, 3)[:, 1] == 0).all() and (weights.view(2, 2, 3)[0, 0, 2] == 0)
    assert_within(loss, exact, detcon_value_bound(rows, weights, 4, 0.2, 24, unit_roundoff(torch.float32)), "loss")


def test_detcon_modules_are_lightlys():
    loss = DetConBLoss()
    assert (loss.temperature, loss.gather_distributed, loss.eps) == (0.1, True, 1e-8)
    assert list(loss.state_dict()) == []
    single = DetConSLoss(temperature=0.3, gather_distributed=False)
    assert isinstance(single.detconbloss, DetConBLoss) and single.detconbloss.temperature == 0.3
    assert list(single.state_dict()) == []
    views, masks = region_inputs(2, 3, 4, 2)
    torch.testing.assert_close(fastssl.detcon(*views, *masks, 0.1, backend="torch"), loss(*views, *masks), rtol=0,
                               atol=0)


BAD_INPUTS = [
    pytest.param(lambda: DetConBLoss(temperature=1e-9), ValueError, r"Illegal temperature", id="temperature"),
    pytest.param(lambda: DetConBLoss()(*[torch.randn(2, 3)] * 4, *[torch.zeros(2, 3, dtype=torch.long)] * 2),
                 ValueError, r"pred_view0 must have 3 dim", id="2d-views"),
    pytest.param(lambda: DetConBLoss()(*[torch.randn(2, 3, 4)] * 3, torch.randn(2, 4, 4),
                                       *[torch.zeros(2, 3, dtype=torch.long)] * 2),
                 ValueError, r"same shape.*target_view1 \(2, 4, 4\)", id="view-shapes"),
    pytest.param(lambda: DetConBLoss()(*[torch.randn(2, 3, 4)] * 4, torch.zeros(2, 4, dtype=torch.long),
                                       torch.zeros(2, 3, dtype=torch.long)),
                 ValueError, r"mask_view0 must have shape \(B, M\) = \(2, 3\).*\(2, 4\)", id="mask-shape"),
    pytest.param(lambda: DetConBLoss()(*[torch.randn(2, 3, 4)] * 4, torch.zeros(2, 3), torch.zeros(2, 3)),
                 TypeError, r"mask_view0 must be an integer tensor", id="float-mask"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_detcon_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_detcon_gathering_without_torch_distributed_raises_like_lightly(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for make in (DetConBLoss, DetConSLoss):
        with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not available"):
            make()


@pytest.mark.parametrize("backend", backend_params("info_nce_masked"))
def test_detcon_targets_without_gradient_give_the_same_prediction_gradients(backend):
    """BYOL's targets take no gradient: the fused path skips their GEMM, the predictions' is unchanged."""
    views, masks = region_inputs(3, 5, 6, 3)
    full = torch.autograd.grad(fn.detcon(*views, *masks, backend=backend), views[:2])
    targets = [v.detach() for v in views[2:]]
    loss = fn.detcon(*views[:2], *targets, *masks, backend=backend)
    for got, want in zip(torch.autograd.grad(loss, views[:2]), full):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_detcon_is_differentiable_once():
    views, masks = region_inputs(2, 3, 4, 2)
    loss = fn.detcon(*views, *masks, backend="torch")
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, views[0], create_graph=True)
