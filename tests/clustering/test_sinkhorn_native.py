"""The native Sinkhorn (``fastssl::sinkhorn_native``, csrc/clustering/) against the reference and float64."""

import pytest
import torch

import fastssl.functional as fn
from fastssl import backends, reference

from helpers import U32, assert_within, sinkhorn_bound, sinkhorn_log_span, sinkhorn_rel_error, unit_roundoff


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


@pytest.mark.parametrize("batch,prototypes", [(300, 1000), (4096, 40), (5, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("scores_kind", ["cosine", "wide", "unreachable"])  # kernel / log-domain / exact sums
def test_sinkhorn_is_bitwise_the_same_at_any_thread_count_and_run(built, batch, prototypes, scores_kind):
    """The rows are summed in fixed chunks (>= 2^16 scores, <= 64 of them) combined in chunk order,
    whichever thread ran which chunk: 300 x 1000 is 5 chunks, 4096 x 40 is 64 chunks of 64 rows
    (the cap), 5 x 3 one chunk (no parallel region). Under a static split per thread the sums,
    and so the codes' last bits, changed with the thread count; under dynamic claiming a sum
    per thread would change from run to run."""
    if scores_kind == "cosine":
        scores = cosine_scores(batch, prototypes)
    else:
        scores = 4 * torch.randn(batch, prototypes)
        if scores_kind == "unreachable":  # a prototype no sample reaches: the exact column sweeps
            scores[:, 0] = -1e3
    before = torch.get_num_threads()
    try:
        codes = []
        for threads in (1, 2, 2, 2, 3):
            torch.set_num_threads(threads)
            codes.append(fn.sinkhorn_knopp(scores, 4, 0.05, tolerance=1e-9, backend="native"))
    finally:
        torch.set_num_threads(before)
    for other in codes[1:]:
        torch.testing.assert_close(other, codes[0], atol=0, rtol=0)


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
