"""CO2Regularizer against lightly 1.6's formula in float64, within a bound derived from the
computation; its memory bank as lightly's; its lightly import path."""
import pytest
import torch

import fastssl.functional as fn
from fastssl.regularizer import CO2Regularizer

from helpers import FLOAT_DTYPES, U32, assert_within, backend_params, gamma, logit_error, unit_roundoff
from oracles import lightly_co2_64


def co2_bounds(out0, out1, negatives, alpha, t_consistency, u=U32):
    """(|δL|, normwise gradient bound). Each log-probability of p and q is off by
    ε = 2δs + (M + 2)u (δs = ``logit_error``: a log-softmax moves by at most twice its largest
    logit error; the M-term exp-sum); each row's KL Σ e^q (q − p) then by
    ε(2 + Σ e^q|q − p|) (the e^q factor moves by ε relative), its M-term sum by γ_M of Σ e^q|q − p|;
    α/2 of the batch mean of both KLs. The gradient's softmax entries move by ε relative, its
    D-term products and the normalisation by (D + 4)u."""
    _, p, q = lightly_co2_64(out0.detach(), out1.detach(), negatives, alpha, t_consistency)
    candidates, dim = p.shape[1], out0.shape[1]
    epsilon = 2 * logit_error(dim, abs(1 / t_consistency), u) + (candidates + 2) * u
    row_error = 0.0
    for a, b in ((p, q), (q, p)):
        weighted = (b.exp() * (b - a).abs()).sum(dim=1)
        row_error = row_error + epsilon * (2 + weighted) + gamma(candidates, u) * weighted
    value = abs(alpha) * 0.5 * row_error.mean().item()
    kappa = 4 * (epsilon * (1 + (p - q).abs().max().item()) + (dim + 4) * u)
    return value, kappa


@pytest.mark.parametrize("backend", backend_params("co2"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape,alpha,t_consistency", [((12, 7), 1.0, 0.05), ((5, 16), 0.3, 0.2)])
@pytest.mark.parametrize("with_bank", [False, True], ids=["batch", "bank"])
def test_co2_equals_float64(backend, dtype, shape, alpha, t_consistency, with_bank, block_elements):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(*shape, generator=g, dtype=torch.float64)
    out0, out1 = ((base + 0.5 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True)
                  for _ in range(2))
    bank = torch.nn.functional.normalize(torch.randn(20, shape[1], generator=g), dim=1) if with_bank else None
    loss = fn.co2(out0, out1, bank, alpha, t_consistency, backend=backend)
    x0, x1 = (v.detach().double().requires_grad_(True) for v in (out0, out1))
    exact, _, _ = lightly_co2_64(x0, x1, bank, alpha, t_consistency)
    value_bound, kappa = co2_bounds(out0, out1, bank, alpha, t_consistency, unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    for got, want in zip(torch.autograd.grad(loss, (out0, out1)), torch.autograd.grad(exact, (x0, x1))):
        assert got.abs().sum() > 0  # lightly's returns a tensor without gradient; fastssl's regularizes
        assert_within(got, want, kappa * want.abs().max().item(), "gradient")


def test_co2_memory_bank_is_lightlys():
    torch.manual_seed(3)
    regularizer = CO2Regularizer(alpha=0.5, t_consistency=0.1, memory_bank_size=(10, 6))
    assert (regularizer.alpha, regularizer.t_consistency, regularizer.log_target) == (0.5, 0.1, True)
    assert list(regularizer.state_dict()) == []  # lightly's bank buffers are not persistent
    for step in range(3):  # 4 + 4 rows, then 2 rows before the end: lightly cuts and restarts
        out0, out1 = torch.randn(4, 6), torch.randn(4, 6)
        bank = regularizer.memory_bank.bank.clone()
        loss = regularizer(out0, out1)
        exact, _, _ = lightly_co2_64(out0, out1, bank, 0.5, 0.1)
        assert_within(loss, exact, co2_bounds(out0, out1, bank, 0.5, 0.1)[0], f"loss at step {step}")
        written = slice(4 * step, min(4 * step + 4, 10))
        expected = torch.nn.functional.normalize(out1, dim=1)[: written.stop - written.start]
        torch.testing.assert_close(regularizer.memory_bank.bank[written], expected, rtol=0, atol=0)
    assert int(regularizer.memory_bank.bank_ptr) == 0


BAD_INPUTS = [
    pytest.param(lambda: CO2Regularizer()(torch.randn(4, 4), torch.randn(4, 5)), ValueError, r"out0.*out1",
                 id="shapes"),
    pytest.param(lambda: CO2Regularizer(t_consistency=0.0), ValueError, r"Illegal t_consistency", id="temperature"),
    pytest.param(lambda: fn.co2(torch.randn(4, 4), torch.randn(4, 4), negatives=torch.randn(8, 3)), ValueError,
                 r"negatives must be \(K, 4\)", id="bank-dim"),
    pytest.param(lambda: CO2Regularizer(memory_bank_size=16), ValueError, r"does not specify the feature dimension",
                 id="bank-bare-int"),
]


@pytest.mark.parametrize("call,error,message", BAD_INPUTS)
def test_co2_bad_input_raises_a_clear_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("backend", backend_params("co2"))
def test_co2_batch_of_one_is_exactly_zero_like_lightly(backend):
    out0, out1 = torch.randn(1, 5, requires_grad=True), torch.randn(1, 5, requires_grad=True)
    loss = fn.co2(out0, out1, backend=backend)  # one candidate, the positive: log-softmax 0
    loss.backward()
    assert loss.item() == 0.0 and out0.grad.abs().max() == 0


@pytest.mark.parametrize("backend", backend_params("co2"))
def test_co2_zero_and_tiny_rows_take_normalizes_clamped_gradient(backend, block_elements):
    """A zero row and one of norm below F.normalize's eps (1e-12): x / eps there, gradient g / eps
    (the torch backend's closed-form normalisation takes that branch too)."""
    g = torch.Generator().manual_seed(1)
    out0, out1 = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(6, 8, generator=g,
                                                                                  dtype=torch.float64)
    out0[2], out1[4] = 0.0, 1e-14 * out1[4]
    out0.requires_grad_(True), out1.requires_grad_(True)
    loss = fn.co2(out0, out1, backend=backend)
    x0, x1 = (v.detach().clone().requires_grad_(True) for v in (out0, out1))
    exact, _, _ = lightly_co2_64(x0, x1)
    value_bound, kappa = co2_bounds(x0, x1, None, 1.0, 0.05, unit_roundoff(torch.float64))
    assert_within(loss, exact, value_bound, "loss")
    for got, want in zip(torch.autograd.grad(loss, (out0, out1)), torch.autograd.grad(exact, (x0, x1))):
        assert_within(got, want, kappa * want.abs().max().item(), "gradient")
