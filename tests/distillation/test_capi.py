"""CAPI (lightly's ``CAPILoss``) against lightly 1.6's formula in float64, on every CPU backend of its
cross-entropy op."""
import pytest
import torch

import fastssl
import fastssl.functional as fn

from helpers import BACKENDS_ON_CPU, HALF_DTYPES, assert_within, half_error_within_twice_reference, \
    soft_ce_pairs_bounds, unit_roundoff
from oracles import lightly_capi, lightly_capi_sinkhorn


def sinkhorn_error(logits, temperature, iterations, u):
    """Relative error bound of every float32 assignment against float64 on the same inputs: the
    exponent z − m (z = logits/τ rounded, m its batch max) is off by ≤ u(|z| + |m| + |z − m|) and
    exp adds 2u; a division by an n-term total (+ epsilon) at most doubles the worst relative error
    (the total's is at most its terms' worst) and adds (n + 2)u (the sum, the epsilon, the division);
    each iteration divides by batch totals (n = B) then by cluster totals (n = K)."""
    z = logits.double() / temperature
    shift = z.amax(dim=0, keepdim=True)
    error = ((z.abs() + shift.abs() + (z - shift).abs()).max().item() + 2) * u
    batch, _, clusters = z.shape
    for _ in range(iterations):
        error = 2 * (2 * error + (batch + 2) * u) + (clusters + 2) * u
    return error


def capi_bounds(teacher, student, index, teacher_temperature, student_temperature, iterations, dtype=torch.float32):
    """(loss bound, student-gradient bound): the assignments' relative error, then the soft
    cross-entropy's bounds over the B·P predicted tokens."""
    u = unit_roundoff(dtype)
    targets = lightly_capi_sinkhorn(teacher.double() / teacher_temperature, iterations)
    if index is not None:
        targets = torch.gather(targets, 1, index[:, :, None].expand(-1, -1, targets.shape[-1]))
    clusters = student.shape[-1]
    loss, _, grads = soft_ce_pairs_bounds(targets.reshape(1, -1, clusters), student.detach().double().reshape(1, -1, clusters),
                                          1 / student_temperature, torch.ones(1, 1, dtype=torch.float64),
                                          target_error=sinkhorn_error(teacher, teacher_temperature, iterations, u),
                                          dtype=dtype)
    return loss.item(), grads.reshape(student.shape)


def capi_inputs(batch=5, tokens=7, predicted=3, clusters=11, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = torch.randn(batch, tokens, clusters, generator=g).to(dtype)
    student = torch.randn(batch, predicted, clusters, generator=g).to(dtype).requires_grad_(True)
    index = torch.stack([torch.randperm(tokens, generator=g)[:predicted] for _ in range(batch)])
    return teacher, student, index


CASES = [pytest.param(0.06, 0.12, 3, id="lightly-defaults"), pytest.param(0.1, 0.2, 1, id="one-iteration"),
         pytest.param(0.5, 0.07, 0, id="no-iteration"), pytest.param(0.06, 0.12, 10, id="ten-iterations")]


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("teacher_temperature,student_temperature,iterations", CASES)
@pytest.mark.parametrize("indexed", [True, False], ids=["teacher_index", "aligned"])
def test_capi_equals_lightlys_formula_in_float64(teacher_temperature, student_temperature, iterations, indexed,
                                                 backend):
    teacher, student, index = capi_inputs(predicted=3 if indexed else 7)
    index = index if indexed else None
    loss = fn.capi(teacher, student, index, teacher_temperature, student_temperature, iterations, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    (grad,) = torch.autograd.grad(loss, student)
    student64 = student.detach().double().requires_grad_(True)
    exact = lightly_capi(teacher, student64, index, teacher_temperature, student_temperature, iterations)
    (exact_grad,) = torch.autograd.grad(exact, student64)
    loss_bound, grad_bound = capi_bounds(teacher, student, index, teacher_temperature, student_temperature, iterations)
    assert_within(loss, exact, loss_bound, "loss")
    assert_within(grad, exact_grad, grad_bound, "gradient")


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_capi_float64_and_gradcheck(backend):
    teacher, student, index = capi_inputs(batch=3, tokens=4, predicted=2, clusters=5, dtype=torch.float64)
    exact = lightly_capi(teacher, student, index)
    torch.testing.assert_close(fn.capi(teacher, student, index, backend=backend), exact, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda s: fn.capi(teacher, s, index, backend=backend), (student,))


def test_capi_sinkhorn_is_lightlys_and_leaves_its_input():
    teacher, _, _ = capi_inputs(dtype=torch.float64)
    logits = teacher / 0.06
    before = logits.clone()
    for iterations in (0, 1, 3):
        torch.testing.assert_close(fn.capi_sinkhorn_knopp(logits, iterations), lightly_capi_sinkhorn(logits, iterations),
                                   rtol=1e-13, atol=1e-300)
    assert torch.equal(logits, before)
    # each position balanced: every token a distribution, every cluster's batch total the same
    assignments = fn.capi_sinkhorn_knopp(logits, 50)
    torch.testing.assert_close(assignments.sum(dim=2), torch.ones(5, 7, dtype=torch.float64), rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_capi_half_within_twice_lightlys_own_half_error(dtype):
    teacher, student, index = capi_inputs(dtype=dtype)
    exact = lightly_capi(teacher, student, index)
    ours = fn.capi(teacher, student, index, backend="torch")
    half_reference = lightly_capi(teacher, student, index, dtype=dtype)
    half_error_within_twice_reference(ours, half_reference, exact)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_capi_degenerate_batch_of_one_and_one_cluster(backend):
    teacher, student, index = capi_inputs(batch=1, dtype=torch.float64)
    torch.testing.assert_close(fn.capi(teacher, student, index, backend=backend), lightly_capi(teacher, student, index),
                               rtol=1e-12, atol=1e-12)
    teacher, student, index = capi_inputs(clusters=1)
    loss = fn.capi(teacher, student, index, backend=backend)
    assert loss.item() == 0.0  # a softmax over one cluster is 1, as lightly's −log 1


def test_capi_module_is_lightlys():
    criterion = fastssl.CAPILoss()
    assert (criterion.teacher_temperature, criterion.student_temperature, criterion.sinkhorn_iterations,
            criterion.gather_distributed) == (0.06, 0.12, 3, False)
    assert criterion.state_dict() == {} and list(criterion.buffers()) == []  # lightly's holds no state
    teacher, student, index = capi_inputs()
    assert torch.equal(criterion(teacher, student, index), fn.capi(teacher, student, index))
    assert fastssl.losses.CAPILoss is fastssl.CAPILoss and fastssl.capi is fn.capi


def test_capi_gather_without_torch_distributed_raises_lightlys_error(monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_available", lambda: False)
    with pytest.raises(ValueError, match="gather_distributed is True but torch.distributed is not available. Please "
                                         "set gather_distributed=False or use a distributed-enabled installation"):
        fastssl.CAPILoss(gather_distributed=True)


def test_capi_bad_input_names_the_argument():
    teacher, student, index = capi_inputs()
    with pytest.raises(ValueError, match=r"teacher_logits must have 3 dimensions, got shape \(5, 11\)"):
        fn.capi(teacher[:, 0], student, index)
    with pytest.raises(ValueError, match=r"student_logits must have the shape of teacher_logits \(5, 7, 11\)"):
        fn.capi(teacher, student)
    with pytest.raises(ValueError, match=r"student_logits must be \(5, P, 11\)"):
        fn.capi(teacher, student[:, :, :4], index)
    with pytest.raises(TypeError, match="teacher_index must be an int64 tensor, got torch.int32"):
        fn.capi(teacher, student, index.int())
    with pytest.raises(ValueError, match=r"teacher_index must have shape \(5, 3\)"):
        fn.capi(teacher, student, index[:, :2])
    with pytest.raises(ValueError, match=r"teacher_index must lie in \[0, 7\)"):
        fn.capi(teacher, student, index + 7)
    with pytest.raises(ValueError, match="student_temperature must be a finite number > 0, got 0"):
        fastssl.CAPILoss(student_temperature=0)
    with pytest.raises(ValueError, match="sinkhorn_iterations must be >= 0, got -1"):
        fastssl.CAPILoss(sinkhorn_iterations=-1)
    with pytest.raises(ValueError, match=r"logits must have 3 dimensions, got shape \(5, 7\)"):
        fn.capi_sinkhorn_knopp(teacher[:, :, 0])


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("indexed", [True, False], ids=["teacher_index", "aligned"])
def test_capi_fused_last_layer_equals_f_linear_then_capi_in_float64(indexed, backend):
    """last_layer_weight=W: the student's features through F.linear, then lightly's formula."""
    teacher, _, index = capi_inputs(batch=3, tokens=4, predicted=2 if indexed else 4, clusters=13,
                                    dtype=torch.float64)
    index = index if indexed else None
    g = torch.Generator().manual_seed(3)
    features = torch.randn(3, 2 if indexed else 4, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    weight = torch.randn(13, 6, generator=g, dtype=torch.float64).requires_grad_(True)
    loss = fastssl.CAPILoss(backend=backend)(teacher, features, index, last_layer_weight=weight)
    exact = lightly_capi(teacher, torch.nn.functional.linear(features, weight), index)
    torch.testing.assert_close(loss, exact, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(loss, (features, weight)), torch.autograd.grad(exact, (features, weight))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda f, w: fn.capi(teacher, f, index, last_layer_weight=w, backend=backend),
                                    (features, weight))


def test_capi_last_layer_bad_input_names_the_argument():
    teacher, _, index = capi_inputs()
    features = torch.randn(5, 3, 4)
    with pytest.raises(ValueError, match=r"last_layer_weight must have one row per cluster \(11\), got \(10, 4\)"):
        fn.capi(teacher, features, index, last_layer_weight=torch.randn(10, 4))
    with pytest.raises(ValueError, match=r"last_layer_weight must be \(K, 4\)"):
        fn.capi(teacher, features, index, last_layer_weight=torch.randn(11, 5))
