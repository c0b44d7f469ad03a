"""The fused clustering & distillation backends: the torch backend's log-domain Sinkhorn (both
of its paths), soft-target cross-entropy of crop pairs with the last layer fused or not, and the
Triton kernels (under the interpreter on CPU), against float64 formulas of the definitions.

The oracles come from test_clustering (lightly's code transliterated to float64).
"""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl.functional as fn
from fastssl import BackendUnavailableError, backends, reference
from fastssl.clustering import torch_backend as clustering
from fastssl.distillation import torch_backend as distillation
from fastssl.runtime import blocks
from helpers import (FLOAT_DTYPES, U32, assert_within, gamma, half_error_within_twice_reference,
                     one_intra_op_thread_unless_asked, sinkhorn_log_span, sinkhorn_rel_error, soft_ce_pairs_bounds,
                     unit_roundoff)
from test_clustering import (
    lightly_dino64,
    lightly_sinkhorn64,
    lightly_swav64,
    log_domain_sinkhorn64,
    marginal_sinkhorn64,
    prototype_scores,
)

FUSED = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]


_one_intra_op_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread_unless_asked)


@pytest.fixture(params=[pytest.param(None, id="one-block"), pytest.param(37, id="ragged-blocks")])
def block_elements(request, monkeypatch):
    """The torch backend's blocking: whole tensors at once, or blocks of 37 elements (so every
    blocked loop runs several times and ends on a partial block)."""
    if request.param is not None:
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", request.param)
    return request.param


def pair_losses64(targets, logits, scale):
    """−(1/B) Σ_b Σ_k q_tbk · log softmax(σ x_sb)_k for every pair (t, s), float64."""
    log_p = F.log_softmax(scale * logits.double(), dim=-1)
    return -torch.einsum("tbk,sbk->ts", targets.double(), log_p) / logits.shape[1]


def pair_inputs(n_targets, n_students, batch, classes, dtype, sharp=1.0):
    targets = torch.softmax(torch.randn(n_targets, batch, classes, dtype=torch.float64) * sharp, -1)
    logits = torch.randn(n_students, batch, classes, dtype=torch.float64)
    return targets.to(dtype).requires_grad_(True), logits.to(dtype).requires_grad_(True)


def assert_codes_within(codes, expected, scores, iterations, epsilon, dtype):
    """Codes against float64 within sinkhorn_rel_error (relative per entry)."""
    bound = sinkhorn_rel_error(iterations, sinkhorn_log_span(scores, epsilon), *scores.shape, unit_roundoff(dtype))
    assert_within(codes, expected, bound * expected.abs(), "codes")


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


@pytest.mark.triton
def test_triton_refuses_bf16_under_the_interpreter():
    with pytest.raises(BackendUnavailableError, match="bfloat16"):
        fn.sinkhorn_knopp(prototype_scores(7, 13, dtype=torch.bfloat16), backend="triton")


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


class _LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def test_torch_pairs_never_hold_a_pairs_by_classes_tensor(monkeypatch):
    """Forward and backward make nothing larger than the inputs and gradients (S·B·K): no
    (T·S·B·K) product; with the last layer fused, nothing larger than the targets (T·B·K,
    T < S here) and nothing as large as the (S·B·K) logits."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 100)
    targets, logits = pair_inputs(3, 4, 6, 50, torch.float32)
    grad = torch.ones(3, 4)
    with _LargestTensor() as mode:
        _, lse = distillation.soft_cross_entropy_pairs_forward(targets.detach(), logits.detach(), 5.0)
        distillation.soft_cross_entropy_pairs_backward(grad, targets.detach(), logits.detach(), lse, 5.0, [True, True])
    assert mode.largest == logits.numel()  # the gradient of the logits itself

    features = torch.randn(4, 6, 8)
    weight = torch.randn(50, 8)
    with _LargestTensor() as mode:
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
