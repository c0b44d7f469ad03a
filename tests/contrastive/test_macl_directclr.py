"""MACL and DirectCLR on every backend against lightly 1.6's formulas in float64, within bounds
derived from the computation; lightly's module behaviour."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
from fastssl import DirectCLRLoss, MACLLoss, contrastive
from fastssl.contrastive import torch_backend as contrastive_torch

from helpers import (FLOAT_DTYPES, U32, assert_ce_within, assert_info_nce_grads_within, assert_within,
                     backend_params, gamma, logit_error, seeded_views, simclr_blocks, unit_roundoff)
from oracles import lightly_macl64, lightly_nt_xent


def views(n, d, dtype=torch.float32):
    return seeded_views(n, d, noise=0.8, dtype=dtype, grad=True)


def macl_bounds(z0, z1, temperature, alpha, a_0, u=U32):
    """(|δL|, normwise gradient bound) of MACL. A (a mean of N cosines) is off by δA = logit_error(D, 1)
    + γ_N, so 1/t by α·δA/|1 + α(A − A₀)| + 3u relative, which adds |s| times that to each logit's
    ``logit_error`` (scale |1/t|). Each row's ℓ = −log p₊ moves by ≤ 2δs + (M + 2)u + 2uℓ, its
    weight V = 1/(1 − p₊ + ε) by V·p₊·V·δℓ (relative), so Vℓ by Vδℓ(1 + ℓp₊V); the mean adds γ_2N.
    The gradient Σ V ∂ℓ: each softmax entry off by 2δs + (2M + 3)u relative, V by p₊Vδℓ, the
    D-term products and the normalisation by (D + 4)u."""
    x = torch.cat([F.normalize(z0.detach().double(), dim=1), F.normalize(z1.detach().double(), dim=1)])
    n, d = z0.shape
    cosine = x @ x.T
    positive = torch.cat([torch.diag(cosine, n), torch.diag(cosine, -n)])
    mean_positive = positive.mean()
    denominator = 1 + alpha * (mean_positive - a_0)
    inverse_t = (1 / (temperature * denominator)).abs().item()
    t_error = abs(alpha) * (logit_error(d, 1.0, u) + gamma(n, u)) / denominator.abs().item() + 3 * u
    delta_s = logit_error(d, inverse_t, u) + inverse_t * t_error
    logits = (cosine * inverse_t).fill_diagonal_(float("-inf"))
    losses = torch.logsumexp(logits, dim=1) - positive * inverse_t
    p = torch.exp(-losses)
    weights = 1 / (1 - p + 1e-8)
    candidates = 2 * n - 1
    row_error = 2 * delta_s + (candidates + 2) * u + 2 * u * losses
    value = (weights * row_error * (1 + losses * p * weights)).mean() + gamma(2 * n, u) * (weights * losses).mean()
    kappa = 2 * delta_s + (2 * candidates + d + 8) * u + (p * weights * row_error).max()
    return value.item(), kappa.item()


@pytest.fixture(params=["dense", "blocked"])
def macl_path(request, monkeypatch):
    """The torch backend's two MACL paths: the dense 2B × 2B logits of small batches, and the
    blocked InfoNCE op (both crossovers set to 0)."""
    if request.param == "blocked":
        monkeypatch.setattr(contrastive, "MACL_PLAIN_MAX_ROWS", 0)
        monkeypatch.setattr(contrastive_torch, "PLAIN_MAX_LOGITS", 0)
    return request.param


@pytest.mark.parametrize("backend", backend_params("info_nce"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", [(7, 12), (20, 5)])
@pytest.mark.parametrize("temperature,alpha,a_0", [(0.1, 0.5, 0.0), (0.2, 1.0, 0.3), (0.5, 0.0, 1.0)],
                         ids=["defaults", "alpha1", "alpha0"])
def test_macl_equals_float64(backend, dtype, shape, temperature, alpha, a_0, macl_path):
    if backend != "torch" and macl_path == "blocked":
        pytest.skip("the dense/blocked choice is the torch backend's")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton InfoNCE kernels take float16, bfloat16 or float32")
    z0, z1 = views(*shape, dtype)
    loss = MACLLoss(temperature, alpha, a_0, backend=backend)(z0, z1)
    x0, x1 = (v.detach().double().requires_grad_(True) for v in (z0, z1))
    exact = lightly_macl64(x0, x1, temperature, alpha, a_0)
    value_bound, kappa = macl_bounds(z0, z1, temperature, alpha, a_0, unit_roundoff(dtype))
    assert_within(loss, exact, value_bound, "loss")
    for got, want in zip(torch.autograd.grad(loss, (z0, z1)), torch.autograd.grad(exact, (x0, x1))):
        assert_within(got, want, kappa * want.abs().max().item(), "gradient")


def test_macl_takes_the_dense_path_up_to_the_crossover_only(monkeypatch):
    calls = []
    dense = contrastive._macl_plain_losses
    monkeypatch.setattr(contrastive, "_macl_plain_losses", lambda *args: calls.append(args[0].shape) or dense(*args))
    for batch in (4, contrastive.MACL_PLAIN_MAX_ROWS // 2, contrastive.MACL_PLAIN_MAX_ROWS // 2 + 1):
        fastssl.functional.macl(torch.randn(batch, 3), torch.randn(batch, 3), backend="torch")
    fastssl.functional.macl(torch.randn(4, 3), torch.randn(4, 3), backend="reference")  # the spec: never
    assert calls == [(4, 3), (contrastive.MACL_PLAIN_MAX_ROWS // 2, 3)]


def test_macl_module_is_lightlys():
    loss = MACLLoss()
    assert (loss.temperature, loss.alpha, loss.A_0, loss.eps) == (0.1, 0.5, 0.0, 1e-8)
    assert list(loss.state_dict()) == []
    for kwargs, message in (({"temperature": 0.0}, r"Illegal initial temperature: abs\(0.0\) < 1e-8"),
                            ({"alpha": 1.5}, r"Alpha must be in the range \[0, 1\]."),
                            ({"A_0": -0.1}, r"A_0 must be in the range \[0, 1\].")):
        with pytest.raises(ValueError, match=message):
            MACLLoss(**kwargs)
        with pytest.raises(ValueError, match=message):  # the function checks the same
            fastssl.functional.macl(torch.randn(4, 3), torch.randn(4, 3), **{"temperature": 0.1, **kwargs})


@pytest.mark.parametrize("backend", backend_params("info_nce_self"))
def test_directclr_is_nt_xent_on_the_first_loss_dim_entries(backend):
    out0, out1 = (v.detach().reshape(6, 3, 4).requires_grad_(True) for v in views(6, 12))
    criterion = DirectCLRLoss(loss_dim=5, temperature=0.3, backend=backend)
    assert (criterion.loss_dim, criterion.temperature) == (5, 0.3) and list(criterion.state_dict()) == []
    loss = criterion(out0, out1)
    x0, x1 = (v.detach().double().requires_grad_(True) for v in (out0, out1))
    exact = lightly_nt_xent(x0.flatten(1)[:, :5], x1.flatten(1)[:, :5], 0.3)
    assert_ce_within(loss, exact, 5, 1 / 0.3, 11, 12)
    loss.backward()
    exact.backward()
    assert out0.grad.flatten(1)[:, 5:].abs().max() == 0  # the rest of the representation gets no gradient
    assert_info_nce_grads_within([out0.grad.flatten(1)[:, :5], out1.grad.flatten(1)[:, :5]],
                                 [x0.grad.flatten(1)[:, :5], x1.grad.flatten(1)[:, :5]],
                                 torch.cat([x0.flatten(1)[:, :5], x1.flatten(1)[:, :5]]), simclr_blocks(2, 6), 1 / 0.3)
    assert isinstance(DirectCLRLoss(memory_bank_size=(16, 5)), fastssl.NTXentLoss)
