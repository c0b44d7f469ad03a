"""MAE's norm-pix loss on every backend against the official ``forward_loss`` in float64
(tests/oracles.py ``mae64``), within bounds derived from the computation; the module, errors, the
half dtypes against the official code's own rounding, degenerate masks."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import MAELoss
from fastssl.runtime.validation import InputError

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_within, assert_within_twice_the_official_error, backend_params,
                     gamma, unit_roundoff)
from oracles import mae64, mae_patchify

# (images shape or None, patch size, patches shape): ragged grids (3×5, 7 patches), P not a power of 2
CASES = [pytest.param(((3, 3, 6, 10), 2, None), id="images-3x5-p2"),
         pytest.param(((2, 1, 9, 6), 3, None), id="images-1ch-p3"),
         pytest.param((None, None, (2, 7, 5)), id="patches-P5")]


def make_inputs(case, dtype, seed=0, weighted=False):
    """(pred (N, L, P), target images or patches, mask (N, L)) with pixel-like targets (an offset
    and a patch-dependent scale: the normalisation has something to remove)."""
    images, patch_size, patches = case
    g = torch.Generator().manual_seed(seed)
    shape = images if images is not None else patches
    scale = 0.5 + torch.rand(shape[0], *([1] * (len(shape) - 1)), generator=g, dtype=torch.float64)
    target = (0.4 + scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
    target_patches = mae_patchify(target, patch_size) if images is not None else target
    n, l, p = target_patches.shape
    pred = torch.randn(n, l, p, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    mask = torch.rand(n, l, generator=g) < 0.6
    mask[0, 0] = True
    if weighted:
        mask = mask.to(dtype) * torch.rand(n, l, generator=g, dtype=torch.float64).to(dtype)
    return pred, target, mask, patch_size


def mae_bounds(pred, target_patches, mask, normalize, u):
    """(|δL|, entrywise |δ∂L/∂pred|) for the loss on (N, L, P) float64 patches.

    Per patch of P values (torch's var_mean and var are Welford updates, m += (x − m)/k and
    M2 += (x − m_old)(x − m_new), each with ≤ 4 roundings of terms ≤ 2 max|t| and (2 max|t|)²):
    δμ ≤ γ_4P·max|t|; δvar ≤ (P(12u max|t|² + u M2 + 4 max|t| δμ))/(P − 1) + u var; s = var + eps
    by δvar + u s; 1/√s by δs/(2s) + 2u relative; t − μ by δμ + u|t − μ|; t̂ = (t − μ)/√s by
    (δμ + u|t − μ|)/√s + |t̂|(δs/(2s) + 3u); r = pred − t̂ by δt̂ + u|r| (without the
    normalisation u|r|). ℓ = Σr²/P by Σ(2|r|δr + δr²)/P + γ_{P+2} ℓ; L = Σwℓ/Σw (w ≥ 0) by
    Σw δℓ/Σw + γ_{NL+2} L. ∂L/∂pred = 2wr/(PΣw) by 2w/(PΣw)(δr + (4u + γ_NL)|r|)."""
    t, x = target_patches.detach().double(), pred.detach().double()
    w = mask.double()
    n, l, p = t.shape
    peak = t.abs().amax(dim=-1, keepdim=True)
    if normalize:
        mean, var = t.mean(dim=-1, keepdim=True), t.var(dim=-1, keepdim=True)
        m2 = var * (p - 1)
        delta_mean = gamma(4 * p, u) * peak
        delta_var = p * (12 * u * peak ** 2 + u * m2 + 4 * peak * delta_mean) / (p - 1) + u * var
        s = var + 1e-6
        delta_s = delta_var + u * s
        centred = t - mean
        normalized = centred / s.sqrt()
        r = x - normalized
        delta_r = (delta_mean + u * centred.abs()) / s.sqrt() + normalized.abs() * (delta_s / (2 * s) + 3 * u) \
            + u * r.abs()
    else:
        r = x - t
        delta_r = u * r.abs()
    per_patch = r.square().mean(dim=-1)
    delta_patch = (2 * r.abs() * delta_r + delta_r.square()).mean(dim=-1) + gamma(p + 2, u) * per_patch
    loss = (w * per_patch).sum() / w.sum()
    value = ((w * delta_patch).sum() / w.sum() + gamma(n * l + 2, u) * loss).item()
    grad = 2 * w[..., None] / (p * w.sum()) * (delta_r + (4 * u + gamma(n * l, u)) * r.abs())
    return value, grad


def patches_of(target, patch_size):
    return mae_patchify(target, patch_size) if patch_size is not None else target


@pytest.mark.parametrize("backend", backend_params("mae"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("norm_pix_loss", [True, False], ids=["norm-pix", "raw"])
@pytest.mark.parametrize("weighted", [False, True], ids=["bool-mask", "float-mask"])
def test_mae_equals_official_float64(backend, dtype, case, norm_pix_loss, weighted):
    pred, target, mask, patch_size = make_inputs(case, dtype, weighted=weighted)
    loss = fn.mae_loss(pred, target, mask, patch_size=patch_size, norm_pix_loss=norm_pix_loss, backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    exact_pred = pred.detach().double().requires_grad_(True)
    exact = mae64(exact_pred, target.double(), mask, patch_size, norm_pix_loss)
    value_bound, grad_bound = mae_bounds(pred, patches_of(target.double(), patch_size), mask, norm_pix_loss,
                                         unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    (grad,) = torch.autograd.grad(loss, pred)
    (exact_grad,) = torch.autograd.grad(exact, exact_pred)
    assert grad.dtype == pred.dtype and grad.shape == pred.shape
    assert_within(grad, exact_grad, grad_bound, "gradient of pred")


@pytest.mark.parametrize("backend", backend_params("mae"))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_mae_half_within_twice_the_official_codes_own_error(backend, dtype):
    pred, target, mask, patch_size = make_inputs(CASES[0].values[0], dtype, seed=3)
    loss = fn.mae_loss(pred, target, mask, patch_size=patch_size, backend=backend)
    (grad,) = torch.autograd.grad(loss, pred)
    exact_pred = pred.detach().double().requires_grad_(True)
    exact = mae64(exact_pred, target.double(), mask, patch_size)
    (exact_grad,) = torch.autograd.grad(exact, exact_pred)
    half_pred = pred.detach().clone().requires_grad_(True)
    official = mae64(half_pred, target, mask, patch_size, dtype=dtype)  # the official code run in the half dtype
    (official_grad,) = torch.autograd.grad(official, half_pred)
    assert grad.dtype == dtype
    assert_within_twice_the_official_error((loss, grad), (exact, exact_grad), (official, official_grad))


@pytest.mark.parametrize("backend", backend_params("mae"))
def test_mae_batch_of_one_single_masked_patch_and_full_mask(backend):
    pred, target, _, patch_size = make_inputs(CASES[0].values[0], torch.float32)
    pred, target = pred[:1].detach().requires_grad_(True), target[:1]
    for mask in (torch.zeros(1, pred.shape[1], dtype=torch.bool).index_fill_(1, torch.tensor([4]), True),
                 torch.ones(1, pred.shape[1], dtype=torch.bool)):
        loss = fn.mae_loss(pred, target, mask, patch_size=patch_size, backend=backend)
        exact = mae64(pred.detach().double(), target.double(), mask, patch_size)
        assert_within(loss, exact, mae_bounds(pred, patches_of(target.double(), patch_size), mask, True, 2.0 ** -24)[0])
        (grad,) = torch.autograd.grad(loss, pred)
        assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()  # only the masked patches are learned


@pytest.mark.parametrize("backend", backend_params("mae"))
def test_mae_empty_mask_is_nan_as_the_official_division(backend):
    pred, target, mask, patch_size = make_inputs(CASES[2].values[0], torch.float32)
    assert torch.isnan(fn.mae_loss(pred, target, torch.zeros_like(mask), backend=backend))


def test_mae_target_is_data_and_gets_no_gradient():
    pred, target, mask, patch_size = make_inputs(CASES[0].values[0], torch.float64)
    target.requires_grad_(True)
    fn.mae_loss(pred, target, mask, patch_size=patch_size).backward()
    assert target.grad is None and pred.grad is not None


def test_mae_gradcheck_through_the_image_view():
    pred, target, mask, patch_size = make_inputs(((2, 3, 4, 6), 2, None), torch.float64)
    for backend in ("reference", "torch"):
        assert torch.autograd.gradcheck(lambda p: fn.mae_loss(p, target, mask, patch_size=2, backend=backend),
                                        (pred,))


def test_mae_module_defaults_and_state():
    criterion = MAELoss()
    assert (criterion.patch_size, criterion.norm_pix_loss) == (None, True)
    assert list(criterion.state_dict()) == []
    pred, target, mask, patch_size = make_inputs(CASES[0].values[0], torch.float32, seed=5)
    module = MAELoss(patch_size=patch_size, norm_pix_loss=False)
    torch.testing.assert_close(module(pred, target, mask),
                               fn.mae_loss(pred, target, mask, patch_size=patch_size, norm_pix_loss=False),
                               rtol=0, atol=0)
    assert fastssl.mae_loss is fn.mae_loss and fastssl.losses.MAELoss is MAELoss


def test_mae_bad_inputs_raise_naming_the_argument():
    pred, target, mask, patch_size = make_inputs(CASES[0].values[0], torch.float32)
    with pytest.raises(ValueError, match="pred must have 3 dimensions"):
        fn.mae_loss(pred[0], target, mask, patch_size=2)
    with pytest.raises(InputError, match="multiples of patch_size"):
        fn.mae_loss(pred, target[..., :9], mask, patch_size=2)
    with pytest.raises(InputError, match="pred must be"):
        fn.mae_loss(pred[:, 1:], target, mask, patch_size=2)
    with pytest.raises(InputError, match="target must be patches"):
        fn.mae_loss(pred, target, mask)
    with pytest.raises(InputError, match="mask must have shape"):
        fn.mae_loss(pred, target, mask[:, 1:], patch_size=2)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        fn.mae_loss(pred, target, mask.tolist(), patch_size=2)
    with pytest.raises(TypeError, match="patch_size must be an int"):
        MAELoss(patch_size=2.0)
    with pytest.raises(TypeError, match="target must be float"):
        fn.mae_loss(pred, target.long(), mask, patch_size=2)
    single = torch.randn(2, 3, 1)
    with pytest.raises(ValueError, match="norm_pix_loss needs at least 2 values per patch"):
        fn.mae_loss(single, single, torch.ones(2, 3))
    fn.mae_loss(single, single, torch.ones(2, 3), norm_pix_loss=False)  # no variance: fine
