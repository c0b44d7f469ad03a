"""Sinkhorn-Knopp, SwAV and DINO against independent float64 formulas of lightly 1.6.

The oracles below are written from DEFINITIONS.md (lightly's code), not from fastssl:
lightly's linear-domain Sinkhorn, a log-domain transliteration of it for scores whose
exponentials overflow, lightly's ``SwaVLoss`` loop and lightly's ``DINOLoss`` einsum.
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.functional as fn
from fastssl import DINOLoss, SwaVLoss

from helpers import (BACKENDS_ON_CPU, FLOAT_DTYPES, HALF_DTYPES, U32, assert_within, gamma,
                     half_error_within_twice_reference, one_intra_op_thread_unless_asked, sinkhorn_log_span,
                     sinkhorn_rel_error, soft_ce_pairs_bounds, unit_roundoff)

BACKENDS = [pytest.param(b, id=b) for b in BACKENDS_ON_CPU]
_one_intra_op_thread = pytest.fixture(autouse=True, scope="module")(one_intra_op_thread_unless_asked)
RAGGED_SHAPES = [pytest.param(7, 13, id="B7-K13"), pytest.param(33, 100, id="B33-K100")]
EPSILONS = [pytest.param(0.05, id="eps0.05"), pytest.param(0.5, id="eps0.5")]


def prototype_scores(*shape, dtype=torch.float32, scale=1.0):
    """Scores of normalised embeddings against normalised prototypes: uniform in [-1, 1]."""
    return ((torch.rand(*shape, dtype=torch.float64) * 2 - 1) * scale).to(dtype)


# ============================================================================================
# float64 oracles
# ============================================================================================
def lightly_sinkhorn64(scores, iterations, epsilon):
    """lightly's ``sinkhorn`` verbatim (linear domain), in float64."""
    q = torch.exp(scores.double() / epsilon).t()
    q = q / q.sum()
    batch = q.shape[1]
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=0, keepdim=True)
        q = q / batch
    q = q * batch
    return q.t()


def log_domain_sinkhorn64(scores, iterations, epsilon):
    """lightly's algorithm with every division written as a subtraction of logs (float64)."""
    log_q = scores.double().t() / epsilon
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)
    batch = log_q.shape[1]
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(batch)
    return torch.exp(log_q + math.log(batch)).t()


def marginal_sinkhorn64(scores, iterations, epsilon, row_marginals=None, col_marginals=None, tolerance=0.0):
    """SeLA-style Sinkhorn on the (K, B) plan, linear domain, float64.

    Prototype totals are scaled to r (normalised), sample totals to c (normalised); stop after
    the first iteration whose prototype totals are all within ``tolerance`` (relative) of r.
    Returns (codes = plan / c, transposed to (B, K), iterations run).
    """
    q = torch.exp(scores.double() / epsilon).t()
    q = q / q.sum()
    k, b = q.shape
    r = torch.full((k,), 1.0 / k, dtype=torch.float64) if row_marginals is None else row_marginals.double()
    c = torch.full((b,), 1.0 / b, dtype=torch.float64) if col_marginals is None else col_marginals.double()
    r, c = r / r.sum(), c / c.sum()
    done = 0
    for _ in range(iterations):
        q = q * (r / q.sum(dim=1))[:, None]
        q = q * (c / q.sum(dim=0))[None, :]
        done += 1
        if tolerance > 0 and (q.sum(dim=1) / r - 1).abs().max().item() < tolerance:
            break
    return (q / c[None, :]).t(), done


def lightly_swav64(high, low, queue, temperature=0.1, iterations=3, epsilon=0.05):
    """lightly's ``SwaVLoss.forward`` in float64 on the given (float64) crops."""
    n_crops = len(high) + len(low)
    crops = list(high) + list(low)
    batch = high[0].shape[0]
    loss = 0.0
    for i in range(len(high)):
        with torch.no_grad():
            outputs = high[i].detach().double()
            if queue is not None:
                outputs = torch.cat((outputs, queue[i].detach().double()))
            q = lightly_sinkhorn64(outputs, iterations, epsilon)[:batch]
        subloss = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(crops[v] / temperature, dim=1), dim=1))
        loss = loss + subloss / (n_crops - 1)
    return loss / len(high)


def lightly_dino64(teacher, student, center, teacher_temp, student_temp, dtype=torch.float64):
    """lightly's ``DINOLoss.forward`` (before the center update), computed in ``dtype``."""
    t = torch.stack([x.to(dtype) for x in teacher])
    s = torch.stack([x.to(dtype) for x in student])
    t_out = F.softmax((t - center.to(dtype).reshape(1, 1, -1)) / teacher_temp, dim=-1)
    s_out = F.log_softmax(s / student_temp, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t_out, s_out)
    loss = loss * (1 - torch.eye(*loss.shape, dtype=dtype))  # fill_diagonal_(0)
    n_terms = loss.numel() - min(loss.shape)
    return loss.sum() / (n_terms * t.shape[1])


def lightly_teacher_temp(warmup_teacher_temp, teacher_temp, warmup_epochs, epoch):
    """lightly's schedule: a float32 ``torch.linspace`` indexed by epoch, ``teacher_temp`` after.

    lightly divides by that float32 0-dim tensor, so float64 inputs see the float32-rounded value.
    """
    if epoch is not None and epoch < warmup_epochs:
        step = (teacher_temp - warmup_teacher_temp) / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0
        return float(torch.tensor(warmup_teacher_temp + step * epoch, dtype=torch.float32))
    return teacher_temp


def lightly_center64(teacher, center, momentum):
    batch_center = torch.stack([x.double() for x in teacher]).mean(dim=(0, 1))
    return center.double() * momentum + batch_center.reshape(center.shape) * (1 - momentum)


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


def marginal_check_per_iteration64(scores, iterations, epsilon, row_marginals):
    """The stopping statistic max_k |total_k / r_k − 1| after each iteration (float64 oracle)."""
    if row_marginals is None:
        row_marginals = torch.ones(scores.shape[1], dtype=torch.float64)
    return [(marginal_sinkhorn64(scores, n, epsilon, row_marginals)[0].sum(dim=0)
             / (row_marginals.double() / row_marginals.sum()) / scores.shape[0] - 1).abs().max().item()
            for n in range(1, iterations + 1)]


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


def as_leaves64(tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


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


def dino_bounds(teacher, student, center, teacher_temp, student_temp, dtype=torch.float32):
    """Bounds on |δloss| and on each student crop's |δgradient| of DINO computed in ``dtype``: the
    teacher softmax of z = (t − c)/τ_t carries (5·max|z| + K + ln K + 6)u relative (t − c and the
    division each u|z|, its logsumexp, the exp), then soft_ce_pairs_bounds over the pairs t ≠ s and
    the mean of them."""
    u = unit_roundoff(dtype)
    t = torch.stack([x.detach().double() for x in teacher])
    s = torch.stack([x.detach().double() for x in student])
    z = (t - center.double().reshape(1, 1, -1)) / teacher_temp
    classes = z.shape[-1]
    target_error = (5 * z.abs().max().item() + classes + math.log(classes) + 6) * u
    weights = 1 - torch.eye(t.shape[0], s.shape[0], dtype=torch.float64)
    weights /= weights.sum()
    loss, _, grads = soft_ce_pairs_bounds(torch.softmax(z, dim=-1), s, 1 / student_temp, weights,
                                          target_error=target_error, dtype=dtype)
    exact = lightly_dino64(teacher, student, center, teacher_temp, student_temp).item()
    return (weights * loss).sum().item() + gamma(weights.numel(), u) * abs(exact), list(grads)


def dino_teacher_grad_atol(student, teacher_temp, student_temp, n_teacher, n_student, batch):
    """The teacher gradient is (1/τ_t) p_t ⊙ (log p_s − Σ p_t log p_s) / (n_terms · B): in float32
    the log-probabilities (up to L ≈ 50 in size) carry L·2⁻²⁴ rounding, so gradient entries carry
    ≈ L·2⁻²⁴ / (τ_t · n_terms · B) absolute error whatever their size (lightly's own float32
    code has it); 8× that is the float32 atol."""
    log_p_student = F.log_softmax(torch.stack([x.detach().double() for x in student]) / student_temp, dim=-1)
    n_terms = n_teacher * n_student - min(n_teacher, n_student)
    return 8 * U32 * log_p_student.abs().max().item() / (teacher_temp * n_terms * batch)


def center_error(teacher, center, momentum, u=U32):
    """|δ center| of m·c + (1 − m)·mean(teacher): three roundings of each product and the sum,
    and the T·B-term mean of the teacher (γ_TB of its magnitudes)."""
    t = torch.stack([x.detach().double() for x in teacher])
    mean = t.mean(dim=(0, 1)).reshape(center.shape)
    return (3 * u * (momentum * center.double().abs() + (1 - momentum) * mean.abs())
            + (1 - momentum) * gamma(t.shape[0] * t.shape[1], u) * t.abs().mean(dim=(0, 1)).reshape(center.shape))


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
# DINO
# ============================================================================================
def dino_inputs(n_teacher=2, n_student=4, batch=5, dim=37, dtype=torch.float32):
    teacher = [torch.randn(batch, dim, dtype=dtype).requires_grad_(True) for _ in range(n_teacher)]
    student = [torch.randn(batch, dim, dtype=dtype).requires_grad_(True) for _ in range(n_student)]
    return teacher, student


DINO_CROPS = [
    pytest.param(2, 4, id="2t-4s"),
    pytest.param(2, 2, id="2t-2s"),
    pytest.param(1, 3, id="1t-3s"),
    pytest.param(3, 2, id="3t-2s"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("n_teacher,n_student", DINO_CROPS)
def test_dino_loss_gradients_and_center_equal_lightly(n_teacher, n_student, dtype, backend):
    criterion = DINOLoss(output_dim=37, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5,
                         student_temp=0.1, center_momentum=0.9, backend=backend).to(dtype)
    with torch.no_grad():
        criterion.center.copy_(torch.randn(1, 1, 37, dtype=dtype) * 0.5)
    u = unit_roundoff(dtype)
    grad_rtol = 1e-4 if dtype == torch.float32 else 1e-10
    for call, epoch in enumerate([1, 7]):  # two consecutive calls; the second uses the updated center
        teacher, student = dino_inputs(n_teacher, n_student, dtype=dtype)
        used_center = criterion.center.detach().double().clone()  # what this call sees, exactly
        loss = criterion(teacher, student, epoch=epoch)
        assert loss.dim() == 0 and loss.dtype == dtype
        loss.backward()
        teacher64, student64 = as_leaves64(teacher), as_leaves64(student)
        tau = lightly_teacher_temp(0.04, 0.07, 5, epoch)
        expected = lightly_dino64(teacher64, student64, used_center, tau, 0.1)
        expected.backward()
        grad_atol = (dino_teacher_grad_atol(student64, tau, 0.1, n_teacher, n_student, 5)
                     if dtype == torch.float32 else 1e-12)
        loss_bound, student_bounds = dino_bounds(teacher64, student64, used_center, tau, 0.1, dtype)
        assert_within(loss, expected, loss_bound, f"loss of call {call}")
        for i, (x, x64) in enumerate(zip(teacher, teacher64)):
            torch.testing.assert_close(x.grad.double(), x64.grad, rtol=grad_rtol, atol=grad_atol,
                                       msg=lambda m: f"grad of t{i}, call {call}: {m}")
        for i, (x, x64, bound) in enumerate(zip(student, student64, student_bounds)):
            assert_within(x.grad, x64.grad, bound, f"grad of s{i}, call {call}")
        expected_center = lightly_center64(teacher, used_center, 0.9)
        assert criterion.center.shape == (1, 1, 37) and criterion.center.dtype == dtype
        assert_within(criterion.center, expected_center, center_error(teacher, used_center, 0.9, u),
                      f"center after call {call}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("epoch,override,expected_tau", [
    pytest.param(0, None, 0.04, id="epoch0"),
    pytest.param(2, None, 0.055, id="epoch2-mid-warmup"),
    pytest.param(4, None, 0.07, id="epoch4-last-warmup"),
    pytest.param(5, None, 0.07, id="epoch5-after-warmup"),
    pytest.param(30, None, 0.07, id="epoch30"),
    pytest.param(None, None, 0.07, id="no-epoch"),
    pytest.param(2, 0.03, 0.03, id="override-during-warmup"),
    pytest.param(None, 0.05, 0.05, id="override-no-epoch"),
    pytest.param(9, 0.02, 0.02, id="override-after-warmup"),
])
def test_dino_teacher_temperature_schedule(epoch, override, expected_tau, backend):
    teacher, student = dino_inputs()
    center = torch.randn(1, 1, 37) * 0.5
    criterion = DINOLoss(output_dim=37, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=5,
                         backend=backend)
    criterion.center.copy_(center)
    if override is None:
        assert criterion.teacher_temperature(epoch) == pytest.approx(expected_tau, rel=1e-6)
    loss = criterion(teacher, student, teacher_temp=override, epoch=epoch)
    expected = lightly_dino64(teacher, student, center, expected_tau, 0.1)
    # expected_tau is the schedule's value to 1e-6 (lightly's float32 linspace): 1e-6 relative on
    # the teacher's logits, ≤ 2e-6·max|z_t| on the loss's targets, on top of dino_bounds
    loss_bound, _ = dino_bounds(teacher, student, center, expected_tau, 0.1)
    z_max = (torch.stack(teacher).detach().double() - center.double()).abs().max().item() / expected_tau
    assert_within(loss, expected, loss_bound + 2e-6 * z_max * expected.abs().item(), "loss")


@pytest.mark.parametrize("center_shape", [(1, 1, 37), (37,), (1, 37)], ids=["1x1xD", "D", "1xD"])
def test_dino_center_function(center_shape):
    teacher, _ = dino_inputs()
    center = torch.randn(center_shape)
    new = fn.dino_center(teacher, center, momentum=0.8)
    assert new.shape == center.shape
    assert_within(new, lightly_center64(teacher, center, 0.8), center_error(teacher, center, 0.8), "center")
    stacked = fn.dino_center(torch.stack([t.detach() for t in teacher]), center, momentum=0.8)
    torch.testing.assert_close(stacked, new, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_module_equals_functional(backend):
    teacher, student = dino_inputs()
    center = torch.randn(1, 1, 37)
    criterion = DINOLoss(output_dim=37, teacher_temp=0.06, student_temp=0.2, backend=backend)
    criterion.center.copy_(center)
    module = criterion(teacher, student)
    functional = fn.dino(teacher, student, center, teacher_temp=0.06, student_temp=0.2, backend=backend)
    stacked = fn.dino(torch.stack(teacher), torch.stack(student), center.reshape(37), 0.06, 0.2, backend=backend)
    torch.testing.assert_close(module, functional, rtol=0, atol=0)
    # bit for bit: the lists are stacked and the center reshaped before the same ops
    torch.testing.assert_close(stacked, functional, rtol=0, atol=0)


def test_dino_backends_agree():
    """Every CPU backend against lightly in float64: dino_bounds for the loss and the students'
    gradients, dino_teacher_grad_atol for the teachers' (never one float32 backend against another)."""
    torch.manual_seed(3)
    teacher, student = dino_inputs()
    center = torch.randn(37)
    teacher64, student64 = as_leaves64(teacher), as_leaves64(student)
    expected = lightly_dino64(teacher64, student64, center, 0.04, 0.1)  # fn.dino's default temperatures
    exact_grads = torch.autograd.grad(expected, teacher64 + student64)
    loss_bound, student_bounds = dino_bounds(teacher, student, center, 0.04, 0.1)
    teacher_atol = dino_teacher_grad_atol(student, 0.04, 0.1, 2, 4, 5)
    for backend in BACKENDS_ON_CPU:
        loss = fn.dino(teacher, student, center, backend=backend)
        assert_within(loss, expected, loss_bound, f"{backend} loss")
        grads = torch.autograd.grad(loss, teacher + student)
        for got, want in zip(grads[:2], exact_grads[:2]):
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=teacher_atol)
        for got, want, bound in zip(grads[2:], exact_grads[2:], student_bounds):
            assert_within(got, want, bound, f"{backend} student gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_dino_gradcheck_float64(backend):
    teacher, student = dino_inputs(2, 3, batch=3, dim=5, dtype=torch.float64)
    center = torch.randn(5, dtype=torch.float64)

    def loss(t0, t1, s0, s1, s2):
        return fn.dino([t0, t1], [s0, s1, s2], center, teacher_temp=0.3, student_temp=0.2, backend=backend)

    assert torch.autograd.gradcheck(loss, teacher + student)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dino_half_inputs_give_float32_loss_near_fp32(dtype, backend):
    teacher, student = dino_inputs(dtype=dtype)
    center = torch.randn(37) * 0.5
    loss = fn.dino(teacher, student, center, teacher_temp=0.04, student_temp=0.1, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    exact = lightly_dino64(teacher, student, center, 0.04, 0.1)  # on the same rounded inputs
    in_half = lightly_dino64(teacher, student, center, 0.04, 0.1, dtype=dtype)
    half_error_within_twice_reference(loss.detach(), in_half.detach(), exact.detach())
    loss.backward()
    for x in teacher + student:
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    criterion = DINOLoss(output_dim=37, backend=backend)
    module_loss = criterion(teacher, student)
    assert module_loss.dtype == torch.float32 and torch.isfinite(module_loss)
    assert criterion.center.dtype == torch.float32
    zero = torch.zeros(1, 1, 37)
    assert_within(criterion.center, lightly_center64(teacher, zero, 0.9), center_error(teacher, zero, 0.9), "center")


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


def _dino_crops(n, batch=5, dim=37):
    return [torch.randn(batch, dim) for _ in range(n)]


DINO_BAD = [
    pytest.param(lambda: fn.dino(_dino_crops(2), _dino_crops(4, batch=6), torch.zeros(37)), ValueError,
                 r"teacher.*\(2, 5, 37\).*student.*\(4, 6, 37\)", id="mismatched-B"),
    pytest.param(lambda: fn.dino(_dino_crops(2), _dino_crops(4, dim=36), torch.zeros(37)), ValueError,
                 r"teacher.*\(2, 5, 37\).*student.*\(4, 5, 36\)", id="mismatched-D"),
    pytest.param(lambda: fn.dino(_dino_crops(1) + _dino_crops(1, batch=4), _dino_crops(4), torch.zeros(37)),
                 ValueError, r"teacher_out\[0\].*teacher_out\[1\]", id="teacher-crops-differ"),
    pytest.param(lambda: fn.dino(_dino_crops(2), _dino_crops(4), torch.zeros(38)), ValueError,
                 r"center.*\(38,\)", id="center-wrong-D"),
    pytest.param(lambda: fn.dino(_dino_crops(2), _dino_crops(4), torch.zeros(2, 37)), ValueError,
                 r"center.*\(2, 37\)", id="center-two-rows"),
    pytest.param(lambda: fn.dino(_dino_crops(1), _dino_crops(1), torch.zeros(37)), ValueError,
                 r"1 teacher view\(s\) and 1 student view\(s\)", id="no-off-diagonal-pair"),
    pytest.param(lambda: fn.dino(_dino_crops(2), _dino_crops(4), torch.zeros(37), teacher_temp=0.0), ValueError,
                 "teacher_temp", id="teacher-temp-zero"),
    pytest.param(lambda: fn.dino(_dino_crops(2), _dino_crops(4), torch.zeros(37), student_temp=-0.1), ValueError,
                 "student_temp", id="student-temp-negative"),
    pytest.param(lambda: DINOLoss(output_dim=37)(_dino_crops(2), _dino_crops(4), teacher_temp=-1.0), ValueError,
                 "teacher_temp", id="module-forward-teacher-temp"),
    pytest.param(lambda: DINOLoss(output_dim=37, student_temp=0.0), ValueError, "student_temp",
                 id="module-student-temp"),
    pytest.param(lambda: DINOLoss(output_dim=37, warmup_teacher_temp=0.0), ValueError, "warmup_teacher_temp",
                 id="module-warmup-temp"),
    pytest.param(lambda: DINOLoss(output_dim=37)(_dino_crops(2, dim=36), _dino_crops(4, dim=36)), ValueError,
                 "center", id="module-output-dim-mismatch"),
]


@pytest.mark.parametrize("call,error,match", DINO_BAD)
def test_dino_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
