"""SIGReg, LeJEPA and LeWM (lightly 1.6's) on every backend against float64 formulas with lightly's
own draw of the random slices (tests/oracles.py), within bounds derived from the computation
(tests/helpers.py: sigreg_bounds); lightly's module behaviour (buffers, defaults, errors)."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import LeJEPALoss, LeWMLoss, SIGReg
from fastssl.sliced import random_unit_columns, sigreg_statistic

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_within, backend_params, gamma, half_error_within_twice_reference,
                     invariance_bound, invariance_grad_bounds, seeded_views, sigreg_bounds, unit_roundoff)
from oracles import lejepa64, lewm64, lightly_sigreg_grid, lightly_unit_columns, sigreg_formula

SHAPES = [pytest.param((13, 7), id="N>C"), pytest.param((6, 19), id="N<C"), pytest.param((3, 11, 5), id="leading")]
GRIDS = [pytest.param((17, 3.0, 9), id="defaults-grid"), pytest.param((5, 1.5, 4), id="coarse-grid")]
SEED = 1234


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def seeded_proj(*shape, dtype=torch.float32, seed=0, scale=1.0):
    return leaf(seeded_views(*shape, count=1, base_scale=scale, noise=0.3 * scale, dtype=dtype, seed=seed)[0])


# ============================================================================================
# SIGReg
# ============================================================================================
@pytest.mark.parametrize("backend", backend_params("sigreg_sums"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("grid", GRIDS)
def test_sigreg_equals_float64_with_lightlys_slices(backend, dtype, shape, grid, block_elements):
    knots, t_max, num_vectors = grid
    proj = seeded_proj(*shape, dtype=dtype)
    torch.manual_seed(SEED)
    loss = SIGReg(knots=knots, t_max=t_max, num_vectors=num_vectors, backend=backend)(proj)
    vectors = lightly_unit_columns(shape[-1], num_vectors, dtype, seed=SEED)
    x = leaf(proj.double())
    exact = sigreg_formula(x, vectors, knots, t_max)
    value_bound, grad_bound = sigreg_bounds(proj, vectors, *lightly_sigreg_grid(knots, t_max), unit_roundoff(dtype))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    assert_within(loss, exact, value_bound, "loss")
    (grad,) = torch.autograd.grad(loss, proj)
    (exact_grad,) = torch.autograd.grad(exact, x)
    assert grad.dtype == dtype and exact_grad.abs().max() > 0
    assert_within(grad, exact_grad, grad_bound, "gradient")


def test_sigreg_draws_lightlys_slices_from_the_global_generator():
    """One randn (C, M) in proj's dtype per call, nothing else: the same seed gives lightly's slices
    (and the generator's next draw is the one after them); another seed other slices."""
    proj = seeded_proj(10, 6)
    torch.manual_seed(SEED)
    fastssl.SIGReg(num_vectors=5)(proj)
    after_loss = torch.randn(3)
    torch.manual_seed(SEED)
    raw = torch.randn(6, 5)
    assert torch.equal(after_loss, torch.randn(3))
    torch.manual_seed(SEED)
    drawn = random_unit_columns(6, 5, proj)
    assert torch.equal(drawn, raw / raw.norm(p=2, dim=0))  # lightly's float32 division, bit for bit
    torch.manual_seed(SEED + 1)
    other = fastssl.SIGReg(num_vectors=5)(proj)
    torch.manual_seed(SEED)
    assert other != fastssl.SIGReg(num_vectors=5)(proj)


@pytest.mark.parametrize("backend", backend_params("sigreg_sums"))
def test_sigreg_batch_of_one_and_zero_embeddings(backend):
    one = seeded_proj(1, 6, dtype=torch.float64)
    torch.manual_seed(SEED)
    loss = SIGReg(num_vectors=7, backend=backend)(one)
    exact = sigreg_formula(one.detach(), lightly_unit_columns(6, 7, torch.float64, seed=SEED))
    torch.testing.assert_close(loss, exact, rtol=1e-12, atol=0)  # float64 both: a few roundings apart
    # All embeddings 0: cos = 1, sin = 0 at every knot: L = N Σ_k w_k (1 − φ_k)², no gradient
    zeros = torch.zeros(5, 4, requires_grad=True)
    loss = SIGReg(backend=backend)(zeros)
    _, phi, weights = (x.double() for x in lightly_sigreg_grid())
    assert_within(loss, 5 * ((1 - phi).square() * weights).sum(), gamma(17 + 4) * 5 * weights.sum().item(), "loss")
    (grad,) = torch.autograd.grad(loss, zeros)
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_sigreg_half_inputs_within_twice_the_half_reference_error(dtype):
    proj = seeded_proj(24, 10, dtype=dtype)
    torch.manual_seed(SEED)
    vectors = random_unit_columns(10, 16, proj)  # lightly's: drawn and normalised in the half dtype
    exact = sigreg_formula(proj.detach().double(), vectors.double())  # float64 on the same rounded inputs
    in_half = sigreg_formula(proj.detach(), vectors)  # lightly's math in the half dtype
    for backend in ("reference", "torch"):
        torch.manual_seed(SEED)
        loss = SIGReg(num_vectors=16, backend=backend)(proj)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, proj)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        half_error_within_twice_reference(loss, in_half, exact)


def test_sigreg_module_is_lightlys():
    module = SIGReg()
    assert (module.num_vectors, module.gather_distributed) == (1024, False)
    assert list(module.state_dict()) == ["t", "phi", "weights"]  # persistent buffers, as lightly's
    for got, want in zip((module.t, module.phi, module.weights), lightly_sigreg_grid()):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert list(LeJEPALoss().state_dict()) == ["sigreg.t", "sigreg.phi", "sigreg.weights"]
    assert list(LeWMLoss().state_dict()) == ["sigreg.t", "sigreg.phi", "sigreg.weights"]
    custom = SIGReg(knots=5, t_max=2.0, num_vectors=3)
    assert custom.t.shape == (5,) and custom.num_vectors == 3
    with pytest.raises(TypeError):
        SIGReg(17)  # keyword-only, as lightly's
    from fastssl.lejepa_loss import SIGReg as at_lightlys_path
    assert at_lightlys_path is SIGReg


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_modules_equal_functions(backend):
    proj = seeded_proj(9, 6)
    local, global_ = seeded_proj(3, 9, 6, seed=1), seeded_proj(2, 9, 6, seed=2)
    emb, predicted = seeded_proj(4, 5, 6, seed=3), seeded_proj(4, 4, 6, seed=4)
    pairs = [
        (lambda: SIGReg(knots=7, t_max=2.0, num_vectors=11, backend=backend)(proj),
         lambda: fn.sigreg(proj, 7, 2.0, 11, backend=backend)),
        (lambda: LeJEPALoss(0.3, sigreg_num_vectors=13, backend=backend)(local_proj=local, global_proj=global_),
         lambda: fn.lejepa(local, global_, 0.3, num_vectors=13, backend=backend)),
        (lambda: LeWMLoss(0.4, True, sigreg_num_vectors=13, backend=backend)(
            predicted=predicted, target=emb[:, 1:], embeddings=emb),
         lambda: fn.lewm(predicted, emb[:, 1:], emb, 0.4, True, num_vectors=13, backend=backend)),
    ]
    for module_call, function_call in pairs:
        torch.manual_seed(SEED)
        want = module_call()
        torch.manual_seed(SEED)
        torch.testing.assert_close(function_call(), want, rtol=0, atol=0)


def test_sigreg_statistic_takes_given_slices():
    proj = seeded_proj(8, 5, dtype=torch.float64)
    vectors = lightly_unit_columns(5, 6, torch.float64, seed=SEED)
    t, phi, weights = lightly_sigreg_grid()
    got = sigreg_statistic(proj, vectors, t, phi, weights)
    torch.testing.assert_close(got, sigreg_formula(proj.detach(), vectors), rtol=1e-12, atol=0)


# ============================================================================================
# LeJEPA and LeWM
# ============================================================================================
@pytest.mark.parametrize("backend", backend_params("sigreg_sums"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("views,lambda_param", [((2, 3), 0.05), ((1, 1), 0.7)], ids=["2+3-views", "1+1-lambda0.7"])
def test_lejepa_equals_float64(backend, dtype, views, lambda_param):
    n_global, n_local = views
    global_, local = seeded_proj(n_global, 10, 7, dtype=dtype, seed=1), seeded_proj(n_local, 10, 7, dtype=dtype, seed=2)
    torch.manual_seed(SEED)
    loss = LeJEPALoss(lambda_param, sigreg_num_vectors=12, backend=backend)(local_proj=local, global_proj=global_)
    vectors = lightly_unit_columns(7, 12, dtype, seed=SEED)
    x_local, x_global = leaf(local.double()), leaf(global_.double())
    exact = lejepa64(x_local, x_global, vectors, lambda_param)
    u = unit_roundoff(dtype)
    all_proj = torch.cat([global_, local]).detach()
    sig_value, sig_grad = sigreg_bounds(all_proj, vectors, *lightly_sigreg_grid(), u)
    bound = lambda_param * sig_value + (1 - lambda_param) * invariance_bound(all_proj, global_, u) + 3 * u * exact.abs()
    assert_within(loss, exact, bound.item(), "loss")
    grads = torch.autograd.grad(loss, (global_, local))
    exact_grads = torch.autograd.grad(exact, (x_global, x_local))
    inv_grads = invariance_grad_bounds(all_proj, global_, u)
    sig_grads = (lambda_param * sig_grad).split([n_global, n_local])
    for got, want, inv, sig in zip(grads, exact_grads, inv_grads.split([n_global, n_local]), sig_grads):
        assert_within(got, want, sig + (1 - lambda_param) * inv, "gradient")


@pytest.mark.parametrize("backend", backend_params("sigreg_sums"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lewm_equals_float64_with_the_batch_as_sigregs_samples(backend, dtype):
    emb = seeded_proj(9, 4, 6, dtype=dtype, seed=5)
    predicted = seeded_proj(9, 3, 6, dtype=dtype, seed=6)
    target = emb[:, 1:]
    torch.manual_seed(SEED)
    loss = LeWMLoss(0.25, sigreg_num_vectors=10, backend=backend)(predicted=predicted, target=target, embeddings=emb)
    vectors = lightly_unit_columns(6, 10, dtype, seed=SEED)
    x_emb, x_pred = leaf(emb.double()), leaf(predicted.double())
    exact = lewm64(x_pred, x_emb[:, 1:], x_emb, vectors, 0.25)
    u = unit_roundoff(dtype)
    sig_value, sig_grad = sigreg_bounds(emb.detach().transpose(0, 1), vectors, *lightly_sigreg_grid(), u)
    mse = (predicted.detach().double() - target.detach().double()).square().mean()
    assert_within(loss, exact, 0.25 * sig_value + (gamma(predicted.numel(), u) + 5 * u) * (mse + exact.abs()).item(),
                  "loss")
    grad_emb, grad_pred = torch.autograd.grad(loss, (emb, predicted))
    exact_emb, exact_pred = torch.autograd.grad(exact, (x_emb, x_pred))
    # the target is detached: the embeddings' gradient is SIGReg's alone (lightly's convention)
    assert_within(grad_emb, exact_emb, 0.25 * sig_grad.transpose(0, 1), "gradient of the embeddings")
    assert_within(grad_pred, exact_pred, 4 * u * exact_pred.abs(), "gradient of the prediction")


def test_latent_distance_is_lightlys():
    from fastssl.latent_distance import latent_distance
    from fastssl.lewm_loss import latent_prediction_loss
    a, b = seeded_proj(3, 4, 5, dtype=torch.float64, seed=1), seeded_proj(3, 4, 5, dtype=torch.float64, seed=2)
    torch.testing.assert_close(latent_distance(predicted=a, target=b, distance="l1"), (a - b).abs().mean(),
                               rtol=1e-15, atol=0)
    normalized = latent_prediction_loss(predicted=a, target=b, normalize=True)
    ln = torch.nn.functional.layer_norm
    torch.testing.assert_close(normalized, (ln(a, (5,)) - ln(b, (5,))).square().mean(), rtol=1e-15, atol=0)
    (grad_b,) = torch.autograd.grad(latent_prediction_loss(predicted=a, target=b), b, allow_unused=True)
    assert grad_b is None  # the target is detached


def _x(*shape):
    return torch.randn(*shape)


BAD_INPUTS = [
    pytest.param(lambda: SIGReg(knots=1), ValueError, r"^knots must be an integer greater than one\.$", id="knots"),
    pytest.param(lambda: SIGReg(t_max=0.0), ValueError, r"^t_max must be greater than zero\.$", id="t_max"),
    pytest.param(lambda: SIGReg(num_vectors=0), ValueError, r"^num_vectors must be a positive integer\.$",
                 id="num_vectors"),
    pytest.param(lambda: SIGReg()(_x(5)), ValueError, r"proj must have at least 2 dimensions", id="proj-1d"),
    pytest.param(lambda: SIGReg()(_x(4, 3).long()), TypeError, r"proj must be float16", id="proj-int"),
    pytest.param(lambda: LeJEPALoss(lambda_param=1.5), ValueError, r"lambda_param must be in the unit interval",
                 id="lejepa-lambda"),
    pytest.param(lambda: LeJEPALoss()(local_proj=_x(4, 3), global_proj=_x(1, 4, 3)), ValueError,
                 r"local_proj must have shape \(V_local, N, D\)", id="lejepa-local-2d"),
    pytest.param(lambda: LeJEPALoss()(local_proj=_x(1, 4, 3), global_proj=_x(1, 5, 3)), ValueError,
                 r"matching batch and feature dimensions", id="lejepa-shapes"),
    pytest.param(lambda: LeJEPALoss()(local_proj=_x(0, 4, 3), global_proj=_x(1, 4, 3)), ValueError,
                 r"local_proj must have at least one local view", id="lejepa-no-local"),
    pytest.param(lambda: LeWMLoss(lambda_param=-0.1), ValueError, r"lambda_param must not be negative",
                 id="lewm-lambda"),
    pytest.param(lambda: LeWMLoss()(predicted=_x(2, 3, 4), target=_x(2, 3, 4), embeddings=_x(2, 4)), ValueError,
                 r"embeddings must have shape \(B, T, D\), got \(2, 4\)", id="lewm-embeddings-2d"),
    pytest.param(lambda: LeWMLoss()(predicted=_x(2, 3, 4), target=_x(2, 3, 4), embeddings=_x(3, 4, 4)), ValueError,
                 r"embeddings must share the batch size", id="lewm-batch"),
    pytest.param(lambda: LeWMLoss()(predicted=_x(2, 3, 4), target=_x(2, 2, 4), embeddings=_x(2, 4, 4)), ValueError,
                 r"predicted and target must have the same shape", id="lewm-target"),
    pytest.param(lambda: fn.latent_distance(predicted=_x(2, 3), target=_x(2, 3), distance="cos"), ValueError,
                 r"distance must be one of \('l1', 'l2'\), got 'cos'", id="latent-distance"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_raises_lightlys_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("make", [lambda: SIGReg(gather_distributed=True), lambda: LeJEPALoss(gather_distributed=True),
                                  lambda: LeWMLoss(gather_distributed=True)], ids=["SIGReg", "LeJEPALoss", "LeWMLoss"])
def test_gathering_without_torch_distributed_raises_like_lightly(make, monkeypatch):
    assert make().sigreg.gather_distributed if not isinstance(make(), SIGReg) else make().gather_distributed
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not available"):
        make()


def test_fused_gradients_refuse_a_double_backward():
    """The torch backend's closed-form backwards carry no graph: a second derivative would be wrong."""
    proj = seeded_proj(8, 5)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(SIGReg(num_vectors=4, backend="torch")(proj), proj, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(fn.visreg_shape_loss(proj, 4, backend="torch"), proj, create_graph=True)
