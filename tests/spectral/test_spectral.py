"""Spectral losses (TiCo, MMCR, FroSSL, EMP-SSL, hypersphere) on every backend against lightly 1.6's
formulas in float64 (tests/oracles.py), within bounds derived from the computation (tests/helpers.py);
lightly's module behaviour (defaults, state, errors)."""
import math

import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import EMPSSLLoss, FroSSLLoss, HypersphereLoss, MMCRLoss, TiCoLoss
from fastssl.runtime.validation import InputError
from fastssl.spectral.torch_backend import nuclear_norm, nuclear_norm_forward

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_within, backend_params, emp_ssl_bounds, frossl_bounds,
                     gamma, hypersphere_bounds, mmcr_bounds, normalized_entry_error, seeded_views, tico_bounds,
                     unit_roundoff)
from oracles import emp_ssl64, frossl64, hypersphere64, mmcr64, tico64

SHAPES = [pytest.param((13, 7), id="N>D"), pytest.param((6, 19), id="N<D")]


def correlated_views(*shape, count=2, dtype=torch.float32, seed=0):
    """``count`` views sharing a common part, so the invariance terms are not trivial."""
    return seeded_views(*shape, count=count, base_scale=0.8, noise=0.6, dtype=dtype, seed=seed)


def leaves(tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def gradients(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def assert_normwise(grads, exact_grads, kappa, what="gradient"):
    """‖δg‖∞ ≤ κ ‖g‖∞ for each input's gradient (g the float64 one)."""
    for index, (got, want) in enumerate(zip(grads, exact_grads)):
        assert_within(got, want, kappa * want.abs().max().item(), f"{what} {index}")


# ============================================================================================
# TiCo
# ============================================================================================
def covariance_state(dim, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * dim, dim, generator=g, dtype=torch.float64)
    return (x.T @ x / (3 * dim)).to(dtype)


@pytest.mark.parametrize("backend", backend_params("tico"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta,rho,with_state", [(0.9, 8.0, False), (0.5, 3.0, True), (0.0, -2.0, True)],
                         ids=["defaults-first-step", "state", "beta0-negative-rho"])
def test_tico_equals_float64(backend, dtype, shape, beta, rho, with_state):
    z_a, z_b = leaves(correlated_views(*shape, dtype=dtype))
    covariance = covariance_state(shape[1], dtype) if with_state else None
    loss, updated = fn.tico(z_a, z_b, covariance, beta, rho, backend=backend)
    x_a, x_b = leaves([z_a.double(), z_b.double()])
    exact, exact_updated = tico64(x_a, x_b, covariance, beta, rho)
    u = unit_roundoff(dtype)
    value_bound, grad_a_bound, grad_b_bound = tico_bounds(z_a, z_b, covariance, beta, rho, u)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    assert_within(loss, exact, value_bound, "loss")
    # C' = βC + (1 − β)âᵀâ/N: an N-term dot of normalised entries, the scaling and the sum
    a = torch.nn.functional.normalize(x_a.detach(), dim=1)
    previous = torch.zeros_like(exact_updated) if covariance is None else covariance.double()
    state_bound = (abs(1 - beta) * (gamma(shape[0] + 2, u) + 2 * normalized_entry_error(shape[1], u))
                   * (a.abs().T @ a.abs()) / shape[0] + 2 * u * (abs(beta) * previous.abs() + exact_updated.abs()))
    assert_within(updated, exact_updated, state_bound, "updated covariance")
    assert not updated.requires_grad
    grads = gradients(loss, (z_a, z_b))
    exact_grads = gradients(exact, (x_a, x_b))
    assert_within(grads[0], exact_grads[0], grad_a_bound, "gradient of z_a")
    assert_within(grads[1], exact_grads[1], grad_b_bound, "gradient of z_b")


def test_tico_module_keeps_lightlys_state():
    criterion = TiCoLoss()
    assert (criterion.beta, criterion.rho, criterion.gather_distributed, criterion.C) == (0.9, 8.0, False, None)
    assert list(criterion.state_dict()) == []  # C is a plain attribute in lightly, not a buffer
    first, second = correlated_views(10, 6, count=2, seed=3), correlated_views(10, 6, count=2, seed=4)
    loss = criterion(*first)
    exact, state = tico64(*first)
    assert_within(loss, exact, tico_bounds(*first, None, 0.9, 8.0)[0], "first loss")
    torch.testing.assert_close(criterion.C.double(), state, rtol=1e-5, atol=1e-7)  # checked exactly above
    kept = criterion.C.clone()
    evaluation = criterion(*second, update_covariance_matrix=False)
    assert torch.equal(criterion.C, kept)
    exact_second, _ = tico64(*second, kept, 0.9, 8.0)
    assert_within(evaluation, exact_second, tico_bounds(*second, kept, 0.9, 8.0)[0], "loss with the kept C")
    criterion(*second)
    assert not torch.equal(criterion.C, kept)


# ============================================================================================
# MMCR
# ============================================================================================
MMCR_SHAPES = [pytest.param((9, 2, 5), id="2k<D"), pytest.param((5, 3, 4), id="2k>D"),
               pytest.param((4, 1, 11), id="B<D")]


@pytest.mark.parametrize("backend", backend_params("mmcr"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", MMCR_SHAPES)
@pytest.mark.parametrize("lmda", [5e-3, 0.7])
def test_mmcr_equals_float64(backend, dtype, shape, lmda):
    online, momentum = leaves(correlated_views(*shape, dtype=dtype))
    loss = fn.mmcr(online, momentum, lmda, backend=backend)
    x_on, x_mo = leaves([online.double(), momentum.double()])
    exact = mmcr64(x_on, x_mo, lmda)
    value_bound, grad_bound = mmcr_bounds(online, momentum, lmda, unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    for got, want in zip(gradients(loss, (online, momentum)), gradients(exact, (x_on, x_mo))):
        assert_within(got, want, grad_bound, "gradient")


@pytest.mark.parametrize("backend", backend_params("mmcr"))
def test_mmcr_rank_deficient_views_give_the_value_and_finite_gradients(backend):
    # Every sample's views identical: each z_b has rank 1 (its other singular values are 0).
    online = torch.randn(6, 1, 8).expand(6, 2, 8).contiguous().requires_grad_(True)
    momentum = online.detach().clone().requires_grad_(True)
    loss = fn.mmcr(online, momentum, 0.3, backend=backend)
    assert_within(loss, mmcr64(online, momentum, 0.3), mmcr_bounds(online, momentum, 0.3)[0], "loss")
    assert all(torch.isfinite(g).all() for g in gradients(loss, (online, momentum)))


def test_total_coding_rate_op_passes_opcheck():
    from fastssl.spectral.torch_backend import total_coding_rate
    for views in (torch.randn(2, 5, 9, dtype=torch.float64), torch.randn(3, 9, 4, dtype=torch.float64)):
        views.requires_grad_(True)
        torch.library.opcheck(total_coding_rate.op, (views, 0.3, True))
        assert torch.autograd.gradcheck(lambda v: total_coding_rate(v, 0.3), (views,))


def test_nuclear_norm_op_passes_opcheck():
    x = torch.randn(3, 4, 7, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(nuclear_norm.op, (x, True))
    torch.library.opcheck(nuclear_norm.op, (torch.randn(9, 5, requires_grad=True), True))
    assert torch.autograd.gradcheck(nuclear_norm, (x,))


@pytest.mark.parametrize("shape", [(6, 40), (40, 6)], ids=["wide", "tall"])
def test_float64_nuclear_norm_keeps_the_condition_number(shape):
    """A float64 input's ‖A‖_* and UVᵀ at κ = 1e4 within an SVD's own error: A = U diag(s) Vᵀ is
    built off by ‖δA‖_F ≤ √(mn)·γ_m·σ₁, the SVD's backward error is (max(m, n) + 4)u·σ₁, so Σσ
    moves by ≤ min(m, n) times their sum and UVᵀ by ≤ 2·that/σ_min (plus U's and V's own
    orthogonality, γ of their size). A Gram's eigenvalues would put ≈ n·u·κ² ≈ 4e-7 on UVᵀ."""
    g = torch.Generator().manual_seed(0)
    m, n = min(shape), max(shape)
    left = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))[0]
    sigma = torch.logspace(0, -4, m, dtype=torch.float64)
    a, polar = (left * sigma) @ right.T, left @ right.T
    if shape[0] > shape[1]:
        a, polar = a.T, polar.T
    u = unit_roundoff(torch.float64)
    perturbation = math.sqrt(m * n) * gamma(m, u) + (n + 4) * u
    value, direction = nuclear_norm_forward(a, True)
    assert_within(value, sigma.sum(), m * perturbation, "nuclear norm")
    assert_within(direction, polar, 2 * perturbation / sigma[-1].item() + 2 * gamma(n, u), "UVᵀ")


# ============================================================================================
# FroSSL and EMP-SSL (lists of views)
# ============================================================================================
@pytest.mark.parametrize("backend", backend_params("frossl"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count,weight", [(2, 1.0), (3, 0.25)])
def test_frossl_equals_float64(backend, dtype, shape, count, weight):
    views = leaves(correlated_views(*shape, count=count, dtype=dtype))
    loss = fn.frossl(views, weight, backend=backend)
    exact_views = leaves([v.double() for v in views])
    exact = frossl64(exact_views, weight)
    u = unit_roundoff(dtype)
    assert_within(loss, exact, frossl_bounds(views, weight, u), "loss")
    # 4KẑᵀÂ/‖K‖² and the invariance: the Gram's and the normalisation's roundings, then K·ẑ
    n, d = shape
    kappa = 2 * (gamma(2 * max(n, d) + min(n, d) + 8, u) + 4 * normalized_entry_error(n, u))
    assert_normwise(gradients(loss, views), gradients(exact, exact_views), kappa)


@pytest.mark.parametrize("backend", backend_params("emp_ssl"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("count,tcr_eps,inv_coef", [(2, 0.2, 200.0), (3, 0.5, 10.0)])
def test_emp_ssl_equals_float64(backend, dtype, shape, count, tcr_eps, inv_coef):
    views = leaves(correlated_views(*shape, count=count, dtype=dtype))
    loss = fn.emp_ssl(views, tcr_eps, inv_coef, backend=backend)
    exact_views = leaves([v.double() for v in views])
    value_bound, kappa_tcr, kappa_inv = emp_ssl_bounds(views, tcr_eps, inv_coef, unit_roundoff(dtype))
    assert_within(loss, emp_ssl64(exact_views, tcr_eps, inv_coef), value_bound, "loss")
    # the two terms' float64 gradients separately: each term's error is relative to its own size
    tcr_grads = gradients(emp_ssl64(exact_views, tcr_eps, 0.0), exact_views)
    total_grads = gradients(emp_ssl64(exact_views, tcr_eps, inv_coef), exact_views)
    for got, tcr, total in zip(gradients(loss, views), tcr_grads, total_grads):
        bound = kappa_tcr * tcr.abs().max() + kappa_inv * (total - tcr).abs().max()
        assert_within(got, total, bound.item(), "gradient")


# ============================================================================================
# Hypersphere
# ============================================================================================
@pytest.mark.parametrize("backend", backend_params("hypersphere_uniformity"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("t,lam,alpha", [(1.0, 1.0, 2.0), (3.0, 0.5, 1.5), (40.0, 2.0, 2.0)],
                         ids=["defaults", "options", "t40"])
def test_hypersphere_equals_float64(backend, dtype, shape, t, lam, alpha, block_elements):
    z_a, z_b = leaves(correlated_views(*shape, dtype=dtype))
    loss = fn.hypersphere(z_a, z_b, t, lam, alpha, backend=backend)
    x_a, x_b = leaves([z_a.double(), z_b.double()])
    exact = hypersphere64(x_a, x_b, t, lam, alpha)
    value_bound, kappa = hypersphere_bounds(z_a, z_b, t, lam, alpha, unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    assert_normwise(gradients(loss, (z_a, z_b)), gradients(exact, (x_a, x_b)), kappa)


def test_hypersphere_far_apart_rows_stay_finite():
    # t = 200 puts every exp(−t d²) of random rows (d² ≈ 2) below e^−200: lightly's float32
    # exp().mean() (the reference) underflows to 0 and returns log 0 = −inf; the logsumexp keeps the value.
    z_a, z_b = correlated_views(16, 64)
    assert fastssl.HypersphereLoss(t=200.0, backend="reference")(z_a, z_b) == float("-inf")
    loss = fastssl.HypersphereLoss(t=200.0, backend="torch")(z_a, z_b)
    assert_within(loss, hypersphere64(z_a, z_b, 200.0), hypersphere_bounds(z_a, z_b, 200.0, 1.0, 2.0)[0], "loss")


# ============================================================================================
# Every loss: half inputs, modules, errors
# ============================================================================================
CALLS = {  # (loss of two (12, 8) views, its float32 bound at the defaults)
    "tico": (lambda v, be: fn.tico(v[0], v[1], backend=be)[0], lambda v: tico_bounds(v[0], v[1], None, 0.9, 8.0)[0]),
    "mmcr": (lambda v, be: fn.mmcr(v[0].reshape(6, 2, 8), v[1].reshape(6, 2, 8), backend=be),
             lambda v: mmcr_bounds(v[0].reshape(6, 2, 8), v[1].reshape(6, 2, 8), 5e-3)[0]),
    "frossl": (lambda v, be: fn.frossl(v, backend=be), lambda v: frossl_bounds(v, 1.0)),
    "emp_ssl": (lambda v, be: fn.emp_ssl(v, backend=be), lambda v: emp_ssl_bounds(v, 0.2, 200.0)[0]),
    "hypersphere": (lambda v, be: fn.hypersphere(v[0], v[1], backend=be),
                    lambda v: hypersphere_bounds(v[0], v[1], 1.0, 1.0, 2.0)[0]),
}


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_inputs_are_computed_in_float32(name, dtype):
    views = leaves(correlated_views(12, 8, dtype=dtype))
    loss_fn, bound = CALLS[name]
    exact = loss_fn([v.detach().double() for v in views], "reference")
    for backend in ("reference", "torch"):
        loss = loss_fn(views, backend)
        assert loss.dtype == torch.float32
        grads = gradients(loss, views)
        assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
        # the arithmetic is float32 on the rounded inputs: float64 on them, within the float32 bound
        assert_within(loss, exact, bound(views), "loss")


def test_modules_take_lightlys_defaults_and_have_no_state_dict():
    assert MMCRLoss().lmda == 0.005
    assert FroSSLLoss().invariance_weight == 1.0
    assert (EMPSSLLoss().tcr_eps, EMPSSLLoss().inv_coef) == (0.2, 200.0)
    assert (HypersphereLoss().t, HypersphereLoss().lam, HypersphereLoss().alpha) == (1.0, 1.0, 2.0)
    for module in (TiCoLoss(), MMCRLoss(), FroSSLLoss(), EMPSSLLoss(), HypersphereLoss()):
        assert list(module.state_dict()) == []
    from fastssl.hypersphere_loss import HypersphereLoss as at_lightlys_path
    assert at_lightlys_path is HypersphereLoss


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_modules_equal_functions(backend):
    a, b = correlated_views(10, 6)
    c, d = correlated_views(10, 2, 3)
    torch.testing.assert_close(MMCRLoss(0.1, backend=backend)(c, d), fn.mmcr(c, d, 0.1, backend=backend), rtol=0,
                               atol=0)
    torch.testing.assert_close(FroSSLLoss(0.5, backend=backend)([a, b]), fn.frossl([a, b], 0.5, backend=backend),
                               rtol=0, atol=0)
    torch.testing.assert_close(EMPSSLLoss(0.3, 5.0, backend=backend)([a, b]),
                               fn.emp_ssl([a, b], 0.3, 5.0, backend=backend), rtol=0, atol=0)
    torch.testing.assert_close(HypersphereLoss(2.0, 0.5, 1.0, backend=backend)(a, b),
                               fn.hypersphere(a, b, 2.0, 0.5, 1.0, backend=backend), rtol=0, atol=0)


def _x(*shape):
    return torch.randn(*shape)


BAD_INPUTS = [
    pytest.param(lambda: TiCoLoss()(_x(1, 4), _x(1, 4)), InputError, r"batch size > 1 but found 1 and 1",
                 id="tico-batch-1"),
    pytest.param(lambda: TiCoLoss()(_x(4, 4), _x(4, 5)), InputError, r"z_a and z_b must have same shape",
                 id="tico-shapes"),
    pytest.param(lambda: fn.tico(_x(4, 4), _x(4, 4), covariance=_x(5, 5)), ValueError, r"covariance must be \(D, D\)",
                 id="tico-covariance"),
    pytest.param(lambda: fn.tico(_x(4, 4), _x(4, 4), beta="0.9"), TypeError, r"beta", id="tico-beta-type"),
    pytest.param(lambda: MMCRLoss(lmda=-1.0), ValueError, r"lmda must be greater than or equal to 0",
                 id="mmcr-lmda"),
    pytest.param(lambda: MMCRLoss()(_x(4, 2, 3), _x(4, 3, 3)), InputError,
                 r"online and momentum need to have the same shape", id="mmcr-shapes"),
    pytest.param(lambda: MMCRLoss()(_x(4, 3), _x(4, 3)), ValueError, r"online must have 3 dimensions",
                 id="mmcr-2d"),
    pytest.param(lambda: FroSSLLoss()([_x(4, 3)]), ValueError, r"at least two views but found 1", id="frossl-1-view"),
    pytest.param(lambda: FroSSLLoss()([_x(4, 3), _x(5, 3)]), ValueError, r"z_views\[0\].*z_views\[1\]",
                 id="frossl-shapes"),
    pytest.param(lambda: EMPSSLLoss()([_x(4, 3), _x(4, 3).double()]), TypeError, r"dtype", id="emp-dtypes"),
    pytest.param(lambda: EMPSSLLoss(tcr_eps=0.0)([_x(4, 3), _x(4, 3)]), ValueError, r"tcr_eps", id="emp-eps"),
    pytest.param(lambda: HypersphereLoss()(_x(1, 3), _x(1, 3)), ValueError, r"at least 2 rows", id="hypersphere-1"),
    pytest.param(lambda: HypersphereLoss()(_x(4, 3), _x(4, 2)), ValueError, r"z_a.*z_b", id="hypersphere-shapes"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_input_error_is_caught_where_lightly_asserts():
    for call in (lambda: TiCoLoss()(_x(1, 4), _x(1, 4)), lambda: MMCRLoss()(_x(4, 2, 3), _x(4, 3, 3))):
        with pytest.raises(AssertionError):
            call()
        with pytest.raises(ValueError):
            call()
    assert issubclass(InputError, ValueError) and issubclass(InputError, AssertionError)


def test_precomputed_gradients_refuse_a_double_backward():
    z_a, z_b = leaves(correlated_views(8, 5))
    loss = fn.tico(z_a, z_b, backend="torch")[0]
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(loss, (z_a,), create_graph=True)
    (grad,) = torch.autograd.grad(fn.tico(z_a, z_b, backend="torch")[0], (z_a,))  # a first backward is fine
    assert torch.isfinite(grad).all()
