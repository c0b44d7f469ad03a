"""VICReg's lightly-order path, bit for bit: ``backend="reference"`` (``reference.vicreg``, which
follows lightly 1.6's ``VICRegLoss`` op for op) against a float32 transcription of lightly's
forward, compared with ``torch.equal`` for the value and both gradients. lightly is never
imported: the transcription below is its code, in its order of operations."""
import pytest
import torch
import torch.nn.functional as F

import fastssl.redundancy
from fastssl import VICRegLoss

from helpers import VICREG_SHAPES, _views


def _lightly_vicreg(z_a, z_b, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=0.0001):
    """lightly 1.6 ``VICRegLoss.forward`` without a process group, with its ``invariance_loss``,
    ``variance_loss`` and ``covariance_loss`` inlined in their order (lightly/loss/vicreg_loss.py)."""
    def variance_loss(x):
        std = torch.sqrt(x.var(dim=0) + eps)
        return torch.mean(F.relu(1.0 - std))

    def covariance_loss(x):
        x = x - x.mean(dim=0)
        batch_size = x.size(0)
        dim = x.size(-1)
        nondiag_mask = ~torch.eye(dim, device=x.device, dtype=torch.bool)
        cov = torch.einsum("b...c,b...d->...cd", x, x) / (batch_size - 1)
        loss = cov[..., nondiag_mask].pow(2).sum(-1) / dim
        return loss.mean()

    inv_loss = F.mse_loss(z_a, z_b)
    var_loss = 0.5 * (variance_loss(z_a) + variance_loss(z_b))
    cov_loss = covariance_loss(z_a) + covariance_loss(z_b)
    return lambda_param * inv_loss + mu_param * var_loss + nu_param * cov_loss


SHAPES = VICREG_SHAPES + [pytest.param((2, 32), id="B2-D32")]  # and batch 2 with N < D
# (lambda, mu, nu, gather_distributed, eps), lightly's positional order; gather_distributed=True
# without a process group gathers nothing, in lightly as here
ARGUMENTS = [
    pytest.param((), id="lightly-defaults"),
    pytest.param((25.0, 25.0, 1.0, False), id="gather_distributed-False"),
    pytest.param((25.0, 25.0, 1.0, True), id="gather_distributed-True-no-group"),
    pytest.param((1.0, 2.0, 3.0, False, 1e-2), id="custom"),
    pytest.param((0.0, 7.0, 0.0, False, 0.0), id="variance-only-eps0"),
]


def _value_and_grads(loss, z_a, z_b):
    value = loss(z_a, z_b)
    return (value, *torch.autograd.grad(value, (z_a, z_b)))


def _assert_same_bits(got, expected):
    for name, g, e in zip(("loss", "z_a gradient", "z_b gradient"), got, expected):
        assert g.dtype == e.dtype == torch.float32 and g.shape == e.shape, name
        assert torch.equal(g, e), f"{name}: largest difference {(g - e).abs().max().item():.3g}"


@pytest.mark.parametrize("arguments", ARGUMENTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_reference_backend_is_lightlys_bits(shape, arguments):
    # scale 0.6: per-feature std ~0.8, so the variance hinge is active on some features
    z_a, z_b = _views(*shape, scale=0.6, shift=0.2, grad=True)
    weights = dict(zip(("lambda_param", "mu_param", "nu_param"), arguments[:3]))
    if len(arguments) > 4:
        weights["eps"] = arguments[4]
    expected = _value_and_grads(lambda a, b: _lightly_vicreg(a, b, **weights), z_a, z_b)
    _assert_same_bits(_value_and_grads(VICRegLoss(*arguments, backend="reference"), z_a, z_b), expected)


@pytest.mark.parametrize("shape", [(2, 32), (2, 3), (8, 32)])
def test_default_backend_is_lightlys_bits_at_lightly_test_sizes(shape):
    # lightly's own test compares VICRegLoss with the paper's code exactly at 2 × 32: up to
    # LIGHTLY_ORDER_MAX_ENTRIES per view, "auto" runs lightly's order, value and gradients
    assert shape[0] * shape[1] <= fastssl.redundancy.LIGHTLY_ORDER_MAX_ENTRIES
    z_a, z_b = _views(*shape, scale=0.6, shift=0.2, grad=True)
    _assert_same_bits(_value_and_grads(VICRegLoss(), z_a, z_b), _value_and_grads(_lightly_vicreg, z_a, z_b))


def test_default_backend_takes_the_fused_op_above_the_lightly_order_size(monkeypatch):
    called = []
    monkeypatch.setattr(fastssl.redundancy.reference, "vicreg",
                        lambda *args, **kwargs: called.append(args) or torch.zeros(()))
    small = _views(2, 32, grad=True)
    VICRegLoss()(*small)
    assert len(called) == 1  # the lightly-order path is the one taken at 2 × 32
    large = _views(4, fastssl.redundancy.LIGHTLY_ORDER_MAX_ENTRIES // 4 + 1, grad=True)
    value = VICRegLoss()(*large)
    assert len(called) == 1 and value.item() != 0.0  # above it, the op (not the reference)
