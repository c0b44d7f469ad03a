"""BYOL / SimSiam pieces: NegativeCosineSimilarity, update_momentum and cosine_schedule,
against independent formulas of lightly 1.6's definitions (see shared/design/DEFINITIONS.md)."""
import copy
import math

import pytest
import torch
from torch import nn

import fastssl
import fastssl.functional as fn
from fastssl import NegativeCosineSimilarity, cosine_schedule, update_momentum

from helpers import BACKENDS_ON_CPU, HALF_DTYPES, U32, assert_within, gamma, half_error_within_twice_reference
from oracles import neg_cos_formula
from fastssl.cosine import torch_backend as cosine_torch_backend


def _pair(*shape, dtype=torch.float32, grad=False):
    """Two correlated inputs, so the cosines spread over (−1, 1) rather than sitting near 0."""
    base = torch.randn(*shape, dtype=torch.float64)
    x0 = base + 0.7 * torch.randn(*shape, dtype=torch.float64)
    x1 = 2.0 * base + 1.5 * torch.randn(*shape, dtype=torch.float64)
    return x0.to(dtype).requires_grad_(grad), x1.to(dtype).requires_grad_(grad)


def _grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


@pytest.fixture(autouse=True, params=["plain-when-small", "op-at-every-size"])
def cosine_path(request, monkeypatch):
    """Every test runs twice: as shipped (the torch backend's small calls take the plain code) and
    with the closed-form op at every size, so its values, gradients and errors are tested too."""
    if request.param == "op-at-every-size":
        monkeypatch.setattr(cosine_torch_backend, "PLAIN_MAX_ENTRIES", 0)
    return request.param


def _mean_cosine_error(x0, dim):
    """|δ| of the mean of n cosines of D-entry vectors in float32: each cosine is off by ≤ (2D + 4)u,
    as |x̂0·x̂1| ≤ 1: the D-term dot Du, each norm (a D-term sum of squares, then its square root)
    (D/2 + 1)u, the norms' product and the division u each; the n-term mean adds n·u."""
    d = x0.shape[dim]
    return (2 * d + 4 + x0.numel() // d) * U32


def _assert_close_scaled(actual, expected, rtol):
    """Elementwise |actual − expected| ≤ rtol · max|expected| (gradients have entries near 0)."""
    actual, expected = actual.double(), expected.double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * expected.abs().max().item())


SHAPES_AND_DIMS = [
    pytest.param((7, 37), 1, id="B7-D37-dim1"),
    pytest.param((33, 130), 1, id="B33-D130-dim1"),
    pytest.param((33, 130), -1, id="B33-D130-dim-1"),
    pytest.param((5, 3), 0, id="B5-D3-dim0"),
    pytest.param((4, 6, 5), 2, id="4x6x5-dim2"),
    pytest.param((4, 6, 5), -1, id="4x6x5-dim-1"),
    pytest.param((4, 6, 5), 1, id="4x6x5-dim1"),
    pytest.param((4, 6, 5), 0, id="4x6x5-dim0"),
    pytest.param((4, 6, 5), -3, id="4x6x5-dim-3"),
    pytest.param((2, 3, 4, 5), 2, id="2x3x4x5-dim2"),
    pytest.param((11,), 0, id="1d-dim0"),
]


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("shape,dim", SHAPES_AND_DIMS)
def test_negative_cosine_similarity_fp32_equals_float64_formula(shape, dim, backend):
    x0, x1 = _pair(*shape, grad=True)
    loss = fn.negative_cosine_similarity(x0, x1, dim=dim, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()

    x0_64, x1_64 = (x.detach().double().requires_grad_() for x in (x0, x1))
    expected = neg_cos_formula(x0_64, x1_64, dim)
    # absolute: the mean of cosines of both signs can be small
    assert_within(loss, expected, _mean_cosine_error(x0, dim), "loss")
    for g, e in zip(_grads(loss, x0, x1), _grads(expected, x0_64, x1_64)):
        assert g.dtype == torch.float32 and g.shape == x0.shape
        _assert_close_scaled(g, e, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_negative_cosine_similarity_float64_in_float64_out(backend):
    x0, x1 = _pair(9, 13, dtype=torch.float64)
    loss = fn.negative_cosine_similarity(x0, x1, backend=backend)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, neg_cos_formula(x0, x1), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("eps", [pytest.param(0.5, id="eps0.5"), pytest.param(2.0, id="eps2")])
def test_negative_cosine_similarity_eps_clamps_each_norm(eps, backend):
    """Small vectors (norms below eps): each norm is clamped on its own (not their product)."""
    x0, x1 = _pair(8, 5, dtype=torch.float64)
    x0 = x0 * 0.05                                   # ‖x0‖ < eps, ‖x1‖ > eps for most rows
    loss = fn.negative_cosine_similarity(x0, x1, eps=eps, backend=backend)
    expected = neg_cos_formula(x0, x1, eps=eps)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-15)
    # and the clamp changes the answer (otherwise this test would not look at eps at all)
    assert not torch.isclose(loss, neg_cos_formula(x0, x1, eps=1e-8), rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_negative_cosine_similarity_zero_vectors_are_finite(backend):
    x0, x1 = _pair(6, 5)
    x0[1] = 0.0          # zero in one input
    x0[3] = 0.0
    x1[3] = 0.0          # zero in both
    x1[4] = 0.0          # zero in the other
    x0.requires_grad_()
    x1.requires_grad_()
    loss = fn.negative_cosine_similarity(x0, x1, backend=backend)
    assert torch.isfinite(loss)
    x0_64, x1_64 = (x.detach().double().requires_grad_() for x in (x0, x1))
    expected = neg_cos_formula(x0_64, x1_64)
    assert_within(loss, expected, _mean_cosine_error(x0, 1), "loss")
    for g, e in zip(_grads(loss, x0, x1), _grads(expected, x0_64, x1_64)):
        assert torch.isfinite(g).all()
        _assert_close_scaled(g, e, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_negative_cosine_similarity_all_zero_is_zero(backend):
    z = torch.zeros(3, 4)
    loss = fn.negative_cosine_similarity(z, z, backend=backend)
    assert loss.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
def test_negative_cosine_similarity_invariants(backend):
    """Symmetric; invariant to positive per-vector scaling; −1 for parallel, +1 for opposite,
    0 for orthogonal vectors."""
    x0, x1 = _pair(9, 7, dtype=torch.float64)
    loss = fn.negative_cosine_similarity(x0, x1, backend=backend)
    torch.testing.assert_close(fn.negative_cosine_similarity(x1, x0, backend=backend), loss, rtol=1e-12, atol=1e-15)
    scales = torch.rand(9, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(fn.negative_cosine_similarity(x0 * scales, x1, backend=backend), loss,
                               rtol=1e-12, atol=1e-15)
    one = torch.tensor(1.0, dtype=torch.float64)
    torch.testing.assert_close(fn.negative_cosine_similarity(x0, 3 * x0, backend=backend), -one)
    torch.testing.assert_close(fn.negative_cosine_similarity(x0, -0.5 * x0, backend=backend), one)
    e = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(fn.negative_cosine_similarity(e, e.roll(1, dims=1), backend=backend), 0 * one)


@pytest.mark.parametrize("shape,dim", [pytest.param((9, 11), 1, id="B9-D11-dim1"),
                                       pytest.param((4, 6, 5), 2, id="4x6x5-dim2"),
                                       pytest.param((4, 6, 5), 0, id="4x6x5-dim0")])
def test_negative_cosine_similarity_reference_equals_torch_backend(shape, dim, monkeypatch):
    """The torch backend's value (its own norms and row dots) and its closed-form gradient
    (torch_backend's docstring) against float64, and the value against the reference's."""
    monkeypatch.setattr(cosine_torch_backend, "PLAIN_MAX_ENTRIES", 0)  # the op, not the plain code
    x0, x1 = _pair(*shape, grad=True)
    ref = fn.negative_cosine_similarity(x0, x1, dim, backend="reference")
    fast = fn.negative_cosine_similarity(x0, x1, dim, backend="torch")
    x0_64, x1_64 = (x.detach().double().requires_grad_() for x in (x0, x1))
    exact_loss = neg_cos_formula(x0_64, x1_64, dim)
    bound = _mean_cosine_error(x0, dim)
    assert_within(fast, exact_loss, bound, "loss")
    assert_within(fast, ref.double(), 2 * bound, "loss against the reference")
    exact = _grads(exact_loss, x0_64, x1_64)
    # ∂cos/∂u = v/(m_u m_v) − cos·u/(m_u‖u‖) per row, each factor from D-term sums (norms, dot:
    # γ_D relative) and a few roundings: |Δ| ≤ 2γ_{D+4}·(|v|/(m_u m_v) + |u|/(m_u‖u‖)), / N rows.
    rows = x0.numel() // x0.shape[dim]
    for grad, (u, v), e in zip(_grads(fast, x0, x1), ((x0_64, x1_64), (x1_64, x0_64)), exact):
        norm_u, norm_v = (t.detach().norm(dim=dim, keepdim=True) for t in (u, v))
        scale = 1 / (norm_u.clamp_min(1e-8) * norm_v.clamp_min(1e-8))
        bound = 2 * gamma(x0.shape[dim] + 4) * (v.detach().abs() * scale + u.detach().abs() / norm_u.pow(2)) / rows
        assert_within(grad, e, bound, "gradient")


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("shape,dim", [pytest.param((10, 21), 1, id="B10-D21-dim1"),
                                       pytest.param((4, 6, 5), 0, id="4x6x5-dim0")])
def test_negative_cosine_similarity_module_equals_functional(shape, dim, backend):
    x0, x1 = _pair(*shape)
    module = NegativeCosineSimilarity(dim=dim, eps=1e-3, backend=backend)
    torch.testing.assert_close(module(x0, x1), fn.negative_cosine_similarity(x0, x1, dim, 1e-3, backend=backend),
                               rtol=0.0, atol=0.0)


def test_negative_cosine_similarity_module_defaults_are_lightlys():
    module = NegativeCosineSimilarity()
    assert module.dim == 1 and module.eps == 1e-8
    x0, x1 = _pair(4, 6, 5)
    assert_within(module(x0, x1), neg_cos_formula(x0.double(), x1.double(), 1), _mean_cosine_error(x0, 1), "loss")
    # lightly's positional order: (dim, eps); x0 * 0.1 rounds (u per entry: 2u more per cosine)
    assert_within(NegativeCosineSimilarity(2, 0.5)(x0 * 0.1, x1), neg_cos_formula(x0.double() * 0.1, x1.double(), 2, 0.5),
                  _mean_cosine_error(x0, 2) + 2 * U32, "loss")


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("shape,dim", [pytest.param((3, 5), 1, id="B3-D5-dim1"),
                                       pytest.param((2, 3, 4), 0, id="2x3x4-dim0"),
                                       pytest.param((2, 3, 4), -1, id="2x3x4-dim-1")])
def test_negative_cosine_similarity_gradcheck(shape, dim, backend):
    x0, x1 = _pair(*shape, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fn.negative_cosine_similarity(a, b, dim, backend=backend),
                                    (x0, x1))


@pytest.mark.parametrize("backend", BACKENDS_ON_CPU)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("shape,dim", [pytest.param((33, 130), 1, id="B33-D130-dim1"),
                                       pytest.param((4, 6, 5), 0, id="4x6x5-dim0")])
def test_negative_cosine_similarity_half_inputs(shape, dim, dtype, backend):
    x0, x1 = _pair(*shape, dtype=dtype, grad=True)
    loss = fn.negative_cosine_similarity(x0, x1, dim, backend=backend)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    grads = _grads(loss, x0, x1)
    for g in grads:
        assert g.dtype == dtype and torch.isfinite(g).all()

    x0_64, x1_64 = (x.detach().double().requires_grad_() for x in (x0, x1))
    exact = neg_cos_formula(x0_64, x1_64, dim)
    exact_grads = _grads(exact, x0_64, x1_64)
    x0_h, x1_h = (x.detach().clone().requires_grad_() for x in (x0, x1))
    naive = neg_cos_formula(x0_h, x1_h, dim)
    assert naive.dtype == dtype
    naive_grads = _grads(naive, x0_h, x1_h)

    half_error_within_twice_reference(loss, naive, exact)
    for g, g_naive, g_exact in zip(grads, naive_grads, exact_grads):
        half_error_within_twice_reference(g, g_naive, g_exact)


def test_negative_cosine_similarity_fp16_large_values_do_not_overflow():
    """‖x‖² of fp16 vectors with entries ~300 exceeds fp16's range (65504); the loss must not."""
    x0, x1 = _pair(4, 64, dtype=torch.float16)
    x0, x1 = x0 * 300, x1 * 300
    assert torch.isinf((x0 * x0).sum(dim=1)).any()  # the naive fp16 formula would overflow
    loss = fn.negative_cosine_similarity(x0, x1)
    # computed in float32 on the fp16 inputs, which the oracle sees as rounded
    assert_within(loss, neg_cos_formula(x0.double(), x1.double()), _mean_cosine_error(x0, 1), "loss")


# --- bad inputs ------------------------------------------------------------------------------
def test_negative_cosine_similarity_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"x0 \(4, 5\).*x1 \(4, 6\)"):
        fn.negative_cosine_similarity(torch.randn(4, 5), torch.randn(4, 6))
    with pytest.raises(ValueError, match=r"x0 \(4, 5\).*x1 \(4, 1, 5\)"):
        fn.negative_cosine_similarity(torch.randn(4, 5), torch.randn(4, 1, 5))


@pytest.mark.parametrize("dim", [2, -3, 7], ids=["dim2", "dim-3", "dim7"])
def test_negative_cosine_similarity_out_of_range_dim_raises(dim):
    with pytest.raises(ValueError, match=rf"dim.*\(4, 5\).*{dim}"):
        fn.negative_cosine_similarity(torch.randn(4, 5), torch.randn(4, 5), dim=dim)
    with pytest.raises(ValueError, match="dim"):
        NegativeCosineSimilarity(dim=dim)(torch.randn(4, 5), torch.randn(4, 5))


@pytest.mark.parametrize("dim", [1.0, True, None], ids=["float", "bool", "None"])
def test_negative_cosine_similarity_non_int_dim_raises(dim):
    with pytest.raises((TypeError, ValueError), match="dim"):
        fn.negative_cosine_similarity(torch.randn(4, 5), torch.randn(4, 5), dim=dim)


@pytest.mark.parametrize("eps", [0.0, -1e-8, float("nan"), float("inf")], ids=["zero", "negative", "nan", "inf"])
def test_negative_cosine_similarity_bad_eps_raises(eps):
    with pytest.raises(ValueError, match="eps"):
        fn.negative_cosine_similarity(torch.randn(4, 5), torch.randn(4, 5), eps=eps)
    with pytest.raises(ValueError, match="eps"):
        NegativeCosineSimilarity(eps=eps)


def test_negative_cosine_similarity_bad_dtypes_raise():
    with pytest.raises(TypeError, match=r"x0.*int64"):
        fn.negative_cosine_similarity(torch.ones(4, 5, dtype=torch.long), torch.ones(4, 5, dtype=torch.long))
    with pytest.raises(TypeError, match=r"x0 torch\.float32.*x1 torch\.float16"):
        fn.negative_cosine_similarity(torch.randn(4, 5), torch.randn(4, 5).half())


@pytest.mark.parametrize("shape", [pytest.param((0, 5), id="no-rows"), pytest.param((4, 0), id="no-features")])
def test_negative_cosine_similarity_empty_raises(shape):
    with pytest.raises(ValueError, match=r"x0.*empty"):
        fn.negative_cosine_similarity(torch.randn(*shape), torch.randn(*shape))


def test_negative_cosine_similarity_unknown_backend_raises():
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        fn.negative_cosine_similarity(torch.randn(4, 5), torch.randn(4, 5), backend="gpu")
    with pytest.raises(ValueError, match=r"backend.*'gpu'"):
        NegativeCosineSimilarity(backend="gpu")(torch.randn(4, 5), torch.randn(4, 5))


# ============================================================================================
# update_momentum
# ============================================================================================
def _model():
    return nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 3))


def _student_and_teacher():
    """A model and an EMA copy whose parameters *and* buffers differ from the model's."""
    model = _model()
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(torch.randn_like(p))
    model.train()
    model(torch.randn(16, 5))            # moves the model's BatchNorm running stats
    ema(torch.randn(16, 5) * 3 + 1)      # and the EMA's, differently
    for p in ema.parameters():
        p.requires_grad_(False)
    return model, ema


def _snapshot(module):
    return ({k: v.detach().clone() for k, v in module.named_parameters()},
            {k: v.detach().clone() for k, v in module.named_buffers()})


def _ema_error(ema, model, updates):
    """|δ| of ``updates`` EMA steps m·e + (1 − m)·p in float32, elementwise: ATen's lerp forms
    a + w(b − a) for w < ½ and b − (b − a)(1 − w) otherwise, so each step rounds b − a, w (to
    float32), the product and the sum: ≤ 4u·max(|e|, |p|), which a convex combination keeps."""
    return 4 * U32 * updates * torch.maximum(ema.double().abs(), model.double().abs())


@pytest.mark.parametrize("m", [0.5, 0.9, 0.99, 0.996, 0.3], ids=["m0.5", "m0.9", "m0.99", "m0.996", "m0.3"])
def test_update_momentum_is_ema_of_parameters(m):
    model, ema = _student_and_teacher()
    ema_params, ema_buffers = _snapshot(ema)
    model_params, model_buffers = _snapshot(model)
    assert any(not torch.equal(ema_buffers[k], model_buffers[k]) for k in ema_buffers)

    update_momentum(model, ema, m)

    for name, p in ema.named_parameters():
        expected = m * ema_params[name].double() + (1 - m) * model_params[name].double()
        assert_within(p, expected, _ema_error(ema_params[name], model_params[name], 1), name)
        assert p.requires_grad is False
    for name, b in ema.named_buffers():  # buffers are not averaged (lightly averages parameters only)
        assert torch.equal(b, ema_buffers[name]), name
    for name, p in model.named_parameters():  # the source model is left alone
        assert torch.equal(p, model_params[name]), name
    for name, b in model.named_buffers():
        assert torch.equal(b, model_buffers[name]), name


def test_update_momentum_twice_compounds():
    model, ema = _student_and_teacher()
    before, _ = _snapshot(ema)
    source, _ = _snapshot(model)
    update_momentum(model, ema, 0.9)
    update_momentum(model, ema, 0.8)
    for name, p in ema.named_parameters():
        expected = 0.72 * before[name].double() + 0.28 * source[name].double()
        # the second update carries the first's error (times m ≤ 1) and adds its own
        assert_within(p, expected, _ema_error(before[name], source[name], 2), name)


@pytest.mark.parametrize("m", [0, 0.0], ids=["int0", "float0"])
def test_update_momentum_zero_copies(m):
    model, ema = _student_and_teacher()
    update_momentum(model, ema, m)
    for (name, p), e in zip(model.named_parameters(), ema.parameters()):
        assert torch.equal(e, p), name
        assert e.data_ptr() != p.data_ptr(), f"{name}: the EMA must own a copy, not alias the model"
    with torch.no_grad():  # and later changes to the model do not leak into the EMA
        next(model.parameters()).add_(1.0)
    assert not torch.equal(next(model.parameters()), next(ema.parameters()))


@pytest.mark.parametrize("m", [1, 1.0], ids=["int1", "float1"])
def test_update_momentum_one_leaves_ema_unchanged(m):
    model, ema = _student_and_teacher()
    before, _ = _snapshot(ema)
    update_momentum(model, ema, m)
    for name, p in ema.named_parameters():
        assert torch.equal(p, before[name]), name


def test_update_momentum_keeps_ema_parameter_objects_and_dtype():
    """An optimizer or hook holding the EMA's parameter tensors must see the update (in place)."""
    model, ema = _student_and_teacher()
    model.double()
    ema.double()
    params = list(ema.parameters())
    before, _ = _snapshot(ema)
    update_momentum(model, ema, 0.75)
    for p, q in zip(params, ema.parameters()):
        assert p is q and p.dtype == torch.float64
    name, p = next(iter(ema.named_parameters()))
    assert not torch.equal(p, before[name])


def test_update_momentum_with_ema_requiring_grad():
    """Works (no autograd error) when the EMA's parameters still require grad; no graph is built."""
    model, ema = _student_and_teacher()
    for p in ema.parameters():
        p.requires_grad_(True)
    update_momentum(model, ema, 0.5)
    for p in ema.parameters():
        assert p.requires_grad and p.grad_fn is None


def test_update_momentum_mismatched_parameter_count_raises():
    with pytest.raises(ValueError, match=r"model_ema"):
        update_momentum(_model(), nn.Linear(5, 7), 0.9)


def test_update_momentum_mismatched_shapes_raise():
    with pytest.raises(ValueError, match=r"\(7, 5\).*\(8, 5\)"):
        update_momentum(nn.Linear(5, 7), nn.Linear(5, 8), 0.9)


@pytest.mark.parametrize("m", [-0.1, 1.01, float("nan"), float("inf"), True, "0.9", None],
                         ids=["negative", "above-one", "nan", "inf", "bool", "str", "None"])
def test_update_momentum_invalid_m_raises(m):
    model, ema = _student_and_teacher()
    before, _ = _snapshot(ema)
    with pytest.raises((ValueError, TypeError), match=r"\bm\b"):
        update_momentum(model, ema, m)
    for name, p in ema.named_parameters():  # nothing written before the check
        assert torch.equal(p, before[name]), name


# ============================================================================================
# cosine_schedule
# ============================================================================================
def lightly_cosine_schedule(step, max_steps, start_value, end_value):
    """lightly 1.6's ``cosine_schedule`` (no ``period``): the cosine runs over steps
    0 … max_steps − 1 and holds ``end_value`` from step max_steps − 1 on."""
    if max_steps <= 1 or step >= max_steps - 1:
        return end_value
    return end_value - (end_value - start_value) * (math.cos(math.pi * step / (max_steps - 1)) + 1) / 2


SCHEDULES = [
    pytest.param(10, 0.996, 1.0, id="byol-momentum-10"),
    pytest.param(11, 0.996, 1.0, id="byol-momentum-11"),
    pytest.param(100, 0.04, 0.4, id="dino-wd-100"),
    pytest.param(7, 1.0, 0.001, id="decreasing-7"),
    pytest.param(2, 3.0, -1.0, id="two-steps"),
]


@pytest.mark.parametrize("max_steps,start,end", SCHEDULES)
def test_cosine_schedule_starts_at_start_value(max_steps, start, end):
    value = cosine_schedule(0, max_steps, start, end)
    assert isinstance(value, float)
    assert value == pytest.approx(start, rel=1e-12, abs=1e-15)


@pytest.mark.filterwarnings("ignore:Current step number:RuntimeWarning")  # lightly warns past max_steps
@pytest.mark.parametrize("max_steps,start,end", SCHEDULES)
def test_cosine_schedule_holds_end_value_from_max_steps_on(max_steps, start, end):
    for step in (max_steps, max_steps + 1, 10 * max_steps):
        assert cosine_schedule(step, max_steps, start, end) == pytest.approx(end, rel=1e-12, abs=1e-15), step


@pytest.mark.filterwarnings("ignore:Current step number:RuntimeWarning")  # lightly warns past max_steps
@pytest.mark.parametrize("max_steps,start,end", SCHEDULES)
def test_cosine_schedule_is_monotone_and_bounded(max_steps, start, end):
    values = [cosine_schedule(s, max_steps, start, end) for s in range(max_steps + 3)]
    lo, hi = min(start, end), max(start, end)
    assert all(lo - 1e-12 <= v <= hi + 1e-12 for v in values)
    steps = list(zip(values, values[1:]))
    if end > start:
        assert all(b >= a for a, b in steps)
    else:
        assert all(b <= a for a, b in steps)
    assert values[0] != values[max_steps]


@pytest.mark.parametrize("max_steps", [3, 11, 101], ids=["max3", "max11", "max101"])
def test_cosine_schedule_midpoint_is_mean_of_start_and_end(max_steps):
    """lightly's ramp runs over steps 0 … max_steps − 1, so its midpoint is (max_steps − 1) / 2."""
    mid = (max_steps - 1) // 2
    assert cosine_schedule(mid, max_steps, 0.996, 1.0) == pytest.approx(0.998, rel=1e-12)
    assert cosine_schedule(mid, max_steps, 2.0, -4.0) == pytest.approx(-1.0, rel=1e-12)


@pytest.mark.filterwarnings("ignore:Current step number:RuntimeWarning")  # lightly warns past max_steps
@pytest.mark.parametrize("max_steps,start,end", SCHEDULES + [pytest.param(1, 0.5, 1.0, id="one-step")])
def test_cosine_schedule_equals_lightly(max_steps, start, end):
    """A drop-in for lightly's ``cosine_schedule`` must give its numbers at every step."""
    for step in range(max_steps + 3):
        expected = lightly_cosine_schedule(step, max_steps, start, end)
        assert cosine_schedule(step, max_steps, start, end) == pytest.approx(expected, rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("max_steps", [-1, -100], ids=["minus1", "minus100"])
def test_cosine_schedule_negative_max_steps_raises(max_steps):
    """lightly raises for a negative max_steps only (0 gives end_value: tests/test_schedules.py)."""
    with pytest.raises(ValueError, match=f"Total step number {max_steps} can't be negative"):
        cosine_schedule(0, max_steps, 0.996, 1.0)


def test_cosine_schedule_negative_step_raises():
    """lightly raises ValueError for a negative step (a cosine is even, so it would otherwise
    silently return the value of step |s|)."""
    with pytest.raises(ValueError, match="step"):
        cosine_schedule(-1, 10, 0.996, 1.0)


def test_exports():
    assert fastssl.NegativeCosineSimilarity is NegativeCosineSimilarity
    assert fastssl.negative_cosine_similarity is fn.negative_cosine_similarity
    assert fastssl.update_momentum is update_momentum and fastssl.cosine_schedule is cosine_schedule


@pytest.mark.parametrize("rows", [256, 257])
def test_negative_cosine_similarity_takes_the_plain_code_up_to_its_crossover(rows, monkeypatch, cosine_path):
    """Up to PLAIN_MAX_ENTRIES entries per input the torch backend runs the reference (bit for bit),
    above it the closed-form op (whose gradient of a detached target is never made)."""
    if cosine_path != "plain-when-small":
        pytest.skip("the crossover as shipped")
    calls = []
    fused = cosine_torch_backend._fused_negative_cosine_similarity
    monkeypatch.setattr(cosine_torch_backend, "_fused_negative_cosine_similarity",
                        lambda *args: calls.append(args) or fused(*args))
    x0, x1 = _pair(rows, 256, grad=True)
    loss = fn.negative_cosine_similarity(x0, x1.detach(), backend="torch")
    assert len(calls) == (rows * 256 > cosine_torch_backend.PLAIN_MAX_ENTRIES)
    if not calls:
        torch.testing.assert_close(loss, fn.negative_cosine_similarity(x0, x1.detach(), backend="reference"),
                                   rtol=0, atol=0)
    loss.backward()
    assert x0.grad is not None and x1.grad is None


def test_negative_cosine_similarity_small_calls_choose_through_the_registry(monkeypatch):
    """Small calls ask ``registry.select`` like every other (its choice is cached, so that is cheap):
    a backend override reaches them."""
    from fastssl.runtime import registry
    calls = []
    original = registry.implementation("negative_cosine_similarity", "reference")
    monkeypatch.setitem(registry._RESOLVED, ("negative_cosine_similarity", "reference"), registry.Implementation(
        lambda *args: calls.append(1) or original.fn(*args), original.supports))
    x0, x1 = _pair(8, 5, grad=True)
    fn.negative_cosine_similarity(x0, x1)
    assert calls == []
    monkeypatch.setenv("FASTSSL_BACKEND", "reference")
    fn.negative_cosine_similarity(x0, x1)
    assert calls == [1]


@pytest.mark.parametrize("setting, message", [("bogus", r"backend must be 'auto' or one of"),
                                              ("triton", r"backend 'triton' cannot run")])
def test_negative_cosine_similarity_small_calls_keep_the_backend_override(setting, message, monkeypatch):
    """FASTSSL_BACKEND replaces "auto" on the shortcut too: a bad or unavailable one still raises."""
    monkeypatch.setenv("FASTSSL_BACKEND", setting)
    x0, x1 = _pair(8, 5, grad=True)
    with pytest.raises((ValueError, RuntimeError), match=message):
        fn.negative_cosine_similarity(x0, x1)
