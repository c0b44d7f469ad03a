"""The Triton Sinkhorn's single-launch path (``kernels.clustering.sinkhorn_codes``: every phase on
(B, K) tiles, partial LSEs combined in a fixed order) under the interpreter, against float64, at
shapes that split both axes into several tiles (and ragged last tiles), with and without marginals."""
import pytest
import torch

from fastssl.clustering import triton_backend
from fastssl.kernels import clustering as kernels

from helpers import sinkhorn_bound
from oracles import lightly_sinkhorn64, marginal_sinkhorn64, prototype_scores

pytestmark = pytest.mark.triton

# 70 × 300: 3 (float64: 5) row tiles × 3 prototype tiles, every last one ragged; 1 × 1 the least
SHAPES = [(70, 300), (16, 129), (1, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("iterations", [1, 3], ids=lambda n: f"it{n}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_single_launch_path_equals_float64(shape, iterations, dtype):
    torch.manual_seed(0)
    scores = prototype_scores(*shape, dtype=dtype)
    codes = triton_backend.sinkhorn_forward(scores, iterations, 0.05, None, None, 0.0, False)
    exact = lightly_sinkhorn64(scores, iterations, 0.05)
    bound = sinkhorn_bound(scores, iterations, 0.05, exact, dtype=dtype)
    assert codes.dtype == dtype
    assert ((codes.double() - exact).abs() <= bound).all(), ((codes.double() - exact).abs() / bound).max()


def test_single_launch_path_with_marginals_equals_float64():
    torch.manual_seed(1)
    scores = prototype_scores(70, 300, dtype=torch.float64)
    rows, cols = torch.rand(300, dtype=torch.float64) + 0.5, torch.rand(70, dtype=torch.float64) + 0.5
    codes = triton_backend.sinkhorn_forward(scores, 3, 0.3, rows, cols, 0.0, False)
    exact, _ = marginal_sinkhorn64(scores, 3, 0.3, rows, cols)
    bound = sinkhorn_bound(scores, 3, 0.3, exact, rows, cols, dtype=torch.float64)
    assert ((codes - exact).abs() <= bound).all()


def test_the_single_launch_path_is_deterministic():
    """The partials are combined in a fixed order (no atomics on values): a second call gives the
    same bits."""
    scores = prototype_scores(70, 300)
    first = triton_backend.sinkhorn_forward(scores, 3, 0.05, None, None, 0.0, False)
    assert torch.equal(first, triton_backend.sinkhorn_forward(scores, 3, 0.05, None, None, 0.0, False))
    assert not kernels.persistent(scores)  # the interpreter runs programs one by one: no grid barrier
