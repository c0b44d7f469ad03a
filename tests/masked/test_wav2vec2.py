"""wav2vec 2.0's contrastive and diversity losses on every backend against fairseq's formulas in
float64 (tests/oracles.py), within bounds derived from the computation (tests/helpers.py); fairseq's
distractor draw, the module, errors, half dtypes against fairseq's own rounding."""
import pytest
import torch

import fastssl
import fastssl.functional as fn
from fastssl import Wav2Vec2ContrastiveLoss
from fastssl.runtime.validation import InputError

from helpers import (FLOAT_DTYPES, HALF_DTYPES, assert_within_twice_the_official_error, assert_ce_within, assert_within, backend_params, logit_error,
                     unit_roundoff)
from oracles import diversity64, fairseq_sample_negatives, wav2vec2_contrastive64, wav2vec2_logits64

# (B, T, C, K): ragged sizes, K > T (distractors repeat), a batch of one with the fewest frames
SHAPES = [pytest.param((3, 7, 5, 4), id="B3-T7-K4"), pytest.param((2, 5, 9, 11), id="K>T"),
          pytest.param((1, 2, 3, 3), id="B1-T2")]


def make_inputs(shape, dtype, seed=0, codebook=3):
    """x (B, T, C) and quantized-like y: rows drawn from a small codebook plus a per-utterance
    part, so some distractors equal their positive exactly (fairseq's ``neg_is_pos``)."""
    batch, frames, channels, _ = shape
    g = torch.Generator().manual_seed(seed)
    codes = torch.randn(codebook, channels, generator=g, dtype=torch.float64)
    y = codes[torch.randint(0, codebook, (batch, frames), generator=g)].to(dtype)
    x = (0.6 * y.double() + torch.randn(batch, frames, channels, generator=g, dtype=torch.float64)).to(dtype)
    return x.requires_grad_(True), y.requires_grad_(True)


def draw(shape, seed=1):
    torch.manual_seed(seed)
    return fairseq_sample_negatives(shape[0], shape[1], shape[3])


def gradient_bounds(x, y, negatives, scale, u):
    """Entrywise bounds on |δ∂L/∂x| and |δ∂L/∂y|, helpers.info_nce_grad_bound's derivation with
    each distractor counted as often as it is drawn: per frame t the logits touch x_t (as the row)
    and y_t, y_n(t,k) (as columns), G = (p − e₀)/(BT); the bound on an input row is
    scale/‖v‖·[W(2δs + (2M + C + T + K + 7)u) + 4u·P], W = Σ|G| over the logits touching it,
    P = Σ 1/(BT) over its positive logits, M = K + 1; T + K: the Gram's T-term column sums and
    up to K repeated distractors added into one entry."""
    x64, y64 = x.detach().double(), y.detach().double()
    batch, frames, channels = x64.shape
    k = negatives.shape[-1]
    logits = wav2vec2_logits64(x64, y64, negatives, 1.0 / scale)
    g = torch.softmax(logits, dim=-1)
    g[..., 0] -= 1
    g = g.abs() / (batch * frames)
    w_x = g.sum(-1)
    w_y = g[..., 0].clone().scatter_add_(1, negatives.reshape(batch, -1), g[..., 1:].reshape(batch, -1))
    positive = torch.full((batch, frames), 1.0 / (batch * frames), dtype=torch.float64)
    per_weight = 2 * logit_error(channels, scale, u) + (2 * (k + 1) + channels + frames + k + 7) * u
    bound_x = scale / x64.norm(dim=-1) * (w_x * per_weight + 4 * u * positive)
    bound_y = scale / y64.norm(dim=-1) * (w_y * per_weight + 4 * u * positive)
    return bound_x[..., None], bound_y[..., None]


def test_sample_negatives_is_fairseqs_draw():
    for batch, frames, k in ((3, 7, 4), (2, 5, 11), (1, 2, 3)):
        torch.manual_seed(7)
        got = fn.sample_negatives(batch, frames, k)
        after = torch.rand(1)
        torch.manual_seed(7)
        want = fairseq_sample_negatives(batch, frames, k)
        assert torch.equal(got, want) and torch.equal(torch.rand(1), after)  # same draws, same RNG state after
        assert got.shape == (batch, frames, k) and got.dtype == torch.int64
        assert ((got >= 0) & (got < frames)).all()
        assert (got != torch.arange(frames)[None, :, None]).all()  # never the frame itself
    generator = torch.Generator().manual_seed(7)
    torch.manual_seed(7)
    assert torch.equal(fn.sample_negatives(3, 7, 4, generator=generator), fairseq_sample_negatives(3, 7, 4))


def test_sample_negatives_covers_every_other_frame():
    torch.manual_seed(0)
    drawn = fn.sample_negatives(1, 4, 600)[0]
    for t in range(4):
        counts = torch.bincount(drawn[t], minlength=4)
        assert counts[t] == 0 and (counts[torch.arange(4) != t] > 120).all()  # 200 expected each, uniform


@pytest.mark.parametrize("backend", backend_params("wav2vec2_contrastive"))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("logit_temp", [0.1, 0.5])
def test_wav2vec2_equals_fairseq_float64(backend, dtype, shape, logit_temp):
    x, y = make_inputs(shape, dtype)
    negatives = draw(shape)
    loss = fn.wav2vec2_contrastive_loss(x, y, logit_temp=logit_temp, negative_indices=negatives, backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and loss.shape == ()
    x64, y64 = (t.detach().double().requires_grad_(True) for t in (x, y))
    exact = wav2vec2_contrastive64(x64, y64, negatives, logit_temp)
    u = unit_roundoff(dtype)
    batch, frames, channels, k = shape
    assert_ce_within(loss, exact, channels, 1 / logit_temp, k + 1, batch * frames, u=u)
    grads = torch.autograd.grad(loss, (x, y))
    exact_grads = torch.autograd.grad(exact, (x64, y64))
    for got, want, bound, name in zip(grads, exact_grads, gradient_bounds(x, y, negatives, 1 / logit_temp, u), "xy"):
        assert got.dtype == dtype
        assert_within(got, want, bound, f"gradient of {name}")


@pytest.mark.parametrize("backend", backend_params("wav2vec2_contrastive"))
def test_distractors_equal_to_the_positive_are_left_out(backend):
    x, y = make_inputs(SHAPES[0].values[0], torch.float64, codebook=2)
    negatives = draw(SHAPES[0].values[0])
    batch = torch.arange(3)[:, None, None]
    equal = (y[batch, negatives] == y[:, :, None]).all(-1)
    assert equal.any() and not equal.all()
    loss = fn.wav2vec2_contrastive_loss(x, y, negative_indices=negatives, backend=backend)
    kept = wav2vec2_logits64(x.detach(), y.detach(), negatives)
    kept = kept.masked_fill(torch.cat([torch.zeros_like(equal[..., :1]), equal], -1), float("-inf"))
    torch.testing.assert_close(loss.detach(), (torch.logsumexp(kept, -1) - kept[..., 0]).mean(), rtol=1e-12, atol=0)
    # −0.0 and 0.0 are equal, as fairseq's ``==`` says: frames 0 and 1 of utterance 0 differ only by the sign of a 0
    y_signed = y.detach().clone()
    y_signed[0, 0] = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    y_signed[0, 1] = torch.tensor([-0.0, 1.0, 2.0, -1.0, 0.5], dtype=torch.float64)
    other_frame = torch.zeros(3, 7, 1, dtype=torch.long)
    other_frame[:, 0] = 1  # every frame's only distractor: frame 0, frame 0's: frame 1
    got = fn.wav2vec2_contrastive_loss(x.detach(), y_signed, negative_indices=other_frame, backend=backend)
    torch.testing.assert_close(got, wav2vec2_contrastive64(x.detach(), y_signed, other_frame), rtol=1e-12, atol=0)
    assert torch.isinf(wav2vec2_logits64(x.detach(), y_signed, other_frame)[0, :2, 1]).all()


@pytest.mark.parametrize("backend", backend_params("wav2vec2_contrastive"))
def test_drawing_inside_the_loss_consumes_the_rng_as_fairseq(backend):
    shape = SHAPES[0].values[0]
    x, y = make_inputs(shape, torch.float32)
    torch.manual_seed(11)
    drawn = fn.wav2vec2_contrastive_loss(x, y, num_negatives=shape[3], backend=backend)
    torch.manual_seed(11)
    given = fn.wav2vec2_contrastive_loss(x, y, negative_indices=fairseq_sample_negatives(3, 7, shape[3]),
                                         backend=backend)
    torch.testing.assert_close(drawn, given, rtol=0, atol=0)


def test_diversity_loss_equals_fairseq_and_adds_with_its_weight():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    diversity = fn.codebook_diversity_loss(logits)
    exact = diversity64(logits)
    torch.testing.assert_close(diversity, exact, rtol=1e-12, atol=0)  # the same float64 formula
    assert 0 <= diversity.item() < 1
    assert torch.autograd.gradcheck(fn.codebook_diversity_loss, (logits,))
    x, y = make_inputs(SHAPES[0].values[0], torch.float64)
    negatives = draw(SHAPES[0].values[0])
    total = fn.wav2vec2_contrastive_loss(x, y, negative_indices=negatives, codevector_logits=logits,
                                         diversity_weight=0.3)
    torch.testing.assert_close(total, wav2vec2_contrastive64(x, y, negatives) + 0.3 * exact, rtol=1e-12, atol=0)
    uniform = torch.zeros(5, 2, 6)  # every code equally used: perplexity G·V, no penalty
    assert abs(fn.codebook_diversity_loss(uniform).item()) < 1e-6


@pytest.mark.parametrize("backend", backend_params("wav2vec2_contrastive"))
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_wav2vec2_half_within_twice_fairseqs_own_error(backend, dtype):
    shape = (2, 9, 16, 6)
    x, y = make_inputs(shape, dtype, seed=4, codebook=50)
    negatives = draw(shape)
    loss = fn.wav2vec2_contrastive_loss(x, y, negative_indices=negatives, backend=backend)
    grads = torch.autograd.grad(loss, (x, y))
    x64, y64 = (t.detach().double().requires_grad_(True) for t in (x, y))
    exact = wav2vec2_contrastive64(x64, y64, negatives)
    exact_grads = torch.autograd.grad(exact, (x64, y64))
    xh, yh = (t.detach().double().requires_grad_(True) for t in (x, y))
    fairseq = wav2vec2_contrastive64(xh, yh, negatives, dtype=dtype)  # cosines rounded to the half dtype
    fairseq_grads = torch.autograd.grad(fairseq, (xh, yh))
    assert all(g.dtype == dtype for g in grads)
    assert_within_twice_the_official_error((loss, *grads), (exact, *exact_grads), (fairseq, *fairseq_grads))


def test_module_defaults_and_state():
    criterion = Wav2Vec2ContrastiveLoss()
    assert (criterion.num_negatives, criterion.logit_temp, criterion.diversity_weight) == (100, 0.1, 0.1)
    assert list(criterion.state_dict()) == []
    x, y = make_inputs((2, 150, 8, 0), torch.float32)
    torch.manual_seed(3)
    loss = criterion(x, y)
    torch.manual_seed(3)
    negatives = fairseq_sample_negatives(2, 150, 100)
    assert_ce_within(loss, wav2vec2_contrastive64(x, y, negatives), 8, 10.0, 101, 300)
    assert fastssl.Wav2Vec2ContrastiveLoss is Wav2Vec2ContrastiveLoss
    assert fastssl.wav2vec2_contrastive_loss is fn.wav2vec2_contrastive_loss


def test_bad_inputs_raise_naming_the_argument():
    x, y = make_inputs(SHAPES[0].values[0], torch.float32)
    negatives = draw(SHAPES[0].values[0])
    with pytest.raises(InputError, match="x and y must have the same shape"):
        fn.wav2vec2_contrastive_loss(x, y[:, 1:], negative_indices=negatives[:, 1:])
    with pytest.raises(ValueError, match="x must have 3 dimensions"):
        fn.wav2vec2_contrastive_loss(x[0], y[0])
    with pytest.raises(InputError, match="at least 2 frames"):
        fn.wav2vec2_contrastive_loss(x[:, :1], y[:, :1])
    with pytest.raises(InputError, match="negative_indices must be"):
        fn.wav2vec2_contrastive_loss(x, y, negative_indices=negatives[:, :3])
    with pytest.raises(ValueError, match="frame indices in"):
        fn.wav2vec2_contrastive_loss(x, y, negative_indices=negatives + 7)
    with pytest.raises(TypeError, match="negative_indices must be an integer tensor"):
        fn.wav2vec2_contrastive_loss(x, y, negative_indices=negatives.float())
    with pytest.raises(ValueError, match="logit_temp must be a finite number > 0"):
        fn.wav2vec2_contrastive_loss(x, y, logit_temp=0.0)
    with pytest.raises(ValueError, match="num_negatives must be >= 1"):
        Wav2Vec2ContrastiveLoss(num_negatives=0)
    with pytest.raises(ValueError, match="codevector_logits must have at least 2 dimensions"):
        fn.wav2vec2_contrastive_loss(x, y, codevector_logits=torch.randn(4))
