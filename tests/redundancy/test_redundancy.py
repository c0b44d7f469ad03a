"""Barlow Twins and VICReg: values and gradients against independent float64 formulas of
lightly 1.6's definitions (see shared/design/DEFINITIONS.md), backend agreement, half
precision, invariants, and input validation."""
import re

import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import BarlowTwinsLoss, VICRegLoss

from helpers import (VICREG_SHAPES, BACKENDS_ON_CPU, HALF_DTYPES, _assert_barlow_within, _assert_close_scaled,
                     _assert_grads_within, _assert_vicreg_within, _grads, _views,
                     half_error_within_twice_reference)
from oracles import barlow_formula, vicreg_formula, vicreg_terms

# Ragged shapes: odd N, D not a power of two, N < D and N > D.
BARLOW_SHAPES = [
    pytest.param(7, 37, id="N7-D37"),
    pytest.param(33, 37, id="N33-D37"),
    pytest.param(7, 130, id="N7-D130"),
    pytest.param(33, 130, id="N33-D130"),
    pytest.param(130, 5, id="N130-D5"),
]
LAMBDAS = [pytest.param(0.0, id="lambda0"), pytest.param(5e-3, id="lambda5e-3"),
           pytest.param(0.0051, id="lambda0.0051"), pytest.param(1.0, id="lambda1")]


# ============================================================================================
# Barlow Twins
# ============================================================================================
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("lambda_param", LAMBDAS)
@pytest.mark.parametrize("n,d", BARLOW_SHAPES)
def test_barlow_twins_fp32_equals_float64_formula(n, d, lambda_param, backend):
    z_a, z_b = _views(n, d, scale=2.0, shift=0.3, grad=True)
    loss = fn.barlow_twins(z_a, z_b, lambda_param, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _assert_barlow_within(loss, z_a, z_b, lambda_param, _grads(loss, z_a, z_b))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("n,d", [pytest.param(9, 11, id="N9-D11"),
                                 # N=2: every normalised entry is ±1 up to eps; the loss is all
                                 # cancellation, too ill-conditioned for fp32, so checked in fp64
                                 pytest.param(2, 3, id="N2-D3")])
def test_barlow_twins_float64_in_float64_out(n, d, backend):
    z_a, z_b = _views(n, d, dtype=torch.float64, grad=True)
    loss = fn.barlow_twins(z_a, z_b, 0.02, backend=backend)
    assert loss.dtype == torch.float64
    expected = barlow_formula(z_a, z_b, 0.02)
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-15)
    for g, e in zip(_grads(loss, z_a, z_b), _grads(expected, z_a, z_b)):
        assert g.dtype == torch.float64
        _assert_close_scaled(g, e, rtol=1e-8)


@pytest.mark.parametrize("scale_loss", [pytest.param(0.024, id="solo-0.024"), pytest.param(3.0, id="3"),
                                        pytest.param(-1.5, id="negative")])
@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_barlow_twins_scale_loss_multiplies(scale_loss, backend):
    z_a, z_b = _views(11, 13, grad=True)
    plain = fn.barlow_twins(z_a, z_b, backend=backend)
    scaled = fn.barlow_twins(z_a, z_b, scale_loss=scale_loss, backend=backend)
    # bit for bit: scale_loss is one multiply of the same loss
    torch.testing.assert_close(scaled, scale_loss * plain, rtol=0, atol=0)
    # The gradients run every backward op on a scaled input (other roundings): each against
    # float64, scaled, not the two float32 ones against each other.
    z_a64, z_b64 = (z.detach().double().requires_grad_() for z in (z_a, z_b))
    exact_grad = _grads(barlow_formula(z_a64, z_b64), z_a64)
    _assert_grads_within(_grads(plain, z_a), exact_grad, 11, 13)
    _assert_grads_within(_grads(scaled, z_a), exact_grad, 11, 13, scale=scale_loss)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_barlow_twins_module_equals_functional(backend):
    z_a, z_b = _views(10, 21)
    module = BarlowTwinsLoss(lambda_param=0.01, scale_loss=0.5, backend=backend)
    torch.testing.assert_close(module(z_a, z_b), fn.barlow_twins(z_a, z_b, 0.01, scale_loss=0.5, backend=backend),
                               rtol=0.0, atol=0.0)


def test_barlow_twins_module_defaults_are_lightlys():
    z_a, z_b = _views(12, 19)
    module = BarlowTwinsLoss()
    assert module.lambda_param == 5e-3 and module.gather_distributed is False
    _assert_barlow_within(module(z_a, z_b), z_a, z_b, 5e-3)
    # lightly's positional order: (lambda_param, gather_distributed)
    _assert_barlow_within(BarlowTwinsLoss(0.1, False)(z_a, z_b), z_a, z_b, 0.1)


@pytest.mark.parametrize("n,d", [pytest.param(7, 37, id="N7-D37"), pytest.param(33, 130, id="N33-D130"),
                                 pytest.param(65, 6, id="N65-D6")])
def test_barlow_twins_reference_equals_torch_backend(n, d):
    """Each backend against float64 (two float32 backends round differently: never compared)."""
    z_a, z_b = _views(n, d, grad=True)
    for backend in ("reference", "torch"):
        loss = fn.barlow_twins(z_a, z_b, 0.02, backend=backend)
        _assert_barlow_within(loss, z_a, z_b, 0.02, _grads(loss, z_a, z_b))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_barlow_twins_invariants(backend):
    """Symmetric in its views; unchanged by the same row or feature permutation of both views;
    (almost) unchanged by a per-feature positive rescaling and shift (batch norm removes it)."""
    z_a, z_b = _views(17, 23, dtype=torch.float64)
    loss = fn.barlow_twins(z_a, z_b, 0.1, backend=backend)
    torch.testing.assert_close(fn.barlow_twins(z_b, z_a, 0.1, backend=backend), loss, rtol=1e-12, atol=0.0)
    rows, cols = torch.randperm(17), torch.randperm(23)
    torch.testing.assert_close(fn.barlow_twins(z_a[rows][:, cols], z_b[rows][:, cols], 0.1, backend=backend),
                               loss, rtol=1e-12, atol=0.0)
    scale, shift = torch.rand(23, dtype=torch.float64) + 0.5, torch.randn(23, dtype=torch.float64)
    rescaled = fn.barlow_twins(z_a * scale + shift, z_b, 0.1, backend=backend)
    torch.testing.assert_close(rescaled, loss, rtol=1e-4, atol=0.0)  # only eps=1e-5 feels the scale


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_barlow_twins_constant_feature_is_finite(backend):
    """A dead (constant) feature has zero variance: batch norm gives 0, not NaN, as in lightly."""
    z_a, z_b = _views(8, 6)
    z_a[:, 2] = 3.0
    z_a.requires_grad_()
    z_b.requires_grad_()
    loss = fn.barlow_twins(z_a, z_b, backend=backend)
    _assert_barlow_within(loss, z_a, z_b, 5e-3)
    for g in _grads(loss, z_a, z_b):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("n,d", [pytest.param(3, 4, id="N3-D4"), pytest.param(5, 3, id="N5-D3")])
def test_barlow_twins_gradcheck(n, d, backend):
    z_a, z_b = _views(n, d, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn.barlow_twins(a, b, 0.3, backend=backend), (z_a, z_b))


def _assert_half_error_within_twice_naive(formula, loss, grads, z_a, z_b):
    """The loss and gradients of half-precision views against ``formula`` computed exactly
    (float64, on the rounded inputs) and naively in the views' dtype."""
    z_a64, z_b64 = (z.detach().double().requires_grad_() for z in (z_a, z_b))
    exact = formula(z_a64, z_b64)
    exact_grads = _grads(exact, z_a64, z_b64)
    z_ah, z_bh = (z.detach().clone().requires_grad_() for z in (z_a, z_b))
    naive = formula(z_ah, z_bh)
    assert naive.dtype == z_a.dtype
    naive_grads = _grads(naive, z_ah, z_bh)
    half_error_within_twice_reference(loss, naive, exact)
    for g, g_naive, g_exact in zip(grads, naive_grads, exact_grads):
        half_error_within_twice_reference(g, g_naive, g_exact)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_barlow_twins_half_inputs(dtype, backend):
    z_a, z_b = _views(33, 37, dtype=dtype, scale=2.0, grad=True)
    loss = fn.barlow_twins(z_a, z_b, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = _grads(loss, z_a, z_b)
    for g in grads:
        assert g.dtype == dtype and torch.isfinite(g).all()

    _assert_half_error_within_twice_naive(barlow_formula, loss, grads, z_a, z_b)


# ============================================================================================
# VICReg
# ============================================================================================
VICREG_PARAMS = [
    pytest.param({}, id="lightly-defaults"),
    pytest.param(dict(lambda_param=1.0, mu_param=2.0, nu_param=3.0, eps=1e-2), id="custom"),
    pytest.param(dict(lambda_param=0.0, mu_param=0.0, nu_param=1.0, eps=0.0), id="covariance-only-eps0"),
    pytest.param(dict(lambda_param=0.0, mu_param=7.0, nu_param=0.0, eps=1e-4), id="variance-only"),
    pytest.param(dict(lambda_param=5.0, mu_param=0.0, nu_param=0.0, eps=1e-4), id="invariance-only"),
]


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("params", VICREG_PARAMS)
@pytest.mark.parametrize("shape", VICREG_SHAPES)
def test_vicreg_fp32_equals_float64_formula(shape, params, backend):
    # scale 0.6: per-feature std ~0.7, so the variance hinge is active (and not at its kink)
    z_a, z_b = _views(*shape, scale=0.6, shift=0.2, grad=True)
    loss = fn.vicreg(z_a, z_b, **params, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    _assert_vicreg_within(loss, z_a, z_b, params, _grads(loss, z_a, z_b))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("shape", [pytest.param((9, 11), id="B9-D11"), pytest.param((5, 3, 17), id="B5-G3-D17")])
def test_vicreg_each_term(shape, backend):
    """Isolate each term with the weights, so a swapped or mis-scaled term cannot hide."""
    z_a, z_b = _views(*shape, dtype=torch.float64, scale=0.6)
    inv, var, cov = vicreg_terms(z_a, z_b, 1e-4)
    assert inv > 0 and var > 0 and cov > 0
    only = {"invariance": (inv, (1.0, 0.0, 0.0)), "variance": (var, (0.0, 1.0, 0.0)),
            "covariance": (cov, (0.0, 0.0, 1.0))}
    for name, (expected, (lam, mu, nu)) in only.items():
        got = fn.vicreg(z_a, z_b, lam, mu, nu, 1e-4, backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=0.0, msg=f"{name} term")


def test_vicreg_middle_dims_are_averaged_groups():
    """(B, G, D): variance and covariance are the mean of the G per-group values (lightly's
    einsum "b...c,b...d->...cd" then .mean()), not the (B·G, D) flattened batch."""
    z_a, z_b = _views(6, 4, 9, dtype=torch.float64, scale=0.6)
    got = fn.vicreg(z_a, z_b, 0.0, 1.0, 1.0)
    per_group = torch.stack([fn.vicreg(z_a[:, g], z_b[:, g], 0.0, 1.0, 1.0) for g in range(4)])
    torch.testing.assert_close(got, per_group.mean(), rtol=1e-12, atol=0.0)
    flattened = fn.vicreg(z_a.reshape(24, 9), z_b.reshape(24, 9), 0.0, 1.0, 1.0)
    assert not torch.isclose(got, flattened, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("shape", [pytest.param((10, 21), id="B10-D21"), pytest.param((6, 2, 2, 9), id="B6-G2x2-D9")])
def test_vicreg_module_equals_functional(shape, backend):
    z_a, z_b = _views(*shape)
    module = VICRegLoss(2.0, 3.0, 4.0, eps=1e-3, backend=backend)
    torch.testing.assert_close(module(z_a, z_b), fn.vicreg(z_a, z_b, 2.0, 3.0, 4.0, 1e-3, backend=backend),
                               rtol=0.0, atol=0.0)


def test_vicreg_module_defaults_are_lightlys():
    z_a, z_b = _views(12, 19, scale=0.6)
    module = VICRegLoss()
    assert (module.lambda_param, module.mu_param, module.nu_param, module.eps) == (25.0, 25.0, 1.0, 1e-4)
    _assert_vicreg_within(module(z_a, z_b), z_a, z_b, {})
    # lightly's positional order: (lambda_param, mu_param, nu_param, gather_distributed, eps)
    module = VICRegLoss(1.0, 2.0, 3.0, False, 0.5)
    _assert_vicreg_within(module(z_a, z_b), z_a, z_b, dict(lambda_param=1.0, mu_param=2.0, nu_param=3.0, eps=0.5))


@pytest.mark.parametrize("shape", [pytest.param((7, 37), id="B7-D37"), pytest.param((33, 130), id="B33-D130"),
                                   pytest.param((5, 3, 17), id="B5-G3-D17")])
def test_vicreg_reference_equals_torch_backend(shape):
    """Each backend against float64 (two float32 backends round differently: never compared)."""
    z_a, z_b = _views(*shape, scale=0.6, grad=True)
    for backend in ("reference", "torch"):
        loss = fn.vicreg(z_a, z_b, backend=backend)
        _assert_vicreg_within(loss, z_a, z_b, {}, _grads(loss, z_a, z_b))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_vicreg_invariants(backend):
    """Symmetric in its views; unchanged by the same row or feature permutation of both views."""
    z_a, z_b = _views(13, 3, 11, dtype=torch.float64, scale=0.6)
    loss = fn.vicreg(z_a, z_b, backend=backend)
    torch.testing.assert_close(fn.vicreg(z_b, z_a, backend=backend), loss, rtol=1e-12, atol=0.0)
    rows, cols = torch.randperm(13), torch.randperm(11)
    torch.testing.assert_close(fn.vicreg(z_a[rows][..., cols], z_b[rows][..., cols], backend=backend),
                               loss, rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_vicreg_constant_feature_is_finite(backend):
    """A collapsed feature (zero variance) is what the variance term exists to punish: with
    eps > 0 its loss and gradient are finite, as in lightly."""
    z_a, z_b = _views(8, 6)
    z_a[:, 1] = -2.0
    z_a.requires_grad_()
    z_b.requires_grad_()
    loss = fn.vicreg(z_a, z_b, backend=backend)
    _assert_vicreg_within(loss, z_a, z_b, {})
    for g in _grads(loss, z_a, z_b):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("shape,scale", [pytest.param((4, 3), 0.5, id="B4-D3-hinge-on"),
                                         pytest.param((4, 3), 3.0, id="B4-D3-hinge-off"),
                                         pytest.param((3, 2, 3), 0.5, id="B3-G2-D3")])
def test_vicreg_gradcheck(shape, scale, backend):
    z_a, z_b = _views(*shape, dtype=torch.float64, scale=scale, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn.vicreg(a, b, 2.0, 3.0, 0.5, 1e-3, backend=backend),
                                    (z_a, z_b))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape", [pytest.param((33, 37), id="B33-D37"), pytest.param((5, 3, 17), id="B5-G3-D17")])
def test_vicreg_half_inputs(shape, dtype, backend):
    z_a, z_b = _views(*shape, dtype=dtype, scale=0.6, grad=True)
    loss = fn.vicreg(z_a, z_b, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = _grads(loss, z_a, z_b)
    for g in grads:
        assert g.dtype == dtype and torch.isfinite(g).all()

    _assert_half_error_within_twice_naive(vicreg_formula, loss, grads, z_a, z_b)


# ============================================================================================
# Bad inputs (both losses)
# ============================================================================================
def _barlow(z_a, z_b, **kwargs):
    return fn.barlow_twins(z_a, z_b, **kwargs)


def _vicreg(z_a, z_b, **kwargs):
    return fn.vicreg(z_a, z_b, **kwargs)


LOSSES = [pytest.param(_barlow, id="barlow_twins"), pytest.param(_vicreg, id="vicreg")]


@pytest.mark.parametrize("loss", LOSSES)
def test_batch_of_one_raises_naming_z_a_and_shape(loss):
    with pytest.raises(ValueError, match=r"z_a.*\(1, 5\)"):
        loss(torch.randn(1, 5), torch.randn(1, 5))


def test_vicreg_batch_of_one_with_middle_dims_raises():
    with pytest.raises(ValueError, match=r"z_a.*\(1, 3, 5\)"):
        fn.vicreg(torch.randn(1, 3, 5), torch.randn(1, 3, 5))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape_a,shape_b", [pytest.param((4, 5), (4, 6), id="D-mismatch"),
                                             pytest.param((4, 5), (6, 5), id="N-mismatch")])
def test_mismatched_shapes_raise_naming_both(loss, shape_a, shape_b):
    pattern = rf"z_a {re.escape(str(shape_a))}.*z_b {re.escape(str(shape_b))}"
    with pytest.raises(ValueError, match=pattern):
        loss(torch.randn(*shape_a), torch.randn(*shape_b))


@pytest.mark.parametrize("shape_a,shape_b", [pytest.param((1, 32), (1, 32), id="batch-of-one"),
                                             pytest.param((2, 32), (2, 16), id="D-mismatch")])
def test_vicreg_errors_are_caught_as_assertion_errors_like_lightly(shape_a, shape_b):
    # lightly's VICRegLoss asserts both; `except AssertionError` written for lightly must still catch them
    with pytest.raises(AssertionError, match=r"z_a and z_b must have"):
        fastssl.VICRegLoss()(torch.randn(*shape_a), torch.randn(*shape_b))


@pytest.mark.parametrize("loss", LOSSES)
def test_one_dimensional_input_raises(loss):
    with pytest.raises(ValueError, match=r"z_a.*dimensions.*\(5,\)"):
        loss(torch.randn(5), torch.randn(5))


def test_barlow_twins_three_dimensional_input_raises():
    with pytest.raises(ValueError, match=r"z_a.*2 dimensions.*\(4, 2, 3\)"):
        fn.barlow_twins(torch.randn(4, 2, 3), torch.randn(4, 2, 3))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool], ids=["int64", "int32", "bool"])
def test_non_float_dtype_raises_type_error(loss, dtype):
    z = torch.ones(4, 5, dtype=dtype)
    with pytest.raises(TypeError, match=r"z_a"):
        loss(z, z)
    with pytest.raises(TypeError, match=r"z_b"):
        loss(torch.randn(4, 5), z)


@pytest.mark.parametrize("loss", LOSSES)
def test_non_tensor_raises_type_error(loss):
    with pytest.raises(TypeError, match=r"z_a.*torch\.Tensor"):
        loss([[1.0, 2.0], [3.0, 4.0]], torch.randn(2, 2))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [pytest.param((0, 5), id="no-rows"), pytest.param((4, 0), id="no-features")])
def test_empty_tensor_raises(loss, shape):
    with pytest.raises(ValueError, match=rf"z_a.*empty.*{re.escape(str(shape))}"):
        loss(torch.randn(*shape), torch.randn(*shape))


@pytest.mark.parametrize("loss", LOSSES)
def test_different_dtypes_raise_type_error_naming_both(loss):
    with pytest.raises(TypeError, match=r"z_a torch\.float32.*z_b torch\.float64"):
        loss(torch.randn(4, 5), torch.randn(4, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match=r"z_a torch\.float16.*z_b torch\.bfloat16"):
        loss(torch.randn(4, 5).half(), torch.randn(4, 5).bfloat16())


@pytest.mark.parametrize("value", [-1e-3, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_barlow_twins_bad_lambda_raises(value):
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="lambda_param"):
        fn.barlow_twins(z, z, value)
    with pytest.raises(ValueError, match="lambda_param"):
        BarlowTwinsLoss(lambda_param=value)


@pytest.mark.parametrize("name", ["lambda_param", "mu_param", "nu_param", "eps"])
def test_vicreg_negative_hyper_parameter_raises(name):
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match=name):
        fn.vicreg(z, z, **{name: -1.0})
    with pytest.raises(ValueError, match=name):
        VICRegLoss(**{name: -1.0})


def test_barlow_twins_unknown_distributed_convention_raises():
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"distributed_convention.*'sync'"):
        fn.barlow_twins(z, z, distributed_convention="sync")
    with pytest.raises(ValueError, match=r"distributed_convention.*'sync'"):
        BarlowTwinsLoss(distributed_convention="sync")


def test_barlow_twins_non_number_scale_loss_raises():
    z = torch.randn(4, 5)
    with pytest.raises(TypeError, match="scale_loss"):
        fn.barlow_twins(z, z, scale_loss="0.024")


@pytest.mark.parametrize("loss", LOSSES)
def test_unknown_backend_raises(loss):
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"backend.*'cuda'"):
        loss(z, z, backend="cuda")


@pytest.mark.parametrize("module", [pytest.param(BarlowTwinsLoss, id="BarlowTwinsLoss"),
                                    pytest.param(VICRegLoss, id="VICRegLoss")])
def test_module_unknown_backend_raises_on_call(module):
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"backend.*'fast'"):
        module(backend="fast")(z, z)


def test_unknown_backend_from_environment_raises(monkeypatch):
    monkeypatch.setenv("FASTSSL_BACKEND", "bogus")
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match=r"backend.*'bogus'"):
        fn.barlow_twins(z, z)


def test_exports():
    assert fastssl.BarlowTwinsLoss is BarlowTwinsLoss and fastssl.VICRegLoss is VICRegLoss
    assert fastssl.barlow_twins is fn.barlow_twins and fastssl.vicreg is fn.vicreg
