"""The native Barlow Twins Gram path (``fastssl::barlow_twins_gram_forward`` / ``_backward``,
csrc/redundancy/) against the reference and float64.
"""

import pytest
import torch

import fastssl.functional as fn
from fastssl import backends, reference

from helpers import (assert_within, barlow_twins_loss_bound, batch_norm_grad_tolerance,
                     half_error_within_twice_reference, unit_roundoff)


# --- Barlow Twins (the Gram path in C++; the direct path is the torch backend's) ------------
def barlow_views(n, d, dtype=torch.float32):
    """Two correlated views with per-feature offsets (batch norm must remove them)."""
    base = torch.randn(n, d, dtype=torch.float64)
    offsets = torch.linspace(-3, 3, d, dtype=torch.float64)
    z_a = 2 * base + offsets + 0.5 * torch.randn(n, d, dtype=torch.float64)
    z_b = 2 * base - offsets + 0.5 * torch.randn(n, d, dtype=torch.float64)
    return z_a.to(dtype).requires_grad_(True), z_b.to(dtype).requires_grad_(True)


def barlow_and_grads(z_a, z_b, lambda_param=5e-3, backend="native", algorithm="auto"):
    loss = fn.barlow_twins(z_a, z_b, lambda_param, backend=backend, algorithm=algorithm)
    return loss, torch.autograd.grad(loss, (z_a, z_b))


def reference_barlow64(z_a, z_b, lambda_param=5e-3):
    """fastssl.reference's formula in float64 on the same (rounded) inputs."""
    as64 = [z.detach().double().requires_grad_(True) for z in (z_a, z_b)]
    return barlow_and_grads(*as64, lambda_param, backend="reference")


def assert_barlow_within(loss, grads, z_a, z_b, lambda_param=5e-3, dtype=torch.float32):
    """Loss and gradients against reference_barlow64 within barlow_twins_loss_bound and
    batch_norm_grad_tolerance (tests/helpers.py)."""
    expected, expected_grads = reference_barlow64(z_a, z_b, lambda_param)
    u = unit_roundoff(dtype)
    assert_within(loss, expected, barlow_twins_loss_bound(z_a, z_b, lambda_param, u=u), "loss")
    for got, want in zip(grads, expected_grads):
        assert_within(got, want, batch_norm_grad_tolerance(*z_a.shape, u) * want.abs().max().item(), "gradient")


# Ragged shapes: N < D within one column block (256) and across blocks with a partial last one;
# N above one Gram row block (256) with a partial last one; N ≥ D (the direct path).
BARLOW_NATIVE_SHAPES = [pytest.param(7, 37, id="N7-D37"), pytest.param(33, 130, id="N33-D130"),
                        pytest.param(5, 601, id="N5-D601"), pytest.param(300, 517, id="N300-D517"),
                        pytest.param(37, 37, id="N37-D37"), pytest.param(130, 5, id="N130-D5")]


@pytest.mark.parametrize("n,d", BARLOW_NATIVE_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_barlow_twins_equals_reference(built, n, d, dtype):
    z_a, z_b = barlow_views(n, d, dtype)
    loss, grads = barlow_and_grads(z_a, z_b, 0.02)
    assert loss.dtype == dtype and loss.shape == ()
    assert all(got.dtype == dtype and got.shape == (n, d) for got in grads)
    assert_barlow_within(loss, grads, z_a, z_b, 0.02, dtype)


@pytest.mark.parametrize("n,d,algorithm", [(130, 5, "gram"), (33, 130, "direct")], ids=["gram-N130-D5", "direct-N33-D130"])
def test_barlow_twins_forced_algorithm_equals_reference(built, n, d, algorithm):
    z_a, z_b = barlow_views(n, d, torch.float64)
    loss, grads = barlow_and_grads(z_a, z_b, 0.02, algorithm=algorithm)
    expected, expected_grads = reference_barlow64(z_a, z_b, 0.02)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10 * want.abs().max().item())


def test_barlow_twins_constant_feature_is_finite(built):
    """A dead feature: zero variance, batch norm gives 0 (rstd = 1/sqrt(eps)), as the reference."""
    z_a, z_b = barlow_views(8, 300)
    with torch.no_grad():
        z_a[:, 2] = 3.0
    loss, grads = barlow_and_grads(z_a, z_b)
    expected, _ = reference_barlow64(z_a, z_b)
    assert_within(loss, expected, barlow_twins_loss_bound(z_a, z_b, 5e-3), "loss")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_barlow_twins_half_precision_error_at_most_twice_the_references(built, dtype):
    z_a, z_b = barlow_views(33, 300, dtype)
    loss, grads = barlow_and_grads(z_a, z_b)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    exact, exact_grads = reference_barlow64(z_a, z_b)
    z_ah, z_bh = (z.detach().clone().requires_grad_(True) for z in (z_a, z_b))  # the formula in half precision
    in_half = reference.barlow_twins_from_correlation(
        reference.batch_normalize(z_ah).T @ reference.batch_normalize(z_bh) / z_ah.shape[0], 5e-3)
    half_grads = torch.autograd.grad(in_half, (z_ah, z_bh))
    half_error_within_twice_reference(loss.detach(), in_half.detach(), exact)
    for got, in_half_grad, want in zip(grads, half_grads, exact_grads):
        half_error_within_twice_reference(got, in_half_grad, want)


def test_barlow_twins_offset_and_tiny_features_stay_within_the_float64_bounds(built):
    """Features at 300 ± σ, σ from 1e-3 to 1 (test_redundancy_kernels' case, on the C++ Gram path):
    normalising by the rounded mean alone left a's columns a mean of its rounding and put 7e-4
    relative error on the gradient of the narrow features, 110× the bound."""
    z_a, z_b = (z.detach().double() for z in barlow_views(17, 29))
    z_a = (z_a * torch.logspace(-3, 0, 29, dtype=torch.float64) + 300.0).float().requires_grad_()
    z_b = (z_b - 300.0).float().requires_grad_()
    loss, grads = barlow_and_grads(z_a, z_b, algorithm="gram")
    assert_barlow_within(loss, grads, z_a, z_b)


def test_barlow_twins_two_threads_equal_one(built):
    """Forward, each thread sums the Grams of its blocks: the order of the sums changes only."""
    z_a, z_b = barlow_views(40, 1100)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(barlow_and_grads(z_a, z_b))
    finally:
        torch.set_num_threads(threads)
    # each thread count against float64: the per-thread Grams are summed in another order
    for loss, grads in results:
        assert_barlow_within(loss, grads, z_a, z_b)


@pytest.mark.parametrize("n,d", [(3, 4), (3, 260), (5, 3)], ids=["gram-N3-D4", "gram-two-blocks-N3-D260", "direct-N5-D3"])
def test_barlow_twins_gradcheck_float64(built, n, d):
    z_a, z_b = barlow_views(n, d, torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fn.barlow_twins(a, b, 0.3, backend="native"), (z_a, z_b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_barlow_twins_opcheck(built, dtype):
    z_a, z_b = barlow_views(7, 37, dtype)
    torch.library.opcheck(torch.ops.fastssl.barlow_twins_native.default, (z_a, z_b, 0.02, "auto"))
    loss, stats, products = torch.ops.fastssl.barlow_twins_gram_forward(z_a.detach(), z_b.detach(), 0.02)
    torch.library.opcheck(torch.ops.fastssl.barlow_twins_gram_forward.default, (z_a.detach(), z_b.detach(), 0.02))
    torch.library.opcheck(torch.ops.fastssl.barlow_twins_gram_backward.default,
                          (torch.tensor(1.5, dtype=loss.dtype), stats, products, z_a.detach(), z_b.detach(), 0.02))


def test_barlow_twins_compile_fullgraph_equals_eager(built):
    z_a, z_b = barlow_views(7, 37)
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: fn.barlow_twins(a, b, 0.02, backend="native"), fullgraph=True,
                             backend="aot_eager")
    loss, grads = barlow_and_grads(z_a, z_b, 0.02)
    compiled_loss = compiled(z_a, z_b)
    torch.testing.assert_close(compiled_loss, loss, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(compiled_loss, (z_a, z_b)), grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_barlow_twins_auto_picks_native_on_cpu(built, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # otherwise the interpreted Triton backend comes first
    z_a, z_b = barlow_views(7, 37)
    assert backends.select("barlow_twins", "auto", [z_a, z_b])[0] == "native"


def test_barlow_twins_op_rejects_bad_inputs(built):
    z_a, z_b = barlow_views(7, 37)
    z_a, z_b = z_a.detach(), z_b.detach()
    with pytest.raises(RuntimeError, match=r"z_a and z_b must be \(N, D\) of one shape"):
        torch.ops.fastssl.barlow_twins_gram_forward(z_a, z_b[:, :5], 0.02)
    with pytest.raises(RuntimeError, match="z_a and z_b must have one dtype"):
        torch.ops.fastssl.barlow_twins_gram_forward(z_a, z_b.double(), 0.02)
    _, stats, products = torch.ops.fastssl.barlow_twins_gram_forward(z_a, z_b, 0.02)
    with pytest.raises(RuntimeError, match=r"stats \(5, D\) and products \(2, N, N\) must match"):
        torch.ops.fastssl.barlow_twins_gram_backward(torch.tensor(1.0), stats[:, :5], products, z_a, z_b, 0.02)
