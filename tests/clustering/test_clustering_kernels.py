"""The fused clustering & distillation backends: the torch backend's log-domain Sinkhorn (both
of its paths), soft-target cross-entropy of crop pairs with the last layer fused or not, and the
Triton kernels (under the interpreter on CPU), against float64 formulas of the definitions.

The oracles come from tests/oracles.py (lightly's code transliterated to float64).
"""
import pytest
import torch
import torch.nn.functional as F

import fastssl.functional as fn
from fastssl import BackendUnavailableError, backends, reference
from fastssl.clustering import torch_backend as clustering

from helpers import (FLOAT_DTYPES, FUSED, U32, assert_within, one_intra_op_thread_unless_asked, sinkhorn_log_span,
                     sinkhorn_rel_error, unit_roundoff)
from oracles import lightly_sinkhorn64, lightly_swav64, log_domain_sinkhorn64, marginal_sinkhorn64, prototype_scores

_one_intra_op_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread_unless_asked)


def assert_codes_within(codes, expected, scores, iterations, epsilon, dtype):
    """Codes against float64 within sinkhorn_rel_error (relative per entry)."""
    bound = sinkhorn_rel_error(iterations, sinkhorn_log_span(scores, epsilon), *scores.shape, unit_roundoff(dtype))
    assert_within(codes, expected, bound * expected.abs(), "codes")


# ============================================================================================
# Sinkhorn-Knopp
# ============================================================================================
@pytest.mark.parametrize("scale,stabilised", [pytest.param(1.0, True, id="cosine-scores"),
                                              pytest.param(50.0, False, id="scores-x50")])
def test_torch_sinkhorn_chooses_the_kernel_path_only_when_safe(scale, stabilised):
    """The matrix-vector path needs every sample's range of s/ε within sqrt(tiny)'s exponent."""
    scores = prototype_scores(33, 100, scale=scale)
    passes = clustering.StabilisedKernelPasses.build(scores, 0.05)
    assert (passes is not None) == stabilised
    span = (scores.amax(1) - scores.amin(1)).max().item() / 0.05
    assert (span <= reference.max_exp_span(torch.float32)) == stabilised


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("iterations", [1, 2, 3, 10], ids=lambda n: f"it{n}")
@pytest.mark.parametrize("batch,num_prototypes", [(7, 13), (33, 100)], ids=["B7-K13", "B33-K100"])
def test_torch_sinkhorn_both_paths_equal_lightly(batch, num_prototypes, iterations, dtype, block_elements):
    scores = prototype_scores(batch, num_prototypes, dtype=dtype)
    expected = lightly_sinkhorn64(scores, iterations, 0.05)
    for passes in (clustering.StabilisedKernelPasses.build, clustering.LogDomainPasses):
        codes = clustering.sinkhorn_with(passes, scores, iterations, 0.05, None, None, 0.0, False)
        assert codes.dtype == dtype
        assert_codes_within(codes, expected, scores, iterations, 0.05, dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("iterations", [0, 1, 3], ids=lambda n: f"it{n}")
@pytest.mark.parametrize("batch,num_prototypes", [(7, 13), (33, 100)], ids=["B7-K13", "B33-K100"])
def test_sinkhorn_equals_lightly(batch, num_prototypes, iterations, dtype, backend):
    scores = prototype_scores(batch, num_prototypes, dtype=dtype)
    codes = fn.sinkhorn_knopp(scores, iterations, 0.05, backend=backend)
    assert codes.dtype == dtype and codes.shape == scores.shape
    assert_codes_within(codes, lightly_sinkhorn64(scores, iterations, 0.05), scores, iterations, 0.05, dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_sinkhorn_marginals_and_tolerance(backend, block_elements):
    scores = prototype_scores(9, 21, dtype=torch.float64)
    row_marginals = torch.rand(21, dtype=torch.float64) + 0.5
    col_marginals = torch.rand(9, dtype=torch.float64) + 0.5
    expected, ran = marginal_sinkhorn64(scores, 500, 0.3, row_marginals, col_marginals, tolerance=1e-8)
    assert 1 < ran < 500, "the oracle must stop early for this test to mean anything"
    codes = fn.sinkhorn_knopp(scores, 500, 0.3, row_marginals=row_marginals, col_marginals=col_marginals,
                              tolerance=1e-8, backend=backend)
    torch.testing.assert_close(codes, expected, rtol=1e-9, atol=1e-12)
    plan = codes * (col_marginals / col_marginals.sum())[:, None]
    torch.testing.assert_close(plan.sum(dim=0), row_marginals / row_marginals.sum(), rtol=2e-8, atol=0)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(9, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scale", [1.0, 50.0], ids=["cosine-scores", "scores-x50"])
def test_sinkhorn_fp16_scores_finite_and_near_float64(scale, backend):
    scores = prototype_scores(33, 100, dtype=torch.float16, scale=scale)
    assert torch.isinf(torch.exp(scores / 0.05)).any(), "lightly's linear domain overflows on these"
    codes = fn.sinkhorn_knopp(scores, 3, 0.05, backend=backend)
    assert codes.dtype == torch.float16 and torch.isfinite(codes).all()
    exact = log_domain_sinkhorn64(scores, 3, 0.05)
    # float32 arithmetic (sinkhorn_rel_error: log-domain values up to 50/0.05 = 1000), then
    # rounding to fp16 (eps relative) and fp16's subnormal spacing (6e-8 absolute).
    rtol = torch.finfo(torch.float16).eps + sinkhorn_rel_error(3, sinkhorn_log_span(scores, 0.05), 33, 100)
    torch.testing.assert_close(codes.double(), exact, rtol=rtol, atol=1e-6)


def test_torch_sinkhorn_bf16_scores_finite_and_near_float64():
    scores = prototype_scores(33, 100, dtype=torch.bfloat16)
    codes = fn.sinkhorn_knopp(scores, 3, 0.05, backend="torch")
    assert codes.dtype == torch.bfloat16 and torch.isfinite(codes).all()
    torch.testing.assert_close(codes.double(), lightly_sinkhorn64(scores, 3, 0.05),
                               rtol=torch.finfo(torch.bfloat16).eps, atol=1e-6)


@pytest.mark.triton
def test_triton_sinkhorn_opcheck():
    scores = prototype_scores(7, 11)
    op = torch.ops.fastssl.sinkhorn_triton.default
    backends.preload("triton")
    torch.library.opcheck(op, (scores, 3, 0.05, None, None, 0.0, False))
    torch.library.opcheck(op, (scores.double(), 20, 0.1, torch.rand(11, dtype=torch.float64) + 0.5, None, 1e-3,
                               False))


class _AtenOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the name of every aten op run while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


class _NoLaunch:
    """A kernel stand-in: takes the launch and does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triton_sinkhorn_launch_path_copies_nothing_to_the_device(dtype, monkeypatch):
    """Each pass allocates its output and launches: no host-to-device copy (torch.tensor / .to),
    no fill and no host read (.item), which would synchronise or break CUDA-graph capture. 1/ε
    travels as kernel arguments (float32 parts, summed in float64 by the kernel for float64)."""
    from fastssl.kernels import clustering as kernels

    for name in ("_sinkhorn_prototype_lse_kernel", "_sinkhorn_sample_kernel"):
        monkeypatch.setattr(kernels, name, _NoLaunch())
    scores = prototype_scores(9, 20, dtype=dtype)
    potential, log_c = torch.zeros(20, dtype=dtype), torch.zeros(9, dtype=dtype)
    with _AtenOps() as recorded:
        passes = kernels.TritonSinkhornPasses(scores, 0.05)
        passes.first_prototype_lse()
        passes.column_step_prototype_lse(potential, log_c)
        passes.codes(potential)
    assert set(recorded.names) == {"empty", "sub"}, recorded.names  # outputs, and log c − L on the device


def _sinkhorn_kernel_specs(capability):
    """Both Sinkhorn kernels as TritonSinkhornPasses launches them, in both compute dtypes, at
    the largest blocks it picks."""
    specs = []
    for fp64 in (False, True):
        pointer = "*fp64" if fp64 else "*fp32"
        for kernel, output, flag in (("_sinkhorn_prototype_lse_kernel", "lse_ptr", "HAS_POTENTIAL"),
                                     ("_sinkhorn_sample_kernel", "out_ptr", "WRITE_CODES")):
            constexprs = {flag: True, "FP64": fp64, "BLOCK_B": 32, "BLOCK_K": 128}
            signature = {"scores_ptr": pointer, "potential_ptr": pointer, output: pointer,
                         **{f"inv_epsilon_{part}": "fp32" for part in ("high", "middle", "low")},
                         **{name: "i32" for name in ("B", "K", "stride_b", "stride_k")},
                         **{name: "constexpr" for name in constexprs}}
            specs.append({"module": "kernels.clustering", "kernel": kernel, "signature": signature,
                          "constexprs": constexprs, "capability": capability})
    return specs


@pytest.mark.triton
def test_triton_sinkhorn_kernels_compile_for_sm90_and_sm80():
    """1/ε as float32 kernel arguments compiles (the interpreter accepts more than the compiler:
    a jit function returning float32 or float64 by a constexpr did not)."""
    from gpu_static import SHARED_MEMORY_LIMIT, compile_in_subprocess, ptxas_unavailable_reason

    if ptxas_unavailable_reason():
        pytest.skip(ptxas_unavailable_reason())
    specs = _sinkhorn_kernel_specs(90) + _sinkhorn_kernel_specs(80)
    for spec, compiled in zip(specs, compile_in_subprocess(specs)):
        assert compiled.shared_bytes <= SHARED_MEMORY_LIMIT[spec["capability"]], spec


@pytest.mark.triton
def test_triton_refuses_bf16_under_the_interpreter():
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        fn.sinkhorn_knopp(prototype_scores(7, 13, dtype=torch.bfloat16), backend="triton")


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("with_queue", [False, True], ids=["no-queue", "queue"])
def test_swav_with_fused_prototypes_equals_lightly(with_queue, backend):
    crops = [F.normalize(torch.randn(7, 9, dtype=torch.float64), dim=1).requires_grad_(True) for _ in range(5)]
    prototypes = F.normalize(torch.randn(23, 9, dtype=torch.float64), dim=1).requires_grad_(True)
    queue = [F.normalize(torch.randn(6, 9, dtype=torch.float64), dim=1) for _ in range(2)] if with_queue else None
    loss = fn.swav(crops[:2], crops[2:], queue, prototypes=prototypes, backend=backend)
    grads = torch.autograd.grad(loss, crops + [prototypes])
    scores = [c @ prototypes.T for c in crops]
    queue_scores = [q @ prototypes.T for q in queue] if with_queue else None
    expected = lightly_swav64(scores[:2], scores[2:], queue_scores)
    expected_grads = torch.autograd.grad(expected, crops + [prototypes])
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


FUSED_BAD = [
    pytest.param(lambda: fn.dino([torch.randn(5, 37)] * 2, [torch.randn(5, 9)] * 3, torch.zeros(37),
                                 last_layer_weight=torch.randn(37, 8)), ValueError,
                 r"last_layer_weight must be \(K, 9\).*\(37, 8\)", id="dino-weight-wrong-E"),
    pytest.param(lambda: fn.dino([torch.randn(5, 37)] * 2, [torch.randn(5, 9)] * 3, torch.zeros(37),
                                 last_layer_weight=torch.randn(36, 9)), ValueError,
                 r"last_layer_weight must have one row per output dim \(37\).*\(36, 9\)", id="dino-weight-wrong-D"),
    pytest.param(lambda: fn.dino([torch.randn(5, 37)] * 2, [torch.randn(5, 9)] * 3, torch.zeros(37),
                                 last_layer_weight=torch.randn(37)), ValueError, "last_layer_weight",
                 id="dino-weight-1d"),
    pytest.param(lambda: fn.dino([torch.randn(5, 37)] * 2, [torch.randn(4, 9)] * 3, torch.zeros(37),
                                 last_layer_weight=torch.randn(37, 9)), ValueError, r"\(2, 5, 37\).*\(3, 4, 9\)",
                 id="dino-fused-batch-mismatch"),
    pytest.param(lambda: fn.swav([torch.randn(5, 9)] * 2, prototypes=torch.randn(23, 8)), ValueError,
                 r"prototypes must be \(K, 9\).*\(23, 8\)", id="swav-prototypes-wrong-D"),
    pytest.param(lambda: fn.swav([torch.randn(5, 9)] * 2, prototypes=torch.ones(23, 9, dtype=torch.long)),
                 TypeError, "prototypes", id="swav-prototypes-int"),
]


@pytest.mark.parametrize("call,error,match", FUSED_BAD)
def test_fused_last_layer_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


COMPILED = [
    pytest.param("triton", lambda a, b, w, be: fn.swav([a, b], [0.5 * a], backend=be), id="swav-triton",
                 marks=pytest.mark.triton),
    pytest.param("triton", lambda a, b, w, be: fn.dino([a, b], [a, b, 0.5 * a], torch.zeros(13), backend=be),
                 id="dino-triton", marks=pytest.mark.triton),
    pytest.param("torch", lambda a, b, w, be: fn.dino([a @ w.T, b @ w.T], [a, b, 0.5 * a], torch.zeros(6),
                                                      last_layer_weight=w, backend=be), id="dino-fused-torch"),
    pytest.param("torch", lambda a, b, w, be: fn.swav([a, b], [0.5 * b], prototypes=w, backend=be),
                 id="swav-fused-torch"),
]


@pytest.mark.parametrize("backend,loss", COMPILED)
def test_compile_fullgraph_equals_eager(backend, loss):
    torch._dynamo.reset()
    a, b = torch.randn(9, 13, requires_grad=True), torch.randn(9, 13, requires_grad=True)
    w = torch.randn(6, 13, requires_grad=True)
    eager = loss(a, b, w, backend)
    eager_grads = torch.autograd.grad(eager, (a, b))
    compiled = torch.compile(lambda x, y, z: loss(x, y, z, backend), fullgraph=True, backend="aot_eager")(a, b, w)
    # bit for bit: aot_eager runs the traced graph on the eager kernels, in the same order
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip(torch.autograd.grad(compiled, (a, b)), eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ============================================================================================
# DeepCluster k-means
# ============================================================================================
def separated_points(n, k, dim, dtype):
    """Points near random centroids, so that the nearest centroid is unambiguous."""
    centroids = torch.randn(k, dim, dtype=torch.float64) * 3
    x = centroids[torch.randint(0, k, (n,))] + 0.3 * torch.randn(n, dim, dtype=torch.float64)
    return x.to(dtype), centroids.to(dtype)


def distance_error(x, centroids, u=U32):
    """Per row, |δ‖x − c‖²| for any c, formed as ‖x‖² − 2x·c + ‖c‖² (D-term sums, two adds):
    ≤ (D + 3)u·(‖x‖ + ‖c‖)², with max ‖c‖."""
    dim = x.shape[1]
    norms = x.double().norm(dim=1) + centroids.double().norm(dim=1).max()
    return (dim + 3) * u * norms ** 2


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n,k,dim", [(7, 3, 5), (33, 100, 17), (64, 1, 2)], ids=["N7-K3", "N33-K100", "N64-K1"])
def test_kmeans_assign_equals_float64_argmin(n, k, dim, dtype, backend, block_elements):
    x, centroids = separated_points(n, k, dim, dtype)
    assignments, distances = fn.kmeans_assign(x, centroids, backend=backend)
    exact = ((x.double()[:, None, :] - centroids.double()[None]) ** 2).sum(-1)
    assert assignments.dtype == torch.long and distances.dtype == dtype
    torch.testing.assert_close(assignments, exact.argmin(dim=1), rtol=0, atol=0)
    assert_within(distances, exact.min(dim=1).values, distance_error(x, centroids, unit_roundoff(dtype)), "distances")


def test_kmeans_assign_ties_and_every_row_nearest(block_elements):
    """Duplicated centroids: the lowest index wins; random data: no centroid is nearer than the
    chosen one by more than the rounding of ‖c‖² − 2x·c."""
    x, centroids = separated_points(40, 9, 6, torch.float32)
    doubled = torch.cat([centroids, centroids])
    assignments, _ = fn.kmeans_assign(x, doubled, backend="torch")
    assert (assignments < 9).all()
    x, centroids = torch.randn(50, 6), torch.randn(70, 6)
    assignments, distances = fn.kmeans_assign(x, centroids, backend="torch")
    exact = ((x.double()[:, None, :] - centroids.double()[None]) ** 2).sum(-1)
    bound = distance_error(x, centroids)
    assert_within(distances, exact.gather(1, assignments[:, None])[:, 0], bound, "distances")
    # the chosen centroid is the nearest but for two roundings of the expanded form
    assert (exact.gather(1, assignments[:, None])[:, 0] <= exact.min(dim=1).values + 2 * bound).all()


def test_kmeans_update_is_the_running_mean_of_assigned_rows():
    x, centroids = separated_points(23, 4, 3, torch.float64)
    counts = torch.tensor([0, 5, 1, 2])
    expected, expected_counts = centroids.clone(), counts.clone()
    assignments, _ = fn.kmeans_assign(x, centroids)
    for row, k in zip(x, assignments):  # Sculley's per-row update, one row at a time
        expected_counts[k] += 1
        expected[k] += (row - expected[k]) / expected_counts[k]
    new_centroids, new_counts = fn.kmeans_update(x, centroids, counts)
    torch.testing.assert_close(new_centroids, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_counts, expected_counts, rtol=0, atol=0)
    unreached = torch.ones(4, dtype=torch.bool)
    unreached[assignments] = False
    torch.testing.assert_close(new_centroids[unreached], centroids[unreached], rtol=0, atol=0)


def test_kmeans_update_half_points_and_float_counts():
    x, centroids = separated_points(19, 5, 4, torch.float16)
    new_centroids, new_counts = fn.kmeans_update(x, centroids, torch.zeros(5))
    assert new_centroids.dtype == torch.float16 and new_counts.dtype == torch.float32
    assignments, _ = fn.kmeans_assign(x.float(), centroids.float())
    for k in range(5):
        rows = x.float()[assignments == k]
        if len(rows):  # first visit with count 0: the mean of the rows assigned
            torch.testing.assert_close(new_centroids[k].float(), rows.mean(0), rtol=1e-3, atol=1e-3)


KMEANS_BAD = [
    pytest.param(lambda: fn.kmeans_assign(torch.randn(5, 3), torch.randn(4, 2)), ValueError,
                 r"centroids must be \(K, 3\).*\(5, 3\).*\(4, 2\)", id="dim-mismatch"),
    pytest.param(lambda: fn.kmeans_assign(torch.randn(5), torch.randn(4, 5)), ValueError, r"x.*\(5,\)", id="x-1d"),
    pytest.param(lambda: fn.kmeans_assign(torch.randn(5, 3), torch.ones(4, 3, dtype=torch.long)), TypeError,
                 "centroids", id="centroids-int"),
    pytest.param(lambda: fn.kmeans_update(torch.randn(5, 3), torch.randn(4, 3), torch.zeros(3)), ValueError,
                 r"counts must be a tensor of shape \(4,\), got \(3,\)", id="counts-short"),
    pytest.param(lambda: fn.kmeans_update(torch.randn(5, 3), torch.randn(4, 3), torch.zeros(4),
                                          torch.tensor([0, 1, 2, 3, 4])), ValueError,
                 r"assignments must lie in \[0, 4\)", id="assignment-out-of-range"),
    pytest.param(lambda: fn.kmeans_update(torch.randn(5, 3), torch.randn(4, 3), torch.zeros(4),
                                          torch.zeros(4, dtype=torch.long)), ValueError,
                 r"assignments must have shape \(5,\)", id="assignments-short"),
]


@pytest.mark.parametrize("call,error,match", KMEANS_BAD)
def test_kmeans_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scale", [1.0, 50.0], ids=["cosine-scores", "scores-x50"])
def test_sinkhorn_transposed_scores(scale, backend):
    """Scores laid out (K, B) and passed transposed: same codes, contiguous, opcheck clean."""
    scores = prototype_scores(13, 7, dtype=torch.float64, scale=scale).T
    codes = fn.sinkhorn_knopp(scores, 3, 0.05, backend=backend)
    assert codes.is_contiguous()
    torch.testing.assert_close(codes, log_domain_sinkhorn64(scores, 3, 0.05), rtol=1e-10, atol=1e-12)
    backends.preload("triton")
    op = torch.ops.fastssl.sinkhorn if backend == "torch" else torch.ops.fastssl.sinkhorn_triton
    for iterations in (0, 2):
        torch.library.opcheck(op.default, (scores, iterations, 0.05, None, None, 0.0, False))
