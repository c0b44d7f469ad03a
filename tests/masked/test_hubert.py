"""HuBERT's masked cluster prediction on every backend against fairseq's ``compute_nce`` and
criterion in float64 (tests/oracles.py ``hubert64``), within bounds derived from the computation
(tests/helpers.py); weights, padding, duplicate codes, the module, errors, half dtypes."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import HuBERTLoss
from fastssl.runtime.validation import InputError

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_ce_within, assert_within, assert_within_twice_the_official_error,
                     backend_params, logit_error, unit_roundoff)
from oracles import hubert64, hubert_logits64

# (frames shape, D, V): a (B, T) batch, flat frames with HuBERT's 504 codes, a single frame
SHAPES = [pytest.param(((3, 5), 7, 9), id="B3-T5-V9"), pytest.param(((40,), 16, 504), id="V504"),
          pytest.param(((1, 1), 4, 6), id="one-frame")]
WEIGHTS = [pytest.param((1.0, 0.0), id="fairseq-default"), pytest.param((1.0, 0.5), id="both"),
           pytest.param((0.0, 2.0), id="unmasked-only")]


def make_inputs(shape, dtype, seed=0, padding=False):
    """features, targets, codes (two of them equal: fairseq leaves such a code out), mask, padding."""
    frames, dim, num_codes = shape
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(num_codes, dim, generator=g, dtype=torch.float64)
    codes[num_codes - 1] = codes[0]
    targets = torch.randint(0, num_codes, frames, generator=g)
    targets.view(-1)[0] = 0  # a frame whose target has a duplicate
    features = (0.8 * codes[targets] + torch.randn(*frames, dim, generator=g, dtype=torch.float64)).to(dtype)
    mask = torch.rand(*frames, generator=g) < 0.5
    mask.view(-1)[0] = True
    if mask.numel() > 1:
        mask.view(-1)[1] = False
    padding_mask = (torch.rand(*frames, generator=g) < 0.2) & (torch.arange(mask.numel()).view(frames) > 1) \
        if padding else None
    return features.requires_grad_(True), targets, codes.to(dtype).requires_grad_(True), mask, padding_mask


def frame_weights(mask, padding_mask, masked_weight, nomask_weight):
    valid = torch.ones_like(mask) if padding_mask is None else ~padding_mask
    masked, unmasked = (mask & valid).double().reshape(-1), (~mask & valid).double().reshape(-1)
    size = (masked.sum() if masked_weight > 0 else 0) + (unmasked.sum() if nomask_weight > 0 else 0)
    return (masked_weight * masked + nomask_weight * unmasked) / size


def gradient_bounds(features, targets, codes, weights, scale, u):
    """Entrywise bounds on |δ∂L/∂features| and |δ∂L/∂codes|, helpers.info_nce_grad_bound's
    derivation: logits of each frame against the V codes, G = w(p − e_target); on an input row
    scale/‖v‖·[W(2δs + (2V + D + N + 7)u) + 4u·P], W = Σ|G| over the logits touching it, P = Σw
    over its positive logits; N: a code's gradient sums over the N frames."""
    f, c = features.detach().double().reshape(-1, codes.shape[1]), codes.detach().double()
    t = targets.reshape(-1)
    n, v, d = f.shape[0], c.shape[0], c.shape[1]
    g = torch.softmax(hubert_logits64(f, t, c, 1.0 / scale), dim=-1)
    g[torch.arange(n), t] -= 1
    g = g.abs() * weights[:, None]
    per_weight = 2 * logit_error(d, scale, u) + (2 * v + d + n + 7) * u
    bound_f = scale / f.norm(dim=-1) * (g.sum(1) * per_weight + 4 * u * weights)
    bound_c = scale / c.norm(dim=-1) * (g.sum(0) * per_weight + 4 * u * torch.zeros(v, dtype=torch.float64)
                                        .index_add_(0, t, weights))
    return bound_f.view(features.shape[:-1] + (1,)), bound_c[:, None]


@pytest.mark.parametrize("backend", backend_params("hubert"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("loss_weights", WEIGHTS)
@pytest.mark.parametrize("padding", [False, True], ids=["no-padding", "padding"])
def test_hubert_equals_fairseq_float64(backend, dtype, shape, loss_weights, padding):
    features, targets, codes, mask, padding_mask = make_inputs(shape, dtype, padding=padding)
    masked_weight, nomask_weight = loss_weights
    if not ((mask if masked_weight > 0 else ~mask) & (True if padding_mask is None else ~padding_mask)).any():
        masked_weight = 1.0  # the single frame is masked: an unmasked-only loss would have no frame
    loss = fn.hubert_loss(features, targets, codes, mask, padding_mask=padding_mask, pred_masked_weight=masked_weight,
                          pred_nomask_weight=nomask_weight, backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    f64, c64 = (t.detach().double().requires_grad_(True) for t in (features, codes))
    exact = hubert64(f64, targets, c64, mask, padding_mask, 0.1, masked_weight, nomask_weight)
    weights = frame_weights(mask, padding_mask, masked_weight, nomask_weight)
    u = unit_roundoff(dtype)
    frames, dim, num_codes = shape
    assert_ce_within(loss, exact, dim, 10.0, num_codes, mask.numel(), weights.sum().item(), u=u)
    grads = torch.autograd.grad(loss, (features, codes))
    exact_grads = torch.autograd.grad(exact, (f64, c64))
    for got, want, bound, name in zip(grads, exact_grads, gradient_bounds(features, targets, codes, weights, 10.0, u),
                                      ("features", "code_embeddings")):
        assert got.dtype == dtype
        assert_within(got, want, bound, f"gradient of {name}")


@pytest.mark.parametrize("backend", backend_params("hubert"))
def test_a_code_equal_to_the_target_is_left_out(backend):
    features, targets, codes, mask, _ = make_inputs(SHAPES[0].values[0], torch.float64)
    logits = hubert_logits64(features.detach().reshape(-1, 7), targets.reshape(-1), codes.detach())
    assert torch.isinf(logits[0, -1]) and torch.isfinite(logits[0, 0])  # frame 0's target 0 has a twin, code 8
    with_twin = fn.hubert_loss(features, targets, codes, mask, backend=backend)
    torch.testing.assert_close(with_twin, hubert64(features, targets, codes, mask), rtol=1e-12, atol=0)
    apart = codes.detach().clone()
    apart[-1] += 1e-3  # no longer equal: back in the softmax
    assert fn.hubert_loss(features, targets, apart, mask, backend=backend) > with_twin


@pytest.mark.parametrize("backend", backend_params("hubert"))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_hubert_half_within_twice_fairseqs_own_error(backend, dtype):
    features, targets, codes, mask, _ = make_inputs(((6, 9), 32, 504), dtype, seed=2)
    loss = fn.hubert_loss(features, targets, codes, mask, pred_nomask_weight=0.5, backend=backend)
    grads = torch.autograd.grad(loss, (features, codes))
    f64, c64 = (t.detach().double().requires_grad_(True) for t in (features, codes))
    exact = hubert64(f64, targets, c64, mask, None, 0.1, 1.0, 0.5)
    exact_grads = torch.autograd.grad(exact, (f64, c64))
    fh, ch = (t.detach().double().requires_grad_(True) for t in (features, codes))
    fairseq = hubert64(fh, targets, ch, mask, None, 0.1, 1.0, 0.5, dtype=dtype)  # cosines rounded to the half dtype
    fairseq_grads = torch.autograd.grad(fairseq, (fh, ch))
    assert all(g.dtype == dtype for g in grads)
    assert_within_twice_the_official_error((loss, *grads), (exact, *exact_grads), (fairseq, *fairseq_grads))


def test_hubert_gradcheck_with_padding_and_both_weights():
    features, targets, codes, mask, padding_mask = make_inputs(SHAPES[0].values[0], torch.float64, padding=True)
    # twin codes apart: a numerical derivative would move one off the other, where the loss jumps
    codes = (codes.detach() + 0.1 * torch.arange(9, dtype=torch.float64)[:, None]).requires_grad_(True)
    for backend in ("reference", "torch"):
        assert torch.autograd.gradcheck(lambda f, c: fn.hubert_loss(f, targets, c, mask, padding_mask=padding_mask,
                                                                    pred_nomask_weight=0.3, backend=backend),
                                        (features, codes))


def test_hubert_module_defaults_and_state():
    criterion = HuBERTLoss()
    assert (criterion.logit_temp, criterion.pred_masked_weight, criterion.pred_nomask_weight) == (0.1, 1.0, 0.0)
    assert list(criterion.state_dict()) == []
    features, targets, codes, mask, padding_mask = make_inputs(SHAPES[0].values[0], torch.float32, padding=True)
    torch.testing.assert_close(criterion(features, targets, codes, mask, padding_mask),
                               fn.hubert_loss(features, targets, codes, mask, padding_mask=padding_mask),
                               rtol=0, atol=0)
    assert fastssl.HuBERTLoss is HuBERTLoss and fastssl.hubert_loss is fn.hubert_loss


def test_hubert_bad_inputs_raise_naming_the_argument():
    features, targets, codes, mask, _ = make_inputs(SHAPES[0].values[0], torch.float32)
    with pytest.raises(InputError, match="code_embeddings must be"):
        fn.hubert_loss(features, targets, codes[:, 1:], mask)
    with pytest.raises(InputError, match="targets must have shape"):
        fn.hubert_loss(features, targets[:, 1:], codes, mask)
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        fn.hubert_loss(features, targets.float(), codes, mask)
    with pytest.raises(ValueError, match="targets must be cluster indices"):
        fn.hubert_loss(features, targets + 9, codes, mask)
    with pytest.raises(InputError, match="mask must have shape"):
        fn.hubert_loss(features, targets, codes, mask[:, 1:])
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fn.hubert_loss(features, targets, codes, mask.float())
    with pytest.raises(TypeError, match="padding_mask must be a bool tensor"):
        fn.hubert_loss(features, targets, codes, mask, padding_mask=mask.long())
    with pytest.raises(ValueError, match="both 0"):
        fn.hubert_loss(features, targets, codes, mask, pred_masked_weight=0.0)
    with pytest.raises(ValueError, match="pred_nomask_weight must be a finite number >= 0"):
        HuBERTLoss(pred_nomask_weight=-1.0)
    with pytest.raises(ValueError, match="logit_temp must be a finite number > 0"):
        fn.hubert_loss(features, targets, codes, mask, logit_temp=-0.1)
    # no masked frame with fairseq's weights: its division by a zero sample size
    assert torch.isnan(fn.hubert_loss(features, targets, codes, torch.zeros_like(mask)))
