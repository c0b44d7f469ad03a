"""The fused InfoNCE backends (blocked/tiled ``torch``, ``triton`` under the interpreter) against
the reference and float64 math, on ragged shapes that cross block and tile boundaries."""
import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastssl
import fastssl.functional as fn
from fastssl import backends
from fastssl.contrastive import torch_backend as contrastive
from fastssl.runtime import registry

from helpers import (FLOAT_DTYPES, HALF_DTYPES, U32, assert_ce_within, assert_info_nce_grads_within, bank_blocks,
                     block_sizes, cross_blocks, half_error_within_twice_reference, simclr_blocks, unit_roundoff)


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 16 rows and tiles of 16×16, so small inputs cross many boundaries with tails."""
    monkeypatch.setattr(contrastive, "BLOCK_ELEMENTS", 1)
    monkeypatch.setattr(contrastive, "TILE_ELEMENTS", 16 * 16)
    monkeypatch.setattr(contrastive, "PLAIN_MAX_LOGITS", 0)  # the blocked op, not the plain code of small calls


@pytest.fixture(params=["sparse", "dense"])
def positives_form(request, monkeypatch):
    """Both ways of finding positives: explicit pairs, and a label comparison per block."""
    if request.param == "dense":
        monkeypatch.setattr(contrastive, "MAX_PAIRS_PER_ROW", 0)
    return request.param


def _inputs(n, m, d, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(rows, d, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
            for rows in (n, m)]


def _variants(n, m, d):
    """(id, kwargs of fn.info_nce, needs n <= m) covering every path of the core."""
    g = torch.Generator().manual_seed(1)
    return [
        ("diagonal", {}),
        ("positive_index", {"positive_index": torch.randint(0, m, (n,), generator=g)}),
        ("labels_self", {"query_labels": torch.randint(0, 4, (n,), generator=g),
                         "key_labels": torch.randint(0, 4, (m,), generator=g),
                         "self_index": torch.randint(-1, m, (n,), generator=g)}),
        ("symmetric", {"symmetric": True}),
        ("symmetric_labels", {"symmetric": True, "query_labels": torch.randint(0, 5, (n,), generator=g),
                              "key_labels": torch.randint(0, 5, (m,), generator=g)}),
        ("positive_keys", {"positive_keys": torch.randn(n, d, generator=g, dtype=torch.float64)}),
    ]


def _call(backend, q, k, kwargs, temperature=0.2, reduction="mean"):
    kwargs = dict(kwargs)
    if "positive_keys" in kwargs:
        kwargs["positive_keys"] = kwargs["positive_keys"].to(q.dtype).requires_grad_(True)
    loss = fn.info_nce(q, k, temperature, backend=backend, reduction=reduction, **kwargs)
    inputs = [q, k] + ([kwargs["positive_keys"]] if "positive_keys" in kwargs else [])
    return loss, inputs


def _blocks(n, m, kwargs):
    """fn.info_nce's logits for these kwargs (its docstring's definition) as logit blocks, and the
    order of ``_call``'s inputs [q, k, positive keys] in the blocks' rows."""
    if "positive_keys" in kwargs:
        return bank_blocks(n, m), [0, 2, 1]  # rows: queries, their positive keys, the keys
    if "query_labels" in kwargs:
        positive = kwargs["query_labels"][:, None] == kwargs["key_labels"][None, :]
    elif "positive_index" in kwargs:
        positive = torch.zeros(n, m, dtype=torch.bool)
        positive[torch.arange(n), kwargs["positive_index"]] = True
    else:
        positive = torch.eye(n, m, dtype=torch.bool)
    allowed = None
    if "self_index" in kwargs:
        allowed = torch.ones(n, m, dtype=torch.bool)
        has_self = kwargs["self_index"] >= 0
        allowed[torch.arange(n)[has_self], kwargs["self_index"][has_self]] = False
    return cross_blocks(positive, allowed, kwargs.get("symmetric", False)), [0, 1]


def _assert_within_float64(loss, inputs, exact, exact_inputs, kwargs, temperature, u=U32):
    """``loss`` (of ``_call``'s ``inputs``) and its gradients against the float64 ``exact`` of
    ``exact_inputs``, within ce_bound and info_nce_grad_bound (tests/helpers.py)."""
    n, d = inputs[0].shape
    blocks, order = _blocks(n, inputs[1].shape[0], kwargs)
    candidates, rows = block_sizes(blocks)
    assert_ce_within(loss, exact, d, 1 / temperature, candidates, rows, u=u)
    grads = torch.autograd.grad(loss, inputs)
    exact_grads = torch.autograd.grad(exact, exact_inputs)
    assert all(g.dtype == x.dtype for g, x in zip(grads, inputs))
    assert_info_nce_grads_within([grads[i] for i in order], [exact_grads[i] for i in order],
                                 torch.cat([exact_inputs[i] for i in order]), blocks, 1 / temperature, u)


def _compare(backend, q, k, kwargs, temperature=0.2):
    """The backend against the float64 reference on the same inputs (not one float32 backend
    against another: they round differently, on every CPU differently)."""
    loss, inputs = _call(backend, q, k, kwargs, temperature)
    exact_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    exact_kwargs = {**kwargs, "positive_keys": exact_inputs[2]} if "positive_keys" in kwargs else kwargs
    exact = fn.info_nce(exact_inputs[0], exact_inputs[1], temperature, backend="reference", **exact_kwargs)
    _assert_within_float64(loss, inputs, exact, exact_inputs, kwargs, temperature, unit_roundoff(q.dtype))


# --------------------------------------------------------------------------------------------
# torch backend
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m,d", [(37, 45, 19), (33, 33, 7), (16, 50, 3)], ids=lambda v: str(v))
@pytest.mark.parametrize("variant", range(6), ids=[v[0] for v in _variants(1, 1, 1)])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_torch_backend_blocks_equal_reference(small_blocks, positives_form, shift_path, n, m, d, variant, dtype):
    name, kwargs = _variants(n, m, d)[variant]
    if name.startswith("symmetric") and n != m and "labels" not in name:
        kwargs = {**kwargs, "positive_index": None}
        kwargs.pop("positive_index")
    q, k = _inputs(n, m, d, dtype)
    _compare("torch", q, k, kwargs)


@pytest.mark.parametrize("views", [2, 3], ids=["2views", "3views"])
@pytest.mark.parametrize("batch", [1, 8, 21], ids=lambda b: f"B{b}")
@pytest.mark.parametrize("labels", [False, True], ids=["simclr", "supcon"])
def test_torch_self_similarity_tiles_equal_reference(small_blocks, positives_form, shift_path, views, batch, labels):
    """SimCLR's tiled path (upper-triangle tiles, mirrored) against the reference, in float64."""
    g = torch.Generator().manual_seed(batch)
    zs = [torch.randn(batch, 11, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(views)]
    kwargs = {"labels": torch.randint(0, 3, (batch,), generator=g)} if labels else {}
    loss = fn.nt_xent(*zs, temperature=0.3, backend="torch", **kwargs)
    expected = fn.nt_xent(*zs, temperature=0.3, backend="reference", **kwargs)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(loss, zs), torch.autograd.grad(expected, zs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_self_similarity_op_is_chosen_for_simclr(monkeypatch):
    calls = []
    original = backends.implementation("info_nce_self", "torch")
    monkeypatch.setitem(registry._RESOLVED, ("info_nce_self", "torch"), registry.Implementation(
        lambda *args: calls.append(1) or original.fn(*args), original.supports))
    fastssl.NTXentLoss()(torch.randn(6, 4), torch.randn(6, 4))
    assert calls == [1]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.triton)])
@pytest.mark.parametrize("variant", ["diagonal", "positive_keys", "symmetric"])
def test_keys_without_gradient_skip_their_gradient(small_blocks, backend, variant):
    """MoCo's queue takes no gradient: the backward is told so and makes none, and the other
    gradients equal the reference's."""
    if backend == "triton":
        backends.preload("triton")
    backward = getattr(torch.ops.fastssl, "info_nce_backward" if backend == "torch" else "info_nce_triton_backward")
    calls = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is backward.default:
                calls.append((args[-1], tuple(out[1].shape)))
            return out

    g = torch.Generator().manual_seed(7)
    q = torch.randn(21, 9, generator=g, requires_grad=True)
    keys = torch.randn(21, 9, generator=g)
    kwargs = {"positive_keys": torch.randn(21, 9, generator=g, requires_grad=True)} if variant == "positive_keys" else {}
    if variant == "symmetric":
        kwargs["symmetric"] = True
    differentiable = [q] + ([kwargs["positive_keys"]] if variant == "positive_keys" else [])
    with Spy():
        loss = fn.info_nce(q, keys, 0.2, backend=backend, **kwargs)
        grads = torch.autograd.grad(loss, differentiable)
    assert calls == [(False, (0,))]
    # against the float64 reference (the keys' rows get a bound too, unused: no gradient)
    exact_q, exact_keys = q.detach().double().requires_grad_(True), keys.double()
    exact_kwargs = dict(kwargs)
    if variant == "positive_keys":
        exact_kwargs["positive_keys"] = kwargs["positive_keys"].detach().double().requires_grad_(True)
    exact = fn.info_nce(exact_q, exact_keys, 0.2, backend="reference", **exact_kwargs)
    blocks, order = _blocks(21, 21, kwargs)
    candidates, rows = block_sizes(blocks)
    assert_ce_within(loss, exact, 9, 5.0, candidates, rows)
    exact_differentiable = [exact_q] + ([exact_kwargs["positive_keys"]] if variant == "positive_keys" else [])
    exact_grads = torch.autograd.grad(exact, exact_differentiable)
    vectors = [exact_q, exact_keys] + exact_differentiable[1:]  # _call's order: q, keys, positive keys
    vectors = torch.cat([vectors[i].detach() for i in order])
    # the gradients of q and the positive keys: rows [0, N) and, in the blocks' order, [N, 2N)
    assert_info_nce_grads_within(list(grads), list(exact_grads), vectors, blocks, 5.0)


@pytest.fixture(params=["unshifted", "running_max"])
def shift_path(request, monkeypatch):
    """Both ways of keeping exp() in range: no shift where ``exps_stay_normal`` allows it (taken
    by float64 inputs here), and the running row max, forced (always valid)."""
    if request.param == "running_max":
        monkeypatch.setattr(contrastive, "exps_stay_normal", lambda *args: False)
    return request.param


@pytest.fixture
def decisions(monkeypatch):
    """Every answer of ``contrastive.exps_stay_normal`` during the test, in order."""
    answers = []
    original = contrastive.exps_stay_normal
    monkeypatch.setattr(contrastive, "exps_stay_normal", lambda *args: answers.append(original(*args)) or answers[-1])
    return answers


@pytest.mark.parametrize("temperature,unshifted", [(0.1, True), (0.046, True), (0.0457, False), (0.01, False)])
@pytest.mark.parametrize("variant", range(6), ids=[v[0] for v in _variants(1, 1, 1)])
def test_cosine_logits_take_the_unshifted_path_exactly_when_exps_stay_normal(small_blocks, decisions, temperature,
                                                                             unshifted, variant):
    """fp32 cosine logits: the shift-free path is taken for τ ≥ 1 / (½ max_exp_span) ≈ 0.04580
    and gives the float64 reference's value and gradients on both sides of that boundary."""
    name, kwargs = _variants(29, 29, 13)[variant]
    q, k = (torch.nn.functional.normalize(x.detach(), dim=1).requires_grad_(True) for x in _inputs(29, 29, 13))
    if "positive_keys" in kwargs:
        kwargs = {**kwargs, "positive_keys": torch.nn.functional.normalize(kwargs["positive_keys"], dim=1)}
    loss, inputs = _call("torch", q, k, kwargs, temperature)
    assert decisions and all(d == unshifted for d in decisions)
    exact_inputs = [x.detach().double().requires_grad_(True) for x in inputs]
    exact_kwargs = {**kwargs, "positive_keys": exact_inputs[2]} if "positive_keys" in kwargs else kwargs
    exact = fn.info_nce(exact_inputs[0], exact_inputs[1], temperature, backend="reference", **exact_kwargs)
    _assert_within_float64(loss, inputs, exact, exact_inputs, kwargs, temperature)


@pytest.mark.parametrize("temperature,unshifted", [(0.1, True), (0.0457, False)])
@pytest.mark.parametrize("labels", [False, True], ids=["simclr", "supcon"])
def test_self_similarity_paths_equal_float64(small_blocks, decisions, temperature, unshifted, labels):
    g = torch.Generator().manual_seed(5)
    zs = [torch.randn(27, 10, generator=g, requires_grad=True) for _ in range(2)]
    kwargs = {"labels": torch.randint(0, 4, (27,), generator=g)} if labels else {}
    loss = fn.nt_xent(*zs, temperature=temperature, backend="torch", **kwargs)
    assert decisions == [unshifted]
    exact_zs = [z.detach().double().requires_grad_(True) for z in zs]
    exact = fn.nt_xent(*exact_zs, temperature=temperature, backend="reference", **kwargs)
    _assert_nt_xent_within_float64(loss, zs, exact, exact_zs, kwargs.get("labels"), temperature)


def _assert_nt_xent_within_float64(loss, zs, exact, exact_zs, labels, temperature):
    """NT-Xent of V views (``zs``) against float64 (``exact`` of ``exact_zs``): ce_bound, info_nce_grad_bound."""
    batch, dim = zs[0].shape
    blocks = simclr_blocks(len(zs), batch, labels)
    candidates, rows = block_sizes(blocks)
    assert_ce_within(loss, exact, dim, 1 / temperature, candidates, rows)
    assert_info_nce_grads_within(torch.autograd.grad(loss, zs), torch.autograd.grad(exact, exact_zs),
                                 torch.cat(exact_zs), blocks, 1 / temperature)


@pytest.mark.parametrize("kind", ["self", "general"])
def test_torch_backend_gradcheck(small_blocks, shift_path, kind):
    g = torch.Generator().manual_seed(3)
    z = torch.randn(19, 4, generator=g, dtype=torch.float64, requires_grad=True)
    if kind == "self":
        labels = torch.arange(19) % 7
        assert torch.autograd.gradcheck(
            lambda x: backends.implementation("info_nce_self", "torch").fn(x, labels, True, 2.5), (z,))
    else:
        k = torch.randn(23, 4, generator=g, dtype=torch.float64, requires_grad=True)
        p = torch.randn(19, 4, generator=g, dtype=torch.float64, requires_grad=True)
        core = backends.implementation("info_nce", "torch").fn
        assert torch.autograd.gradcheck(lambda a, b, c: core(a, b, c, None, None, torch.arange(19) - 1, 1.7, False),
                                        (z, k, p))
        labels = torch.arange(19) % 5, torch.arange(23) % 5
        assert torch.autograd.gradcheck(lambda a, b: core(a, b, None, *labels, None, 1.3, True), (z, k))


@pytest.mark.parametrize("temperature", [0.05, 0.01])
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["unit", "x30"])
def test_low_temperature_unnormalised_inputs_stay_finite_and_exact(temperature, scale):
    q, k = _inputs(24, 24, 9, scale=scale)
    for normalize in (True, False):
        loss = fn.info_nce(q, k, temperature, normalize=normalize, backend="torch")
        exact = fn.info_nce(q.double(), k.double(), temperature, normalize=normalize, backend="reference")
        assert torch.isfinite(loss)
        if normalize:
            assert_ce_within(loss, exact, 9, 1 / temperature, 24, 24)
        else:  # logits q·k/τ of any size: |δs| ≤ (D + 2)u·Σ|qᵢkᵢ|/τ, then as in ce_bound
            delta_s = 11 * U32 * (q.detach().double().abs() @ k.detach().double().abs().T).max().item() / temperature
            bound = delta_s * min(3 * exact.item(), 2.0) + 27 * U32 * exact.item() + 26 * U32
            assert abs(loss.item() - exact.item()) <= bound
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (q, k)))


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("mode", ["simclr", "symmetric"])
def test_torch_backend_half_error_at_most_twice_reference(dtype, mode):
    """Error vs float64 is at most 2× that of the reference computed entirely in the half dtype."""
    x0, x1 = _inputs(40, 40, 24, dtype)
    loss = fn.nt_xent(x0, x1, temperature=0.1, mode=mode, backend="torch")
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (x0, x1))
    assert all(g.dtype == dtype for g in grads)
    e0, e1 = (x.detach().double().requires_grad_(True) for x in (x0, x1))
    exact = fn.nt_xent(e0, e1, temperature=0.1, mode=mode, backend="reference")
    exact_grads = torch.autograd.grad(exact, (e0, e1))
    h0, h1 = (x.detach().clone().requires_grad_(True) for x in (x0, x1))
    naive = _naive_half_nt_xent(h0, h1, 0.1, mode)
    naive_grads = torch.autograd.grad(naive, (h0, h1))
    half_error_within_twice_reference(loss.detach(), naive.detach(), exact.detach())
    for got, ref, want in zip(grads, naive_grads, exact_grads):
        half_error_within_twice_reference(got, ref, want)


def _naive_half_nt_xent(z0, z1, temperature, mode):
    """NT-Xent computed in the inputs' half dtype throughout (what a half-precision peer does)."""
    z0, z1 = torch.nn.functional.normalize(z0, dim=1), torch.nn.functional.normalize(z1, dim=1)
    if mode == "symmetric":
        logits = z0 @ z1.T / temperature
        labels = torch.arange(z0.shape[0])
        return 0.5 * (torch.nn.functional.cross_entropy(logits, labels)
                      + torch.nn.functional.cross_entropy(logits.T, labels))
    z = torch.cat([z0, z1])
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    b = z0.shape[0]
    labels = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return torch.nn.functional.cross_entropy(logits, labels)


@pytest.mark.slow
def test_131072_rows_run_in_blocks():
    """131,072 rows × D=128 fwd+bwd (the dense logits alone would be 68 GB)."""
    torch.manual_seed(0)
    z0 = torch.randn(65536, 128, requires_grad=True)
    z1 = torch.randn(65536, 128, requires_grad=True)
    loss = fastssl.NTXentLoss(backend="torch")(z0, z1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z0.grad).all()
    assert 0 < loss.item() < torch.log(torch.tensor(131071.0)).item() + 1


# --------------------------------------------------------------------------------------------
# triton backend (interpreter on CPU)
# --------------------------------------------------------------------------------------------
@pytest.fixture(params=["one_split", "split"])
def key_splits(request, monkeypatch):
    """The kernels as launched on one SM (no split here) or on very many: every pass then splits
    the side it streams into one split per tile (the last one ragged), merged in split order."""
    if request.param == "split":
        monkeypatch.setattr(_kernel_module("occupancy"), "PROGRAMS_PER_SM", 1000)
    return request.param


def _kernel_module(name):
    """``fastssl.kernels.<name>``, imported once the triton backend is loaded."""
    backends.preload("triton")
    return importlib.import_module(f"fastssl.kernels.{name}")


class _RecordedKernel:
    """A Triton kernel that records (name, grid, keyword arguments) of each launch, then launches."""

    def __init__(self, name, kernel, calls):
        self.name, self.kernel, self.calls = name, kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append((self.name, tuple(grid), kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


@pytest.fixture(params=[False, True], ids=["ieee", "tf32"])
def tf32(request):
    """``torch.backends.cuda.matmul.allow_tf32`` off and on (a property: monkeypatch cannot restore it)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.fixture
def launches(monkeypatch):
    """Every launch of the contrastive kernels during the test, in order."""
    kernels, calls = _kernel_module("contrastive"), []
    for name in ("_info_nce_fwd_kernel", "_info_nce_merge_kernel", "_info_nce_grad_kernel"):
        monkeypatch.setattr(kernels, name, _RecordedKernel(name, getattr(kernels, name), calls))
    return calls


@pytest.mark.triton
@pytest.mark.parametrize("n,m,d", [(37, 45, 19), (21, 21, 70), (21, 40, 150)], ids=lambda v: str(v))
@pytest.mark.parametrize("variant", range(6), ids=[v[0] for v in _variants(1, 1, 1)])
def test_triton_equals_reference(key_splits, n, m, d, variant):
    """Ragged shapes (D = 150: two backward D chunks of 128), with and without split keys."""
    name, kwargs = _variants(n, m, d)[variant]
    q, k = _inputs(n, m, d)
    _compare("triton", q, k, kwargs)


@pytest.mark.triton
@pytest.mark.parametrize("views", [2, 3], ids=["2views", "3views"])
def test_triton_nt_xent_equals_reference(key_splits, views):
    g = torch.Generator().manual_seed(views)
    zs = [torch.randn(17, 12, generator=g, requires_grad=True) for _ in range(views)]
    labels = torch.randint(0, 4, (17,), generator=g)
    for kwargs in ({}, {"labels": labels}):
        loss = fn.nt_xent(*zs, temperature=0.1, backend="triton", **kwargs)
        exact_zs = [z.detach().double().requires_grad_(True) for z in zs]
        expected = fn.nt_xent(*exact_zs, temperature=0.1, backend="reference", **kwargs)
        _assert_nt_xent_within_float64(loss, zs, expected, exact_zs, kwargs.get("labels"), 0.1)


@pytest.mark.triton
def test_triton_fp16_error_at_most_twice_reference():
    x0, x1 = _inputs(24, 24, 16, torch.float16)
    loss = fn.nt_xent(x0, x1, temperature=0.1, mode="symmetric", backend="triton")
    grads = torch.autograd.grad(loss, (x0, x1))
    assert loss.dtype == torch.float32 and all(g.dtype == torch.float16 for g in grads)
    e0, e1 = (x.detach().double().requires_grad_(True) for x in (x0, x1))
    exact = fn.nt_xent(e0, e1, temperature=0.1, mode="symmetric", backend="reference")
    h0, h1 = (x.detach().clone().requires_grad_(True) for x in (x0, x1))
    naive = _naive_half_nt_xent(h0, h1, 0.1, "symmetric")
    half_error_within_twice_reference(loss.detach(), naive.detach(), exact.detach())
    for got, ref, want in zip(grads, torch.autograd.grad(naive, (h0, h1)), torch.autograd.grad(exact, (e0, e1))):
        half_error_within_twice_reference(got, ref, want)


@pytest.mark.triton
def test_triton_splits_are_launched_and_merged(monkeypatch, launches):
    """With many SMs every pass splits its streamed side (one split per tile, the last ragged):
    the forward of each loss side is merged by the merge kernel, each gradient is one owner pass."""
    monkeypatch.setattr(_kernel_module("occupancy"), "PROGRAMS_PER_SM", 1000)
    q, k = _inputs(37, 45, 19)
    loss = fn.info_nce(q, k, 0.2, symmetric=True, backend="triton")
    torch.autograd.grad(loss, (q, k))
    names = [name for name, _, _ in launches]
    assert names == ["_info_nce_fwd_kernel", "_info_nce_merge_kernel"] * 2 + ["_info_nce_grad_kernel"] * 2
    # fp32 tiles of 32: 45 keys in splits of 32 + 13, 37 queries in 32 + 5
    assert [grid for _, grid, _ in launches] == [(2, 2), (1,), (2, 2), (1,), (2, 2, 1), (2, 2, 1)]
    assert [kwargs["SPLIT"] for name, _, kwargs in launches if name == "_info_nce_fwd_kernel"] == [True, True]


# Shapes of bench/bench_contrastive.py: (queries, keys, D): SimCLR's 2B rows against themselves,
# MoCo's batch against its 65,536-row queue, CLIP's batch.
BENCHMARK_SHAPES = ([(2 * b, 2 * b, d) for d in (128, 768) for b in (256, 1024, 8192)]
                    + [(b, 65536, 128) for b in (256, 1024)] + [(b, b, 768) for b in (256, 4096, 16384)])


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_triton_grids_fill_an_h100_at_the_benchmark_shapes(monkeypatch, dtype, tf32):
    """On 132 SMs every pass launches ≥ 2 × 132 programs, or one per tile where the shape has fewer
    tiles (SimCLR B = 256: 8 × 8 forward tiles of 64)."""
    kernels = _kernel_module("contrastive")
    monkeypatch.setattr(_kernel_module("occupancy"), "multiprocessors", lambda device: 132)
    monkeypatch.setattr(_kernel_module("occupancy"), "capability_major", lambda device: 9)
    device = torch.device("cuda")
    for n, m, d in BENCHMARK_SHAPES:
        for owner, streamed in ((n, m), (m, n)):
            blocks = kernels._blocks(owner, streamed, d, dtype)
            grid, per_split = kernels.forward_grid(owner, streamed, blocks, device)
            tiles = grid[0] * triton_cdiv(streamed, blocks[1])
            assert grid[0] * grid[1] >= min(264, tiles), (n, m, d, grid)
            assert (grid[1] - 1) * per_split < streamed <= grid[1] * per_split  # no empty split
            grid, per_split = kernels.backward_grid(owner, streamed, d, dtype, blocks, device)
            tiles = grid[0] * grid[2] * triton_cdiv(streamed, blocks[1])
            assert grid[0] * grid[1] * grid[2] >= min(264, tiles), (n, m, d, grid)
            assert (grid[1] - 1) * per_split < streamed <= grid[1] * per_split


def triton_cdiv(a, b):
    return -(-a // b)


@pytest.mark.triton
@pytest.mark.parametrize("variant", ["symmetric_labels", "labels_self", "positive_keys"])
def test_triton_two_runs_are_bitwise_equal(monkeypatch, variant):
    """Split forward and backward: no atomics, the splits merged in a fixed order."""
    monkeypatch.setattr(_kernel_module("occupancy"), "PROGRAMS_PER_SM", 1000)
    kwargs = dict(_variants(37, 45, 19))[variant]
    runs = []
    for _ in range(2):
        q, k = _inputs(37, 45, 19)
        loss, inputs = _call("triton", q, k, kwargs)
        runs.append([loss.detach(), *torch.autograd.grad(loss, inputs)])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


@pytest.mark.triton
def test_triton_fp16_backward_keeps_gradients_under_fp16_subnormals():
    """Gradient tiles g·scale·(p − 1_P) of at most 1.5e-8 (under fp16's smallest subnormal, 6e-8,
    they rounded to zero when cast for the tensor cores: every dK was 0) summed into dK of
    9e-8 to 3e-4: no nonzero is lost, each entry within fp16's rounding of the tile and the result.

    dK_j = Σ_i G_ij · q_i: casting G to fp16 (relative 2⁻¹¹, u) errs ≤ u Σ|G_ij||q_i|, the fp32
    logits and exps ≤ u more (their errors, ~(D + 4)·2⁻²⁴ relative, are far under u), rounding dK to
    fp16 ≤ u|dK_j| + 2⁻²⁵ (half its subnormal spacing).
    """
    n = d = 16
    g = torch.Generator().manual_seed(0)
    q = (4096 * torch.randn(n, d, generator=g, dtype=torch.float64)).half().requires_grad_(True)
    k = (torch.randn(n, d, generator=g, dtype=torch.float64) / 4096).half().requires_grad_(True)
    upstream = torch.tensor(2.0 ** -26 * n)  # G = upstream / N · (p − 1_P), |G| ≤ 2⁻²⁶
    loss = fn.info_nce(q, k, 1.0, normalize=False, backend="triton")
    grad_k = torch.autograd.grad(loss, k, grad_outputs=upstream)[0]
    exact_q, exact_k = q.detach().double(), k.detach().double().requires_grad_(True)
    exact = fn.info_nce(exact_q, exact_k, 1.0, normalize=False, backend="reference")
    exact_grad_k = torch.autograd.grad(exact, exact_k, grad_outputs=upstream.double())[0]
    tile = upstream.double() / n * (torch.softmax(exact_q @ exact_k.detach().T, 1) - torch.eye(n, dtype=torch.float64))
    assert tile.abs().max() < 2.0 ** -25 and (exact_grad_k.abs() > 2.0 ** -24).all()  # the case the fix is for
    u = 2.0 ** -11  # float16's unit roundoff
    bound = 2 * u * (tile.abs().T @ exact_q.abs()) + u * exact_grad_k.abs() + 2.0 ** -25
    assert (grad_k != 0).all()
    assert ((grad_k.double() - exact_grad_k).abs() <= bound).all()


@pytest.mark.triton
def test_triton_float32_takes_tf32_only_behind_the_switch(monkeypatch, launches, tf32):
    """fp32 dots are IEEE (32-wide tiles) unless torch.backends.cuda.matmul.allow_tf32; half dots
    always take the tensor cores (Triton's default "tf32", which leaves half operands as they are).
    The interpreter computes every dot in fp32, so both results are checked against float64 at
    float32's bound (TF32's own rounding shows on a card: tests/gpu_static.py checks the mma)."""
    for dtype in (torch.float32, torch.float16):
        launches.clear()
        q, k = _inputs(37, 45, 19, dtype)
        loss, inputs = _call("triton", q, k, {"normalize": False})
        torch.autograd.grad(loss, inputs)
        precisions = {kwargs["INPUT_PRECISION"] for _, _, kwargs in launches if "INPUT_PRECISION" in kwargs}
        assert precisions == {"ieee" if dtype == torch.float32 and not tf32 else "tf32"}
        widths = {kwargs["BLOCK_M"] for _, _, kwargs in launches if "BLOCK_M" in kwargs}
        assert widths == {32 if dtype == torch.float32 and not tf32 else 64}
    q, k = _inputs(37, 45, 19)
    _compare("triton", q, k, {})


def test_auto_takes_torch_for_float32_on_cuda_without_tf32(monkeypatch, tf32):
    """``auto`` on CUDA tensors (meta tensors standing in, the device gate opened): fp32 goes to the
    torch backend unless TF32 is allowed; half inputs go to Triton; explicit triton still runs fp32."""
    if backends.triton_import_reasons():
        pytest.skip("triton unusable")
    from fastssl.runtime import triton as triton_gate

    monkeypatch.setattr(triton_gate, "device_reasons", lambda tensors: [])
    fp32 = torch.empty(8, 4, device="meta")
    assert registry.select("info_nce", "auto", (fp32, fp32))[0] == ("triton" if tf32 else "torch")
    assert registry.select("info_nce", "auto", (fp32.half(), fp32.half()))[0] == "triton"
    assert registry.select("info_nce", "triton", (fp32, fp32))[0] == "triton"


@pytest.mark.triton
def test_triton_fp16_kernels_error_at_most_twice_reference(key_splits):
    """fp16 operands into the kernels (unnormalised: normalising computes in float32), symmetric
    so both passes own rows, split or not: error vs float64 ≤ 2× that of the loss computed in fp16."""
    q, k = (x / 19 ** 0.5 for x in _inputs(37, 37, 19, torch.float16))
    q, k = q.detach().requires_grad_(True), k.detach().requires_grad_(True)
    loss = fn.info_nce(q, k, 0.1, symmetric=True, normalize=False, backend="triton")
    grads = torch.autograd.grad(loss, (q, k))
    e0, e1 = (x.detach().double().requires_grad_(True) for x in (q, k))
    exact = fn.info_nce(e0, e1, 0.1, symmetric=True, normalize=False, backend="reference")
    h0, h1 = (x.detach().clone().requires_grad_(True) for x in (q, k))
    logits, labels = h0 @ h1.T / 0.1, torch.arange(37)
    cross_entropy = torch.nn.functional.cross_entropy
    naive = 0.5 * (cross_entropy(logits, labels) + cross_entropy(logits.T, labels))
    half_error_within_twice_reference(loss.detach(), naive.detach(), exact.detach())
    for got, ref, want in zip(grads, torch.autograd.grad(naive, (h0, h1)), torch.autograd.grad(exact, (e0, e1))):
        half_error_within_twice_reference(got, ref, want)


@pytest.fixture
def kernel_dtypes(monkeypatch):
    """The dtypes of the operands the triton InfoNCE kernels receive during the test (forward, backward)."""
    kernels, seen = _kernel_module("contrastive"), []
    for name in ("info_nce_row_statistics", "info_nce_grads"):
        def record(query, keys, *rest, _kernel=getattr(kernels, name)):
            seen.append((query.dtype, keys.dtype))
            return _kernel(query, keys, *rest)
        monkeypatch.setattr(kernels, name, record)
    return seen


@pytest.mark.triton
@pytest.mark.parametrize("mode", ["simclr", "symmetric"])
def test_triton_normalised_half_inputs_reach_the_half_kernels(kernel_dtypes, mode):
    """normalize=True with fp16 inputs: the rows are normalised in float32 and cast back once, so the
    kernels get fp16 operands (not float32 ones); loss and gradients within 2× of NT-Xent computed
    in fp16 throughout, against float64."""
    x0, x1 = _inputs(40, 40, 24, torch.float16)
    loss = fn.nt_xent(x0, x1, temperature=0.1, mode=mode, backend="triton")
    grads = torch.autograd.grad(loss, (x0, x1))
    assert kernel_dtypes and set(kernel_dtypes) == {(torch.float16, torch.float16)}
    assert all(g.dtype == torch.float16 for g in grads)
    e0, e1 = (x.detach().double().requires_grad_(True) for x in (x0, x1))
    exact = fn.nt_xent(e0, e1, temperature=0.1, mode=mode, backend="reference")
    h0, h1 = (x.detach().clone().requires_grad_(True) for x in (x0, x1))
    naive = _naive_half_nt_xent(h0, h1, 0.1, mode)
    half_error_within_twice_reference(loss.detach(), naive.detach(), exact.detach())
    for got, ref, want in zip(grads, torch.autograd.grad(naive, (h0, h1)), torch.autograd.grad(exact, (e0, e1))):
        half_error_within_twice_reference(got, ref, want)


@pytest.mark.parametrize("mode", ["simclr", "symmetric"])
def test_normalised_half_inputs_reach_the_torch_core_in_float32(monkeypatch, mode):
    """The torch path keeps its float32 normalised rows (its half accuracy bounds rely on them)."""
    seen, select = [], registry.select

    def recording_select(op, backend, tensors):
        chosen, core = select(op, backend, tensors)
        return chosen, lambda first, *rest: seen.append((chosen, first.dtype)) or core(first, *rest)

    monkeypatch.setattr(registry, "select", recording_select)
    x0, x1 = _inputs(40, 40, 24, torch.float16)
    fn.nt_xent(x0, x1, temperature=0.1, mode=mode, backend="torch")
    assert seen == [("torch", torch.float32)]


@pytest.mark.triton
def test_triton_opcheck_and_compile():
    q, k = _inputs(18, 21, 9)
    labels = torch.arange(18) % 4, torch.arange(21) % 4
    backends.preload("triton")
    core = backends.implementation("info_nce", "triton").fn
    torch.library.opcheck(core.op, (q, k, None, *labels, torch.arange(18) - 2, 3.0, True))
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, b: fn.info_nce(a, b, 0.3, backend="triton"), fullgraph=True,
                             backend="aot_eager")
    eager = fn.info_nce(q, k, 0.3, backend="triton")
    # bit for bit: aot_eager runs the same kernels in the same order around the opaque op
    torch.testing.assert_close(compiled(q, k), eager, rtol=0, atol=0)


@pytest.mark.triton
def test_triton_rejects_what_it_cannot_run(monkeypatch):
    q64 = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(fastssl.BackendUnavailableError, match="float16, bfloat16 or float32, got torch.float64"):
        fn.info_nce(q64, q64, backend="triton")
    with pytest.raises(fastssl.BackendUnavailableError, match="no bfloat16 arithmetic"):
        fn.info_nce(q64.bfloat16(), q64.bfloat16(), normalize=False, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(fastssl.BackendUnavailableError, match="CUDA tensors"):
        fn.info_nce(q64.float(), q64.float(), backend="triton")


@pytest.mark.triton
def test_triton_autotune_opt_in_picks_the_fastest_candidate(monkeypatch):
    """FASTSSL_TRITON_AUTOTUNE=1 times each candidate once per shape bucket and keeps the fastest:
    a ragged batch in the same bucket is not timed again."""
    backends.preload("triton")
    from fastssl.kernels import contrastive as kernels
    from fastssl.kernels import launch

    monkeypatch.setenv("FASTSSL_TRITON_AUTOTUNE", "1")
    monkeypatch.setattr(kernels, "AUTOTUNE_CANDIDATES", ((16, 16, 16), (32, 16, 16)))
    monkeypatch.setattr(launch, "_TUNED", {})
    timed = []

    def fake_bench(fn):
        fn()
        timed.append(1)
        return float(len(timed))  # the first candidate timed is the fastest

    monkeypatch.setattr(kernels.triton.testing, "do_bench", fake_bench)
    q, k = _inputs(20, 23, 7)
    loss = fn.info_nce(q, k, 0.2, backend="triton")
    exact_inputs = [x.detach().double().requires_grad_(True) for x in (q, k)]
    # value and gradients (the backward runs, and is tuned, in here) against float64
    _assert_within_float64(loss, [q, k], fn.info_nce(*exact_inputs, 0.2, backend="reference"), exact_inputs, {}, 0.2)
    assert {key[1] for key in launch._TUNED if key[0] == "info_nce"} == {"forward", "backward"}
    timed_once = len(timed)
    q, k = _inputs(19, 21, 7)  # the same buckets (32, 32)
    fn.info_nce(q, k, 0.2, backend="triton").backward()
    assert len(timed) == timed_once


@pytest.mark.requires_cuda
@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_triton_on_cuda_equals_reference(dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1000, 200, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(1100, 200, device="cuda", generator=g, dtype=dtype, requires_grad=True)
    loss = fn.info_nce(q, k, 0.1, backend="triton", symmetric=True, positive_index=None)
    if dtype == torch.float32:  # against the float64 reference, within the derived bounds
        exact_inputs = [x.detach().double().requires_grad_(True) for x in (q, k)]
        exact = fn.info_nce(*exact_inputs, 0.1, backend="reference", symmetric=True)
        _assert_within_float64(loss, [q, k], exact, exact_inputs, {"symmetric": True}, 0.1)
        return
    expected = fn.info_nce(q, k, 0.1, backend="reference", symmetric=True)
    tolerance = 2e-2
    torch.testing.assert_close(loss, expected, rtol=tolerance, atol=tolerance)
    for got, want in zip(torch.autograd.grad(loss, (q, k)), torch.autograd.grad(expected, (q, k))):
        torch.testing.assert_close(got.float(), want.float(), rtol=10 * tolerance, atol=10 * tolerance)


@pytest.mark.parametrize("batch", [4, 200])
def test_small_calls_run_the_plain_code_large_ones_the_op(batch):
    """Up to PLAIN_MAX_LOGITS logits the torch backend runs the plain reference code (its op's fixed
    costs exceed the arithmetic there), above it the blocked op; both equal the reference."""
    ops = []

    class Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.namespace == "fastssl":
                ops.append(func.name())
            return func(*args, **(kwargs or {}))

    zs = [torch.randn(batch, 5, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    with Spy():
        loss = fn.nt_xent(*zs, backend="torch")
        grads = torch.autograd.grad(loss, zs)
    fused = (2 * batch) ** 2 > contrastive.PLAIN_MAX_LOGITS
    assert fused == (batch == 200)
    assert ops == (["fastssl::info_nce_self", "fastssl::info_nce_self_backward"] if fused else [])
    expected = fn.nt_xent(*zs, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, torch.autograd.grad(expected, zs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
