"""lightly's ``lightly.loss.msn_loss`` / ``pmsn_loss`` module paths and the msn_loss helpers,
against float64 transcriptions of lightly's formulas."""
import pytest
import torch

import fastssl
from fastssl import msn_loss, pmsn_loss

from helpers import U32, assert_within, gamma, sinkhorn_bound


def _float64_sinkhorn(p: torch.Tensor, iterations: int) -> torch.Tensor:
    """lightly 1.6's msn_loss.sinkhorn, one process, in float64."""
    targets, prototypes = p.shape
    q = p.double().T / p.double().sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / prototypes
        q = q / q.sum(dim=0, keepdim=True) / targets
    return (q * targets).T


def test_module_paths_hold_lightlys_names():
    assert msn_loss.MSNLoss is fastssl.MSNLoss
    assert pmsn_loss.PMSNLoss is fastssl.PMSNLoss and pmsn_loss.PMSNCustomLoss is fastssl.PMSNCustomLoss


def test_prototype_probabilities_match_the_formula():
    torch.manual_seed(0)
    queries, prototypes, temperature = torch.randn(8, 16), torch.randn(12, 16), 0.1
    probabilities = msn_loss.prototype_probabilities(queries, prototypes, temperature)
    exact = torch.softmax(queries.double() @ prototypes.double().T / temperature, dim=1)
    # each logit s is off by γ_D·Σ|q||p|/τ + u·|s| (the division) and, shifted by the row's max,
    # by u·|s − max| more; an entry moves by its own logit's error plus the worst one (through the
    # normaliser), relative, plus the rounding of exp, the K-term sum and the division; entries
    # below float32's normal range are flushed
    logits = queries.double() @ prototypes.double().T / temperature
    shifted = logits - logits.max(dim=1, keepdim=True).values
    logit_error = (gamma(16) * (queries.double().abs() @ prototypes.double().abs().T) / temperature
                   + U32 * (logits.abs() + shifted.abs()))
    worst = logit_error.max(dim=1, keepdim=True).values
    tiny = torch.finfo(torch.float32).tiny
    assert_within(probabilities, exact, exact * (logit_error + worst + gamma(12 + 3)) + tiny)


def test_sharpen_matches_the_formula():
    torch.manual_seed(2)
    probabilities = torch.softmax(torch.randn(8, 12), dim=1)
    sharpened = msn_loss.sharpen(probabilities, 0.25)
    powered = probabilities.double() ** 4
    exact = powered / powered.sum(dim=1, keepdim=True)
    # pow: ≤ 2u relative; the K-term positive sum: γ_K more; the division: u
    assert_within(sharpened, exact, exact * (2 * U32 + gamma(12 + 2) + U32))


@pytest.mark.parametrize("iterations", [1, 3])
def test_sinkhorn_matches_lightlys_iteration(iterations):
    torch.manual_seed(1)
    probabilities = torch.softmax(torch.randn(10, 7), dim=1)
    balanced = msn_loss.sinkhorn(probabilities, iterations)
    assert balanced.dtype == probabilities.dtype and not balanced.requires_grad
    exact = _float64_sinkhorn(probabilities, iterations)
    # the op runs lightly's rounds in the log domain on log p with ε = 1 (scores' span included)
    assert_within(balanced, exact, sinkhorn_bound(probabilities.double().log(), iterations, 1.0, exact))


def test_sinkhorn_without_iterations_returns_the_input():
    probabilities = torch.softmax(torch.randn(4, 3), dim=1)
    assert msn_loss.sinkhorn(probabilities, 0) is probabilities


def test_prototype_probabilities_names_mismatched_dims():
    with pytest.raises(ValueError, match=r"queries \(2, 3\).*prototypes \(4, 5\)"):
        msn_loss.prototype_probabilities(torch.randn(2, 3), torch.randn(4, 5), 0.1)
