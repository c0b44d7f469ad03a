"""runtime.normalize: F.normalize and its written-out backward == float64 autograd through F.normalize."""
import pytest
import torch
import torch.nn.functional as F

from fastssl.runtime.normalize import normalize, normalize_backward_
from helpers import _normalization_grad_abs, assert_within, gamma, normalized_entry_error, unit_roundoff


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("dim, eps", [(2, 1e-12), (1, 1e-12), (-1, 1e-8)])
def test_normalize_and_its_backward_match_float64_autograd(dtype, dim, eps):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 9, generator=g, dtype=dtype)
    along = x.movedim(dim, -1)  # a view: rows along ``dim`` written through it
    along[0, 0] = 0  # a zero vector and one below eps: the clamped branch (gradient g/eps)
    along[1, 1] *= eps / 10
    grad = torch.randn(x.shape, generator=g, dtype=dtype)

    normalized = normalize(x, dim, eps)
    result = normalize_backward_(normalized, grad.clone())

    x64 = x.double().requires_grad_()
    unit64 = F.normalize(x64, dim=dim, eps=eps)
    (grad64,) = torch.autograd.grad(unit64, x64, grad.double())
    u, size = unit_roundoff(dtype), x.shape[dim]
    e = normalized_entry_error(size, u)
    assert_within(normalized.unit, unit64, e * unit64.abs().detach(), "unit vectors")
    assert bool(normalized.unclamped.flatten().logical_not().sum() == 2)
    clamped = x64.detach().norm(dim=dim, keepdim=True).clamp_min(eps)
    # the dot x̂·g (γ_D) of entries off by e, two roundings in g − x̂(x̂·g), the norm's (D/2 + 1)u and a division
    bound = (gamma(size + 4, u) + 3 * e) * _normalization_grad_abs(
        unit64.detach().movedim(dim, -1), clamped.movedim(dim, -1), grad.double().abs().movedim(dim, -1))
    assert_within(result, grad64, bound.movedim(-1, dim), "gradients")


def test_normalize_backward_writes_over_its_gradient_argument():
    x, grad = torch.randn(4, 5), torch.randn(4, 5)
    assert normalize_backward_(normalize(x, 1), grad) is grad
