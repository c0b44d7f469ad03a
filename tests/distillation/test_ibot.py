"""iBOT (lightly's ``IBOTPatchLoss`` / ``IBOTPlusPlusPatchLoss``) and DINOv2's Sinkhorn-Knopp
teacher centering (DINO and iBOT) against independent float64 formulas, on every CPU backend."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.functional as fn
from fastssl import DINOLoss, IBOTPatchLoss, IBOTPlusPlusPatchLoss

from helpers import (BACKENDS, FLOAT_DTYPES, HALF_DTYPES, U32, as_leaves64, assert_within, gamma,
                     half_error_within_twice_reference, sinkhorn_log_span, sinkhorn_rel_error,
                     soft_ce_pairs_bounds, unit_roundoff)
from oracles import (dinov2_sinkhorn_teacher64, ibot_from_targets64, lightly_dino64, lightly_ibot64,
                     lightly_ibot_plus_plus64)

K = 37


def ibot_inputs(batch=3, height=4, width=5, dim=K, dtype=torch.float32, seed=0, features=None):
    """A (B, H, W) mask (image 1 with no masked token when batch > 1: the clamp to 1 counts) and
    (M, K) teacher and student outputs of its masked tokens (or (M, features) student features)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, height, width, generator=g) < 0.4
    if batch > 1:
        mask[1] = False
    mask[0, 0, 0] = True
    rows = int(mask.sum())
    teacher = torch.randn(rows, dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    student = torch.randn(rows, features or dim, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    return teacher, student, mask


def ibot_row_weights64(mask):
    """1 / (max(n_b, 1) · B) for every masked token, in mask order (lightly's weights)."""
    per_image = 1.0 / (mask.flatten(1).sum(dim=1).clamp(min=1).double() * mask.shape[0])
    return per_image.repeat_interleave(mask.flatten(1).sum(dim=1))


def weighted_ce_bounds(targets, student, row_weights, student_temp, target_error, logit_error=0.0,
                       dtype=torch.float32):
    """Bounds on the loss Σ_n w_n CE(q_n, s_n) and on its student-logit gradient in ``dtype``: the
    core's mean over N rows of targets scaled by N·w_n (soft_ce_pairs_bounds with one pair), the
    scale's three roundings (1/(n·B), ·N, the product) in ``target_error``, the mean's division
    and the 0-dim pick one u each on top."""
    u = unit_roundoff(dtype)
    scaled = targets.detach().double() * (row_weights * targets.shape[0])[:, None]
    loss, _, grads = soft_ce_pairs_bounds(scaled[None], student.detach().double()[None], 1 / student_temp,
                                          torch.ones(1, 1, dtype=torch.float64),
                                          target_error=target_error + 3 * u, logit_error=logit_error, dtype=dtype)
    exact = -(scaled * F.log_softmax(student.detach().double() / student_temp, dim=-1)).sum() / targets.shape[0]
    return loss.item() + 2 * u * abs(exact.item()), grads[0]


def teacher_softmax_error(teacher, center, teacher_temp, dtype):
    """dino_bounds' relative error of the teacher softmax of z = (t − c)/τ_t: (5·max|z| + K + ln K + 6)u."""
    z = (teacher.detach().double() - center.double().reshape(1, -1)) / teacher_temp
    classes = z.shape[-1]
    return (5 * z.abs().max().item() + classes + math.log(classes) + 6) * unit_roundoff(dtype), torch.softmax(z, -1)


def teacher_grad_atol(student, row_weights, teacher_temp, student_temp):
    """As dino_teacher_grad_atol: the teacher gradient w_n/τ_t · p_t ⊙ (log p_s − Σ p_t log p_s)
    carries ≈ L·2⁻²⁴·w_n/τ_t absolute error (L = max|log p_s|) in float32; 8× that."""
    log_p = F.log_softmax(student.detach().double() / student_temp, dim=-1)
    return 8 * U32 * log_p.abs().max().item() * row_weights.max().item() / teacher_temp


# ============================================================================================
# IBOTPatchLoss
# ============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ibot_loss_gradients_and_center_equal_lightly(dtype, backend):
    criterion = IBOTPatchLoss(output_dim=K, teacher_temp=0.07, student_temp=0.2, center_momentum=0.8,
                              backend=backend).to(dtype)
    criterion.center.center = torch.randn(1, K, dtype=dtype) * 0.5
    for call, override in enumerate([None, 0.05]):  # the second call sees the updated center
        teacher, student, mask = ibot_inputs(dtype=dtype, seed=call)
        used_center = criterion.center.value.detach().double().clone()
        loss = criterion(teacher, student, mask, teacher_temp=override)
        assert loss.dim() == 0 and loss.dtype == dtype
        loss.backward()
        tau = 0.07 if override is None else override
        teacher64, student64 = as_leaves64([teacher, student])
        expected = lightly_ibot64(teacher64, student64, mask, used_center, tau, 0.2)
        expected.backward()
        weights = ibot_row_weights64(mask)
        target_error, targets = teacher_softmax_error(teacher64, used_center, tau, dtype)
        loss_bound, student_bound = weighted_ce_bounds(targets, student64, weights, 0.2, target_error, dtype=dtype)
        assert_within(loss, expected, loss_bound, f"loss of call {call}")
        assert_within(student.grad, student64.grad, student_bound, f"student gradient of call {call}")
        if dtype == torch.float32:
            atol, rtol = teacher_grad_atol(student64, weights, tau, 0.2), 1e-4
        else:
            atol, rtol = 1e-12, 1e-10
        torch.testing.assert_close(teacher.grad.double(), teacher64.grad, rtol=rtol, atol=atol)
        # center ← m·c + (1 − m)·mean over the M rows: three roundings and the M-term mean
        u = unit_roundoff(dtype)
        rows = teacher64.detach()
        expected_center = 0.8 * used_center + 0.2 * rows.mean(dim=0, keepdim=True)
        bound = 3 * u * (0.8 * used_center.abs() + 0.2 * rows.mean(0, keepdim=True).abs()) + 0.2 * gamma(
            rows.shape[0], u) * rows.abs().mean(0, keepdim=True)
        assert criterion.center.value.shape == (1, K) and criterion.center.value.dtype == dtype
        assert_within(criterion.center.value, expected_center, bound, f"center after call {call}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_fused_last_layer_equals_lightly_on_the_logits(backend):
    teacher, features, mask = ibot_inputs(features=9)
    weight = torch.randn(K, 9, requires_grad=True)
    center = torch.randn(K) * 0.3
    loss = fn.ibot_patch(teacher, features, center, mask, 0.07, 0.1, last_layer_weight=weight, backend=backend)
    grads = torch.autograd.grad(loss, (teacher, features, weight))
    leaves64 = as_leaves64([teacher, features, weight])
    logits64 = (leaves64[1] @ leaves64[2].T)
    expected = lightly_ibot64(leaves64[0], logits64, mask, center, 0.07, 0.1)
    exact_grads = torch.autograd.grad(expected, leaves64 + [logits64])
    u = U32
    weights = ibot_row_weights64(mask)
    f, w = leaves64[1].detach(), leaves64[2].detach()
    products = f.abs() @ w.abs().T
    target_error, targets = teacher_softmax_error(leaves64[0], center, 0.07, torch.float32)
    loss_bound, logits_bound = weighted_ce_bounds(targets, logits64, weights, 0.1, target_error,
                                                  logit_error=(10 * gamma(9, u) * products.amax(-1))[None])
    assert_within(loss, expected, loss_bound, "loss")
    torch.testing.assert_close(grads[0].double(), exact_grads[0], rtol=1e-4,
                               atol=teacher_grad_atol(logits64, weights, 0.07, 0.1))
    g_abs = exact_grads[3].abs()
    # as test_linear_pairs_equal_float64: the K- and M-term sums of the logits' gradient times w or f
    assert_within(grads[1], exact_grads[1], logits_bound @ w.abs() + gamma(K, u) * g_abs @ w.abs(),
                  "feature gradient")
    assert_within(grads[2], exact_grads[2], logits_bound.T @ f.abs()
                  + gamma(f.shape[0], u) * g_abs.T @ f.abs(), "weight gradient")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_gradcheck_float64(backend):
    teacher, student, mask = ibot_inputs(batch=2, height=2, width=3, dim=5, dtype=torch.float64)
    center = torch.randn(5, dtype=torch.float64)
    weight = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    features = torch.randn(student.shape[0], 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, s: fn.ibot_patch(t, s, center, mask, 0.3, 0.2, backend=backend),
                                    (teacher, student))
    assert torch.autograd.gradcheck(
        lambda t, f, w: fn.ibot_patch(t, f, center, mask, 0.3, 0.2, last_layer_weight=w, backend=backend),
        (teacher, features, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_ibot_half_inputs_give_float32_loss_near_fp32(dtype, backend):
    teacher, student, mask = ibot_inputs(dtype=dtype)
    center = torch.randn(K) * 0.5
    loss = fn.ibot_patch(teacher, student, center, mask, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    exact = lightly_ibot64(teacher, student, mask, center, 0.04, 0.1)
    in_half = lightly_ibot64(teacher, student, mask, center, 0.04, 0.1, dtype=dtype)
    half_error_within_twice_reference(loss.detach(), in_half.detach(), exact.detach())
    loss.backward()
    assert teacher.grad.dtype == dtype and torch.isfinite(teacher.grad).all()
    assert student.grad.dtype == dtype and torch.isfinite(student.grad).all()


def test_ibot_state_dict_and_attributes_as_lightly():
    criterion = IBOTPatchLoss(output_dim=11)
    assert list(criterion.state_dict()) == ["center.center"]  # a persistent buffer of the Center module
    assert criterion.center.value.shape == (1, 11) and not criterion.center.value.any()
    assert (criterion.teacher_temp, criterion.student_temp, criterion.center.momentum) == (0.04, 0.1, 0.9)
    assert isinstance(criterion.center, fastssl.Center)
    assert isinstance(IBOTPlusPlusPatchLoss(output_dim=11), IBOTPatchLoss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_batch_of_one_and_one_class(backend):
    teacher, student, mask = ibot_inputs(batch=1, height=1, width=1)
    loss = fn.ibot_patch(teacher, student, torch.zeros(K), mask, backend=backend)
    expected = lightly_ibot64(teacher, student, mask, torch.zeros(K), 0.04, 0.1)
    target_error, targets = teacher_softmax_error(teacher, torch.zeros(K), 0.04, torch.float32)
    assert_within(loss, expected, weighted_ce_bounds(targets, student, ibot_row_weights64(mask), 0.1,
                                                     target_error)[0], "loss")
    one_class = fn.ibot_patch(teacher[:, :1], student[:, :1], torch.zeros(1), mask, backend=backend)
    assert one_class.item() == 0.0  # a softmax over one class is 1: −log 1 = 0
    assert torch.autograd.grad(one_class, student)[0].abs().sum() == 0


# ============================================================================================
# IBOTPlusPlusPatchLoss
# ============================================================================================
def plus_plus_inputs(batch=3, tokens=20, dtype=torch.float32, seed=1, features=None):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, 4, tokens // 4, generator=g) < 0.3
    mask[1] = True  # an image without visible tokens: the clamp to 1 counts
    teacher = torch.randn(batch, tokens, K, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    student = torch.randn(batch, tokens, features or K, generator=g, dtype=torch.float64).to(dtype)
    return teacher, student.requires_grad_(True), mask


def plus_plus_row_weights64(mask, visible_loss_weight):
    m = mask.flatten(1).double()
    batch = m.shape[0]
    masked = 1.0 / (m.sum(1, keepdim=True).clamp(min=1) * batch)
    visible = visible_loss_weight / ((1 - m).sum(1, keepdim=True).clamp(min=1) * batch)
    return torch.where(mask.flatten(1), masked, visible).reshape(-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["BNK-BHW", "BN,K-BN", "BNK-none"])
@pytest.mark.parametrize("visible_loss_weight", [1.0, 0.0, 0.3])
def test_ibot_plus_plus_equals_lightly(visible_loss_weight, layout, backend):
    teacher, student, mask = plus_plus_inputs()
    center = torch.randn(K) * 0.3
    criterion = IBOTPlusPlusPatchLoss(output_dim=K, teacher_temp=0.06, student_temp=0.15, backend=backend)
    criterion.center.center = center.reshape(1, K).clone()
    if layout == "BNK-BHW":
        args = (teacher, student, mask)
    elif layout == "BN,K-BN":
        args = (teacher.flatten(0, 1), student.flatten(0, 1), mask.flatten(1))
    else:
        args = (teacher, student, None)
    loss = criterion(*args, visible_loss_weight=visible_loss_weight)
    used_mask = None if layout == "BNK-none" else mask
    teacher64, student64 = as_leaves64([teacher, student])
    expected = lightly_ibot_plus_plus64(teacher64, student64, used_mask, center, 0.06, 0.15, visible_loss_weight)
    grads = torch.autograd.grad(loss, (teacher, student))
    exact_grads = torch.autograd.grad(expected, (teacher64, student64))
    weights = (plus_plus_row_weights64(mask, visible_loss_weight) if used_mask is not None
               else torch.full((teacher.shape[0] * teacher.shape[1],), 1.0 / (teacher.shape[0] * teacher.shape[1]),
                               dtype=torch.float64))
    target_error, targets = teacher_softmax_error(teacher64.flatten(0, 1), center, 0.06, torch.float32)
    loss_bound, student_bound = weighted_ce_bounds(targets, student64.flatten(0, 1), weights, 0.15, target_error)
    assert_within(loss, expected, loss_bound, "loss")
    assert_within(grads[1], exact_grads[1], student_bound.view_as(student), "student gradient")
    torch.testing.assert_close(grads[0].double(), exact_grads[0], rtol=1e-4,
                               atol=teacher_grad_atol(student64, weights, 0.06, 0.15))
    # the center: every teacher row, whatever the weights
    rows = teacher64.detach().flatten(0, 1)
    u = U32
    bound = 3 * u * (0.9 * center.abs() + 0.1 * rows.mean(0).abs()) + 0.1 * gamma(rows.shape[0], u) * rows.abs().mean(0)
    assert_within(criterion.center.value, (0.9 * center + 0.1 * rows.mean(0))[None], bound[None], "center")


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_plus_plus_fused_and_gradcheck(backend):
    teacher, features, mask = plus_plus_inputs(batch=2, tokens=4, dtype=torch.float64, features=3)
    weight = torch.randn(K, 3, dtype=torch.float64, requires_grad=True)
    center = torch.randn(K, dtype=torch.float64)
    for vlw in (0.5, 0.0):
        loss = fn.ibot_plus_plus_patch(teacher, features, center, mask, 0.3, 0.2, vlw, last_layer_weight=weight,
                                       backend=backend)
        expected = lightly_ibot_plus_plus64(teacher, features @ weight.T, mask, center, 0.3, 0.2, vlw)
        torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
        leaves = (teacher, features, weight)
        for got, want in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(
            lambda t, f, w: fn.ibot_plus_plus_patch(t, f, center, mask, 0.3, 0.2, vlw, last_layer_weight=w,
                                                    backend=backend), leaves)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_plus_plus_without_masked_tokens_and_masked_only(backend):
    teacher, student, mask = plus_plus_inputs()
    loss = fn.ibot_plus_plus_patch(teacher, student, torch.zeros(K), torch.zeros_like(mask), visible_loss_weight=0.0,
                                   backend=backend)
    assert loss.item() == 0.0 and loss.dtype == torch.float32  # lightly: every image's term is 0 / 1
    assert torch.autograd.grad(loss, student)[0].abs().sum() == 0
    # visible_loss_weight = 0 on full patch outputs is iBOT on the masked rows
    masked = fn.ibot_plus_plus_patch(teacher, student, torch.zeros(K), mask, visible_loss_weight=0.0,
                                     backend=backend)
    ibot = fn.ibot_patch(teacher[mask.flatten(1)], student[mask.flatten(1)], torch.zeros(K), mask, backend=backend)
    torch.testing.assert_close(masked, ibot, rtol=0, atol=0)  # the same rows, weights and core call


# ============================================================================================
# DINOv2's Sinkhorn-Knopp teacher (DINO and iBOT)
# ============================================================================================
def sinkhorn_targets_error(scores, teacher_temp, dtype=torch.float32):
    """The codes' relative error (a log error): sinkhorn_rel_error of 3 iterations."""
    span = sinkhorn_log_span(scores, teacher_temp)
    return sinkhorn_rel_error(3, span, *scores.shape, unit_roundoff(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_dino_sinkhorn_knopp_teacher_equals_dinov2(dtype, backend):
    torch.manual_seed(4)
    teacher = [torch.randn(5, K, dtype=dtype) * 0.3 for _ in range(2)]
    student = [torch.randn(5, K, dtype=dtype, requires_grad=True) for _ in range(3)]
    criterion = DINOLoss(output_dim=K, teacher_temp=0.07, center_mode="sinkhorn_knopp", backend=backend).to(dtype)
    loss = criterion(teacher, student)
    stacked = torch.cat(teacher).double()
    codes = dinov2_sinkhorn_teacher64(stacked, 0.07).view(2, 5, K)
    student64 = as_leaves64(student)
    log_p = F.log_softmax(torch.stack(student64) / 0.1, dim=-1)
    pairs = -torch.einsum("tbk,sbk->ts", codes, log_p) / 5
    off_diagonal = 1 - torch.eye(2, 3, dtype=torch.float64)
    expected = (pairs * off_diagonal).sum() / off_diagonal.sum()
    expected.backward()
    weights = off_diagonal / off_diagonal.sum()
    loss_bounds, _, grad_bounds = soft_ce_pairs_bounds(codes, torch.stack(student64), 10.0, weights,
                                                       target_error=sinkhorn_targets_error(stacked, 0.07, dtype),
                                                       dtype=dtype)
    assert_within(loss, expected, (weights * loss_bounds).sum().item() + gamma(6, unit_roundoff(dtype))
                  * expected.abs().item(), "loss")
    loss.backward()
    for i, (x, x64) in enumerate(zip(student, student64)):
        assert_within(x.grad, x64.grad, grad_bounds[i], f"grad of s{i}")
    assert not criterion.center.any() and list(criterion.state_dict()) == ["center"]  # kept, never updated
    # the functional form: center unused (None), the same numbers
    functional = fn.dino(teacher, student, None, 0.07, center_mode="sinkhorn_knopp", backend=backend)
    torch.testing.assert_close(functional, loss.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ibot_sinkhorn_knopp_teacher_equals_dinov2(backend):
    teacher, student, mask = ibot_inputs()
    teacher = (teacher.detach() * 0.3).requires_grad_(True)
    criterion = IBOTPatchLoss(output_dim=K, teacher_temp=0.07, center_mode="sinkhorn_knopp", backend=backend)
    loss = criterion(teacher, student, mask)
    codes = dinov2_sinkhorn_teacher64(teacher.detach(), 0.07)
    student64 = student.detach().double().requires_grad_(True)
    expected = ibot_from_targets64(codes, student64, mask, 0.1)
    expected.backward()
    loss_bound, student_bound = weighted_ce_bounds(codes, student64, ibot_row_weights64(mask), 0.1,
                                                   sinkhorn_targets_error(teacher.detach(), 0.07))
    assert_within(loss, expected, loss_bound, "loss")
    loss.backward()
    assert_within(student.grad, student64.grad, student_bound, "student gradient")
    assert teacher.grad is None  # DINOv2's teacher codes carry no gradient
    assert not criterion.center.value.any()
    # iBOT++ over all rows: Sinkhorn over every token
    full_t, full_s, full_mask = plus_plus_inputs()
    got = fn.ibot_plus_plus_patch(full_t * 0.3, full_s, None, full_mask, 0.07, 0.1, 0.5,
                                  center_mode="sinkhorn_knopp", backend=backend)
    all_codes = dinov2_sinkhorn_teacher64((full_t * 0.3).detach().flatten(0, 1), 0.07)
    want = lightly_ibot_plus_plus64(full_t, full_s, full_mask, None, 0.07, 0.1, 0.5, targets=all_codes)
    bound, _ = weighted_ce_bounds(all_codes, full_s.flatten(0, 1), plus_plus_row_weights64(full_mask, 0.5), 0.1,
                                  sinkhorn_targets_error((full_t * 0.3).flatten(0, 1), 0.07))
    assert_within(got, want, bound, "iBOT++ loss")


def test_dino_mean_mode_unchanged_by_the_sinkhorn_option():
    teacher = [torch.randn(4, K) for _ in range(2)]
    student = [torch.randn(4, K) for _ in range(2)]
    center = torch.randn(K)
    default = fn.dino(teacher, student, center, 0.05)
    torch.testing.assert_close(fn.dino(teacher, student, center, 0.05, center_mode="mean"), default, rtol=0, atol=0)
    expected = lightly_dino64(teacher, student, center, 0.05, 0.1)
    torch.testing.assert_close(default.double(), expected, rtol=1e-5, atol=0)


# ============================================================================================
# Bad inputs
# ============================================================================================
def _rows(n=6, dim=K):
    return torch.randn(n, dim)


def _mask(count=6):
    mask = torch.zeros(2, 3, 4, dtype=torch.bool)
    mask.view(-1)[:count] = True
    return mask


IBOT_BAD = [
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(), torch.zeros(K), _mask(5)), ValueError,
                 r"mask must have one True entry per row of teacher_out \(6\), got 5", id="mask-count"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(5), torch.zeros(K), _mask()), ValueError,
                 r"teacher_out \(6, 37\).*student_out \(5, 37\)", id="rows-differ"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(dim=36), torch.zeros(K), _mask()), ValueError,
                 r"\(6, 37\).*\(6, 36\)", id="classes-differ"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(), torch.zeros(K), _mask().float()), ValueError,
                 "mask must be a boolean", id="mask-float"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(), torch.zeros(K), _mask()[0, 0]), ValueError,
                 r"mask must be a boolean \(B, H, W\).*\(4,\)", id="mask-1d"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(), torch.zeros(36), _mask()), ValueError,
                 r"center.*\(36,\)", id="center-wrong-K"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(), torch.zeros(K), _mask(), teacher_temp=0.0), ValueError,
                 "teacher_temp", id="teacher-temp-zero"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(), torch.zeros(K), _mask(), student_temp=-1.0), ValueError,
                 "student_temp", id="student-temp-negative"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(dim=9), torch.zeros(K), _mask(),
                                       last_layer_weight=torch.randn(36, 9)), ValueError,
                 r"last_layer_weight must have one row per output dim \(37\).*\(36, 9\)", id="weight-wrong-K"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(dim=9), torch.zeros(K), _mask(),
                                       last_layer_weight=torch.randn(K, 8)), ValueError,
                 r"last_layer_weight must be \(K, 9\).*\(37, 8\)", id="weight-wrong-D"),
    pytest.param(lambda: fn.ibot_patch(_rows(), _rows(), None, _mask()), TypeError, "center", id="center-none"),
    pytest.param(lambda: IBOTPatchLoss(output_dim=K, center_mode="median"), ValueError,
                 r"Unknown mode 'median'. Valid modes are \['mean', 'sinkhorn_knopp'\]", id="center-mode"),
    pytest.param(lambda: IBOTPatchLoss(output_dim=36)(_rows(), _rows(), _mask()), ValueError, "center",
                 id="module-output-dim-mismatch"),
    pytest.param(lambda: DINOLoss(output_dim=K, center_mode="median"), ValueError,
                 r"Valid modes are \['mean', 'sinkhorn_knopp'\]", id="dino-center-mode"),
    pytest.param(lambda: fn.dino([_rows()] * 2, [_rows()] * 2, None, center_mode="sinkhorn"), ValueError,
                 "Unknown mode 'sinkhorn'", id="dino-functional-center-mode"),
    # iBOT++: lightly's messages
    pytest.param(lambda: IBOTPlusPlusPatchLoss(K)(torch.randn(2, 3, K), torch.randn(2, 4, K)), ValueError,
                 r"must have the same shape but got \(2, 3, 37\) and \(2, 4, 37\)", id="pp-shapes"),
    pytest.param(lambda: IBOTPlusPlusPatchLoss(K)(torch.randn(1, 2, 3, K), torch.randn(1, 2, 3, K)), ValueError,
                 "must be rank 2 or 3 but got rank 4", id="pp-rank"),
    pytest.param(lambda: IBOTPlusPlusPatchLoss(K)(_rows(), _rows()), ValueError, "mask is required", id="pp-no-mask"),
    pytest.param(lambda: IBOTPlusPlusPatchLoss(K)(_rows(7), _rows(7), _mask()), ValueError,
                 "length 7 is not divisible by batch size 2", id="pp-not-divisible"),
    pytest.param(lambda: IBOTPlusPlusPatchLoss(K)(torch.randn(2, 6, K), torch.randn(2, 6, K), _mask()), ValueError,
                 r"mask of shape \(2, 3, 4\) does not match 2 images of 6 tokens", id="pp-mask-shape"),
    pytest.param(lambda: IBOTPlusPlusPatchLoss(K)(torch.randn(2, 12, K), torch.randn(2, 12, K), _mask(),
                                                  visible_loss_weight=math.inf), ValueError, "visible_loss_weight",
                 id="pp-visible-weight-inf"),
]


@pytest.mark.parametrize("call,error,match", IBOT_BAD)
def test_ibot_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()
