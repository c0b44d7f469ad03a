"""The fused Barlow Twins / VICReg backends: the Gram (N×N) and direct (D×D) paths of the torch
and triton backends against the float64 formulas of tests/oracles.py, gradcheck,
opcheck, torch.compile, half precision, hard inputs, what is saved for the backward, and errors."""
import pytest
import torch

import fastssl.functional as fn
from fastssl import BarlowTwinsLoss, VICRegLoss, backends
from fastssl.redundancy import torch_backend as redundancy

from helpers import (HALF_DTYPES, _assert_barlow_within, _assert_close_scaled, _assert_vicreg_within, _grads, _views,
                     half_error_within_twice_reference)
from oracles import barlow_formula, vicreg_formula

BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]
PATHS = ["gram", "direct"]
# Ragged: odd N, D not a power of two, N < D and N > D, tails smaller than the kernels' blocks
# (64 columns, 32 rows, 16–64 wide product tiles).
BARLOW_SHAPES = [pytest.param(7, 37, id="N7-D37"), pytest.param(33, 70, id="N33-D70"),
                 pytest.param(65, 6, id="N65-D6")]
VICREG_SHAPES = [pytest.param((7, 37), id="B7-D37"), pytest.param((33, 20), id="B33-D20"),
                 pytest.param((5, 3, 17), id="B5-G3-D17"), pytest.param((6, 2, 2, 9), id="B6-G2x2-D9")]
VICREG_PARAMS = dict(lambda_param=2.0, mu_param=3.0, nu_param=0.5, eps=1e-3)


def _barlow(backend, algorithm, lambda_param=0.02):
    def loss(a, b):
        return fn.barlow_twins(a, b, lambda_param, algorithm=algorithm, backend=backend)
    loss.loss, loss.lambda_param = "barlow_twins", lambda_param
    return loss


def _vicreg(backend, algorithm):
    def loss(a, b):
        return fn.vicreg(a, b, **VICREG_PARAMS, algorithm=algorithm, backend=backend)
    loss.loss = "vicreg"
    return loss


def _barlow_formula(a, b):
    return barlow_formula(a, b, 0.02)


def _vicreg_formula(a, b):
    return vicreg_formula(a, b, **VICREG_PARAMS)


# (fused loss factory, float64 formula) per loss
LOSSES = [pytest.param(_barlow, _barlow_formula, id="barlow_twins"),
          pytest.param(_vicreg, _vicreg_formula, id="vicreg")]


def _check_against_float64(loss_fn, z_a, z_b):
    """fp32 loss and gradients of ``loss_fn`` (a ``LOSSES`` factory's result) against the float64
    formula on the same inputs, within the derived bounds (barlow_twins_loss_bound or
    vicreg_loss_bound, and batch_norm_grad_tolerance)."""
    loss = loss_fn(z_a, z_b)
    assert loss.dtype == torch.float32 and loss.shape == ()
    grads = _grads(loss, z_a, z_b)
    if loss_fn.loss == "barlow_twins":
        _assert_barlow_within(loss, z_a, z_b, loss_fn.lambda_param, grads)
    else:
        _assert_vicreg_within(loss, z_a, z_b, VICREG_PARAMS, grads)


# ============================================================================================
# Values and gradients
# ============================================================================================
@pytest.mark.parametrize("algorithm", PATHS + ["auto"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", BARLOW_SHAPES)
def test_barlow_twins_every_path_equals_float64(n, d, backend, algorithm):
    z_a, z_b = _views(n, d, scale=2.0, shift=0.3, grad=True)
    _check_against_float64(_barlow(backend, algorithm), z_a, z_b)


@pytest.mark.parametrize("algorithm", PATHS + ["auto"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", VICREG_SHAPES)
def test_vicreg_every_path_equals_float64(shape, backend, algorithm):
    z_a, z_b = _views(*shape, scale=0.6, shift=0.2, grad=True)  # std ~0.7: the variance hinge is active
    _check_against_float64(_vicreg(backend, algorithm), z_a, z_b)


@pytest.mark.triton
@pytest.mark.parametrize("algorithm", PATHS)
@pytest.mark.parametrize("loss,shape", [pytest.param(_barlow, (33, 70), id="barlow_twins-N33-D70"),
                                        pytest.param(_barlow, (70, 40), id="barlow_twins-N70-D40"),
                                        pytest.param(_vicreg, (40, 2, 36), id="vicreg-B40-G2-D36")])
def test_triton_split_reductions_equal_float64_and_repeat_bitwise(monkeypatch, loss, shape, algorithm):
    """The product kernel's reduction split at every step of BLOCK_REDUCED (as the tiles of a card
    with many SMs would ask; the last split ragged), merged in split order: within the float64
    bounds, and a second run bitwise equal."""
    backends.preload("triton")
    from fastssl.kernels import occupancy

    monkeypatch.setattr(occupancy, "PROGRAMS_PER_SM", 1000)
    counts = []
    original = occupancy.splits
    monkeypatch.setattr(occupancy, "splits", lambda *args: counts.append(original(*args)[0]) or original(*args))
    views = _views(*shape, scale=0.6, shift=0.2, grad=True)
    _check_against_float64(loss("triton", algorithm), *views)
    assert max(counts) > 1
    runs = []
    for _ in range(2):
        z_a, z_b = (z.detach().clone().requires_grad_() for z in views)
        result = loss("triton", algorithm)(z_a, z_b)
        runs.append([result.detach(), *_grads(result, z_a, z_b)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.triton
@pytest.mark.parametrize("symmetric", [False, True], ids=["full", "symmetric"])
def test_triton_product_split_fills_an_h100_at_the_benchmark_shape(monkeypatch, symmetric):
    """Barlow Twins / VICReg at N = 256, D = 8192 (the Gram path: 256 × 256 reduced over 8192): the
    launch arithmetic of ``squared_norms`` gives ≥ 2 × 132 working programs on 132 SMs (the 64-wide
    tiles alone: 16, or 10 above the diagonal)."""
    backends.preload("triton")
    from fastssl.kernels import occupancy, redundancy as kernels

    monkeypatch.setattr(occupancy, "multiprocessors", lambda device: 132)
    device = torch.device("cuda")
    assert kernels._reduction_split(256, kernels._tile(256, torch.float32), 1, symmetric, 8192, device)[1] > 1
    tiles, splits, per_split = kernels._reduction_split(256, kernels.SPLIT_TILE, 1, symmetric, 8192, device)
    working = tiles * (tiles + 1) // 2 if symmetric else tiles * tiles
    assert working * splits >= 2 * 132 and (splits - 1) * per_split < 8192 <= splits * per_split


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,shape", [pytest.param(_barlow, (9, 23), id="barlow_twins-N9-D23"),
                                        pytest.param(_barlow, (23, 9), id="barlow_twins-N23-D9"),
                                        pytest.param(_vicreg, (9, 23), id="vicreg-N9-D23"),
                                        pytest.param(_vicreg, (4, 3, 10), id="vicreg-N4-G3-D10")])
def test_gram_and_direct_paths_agree_in_float64(loss, shape, backend):
    """The exact identity ‖aᵀb‖² = ⟨a aᵀ, b bᵀ⟩: both paths give one number and one gradient."""
    z_a, z_b = _views(*shape, dtype=torch.float64, scale=0.6, grad=True)
    gram = loss(backend, "gram")(z_a, z_b)
    direct = loss(backend, "direct")(z_a, z_b)
    torch.testing.assert_close(gram, direct, rtol=1e-12, atol=1e-12)
    for g, e in zip(_grads(gram, z_a, z_b), _grads(direct, z_a, z_b)):
        _assert_close_scaled(g, e, rtol=1e-11)


# gradcheck of the interpreted kernels in fast mode (one random direction instead of every input
# element: ~50× fewer interpreted calls)
@pytest.mark.parametrize("algorithm", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [pytest.param((3, 4), id="N3-D4"), pytest.param((5, 3), id="N5-D3")])
def test_barlow_twins_gradcheck(shape, backend, algorithm):
    z_a, z_b = _views(*shape, dtype=torch.float64, grad=True)
    assert torch.autograd.gradcheck(_barlow(backend, algorithm, 0.3), (z_a, z_b), fast_mode=backend == "triton")


@pytest.mark.parametrize("algorithm", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [pytest.param((4, 3), id="B4-D3"), pytest.param((3, 2, 4), id="B3-G2-D4")])
def test_vicreg_gradcheck(shape, backend, algorithm):
    z_a, z_b = _views(*shape, dtype=torch.float64, scale=0.5, grad=True)
    assert torch.autograd.gradcheck(_vicreg(backend, algorithm), (z_a, z_b), fast_mode=backend == "triton")


@pytest.mark.parametrize("algorithm", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("loss,formula", LOSSES)
def test_half_inputs_within_twice_the_reference_error(loss, formula, dtype, backend, algorithm):
    if backends.unavailable_reasons("barlow_twins", backend, [torch.ones(1, dtype=dtype)]):
        pytest.skip(f"the {backend} backend cannot run {dtype} here")
    z_a, z_b = _views(*((33, 37) if loss is _barlow else (5, 3, 17)), dtype=dtype, scale=0.6, grad=True)
    result = loss(backend, algorithm)(z_a, z_b)
    grads = _grads(result, z_a, z_b)
    assert result.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    z_a64, z_b64 = (z.detach().double().requires_grad_() for z in (z_a, z_b))
    exact = formula(z_a64, z_b64)
    z_ah, z_bh = (z.detach().clone().requires_grad_() for z in (z_a, z_b))
    naive = formula(z_ah, z_bh)  # the same formula computed in the half dtype
    assert naive.dtype == dtype
    half_error_within_twice_reference(result, naive, exact)
    for g, g_naive, g_exact in zip(grads, _grads(naive, z_ah, z_bh), _grads(exact, z_a64, z_b64)):
        half_error_within_twice_reference(g, g_naive, g_exact)


@pytest.mark.parametrize("algorithm", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss,formula", LOSSES)
def test_offset_and_tiny_features_stay_within_the_float64_bounds(loss, formula, backend, algorithm, request):
    """Features far from zero (mean 300, σ from 1e-3 to 1: near batch norm's eps) in fp32: the
    fused paths within the same derived bounds as centred features. They hold for a correct
    implementation, as z − mean is exact there (Sterbenz) and a per-feature shift cancels in the
    statistics. They catch both faults fastssl's torch backend had: a batch norm that forms
    z·rstd − mean·rstd (torch's scalar kernel) loses 4e-3 of this loss (9× its bound), and one
    that centres by the rounded mean only puts 7e-4 relative on the gradient (110×)."""
    if backend == "triton" and loss is _barlow:
        request.applymarker(pytest.mark.xfail(strict=True, reason=(
            "kernels/redundancy.py's batch-norm backward centres by the rounded batch mean: the gradient of a "
            "feature at 300 ± 1e-3 is off by 7e-4 of its size, 110x its bound (fastssl/redundancy.py's torch "
            "backend shifts by that mean first and is at 1.6e-7); to be fixed in the kernel")))
    z_a, z_b = _views(17, 29, dtype=torch.float64)
    z_a = (z_a * torch.logspace(-3, 0, 29, dtype=torch.float64) + 300.0).float().requires_grad_()
    z_b = (z_b - 300.0).float().requires_grad_()
    _check_against_float64(loss(backend, algorithm), z_a, z_b)


# ============================================================================================
# What is built and saved: never D×D when N < D
# ============================================================================================
def _largest_saved(loss_fn, z_a, z_b):
    """Elements of the largest tensor the loss saves for its backward."""
    sizes = []

    def pack(tensor):
        sizes.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(z_a, z_b)
    return max(sizes)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", [pytest.param(_barlow, id="barlow_twins"), pytest.param(_vicreg, id="vicreg")])
def test_auto_saves_nothing_larger_than_the_inputs(loss, backend):
    """N < D: the Gram path, nothing D×D is kept for the backward (the reference keeps D×D, or for
    VICReg its D(D − 1) off-diagonal entries)."""
    n, d = 6, 50
    z_a, z_b = _views(n, d, grad=True)
    assert _largest_saved(loss(backend, "auto"), z_a, z_b) == n * d  # the inputs themselves
    assert _largest_saved(loss("reference", "auto"), z_a, z_b) >= d * (d - 1)


@pytest.mark.parametrize("n,d,products", [pytest.param(6, 50, (2, 6, 6), id="N6-D50-gram"),
                                          pytest.param(50, 50, (1, 50, 50), id="N50-D50-direct"),
                                          pytest.param(51, 7, (1, 7, 7), id="N51-D7-direct")])
def test_auto_chooses_gram_exactly_when_n_below_d(n, d, products):
    z_a, z_b = _views(n, d)
    assert redundancy.use_gram(n, d, "auto") == (n < d)
    assert torch.ops.fastssl.barlow_twins(z_a, z_b, 0.1)[2].shape == products
    vicreg_products = torch.ops.fastssl.vicreg_variance_covariance(z_a[:, None], z_b[:, None], 1e-4)[2].shape
    assert vicreg_products == (2, 1) + products[1:]


# ============================================================================================
# torch.library: opcheck, torch.compile
# ============================================================================================
def _custom_op(backend, name):
    """The custom op behind a backend's core (``.op`` of the registered function)."""
    backends.preload("triton")
    return backends.implementation(name, backend).fn.op


@pytest.mark.parametrize("algorithm", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_opcheck(dtype, backend, algorithm):
    z_a, z_b = _views(7, 5, dtype=dtype, grad=True)
    torch.library.opcheck(_custom_op(backend, "barlow_twins"), (z_a, z_b, 5e-3, algorithm))
    z_a, z_b = _views(4, 3, 5, dtype=dtype, grad=True)
    torch.library.opcheck(_custom_op(backend, "vicreg_variance_covariance"), (z_a, z_b, 1e-4, algorithm))


@pytest.mark.parametrize("algorithm", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", [pytest.param(_barlow, id="barlow_twins"), pytest.param(_vicreg, id="vicreg")])
def test_compile_fullgraph_equals_eager(loss, backend, algorithm):
    torch._dynamo.reset()
    z_a, z_b = _views(9, 13, grad=True)
    loss_fn = loss(backend, algorithm)
    eager = loss_fn(z_a, z_b)
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")(z_a, z_b)
    # bit for bit: aot_eager runs the traced graph on the eager kernels, in the same order
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    for got, want in zip(_grads(compiled, z_a, z_b), _grads(eager, z_a, z_b)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ============================================================================================
# Options and errors
# ============================================================================================
@pytest.mark.parametrize("algorithm", PATHS)
def test_modules_pass_the_algorithm(algorithm):
    z_a, z_b = _views(8, 12)
    torch.testing.assert_close(BarlowTwinsLoss(algorithm=algorithm, backend="torch")(z_a, z_b),
                               fn.barlow_twins(z_a, z_b, algorithm=algorithm, backend="torch"), rtol=0.0, atol=0.0)
    torch.testing.assert_close(VICRegLoss(algorithm=algorithm, backend="torch")(z_a, z_b),
                               fn.vicreg(z_a, z_b, algorithm=algorithm, backend="torch"), rtol=0.0, atol=0.0)


def test_reference_backend_accepts_any_algorithm():
    """The reference is the spec: it always builds C, whatever the algorithm asks of fused backends."""
    z_a, z_b = _views(8, 12)
    for algorithm in PATHS:
        assert torch.equal(fn.barlow_twins(z_a, z_b, algorithm=algorithm, backend="reference"),
                           fn.barlow_twins(z_a, z_b, backend="reference"))
        assert torch.equal(fn.vicreg(z_a, z_b, algorithm=algorithm, backend="reference"),
                           fn.vicreg(z_a, z_b, backend="reference"))


@pytest.mark.parametrize("call", [
    pytest.param(lambda z: fn.barlow_twins(z, z, algorithm="syrk"), id="barlow_twins"),
    pytest.param(lambda z: fn.vicreg(z, z, algorithm="syrk"), id="vicreg"),
    pytest.param(lambda z: BarlowTwinsLoss(algorithm="syrk"), id="BarlowTwinsLoss"),
    pytest.param(lambda z: VICRegLoss(algorithm="syrk"), id="VICRegLoss"),
    pytest.param(lambda z: torch.ops.fastssl.barlow_twins(z, z, 0.1, "syrk"), id="op"),
])
def test_unknown_algorithm_raises_naming_it(call):
    with pytest.raises(ValueError, match=r"algorithm must be one of 'auto', 'gram', 'direct'; got 'syrk'"):
        call(torch.randn(4, 5))


@pytest.mark.triton
def test_triton_refuses_bfloat16_in_the_interpreter_with_its_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z = torch.randn(4, 5, dtype=torch.bfloat16)
    with pytest.raises(backends.BackendUnavailableError, match=r"barlow_twins.*bfloat16"):
        fn.barlow_twins(z, z, backend="triton")
