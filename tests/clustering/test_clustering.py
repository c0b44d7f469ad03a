"""Sinkhorn-Knopp, SwAV and DINO against independent float64 formulas of lightly 1.6.

The oracles below are written from DEFINITIONS.md (lightly's code), not from fastssl:
lightly's linear-domain Sinkhorn, a log-domain transliteration of it for scores whose
exponentials overflow, lightly's ``SwaVLoss`` loop and lightly's ``DINOLoss`` einsum.
"""
import math

import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import SwaVLoss

from helpers import (BACKENDS, BACKENDS_ON_CPU, FLOAT_DTYPES, HALF_DTYPES, U32, as_leaves64, assert_within, gamma,
                     one_intra_op_thread_unless_asked, sinkhorn_log_span, sinkhorn_rel_error, soft_ce_pairs_bounds,
                     unit_roundoff)
from oracles import (lightly_sinkhorn64, lightly_swav64, log_domain_sinkhorn64, marginal_check_per_iteration64,
                     marginal_sinkhorn64, prototype_scores)

_one_intra_op_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread_unless_asked)
RAGGED_SHAPES = [pytest.param(7, 13, id="B7-K13"), pytest.param(33, 100, id="B33-K100")]
EPSILONS = [pytest.param(0.05, id="eps0.05"), pytest.param(0.5, id="eps0.5")]


# ============================================================================================
# Sinkhorn-Knopp
# ============================================================================================
def test_log_domain_oracle_equals_linear_oracle():
    """The two float64 oracles agree where the linear domain is finite (checks the test itself)."""
    scores = prototype_scores(33, 100, dtype=torch.float64)
    for iterations in (0, 1, 3, 10):
        torch.testing.assert_close(log_domain_sinkhorn64(scores, iterations, 0.05),
                                   lightly_sinkhorn64(scores, iterations, 0.05), rtol=1e-10, atol=1e-14)


def assert_codes_within(codes, expected, scores, iterations, epsilon, dtype=torch.float32, **marginals):
    """Codes against the float64 oracle within sinkhorn_rel_error (relative per entry)."""
    span = sinkhorn_log_span(scores, epsilon, marginals.get("row_marginals"), marginals.get("col_marginals"))
    bound = sinkhorn_rel_error(iterations, span, *scores.shape, unit_roundoff(dtype))
    assert_within(codes, expected, bound * expected.abs(), "codes")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("epsilon", EPSILONS)
@pytest.mark.parametrize("iterations", [0, 1, 3, 10], ids=lambda n: f"it{n}")
@pytest.mark.parametrize("batch,num_prototypes", RAGGED_SHAPES)
def test_sinkhorn_knopp_equals_lightly_linear_domain(batch, num_prototypes, iterations, epsilon, dtype, backend):
    scores = prototype_scores(batch, num_prototypes, dtype=dtype)
    codes = fn.sinkhorn_knopp(scores, iterations, epsilon, backend=backend)
    expected = lightly_sinkhorn64(scores, iterations, epsilon)
    assert codes.dtype == dtype and codes.shape == (batch, num_prototypes)
    assert_codes_within(codes, expected, scores, iterations, epsilon, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epsilon", EPSILONS)
@pytest.mark.parametrize("iterations", [1, 3, 10], ids=lambda n: f"it{n}")
@pytest.mark.parametrize("batch,num_prototypes", RAGGED_SHAPES)
def test_sinkhorn_knopp_rows_sum_to_one(batch, num_prototypes, iterations, epsilon, backend):
    codes = fn.sinkhorn_knopp(prototype_scores(batch, num_prototypes), iterations, epsilon, backend=backend)
    assert (codes >= 0).all()
    # the last step divides each row by its K-term sum, and the check sums K terms again
    assert_within(codes.sum(dim=1), torch.ones(batch), (2 * num_prototypes + 4) * U32, "row sums")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epsilon", EPSILONS)
@pytest.mark.parametrize("batch,num_prototypes", RAGGED_SHAPES)
def test_sinkhorn_knopp_prototype_totals_approach_uniform(batch, num_prototypes, epsilon, backend):
    scores = prototype_scores(batch, num_prototypes)

    def l1_error(iterations):
        totals = fn.sinkhorn_knopp(scores, iterations, epsilon, backend=backend).double().sum(dim=0)
        return (totals * num_prototypes / batch - 1).abs().sum().item()

    errors = [l1_error(n) for n in (1, 3, 10)]
    assert errors[0] > errors[1] > errors[2], errors  # each ≥ 1.46× the next: far above rounding
    # Convergence is a property of the math: checked on float64 scores, where the totals of the
    # converged plan carry one iteration's rounding, K totals of sinkhorn_rel_error(1) each.
    scores = scores.double()
    floor = num_prototypes * sinkhorn_rel_error(1, sinkhorn_log_span(scores, epsilon), batch, num_prototypes,
                                                unit_roundoff(torch.float64))
    assert l1_error(1000) < floor


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_col", [False, True], ids=["rows-only", "rows-and-cols"])
@pytest.mark.parametrize("batch,num_prototypes", RAGGED_SHAPES)
def test_sinkhorn_knopp_custom_marginals(batch, num_prototypes, with_col, backend):
    scores = prototype_scores(batch, num_prototypes, dtype=torch.float64)
    row_marginals = torch.rand(num_prototypes, dtype=torch.float64) + 0.5  # not normalised on purpose
    col_marginals = torch.rand(batch, dtype=torch.float64) + 0.5 if with_col else None
    codes = fn.sinkhorn_knopp(scores, 2000, 0.5, row_marginals=row_marginals, col_marginals=col_marginals,
                              tolerance=1e-9, backend=backend)
    r = row_marginals / row_marginals.sum()
    c = torch.full((batch,), 1.0 / batch, dtype=torch.float64) if col_marginals is None else (
        col_marginals / col_marginals.sum())
    plan = codes * c[:, None]
    # Stopped once every prototype total is within 1e-9 (relative) of its marginal.
    torch.testing.assert_close(plan.sum(dim=0), r, rtol=2e-9, atol=0)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(batch, dtype=torch.float64), rtol=0, atol=1e-12)
    expected, _ = marginal_sinkhorn64(scores, 2000, 0.5, row_marginals, col_marginals, tolerance=1e-9)
    torch.testing.assert_close(codes, expected, rtol=1e-7, atol=1e-12)
    if not with_col:
        # Uniform samples: the prototype totals of the codes are B · r.
        torch.testing.assert_close(codes.sum(dim=0) / batch, r, rtol=2e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_knopp_tolerance_stops_early_float64(backend):
    scores = prototype_scores(33, 100, dtype=torch.float64)
    expected, ran = marginal_sinkhorn64(scores, 1000, 0.1, tolerance=1e-6)
    assert 1 < ran < 1000, "the oracle must stop early for this test to mean anything"
    codes = fn.sinkhorn_knopp(scores, 1000, 0.1, tolerance=1e-6, backend=backend)
    torch.testing.assert_close(codes, expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(codes, fn.sinkhorn_knopp(scores, ran, 0.1, backend=backend), rtol=1e-12, atol=1e-15)
    # Stopped early: measurably different from ``ran + 1`` iterations and from the converged plan.
    assert not torch.allclose(codes, fn.sinkhorn_knopp(scores, ran + 1, 0.1, backend=backend), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_knopp_tolerance_float32_near_converged(backend):
    scores = prototype_scores(33, 100)
    converged, _ = marginal_sinkhorn64(scores, 20000, 0.1)
    # A tolerance near 1e-5 that every CPU stops at after the same iteration (see
    # tolerance_between_iterations): the float32 statistic's own noise is ~1e-6.
    tolerance, stop = tolerance_between_iterations(scores, 0.1, None, below=1e-5)
    expected, ran = marginal_sinkhorn64(scores, 1000, 0.1, tolerance=tolerance)
    assert ran == stop
    codes = fn.sinkhorn_knopp(scores, 1000, 0.1, tolerance=tolerance, backend=backend)
    assert codes.dtype == torch.float32
    assert_codes_within(codes, expected, scores, ran, 0.1)
    # and near the converged plan: within the tolerance's distance of it, at most 1e-4 relative here
    torch.testing.assert_close(expected, converged, rtol=1e-4, atol=0)


@pytest.mark.parametrize("epsilon", EPSILONS)
@pytest.mark.parametrize("iterations", [1, 3, 10], ids=lambda n: f"it{n}")
def test_sinkhorn_alias_equals_sinkhorn_knopp(iterations, epsilon):
    scores = prototype_scores(33, 100)
    torch.testing.assert_close(fn.sinkhorn(scores, iterations, epsilon),
                               fn.sinkhorn_knopp(scores, iterations, epsilon), rtol=0, atol=0)
    assert fastssl.sinkhorn is fn.sinkhorn
    torch.testing.assert_close(fn.sinkhorn(probabilities=scores), fn.sinkhorn_knopp(scores, 3, 0.05),
                               rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["fp16", "bf16", "fp32", "fp64"])
def test_sinkhorn_knopp_keeps_dtype_and_blocks_gradient(dtype, backend):
    scores = prototype_scores(7, 13, dtype=dtype).requires_grad_(True)
    codes = fn.sinkhorn_knopp(scores, 3, 0.05, backend=backend)
    assert codes.dtype == dtype
    assert not codes.requires_grad and codes.grad_fn is None


def tolerance_between_iterations(scores, epsilon, row_marginals, below, iterations=200):
    """(tolerance, iteration it stops after): halfway (geometrically) between the stopping
    statistics of the first iteration below ``below`` and the one before, where one iteration's
    change (≈ ×2) dwarfs the statistic's fp32 error (≤ L·u + B·u), so every backend on every CPU
    stops after the same iteration as the float64 oracle."""
    checks = marginal_check_per_iteration64(scores, iterations, epsilon, row_marginals)
    stop = next(n for n, value in enumerate(checks, start=1) if value < below)
    tolerance = math.sqrt(checks[stop - 2] * checks[stop - 1])
    margin = min(checks[stop - 2] - tolerance, tolerance - checks[stop - 1])
    log_span = sinkhorn_log_span(scores, epsilon, row_marginals)
    assert margin > 10 * (log_span + scores.shape[0]) * U32 * tolerance
    return tolerance, stop


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_knopp_float32_with_marginals_and_tolerance_matches_float64(backend):
    scores = prototype_scores(33, 100)
    r = torch.rand(100) + 0.5
    epsilon = 0.1
    tolerance, stop = tolerance_between_iterations(scores, epsilon, r, below=1e-4, iterations=50)
    expected, ran = marginal_sinkhorn64(scores, 50, epsilon, r, tolerance=tolerance)
    assert ran == stop < 50
    codes = fn.sinkhorn_knopp(scores, 50, epsilon, row_marginals=r, tolerance=tolerance, backend=backend)
    assert_codes_within(codes, expected, scores, ran, epsilon, row_marginals=r)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("iterations", [1, 3, 10], ids=lambda n: f"it{n}")
def test_sinkhorn_knopp_half_scores_close_to_fp32(iterations, dtype, backend):
    scores = prototype_scores(33, 100, dtype=dtype)
    # Linear-domain lightly in this dtype overflows: e^(1/0.05) > 65504 (fp16).
    if dtype == torch.float16:
        assert torch.isinf(torch.exp(torch.ones((), dtype=dtype) / 0.05))
    codes = fn.sinkhorn_knopp(scores, iterations, 0.05, backend=backend)
    assert codes.dtype == dtype and torch.isfinite(codes).all()
    exact = lightly_sinkhorn64(scores, iterations, 0.05)  # on the same (rounded) scores
    # Arithmetic runs in float32 (≈1e-6 relative here); the only larger error is rounding the
    # codes to the half dtype: ≤ eps/2 relative (eps = 2⁻¹⁰ fp16, 2⁻⁷ bf16), plus fp16
    # subnormal flushing below 6e-8. Both are inside rtol = eps, atol = 1e-6; the brief's 1e-2
    # absolute bound follows.
    torch.testing.assert_close(codes.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6)
    assert (codes.double() - exact).abs().max().item() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), *HALF_DTYPES])
@pytest.mark.parametrize("iterations", [1, 3, 10], ids=lambda n: f"it{n}")
def test_sinkhorn_knopp_unnormalised_scores_stay_finite(iterations, dtype, backend):
    scores = prototype_scores(33, 100, dtype=dtype, scale=50.0)
    # |scores/ε| reaches 1000: the linear domain overflows in float32 and even float64 (e^709).
    assert torch.isinf(torch.exp(scores.float() / 0.05)).any()
    assert torch.isinf(torch.exp(scores.double() / 0.05)).any()
    codes = fn.sinkhorn_knopp(scores, iterations, 0.05, backend=backend)
    assert codes.dtype == dtype and torch.isfinite(codes).all()
    exact = log_domain_sinkhorn64(scores, iterations, 0.05)
    torch.testing.assert_close(codes.double().sum(dim=1), torch.ones(33, dtype=torch.float64),
                               rtol=0, atol=100 * torch.finfo(dtype).eps)
    # float32 log-domain values up to L ≈ 1008: sinkhorn_rel_error; half outputs add their
    # rounding (eps/2 relative) and fp16's subnormal spacing (6e-8 absolute).
    # Codes below the normal range: fp16 rounds them to its subnormal spacing 2⁻²⁴ (half of it
    # off), float32 and bfloat16 may flush them (≤ their tiny).
    rtol = sinkhorn_rel_error(iterations, sinkhorn_log_span(scores, 0.05), 33, 100) + torch.finfo(dtype).eps
    atol = 2.0 ** -25 if dtype == torch.float16 else torch.finfo(torch.float32).tiny
    torch.testing.assert_close(codes.double(), exact, rtol=rtol, atol=atol)


# ============================================================================================
# SwAV
# ============================================================================================
SWAV_CASES = [
    pytest.param(0, False, id="2hi-0lo"),
    pytest.param(1, False, id="2hi-1lo"),
    pytest.param(4, False, id="2hi-4lo"),
    pytest.param(0, True, id="2hi-0lo-queue"),
    pytest.param(1, True, id="2hi-1lo-queue"),
    pytest.param(4, True, id="2hi-4lo-queue"),
]


def swav_inputs(n_low, with_queue, batch, num_prototypes, dtype=torch.float32, queue_len=19, n_high=2):
    high = [prototype_scores(batch, num_prototypes, dtype=dtype).requires_grad_(True) for _ in range(n_high)]
    low = [prototype_scores(batch, num_prototypes, dtype=dtype).requires_grad_(True) for _ in range(n_low)]
    queue = [prototype_scores(queue_len, num_prototypes, dtype=dtype) for _ in range(n_high)] if with_queue else None
    return high, low, queue


def swav_bounds(high, low, queue, temperature=0.1, iterations=3, epsilon=0.05, dtype=torch.float32):
    """Bounds on |δloss| and on each crop's |δgradient| of SwAV computed in ``dtype``: soft-target
    cross-entropies (soft_ce_pairs_bounds) of the high-resolution crops' codes, which carry
    sinkhorn_rel_error, against every other crop, and the H·(V − 1)-term mean of them."""
    u = unit_roundoff(dtype)
    crops = [c.detach().double() for c in list(high) + list(low)]
    batch = crops[0].shape[0]
    codes, code_error = [], 0.0
    for i, h in enumerate(crops[:len(high)]):
        outputs = h if queue is None else torch.cat([h, queue[i].double()])
        codes.append(lightly_sinkhorn64(outputs, iterations, epsilon)[:batch])
        span = sinkhorn_log_span(outputs, epsilon)
        code_error = max(code_error, sinkhorn_rel_error(iterations, span, *outputs.shape, u))
    n_high, n_crops = len(high), len(crops)
    weights = torch.full((n_high, n_crops), 1.0 / (n_high * (n_crops - 1)), dtype=torch.float64)
    weights[torch.arange(n_high), torch.arange(n_high)] = 0
    loss, _, grads = soft_ce_pairs_bounds(torch.stack(codes), torch.stack(crops), 1 / temperature, weights,
                                          target_error=code_error, dtype=dtype)
    mean_loss = (weights * loss).sum().item()
    exact = lightly_swav64(crops[:n_high], crops[n_high:], queue, temperature, iterations, epsilon).item()
    return mean_loss + gamma(n_high * n_crops, u) * abs(exact), list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("batch,num_prototypes", RAGGED_SHAPES)
@pytest.mark.parametrize("n_low,with_queue", SWAV_CASES)
def test_swav_loss_and_gradients_equal_lightly(n_low, with_queue, batch, num_prototypes, dtype, backend):
    high, low, queue = swav_inputs(n_low, with_queue, batch, num_prototypes, dtype)
    criterion = SwaVLoss(temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05, backend=backend)
    loss = criterion(high, low, queue)
    assert loss.dtype == dtype and loss.dim() == 0
    loss.backward()

    high64, low64 = as_leaves64(high), as_leaves64(low)
    expected = lightly_swav64(high64, low64, queue, temperature=0.1, iterations=3, epsilon=0.05)
    expected.backward()
    loss_bound, grad_bounds = swav_bounds(high, low, queue, dtype=dtype)
    assert_within(loss, expected, loss_bound, "loss")
    for name, x, x64, bound in zip([f"hi{i}" for i in range(len(high))] + [f"lo{i}" for i in range(len(low))],
                                   high + low, high64 + low64, grad_bounds):
        assert x.grad is not None and x.grad.dtype == dtype, name
        assert_within(x.grad, x64.grad, bound, f"gradient of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_swav_non_default_hyperparameters(backend):
    high, low, queue = swav_inputs(3, True, 11, 29, torch.float64, queue_len=8, n_high=3)
    loss = fn.swav(high, low, queue, temperature=0.25, sinkhorn_iterations=7, sinkhorn_epsilon=0.2,
                   backend=backend)
    expected = lightly_swav64(high, low, queue, temperature=0.25, iterations=7, epsilon=0.2)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n_low,with_queue", SWAV_CASES)
def test_swav_module_equals_functional(n_low, with_queue, backend):
    high, low, queue = swav_inputs(n_low, with_queue, 7, 13)
    module = SwaVLoss(temperature=0.2, sinkhorn_iterations=5, sinkhorn_epsilon=0.1, backend=backend)(high, low, queue)
    functional = fn.swav(high, low, queue, temperature=0.2, sinkhorn_iterations=5, sinkhorn_epsilon=0.1,
                         backend=backend)
    torch.testing.assert_close(module, functional, rtol=0, atol=0)


@pytest.mark.parametrize("n_low,with_queue", SWAV_CASES)
def test_swav_backends_agree(n_low, with_queue):
    """Every CPU backend against lightly in float64 within swav_bounds (two float32 backends
    round differently: never compared with each other)."""
    torch.manual_seed(1)
    high, low, queue = swav_inputs(n_low, with_queue, 33, 100)
    high64, low64 = as_leaves64(high), as_leaves64(low)
    expected = lightly_swav64(high64, low64, queue)
    exact_grads = torch.autograd.grad(expected, high64 + low64)
    loss_bound, grad_bounds = swav_bounds(high, low, queue)
    for backend in BACKENDS_ON_CPU:
        loss = fn.swav(high, low, queue, backend=backend)
        assert_within(loss, expected, loss_bound, f"{backend} loss")
        for got, want, bound in zip(torch.autograd.grad(loss, high + low), exact_grads, grad_bounds):
            assert_within(got, want, bound, f"{backend} gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_queue", [False, True], ids=["no-queue", "queue"])
def test_swav_gradcheck_float64(with_queue, backend):
    """Codes carry no gradient, so the high-res crops (which set the codes) are held fixed and the
    loss is checked as a function of the low-res crops; the high-res crops' gradients are checked
    against float64 autograd in ``test_swav_loss_and_gradients_equal_lightly``."""
    high, low, queue = swav_inputs(2, with_queue, 3, 5, torch.float64, queue_len=4)
    high = [h.detach() for h in high]

    def loss_of_low_crops(*low_crops):
        return fn.swav(high, list(low_crops), queue, temperature=0.5, backend=backend)

    assert torch.autograd.gradcheck(loss_of_low_crops, low)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_swav_half_inputs_finite_and_close(dtype):
    high, low, queue = swav_inputs(4, True, 33, 100, dtype)
    loss = fn.swav(high, low, queue)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    exact = lightly_swav64([h.double() for h in high], [x.double() for x in low], queue)
    # The codes come back in the half dtype (≤ eps/2 relative rounding each); the loss is a
    # q-weighted sum of cross-entropies, so its relative error is at most about eps.
    torch.testing.assert_close(loss.double(), exact, rtol=torch.finfo(dtype).eps, atol=1e-6)


# ============================================================================================
# Bad inputs
# ============================================================================================
SINKHORN_BAD = [
    pytest.param(dict(scores=torch.rand(7)), ValueError, r"scores.*\(7,\)", id="scores-1d"),
    pytest.param(dict(scores=torch.rand(2, 7, 13)), ValueError, r"scores.*\(2, 7, 13\)", id="scores-3d"),
    pytest.param(dict(scores=torch.ones(7, 13, dtype=torch.long)), TypeError, "scores", id="scores-int"),
    pytest.param(dict(epsilon=0.0), ValueError, "epsilon", id="epsilon-zero"),
    pytest.param(dict(epsilon=-0.05), ValueError, "epsilon", id="epsilon-negative"),
    pytest.param(dict(iterations=-1), ValueError, "iterations", id="iterations-negative"),
    pytest.param(dict(iterations=2.5), TypeError, "iterations", id="iterations-float"),
    pytest.param(dict(iterations=3.0), TypeError, "iterations", id="iterations-integral-float"),
    pytest.param(dict(row_marginals=torch.ones(12)), ValueError, r"row_marginals.*\(12,\)", id="row-marginals-short"),
    pytest.param(dict(col_marginals=torch.ones(8)), ValueError, r"col_marginals.*\(8,\)", id="col-marginals-long"),
    pytest.param(dict(row_marginals=torch.ones(1, 13)), ValueError, "row_marginals", id="row-marginals-2d"),
    pytest.param(dict(row_marginals=torch.cat([torch.zeros(1), torch.ones(12)])), ValueError, "row_marginals",
                 id="row-marginals-zero"),
    pytest.param(dict(col_marginals=-torch.ones(7)), ValueError, "col_marginals", id="col-marginals-negative"),
    pytest.param(dict(tolerance=-1e-6), ValueError, "tolerance", id="tolerance-negative"),
]


@pytest.mark.parametrize("overrides,error,match", SINKHORN_BAD)
def test_sinkhorn_knopp_bad_inputs(overrides, error, match):
    args = dict(scores=torch.rand(7, 13), iterations=3, epsilon=0.05)
    args.update(overrides)
    with pytest.raises(error, match=match):
        fn.sinkhorn_knopp(**args)


def _crop(batch=7, k=13):
    return torch.rand(batch, k)


SWAV_BAD = [
    pytest.param(lambda: fn.swav([_crop()], []), ValueError, r"two crops.*got 1", id="one-crop"),
    pytest.param(lambda: fn.swav([], [_crop(), _crop()]), ValueError, "high_resolution_outputs", id="no-high-res"),
    pytest.param(lambda: fn.swav([_crop(), _crop()], [_crop(7, 14)]), ValueError,
                 r"high_resolution_outputs\[0\].*low_resolution_outputs\[0\] \(7, 14\)", id="low-res-other-K"),
    pytest.param(lambda: fn.swav([_crop(), _crop(8, 13)]), ValueError,
                 r"high_resolution_outputs\[0\] \(7, 13\).*high_resolution_outputs\[1\] \(8, 13\)",
                 id="high-res-other-B"),
    pytest.param(lambda: fn.swav([_crop(), _crop()], [], [_crop(5)]), ValueError, "queue_outputs",
                 id="queue-too-short"),
    pytest.param(lambda: fn.swav([_crop(), _crop()], [], [_crop(5)] * 3), ValueError, "queue_outputs",
                 id="queue-too-long"),
    pytest.param(lambda: fn.swav([_crop(), _crop()], [], [_crop(5), _crop(5, 12)]), ValueError,
                 r"queue_outputs\[1\].*\(5, 12\)", id="queue-wrong-K"),
    pytest.param(lambda: fn.swav([_crop(), _crop()], temperature=0.0), ValueError, "temperature",
                 id="temperature-zero"),
    pytest.param(lambda: fn.swav([_crop(), _crop()], sinkhorn_epsilon=-1.0), ValueError, "epsilon",
                 id="epsilon-negative"),
    pytest.param(lambda: SwaVLoss(temperature=-0.1), ValueError, "temperature", id="module-temperature"),
    pytest.param(lambda: SwaVLoss(sinkhorn_epsilon=0.0), ValueError, "sinkhorn_epsilon", id="module-epsilon"),
    pytest.param(lambda: SwaVLoss(sinkhorn_iterations=-1), ValueError, "sinkhorn_iterations",
                 id="module-iterations"),
    pytest.param(lambda: SwaVLoss()(_crop(), [_crop()]), TypeError, "high_resolution_outputs",
                 id="tensor-not-list"),
]


@pytest.mark.parametrize("call,error,match", SWAV_BAD)
def test_swav_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


