"""DINOv3's Gram anchoring (``GramLoss``) on every backend against its formula in float64, within a
bound derived from the computation; tiles, modes, errors."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.functional as fn
from fastssl.runtime import blocks
from fastssl.runtime.validation import InputError

from helpers import (HALF_DTYPES, _normalization_grad_abs, assert_within, backend_params, gamma,
                     half_error_within_twice_reference, normalized_entry_error, unit_roundoff)
from oracles import dinov3_gram64

BACKENDS = backend_params("gram_anchoring")
MODES = [pytest.param(True, False, id="remove_neg"), pytest.param(False, True, id="remove_only_teacher_neg"),
         pytest.param(False, False, id="keep_neg")]


def features(b, n, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    student = teacher + 0.7 * torch.randn(b, n, d, generator=g, dtype=torch.float64)
    return student.to(dtype).requires_grad_(True), teacher.to(dtype)


def gram_bounds(student, teacher, img_level, remove_neg, remove_only_teacher_neg, u):
    """(|δL|, |δ∂L/∂student| entrywise) from float32 unit rows (each entry off by e relative,
    ``normalized_entry_error``): every Gram entry, a D-term dot of unit rows, is off by
    δ = γ_D + 2e, so R = f(S) − f(T) by 2δ (the clamps are 1-Lipschitz); L = mean R² by
    (1/M)Σ(4|R|δ + 4δ²) + γ_{M+1}L (the M-term sum, the scaling). The unit-row gradient
    (4/M)Σ_j W_ij ŝ_j (W = R where the student entry is kept) is off by (4/M)Σ_j (2δ|ŝ_j| + (e +
    γ_{N+2})|W_ij||ŝ_j|) (the entries, the N-term sum over tiles, the scaling), then through the
    normalisation's Jacobian (its own D + 4 roundings and 2e). The test inputs keep every |S_ij|
    (and |T_ij|) above δ, so no mask flips between float32 and float64 (asserted)."""
    s, t = F.normalize(student.detach().double(), dim=-1), F.normalize(teacher.detach().double(), dim=-1)
    norms = student.detach().double().norm(dim=-1, keepdim=True)
    if not img_level:
        s, t, norms = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1]), norms.reshape(1, -1, 1)
    groups, n, d = s.shape
    e = normalized_entry_error(d, u)
    delta = gamma(d, u) + 2 * e
    student_sim, teacher_sim = s @ s.mT, t @ t.mT
    assert student_sim.abs().min() > delta and teacher_sim.abs().min() > delta
    if remove_neg:
        residual, kept = student_sim.clamp_min(0) - teacher_sim.clamp_min(0), student_sim >= 0
    elif remove_only_teacher_neg:
        kept = (student_sim >= 0) | (teacher_sim >= 0)
        residual = torch.where(kept, student_sim, 0.0) - teacher_sim.clamp_min(0)
    else:
        residual, kept = student_sim - teacher_sim, torch.ones_like(student_sim, dtype=torch.bool)
    m = groups * n * n
    loss = (residual.square().sum() / m).item()
    loss_bound = (4 * residual.abs() * delta + 4 * delta ** 2).sum().item() / m + gamma(m + 1, u) * loss
    weight = (residual * kept).abs()
    unit_grad = 4 / m * (weight @ s.abs())
    unit_bound = 4 / m * (2 * delta * s.abs().sum(dim=1, keepdim=True) + (e + gamma(n + 2, u)) * (weight @ s.abs()))
    grad_bound = (_normalization_grad_abs(s, norms, unit_bound)
                  + ((d + 4) * u + 2 * e) * _normalization_grad_abs(s, norms, unit_grad))
    return loss_bound, grad_bound.reshape(student.shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("remove_neg,remove_only_teacher_neg", MODES)
@pytest.mark.parametrize("img_level", [True, False], ids=["img_level", "batch_level"])
@pytest.mark.parametrize("tiles", ["one-tile", "ragged-tiles"])
def test_gram_anchoring_equals_dinov3_formula(backend, remove_neg, remove_only_teacher_neg, img_level, tiles,
                                              monkeypatch):
    if tiles == "ragged-tiles":  # 3 × 3 tiles of 7 (or 21) tokens: ragged row and column tails
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 9)
    student, teacher = features(3, 7, 5)
    loss = fn.gram_anchoring_loss(student, teacher, True, img_level, remove_neg, remove_only_teacher_neg,
                                  backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (grad,) = torch.autograd.grad(loss, student)
    student64 = student.detach().double().requires_grad_(True)
    exact = dinov3_gram64(student64, teacher, True, img_level, remove_neg, remove_only_teacher_neg)
    (exact_grad,) = torch.autograd.grad(exact, student64)
    loss_bound, grad_bound = gram_bounds(student, teacher, img_level, remove_neg, remove_only_teacher_neg,
                                         unit_roundoff(torch.float32))
    assert_within(loss, exact, loss_bound, "loss")
    assert_within(grad, exact_grad, grad_bound, "gradient")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("remove_neg,remove_only_teacher_neg", MODES)
def test_gram_anchoring_float64_gradcheck_and_no_norm(backend, remove_neg, remove_only_teacher_neg, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 4)  # 2 × 2 tiles, several groups: every loop runs
    student, teacher = features(2, 5, 3, dtype=torch.float64)
    for apply_norm in (True, False):
        torch.testing.assert_close(
            fn.gram_anchoring_loss(student, teacher, apply_norm, True, remove_neg, remove_only_teacher_neg,
                                   backend=backend),
            dinov3_gram64(student, teacher, apply_norm, True, remove_neg, remove_only_teacher_neg),
            rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda x: fn.gram_anchoring_loss(
        x, teacher, True, False, remove_neg, remove_only_teacher_neg, backend=backend), (student,))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_gram_anchoring_half_within_twice_the_formulas_own_half_error(dtype):
    student, teacher = features(2, 9, 16, dtype=dtype)
    exact = dinov3_gram64(student, teacher)
    s, t = F.normalize(student.detach(), dim=-1), F.normalize(teacher, dim=-1)  # the formula in the half dtype
    half_reference = F.mse_loss((s @ s.mT).clamp_min(0), (t @ t.mT).clamp_min(0))
    half_error_within_twice_reference(fn.gram_anchoring_loss(student, teacher, backend="torch"), half_reference, exact)


def test_gram_anchoring_teacher_takes_no_gradient_and_module_defaults():
    student, teacher = features(2, 6, 4)
    teacher.requires_grad_(True)
    loss = fastssl.GramAnchoringLoss()(student, teacher)
    loss.backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    criterion = fastssl.GramAnchoringLoss(img_level=False)
    assert (criterion.apply_norm, criterion.remove_neg, criterion.remove_only_teacher_neg) == (True, True, False)
    assert criterion.state_dict() == {}
    assert torch.equal(criterion(student, teacher), fn.gram_anchoring_loss(student, teacher, img_level=False))
    assert torch.equal(criterion(student, teacher, img_level=True), fn.gram_anchoring_loss(student, teacher))
    flat = fn.gram_anchoring_loss(student.reshape(12, 4), teacher.reshape(12, 4), img_level=False)
    torch.testing.assert_close(flat, fn.gram_anchoring_loss(student, teacher, img_level=False), rtol=0, atol=0)


def test_gram_anchoring_bad_input_names_the_argument():
    student, teacher = features(2, 6, 4)
    with pytest.raises(InputError, match="remove_neg and remove_only_teacher_neg cannot both be True"):
        fastssl.GramAnchoringLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(InputError, match=r"output_feats must have shape \(B, N, D\), got \(12, 4\)"):
        fn.gram_anchoring_loss(student.reshape(12, 4), teacher)
    with pytest.raises(ValueError, match="output_feats and target_feats must have the same shape"):
        fn.gram_anchoring_loss(student, teacher[:, :5])
