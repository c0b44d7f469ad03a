"""KoLeo (lightly's ``KoLeoLoss``) against an independent float64 formula, on every backend."""
import math

import pytest
import torch

import fastssl
import fastssl.functional as fn
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
