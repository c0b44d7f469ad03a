"""DCL and DCLW (decoupled contrastive learning) on every backend against lightly 1.6's formula in
float64 (tests/oracles.py), within bounds derived from the computation (tests/helpers.py)."""
import functools

import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.functional as fn
from fastssl import DCLLoss, DCLWLoss
from fastssl.contrastive import torch_backend as contrastive

from helpers import (FLOAT_DTYPES, U32, assert_info_nce_grads_within, assert_within, backend_params, dcl_blocks,
                     gamma, info_nce_grad_bound, logit_error, normalized_entry_error, seeded_views, unit_roundoff)
from oracles import lightly_dcl64, mises_fisher_weights64

SHAPES = [pytest.param((6, 9), id="6x9"), pytest.param((21, 5), id="21x5")]
TEMPERATURES = [pytest.param(0.1, id="tau0.1"), pytest.param(0.05, id="tau0.05"), pytest.param(-0.3, id="tau-0.3")]


@pytest.fixture(params=["one-tile", "small-tiles-sparse", "small-tiles-dense"])
def tiling(request, monkeypatch):
    """The whole batch in one tile, or tiles of 16×16 with explicit positive pairs or a label
    comparison per tile (the two ways the core finds positives)."""
    if request.param != "one-tile":
        monkeypatch.setattr(contrastive, "TILE_ELEMENTS", 16 * 16)
    if request.param.endswith("dense"):
        monkeypatch.setattr(contrastive, "MAX_PAIRS_PER_ROW", 0)
    return request.param


def views(n, d, dtype=torch.float32):
    return seeded_views(n, d, noise=0.7, dtype=dtype, grad=True)


def dcl_value_bound(out0, out1, temperature, weights=None, weight_error=None, u=U32):
    """|δL| of DCL: per row ℓ = −w s₊ + LSE_neg moves by (1 + |w|)δs under logit errors δs
    (``logit_error``: the LSE by at most the largest), by (M + 2)u for its M-term exp-sum, by
    |s₊|δw for the weight's own error and 2u|ℓ|; the mean of 2N rows adds γ_2N·mean|ℓ|."""
    x0, x1 = F.normalize(out0.detach().double(), dim=1), F.normalize(out1.detach().double(), dim=1)
    n, d = x0.shape
    positive = ((x0 * x1).sum(dim=1) / temperature).repeat(2)
    w = torch.ones(2 * n, dtype=torch.float64) if weights is None else weights.double()
    dw = torch.zeros(2 * n, dtype=torch.float64) if weight_error is None else weight_error
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    rows = []
    for a, b in ((x0, x1), (x1, x0)):
        same, other = a @ a.T / temperature, a @ b.T / temperature
        rows.append(torch.logsumexp(torch.cat([same[off_diagonal].view(n, -1), other[off_diagonal].view(n, -1)],
                                              dim=1), dim=1))
    losses = torch.cat(rows) - w * positive
    delta_s = logit_error(d, abs(1 / temperature), u)
    per_row = (1 + w.abs()) * delta_s + (2 * n + 2) * u + positive.abs() * dw + 2 * u * losses.abs()
    return (per_row.mean() + gamma(2 * n, u) * losses.abs().mean()).item()


def mises_fisher_weight_error(x0, x1, sigma, u=U32):
    """|δw| of 2 − N·softmax(x0·x1/σ): the N logits are off by ``logit_error`` (scale 1/σ), which
    moves each softmax entry by twice that relative, plus its N-term sum."""
    weights = mises_fisher_weights64(x0, x1, sigma)
    return (2 - weights).abs() * (2 * logit_error(x0.shape[1], 1 / sigma, u) + (x0.shape[0] + 4) * u)


@pytest.mark.parametrize("backend", backend_params("info_nce_self_decoupled"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_dcl_equals_float64(backend, dtype, shape, temperature, tiling):
    out0, out1 = views(*shape, dtype)
    loss = DCLLoss(temperature, backend=backend)(out0, out1)
    x0, x1 = (v.detach().double().requires_grad_(True) for v in (out0, out1))
    exact = lightly_dcl64(x0, x1, temperature)
    u = unit_roundoff(dtype)
    assert_within(loss, exact, dcl_value_bound(out0, out1, temperature, u=u), "loss")
    loss.backward()
    exact.backward()
    assert_info_nce_grads_within([out0.grad, out1.grad], [x0.grad, x1.grad], torch.cat([x0, x1]),
                                 dcl_blocks(shape[0]), 1 / temperature, u)


@pytest.mark.parametrize("backend", backend_params("info_nce_self_decoupled"))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("temperature,sigma", [(0.1, 0.5), (0.2, 0.1)])
def test_dclw_equals_float64(backend, shape, temperature, sigma):
    out0, out1 = views(*shape)
    loss = DCLWLoss(temperature, sigma, backend=backend)(out0, out1)
    x0, x1 = (v.detach().double().requires_grad_(True) for v in (out0, out1))
    exact = lightly_dcl64(x0, x1, temperature, functools.partial(mises_fisher_weights64, sigma=sigma))
    n0, n1 = F.normalize(x0.detach(), dim=1), F.normalize(x1.detach(), dim=1)
    weights = torch.cat([mises_fisher_weights64(n0, n1, sigma), mises_fisher_weights64(n1, n0, sigma)])
    weight_error = torch.cat([mises_fisher_weight_error(n0, n1, sigma), mises_fisher_weight_error(n1, n0, sigma)])
    assert_within(loss, exact, dcl_value_bound(out0, out1, temperature, weights, weight_error), "loss")
    loss.backward()
    exact.backward()
    # the weights' own error moves each row's positive term by δw·|∂s₊/∂x| ≤ δw/(|τ|‖x‖), over 2N rows
    n = shape[0]
    norms = torch.cat([x0, x1]).detach().norm(dim=1)
    weight_share = (weight_error + weight_error.view(2, n).flip(0).reshape(-1)) / (abs(temperature) * norms * 2 * n)
    bound = info_nce_grad_bound(torch.cat([x0, x1]), dcl_blocks(n, weights), 1 / temperature) + weight_share
    for got, want, rows in ((out0.grad, x0.grad, slice(0, n)), (out1.grad, x1.grad, slice(n, 2 * n))):
        assert_within(got, want, bound[rows, None], "gradient")


@pytest.mark.parametrize("backend", backend_params("info_nce_self_decoupled"))
def test_dcl_custom_weight_fn_is_applied_to_each_view(backend):
    out0, out1 = views(8, 6)

    def weight_fn(a, b):  # with gradient, as lightly's docstring example
        return torch.sum((a - b) ** 2, dim=1)

    loss = DCLLoss(0.2, weight_fn=weight_fn, backend=backend)(out0, out1)
    x0, x1 = (v.detach().double().requires_grad_(True) for v in (out0, out1))
    exact = lightly_dcl64(x0, x1, 0.2, weight_fn)
    n0, n1 = F.normalize(x0.detach(), dim=1), F.normalize(x1.detach(), dim=1)
    # ‖a − b‖² of normalised rows: each entry off by e(|a| + |b|), the D-term sum by γ_D
    e = normalized_entry_error(6)
    weight = weight_fn(n0, n1)
    error = (2 * e * ((n0 - n1).abs() * (n0.abs() + n1.abs())).sum(dim=1) + gamma(6) * weight).repeat(2)
    assert_within(loss, exact, dcl_value_bound(out0, out1, 0.2, weight.repeat(2), error), "loss")
    grads = torch.autograd.grad(loss, (out0, out1))
    exact_grads = torch.autograd.grad(exact, (x0, x1))
    # the weight's gradient adds −s₊ ∂w/∂x: the logit error of s₊ times |∂w/∂x| ≤ 4/‖x‖ and back
    kappa = 4 * (logit_error(6, 5.0) + (4 * 8 + 2 * 6 + 16) * U32)
    for got, want in zip(grads, exact_grads):
        assert_within(got, want, kappa * want.abs().max().item(), "gradient")


def test_dcl_modules_are_lightlys():
    loss = DCLLoss()
    assert (loss.temperature, loss.weight_fn, loss.gather_distributed) == (0.1, None, False)
    weighted = DCLWLoss(temperature=0.2, sigma=0.3)
    assert weighted.temperature == 0.2 and weighted.weight_fn.keywords == {"sigma": 0.3}
    assert weighted.weight_fn.func is fastssl.negative_mises_fisher_weights
    assert list(loss.state_dict()) == [] and list(weighted.state_dict()) == []
    a, b = views(5, 7)
    torch.testing.assert_close(fn.dcl(a, b, 0.1, backend="torch"), loss(a, b), rtol=0, atol=0)
    x0, x1 = F.normalize(a.detach().double(), dim=1), F.normalize(b.detach().double(), dim=1)
    assert_within(fastssl.negative_mises_fisher_weights(x0, x1, 0.3), mises_fisher_weights64(x0, x1, 0.3), 1e-15,
                  "weights")


BAD_INPUTS = [
    pytest.param(lambda: DCLLoss()(torch.randn(1, 4), torch.randn(1, 4)), ValueError, r"at least 2 rows",
                 id="batch-1"),
    pytest.param(lambda: DCLLoss()(torch.randn(4, 4), torch.randn(5, 4)), ValueError, r"out0.*out1",
                 id="shapes"),
    pytest.param(lambda: DCLLoss(temperature=1e-9), ValueError, r"Illegal temperature", id="temperature"),
    pytest.param(lambda: DCLLoss(weight_fn=lambda a, b: a[:3, 0])(torch.randn(4, 3), torch.randn(4, 3)), ValueError,
                 r"weight_fn\(out0, out1\) must return weights that broadcast to \(4,\)", id="weight-shape"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_dcl_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_dcl_gathering_without_torch_distributed_raises_like_lightly(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    for make in (lambda: DCLLoss(gather_distributed=True), lambda: DCLWLoss(gather_distributed=True)):
        with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not available"):
            make()


def test_dcl_scalar_weight_broadcasts_like_lightly():
    out0, out1 = views(6, 5)
    scaled = DCLLoss(0.2, weight_fn=lambda a, b: torch.tensor(2.0))(out0, out1)
    exact = lightly_dcl64(out0, out1, 0.2, lambda a, b: torch.tensor(2.0, dtype=torch.float64))
    assert_within(scaled, exact, dcl_value_bound(out0, out1, 0.2, torch.full((12,), 2.0)), "loss")
