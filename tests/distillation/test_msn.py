"""MSN / PMSN (lightly's MSNLoss, PMSNLoss, PMSNCustomLoss) on every backend against lightly 1.6's
code in float64 (tests/oracles.py), within bounds derived from the computation (tests/helpers.py);
the fused anchor-terms op against its float64 formula; lightly's module behaviour."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastssl.functional as fn
from fastssl import MSNLoss, PMSNCustomLoss, PMSNLoss
from fastssl.distillation.msn import power_law_distribution
from fastssl.runtime import registry

from helpers import (FLOAT_DTYPES, HALF_DTYPES, U32, assert_within, backend_params, gamma,
                     half_error_within_twice_reference, normalized_entry_error, unit_roundoff,
                     one_intra_op_thread_unless_asked, sinkhorn_log_span, sinkhorn_rel_error,
                     _normalization_grad_abs)
from oracles import lightly_msn, lightly_msn_loss, lightly_msn_sinkhorn, lightly_msn_targets, lightly_power_law

BACKENDS = backend_params("msn_anchor_terms")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_intra_op_thread_unless_asked()


def seeded(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def uniform_prior(mean_anchor_probs):
    """lightly's docstring example of a custom target distribution (no gradient through it)."""
    return mean_anchor_probs.new_ones(mean_anchor_probs.shape[0]) / mean_anchor_probs.shape[0]


def msn_anchor_terms_bounds(targets, anchors, prototypes, scale, grad_ce, grad_mean, target_error=0.0,
                            input_error=0.0, grad_mean_error=0.0, u=U32, flush_dtype=torch.float32):
    """Bounds on the errors of MSN's anchor terms (``msn_anchor_terms``) computed with unit roundoff
    ``u``, from float64 ``targets`` (B, K), unit ``anchors`` (M = V·B, D) and unit ``prototypes``
    (K, D), and of the gradients of g·CE + G·p̄ (g = ``grad_ce``, G = ``grad_mean`` (K,)).

    ``target_error``: the targets' relative error (a number or (B, K)); ``input_error``: the
    anchors' and prototypes' relative entry error (their normalisation); ``grad_mean_error``:
    |δG| (a number or (K,)). With x = a·wᵀ, z = σx, L = LSE(z), p = softmax(z), T_b = Σ_k t_bk:
    * δx ≤ (γ_D + 2·input_error) Σ_d |a||w| (the D-term dot, both inputs' errors);
    * δL ≤ 2σ max_k δx + (2σ max|x| + K + 4 + |L|)u (shifted exps, the K-term sum, its log, the
      peak added back); each p is off by e = σδx + δL + (σ|x| + |L| + 2)u relative;
    * CE = (1/M)(Σ_i T_b L_i − σ Σ t_bk x_ik): the V-, B-, K- and BK-term sums add γ of the terms'
      magnitudes, the targets' error |t| e_t |L − z|, flushing targets below φ = sqrt(tiny) × the
      row peak σφ·peak Σ|x|, the subtraction and division 3u;
    * p̄ = (1/M) Σ_i p_i: (1/M) Σ p (e + γ_M + u);
    * ∂/∂x_ik = (σ/M)(p_ik h_ik − g t_bk), h = g T_b + G_k − p_i·G: p's error e|h|, p_i·G's
      Σ_j p|G|(e + γ_K) + p·|δG|, δG_k, the 3-term sum's 3u and T_b's γ_K, g t's e_t and the
      products' and the difference's 4u;
    * ∂/∂a = Σ_k ∂/∂x w_k, ∂/∂w = Σ_i ∂/∂x a_i: the propagated error and γ_K (γ_M) + input_error
      of Σ|∂/∂x||w| (Σ|∂/∂x||a|); ∂/∂t_bk = (g/M) Σ_v (L − σx): (|g|/M) Σ_v (δL + σδx +
      (γ_V + 2u)(|L| + σ|x|)).
    Returns (CE, p̄ (K,), ∂anchors (M, D), ∂prototypes (K, D), ∂targets (B, K)) bounds.
    """
    t, a, w = targets.detach().double(), anchors.detach().double(), prototypes.detach().double()
    batch, classes = t.shape
    count, dim = a.shape
    views = count // batch
    g = float(grad_ce)
    big_g = grad_mean.detach().double()
    delta_big_g = torch.as_tensor(grad_mean_error, dtype=torch.float64).expand(classes)
    e_t = torch.as_tensor(target_error, dtype=torch.float64).expand(batch, classes).repeat(views, 1)
    phi = math.sqrt(torch.finfo(flush_dtype).tiny)
    x = a @ w.T
    z = scale * x
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    p = torch.softmax(z, dim=1)
    t_rep = t.repeat(views, 1)
    total = t_rep.sum(dim=1, keepdim=True)
    delta_x = (gamma(dim, u) + 2 * input_error) * (a.abs() @ w.abs().T)
    delta_l = (2 * scale * delta_x.amax(dim=1, keepdim=True)
               + (2 * scale * x.abs().amax(dim=1, keepdim=True) + classes + 4 + lse.abs()) * u)
    e = scale * delta_x + delta_l + (scale * x.abs() + lse.abs() + 2) * u
    ce = (1 / count) * ((total * (delta_l + (gamma(classes, u) + gamma(views, u) + gamma(batch, u) + 3 * u)
                                  * lse.abs())).sum()
                        + scale * (t_rep.abs() * (delta_x + (gamma(views, u) + gamma(batch * classes, u) + 3 * u)
                                                  * x.abs())).sum()
                        + (t_rep.abs() * e_t * (lse - z).abs()).sum()
                        + scale * phi * (t_rep.abs().amax(dim=1, keepdim=True) * x.abs()).sum())
    ce_value = -(t_rep * (z - lse)).sum() / count
    ce = ce + u * ce_value.abs()
    mean = (p * (e + gamma(count, u) + u)).sum(dim=0) / count
    s = p @ big_g
    h = g * total + big_g[None] - s[:, None]
    delta_s = (p * big_g.abs()[None] * (e + gamma(classes, u))).sum(dim=1) + p @ delta_big_g
    bracket = (p * e * h.abs()
               + p * (delta_s[:, None] + delta_big_g[None] + gamma(classes, u) * abs(g) * total
                      + 3 * u * (abs(g) * total + big_g.abs()[None] + s.abs()[:, None]))
               + abs(g) * t_rep.abs() * (e_t + u)
               + 4 * u * (p * h.abs() + abs(g) * t_rep.abs()))
    grad_x = scale / count * (p * h - g * t_rep)
    delta_grad_x = scale / count * bracket + 2 * u * grad_x.abs()
    grad_anchors = delta_grad_x @ w.abs() + (gamma(classes, u) + input_error) * (grad_x.abs() @ w.abs())
    grad_prototypes = delta_grad_x.T @ a.abs() + (gamma(count, u) + input_error) * (grad_x.abs().T @ a.abs())
    per_view = (delta_l + scale * delta_x + (gamma(views, u) + 2 * u) * (lse.abs() + scale * x.abs()))
    grad_targets = abs(g) / count * per_view.view(views, batch, classes).sum(dim=0)
    grad_targets = grad_targets + 2 * u * abs(g) / count * (lse - z).view(views, batch, classes).sum(dim=0).abs()
    return ce, mean, grad_anchors, grad_prototypes, grad_targets


# ============================================================================================
# The fused op: cross-entropy to the targets and mean probabilities
# ============================================================================================
OP_SHAPES = [pytest.param((3, 5, 7, 11), id="V3-B5-D7-K11"), pytest.param((1, 1, 4, 1), id="one-row-one-prototype"),
             pytest.param((2, 9, 16, 64), id="V2-B9-D16-K64")]


def op_inputs(views, batch, dim, classes, dtype, seed=0, sharp=0.05):
    targets = torch.softmax(seeded(batch, classes, seed=seed) / sharp, dim=1).to(dtype)
    anchors = F.normalize(seeded(views * batch, dim, seed=seed + 1), dim=1).to(dtype)
    prototypes = F.normalize(seeded(classes, dim, seed=seed + 2), dim=1).to(dtype)
    return targets, anchors, prototypes


def anchor_terms64(targets, anchors, prototypes, scale):
    """The formula, in float64: CE = −mean_i Σ_k t_{i mod B, k} log softmax(scale a_i·Wᵀ)_k, p̄ = mean_i softmax."""
    log_p = torch.log_softmax(scale * anchors @ prototypes.T, dim=1)
    rows = torch.arange(anchors.shape[0]) % targets.shape[0]
    return -(targets[rows] * log_p).sum() / anchors.shape[0], log_p.exp().mean(dim=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", OP_SHAPES)
@pytest.mark.parametrize("scale", [10.0, 40.0])
def test_anchor_terms_equal_float64(backend, dtype, shape, scale):
    inputs = [t.requires_grad_() for t in op_inputs(*shape, dtype)]
    _, core = registry.select("msn_anchor_terms", backend, inputs)
    ce, mean = core(*inputs, scale)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    ce64, mean64 = anchor_terms64(*inputs64, scale)
    grad_mean = seeded(shape[3], seed=9)
    grad_ce = 0.7
    bounds = msn_anchor_terms_bounds(*inputs64, scale, grad_ce, grad_mean, u=unit_roundoff(dtype))
    assert ce.dtype == mean.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert ce.shape == () and mean.shape == (shape[3],)
    assert_within(ce, ce64, bounds[0], "cross-entropy")
    assert_within(mean, mean64, bounds[1], "mean probabilities")
    grads = torch.autograd.grad(grad_ce * ce + (grad_mean.to(mean.dtype) * mean).sum(), inputs)
    exact = torch.autograd.grad(grad_ce * ce64 + (grad_mean * mean64).sum(), inputs64)
    for got, want, bound, name in zip(grads, exact, (bounds[4], bounds[2], bounds[3]),
                                      ("targets", "anchors", "prototypes")):
        assert_within(got, want, bound, f"gradient of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_anchor_terms_gradcheck_float64(backend):
    inputs = [t.requires_grad_() for t in op_inputs(2, 3, 4, 5, torch.float64, sharp=1.0)]
    _, core = registry.select("msn_anchor_terms", backend, inputs)
    assert torch.autograd.gradcheck(lambda *xs: core(*xs, 3.0), inputs)


# ============================================================================================
# The losses against lightly's code in float64
# ============================================================================================
# (class, constructor arguments, forward's target_sharpen_temperature, the oracle's regularisation)
CASES = [
    pytest.param(MSNLoss, {}, 0.25, "msn", id="MSN-defaults"),
    pytest.param(MSNLoss, {"sinkhorn_iterations": 0}, 0.25, "msn", id="MSN-no-sinkhorn"),
    pytest.param(MSNLoss, {"sinkhorn_iterations": 7, "temperature": 0.2}, 0.5, "msn", id="MSN-7-iterations"),
    pytest.param(MSNLoss, {"regularization_weight": 0.0}, 1.0, "msn", id="MSN-no-regularizer-no-sharpening"),
    pytest.param(MSNLoss, {"regularization_weight": -1.0}, 0.25, "msn", id="MSN-negative-weight-skips"),
    pytest.param(PMSNLoss, {}, 0.25, 0.25, id="PMSN-defaults"),
    pytest.param(PMSNLoss, {"power_law_exponent": 1.5, "regularization_weight": 2.5}, 0.25, 1.5, id="PMSN-exponent"),
    pytest.param(PMSNCustomLoss, {"target_distribution": uniform_prior}, 0.25, uniform_prior, id="PMSNCustom-uniform"),
]


def target_log_error(targets, prototypes, temperature, sharpen, iterations, u):
    """Relative (log) error of every target probability, to first order in u.

    The backend's logits t̂·p̂ᵀ are off by δx ≤ γ_D + 2·normalized_entry_error (unit rows); the
    log-softmax s of x/(τT) by ≤ σ'δx + max σ'δx + (2σ' + K + 4 + |LSE|)u (σ' = 1/(τT), τT and the
    division rounded: 2uσ'|x|). Sinkhorn's logs move by ≤ |J| δs (J = ∂ log codes / ∂s, from float64
    autograd of lightly's iteration) plus its own rounding (``sinkhorn_rel_error`` on s, ε = 1);
    without iterations the targets are exp(s): δs + u."""
    t, w = F.normalize(targets.double(), dim=1), F.normalize(prototypes.double(), dim=1)
    classes, dim = w.shape
    x = t @ w.T
    sigma = 1.0 / (temperature * sharpen)
    delta_x = (gamma(dim, u) + 2 * normalized_entry_error(dim, u)) * (t.abs() @ w.abs().T)
    s = torch.log_softmax(sigma * x, dim=1)
    lse = torch.logsumexp(sigma * x, dim=1, keepdim=True)
    delta_s = (sigma * delta_x + sigma * delta_x.amax(dim=1, keepdim=True) + 2 * u * sigma * x.abs()
               + (2 * sigma * x.abs().amax(dim=1, keepdim=True) + classes + 4 + lse.abs()) * u)
    if iterations == 0:
        return delta_s + u
    jacobian = torch.autograd.functional.jacobian(
        lambda scores: torch.log(lightly_msn_sinkhorn([scores.exp()], iterations)[0]).flatten(), s)
    propagated = (jacobian.abs().flatten(1) @ delta_s.flatten()).view_as(s)
    return propagated + sinkhorn_rel_error(iterations, sinkhorn_log_span(s, 1.0), *s.shape, u)


def msn_bounds(anchors, targets, prototypes, temperature, sharpen, iterations, weight, regularization, u):
    """Bounds on the loss and the gradients of anchors and prototypes (raw, before normalisation).

    The unit vectors carry normalized_entry_error ν per entry; the targets ``target_log_error``;
    the anchor terms ``msn_anchor_terms_bounds`` (g = 1, G = w·∂R/∂p̄) with both. The regulariser
    R(p̄): MSN Σ p̄ log p̄ + log K moves by Σ|log p̄ + 1| δp̄ plus its roundings (xlogy, the K-term
    sum: (γ_K + 2u)(Σ|p̄ log p̄| + log K)), its G = w(log p̄ + 1) by w δp̄/p̄ + 2u|G|; PMSN's
    KL(π ‖ p̄) = Σ π(log π − log p̄) by Σ π δp̄/p̄, π's own error (pow, K-term sum, division:
    (γ_K + 4u) relative) times Σ π|log π − log p̄ + 1|, and (γ_K + 3u) Σ π(|log π| + |log p̄|); its
    G = −wπ/p̄ by |G|(δp̄/p̄ + γ_K + 6u). Adding w·R: u(|wR| + |L|). The gradients of the raw rows
    go through the normalisation's Jacobian (|J|ᵀ of the unit-space bounds, ``_normalization_grad_abs``)
    and its own rounding and that of J's inputs: ((D + 6)u + 3ν) |J|ᵀ|∂/∂â|.
    """
    a64, t64, w64 = (x.detach().double() for x in (anchors, targets, prototypes))
    dim = a64.shape[1]
    nu = normalized_entry_error(dim, u)
    unit_a, unit_w = F.normalize(a64, dim=1), F.normalize(w64, dim=1)
    target_probs = lightly_msn_targets([t64], w64, temperature, sharpen, iterations)[0]
    target_error = target_log_error(t64, w64, temperature, sharpen, iterations, u)
    scale = 1.0 / temperature
    mean = torch.softmax(scale * unit_a @ unit_w.T, dim=1).mean(dim=0)
    classes = mean.shape[0]
    zero = torch.zeros(classes, dtype=torch.float64)
    # first pass: p̄'s bound, to bound G's error
    mean_bound = msn_anchor_terms_bounds(target_probs, unit_a, unit_w, scale, 1.0, zero, target_error, nu, u=u)[1]
    if weight <= 0:
        big_g, delta_g, reg_error = zero, zero, 0.0
    elif regularization == "msn":
        big_g = weight * (mean.log() + 1)
        delta_g = weight * mean_bound / mean + 2 * u * big_g.abs()
        reg_error = ((mean.log() + 1).abs() * mean_bound).sum() + (gamma(classes, u) + 2 * u) * (
            (mean * mean.log()).abs().sum() + math.log(classes))
    else:
        prior = (lightly_power_law(classes, regularization) if isinstance(regularization, float)
                 else regularization(mean))
        big_g = -weight * prior / mean
        delta_g = big_g.abs() * (mean_bound / mean + gamma(classes, u) + 6 * u)
        reg_error = ((prior * mean_bound / mean).sum()
                     + (gamma(classes, u) + 4 * u) * (prior * (prior.log() - mean.log() + 1).abs()).sum()
                     + (gamma(classes, u) + 3 * u) * (prior * (prior.log().abs() + mean.log().abs())).sum())
    ce_bound, _, grad_unit_a, grad_unit_w, _ = msn_anchor_terms_bounds(
        target_probs, unit_a, unit_w, scale, 1.0, big_g, target_error, nu, delta_g, u=u)
    expected = lightly_msn(a64, t64, w64, sharpen, temperature, iterations, weight, regularization)
    loss_bound = ce_bound + max(weight, 0.0) * reg_error + 2 * u * expected.abs()
    # |∂L/∂â| and |∂L/∂ŵ| (float64) for the Jacobian's own error
    unit_leaves = [unit_a.clone().requires_grad_(), unit_w.clone().requires_grad_()]
    unit_grads = torch.autograd.grad(
        lightly_msn_loss(unit_leaves[0], target_probs, unit_leaves[1], temperature, weight, regularization),
        unit_leaves)
    grad_bounds = []
    for raw, unit, bound, exact_unit in ((a64, unit_a, grad_unit_a, unit_grads[0]),
                                         (w64, unit_w, grad_unit_w, unit_grads[1])):
        norms = raw.norm(dim=1, keepdim=True)
        grad_bounds.append(_normalization_grad_abs(unit, norms, bound)
                           + ((dim + 6) * u + 3 * nu) * _normalization_grad_abs(unit, norms, exact_unit.abs()))
    return loss_bound, grad_bounds


def msn_inputs(views=3, batch=6, dim=10, classes=8, dtype=torch.float32, seed=0):
    """Anchors close to their targets (masked views of one image), prototypes at random."""
    targets = seeded(batch, dim, seed=seed)
    anchors = targets.repeat(views, 1) + 0.6 * seeded(views * batch, dim, seed=seed + 1)
    return [x.to(dtype).requires_grad_() for x in (anchors, targets, seeded(classes, dim, seed=seed + 2))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("loss_class,arguments,sharpen,regularization", CASES)
def test_losses_equal_lightly(backend, dtype, loss_class, arguments, sharpen, regularization):
    anchors, targets, prototypes = msn_inputs(dtype=dtype)
    criterion = loss_class(**arguments, backend=backend)
    loss = criterion(anchors, targets, prototypes, target_sharpen_temperature=sharpen)
    leaves64 = [x.detach().double().requires_grad_() for x in (anchors, targets, prototypes)]
    expected = lightly_msn(*leaves64, sharpen, criterion.temperature, criterion.sinkhorn_iterations,
                           criterion.regularization_weight, regularization)
    loss_bound, grad_bounds = msn_bounds(anchors, targets, prototypes, criterion.temperature, sharpen,
                                         criterion.sinkhorn_iterations, criterion.regularization_weight,
                                         regularization, unit_roundoff(dtype))
    assert loss.shape == () and loss.dtype == dtype
    assert_within(loss, expected, loss_bound, "loss")
    grads = torch.autograd.grad(loss, (anchors, prototypes))
    exact = torch.autograd.grad(expected, (leaves64[0], leaves64[2]))
    for got, want, bound, name in zip(grads, exact, grad_bounds, ("anchors", "prototypes")):
        assert_within(got, want, bound, f"gradient of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_prior_made_from_the_mean_passes_its_gradient(backend):
    """lightly calls target_distribution with p̄'s graph: a prior made from p̄ adds its own gradient.
    Float64: the same float64 formula with the prior's gradient, within the loss's float64 bound
    for a fixed prior of the same values; the gradient differs from a detached prior's."""
    anchors, targets, prototypes = msn_inputs(dtype=torch.float64)

    def sharpened_mean(mean):
        return mean ** 2 / (mean ** 2).sum()

    loss = PMSNCustomLoss(sharpened_mean, backend=backend)(anchors, targets, prototypes)
    detached = PMSNCustomLoss(lambda m: sharpened_mean(m.detach()), backend=backend)(anchors, targets, prototypes)
    leaves64 = [x.detach().clone().requires_grad_() for x in (anchors, targets, prototypes)]
    expected = lightly_msn(*leaves64, regularization=sharpened_mean)
    torch.testing.assert_close(loss, detached, rtol=0, atol=0)
    grads = torch.autograd.grad(loss, (anchors, prototypes))
    detached_grads = torch.autograd.grad(detached, (anchors, prototypes))
    exact = torch.autograd.grad(expected, (leaves64[0], leaves64[2]))
    u = unit_roundoff(torch.float64)
    with torch.no_grad():
        mean = torch.softmax(F.normalize(leaves64[0], dim=1) @ F.normalize(leaves64[2], dim=1).T / 0.1, 1).mean(0)
        fixed_prior = sharpened_mean(mean)
    loss_bound, grad_bounds = msn_bounds(anchors, targets, prototypes, 0.1, 0.25, 3, 1.0, lambda m: fixed_prior, u)
    assert_within(loss, expected, loss_bound, "loss")
    for got, want, other, bound in zip(grads, exact, detached_grads, grad_bounds):
        # the prior's share of the gradient (the difference from the detached prior's) is not
        # trivially small; its float64 autograd through the K-term sums adds (K + 6)u of it
        share = (got - other).abs()
        assert share.max() > 1e-3 * want.abs().max()
        assert_within(got, want, bound + (prototypes.shape[0] + 6) * u * share, "gradient")


def test_msn_targets_equal_lightly():
    anchors, targets, prototypes = msn_inputs()
    for iterations in (0, 1, 3):
        got = fn.msn_targets(targets, prototypes, 0.1, 0.25, iterations)
        exact = lightly_msn_targets([targets.detach().double()], prototypes.detach().double(), 0.1, 0.25, iterations)[0]
        bound = target_log_error(targets.detach(), prototypes.detach(), 0.1, 0.25, iterations, U32) * exact
        assert not got.requires_grad and got.dtype == torch.float32
        assert_within(got, exact, bound + torch.finfo(torch.float32).tiny, f"targets, {iterations} iterations")


def test_targets_get_no_gradient_and_functions_equal_modules():
    anchors, targets, prototypes = msn_inputs()
    for module, function in ((MSNLoss(), fn.msn), (PMSNLoss(power_law_exponent=0.5),
                                                   lambda *x: fn.pmsn(*x, power_law_exponent=0.5)),
                             (PMSNCustomLoss(uniform_prior), lambda *x: fn.pmsn_custom(*x, uniform_prior))):
        loss = module(anchors, targets, prototypes)
        torch.testing.assert_close(loss, function(anchors, targets, prototypes), rtol=0, atol=0)
        loss.backward()
        assert targets.grad is None and anchors.grad.abs().sum() > 0 and prototypes.grad.abs().sum() > 0
        anchors.grad = prototypes.grad = None


def test_regularizers_and_prior():
    mean = torch.softmax(seeded(6, seed=3), dim=0)
    u = unit_roundoff(torch.float64)
    # both: a 6-term sum of products of logs (γ_6 + 2u relative of the terms' magnitudes, 3u more for KL's difference)
    exact_entropy = (mean * mean.log()).sum() + math.log(6)
    assert_within(MSNLoss().regularization_loss(mean), exact_entropy,
                  (gamma(7, u) + 2 * u) * ((mean * mean.log()).abs().sum() + math.log(6)), "mean entropy")
    assert MSNLoss().regularization_loss(torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2))  # 0 log 0 = 0
    prior64 = lightly_power_law(6, 0.7)
    kl_terms = prior64 * (prior64.log() - mean.log())
    assert_within(PMSNLoss(power_law_exponent=0.7).regularization_loss(mean), kl_terms.sum(),
                  (gamma(6, u) + 8 * u) * (prior64 * (prior64.log().abs() + mean.log().abs() + 1)).sum(), "KL")
    prior = power_law_distribution(5, 0.25)
    assert prior.dtype == torch.float32  # lightly's: k ** (−e) of int64 k is float32
    torch.testing.assert_close(prior.double(), lightly_power_law(5, 0.25), rtol=4 * U32 + gamma(5), atol=0)


# ============================================================================================
# Half precision, degenerate inputs
# ============================================================================================
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("loss_class,arguments", [(MSNLoss, {}), (PMSNLoss, {})], ids=["MSN", "PMSN"])
def test_half_inputs_within_twice_the_reference_error(backend, dtype, loss_class, arguments):
    anchors, targets, prototypes = msn_inputs(dtype=dtype)
    loss = loss_class(**arguments, backend=backend)(anchors, targets, prototypes)
    grads = torch.autograd.grad(loss, (anchors, prototypes))
    regularization = "msn" if loss_class is MSNLoss else 0.25
    half_leaves = [x.detach().clone().requires_grad_() for x in (anchors, targets, prototypes)]
    in_half = lightly_msn(*half_leaves, regularization=regularization)
    half_grads = torch.autograd.grad(in_half, (half_leaves[0], half_leaves[2]))
    leaves64 = [x.detach().double().requires_grad_() for x in (anchors, targets, prototypes)]
    exact = lightly_msn(*leaves64, regularization=regularization)
    exact_grads = torch.autograd.grad(exact, (leaves64[0], leaves64[2]))
    assert loss.dtype == torch.float32
    half_error_within_twice_reference(loss, in_half, exact)
    for got, half, want in zip(grads, half_grads, exact_grads):
        half_error_within_twice_reference(got, half, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_prototype_gives_zero_and_one_sample_is_lightlys(backend):
    anchors, targets, prototypes = msn_inputs(classes=1)
    loss = MSNLoss(backend=backend)(anchors, targets, prototypes)
    grads = torch.autograd.grad(loss, (anchors, prototypes))
    # a softmax over one prototype is 1: lightly's loss is exactly 0; the fused CE's T·L − σ t·x
    # cancels to within its rounding
    loss_bound, grad_bounds = msn_bounds(anchors, targets, prototypes, 0.1, 0.25, 3, 1.0, "msn", U32)
    assert_within(loss, torch.zeros(()), loss_bound, "loss")
    for got, bound in zip(grads, grad_bounds):
        assert_within(got, torch.zeros_like(got), bound, "gradient")
    anchors, targets, prototypes = msn_inputs(views=4, batch=1)
    loss = PMSNLoss(backend=backend)(anchors, targets, prototypes)
    leaves64 = [x.detach().double() for x in (anchors, targets, prototypes)]
    bound, _ = msn_bounds(anchors, targets, prototypes, 0.1, 0.25, 3, 1.0, 0.25, U32)
    assert_within(loss, lightly_msn(*leaves64, regularization=0.25), bound, "loss")


# ============================================================================================
# lightly's module behaviour
# ============================================================================================
def test_modules_keep_lightlys_arguments_and_no_state():
    msn = MSNLoss()
    assert (msn.temperature, msn.sinkhorn_iterations, msn.regularization_weight, msn.gather_distributed) == (
        0.1, 3, 1.0, False)
    pmsn = PMSNLoss()
    assert isinstance(pmsn, MSNLoss) and pmsn.power_law_exponent == 0.25 and pmsn.regularization_weight == 1
    custom = PMSNCustomLoss(uniform_prior, temperature=0.3)
    assert isinstance(custom, MSNLoss) and custom.target_distribution is uniform_prior and custom.temperature == 0.3
    for module in (msn, pmsn, custom):
        assert list(module.state_dict()) == [] and list(module.buffers()) == []


def test_subclass_regularization_loss_is_used():
    class Entropy(MSNLoss):
        def regularization_loss(self, mean_anchor_probs):
            return mean_anchor_probs.max()

    anchors, targets, prototypes = msn_inputs()
    cross_entropy, mean = fn.msn_terms(anchors, targets, prototypes)
    torch.testing.assert_close(Entropy(regularization_weight=3.0)(anchors, targets, prototypes),
                               cross_entropy + 3.0 * mean.max(), rtol=0, atol=0)


@pytest.mark.parametrize("make,match", [
    (lambda: MSNLoss(temperature=0.0), r"temperature must be in \(0, inf\) but is 0.0."),
    (lambda: PMSNLoss(temperature=-1), r"temperature must be in \(0, inf\) but is -1."),
    (lambda: PMSNCustomLoss(uniform_prior, sinkhorn_iterations=-1), "sinkhorn_iterations must be >= 0 but is -1."),
])
def test_constructor_errors_are_lightlys(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("call,error,match", [
    (lambda a, t, p: MSNLoss()(a[:, :5], t, p), ValueError, "anchors, targets, prototypes must share their dim"),
    (lambda a, t, p: fn.msn_targets(t, p[:, :3]), ValueError, "targets, prototypes must share their dim"),
    (lambda a, t, p: MSNLoss()(a[:-1], t, p), ValueError, "whole number of views"),
    (lambda a, t, p: MSNLoss()(a, t, p[0]), ValueError, "prototypes must have 2 dimensions"),
    (lambda a, t, p: MSNLoss()(a.long(), t, p), TypeError, "anchors must be float16"),
    (lambda a, t, p: MSNLoss()(a, t, p, target_sharpen_temperature=0.0), ValueError, "target_sharpen_temperature"),
    (lambda a, t, p: fn.msn(a, t, p, sinkhorn_iterations=-2), ValueError, "sinkhorn_iterations must be >= 0"),
])
def test_bad_inputs_name_the_argument(call, error, match):
    anchors, targets, prototypes = msn_inputs()
    with pytest.raises(error, match=match):
        call(anchors.detach(), targets.detach(), prototypes.detach())


def test_torch_backend_keeps_no_anchor_logits_for_backward():
    """The fused op saves its inputs and one LSE per anchor: no (V·B, K) tensor waits for the
    backward (lightly's graph holds three)."""
    anchors, targets, prototypes = msn_inputs(views=3, batch=8, dim=6, classes=40)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = PMSNLoss(backend="torch")(anchors, targets, prototypes)
    assert saved and max(saved) < anchors.shape[0] * prototypes.shape[0]
    loss.backward()
    assert anchors.grad.abs().sum() > 0
