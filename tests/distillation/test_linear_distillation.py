"""The fused last layer + soft-target cross-entropy (``linear_distillation_loss``): mean and
Sinkhorn-Knopp teacher centring, on every backend, against float64 formulas."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.functional as fn
from fastssl import backends
from fastssl.distillation import torch_backend as distillation
from fastssl.runtime import blocks
from fastssl.runtime.triton import interpreted as triton_interpreted

from helpers import (FLOAT_DTYPES, HALF_DTYPES, LargestTensor, assert_within, backend_params, gamma, half_error_within_twice_reference,
                     soft_ce_pairs_bounds, unit_roundoff)

BACKENDS = backend_params("linear_distillation")  # reference, torch, triton (interpreted here)


# ============================================================================================
# float64 formulas
# ============================================================================================
def targets64(teacher, teacher_weight, center, teacher_temp, iterations):
    """Teacher probabilities: softmax((t Wₜᵀ − c)/τ_t), or DINOv2's sinkhorn_knopp_teacher as
    written there (exp, then alternate prototype / sample normalisations), in float64."""
    logits = teacher @ teacher_weight.T
    if iterations == 0:
        return torch.softmax((logits - (0 if center is None else center)) / teacher_temp, dim=-1)
    q = torch.exp(logits / teacher_temp).T
    q = q / q.sum()
    classes, samples = q.shape
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / classes
        q = q / q.sum(dim=0, keepdim=True) / samples
    return (q * samples).T


def distillation64(student, teacher, weight, teacher_weight, center, student_temp, teacher_temp, iterations=0):
    targets = targets64(teacher, teacher_weight, center, teacher_temp, iterations)
    if iterations:
        targets = targets.detach()
    return -(targets * F.log_softmax(student @ weight.T / student_temp, dim=-1)).sum(-1).mean()


# ============================================================================================
# Error bounds
# ============================================================================================
def sinkhorn_tile_count(prototypes, rows):
    return len(distillation._prototype_tiles(prototypes, rows))


def distillation_bounds(student, teacher, weight, teacher_weight, center, student_temp, teacher_temp, iterations,
                        dtype):
    """Bounds on |δloss| and on the gradients' errors of a float32 (float64) evaluation.

    The loss is soft_ce_pairs_bounds' with one crop pair, B = N rows, targets p the teacher's
    probabilities and logits x = s·w, given: x's error dx = γ_D Σ_d|s||w| (the GEMM, of features
    scaled by σ_s first: one rounding more, within the next term); the LSE of each row, made
    whole (blocks of rows × every prototype), off by (|L| + 3)u (half of it counted as a logit
    error, which moves the LSE twice); p's relative error e_p = 2 max δu + (|u| + max|u| + |M| +
    K + 4)u + (2|M| + 4)u, with δu = σ_t(γ_D Σ|t||wₜ| + u|t·wₜ − c| + u|c|) (the GEMM, the shift,
    the scaling) and the same exp/LSE terms as the student's; Sinkhorn adds 2δa, with each of its
    ``iterations`` moving the log column / row scalings a, b by ≤ 2 max δu + (N + K + max|u| +
    max|a| + max|b| + 6)u (an N- and a K-term log-sum-exp; also the exp-domain reference's two
    normalisations, (N + 2)u and (K + 2)u relative per entry) + tiles·(2 max|M| + 4)u (its passes
    go over tiles of prototypes, b merging the tiles' LSEs).
    Student gradients: ∂ℓ/∂x bounded there, times w (a K-term sum, γ_K) or s (N terms, γ_N).
    Teacher gradients (mean centring): ∂ℓ/∂u = (σ_s/N) p (m − x), m = Σ_k p x, off by
    (σ_s/N) (p (e_p|m − x| + δm + dx + 5u|m − x|) + φ|m − x|), δm = Σ_k p|x| (e_p + γ_K) + max dx
    + Kφ max|x| (the backend zeroes probabilities below φ = sqrt(tiny), as there), then σ_t
    times a K-term (N-term) product with wₜ (t), γ of its length, and 3u for σ_t σ_s/N's rounding.
    Returns (loss, ∂student, ∂teacher, ∂weight, ∂teacher_weight, ∂center) bounds.
    """
    u = unit_roundoff(dtype)
    s, t, w, tw = (x.detach().double() for x in (student, teacher, weight, teacher_weight))
    c = None if center is None else center.detach().double()
    rows, classes = s.shape[0], w.shape[0]
    tiles = sinkhorn_tile_count(classes, rows)
    x = s @ w.T
    dx = gamma(s.shape[1], u) * (s.abs() @ w.abs().T)
    teacher_logits = t @ tw.T
    shifted = teacher_logits - (0 if c is None else c)
    scaled = shifted / teacher_temp
    du = (gamma(t.shape[1], u) * (t.abs() @ tw.abs().T) + u * shifted.abs()
          + (0 if c is None else u * c.abs())) / teacher_temp
    p = targets64(t, tw, c, teacher_temp, iterations)
    lse_t = torch.logsumexp(scaled, dim=-1, keepdim=True)
    lse_s = torch.logsumexp(x / student_temp, dim=-1, keepdim=True)
    e_p = (2 * du.amax() + (scaled.abs() + scaled.abs().amax(-1, keepdim=True) + lse_t.abs() + classes + 4) * u
           + (2 * lse_t.abs() + 4) * u)
    if iterations:
        log_p = torch.log(p)
        col = torch.logsumexp(scaled - log_p, dim=0)  # a + b_n − … : magnitudes of the scalings
        step = (2 * du.amax() + (rows + classes + scaled.abs().amax() + col.abs().amax() + lse_t.abs().amax() + 6) * u
                + tiles * (2 * lse_t.abs().amax() + 4) * u)
        e_p = e_p + 2 * iterations * step
    target_error = e_p.amax().item()
    logit_error = (dx.amax(-1) / student_temp + (lse_s.squeeze(-1).abs() + 3) * u / 2)[None]
    loss_b, _, grad_x_b = soft_ce_pairs_bounds(p[None], x[None], 1 / student_temp, torch.ones(1, 1), target_error,
                                               logit_error, dtype)
    grad_x_b = grad_x_b[0]
    x64 = x.clone().requires_grad_(True)
    grad_x = torch.autograd.grad(-(p * F.log_softmax(x64 / student_temp, -1)).sum(-1).mean(), x64)[0].abs()
    grad_s_b = grad_x_b @ w.abs() + gamma(classes, u) * grad_x @ w.abs()
    grad_w_b = grad_x_b.T @ s.abs() + gamma(rows, u) * grad_x.T @ s.abs()
    m = (p * x).sum(-1, keepdim=True)
    dm = (p * x.abs()).sum(-1, keepdim=True) * (e_p + gamma(classes, u)) + dx.amax(-1, keepdim=True)
    grad_u = (p * (m - x)).abs() / (student_temp * rows)
    flushed = math.sqrt(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny)
    dm = dm + classes * flushed * x.abs().amax(-1, keepdim=True)
    grad_u_b = ((p * (e_p * (m - x).abs() + dm + dx + 5 * u * (m - x).abs()) + flushed * (m - x).abs())
                / (student_temp * rows))
    grad_t_b = (grad_u_b @ tw.abs() + (gamma(classes, u) + 3 * u) * grad_u @ tw.abs()) / teacher_temp
    grad_tw_b = (grad_u_b.T @ t.abs() + (gamma(rows, u) + 3 * u) * grad_u.T @ t.abs()) / teacher_temp
    grad_c_b = (grad_u_b.sum(0) + (gamma(rows, u) + 3 * u) * grad_u.sum(0)) / teacher_temp
    return loss_b[0, 0], grad_s_b, grad_t_b, grad_w_b, grad_tw_b, grad_c_b


def inputs(rows, dim, classes, dtype, teacher_dim=None, spread=1.0):
    g = torch.Generator().manual_seed(rows * 1000 + classes)
    teacher_dim = teacher_dim or dim

    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)

    return (leaf(rows, dim), leaf(rows, teacher_dim, scale=spread), leaf(classes, dim), leaf(classes, teacher_dim),
            leaf(classes, scale=0.3))


SHAPES = [pytest.param(7, 5, 37, id="N7-D5-K37"), pytest.param(3, 11, 130, id="N3-D11-K130"),
          pytest.param(1, 4, 9, id="N1-D4-K9"), pytest.param(6, 3, 1, id="N6-D3-K1")]


# ============================================================================================
# Values and gradients against float64
# ============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows,dim,classes", SHAPES)
def test_mean_centring_values_and_gradients_equal_float64(rows, dim, classes, dtype, backend, block_elements):
    leaves = inputs(rows, dim, classes, dtype, teacher_dim=dim + 2)
    student, teacher, weight, teacher_weight, center = leaves
    loss = fn.linear_distillation_loss(student, teacher, weight, teacher_weight=teacher_weight, student_temp=0.1,
                                       teacher_temp=0.04, center=center, backend=backend)
    assert loss.shape == () and loss.dtype == dtype
    grads = torch.autograd.grad(loss, leaves)
    assert all(g.dtype == dtype for g in grads)
    leaves64 = [x.detach().double().requires_grad_(True) for x in leaves]
    expected = distillation64(*leaves64, 0.1, 0.04)
    expected_grads = torch.autograd.grad(expected, leaves64)
    loss_b, s_b, t_b, w_b, tw_b, c_b = distillation_bounds(*leaves, 0.1, 0.04, 0, dtype)
    assert_within(loss, expected, loss_b, "loss")
    for name, got, want, bound in zip(("student", "teacher", "weight", "teacher_weight", "center"), grads,
                                      expected_grads, (s_b, t_b, w_b, tw_b, c_b)):
        assert_within(got, want, bound, f"gradient of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows,dim,classes", SHAPES[:3])
@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_centring_equals_dinov2_float64(rows, dim, classes, iterations, dtype, backend, block_elements):
    student, teacher, weight, teacher_weight, _ = inputs(rows, dim, classes, dtype)
    loss = fn.linear_distillation_loss(student, teacher, weight, teacher_weight=teacher_weight, student_temp=0.1,
                                       teacher_temp=0.07, centering="sinkhorn", iterations=iterations, backend=backend)
    grads = torch.autograd.grad(loss, (student, teacher, weight, teacher_weight), allow_unused=True)
    assert grads[1] is None and grads[3] is None  # constant targets: no gradient reaches the teacher
    leaves64 = [x.detach().double().requires_grad_(True) for x in (student, teacher, weight, teacher_weight)]
    expected = distillation64(*leaves64, None, 0.1, 0.07, iterations)
    expected_grads = torch.autograd.grad(expected, (leaves64[0], leaves64[2]))
    loss_b, s_b, _, w_b, _, _ = distillation_bounds(student, teacher, weight, teacher_weight, None, 0.1, 0.07,
                                                    iterations, dtype)
    assert_within(loss, expected, loss_b, "loss")
    assert_within(grads[0], expected_grads[0], s_b, "gradient of student")
    assert_within(grads[2], expected_grads[1], w_b, "gradient of weight")


def test_sinkhorn_targets_balance_the_prototypes():
    """With many iterations the targets' prototype marginals are uniform (Σ_n p_nk = N/K) and
    rows sum to 1: the log-domain passes converge where DINOv2's do."""
    teacher = torch.randn(12, 4, dtype=torch.float64)
    teacher_weight = torch.randn(6, 4, dtype=torch.float64)
    tiles = distillation._prototype_tiles(6, 12)
    shift = distillation._sinkhorn_shift(teacher, teacher_weight, 1 / 0.5, 2000, False, tiles, torch.float64)
    p = torch.softmax(teacher @ teacher_weight.T / 0.5 - shift, dim=-1)
    torch.testing.assert_close(p.sum(0), torch.full((6,), 2.0, dtype=torch.float64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shared_weight_gets_both_sides_gradients(backend):
    """teacher_weight=None: ``weight`` is the teacher's layer too (with mean centring its
    gradient sums both paths), no center: an uncentred teacher softmax."""
    student, teacher, weight, _, _ = inputs(5, 4, 23, torch.float64)
    loss = fn.linear_distillation_loss(student, teacher, weight, student_temp=0.2, teacher_temp=0.1, backend=backend)
    grads = torch.autograd.grad(loss, (student, teacher, weight))
    expected = distillation64(student, teacher, weight, weight, None, 0.2, 0.1)
    expected_grads = torch.autograd.grad(expected, (student, teacher, weight))
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def gemm_count(step):
    """How many matrix products (aten mm, addmm, addmm_) ``step()`` runs, inside ops too."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        result = step()
    names = [event.name for event in profile.events()]
    return sum(names.count(name) for name in ("aten::mm", "aten::addmm", "aten::addmm_")), result


@pytest.mark.parametrize("wanted,gemms", [
    pytest.param((), 2, id="no-gradient"), pytest.param((0,), 3, id="student"),
    pytest.param((0, 2), 4, id="student-weight"), pytest.param((0, 1, 2, 3, 4), 6, id="every-input")])
def test_only_the_needed_gradients_and_their_gemms(wanted, gemms, monkeypatch):
    """Per block of rows: the two logits' GEMMs, then one per gradient asked for (the teacher's
    side needing both of its own); the backward only scales the forward's gradients: no GEMM."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 4)  # blocks of 16·4 // 23 = 2 rows: 3 of them
    leaves = [x.detach().requires_grad_(i in wanted) for i, x in enumerate(inputs(5, 4, 23, torch.float64))]
    assert len(distillation._row_blocks(5, 23)) == 3
    forward, loss = gemm_count(lambda: fn.linear_distillation_loss(
        leaves[0], leaves[1], leaves[2], teacher_weight=leaves[3], center=leaves[4], student_temp=0.1,
        teacher_temp=0.05, backend="torch"))
    assert forward == 3 * gemms
    if not wanted:
        assert not loss.requires_grad
        return
    backward, grads = gemm_count(lambda: torch.autograd.grad(loss, [leaves[i] for i in wanted]))
    assert backward == 0
    leaves64 = [x.detach().requires_grad_(x.requires_grad) for x in leaves]
    expected = distillation64(*leaves64, 0.1, 0.05)
    for got, want in zip(grads, torch.autograd.grad(expected, [leaves64[i] for i in wanted])):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


def test_sharp_teacher_and_large_logits_stay_finite():
    """DINO's τ_t = 0.04 on logits of ~30: targets mostly below float32's smallest normal."""
    student, teacher, weight, teacher_weight, center = inputs(6, 8, 300, torch.float32, spread=4.0)
    loss = fn.linear_distillation_loss(student, teacher, weight, teacher_weight=teacher_weight, student_temp=0.1,
                                       teacher_temp=0.04, center=center, backend="torch")
    grads = torch.autograd.grad(loss, (student, teacher, weight, teacher_weight, center))
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    leaves64 = [x.detach().double() for x in (student, teacher, weight, teacher_weight, center)]
    assert_within(loss, distillation64(*leaves64, 0.1, 0.04),
                  distillation_bounds(student, teacher, weight, teacher_weight, center, 0.1, 0.04, 0, torch.float32)[0])


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_error_within_twice_the_reference_in_half(dtype, backend):
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpreted():
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    student, teacher, weight, teacher_weight, center = inputs(7, 5, 37, dtype)
    loss = fn.linear_distillation_loss(student, teacher, weight, teacher_weight=teacher_weight, student_temp=0.1,
                                       teacher_temp=0.05, center=center, backend=backend)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (student, weight))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    exact = distillation64(*(x.detach().double() for x in (student, teacher, weight, teacher_weight, center)), 0.1, 0.05)
    with torch.no_grad():
        targets = torch.softmax((teacher @ teacher_weight.T - center) / 0.05, dim=-1)
        in_half = -(targets * F.log_softmax(student @ weight.T / 0.1, dim=-1)).sum(-1).mean()
    half_error_within_twice_reference(loss.detach(), in_half, exact)


# ============================================================================================
# Op registration, tiling and memory
# ============================================================================================
def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1)  # ragged blocks of rows, Sinkhorn's tiles of one prototype
    leaves = inputs(3, 2, 7, torch.float64)
    assert [b.stop - b.start for b in distillation._row_blocks(3, 7)] == [2, 1]
    assert sinkhorn_tile_count(7, 3) == 7
    assert torch.autograd.gradcheck(lambda *x: fn.linear_distillation_loss(
        x[0], x[1], x[2], teacher_weight=x[3], center=x[4], student_temp=0.5, teacher_temp=0.3, backend="torch"), leaves)
    assert torch.autograd.gradcheck(lambda s, w: fn.linear_distillation_loss(
        s, leaves[1], w, teacher_weight=leaves[3], student_temp=0.5, teacher_temp=0.3, centering="sinkhorn",
        backend="torch"), (leaves[0], leaves[2]))


@pytest.mark.parametrize("centering", ["mean", "sinkhorn"])
def test_ragged_blocks_equal_one_block(monkeypatch, centering):
    """N = 5 in blocks of 16·5 // 37 = 2 rows (the last one of 1), Sinkhorn's passes over tiles of
    4·5 // 5 = 4 prototypes (the last one of 1): the one-block result."""
    leaves = inputs(5, 4, 37, torch.float64)
    if centering == "sinkhorn":
        leaves = [leaves[0], leaves[1].detach(), leaves[2], leaves[3].detach()]
    kwargs = dict(teacher_weight=leaves[3], student_temp=0.1, teacher_temp=0.04, centering=centering,
                  backend="torch", **(dict(center=leaves[4]) if centering == "mean" else {}))
    differentiable = [x for x in leaves if x.requires_grad]
    whole = fn.linear_distillation_loss(*leaves[:3], **kwargs)
    whole_grads = torch.autograd.grad(whole, differentiable)
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 5)
    assert [b.stop - b.start for b in distillation._row_blocks(5, 37)] == [2, 2, 1]
    assert 37 % distillation._prototype_tiles(37, 5)[0].stop == 1
    blocked = fn.linear_distillation_loss(*leaves[:3], **kwargs)
    torch.testing.assert_close(blocked, whole, rtol=1e-13, atol=0)
    for got, want in zip(torch.autograd.grad(blocked, differentiable), whole_grads):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-15)


@pytest.mark.parametrize("iterations", [0, 3])
def test_torch_backend_never_holds_the_logits(monkeypatch, iterations):
    """The forward (which makes every gradient) makes nothing with as many elements as the (N, K)
    logits: blocks of rows and Sinkhorn's tiles only."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 25)
    student, teacher, weight, teacher_weight, center = (x.detach() for x in inputs(20, 6, 200, torch.float32))
    center = center if iterations == 0 else None
    with LargestTensor() as mode:
        outputs = distillation.linear_distillation_forward(student, teacher, weight, teacher_weight, center, 10.0, 25.0,
                                                           iterations, False, [True] * 4 + [center is not None])
    assert [g.shape for g in outputs[1:]] == [x.shape if x is not None else (0,)
                                              for x in (student, teacher, weight, teacher_weight, center)]
    assert mode.largest <= max(weight.numel(), 16 * 25) < 20 * 200, mode.largest


@pytest.mark.parametrize("backend", BACKENDS[1:])
def test_opcheck(backend):
    student, teacher, weight, teacher_weight, center = inputs(5, 3, 11, torch.float32)
    op = backends.implementation("linear_distillation", backend).fn.op
    torch.library.opcheck(op, (student, teacher, weight, teacher_weight, center, 10.0, 25.0, 0, False))
    torch.library.opcheck(op, (student, teacher.detach(), weight, teacher_weight.detach(), None, 10.0, 25.0, 3, False))


# ============================================================================================
# Bad input
# ============================================================================================
def _call(**changes):
    student, teacher, weight, teacher_weight, center = (x.detach() for x in inputs(5, 3, 11, torch.float32))
    kwargs = dict(student_features=student, teacher_features=teacher, weight=weight, teacher_weight=teacher_weight,
                  student_temp=0.1, teacher_temp=0.04, center=center)
    kwargs.update(changes)
    return fn.linear_distillation_loss(kwargs.pop("student_features"), kwargs.pop("teacher_features"),
                                       kwargs.pop("weight"), **kwargs)


@pytest.mark.parametrize("changes,error,match", [
    (dict(student_features=torch.randn(5, 3, 1)), ValueError, "student_features must have 2 dimensions"),
    (dict(teacher_features=torch.randn(4, 3)), ValueError, "same number of rows"),
    (dict(weight=torch.randn(11, 4)), ValueError, "weight must be"),
    (dict(teacher_weight=torch.randn(12, 3)), ValueError,
     r"teacher_weight must have one row per prototype of weight \(11\), got \(12, 3\)"),
    (dict(teacher_weight=torch.randn(11, 2)), ValueError, "teacher_weight must be"),
    (dict(student_temp=0.0), ValueError, "student_temp"),
    (dict(teacher_temp=-1.0), ValueError, "teacher_temp"),
    (dict(center=torch.randn(10)), ValueError, "center must hold one value per prototype"),
    (dict(centering="median"), ValueError, "centering must be one of"),
    (dict(centering="sinkhorn"), ValueError, "center is for centering='mean'"),
    (dict(centering="sinkhorn", center=None, iterations=0), ValueError, "iterations must be >= 1"),
    (dict(student_features=torch.randint(0, 3, (5, 3))), TypeError, "student_features must be float"),
    (dict(backend="cuda"), ValueError, "backend must be"),
])
def test_bad_input_names_the_argument(changes, error, match):
    with pytest.raises(error, match=match):
        _call(**changes)


def test_gather_without_torch_distributed_raises(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not available"):
        _call(centering="sinkhorn", center=None, gather_distributed=True)


def test_gather_without_a_process_group_is_this_process_alone():
    """One process: the gathered batch is this process's (the DDP equality: tests/distributed)."""
    alone = _call(centering="sinkhorn", center=None)
    torch.testing.assert_close(_call(centering="sinkhorn", center=None, gather_distributed=True), alone, rtol=0, atol=0)


def test_public_names():
    assert fastssl.linear_distillation_loss is fn.linear_distillation_loss
    assert math.isfinite(_call(center=torch.zeros(1, 1, 11)).item())  # DINOLoss's (1, 1, K) center buffer
