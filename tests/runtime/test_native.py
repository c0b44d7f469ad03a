"""The native (csrc/) backend: its ops against the reference, the JIT build's robustness, and
the CUDA sources compiling with nvcc.

The extension is built (or loaded from its cache) once per session by the ``native`` fixture;
tests that need it are skipped, with the reason, where it cannot be built.
"""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastssl.functional as fn
from fastssl import backends, reference
from fastssl.runtime import native
from helpers import (U32, assert_within, barlow_twins_loss_bound, batch_norm_grad_tolerance,
                     half_error_within_twice_reference, sinkhorn_log_span, sinkhorn_rel_error, soft_ce_pairs_bounds,
                     unit_roundoff)

CUDA_SOURCES = sorted(native.SOURCE_DIR.glob("*/*.cu"))


@pytest.fixture(scope="module")
def built():
    reasons = native.build(("cpu",))["cpu"]  # the one explicit build: loss calls never compile
    if reasons:
        pytest.skip("native extension unavailable: " + "; ".join(reasons))


def sinkhorn64(scores, iterations, epsilon, row_marginals=None, col_marginals=None, tolerance=0.0):
    """The reference iteration in float64: the independent float64 formula."""
    as64 = [None if t is None else t.double() for t in (scores, row_marginals, col_marginals)]
    return reference.sinkhorn(as64[0], iterations, epsilon, as64[1], as64[2], tolerance, False)


def cosine_scores(batch, prototypes, dtype=torch.float32):
    """SwAV's scores: cosines of unit vectors (the kernel path of the CPU op)."""
    z = torch.nn.functional.normalize(torch.randn(batch, 16), dim=1)
    w = torch.nn.functional.normalize(torch.randn(prototypes, 16), dim=1)
    return (z @ w.T).to(dtype)


SHAPES = [(1, 1), (7, 5), (37, 19), (129, 301), (3, 1000)]


# --- values ----------------------------------------------------------------------------------
def max_error(codes, exact):
    return (codes.double() - exact).abs().max().item()


def sinkhorn_bound(scores, iterations, epsilon, exact, row_marginals=None, col_marginals=None, dtype=torch.float32):
    """sinkhorn_rel_error on every code (relative, a log error), for the float64 ``exact``; codes
    below the normal range of ``dtype`` underflow or are flushed: ≤ its tiny absolute."""
    span = sinkhorn_log_span(scores, epsilon, row_marginals, col_marginals)
    relative = sinkhorn_rel_error(iterations, span, *scores.shape, unit_roundoff(dtype))
    return relative * exact.abs() + torch.finfo(dtype).tiny


@pytest.mark.parametrize("batch,prototypes", SHAPES, ids=lambda v: str(v))
@pytest.mark.parametrize("scores_kind", ["cosine", "wide"])  # kernel path / log-domain path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_sinkhorn_matches_reference_and_float64(built, batch, prototypes, scores_kind, dtype):
    """Against the float64 iteration within sinkhorn_rel_error (scores/ε of magnitude X carry a
    rounding of X·u in the log domain), codes and row sums."""
    scores = cosine_scores(batch, prototypes, dtype) if scores_kind == "cosine" else 4 * torch.randn(batch, prototypes, dtype=dtype)
    codes = fn.sinkhorn_knopp(scores, iterations=3, epsilon=0.05, backend="native")
    exact = sinkhorn64(scores, 3, 0.05)
    assert codes.dtype == dtype and codes.shape == scores.shape
    assert_within(codes, exact, sinkhorn_bound(scores, 3, 0.05, exact, dtype=dtype), "codes")
    # each row is divided by its K-term sum last, and summed again here
    assert_within(codes.sum(dim=1), torch.ones(batch, dtype=torch.float64),
                  (2 * prototypes + 4) * unit_roundoff(dtype), "row sums")


@pytest.mark.parametrize("iterations", [0, 1, 2, 7])
def test_sinkhorn_iterations_and_marginals(built, iterations):
    scores = cosine_scores(45, 23)
    row = torch.rand(23) + 0.1
    col = torch.rand(45) + 0.1
    codes = fn.sinkhorn_knopp(scores, iterations, 0.05, row_marginals=row, col_marginals=col, backend="native")
    exact = sinkhorn64(scores, iterations, 0.05, row, col)
    assert_within(codes, exact, sinkhorn_bound(scores, iterations, 0.05, exact, row, col), "codes")


def test_sinkhorn_tolerance_stops_where_the_reference_stops(built):
    scores = torch.randn(60, 17, dtype=torch.float64)
    for tolerance in (1e-1, 1e-3, 1e-8):
        codes = fn.sinkhorn_knopp(scores, 200, 0.5, tolerance=tolerance, backend="native")
        torch.testing.assert_close(codes, sinkhorn64(scores, 200, 0.5, tolerance=tolerance), atol=1e-12, rtol=1e-10)


def test_sinkhorn_hard_inputs(built):
    """Tiny ε, huge scores, and a prototype that no sample reaches (sums that underflow)."""
    scores = torch.randn(50, 20)
    unreachable = cosine_scores(31, 9)
    unreachable[:, 0] = -30.0
    for s, epsilon in ((scores, 1e-3), (scores * 1e4, 0.05), (unreachable, 0.05)):
        codes = fn.sinkhorn_knopp(s, 4, epsilon, backend="native")
        exact = sinkhorn64(s, 4, epsilon)
        assert torch.isfinite(codes).all()
        bound = sinkhorn_bound(s, 4, epsilon, exact)
        if sinkhorn_rel_error(4, sinkhorn_log_span(s, epsilon), *s.shape) < 1:
            assert_within(codes, exact, bound, f"codes at ε = {epsilon}")
        else:  # scores × 1e4 (L ≈ 1e6): the relative bound says nothing; the codes are one-hot up
            # to rounding, so the errors of native and reference, both float32, are compared
            # (the flash-attention rule), above the row sums' rounding (2K + 4)u
            reference_error = max_error(fn.sinkhorn_knopp(s, 4, epsilon, backend="reference"), exact)
            assert max_error(codes, exact) <= 2 * reference_error + (2 * s.shape[1] + 4) * U32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sinkhorn_half_precision_error_at_most_twice_the_references(built, dtype):
    scores = cosine_scores(67, 41, dtype)
    exact = sinkhorn64(scores, 3, 0.05)
    codes = fn.sinkhorn_knopp(scores, 3, 0.05, backend="native")
    assert codes.dtype == dtype
    reference_error = (fn.sinkhorn_knopp(scores, 3, 0.05, backend="reference").double() - exact).abs().max()
    assert (codes.double() - exact).abs().max() <= 2 * reference_error + 1e-6


def test_sinkhorn_has_no_gradient_and_auto_picks_native(built):
    scores = cosine_scores(8, 6).requires_grad_()
    assert not fn.sinkhorn_knopp(scores, backend="native").requires_grad
    assert backends.select("sinkhorn", "auto", [scores])[0] == "native"


# --- the op ----------------------------------------------------------------------------------
def _op_args(dtype):
    scores = cosine_scores(13, 7, dtype)
    return (scores, 3, 0.05, torch.full((7,), -torch.log(torch.tensor(7.0)).item(), dtype=dtype),
            torch.full((13,), -torch.log(torch.tensor(13.0)).item(), dtype=dtype), 0.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(built, dtype):
    torch.library.opcheck(torch.ops.fastssl.sinkhorn_native.default, _op_args(dtype))


def test_compile_fullgraph_equals_eager(built):
    scores = cosine_scores(21, 11)
    def codes(s):
        return fn.sinkhorn_knopp(s, 3, 0.05, backend="native")
    torch._dynamo.reset()
    # aot_eager: the op is opaque and the glue traces to the same ATen kernels in the same order,
    # so compiled and eager are bit-identical by construction. (Inductor would generate its own
    # code for the glue, with its own rounding; test_ops.py keeps the one Inductor test.)
    compiled = torch.compile(codes, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(scores), codes(scores), atol=0, rtol=0)


def test_op_rejects_mismatched_marginals(built):
    scores, iterations, epsilon, log_r, log_c, tolerance = _op_args(torch.float32)
    with pytest.raises(RuntimeError, match=r"log_row_marginals \(K,\) and log_col_marginals \(B,\) must match"):
        torch.ops.fastssl.sinkhorn_native(scores, iterations, epsilon, log_c, log_r, tolerance)
    with pytest.raises(RuntimeError, match="log marginals must be Float"):
        torch.ops.fastssl.sinkhorn_native(scores, iterations, epsilon, log_r.double(), log_c, tolerance)
    with pytest.raises(RuntimeError, match="iterations must be >= 1"):
        torch.ops.fastssl.sinkhorn_native(scores, 0, epsilon, log_r, log_c, tolerance)


def test_public_api_errors_name_the_argument_with_native(built):
    with pytest.raises(ValueError, match="col_marginals"):
        fn.sinkhorn_knopp(torch.randn(5, 3), col_marginals=torch.ones(4), backend="native")


@pytest.mark.requires_cuda
def test_sinkhorn_cuda_matches_reference(built):
    if not torch._C._dispatch_has_kernel_for_dispatch_key("fastssl::sinkhorn_native", "CUDA"):
        pytest.skip("the extension was built without CUDA (torch without CUDA, or no nvcc)")
    for batch, prototypes in SHAPES + [(1000, 3000)]:
        scores = 4 * torch.randn(batch, prototypes, device="cuda")
        for tolerance in (0.0, 1e-3):
            codes = fn.sinkhorn_knopp(scores, 5, 0.05, tolerance=tolerance, backend="native")
            expected = sinkhorn64(scores, 5, 0.05, tolerance=tolerance)
            assert_within(codes, expected, sinkhorn_bound(scores.cpu(), 5, 0.05, expected.cpu()), "codes")


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
    as in the torch backend's test of the same inputs (tests/test_clustering_kernels.py)."""
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


# --- build robustness ------------------------------------------------------------------------
def _python(code, env, timeout=120):
    environment = {**os.environ, "TRITON_INTERPRET": "0", **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=environment)


FALLBACK_PROBE = """
    import torch, fastssl
    from fastssl import backends, info
    scores = torch.randn(6, 4)
    print("auto ->", backends.select("sinkhorn", "auto", [scores])[0])
    print(fastssl.functional.sinkhorn_knopp(scores).sum().item())
    print(info.report())
"""


@pytest.mark.parametrize("env,reason", [
    ({"CXX": "/nonexistent/c++", "FASTSSL_NATIVE": "build"}, "no C++ compiler: '/nonexistent/c++' is not on PATH"),
    ({"CXX": "false", "FASTSSL_NATIVE": "build"}, "building the native extension failed"),
    ({"FASTSSL_NATIVE": "0"}, "disabled by FASTSSL_NATIVE=0"),
    ({}, "not built: run `python -m fastssl.build` once"),
], ids=["no-compiler", "failed-build", "opt-out", "not-built"])
def test_unusable_extension_falls_back_and_says_why(tmp_path, env, reason):
    out = _python(FALLBACK_PROBE, {"FASTSSL_NATIVE_CACHE": str(tmp_path), **env})
    assert out.returncode == 0, out.stderr
    assert "auto -> torch" in out.stdout
    assert f"native cpu         unavailable: {reason}" in out.stdout
    if "FASTSSL_NATIVE" not in env:  # nobody asked for a build: no compiler ran, nothing was written
        assert not any(tmp_path.iterdir())


def test_cache_directory_is_predictable(monkeypatch, tmp_path):
    monkeypatch.setenv("FASTSSL_NATIVE_CACHE", str(tmp_path))
    directory = native.build_directory("cpu")
    assert directory.parent == tmp_path
    assert directory.name.startswith(f"torch{torch.__version__}-cpu-")
    assert native.build_directory("cpu") == directory
    assert native.build_directory("cuda") != directory
    monkeypatch.delenv("FASTSSL_NATIVE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_root() == tmp_path / "xdg" / "fastssl" / "native"


def test_a_second_process_waits_for_the_build_lock(built):
    """While one process holds the build lock, another one's build blocks, then loads."""
    if native._prebuilt_library("cpu") is not None:
        pytest.skip("a prebuilt library is loaded without building")
    directory = native.build_directory("cpu")
    code = """
        import sys, time
        from fastssl.runtime import native
        print("ready", flush=True)
        start = time.perf_counter()
        print(list(native.build(("cpu",))["cpu"]), round(time.perf_counter() - start, 1), flush=True)
    """
    # Without its stamp the build is redone (a no-op for ninja, which finds everything up to date).
    (directory / native.BUILT_STAMP).unlink()
    with native.build_lock(directory):
        process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env={**os.environ, "TRITON_INTERPRET": "0"})
        assert process.stdout.readline().strip() == "ready"
        time.sleep(2.0)
        assert process.poll() is None, "the second process did not wait for the lock"
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    reasons, waited = stdout.split("] ")[0] + "]", float(stdout.split("] ")[1])
    assert reasons == "[]" and waited >= 1.5


# --- CUDA sources ----------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=lambda p: p.name)
def test_cuda_sources_compile_for_sm80_and_sm90_without_warnings(source, tmp_path):
    command = ["nvcc", "-c", str(source), "-o", str(tmp_path / "out.o"), "-std=c++17",
               "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
               "-Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_cuda_sources_include_no_torch_header():
    assert CUDA_SOURCES
    for path in CUDA_SOURCES + sorted(native.SOURCE_DIR.glob("*/*.cuh")):
        text = Path(path).read_text()
        for header in ("<ATen/", "<torch/", "<c10/"):
            assert header not in text, f"{path.name} includes {header}"


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
