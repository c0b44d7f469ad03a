"""The soft-target cross-entropy of crop pairs (SwAV's and DINO's core), plain and through a fused last
layer, on the torch and triton backends, against float64.
"""
import pytest
import torch
import torch.nn.functional as F

import fastssl.functional as fn
from fastssl import backends
from fastssl.distillation import torch_backend as distillation
from fastssl.runtime import blocks

from helpers import (FLOAT_DTYPES, FUSED, LargestTensor, assert_within, gamma, half_error_within_twice_reference,
                     soft_ce_pairs_bounds, unit_roundoff)
from oracles import lightly_dino64, lightly_swav64, pair_losses64, prototype_scores


def pair_inputs(n_targets, n_students, batch, classes, dtype, sharp=1.0):
    targets = torch.softmax(torch.randn(n_targets, batch, classes, dtype=torch.float64) * sharp, -1)
    logits = torch.randn(n_students, batch, classes, dtype=torch.float64)
    return targets.to(dtype).requires_grad_(True), logits.to(dtype).requires_grad_(True)


def assert_pairs_within(loss, grads, expected, expected_grads, targets64, logits64, scale, weights, dtype, **errors):
    """Pair losses and the gradients of Σ weights · loss against float64 within soft_ce_pairs_bounds."""
    bounds = soft_ce_pairs_bounds(targets64, logits64, scale, weights, dtype=dtype, **errors)
    assert_within(loss, expected, bounds[0], "pair losses")
    for name, got, want, bound in zip(("targets", "logits"), grads, expected_grads, bounds[1:]):
        assert_within(got, want, bound, f"gradient of the {name}")


def pair_core(backend, linear=False):
    op = "linear_soft_cross_entropy_pairs" if linear else "soft_cross_entropy_pairs"
    return lambda *args: backends.select(op, backend, [a for a in args if isinstance(a, torch.Tensor)])[1](*args)


# ============================================================================================
# Soft-target cross-entropy of crop pairs
# ============================================================================================
PAIR_SHAPES = [pytest.param(2, 3, 5, 37, id="T2-S3-B5-K37"), pytest.param(1, 4, 3, 130, id="T1-S4-B3-K130"),
               pytest.param(3, 2, 6, 1, id="T3-S2-B6-K1")]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n_targets,n_students,batch,classes", PAIR_SHAPES)
def test_pairs_values_and_gradients_equal_float64(n_targets, n_students, batch, classes, dtype, backend,
                                                  block_elements):
    targets, logits = pair_inputs(n_targets, n_students, batch, classes, dtype, sharp=3.0)
    loss = pair_core(backend)(targets, logits, 7.0)
    assert loss.dtype == dtype and loss.shape == (n_targets, n_students)
    weights = torch.randn(n_targets, n_students, dtype=dtype)
    grads = torch.autograd.grad((loss * weights).sum(), (targets, logits))
    targets64, logits64 = (x.detach().double().requires_grad_(True) for x in (targets, logits))
    expected = pair_losses64(targets64, logits64, 7.0)
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), (targets64, logits64))
    assert all(got.dtype == dtype for got in grads)
    # K = 1 makes every loss exactly 0 (Q·L − σqx cancels): the bounds are absolute per term
    assert_pairs_within(loss, grads, expected, expected_grads, targets64, logits64, 7.0, weights, dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_pairs_only_the_needed_gradient(backend):
    targets, logits = pair_inputs(2, 3, 5, 37, torch.float64)
    loss = pair_core(backend)(targets.detach(), logits, 7.0)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    expected = torch.autograd.grad(pair_losses64(targets.detach(), logits, 7.0).sum(), logits)[0]
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
def test_pairs_sharp_targets_and_huge_logits(backend):
    """DINO's teacher at τ = 0.04 is mostly subnormal probabilities; student logits of 1e4 / τ."""
    targets = torch.softmax(torch.randn(2, 5, 300) / 0.01, -1).requires_grad_(True)
    assert ((targets > 0) & (targets < torch.finfo(torch.float32).tiny)).any()
    logits = (torch.randn(3, 5, 300) * 1e4).requires_grad_(True)
    loss = pair_core(backend)(targets, logits, 10.0)
    grads = torch.autograd.grad(loss.sum(), (targets, logits))
    targets64, logits64 = (x.detach().double().requires_grad_(True) for x in (targets, logits))
    expected = pair_losses64(targets64, logits64, 10.0)
    expected_grads = torch.autograd.grad(expected.sum(), (targets64, logits64))
    assert torch.isfinite(loss).all()
    assert_pairs_within(loss, grads, expected, expected_grads, targets64, logits64, 10.0, torch.ones(2, 3),
                        torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_pairs_fp16_error_within_twice_reference_in_fp16(backend):
    targets, logits = pair_inputs(2, 3, 5, 37, torch.float16, sharp=3.0)
    loss = pair_core(backend)(targets, logits, 10.0)
    assert loss.dtype == torch.float32 and torch.isfinite(loss).all()
    exact = pair_losses64(targets, logits, 10.0)
    in_half = -torch.einsum("tbk,sbk->ts", targets, F.log_softmax(10.0 * logits, dim=-1)) / 5
    half_error_within_twice_reference(loss.detach(), in_half.detach(), exact.detach())
    grads = torch.autograd.grad(loss.sum(), (targets, logits))
    assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", FUSED)
def test_pairs_gradcheck_float64(backend):
    targets, logits = pair_inputs(2, 2, 2, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda t, x: pair_core(backend)(t, x, 3.0), (targets, logits), fast_mode=True)


@pytest.mark.triton
def test_triton_pairs_opcheck():
    backends.preload("triton")
    targets, logits = pair_inputs(2, 3, 5, 9, torch.float32)
    for args in ((targets, logits, 10.0), (targets.detach(), logits, 10.0)):
        torch.library.opcheck(torch.ops.fastssl.soft_cross_entropy_pairs_triton.default, args)


def test_torch_pairs_never_hold_a_pairs_by_classes_tensor(monkeypatch):
    """Forward and backward make nothing larger than the inputs and gradients (S·B·K): no
    (T·S·B·K) product; with the last layer fused, nothing larger than the targets (T·B·K,
    T < S here) and nothing as large as the (S·B·K) logits."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 100)
    targets, logits = pair_inputs(3, 4, 6, 50, torch.float32)
    grad = torch.ones(3, 4)
    with LargestTensor() as mode:
        _, lse = distillation.soft_cross_entropy_pairs_forward(targets.detach(), logits.detach(), 5.0)
        distillation.soft_cross_entropy_pairs_backward(grad, targets.detach(), logits.detach(), lse, 5.0, [True, True])
    assert mode.largest == logits.numel()  # the gradient of the logits itself

    features = torch.randn(4, 6, 8)
    weight = torch.randn(50, 8)
    with LargestTensor() as mode:
        _, lse = distillation.linear_soft_cross_entropy_pairs_forward(targets.detach(), features, weight, 5.0)
        distillation.linear_soft_cross_entropy_pairs_backward(grad, targets.detach(), features, weight, lse, 5.0,
                                                            [False, True, True])
    assert mode.largest == targets.numel() < logits.numel(), mode.largest


# ============================================================================================
# Last layer fused with the cross-entropy
# ============================================================================================
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n_targets,n_students,batch,classes", PAIR_SHAPES)
def test_linear_pairs_equal_float64(n_targets, n_students, batch, classes, dtype, block_elements):
    targets, _ = pair_inputs(n_targets, n_students, batch, classes, dtype, sharp=3.0)
    features = torch.randn(n_students, batch, 11, dtype=dtype, requires_grad=True)
    weight = torch.randn(classes, 11, dtype=dtype, requires_grad=True)
    loss = pair_core("torch", linear=True)(targets, features, weight, 2.0)
    weights = torch.randn(n_targets, n_students, dtype=dtype)
    grads = torch.autograd.grad((loss * weights).sum(), (targets, features, weight))
    leaves64 = [x.detach().double().requires_grad_(True) for x in (targets, features, weight)]
    logits64 = (leaves64[1] @ leaves64[2].T).detach().requires_grad_(True)
    expected = pair_losses64(leaves64[0], logits64, 2.0)
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), (leaves64[0], logits64))
    assert all(got.dtype == dtype for got in grads)
    # soft_ce_pairs_bounds with the GEMM's error on z = σ f·w (γ_11·σΣ|f||w|); the gradients of f
    # and w are K- and S·B-term sums of the logits' gradient times w or f: their bound's sums
    # plus γ of their length
    u = unit_roundoff(dtype)
    f, w = leaves64[1].detach(), leaves64[2].detach()
    products = torch.einsum("sbd,kd->sbk", f.abs(), w.abs())
    loss_bound, targets_bound, logits_bound = soft_ce_pairs_bounds(
        leaves64[0], logits64, 2.0, weights, logit_error=2.0 * gamma(11, u) * products.amax(-1), dtype=dtype)
    assert_within(loss, expected, loss_bound, "pair losses")
    assert_within(grads[0], expected_grads[0], targets_bound, "gradient of the targets")
    g_abs = expected_grads[1].abs()
    assert_within(grads[1], torch.einsum("sbk,kd->sbd", expected_grads[1], w),
                  logits_bound @ w.abs() + gamma(classes, u) * g_abs @ w.abs(), "gradient of the features")
    assert_within(grads[2], torch.einsum("sbk,sbd->kd", expected_grads[1], f),
                  torch.einsum("sbk,sbd->kd", logits_bound, f.abs())
                  + gamma(n_students * batch, u) * torch.einsum("sbk,sbd->kd", g_abs, f.abs()), "gradient of the weight")


def test_linear_pairs_gradcheck_float64():
    targets, _ = pair_inputs(2, 3, 3, 5, torch.float64)
    features = torch.randn(3, 3, 4, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *x: pair_core("torch", linear=True)(*x, 1.5), (targets, features, weight))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_dino_with_fused_last_layer_equals_lightly(backend):
    teacher = [torch.randn(5, 37, dtype=torch.float64) for _ in range(2)]
    features = [torch.randn(5, 9, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    weight = torch.randn(37, 9, dtype=torch.float64, requires_grad=True)
    center = torch.randn(37, dtype=torch.float64) * 0.3
    loss = fn.dino(teacher, features, center, 0.07, 0.1, last_layer_weight=weight, backend=backend)
    grads = torch.autograd.grad(loss, features + [weight])
    expected = lightly_dino64(teacher, [f @ weight.T for f in features], center, 0.07, 0.1)
    expected_grads = torch.autograd.grad(expected, features + [weight])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


# ============================================================================================
# Whole losses: every backend, torch.compile
# ============================================================================================
@pytest.mark.triton
def test_triton_swav_and_dino_equal_lightly():
    crops = [prototype_scores(7, 13, dtype=torch.float64).requires_grad_(True) for _ in range(4)]
    queue = [prototype_scores(5, 13, dtype=torch.float64) for _ in range(2)]
    loss = fn.swav(crops[:2], crops[2:], queue, backend="triton")
    grads = torch.autograd.grad(loss, crops)
    expected = lightly_swav64(crops[:2], crops[2:], queue)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected, crops)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)

    teacher = [torch.randn(5, 37, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    student = [torch.randn(5, 37, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    center = torch.randn(37, dtype=torch.float64) * 0.3
    loss = fn.dino(teacher, student, center, 0.04, 0.1, backend="triton")
    expected = lightly_dino64(teacher, student, center, 0.04, 0.1)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    leaves = teacher + student
    for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)
