"""DINO (lightly's ``DINOLoss``) against independent float64 formulas of lightly 1.6, on every CPU backend."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl.functional as fn
from fastssl import DINOLoss

from helpers import (BACKENDS, BACKENDS_ON_CPU, FLOAT_DTYPES, HALF_DTYPES, U32, as_leaves64, assert_within,
                     center_error, gamma, half_error_within_twice_reference, soft_ce_pairs_bounds, unit_roundoff)
from oracles import lightly_center64, lightly_dino64, lightly_teacher_temp


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
