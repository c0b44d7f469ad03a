"""VISReg (lightly 1.6's) on every backend against float64 formulas with lightly's draw of the
slices (tests/oracles.py), within bounds derived from the computation (tests/helpers.py:
visreg_shape_bounds); lightly's module behaviour (defaults, components, errors)."""
import pytest
import torch

import fastssl.functional as fn
from fastssl import VISRegLoss, VISRegLossComponents
from fastssl.sliced import random_unit_columns

from helpers import (FLOAT_DTYPES, HALF_DTYPES, U32, assert_within, backend_params, gamma,
                     half_error_within_twice_reference, invariance_bound, seeded_views, unit_roundoff,
                     visreg_shape_bounds)
from oracles import lightly_unit_columns, visreg64, visreg_shape_formula

SHAPES = [pytest.param((13, 7), id="N>D"), pytest.param((6, 19), id="N<D"), pytest.param((3, 9, 5), id="leading")]
SEED = 4321


def leaf(x):
    return x.detach().clone().requires_grad_(True)


def seeded_z(*shape, dtype=torch.float32, seed=0, shift=0.0):
    return leaf(seeded_views(*shape, count=1, base_scale=1.5, noise=0.5, dtype=dtype, seed=seed)[0] + shift)


@pytest.mark.parametrize("backend", backend_params("visreg_shape"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_slices,eps,shift", [(11, 1e-4, 0.0), (40, 0.5, 3.0)], ids=["defaults", "eps-shifted"])
def test_shape_loss_equals_float64_with_lightlys_slices(backend, dtype, shape, num_slices, eps, shift, block_elements):
    z = seeded_z(*shape, dtype=dtype, shift=shift)
    torch.manual_seed(SEED)
    loss = fn.visreg_shape_loss(z, num_slices, eps, backend=backend)
    slices = lightly_unit_columns(shape[-1], num_slices, dtype, seed=SEED)
    x = leaf(z.double())
    exact = visreg_shape_formula(x, slices, eps)
    value_bound, grad_bound, gap_ratio = visreg_shape_bounds(z, slices, eps, unit_roundoff(dtype))
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    assert_within(loss, exact, value_bound, "loss")
    assert gap_ratio > 2, "the data must fix the sorted order for the gradient to be comparable"
    (grad,) = torch.autograd.grad(loss, z)
    (exact_grad,) = torch.autograd.grad(exact, x)
    assert grad.dtype == dtype and exact_grad.abs().max() > 0
    assert_within(grad, exact_grad, grad_bound, "gradient")


def test_shape_loss_draws_lightlys_slices_from_the_global_generator():
    z = seeded_z(8, 6)
    torch.manual_seed(SEED)
    fn.visreg_shape_loss(z, 9)
    after = torch.randn(2)
    torch.manual_seed(SEED)
    raw = torch.randn(6, 9)
    assert torch.equal(after, torch.randn(2))
    torch.manual_seed(SEED)
    assert torch.equal(random_unit_columns(6, 9, z), raw / raw.norm(p=2, dim=0))


@pytest.mark.parametrize("backend", backend_params("visreg_shape"))
def test_shape_loss_of_constant_embeddings_is_the_quantiles_energy(backend):
    # std 0: ẑ = 0, every projection 0, L = mean q², the gradient finite (the centring's, over eps)
    z = torch.full((7, 4), 2.5, requires_grad=True)
    loss = fn.visreg_shape_loss(z, 5, backend=backend)
    from oracles import lightly_gaussian_quantiles
    expected = lightly_gaussian_quantiles(7).double().square().mean()
    assert_within(loss, expected, gamma(7 * 5 + 4) * expected.item(), "loss")
    (grad,) = torch.autograd.grad(loss, z)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_shape_loss_half_inputs_within_twice_the_half_reference_error(dtype):
    z = seeded_z(20, 8, dtype=dtype)
    torch.manual_seed(SEED)
    slices = random_unit_columns(8, 12, z)  # lightly's: drawn and normalised in the half dtype
    exact = visreg_shape_formula(z.detach().double(), slices.double())
    in_half = visreg_shape_formula(z.detach(), slices)
    for backend in ("reference", "torch"):
        torch.manual_seed(SEED)
        loss = fn.visreg_shape_loss(z, 12, backend=backend)
        assert loss.dtype == torch.float32
        (grad,) = torch.autograd.grad(loss, z)
        assert grad.dtype == dtype and torch.isfinite(grad).all()
        half_error_within_twice_reference(loss, in_half, exact)


def moments_bounds(proj, u=U32):
    """(|δ scale loss|, |δ center loss|) on (V, N, D): the mean off by δμ = γ_{N+1} mean|z|, the std by
    δσ = γ_{2N+6} rms(z) (visreg_shape_bounds'), squares and the V·D-term means by γ_{VD+3}."""
    x = proj.detach().double()
    n = x.shape[-2]
    mean, std = x.mean(dim=-2), x.std(dim=-2, unbiased=False)
    delta_mean = gamma(n + 1, u) * x.abs().mean(dim=-2)
    delta_std = gamma(2 * n + 6, u) * x.square().mean(dim=-2).sqrt()
    terms = mean.numel()
    scale = (2 * (1 - std).abs() * delta_std + delta_std.square()).mean() + gamma(terms + 3, u) * (1 - std).square().mean()
    center = (2 * mean.abs() * delta_mean + delta_mean.square()).mean() + gamma(terms + 3, u) * mean.square().mean()
    return scale.item(), center.item()


@pytest.mark.parametrize("backend", backend_params("visreg_shape"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("weights", [(0.9, 1.0, 1.0, 1.0), (0.4, 0.5, 2.0, 0.25)], ids=["defaults", "weighted"])
def test_visreg_components_equal_float64(backend, dtype, weights):
    lambda_param, lambda_scale, lambda_shape, lambda_center = weights
    global_, local = seeded_z(2, 10, 6, dtype=dtype, seed=1), seeded_z(3, 10, 6, dtype=dtype, seed=2, shift=0.3)
    torch.manual_seed(SEED)
    got = VISRegLoss(lambda_param, 17, lambda_scale, lambda_shape, lambda_center, backend=backend).forward_components(
        local_proj=local, global_proj=global_)
    assert isinstance(got, VISRegLossComponents) and got._fields == ("total", "pred", "scale", "shape", "center")
    slices = lightly_unit_columns(6, 17, dtype, seed=SEED)
    exact = visreg64(local, global_, slices, lambda_param, lambda_scale, lambda_shape, lambda_center)
    u = unit_roundoff(dtype)
    proj = torch.cat([global_, local]).detach()
    shape_bound = visreg_shape_bounds(proj, slices, 1e-4, u)[0]
    scale_bound, center_bound = moments_bounds(proj, u)
    pred_bound = invariance_bound(proj, global_, u)
    bounds = [pred_bound, scale_bound, shape_bound, center_bound]
    total_bound = ((1 - lambda_param) * pred_bound + lambda_param * (
        lambda_scale * scale_bound + lambda_shape * shape_bound + lambda_center * center_bound)
        + 6 * u * sum(abs(w) * e.abs().item() for w, e in zip((1.0,) + weights[1:], exact[1:])))
    assert_within(got.total, exact[0], total_bound, "total")
    for name, value, want, bound in zip(got._fields[1:], got[1:], exact[1:], bounds):
        assert_within(value, want, bound, name)
    torch.manual_seed(SEED)
    total = VISRegLoss(lambda_param, 17, lambda_scale, lambda_shape, lambda_center, backend=backend)(
        local_proj=local, global_proj=global_)
    torch.testing.assert_close(total, got.total, rtol=0, atol=0)


def test_visreg_module_is_lightlys_and_equals_the_functions():
    module = VISRegLoss()
    assert (module.lambda_param, module.num_slices, module.lambda_scale, module.lambda_shape, module.lambda_center,
            module.gather_distributed, module.eps) == (0.9, 4096, 1.0, 1.0, 1.0, False, 1e-4)
    assert list(module.state_dict()) == []
    from fastssl.visreg_loss import VISRegLoss as at_lightlys_path, visreg_shape_loss
    assert at_lightlys_path is VISRegLoss and visreg_shape_loss is fn.visreg_shape_loss
    local, global_ = seeded_z(2, 8, 5, seed=3), seeded_z(1, 8, 5, seed=4)
    torch.manual_seed(SEED)
    want = VISRegLoss(0.5, 21)(local_proj=local, global_proj=global_)
    torch.manual_seed(SEED)
    torch.testing.assert_close(fn.visreg(local, global_, 0.5, 21), want, rtol=0, atol=0)
    z = seeded_z(3, 8, 5)
    torch.testing.assert_close(fn.visreg_center_loss(z), z.mean(dim=-2).square().mean(), rtol=0, atol=0)
    torch.testing.assert_close(fn.visreg_scale_loss(z), (1 - z.std(dim=-2, unbiased=False)).square().mean(),
                               rtol=0, atol=0)


def _x(*shape):
    return torch.randn(*shape)


BAD_INPUTS = [
    pytest.param(lambda: VISRegLoss(lambda_param=-0.1), ValueError, r"lambda_param must be in the unit interval",
                 id="lambda"),
    pytest.param(lambda: VISRegLoss(num_slices=0), ValueError, r"^num_slices must be a positive integer\.$",
                 id="num_slices"),
    pytest.param(lambda: VISRegLoss(lambda_center=-1.0), ValueError,
                 r"^lambda_scale, lambda_shape, and lambda_center must be non-negative\.$", id="weights"),
    pytest.param(lambda: VISRegLoss(eps=0.0), ValueError, r"^eps must be greater than zero\.$", id="eps"),
    pytest.param(lambda: fn.visreg_shape_loss(_x(4, 3), 0), ValueError, r"num_slices must be a positive integer",
                 id="shape-num-slices"),
    pytest.param(lambda: fn.visreg_shape_loss(_x(4, 3), 5, eps=-1.0), ValueError, r"eps must be greater than zero",
                 id="shape-eps"),
    pytest.param(lambda: VISRegLoss()(local_proj=_x(4, 3), global_proj=_x(1, 4, 3)), ValueError,
                 r"local_proj must have shape \(V_local, N, D\)", id="local-2d"),
    pytest.param(lambda: VISRegLoss()(local_proj=_x(1, 4, 3), global_proj=_x(1, 4, 2)), ValueError,
                 r"matching batch and feature dimensions", id="shapes"),
    pytest.param(lambda: VISRegLoss()(local_proj=_x(1, 1, 3), global_proj=_x(1, 1, 3)), ValueError,
                 r"^Batch size must be greater than one, got 1\.$", id="batch-1"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_bad_input_raises_lightlys_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_gathering_without_torch_distributed_raises_like_lightly(monkeypatch):
    assert VISRegLoss(gather_distributed=True).gather_distributed
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not available"):
        VISRegLoss(gather_distributed=True)
