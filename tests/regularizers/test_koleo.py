"""KoLeo (lightly's ``KoLeoLoss``) against an independent float64 formula, on every backend."""
import math

import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl.regularizers import torch_backend as koleo_torch_backend
from fastssl.runtime import blocks

from helpers import backend_params
from oracles import koleo64

BACKENDS = backend_params("koleo")
U32 = torch.finfo(torch.float32).eps / 2


def separated_rows(n, d, dtype=torch.float32):
    """Gaussian rows whose nearest neighbour leads the runner-up by far more than float32 can blur
    (asserted): every path must then pick the same neighbours."""
    x = torch.randn(n, d, dtype=torch.float64)
    unit = torch.nn.functional.normalize(x, dim=1)
    cosine = unit @ unit.T
    cosine.fill_diagonal_(-2)
    top2 = cosine.topk(2, dim=1).values
    assert (top2[:, 0] - top2[:, 1]).min() > 1000 * d * U32
    return x.to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,d", [(2, 5), (37, 16), (50, 3)], ids=["N2-D5", "N37-D16", "N50-D3"])
@pytest.mark.parametrize("ragged", [False, True], ids=["one-block", "ragged-blocks"])
def test_koleo_equals_float64_formula(n, d, ragged, backend, monkeypatch):
    if ragged:
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 7 * n)  # blocks of 7 rows (and a ragged last one)
        monkeypatch.setattr(koleo_torch_backend, "NEIGHBOUR_TILE_SCALE", 1)
    x = separated_rows(n, d)
    loss = fn.koleo(x, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    exact = koleo64(x)
    # Each term −log(δ_i + eps), δ_i = ‖x̂_i − x̂_n + eps‖: normalising, subtracting and the norm's
    # sum of D squares round to ≤ (D + 4)·u relative of ‖x̂_i‖ + ‖x̂_n‖ = 2, so |Δ log| ≤ 2(D + 4)u / δ_i.
    unit = torch.nn.functional.normalize(x.double(), dim=1)
    distances = torch.cdist(unit, unit).fill_diagonal_(math.inf)
    nearest = distances.min().item()
    bound = 2 * (d + 4) * U32 / max(nearest, 1e-6) + 4 * U32 * abs(exact)
    assert abs(loss.item() - exact) <= bound, (loss.item(), exact, bound)
    torch.testing.assert_close(fn.koleo(x.double(), backend=backend).item(), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_koleo_gradcheck(backend):
    x = separated_rows(9, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn.koleo(t, 2.0, 1e-8, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: fn.koleo(t, 3.0, 1e-3, backend=backend), (x,))
    assert torch.autograd.gradcheck(lambda t: fn.koleo(t, 1.0, 1e-8, backend=backend), (x,))


@pytest.mark.parametrize("p", [0.5, 1.0, 1.5, 2.0])
def test_koleo_torch_gradient_equals_autograd_of_the_reference(p):
    """The torch backend's closed-form gradient (p ≥ 1; autograd below) against autograd
    through the reference, float64, one group and groups of 4."""
    x = separated_rows(16, 5, dtype=torch.float64).requires_grad_(True)
    for group_size in (None, 4):
        loss = fn.koleo(x, p, 1e-3, group_size=group_size, backend="torch")
        expected = fn.koleo(x, p, 1e-3, group_size=group_size, backend="reference")
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        grad, = torch.autograd.grad(loss, x)
        expected_grad, = torch.autograd.grad(expected, x)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_koleo_p_and_eps_follow_lightly(backend):
    x = separated_rows(20, 6)
    for p, eps in ((1.0, 1e-8), (3.0, 1e-3)):
        exact = koleo64(x, p, eps)
        torch.testing.assert_close(fn.koleo(x.double(), p, eps, backend=backend).item(), exact,
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_koleo_batch_of_one_and_duplicates_are_finite(backend):
    one = torch.randn(1, 4)
    torch.testing.assert_close(fn.koleo(one.double(), backend=backend).item(), koleo64(one), rtol=1e-12, atol=0)
    twins = torch.randn(3, 4).repeat(2, 1)
    loss = fn.koleo(twins, backend=backend)
    assert torch.isfinite(loss)
    # Each row's neighbour is its twin: distance ‖eps‖₂ = eps·√D, the loss −log(eps·√D + eps).
    torch.testing.assert_close(loss.item(), -math.log(1e-8 * 2 + 1e-8), rtol=1e-6, atol=0)


def test_koleo_module_equals_functional_with_lightlys_defaults():
    criterion = fastssl.KoLeoLoss()
    assert (criterion.p, criterion.eps) == (2, 1e-8)
    x = separated_rows(12, 5)
    torch.testing.assert_close(criterion(x), fn.koleo(x), rtol=0, atol=0)
    assert fastssl.koleo is fn.koleo and fastssl.losses.KoLeoLoss is fastssl.KoLeoLoss


def test_koleo_compiles_fullgraph_like_eager():
    x = separated_rows(16, 8)
    compiled = torch.compile(lambda t: fn.koleo(t, backend="torch"), fullgraph=True, backend="aot_eager")
    # The same ops in the same order as eager: bit-identical.
    torch.testing.assert_close(compiled(x), fn.koleo(x, backend="torch"), rtol=0, atol=0)


def test_koleo_bad_input_names_the_argument():
    with pytest.raises(ValueError, match=r"x must have 2 dimensions, got shape \(4,\)"):
        fn.koleo(torch.randn(4))
    with pytest.raises(TypeError, match=r"x must be float16, bfloat16, float32 or float64, got torch.int64 \(shape \(3, 2\)\)"):
        fn.koleo(torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="p must be a finite number > 0, got 0"):
        fastssl.KoLeoLoss(p=0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0, got -1.0"):
        fn.koleo(torch.randn(3, 2), eps=-1.0)


# ============================================================================================
# DINOv3's form: groups of rows (and, in tests/distributed, rows gathered from every rank)
# ============================================================================================
def grouped_koleo64(x, group_size, p=2.0, eps=1e-8):
    """DINOv3's loss_group_size in one process: lightly's KoLeo within each group of consecutive
    rows, averaged over all rows (the groups are of equal size)."""
    groups = x.split(group_size)
    return sum(koleo64(group, p, eps) for group in groups) / len(groups)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [1, 4, 9, 36], ids=lambda g: f"G{g}")
@pytest.mark.parametrize("tiles", ["one-tile", "ragged-tiles", "symmetric-tiles"])
def test_koleo_groups_equal_float64_formula(group_size, tiles, backend, monkeypatch):
    if tiles == "ragged-tiles":  # tiles of 5 rows × 3 candidates: row and column tails, self entries split
        monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 15)
        monkeypatch.setattr(koleo_torch_backend, "NEIGHBOUR_TILE_SCALE", 1)
        monkeypatch.setattr(koleo_torch_backend, "NEIGHBOUR_TILE_COLUMNS", 3)
    if tiles == "symmetric-tiles":  # one group of 36 (G36) in tiles of 5 × 5 on and above the diagonal
        monkeypatch.setattr(koleo_torch_backend, "SYMMETRIC_MIN_ROWS", 2)
        monkeypatch.setattr(koleo_torch_backend, "SYMMETRIC_TILE_ROWS", 5)
    x = separated_rows(36, 6, dtype=torch.float64).requires_grad_(True)
    loss = fn.koleo(x, group_size=group_size, backend=backend)
    exact = grouped_koleo64(x.detach(), group_size)
    torch.testing.assert_close(loss.item(), exact, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(loss, x)
    (expected,) = torch.autograd.grad(fn.koleo(x, group_size=group_size, backend="reference"), x)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_koleo_groups_gradcheck(backend, monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 6)  # tiles of 2 rows × 3 candidates
    monkeypatch.setattr(koleo_torch_backend, "NEIGHBOUR_TILE_SCALE", 1)
    monkeypatch.setattr(koleo_torch_backend, "NEIGHBOUR_TILE_COLUMNS", 3)
    x = separated_rows(12, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: fn.koleo(t, group_size=6, backend=backend), (x,))


def test_koleo_tiles_bound_the_similarities_held(monkeypatch):
    """The torch backend's neighbour search holds at most one tile of NEIGHBOUR_TILE_SCALE ×
    BLOCK_ELEMENTS similarities (never the N × N matrix): every GEMM it makes is checked here, on
    300 rows with 4,000-entry tiles (90,000 similarities in all)."""
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 1000)
    monkeypatch.setattr(koleo_torch_backend, "NEIGHBOUR_TILE_COLUMNS", 64)
    x = torch.nn.functional.normalize(torch.randn(300, 8, dtype=torch.float64), dim=1)[None]
    largest = []
    original = torch.Tensor.__matmul__

    def counting(a, b):
        out = original(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    neighbours = koleo_torch_backend.nearest_other_in_groups(x, x, 0)
    monkeypatch.setattr(torch.Tensor, "__matmul__", original)
    assert largest and max(largest) <= koleo_torch_backend.NEIGHBOUR_TILE_SCALE * 1000 < 300 * 300 / 4
    cosine = (x[0] @ x[0].T).fill_diagonal_(-2)
    assert torch.equal(neighbours[0], cosine.argmax(dim=1))


@pytest.mark.parametrize("n,tile", [(50, 7), (49, 7), (12, 12), (3, 1)])
def test_koleo_symmetric_search_equals_argmax(n, tile, monkeypatch):
    """The symmetric search (tiles on and above the diagonal, each offering its row max to its rows
    and its column max to its columns' rows) finds every row's argmax, ragged last tiles and tiles
    of one row included; and no GEMM it makes is larger than a tile."""
    monkeypatch.setattr(koleo_torch_backend, "SYMMETRIC_TILE_ROWS", tile)
    unit = torch.nn.functional.normalize(separated_rows(n, 6, dtype=torch.float64), dim=1)
    largest = []
    original = torch.Tensor.__matmul__

    def counting(a, b):
        out = original(a, b)
        largest.append(out.shape)
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", counting)
    neighbours = koleo_torch_backend.nearest_other_symmetric(unit)
    monkeypatch.setattr(torch.Tensor, "__matmul__", original)
    assert max(max(shape) for shape in largest) <= tile
    cosine = (unit @ unit.T).fill_diagonal_(-2)
    assert torch.equal(neighbours, cosine.argmax(dim=1))


def test_koleo_symmetric_search_keeps_the_lowest_of_equal_candidates(monkeypatch):
    """Rows 0, 4 and 9 are one vector: each one's neighbours tie exactly, and as argmax the lowest
    index other than itself wins, wherever the tiles put the candidates."""
    monkeypatch.setattr(koleo_torch_backend, "SYMMETRIC_TILE_ROWS", 3)
    unit = torch.nn.functional.normalize(torch.randn(11, 4, dtype=torch.float64), dim=1)
    unit[4] = unit[9] = unit[0]
    neighbours = koleo_torch_backend.nearest_other_symmetric(unit)
    assert neighbours[[0, 4, 9]].tolist() == [4, 0, 0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_koleo_duplicates_have_a_finite_gradient(backend):
    # three rows, each twice: twins are each other's neighbours, so their two terms' gradients
    # cancel exactly (lightly's formula), and the value is −log(eps·√D + eps)
    twins = torch.randn(3, 4, dtype=torch.float64).repeat(2, 1).requires_grad_(True)
    loss = fn.koleo(twins, backend=backend)
    (grad,) = torch.autograd.grad(loss, twins)
    assert torch.isfinite(grad).all() and grad.abs().max() == 0
    # a triplet and a single: the gradient is finite and that of the float64 formula
    rows = torch.randn(2, 5, dtype=torch.float64)
    x = torch.cat([rows[:1].repeat(3, 1), rows[1:]]).requires_grad_(True)
    (grad,) = torch.autograd.grad(fn.koleo(x, backend=backend), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(fn.koleo(x, backend=backend).item(), koleo64(x.detach()), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_koleo_half_duplicates_stay_finite(dtype):
    # dinov2's NaN: eps = 1e-8 is 0 in float16; here normalising and distances run in float32
    x = torch.randn(4, 8).repeat(2, 1).to(dtype).requires_grad_(True)
    loss = fn.koleo(x, backend="torch")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    torch.testing.assert_close(loss.item(), -math.log(1e-8 * math.sqrt(8) + 1e-8), rtol=1e-6, atol=0)


def test_koleo_group_size_errors_are_dinov3s():
    with pytest.raises(ValueError, match="Global batch size 10 must be divisible by loss group size 4."):
        fn.koleo(torch.randn(10, 3), group_size=4)
    with pytest.raises(ValueError, match="group_size must be >= 1, got 0"):
        fastssl.KoLeoLoss(group_size=0)
    criterion = fastssl.KoLeoLoss(group_size=5)
    x = separated_rows(10, 4)
    assert torch.equal(criterion(x), fn.koleo(x, group_size=5))
    assert criterion.state_dict() == {}  # lightly's: no parameters, no buffers
    assert isinstance(criterion.pairwise_distance, torch.nn.PairwiseDistance)
