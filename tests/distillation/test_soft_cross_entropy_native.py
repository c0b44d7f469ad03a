"""The native soft-target cross-entropy of crop pairs (``fastssl::soft_cross_entropy_pairs_native``,
csrc/distillation/) against the reference and float64.
"""

import pytest
import torch

import fastssl.functional as fn
from fastssl import backends, reference
from fastssl.runtime import native

from helpers import assert_within, half_error_within_twice_reference, soft_ce_pairs_bounds


# --- soft-target cross-entropy of crop pairs (SwAV, DINO) -------------------------------------
def pair_inputs(n_targets, n_students, batch, classes, dtype=torch.float32, teacher_temp=1.0):
    """Targets: softmax of Gaussian scores at ``teacher_temp`` (DINO sharpens at 0.04); logits: Gaussian."""
    targets = torch.softmax(torch.randn(n_targets, batch, classes, dtype=torch.float64) / teacher_temp, -1)
    logits = 3 * torch.randn(n_students, batch, classes, dtype=torch.float64)
    return targets.to(dtype).requires_grad_(True), logits.to(dtype).requires_grad_(True)


def native_pairs(targets, logits, scale):
    return backends.select("soft_cross_entropy_pairs", "native", [targets, logits])[1](targets, logits, scale)


def pairs_and_grads(loss_fn, targets, logits, scale, weights):
    """(T, S) losses and the gradients of Σ weights · loss for the inputs that require them."""
    loss = loss_fn(targets, logits, scale)
    inputs = [x for x in (targets, logits) if x.requires_grad]
    return loss, torch.autograd.grad((loss * weights.to(loss.dtype)).sum(), inputs)


def reference_pairs64(targets, logits, scale, weights):
    """fastssl.reference's formula in float64 on the same (rounded) inputs."""
    as64 = [x.detach().double().requires_grad_(x.requires_grad) for x in (targets, logits)]
    loss, grads = pairs_and_grads(reference.soft_cross_entropy_pairs, *as64, scale, weights)
    return loss.detach(), grads


def assert_pairs_within(loss, grads, targets, logits, scale, weights, dtype=torch.float32):
    """Losses and gradients (of the inputs that require them) against reference_pairs64 within
    soft_ce_pairs_bounds (tests/helpers.py)."""
    expected, expected_grads = reference_pairs64(targets, logits, scale, weights)
    loss_bound, *grad_bounds = soft_ce_pairs_bounds(targets, logits, scale, weights, dtype=dtype)
    assert_within(loss, expected, loss_bound, "pair losses")
    grad_bounds = [b for b, x in zip(grad_bounds, (targets, logits)) if x.requires_grad]
    for got, want, bound in zip(grads, expected_grads, grad_bounds):
        assert_within(got, want, bound, "gradient")


# Ragged shapes: one group of samples; several groups, the last one partial (3000 classes:
# groups of 29 samples); one sample per group with chunks of student crops, the last one
# partial (70,000 classes: chunks of 3 crops); 1 and 3 target crops (the generic row pass).
PAIR_SHAPES = [pytest.param(2, 3, 5, 37, id="T2-S3-B5-K37"), pytest.param(1, 4, 3, 130, id="T1-S4-B3-K130"),
               pytest.param(3, 2, 6, 1, id="T3-S2-B6-K1"), pytest.param(2, 3, 61, 3000, id="T2-S3-B61-K3000"),
               pytest.param(3, 5, 2, 70000, id="T3-S5-B2-K70000")]


@pytest.mark.parametrize("n_targets,n_students,batch,classes", PAIR_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pairs_equal_reference(built, n_targets, n_students, batch, classes, dtype):
    targets, logits = pair_inputs(n_targets, n_students, batch, classes, dtype)
    weights = torch.rand(n_targets, n_students, dtype=torch.float64)
    loss, grads = pairs_and_grads(native_pairs, targets, logits, 7.0, weights)
    assert loss.dtype == dtype and loss.shape == (n_targets, n_students)
    for got, x in zip(grads, (targets, logits)):
        assert got.dtype == dtype and got.shape == x.shape
    # Q L − σ Σ q x cancels where the loss is near 0 (K = 1: exactly 0): the bounds are absolute
    # per term (soft_ce_pairs_bounds counts |z| and |L|, not the loss)
    assert_pairs_within(loss, grads, targets, logits, 7.0, weights, dtype)


@pytest.mark.parametrize("needs", ["logits", "targets"])
def test_pairs_only_the_needed_gradient(built, needs):
    targets, logits = pair_inputs(2, 3, 5, 37, torch.float64)
    (targets if needs == "logits" else logits).requires_grad_(False)
    weights = torch.rand(2, 3, dtype=torch.float64)
    (grad,) = pairs_and_grads(native_pairs, targets, logits, 7.0, weights)[1]
    (expected,) = reference_pairs64(targets, logits, 7.0, weights)[1]
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)


def test_pairs_sharp_targets_and_tiny_probabilities(built):
    """DINO's teacher at τ = 0.04 over 4096 dims: mostly subnormal or zero probabilities (each
    target row is flushed below sqrt(tiny) × its peak)."""
    targets, logits = pair_inputs(2, 4, 9, 4096, teacher_temp=0.04)
    tiny = torch.finfo(torch.float32).tiny
    assert ((targets > 0) & (targets < tiny)).sum() > 10000 and (targets == 0).any()
    weights = torch.rand(2, 4, dtype=torch.float64)
    loss, grads = pairs_and_grads(native_pairs, targets, logits, 10.0, weights)
    assert_pairs_within(loss, grads, targets, logits, 10.0, weights)


def test_pairs_huge_logits(built):
    """Student logits of 1e4 (one-hot softmax rows): the dominant term's exp(σx − L) is exactly 1,
    as in the torch backend's test of the same inputs (tests/distillation/test_soft_cross_entropy.py)."""
    targets = torch.softmax(torch.randn(2, 5, 300) / 0.01, -1).requires_grad_(True)
    logits = (torch.randn(3, 5, 300) * 1e4).requires_grad_(True)
    loss, grads = pairs_and_grads(native_pairs, targets, logits, 10.0, torch.ones(2, 3))
    assert torch.isfinite(loss).all()
    assert_pairs_within(loss, grads, targets, logits, 10.0, torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_pairs_half_precision_error_at_most_twice_the_references(built, dtype):
    targets, logits = pair_inputs(2, 3, 5, 37, dtype)
    loss, grads = pairs_and_grads(native_pairs, targets, logits, 10.0, torch.ones(2, 3))
    assert loss.dtype == torch.float32 and all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    exact = reference.soft_cross_entropy_pairs(targets.detach().double(), logits.detach().double(), 10.0)
    in_half = -torch.einsum("tbk,sbk->ts", targets, torch.log_softmax(10.0 * logits, dim=-1)) / 5
    half_error_within_twice_reference(loss.detach(), in_half.detach(), exact)


def test_pairs_mixed_dtypes_compute_in_the_widest(built):
    targets, logits = pair_inputs(2, 3, 5, 37, torch.float64)
    half_logits = logits.detach().to(torch.bfloat16).requires_grad_(True)
    loss, (grad_targets, grad_logits) = pairs_and_grads(native_pairs, targets, half_logits, 7.0, torch.ones(2, 3))
    expected, expected_grads = reference_pairs64(targets, half_logits, 7.0, torch.ones(2, 3))
    assert loss.dtype == torch.float64 and grad_targets.dtype == torch.float64 and grad_logits.dtype == torch.bfloat16
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad_targets, expected_grads[0], rtol=1e-10, atol=1e-12)


def test_pairs_two_threads_equal_one(built):
    targets, logits = pair_inputs(2, 8, 40, 3000)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            results.append(pairs_and_grads(native_pairs, targets, logits, 10.0, torch.ones(2, 8)))
    finally:
        torch.set_num_threads(threads)
    # Each thread count against float64 (the per-thread partial sums of Σ q x, and the GEMM of the
    # targets' gradient, are added in another order); the logits' gradient bit for bit, as each
    # student row's is computed in one pass by one thread whatever their count.
    for loss, grads in results:
        assert_pairs_within(loss, grads, targets, logits, 10.0, torch.ones(2, 8))
    torch.testing.assert_close(results[1][1][1], results[0][1][1], rtol=0, atol=0)


def test_pairs_gradcheck_float64(built):
    targets, logits = pair_inputs(2, 3, 2, 5, torch.float64)
    assert torch.autograd.gradcheck(lambda t, x: native_pairs(t, x, 3.0), (targets, logits))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pairs_opcheck(built, dtype):
    targets, logits = pair_inputs(2, 3, 5, 9, dtype)
    for args in ((targets, logits, 10.0), (targets.detach(), logits, 10.0)):
        torch.library.opcheck(torch.ops.fastssl.soft_cross_entropy_pairs_native.default, args)


def test_pairs_compile_fullgraph_equals_eager(built):
    targets, logits = pair_inputs(2, 3, 5, 9)
    torch._dynamo.reset()
    compiled = torch.compile(native_pairs, fullgraph=True, backend="aot_eager")
    eager, eager_grads = pairs_and_grads(native_pairs, targets, logits, 10.0, torch.ones(2, 3))
    loss, grads = pairs_and_grads(compiled, targets, logits, 10.0, torch.ones(2, 3))
    torch.testing.assert_close(loss, eager, rtol=0, atol=0)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_swav_and_dino_with_native_equal_reference(built):
    high = [torch.randn(6, 50, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    low = [torch.randn(6, 50, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    center = torch.randn(50, dtype=torch.float64)
    for loss_of in (lambda backend: fn.swav(high, low, backend=backend),
                    lambda backend: fn.dino(high, high + low, center, backend=backend)):
        (loss, grads), (expected, expected_grads) = (
            (loss_of(backend), torch.autograd.grad(loss_of(backend), high + low)) for backend in ("native", "reference"))
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=0)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-12)


def test_pairs_auto_picks_native_on_cpu_only(built, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # otherwise the interpreted Triton backend comes first
    targets, logits = pair_inputs(2, 3, 5, 9)
    assert backends.select("soft_cross_entropy_pairs", "auto", [targets, logits])[0] == "native"
    assert native.cpu_only_reasons([targets.to("meta"), logits]) == [
        "this native op has a CPU kernel only, got ['meta'] tensors"]


def test_public_api_errors_name_the_argument_with_native_pairs(built):
    with pytest.raises(ValueError, match="teacher_out and student_out"):
        fn.dino([torch.randn(5, 9)] * 2, [torch.randn(6, 9)] * 2, torch.zeros(9), backend="native")
    with pytest.raises(ValueError, match="temperature"):
        fn.swav([torch.randn(5, 9)] * 2, temperature=0.0, backend="native")


def test_pairs_op_rejects_bad_shapes(built):
    targets, logits = pair_inputs(2, 3, 5, 9)
    with pytest.raises(RuntimeError, match=r"targets and logits must share \(B, K\)"):
        torch.ops.fastssl.soft_cross_entropy_pairs_native(targets, logits[:, :4], 10.0)
    with pytest.raises(RuntimeError, match="scale must be > 0"):
        torch.ops.fastssl.soft_cross_entropy_pairs_native(targets, logits, 0.0)
