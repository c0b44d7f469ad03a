"""BERT's masked-LM loss with the output layer fused (``masked_lm_loss``, ``MaskedLMLoss``):
equal to ``F.cross_entropy(hidden @ weight.T + bias, labels, ignore_index, label_smoothing)``."""
import pytest
import torch
import torch.nn.functional as F

import fastssl
import fastssl.functional as fn
from fastssl.distillation import torch_backend as distillation
from fastssl.runtime import blocks

from helpers import (FLOAT_DTYPES, HALF_DTYPES, LargestTensor, assert_within, gamma, half_error_within_twice_reference,
                     soft_ce_pairs_bounds, unit_roundoff)

BACKENDS = ["reference", "torch"]


def mlm_inputs(rows, dim, vocab, dtype, ignored=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)

    labels = torch.randint(0, vocab, (rows,), generator=g)
    labels[torch.rand(rows, generator=g) < ignored] = -100
    return leaf(rows, dim), leaf(vocab, dim), leaf(vocab), labels


def mlm64(hidden, weight, bias, labels, label_smoothing=0.0, ignore_index=-100):
    """The float64 formula: mean over kept rows of LSE(z) − (1 − ε) z_y − (ε/V) Σ_k z_k."""
    kept = labels != ignore_index
    z = hidden[kept].double() @ weight.double().T + (0 if bias is None else bias.double())
    y = labels[kept]
    rows = -(1 - label_smoothing) * z.gather(1, y[:, None]).squeeze(1) - label_smoothing * z.mean(1)
    return (torch.logsumexp(z, dim=1) + rows).mean()


def mlm_bounds(hidden, weight, bias, labels, label_smoothing, dtype):
    """soft_ce_pairs_bounds with one pair, the kept rows as its B, targets y = (1 − ε) onehot + ε/V
    (2u relative: ε/V's and 1 − ε's roundings) and logits z = h·w + b, off by γ_D Σ|h||w| + u|z|
    (the GEMM, the bias) plus the tiles' LSE merges ((|L| + 3)u each, half of it as a logit
    error). Gradients: ∂ℓ/∂z's bound times w (V terms) or h (M terms: also the bias's sum), γ of
    the length. Returns (loss, ∂hidden over the kept rows, ∂weight, ∂bias) bounds."""
    u = unit_roundoff(dtype)
    kept = labels != -100
    h, w = hidden.detach().double()[kept], weight.detach().double()
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().double()
    rows, vocab = h.shape[0], w.shape[0]
    z = h @ w.T + b
    targets = torch.full_like(z, label_smoothing / vocab).scatter_add_(
        1, labels[kept][:, None], torch.full((rows, 1), 1 - label_smoothing, dtype=torch.float64))
    tiles = len(distillation._prototype_tiles(vocab, rows))
    logit_error = (gamma(h.shape[1], u) * (h.abs() @ w.abs().T) + u * z.abs()).amax(-1) \
        + tiles * (torch.logsumexp(z, -1).abs() + 3) * u / 2
    loss_b, _, grad_z_b = soft_ce_pairs_bounds(targets[None], z[None], 1.0, torch.ones(1, 1), 2 * u,
                                               logit_error[None], dtype)
    z64 = z.clone().requires_grad_(True)
    grad_z = torch.autograd.grad(-(targets * F.log_softmax(z64, -1)).sum(-1).mean(), z64)[0].abs()
    grad_z_b = grad_z_b[0]
    return (loss_b[0, 0], grad_z_b @ w.abs() + gamma(vocab, u) * grad_z @ w.abs(),
            grad_z_b.T @ h.abs() + gamma(rows, u) * grad_z.T @ h.abs(),
            grad_z_b.sum(0) + gamma(rows, u) * grad_z.sum(0))


SHAPES = [pytest.param(9, 5, 37, id="N9-D5-V37"), pytest.param(4, 11, 130, id="N4-D11-V130"),
          pytest.param(1, 3, 7, id="N1-D3-V7"), pytest.param(6, 4, 1, id="N6-D4-V1")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("rows,dim,vocab", SHAPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_values_and_gradients_equal_float64(rows, dim, vocab, label_smoothing, dtype, backend, block_elements):
    hidden, weight, bias, labels = mlm_inputs(rows, dim, vocab, dtype, ignored=0.4 if rows > 1 else 0.0)
    loss = fn.masked_lm_loss(hidden, weight, labels, bias=bias, label_smoothing=label_smoothing, backend=backend)
    assert loss.shape == () and loss.dtype == dtype
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert all(g.dtype == dtype for g in grads)
    leaves64 = [x.detach().double().requires_grad_(True) for x in (hidden, weight, bias)]
    expected = mlm64(*leaves64, labels, label_smoothing)
    expected_grads = torch.autograd.grad(expected, leaves64)
    loss_b, hidden_b, weight_b, bias_b = mlm_bounds(hidden, weight, bias, labels, label_smoothing, dtype)
    kept = labels != -100
    assert_within(loss, expected, loss_b, "loss")
    assert (grads[0][~kept] == 0).all()  # ignored rows: no gradient
    assert_within(grads[0][kept], expected_grads[0][kept], hidden_b, "gradient of hidden")
    assert_within(grads[1], expected_grads[1], weight_b, "gradient of weight")
    assert_within(grads[2], expected_grads[2], bias_b, "gradient of bias")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_equals_cross_entropy_of_the_logits(backend, label_smoothing):
    """Sequences (B, T, D), no bias, another ignore_index: torch's own F.cross_entropy in float64."""
    hidden, weight, _, labels = mlm_inputs(12, 6, 29, torch.float64)
    labels[labels == -100] = 3 - 29  # any int
    sequences, labels = hidden.view(3, 4, 6), labels.view(3, 4)
    loss = fn.masked_lm_loss(sequences, weight, labels, ignore_index=-26, label_smoothing=label_smoothing,
                             backend=backend)
    expected = F.cross_entropy((sequences @ weight.T).flatten(0, 1), labels.flatten(), ignore_index=-26,
                               label_smoothing=label_smoothing)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-13)
    for got, want in zip(torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_label_ignored_is_nan_as_cross_entropy(backend):
    hidden, weight, bias, labels = mlm_inputs(5, 4, 9, torch.float32, ignored=1.0)
    loss = fn.masked_lm_loss(hidden, weight, labels, bias=bias, backend=backend)
    expected = F.cross_entropy(hidden @ weight.T + bias, labels)
    assert torch.isnan(loss) and torch.isnan(expected)


def test_module_equals_function():
    hidden, weight, bias, labels = mlm_inputs(9, 5, 37, torch.float64)
    criterion = fastssl.MaskedLMLoss(label_smoothing=0.1, backend="torch")
    assert criterion.ignore_index == -100 and criterion.label_smoothing == 0.1 and criterion.state_dict() == {}
    torch.testing.assert_close(criterion(hidden, weight, labels, bias),
                               fn.masked_lm_loss(hidden, weight, labels, bias=bias, label_smoothing=0.1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_inputs_error_within_twice_the_reference_in_half(dtype, backend):
    hidden, weight, bias, labels = mlm_inputs(9, 5, 37, dtype, ignored=0.2)
    loss = fn.masked_lm_loss(hidden, weight, labels, bias=bias, label_smoothing=0.1, backend=backend)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (hidden, weight, bias))
    assert all(g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    exact = mlm64(hidden.detach(), weight.detach(), bias.detach(), labels, 0.1)
    with torch.no_grad():
        in_half = F.cross_entropy(hidden @ weight.T + bias, labels, label_smoothing=0.1)
    half_error_within_twice_reference(loss.detach(), in_half, exact)


def test_gradcheck_float64(monkeypatch):
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 3)  # ragged tiles of classes
    hidden, weight, bias, labels = mlm_inputs(4, 3, 7, torch.float64, ignored=0.3)
    assert len(distillation._prototype_tiles(7, int((labels != -100).sum()))) > 1
    for smoothing in (0.0, 0.2):
        assert torch.autograd.gradcheck(lambda h, w, b: fn.masked_lm_loss(
            h, w, labels, bias=b, label_smoothing=smoothing, backend="torch"), (hidden, weight, bias))


def test_opcheck():
    hidden, weight, bias, labels = mlm_inputs(6, 3, 11, torch.float32)
    op = distillation.linear_cross_entropy.op
    torch.library.opcheck(op, (hidden, weight, bias, labels, -100, 0.1))
    torch.library.opcheck(op, (hidden, weight.detach(), None, labels, -100, 0.0))


def test_torch_backend_computes_only_the_kept_rows(monkeypatch):
    """The logits exist for kept rows only and one tile of classes at a time."""
    
    monkeypatch.setattr(blocks, "BLOCK_ELEMENTS", 10)
    hidden, weight, bias, labels = (x.detach() for x in mlm_inputs(40, 3, 100, torch.float32))
    labels[:30] = -100
    with LargestTensor() as mode:
        loss, lse = distillation.linear_cross_entropy_forward(hidden, weight, bias, labels, -100, 0.1)
        distillation.linear_cross_entropy_backward(torch.ones(()), hidden, weight, bias, labels, lse, -100, 0.1,
                                                   [True, True, True, False])
    assert mode.largest <= max(weight.numel(), hidden.numel()) < 10 * 100, mode.largest


@pytest.mark.parametrize("call,error,match", [
    (lambda h, w, b, y: fn.masked_lm_loss(h[0], w, y[0]), ValueError, "hidden must have at least 2 dimensions"),
    (lambda h, w, b, y: fn.masked_lm_loss(h.view(1, 1, 9, 5), w, y), ValueError, r"hidden must be \(N, D\)"),
    (lambda h, w, b, y: fn.masked_lm_loss(h, w[:, :4], y), ValueError, "weight must be"),
    (lambda h, w, b, y: fn.masked_lm_loss(h, w, y.float()), TypeError, "labels must be an integer tensor"),
    (lambda h, w, b, y: fn.masked_lm_loss(h, w, y[:4]), ValueError, "labels must have shape"),
    (lambda h, w, b, y: fn.masked_lm_loss(h, w, y, bias=b[:3]), ValueError, "bias must be"),
    (lambda h, w, b, y: fn.masked_lm_loss(h, w, torch.full_like(y, 37)), IndexError, "Target 37 is out of bounds"),
    (lambda h, w, b, y: fn.masked_lm_loss(h, w, y, label_smoothing=1.5), RuntimeError, "label_smoothing must be"),
    (lambda h, w, b, y: fn.masked_lm_loss(h, w, y, ignore_index=0.5), TypeError, "ignore_index must be an int"),
    (lambda h, w, b, y: fastssl.MaskedLMLoss(label_smoothing=-0.1), RuntimeError, "label_smoothing must be"),
])
def test_bad_input_names_the_argument(call, error, match):
    hidden, weight, bias, labels = (x.detach() if x.is_floating_point() else x for x in mlm_inputs(9, 5, 37, torch.float32))
    with pytest.raises(error, match=match):
        call(hidden, weight, bias, labels)
