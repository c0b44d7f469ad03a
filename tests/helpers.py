"""Helpers shared by the tests, the error bounds among them.

Every float comparison bounds |result − exact|, with exact a float64 evaluation of the same math
on the same (rounded) inputs, by a bound derived from the computation, never one fitted on a
machine: another CPU runs other vector kernels and summation orders and may use all of it.
``u`` is the unit roundoff of the arithmetic (2⁻²⁴ in float32: float16/bfloat16 inputs are
computed in float32 too); an n-term sum or dot is off by at most γ_n·Σ|terms|, γ_n = n·u/(1 − n·u)
(Higham, Accuracy and Stability of Numerical Algorithms, §3.1). The bounds are worst cases:
rounding errors of random sign use a fraction of them (a few percent where many roundings add up,
up to ~0.6 where a handful do), and a real bug (a term missing, a wrong scale, a cancelling
formula) far more than all of them.
"""
import math
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from oracles import barlow_formula, vicreg_formula

BACKENDS_ON_CPU = ["reference", "torch"]


def backend_params(op: str):
    """One ``pytest.param`` per backend the registry's manifest lists for ``op``, id = backend:
    triton ones marked ``triton`` (run under the interpreter here), native ones ``native`` (the
    extension is built once per session, or the test is skipped with the reason)."""
    from fastssl.runtime.registry import MANIFEST

    marks = {"triton": [pytest.mark.triton], "native": [pytest.mark.native]}
    return [pytest.param(backend, id=backend, marks=marks.get(backend, [])) for backend in MANIFEST[op]]


FLOAT_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]
HALF_DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]

U32 = 2.0 ** -24  # float32's unit roundoff


def unit_roundoff(dtype):
    """u of a computation in ``dtype`` checked against a float64 oracle: 2⁻²⁴ for float32 and the
    half dtypes (computed in float32); for float64, 2 · 2⁻⁵³, as the oracle then carries an
    error of the same size as the result's."""
    return 2 * 2.0 ** -53 if dtype == torch.float64 else U32


def gamma(n, u=U32):
    """γ_n = n·u / (1 − n·u): relative error of an n-term sum or dot (relative to Σ|terms|)."""
    return n * u / (1 - n * u)


def assert_within(actual, expected, bound, what="values"):
    """Elementwise |actual − expected| ≤ bound (a number or a tensor broadcast against them); the
    message gives the worst fraction of the bound used."""
    error = (actual.double() - expected.double()).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64).to(error.device).expand_as(error)
    assert torch.isfinite(error).all(), f"{what}: non-finite error"
    used = (error / bound.clamp_min(1e-300)).max().item() if error.numel() else 0.0
    assert (error <= bound).all(), (f"{what}: error {error.max().item():.3g} exceeds its derived bound "
                                    f"({used:.3g} of it used at worst)")


# --------------------------------------------------------------------------------------------
# Cross-entropy of cosine logits (NT-Xent, InfoNCE, CLIP)
# --------------------------------------------------------------------------------------------
def logit_error(dim, scale, u=U32, scale_error=1):
    """|δs| for a logit s = scale · q̂·k̂ of rows of ``dim`` entries normalised by the backend: each
    normalisation puts (D/2 + 4)u relative on an entry (a D-term sum of squares, its square root,
    the division), the D-term dot adds D·u (Σ|q̂ᵢk̂ᵢ| ≤ 1) and the scale ``scale_error``·u (its
    rounding to float32: 1; a float32 exp() of a learnable log-scale: 3)."""
    return (2 * dim + 8 + scale_error) * u * scale


def ce_bound(expected, dim, scale, candidates, rows=1, total_weight=1.0, u=U32, scale_error=1):
    """Bound on |δL| for a weighted sum L of cross-entropies over cosine logits (``logit_error``),
    given its float64 value ``expected`` (a tensor of per-row losses: one bound each).

    Per row, ℓ = LSE(s) − mean_P s moves by ≤ δs·Σ|p − y| under logit errors δs, where
    Σ|p − y| ≤ 2, and ≤ 2(1 − p₊) ≤ 2ℓ with one positive (1 − p ≤ −log p), ≤ 3ℓ with |P| ≥ 2
    (ℓ ≥ log|P|); the softmax of ``candidates`` logits rounds by ≤ (M + 2)u absolute plus 2u·ℓ;
    summing ``rows`` rows adds γ_rows·Σℓ. So
    |δL| ≤ δs·min(3L, 2Σw) + (rows + 3)u·L + (M + 2)u·Σw, Σw = ``total_weight``.
    """
    delta_s = logit_error(dim, scale, u, scale_error)
    loss = torch.as_tensor(expected).detach().double().abs()
    return (delta_s * torch.minimum(3 * loss, torch.full_like(loss, 2 * total_weight))
            + (rows + 3) * u * loss + (candidates + 2) * u * total_weight)


def assert_ce_within(loss, expected, dim, scale, candidates, rows=1, total_weight=1.0, u=U32, scale_error=1):
    """``loss`` within ``ce_bound`` of its float64 ``expected``."""
    assert_within(loss, expected, ce_bound(expected, dim, scale, candidates, rows, total_weight, u, scale_error),
                  "loss")


def info_nce_grad_bound(vectors, blocks, scale, u=U32, scale_error=1):
    """Per row i of ``vectors``, a bound on every entry of |fp32 ∂L/∂xᵢ − float64 ∂L/∂xᵢ|.

    ``vectors``: (R, D) float64, every row the logits are built from, unnormalised. ``blocks``:
    (rows, cols, allowed, positive, weight) tuples, one cross-entropy per entry of ``rows`` over
    the logits scale · x̂_rows·x̂_colsᵀ that ``allowed`` (len(rows), len(cols)) keeps, with
    ``positive`` averaged outside the log (SupCon's L_out; a row without one adds 0), times
    ``weight`` (1 / rows for a mean); an optional sixth entry True leaves the positives out of
    the softmax (DCL's decoupled denominator), and a seventh (len(rows),) weighs each row's
    positive term (DCLW).

    ∂L/∂xᵢ = (I − x̂ᵢx̂ᵢᵀ)/‖xᵢ‖ · scale · Σ G x̂ over the logits touching i (as a row and as a
    column), G = weight · (p − y): each G is off by ≤ |G|(2δs + (2M + 3)u) (the logits'
    ``logit_error``, an M-term softmax) and by 4u·weight per positive (p₊ ≈ 1 rounds absolutely);
    the D-term sums and the projection add (D + 4)u of Σ|G|. So the bound is
    scale/‖xᵢ‖ · [Wᵢ(2δs + (2M + D + 7)u) + 4u·Pᵢ], Wᵢ = Σ|G| and Pᵢ = Σ weight over positive
    logits touching i, from the float64 softmax. ``scale`` is signed (lightly allows τ < 0): the
    logits take its sign, the bound its magnitude.
    """
    x = vectors.detach().double().cpu()
    unit = F.normalize(x, dim=1)
    total, positives = x.new_zeros(x.shape[0]), x.new_zeros(x.shape[0])
    candidates = 0
    for rows, cols, allowed, positive, weight, *dcl in blocks:
        logits = (scale * unit[rows] @ unit[cols].T).masked_fill(~allowed, float("-inf"))
        chosen = (positive & allowed).double()
        count = chosen.sum(dim=1, keepdim=True)
        has_positive = (count > 0).double()
        decoupled, positive_weight = (dcl + [False, None])[:2]
        if decoupled:  # DCL: the positives are not in the softmax
            logits = logits.masked_fill(positive, float("-inf"))
        if positive_weight is not None:  # DCLW: each row's positive term weighted
            chosen = chosen * positive_weight.double()[:, None]
        g = weight * has_positive * (torch.softmax(logits, dim=1) - chosen / count.clamp_min(1)).abs()
        total.index_add_(0, rows, g.sum(dim=1)).index_add_(0, cols, g.sum(dim=0))
        p = weight * has_positive * chosen.abs()
        positives.index_add_(0, rows, p.sum(dim=1)).index_add_(0, cols, p.sum(dim=0))
        candidates = max(candidates, int(allowed.sum(dim=1).max()))
    dim = x.shape[1]
    per_weight = 2 * logit_error(dim, abs(scale), u, scale_error) + (2 * candidates + dim + 7) * u
    return abs(scale) / x.norm(dim=1) * (total * per_weight + 4 * u * positives)


def block_sizes(blocks):
    """(most candidates of any row, number of rows) of ``info_nce_grad_bound``'s blocks: the
    ``candidates`` and ``rows`` of ``ce_bound``."""
    return (max(int(allowed.sum(dim=1).max()) for _, _, allowed, _, _ in blocks),
            sum(len(rows) for rows, _, _, _, _ in blocks))


def assert_info_nce_grads_within(actual, expected, vectors, blocks, scale, u=U32, scale_error=1):
    """Gradients of the first rows of ``vectors`` (``actual`` and float64 ``expected``, one tensor
    per input, in the order of ``vectors``' rows) within ``info_nce_grad_bound``."""
    bound = info_nce_grad_bound(vectors, blocks, scale, u, scale_error)
    start = 0
    for index, (got, want) in enumerate(zip(actual, expected)):
        assert got is not None and got.shape == want.shape
        assert_within(got, want, bound[start:start + got.shape[0], None], f"gradient of input {index}")
        start += got.shape[0]


def simclr_blocks(n_views, batch, labels=None):
    """NT-Xent's logits over V stacked views (rows of ``torch.cat(views)``): every row against every
    other, positives the rows of the same sample (or label)."""
    ids = (torch.arange(batch) if labels is None else labels).repeat(n_views)
    rows = torch.arange(n_views * batch)
    not_self = ~torch.eye(len(rows), dtype=torch.bool)
    return [(rows, rows, not_self, (ids[:, None] == ids[None, :]) & not_self, 1.0 / len(rows))]


def dcl_blocks(batch, positive_weights=None):
    """DCL's logits over the two stacked views: ``simclr_blocks`` with the positive out of the
    softmax (and weighted by ``positive_weights`` (2·batch,), DCLW)."""
    return [block + (True, positive_weights) for block in simclr_blocks(2, batch)]


def cross_blocks(positive, allowed=None, symmetric=False):
    """InfoNCE's logits of N queries (rows 0..N) against M keys (rows N..N+M), ``positive`` (N, M);
    ``symmetric`` adds the columns' cross-entropies (CLIP), the mean of both halves."""
    n, m = positive.shape
    allowed = torch.ones(n, m, dtype=torch.bool) if allowed is None else allowed
    rows, cols = torch.arange(n), torch.arange(n, n + m)
    half = 0.5 if symmetric else 1.0
    blocks = [(rows, cols, allowed, positive, half / n)]
    if symmetric:
        blocks.append((cols, rows, allowed.T, positive.T, half / m))
    return blocks


def bank_blocks(batch, bank_size):
    """MoCo's logits: query i (rows 0..B) against its positive key (row B + i) and the bank (rows
    2B..2B + K)."""
    allowed = torch.zeros(batch, batch + bank_size, dtype=torch.bool)
    allowed[:, batch:] = True
    allowed[torch.arange(batch), torch.arange(batch)] = True
    positive = torch.zeros_like(allowed)
    positive[torch.arange(batch), torch.arange(batch)] = True
    return [(torch.arange(batch), torch.arange(batch, 2 * batch + bank_size), allowed, positive, 1.0 / batch)]


# --------------------------------------------------------------------------------------------
# Log-domain Sinkhorn and soft-target cross-entropy (SwAV, DINO)
# --------------------------------------------------------------------------------------------
def sinkhorn_log_span(scores, epsilon, row_marginals=None, col_marginals=None):
    """L, the largest magnitude of a log entry of the plan: max|s|/ε plus −log of the smallest
    normalised marginal of each side (ln K + ln B for uniform marginals)."""
    k, b = scores.shape[1], scores.shape[0]
    span = scores.detach().double().abs().max().item() / epsilon
    for marginals, size in ((row_marginals, k), (col_marginals, b)):
        smallest = 1.0 / size if marginals is None else (marginals.double().min() / marginals.double().sum()).item()
        span -= math.log(smallest)
    return span


def sinkhorn_rel_error(iterations, log_span, batch, num_prototypes, u=U32):
    """Relative error of every code after T iterations of the log-domain iteration on (B, K)
    scores, logs of size ≤ L (``sinkhorn_log_span``). s/ε rounds by uL. Each half-step
    x − LSE(x) over n = K or B logs rounds the result (uL) and the LSE (uL + (n + 1)u: its logs'
    size, the n-term sum and its log); the updates are non-expansive in the logs (Sinkhorn's
    contraction is not credited), so T iterations add T(4L + K + B + 4)u. The first (global)
    normalisation adds 2Lu; its LSE (uL + (BK + 1)u) shifts every log by one constant, which the
    first row normalisation removes: it counts only without iterations. The final exp of
    x + log B adds uL + 4u. Relative per entry (a log error), whatever the entry's size."""
    first = 2 * log_span + batch * num_prototypes if iterations == 0 else 0
    return ((4 * iterations + 3) * log_span + iterations * (num_prototypes + batch + 4) + first + 6) * u


def soft_ce_pairs_bounds(targets, logits, scale, weights, target_error=0.0, logit_error=0.0, dtype=torch.float32):
    """Bounds on the float32 errors of soft-target cross-entropies of crop pairs, from float64
    ``targets`` (T, B, K) and ``logits`` (S, B, K):

        loss[t, s] = −(1/B) Σ_b Σ_k q_tbk · log softmax(z_sb)_k,  z = scale · x

    and on the gradients of Σ weights[t, s] · loss[t, s], computed in ``dtype``. ``target_error``:
    the targets' relative error (codes of a float32 Sinkhorn, a float32 teacher softmax);
    ``logit_error``: an absolute error of every z before the loss (a fused last layer's GEMM), a
    number or (S, B). The backends flush a target below φ = sqrt(tiny) × its row's peak, and a
    probability below φ (so that products stay normal numbers): absolute errors φ·peak and φ.

    Each log p_k = z_k − LSE(z) is off by ≤ e = (|z_k| + max|z| + |LSE| + |log p_k| + K + 4)u + 2δz
    (z's rounding, the K-term sum and log of the LSE, the subtraction). So:
    loss_ts ≤ (1/B) Σ|q|(e + (e_q + γ_BK)|log p|); ∂/∂q_tbk = −(1/B) Σ_s G_ts log p_sbk, off by
    ≤ (1/B) Σ_s |G|(e + γ_S |log p|); ∂/∂x_sbk = (σ/B) Σ_t G_ts (p Q_tb − q_tbk), Q = Σ_k q, with
    p off by e relative and q by e_q: ≤ (σ/B) Σ_t |G|(Q p (e + e_q + (T + K + 5)u) + |q|(e_q + (T + 5)u))
    (the T-term sum; G's rounding to ``dtype``, σ/B's, the products' and the subtraction's).
    The flushing adds (1/B) Σ φ·peak·|log p| to the loss and (σ/B) Σ_t |G| (φ·peak (K·p + 1) + Q φ)
    to ∂/∂x.
    Returns (loss (T, S), ∂targets (T, B, K), ∂logits (S, B, K)).
    """
    u = unit_roundoff(dtype)
    flushed = math.sqrt(torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).tiny)
    q, x = targets.detach().double(), logits.detach().double()
    n_targets, batch, classes = q.shape
    n_students = x.shape[0]
    g = weights.detach().double().abs()
    z = scale * x
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    log_p = z - lse
    delta_z = torch.as_tensor(logit_error, dtype=torch.float64)
    delta_z = delta_z[..., None] if delta_z.dim() else delta_z
    e = (z.abs() + z.abs().amax(-1, keepdim=True) + lse.abs() + log_p.abs() + classes + 4) * u + 2 * delta_z
    q_abs = q.abs()
    peak = flushed * q_abs.amax(-1)  # (T, B)
    loss = (torch.einsum("tbk,sbk->ts", q_abs, e)
            + (target_error + gamma(batch * classes, u)) * torch.einsum("tbk,sbk->ts", q_abs, log_p.abs())
            + torch.einsum("tb,sbk->ts", peak, log_p.abs())) / batch
    grad_targets = (torch.einsum("ts,sbk->tbk", g, e) + gamma(n_students, u) * torch.einsum("ts,sbk->tbk", g, log_p.abs())) / batch
    p = log_p.exp()
    total = q_abs.sum(-1)  # Q_tb
    grad_logits = scale / batch * (
        torch.einsum("ts,tb,sbk->sbk", g, total, p * (e + target_error + (n_targets + classes + 5) * u) + flushed)
        + (target_error + (n_targets + 5) * u) * torch.einsum("ts,tbk->sbk", g, q_abs)
        + torch.einsum("ts,tb,sbk->sbk", g, peak, classes * p + 1))
    return loss, grad_targets, grad_logits


# --------------------------------------------------------------------------------------------
# Batch-normalised losses (Barlow Twins, VICReg)
# --------------------------------------------------------------------------------------------
def batch_norm_grad_tolerance(batch, dim, u=U32):
    """Normwise relative bound on the gradients of a batch-normalised loss: ‖δg‖∞ ≤ this ·
    ‖g‖∞, from the N-term means of the batch-norm backward and the D-term sums on the loss side,
    each ≤ γ of its length on either side of the normalisation."""
    return 2 * (batch + dim + 8) * u


def barlow_twins_loss_bound(z_a, z_b, lambda_param, eps=1e-5, u=U32):
    """|δL| of Barlow Twins on (N, D) views: every |δC_ij| ≤ δC = (3N + 8)u (two batch norms, each
    ≤ (N + 4)u relative per entry, and an N-term dot with Σ|aᵢbⱼ|/N ≤ 1); L moves by
    2δC·(Σ|1 − cᵢᵢ| + λΣ_{i≠j}|C_ij|) under them, and the D²-term sums that form L (with the Gram
    path's ⟨aaᵀ, bbᵀ⟩ and its ‖C‖² − Σc² cancellation) round by (D² + N² + 4D)u of
    Σ(1 − cᵢᵢ)² + λ‖C‖²."""
    n, d = z_a.shape
    a, b = (_batch_normalized64(z, eps) for z in (z_a, z_b))
    c = a.T @ b / n
    diagonal = torch.diagonal(c)
    off_diagonal = c - torch.diag(diagonal)
    first_order = 2 * (3 * n + 8) * u * ((1 - diagonal).abs().sum() + lambda_param * off_diagonal.abs().sum())
    summing = (d * d + n * n + 4 * d) * u * ((1 - diagonal).pow(2).sum() + lambda_param * c.pow(2).sum())
    return (first_order + summing).item()


def _batch_normalized64(z, eps):
    z = z.detach().double()
    return (z - z.mean(dim=0)) / torch.sqrt(z.var(dim=0, unbiased=False) + eps)


def vicreg_loss_bound(z_a, z_b, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4, u=U32):
    """|δL| of VICReg on (B, …, D) views, term by term: invariance, a mean of B·D·… squares,
    ≤ λ(numel + 4)u·mse; variance, per feature δs ≤ (B + 6)u·v/(2s) (a B-term centred sum of
    squares, the square root) where the hinge s < 1 is active; covariance, every
    |δCov_ij| ≤ (2B + 8)u·Σ_b|x_bi x_bj|/(B − 1) (the centring and a B-term dot), which moves
    Σ_{i≠j}Cov²/D by 2|Cov|δCov/D, plus (D² + 4)u of the term for its D²-term sum."""
    za, zb = z_a.detach().double(), z_b.detach().double()
    batch, dim = za.shape[0], za.shape[-1]
    bound = lambda_param * (za.numel() + 4) * u * ((za - zb) ** 2).mean().item()
    off_diagonal = ~torch.eye(dim, dtype=torch.bool)
    for z in (za, zb):
        x = z - z.mean(dim=0)
        variance = (x * x).sum(dim=0) / (batch - 1)
        std = torch.sqrt(variance + eps)
        bound += mu_param * 0.5 * ((batch + 6) * u * variance / (2 * std) * (std < 1)).mean().item()
        cov = torch.einsum("b...c,b...d->...cd", x, x) / (batch - 1)
        cov_error = (2 * batch + 8) * u * torch.einsum("b...c,b...d->...cd", x.abs(), x.abs()) / (batch - 1)
        bound += nu_param * ((2 * cov.abs() * cov_error)[..., off_diagonal].sum(-1) / dim).mean().item()
        bound += nu_param * (dim * dim + 4) * u * ((cov[..., off_diagonal] ** 2).sum(-1) / dim).mean().item()
    return bound


# --------------------------------------------------------------------------------------------
# Half precision
# --------------------------------------------------------------------------------------------
def half_error_within_twice_reference(result_half, result_ref_half, exact, factor=2.0, floor=1e-6):
    """flash-attention's rule: |fastssl(half) − exact| ≤ factor · |reference(half) − exact| (+ floor).

    ``result_half``: the backend run on half-precision inputs; ``result_ref_half``: the reference
    computed in that dtype (inputs and arithmetic); ``exact``: float64 on the same (rounded) inputs.
    Rounding to the half dtype dominates both errors, so the ratio does not depend on the CPU.
    """
    err = (result_half.double() - exact).abs().max().item()
    ref_err = (result_ref_half.double() - exact).abs().max().item()
    assert err <= factor * ref_err + floor, f"error {err:.3g} > {factor} × reference error {ref_err:.3g}"


def one_intra_op_thread_unless_asked():
    """Module fixture body: run on one intra-op thread (tiny tensors only pay synchronisation on a
    shared 2-core machine, 10-50× for long Sinkhorn loops), unless OMP_NUM_THREADS names a count,
    as ``.ci/portability`` does to run these tests on other thread counts too."""
    if os.environ.get("OMP_NUM_THREADS"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sinkhorn_bound(scores, iterations, epsilon, exact, row_marginals=None, col_marginals=None, dtype=torch.float32):
    """sinkhorn_rel_error on every code (relative, a log error), for the float64 ``exact``; codes
    below the normal range of ``dtype`` underflow or are flushed: ≤ its tiny absolute."""
    span = sinkhorn_log_span(scores, epsilon, row_marginals, col_marginals)
    relative = sinkhorn_rel_error(iterations, span, *scores.shape, unit_roundoff(dtype))
    return relative * exact.abs() + torch.finfo(dtype).tiny


BACKENDS = [pytest.param(b, id=b) for b in BACKENDS_ON_CPU]


def as_leaves64(tensors):
    return [t.detach().double().requires_grad_(True) for t in tensors]


def center_error(teacher, center, momentum, u=U32):
    """|δ center| of m·c + (1 − m)·mean(teacher): three roundings of each product and the sum,
    and the T·B-term mean of the teacher (γ_TB of its magnitudes)."""
    t = torch.stack([x.detach().double() for x in teacher])
    mean = t.mean(dim=(0, 1)).reshape(center.shape)
    return (3 * u * (momentum * center.double().abs() + (1 - momentum) * mean.abs())
            + (1 - momentum) * gamma(t.shape[0] * t.shape[1], u) * t.abs().mean(dim=(0, 1)).reshape(center.shape))


FUSED = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.triton)]


def _assert_barlow_within(loss, z_a, z_b, lambda_param, grads=None):
    """A float32 Barlow Twins loss (and its gradients) against ``barlow_formula`` in float64 on the
    same inputs: barlow_twins_loss_bound, _assert_grads_within."""
    z_a64, z_b64 = (z.detach().double().requires_grad_() for z in (z_a, z_b))
    expected = barlow_formula(z_a64, z_b64, lambda_param)
    assert_within(loss, expected, barlow_twins_loss_bound(z_a, z_b, lambda_param), "loss")
    if grads is not None:
        _assert_grads_within(grads, _grads(expected, z_a64, z_b64), *z_a.shape)


def _assert_close_scaled(actual, expected, rtol):
    """Elementwise |actual − expected| ≤ rtol · max|expected| (gradients have entries near 0)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale)


def _assert_vicreg_within(loss, z_a, z_b, params, grads=None):
    """``_assert_barlow_within`` for VICReg: vicreg_loss_bound, _assert_grads_within."""
    z_a64, z_b64 = (z.detach().double().requires_grad_() for z in (z_a, z_b))
    expected = vicreg_formula(z_a64, z_b64, **params)
    assert_within(loss, expected, vicreg_loss_bound(z_a, z_b, **params), "loss")
    if grads is not None:
        _assert_grads_within(grads, _grads(expected, z_a64, z_b64), z_a.shape[0], z_a.shape[-1])


def _grads(loss, *inputs):
    return torch.autograd.grad(loss, inputs)


def _views(*shape, dtype=torch.float32, scale=1.0, shift=0.0, grad=False):
    """Two correlated views (so C and the invariance term are not trivial)."""
    base = torch.randn(*shape, dtype=torch.float64)
    z_a = base * scale + shift + 0.5 * torch.randn(*shape, dtype=torch.float64)
    z_b = base * scale - shift + 0.5 * torch.randn(*shape, dtype=torch.float64)
    return z_a.to(dtype).requires_grad_(grad), z_b.to(dtype).requires_grad_(grad)


def _assert_grads_within(grads, exact_grads, batch, dim, scale=1.0):
    """float32 gradients of a batch-normalised loss (times ``scale``) against float64 ones:
    normwise, ‖δg‖∞ ≤ batch_norm_grad_tolerance · ‖g‖∞ (tests/helpers.py)."""
    for g, e in zip(grads, exact_grads):
        assert g.dtype == torch.float32
        e = scale * e.double()
        assert_within(g, e, batch_norm_grad_tolerance(batch, dim) * e.abs().max().item(), "gradient")


# --------------------------------------------------------------------------------------------
# Normalised rows and the spectral losses (TiCo, MMCR, FroSSL, EMP-SSL, hypersphere)
# --------------------------------------------------------------------------------------------
def seeded_views(*shape, count=2, base_scale=1.0, noise=0.5, dtype=torch.float32, seed=0, grad=False):
    """``count`` correlated views base_scale·base + noise·randn of ``shape`` (float64 draws from a
    generator seeded ``seed``, then cast), so positives and invariance terms are not trivial."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g, dtype=torch.float64)
    return [(base_scale * base + noise * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)
            .requires_grad_(grad) for _ in range(count)]


def normalized_entry_error(dim, u=U32):
    """Relative error of each entry of a vector of ``dim`` entries normalised in floating point
    (x/peak, then F.normalize): a D-term sum of squares (D·u), its square root (u/2 more, half of
    it), two divisions."""
    return (dim / 2 + 4) * u


def _normalization_grad_abs(unit, norms, grad_abs):
    """|J|ᵀ|g| for x̂ = x/‖x‖ (rows): |(I − x̂x̂ᵀ)g|/‖x‖ ≤ (|g| + |x̂|(|x̂|·|g|))/‖x‖."""
    return (grad_abs + unit.abs() * (unit.abs() * grad_abs).sum(dim=-1, keepdim=True)) / norms


def tico_bounds(z_a, z_b, covariance, beta, rho, u=U32):
    """(|δL|, |δ∂L/∂z_a| entrywise, |δ∂L/∂z_b| entrywise) of TiCo on (N, D) views.

    L is a polynomial of degree ≤ 4 in the normalised entries (each off by ``normalized_entry_error``
    e relative): 1 − mean â·b̂ + ρ mean âC'âᵀ with C' = βC + (1 − β)âᵀâ/N, its longest chain a
    D-term product, an N-term covariance entry and a D-term quadratic form: ≤ (γ_{2D+N+8} + 4e)
    times L with every term in absolute value. The gradients −b̂/N + 2ρ/N âC' (z_a) and −â/N (z_b),
    by the same rule, pass through the normalisation's Jacobian (D + 4 more roundings)."""
    a, b = F.normalize(z_a.detach().double(), dim=1), F.normalize(z_b.detach().double(), dim=1)
    n, d = a.shape
    e = normalized_entry_error(d, u)
    previous = torch.zeros(d, d, dtype=torch.float64) if covariance is None else covariance.double()
    covariance_abs = abs(beta) * previous.abs() + abs(1 - beta) * a.abs().T @ a.abs() / n
    value_abs = 1 + (a.abs() * b.abs()).sum(1).mean() + abs(rho) * ((a.abs() @ covariance_abs) * a.abs()).sum(1).mean()
    kappa = gamma(2 * d + n + 8, u) + 4 * e
    grad_kappa = kappa + (d + 4) * u
    grad_a = b.abs() / n + 2 * abs(rho) / n * a.abs() @ covariance_abs
    norms_a, norms_b = (z.detach().double().norm(dim=1, keepdim=True) for z in (z_a, z_b))
    return (kappa * value_abs.item(), grad_kappa * _normalization_grad_abs(a, norms_a, grad_a),
            grad_kappa * _normalization_grad_abs(b, norms_b, a.abs() / n))


def hypersphere_bounds(z_a, z_b, t, lam, alpha, u=U32):
    """(|δL|, normwise relative gradient bound) of the hypersphere loss on (N, D) views.

    Alignment: ‖x̂ − ŷ‖ is off by e‖|x̂| + |ŷ|‖ + γ_{D+2}‖x̂ − ŷ‖ (e: ``normalized_entry_error``),
    so its α-th power by α d^(α−1) of that. Uniformity: each exponent −t d²_ij is off by
    ≤ 4|t|(γ_{D+4} + 2e) (d² ≤ 4, from the pair's difference or from ‖x̂ᵢ‖² + ‖x̂ⱼ‖² − 2x̂ᵢ·x̂ⱼ),
    which moves log Σ by as much; the exp() and the ≤ N²-term sums add u + γ_{N²}. The gradient
    −4t Σ_j p_ij (x̂ᵢ − x̂ⱼ) takes the p's relative error (the exponent's, twice through the
    normalisation by the sum) and the N + D-term sums of the GEMMs and the Jacobian."""
    x, y = F.normalize(z_a.detach().double()), F.normalize(z_b.detach().double())
    n, d = x.shape
    e = normalized_entry_error(d, u)
    distance = (x - y).norm(dim=1)
    distance_error = e * (x.abs() + y.abs()).norm(dim=1) + gamma(d + 2, u) * distance
    alignment = (abs(alpha) * distance.pow(alpha - 1) * distance_error + 2 * u * distance.pow(alpha)).mean()
    alignment = alignment + gamma(n, u) * distance.pow(alpha).mean()
    exponent_error = 4 * abs(t) * (gamma(d + 4, u) + 2 * e)
    uniformity = exponent_error + u + gamma(n * n, u)
    value = alignment.item() + abs(lam) * uniformity
    grad_kappa = 2 * (2 * exponent_error + gamma(n * n + d + 8, u) + 4 * e)
    return value, grad_kappa


def frossl_bounds(views, invariance_weight, u=U32):
    """|δL| of FroSSL on V views (N, D): per view, the smaller Gram K of the column-normalised ẑ
    (entries off by (γ_s + 2e)(|ẑ||ẑ|ᵀ), s = max(N, D) the dot length, e the normalisation's)
    moves log‖K‖²_F by 2Σ|K|δK/‖K‖², its k²-term sum by γ_{k²} and log tr K by γ_{ND} + 2e; the
    invariance V·D·mean((ẑ − z̄)²) by 2·mean(|ẑ − z̄|δ) + γ_{ND+4}·mse, δ the difference's error."""
    unit = torch.stack([F.normalize(z.detach().double(), p=2, dim=0) for z in views])
    num_views, n, d = unit.shape
    e = normalized_entry_error(n, u)
    mean = unit.mean(dim=0)
    mean_abs = unit.abs().mean(dim=0)
    total = 0.0
    for z in unit:
        gram, gram_abs = (z @ z.T, z.abs() @ z.abs().T) if n <= d else (z.T @ z, z.abs().T @ z.abs())
        k = gram.shape[0]
        squared = gram.square().sum()
        total += (2 * (gram.abs() * (gamma(max(n, d), u) + 2 * e) * gram_abs).sum() / squared).item()
        total += gamma(k * k, u) + 2 * (gamma(n * d, u) + 2 * e) + 4 * u
        difference = z - mean
        difference_error = e * (z.abs() + mean_abs) + gamma(num_views + 1, u) * mean_abs + u * difference.abs()
        mse = difference.square().mean()
        total += abs(invariance_weight) * num_views * d * (
            2 * (difference.abs() * difference_error).mean() + gamma(n * d + 4, u) * mse).item()
    return total


def emp_ssl_bounds(views, tcr_eps, inv_coef, u=U32):
    """(|δL|, (κ_tcr, ‖g_tcr‖∞-relative) and κ_inv) of EMP-SSL on V views (N, D).

    logdet M, M = I + cG from either side (D×D: ZᵀZ; N×N: ZZᵀ), moves by Σ|M⁻¹| ∘ |δM| (first
    order) where δM = c·γ_s|Z|ᵀ|Z| + u|M| (the Gram's s-term dots and the scaling) plus the
    factorisation's backward error γ_{3k}|L||Lᵀ| (Cholesky; LU of this SPD matrix alike), and its
    k logs of pivots by k·u + γ_k of their sum; the larger of the two sides is taken. The cosine
    invariance is off by (2D + 8 + V)u per term. Gradients: the solve with M is off by
    cond(M)·γ_{3k} (cond(M) = 1 + c·σ_max², from float64), the rest by the Gram's and cosine's."""
    z = torch.stack([v.detach().double() for v in views])
    num_views, n, d = z.shape
    c = d / (n * tcr_eps)
    tcr = 0.0
    condition = 1.0
    for v in z:
        sides = []
        for gram, gram_abs, length in ((v.T @ v, v.abs().T @ v.abs(), n), (v @ v.T, v.abs() @ v.abs().T, d)):
            k = gram.shape[0]
            m = torch.eye(k, dtype=torch.float64) + c * gram
            factor = torch.linalg.cholesky(m)
            delta = c * gamma(length, u) * gram_abs + u * m.abs() + gamma(3 * k, u) * factor.abs() @ factor.abs().T
            pivots = factor.diagonal().log().abs().sum()
            sides.append((torch.linalg.inv(m).abs() * delta).sum().item() + 2 * (k * u + gamma(k, u)) * pivots.item())
            eigenvalues = torch.linalg.eigvalsh(m)
            condition = max(condition, (eigenvalues[-1] / eigenvalues[0]).item())
        tcr += 0.5 * max(sides) / num_views
    value = tcr + abs(inv_coef) * ((2 * d + 8 + num_views) * u + gamma(num_views * n, u))
    kappa_tcr = 2 * (condition * gamma(3 * max(n, d) + 8, u) + gamma(max(n, d) + 8, u))
    kappa_inv = 2 * (2 * d + 8 + num_views) * u
    return value, kappa_tcr, kappa_inv


def _nuclear_norm_error(matrices, entry_error, u):
    """Per trailing (m, n) matrix A, a bound on the error of ‖A‖_* and on the 2-norm error of its
    gradient UVᵀ, given entrywise input errors: each σ moves by ≤ ‖δA‖_F (Weyl) plus the
    decomposition's backward error — an SVD's (max(m, n) + 4)u‖A‖, or a float64 Gram's
    eigenvalues' √(max(m, n)·u64)‖A‖_F — over min(m, n) values; UVᵀ moves by ≤ 2‖ΔA‖/σ_min."""
    a = matrices.reshape(-1, *matrices.shape[-2:])
    m, n = a.shape[-2:]
    sigma = torch.linalg.svdvals(a)
    frobenius = a.norm(dim=(-2, -1))
    backward = (max(m, n) + 4) * u * sigma[:, 0] + math.sqrt(max(m, n) * 2.0 ** -53) * frobenius
    perturbation = entry_error.reshape(a.shape).norm(dim=(-2, -1)) + backward
    return min(m, n) * perturbation, 2 * perturbation / sigma[:, -1]


def mmcr_bounds(online, momentum, lmda, u=U32):
    """(|δL|, entrywise gradient bound) of MMCR on (B, k, D) views: the centroids c are off by
    γ_{2k}·mean|z| entrywise (the inputs themselves are exact), each nuclear norm and gradient by
    ``_nuclear_norm_error``; the gradient of z from −‖c‖_* is the centroid's over 2k."""
    z = torch.cat([online.detach().double(), momentum.detach().double()], dim=1)
    batch, views = z.shape[:2]
    c = z.mean(dim=1)
    value_c, grad_c = _nuclear_norm_error(c, gamma(views + 1, u) * z.abs().mean(dim=1), u)
    value_z, grad_z = _nuclear_norm_error(z, torch.zeros_like(z), u)
    nuclear_z = torch.linalg.svdvals(z).sum()
    loss = -torch.linalg.svdvals(c).sum() + lmda * nuclear_z / batch
    value = value_c.item() + abs(lmda) / batch * (value_z.sum() + gamma(batch, u) * nuclear_z).item() + u * abs(loss.item())
    grad = grad_c.item() / views + abs(lmda) / batch * grad_z.max().item()
    return value, grad


# --------------------------------------------------------------------------------------------
# VICRegL
# --------------------------------------------------------------------------------------------
def vicregl_inputs(batch=6, dim=11, local_dim=5, grid_sizes=(4, 4, 2, 2, 2), n_global=2, dtype=torch.float32,
                   seed=0, grad=False, scale=0.6, grid_dtype=None):
    """VICRegL's forward arguments (global_view_features, global_view_grids, local_view_features,
    local_view_grids): one view per grid size, the first ``n_global`` global. Features are correlated
    across views (scale·base + 0.5·noise, float64 draws then cast); grids as lightly's
    VICRegLTransform makes them: a random crop (left, top, size in pixels) on a linspace
    meshgrid ("xy"), flipped horizontally for half the images, in ``grid_dtype`` (default ``dtype``)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    base, base_local = rand(batch, dim), rand(batch, local_dim)
    features, grids = [], []
    for size in grid_sizes:
        global_features = (scale * base + 0.5 * rand(batch, dim)).to(dtype).requires_grad_(grad)
        local_map = (scale * base_local[:, None, None] + 0.5 * rand(batch, size, size, local_dim))
        features.append((global_features, local_map.to(dtype).requires_grad_(grad)))
        corner = 200 * torch.rand(batch, 1, 1, 2, generator=g, dtype=torch.float64)
        extent = 40 + 160 * torch.rand(batch, 1, 1, 1, generator=g, dtype=torch.float64)
        steps = torch.linspace(0, 1, size, dtype=torch.float64)
        unit = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1)
        flip = torch.rand(batch, generator=g) < 0.5
        unit = torch.where(flip[:, None, None, None], unit.flip(1), unit)
        grids.append((corner + extent * unit).to(grid_dtype or dtype))
    return features[:n_global], grids[:n_global], features[n_global:], grids[n_global:]


def vicregl_bounds(leaves, terms, params, u=U32):
    """Bounds on a float32 VICRegL loss and its gradients against ``oracles.lightly_vicregl_terms64``
    on float64 ``leaves`` (the terms built from them, matches included): the loss is Σ wₜ·termₜ,
    each term a VICReg piece bounded by vicreg_loss_bound (its gradient normwise by
    batch_norm_grad_tolerance), plus γ of the terms' count for their sum. Returns (|δL| bound,
    [‖δ∂L/∂x‖∞ bound for each leaf])."""
    from oracles import lightly_vicregl_term64

    lambda_param, mu_param, nu_param, eps = (params[k] for k in ("lambda_param", "mu_param", "nu_param", "eps"))
    value_bound, magnitude = 0.0, 0.0
    grad_bounds = [0.0] * len(leaves)
    summing = gamma(len(terms) + 8, u)  # the sums over terms, of the loss and of each gradient
    for weight, kind, operands in terms:
        term = lightly_vicregl_term64(kind, operands, **params)
        magnitude += abs(weight * term.item())
        first, second = operands if len(operands) == 2 else operands * 2
        piece = {"invariance": (1.0, 0.0, 0.0), "variance": (0.0, 1.0, 0.0), "covariance": (0.0, 0.0, 0.5),
                 "vicreg": (lambda_param, mu_param, 0.5 * nu_param)}[kind]
        value_bound += abs(weight) * vicreg_loss_bound(first, second, *piece, eps=eps, u=u)
        tolerance = batch_norm_grad_tolerance(first.shape[0], first.shape[-1], u) + summing
        grads = torch.autograd.grad(weight * term, leaves, allow_unused=True, retain_graph=True)
        for i, grad in enumerate(grads):
            if grad is not None:
                grad_bounds[i] += tolerance * grad.abs().max().item()
    return value_bound + summing * magnitude, grad_bounds
# Whitening (W-MSE)
# --------------------------------------------------------------------------------------------
def whitening_error(x, eps=0.0, running_mean=None, running_variance=None, u=U32):
    """Bound on ‖δY‖_F of a block's whitening Y = x_c L⁻ᵀ (``oracles.lightly_whitening64``). The
    centred rows are off by E = γ_{n+1}(|x| + |m|) entrywise (an n-term mean, a difference), the
    covariance by γ_n|x_c|ᵀ|x_c|/(n − 1) + 2|E|ᵀ|x_c|/(n − 1) (none when given), the shrinkage by
    2u|C'|, and the Cholesky factor is exact for C' + ΔC with |ΔC| ≤ γ_{D+1}|L||Lᵀ| (Higham
    Thm 10.3). chol(C' + ΔC) = L·chol(I + G), G = L⁻¹ΔCL⁻ᵀ, = L(I + Φ(G)) to first order with
    ‖Φ(G)‖_F ≤ ‖G‖_F/√2, so Y moves by ≤ ‖Y‖₂‖G‖_F/(√2(1 − ‖G‖_F)). The solve for Y (or the
    explicit L⁻¹ and its product) adds γ_D‖Y‖_F‖|L|‖₂‖L⁻¹‖₂ (Higham Thm 8.5) + γ_D‖|L⁻¹||L||L⁻¹|‖₂‖x_c‖_F
    + γ_D‖|x_c||L⁻¹|ᵀ‖_F, and E goes through L⁻ᵀ: ‖E‖_F‖L⁻¹‖₂."""
    from oracles import lightly_whitening64

    x = x.detach().double()
    n, dim = x.shape
    whitened, mean, covariance = lightly_whitening64(x, eps, running_mean, running_variance)
    centred = x - mean
    centring = gamma(n + 1, u) * (x.abs() + mean.abs())
    shrunk = (1 - eps) * covariance + eps * torch.eye(dim, dtype=torch.float64)
    factor = torch.linalg.cholesky(shrunk)
    inverse = torch.linalg.inv(factor)
    delta = gamma(dim + 1, u) * factor.abs() @ factor.abs().T + 2 * u * shrunk.abs()
    if running_variance is None:
        delta = delta + (gamma(n, u) * centred.abs().T @ centred.abs() + 2 * centring.T @ centred.abs()) / (n - 1)
    two_norm = lambda m: torch.linalg.matrix_norm(m, ord=2).item()  # noqa: E731
    g = torch.linalg.matrix_norm(inverse @ delta @ inverse.T).item()
    assert g < 0.5, "the block is too ill-conditioned for a first-order bound"
    factor_error = two_norm(whitened) * g / (math.sqrt(2) * (1 - g))
    solve = gamma(dim, u) * (whitened.norm().item() * two_norm(factor.abs()) * two_norm(inverse)
                             + two_norm(inverse.abs() @ factor.abs() @ inverse.abs()) * centred.norm().item()
                             + (centred.abs() @ inverse.abs().T).norm().item())
    return factor_error + solve + centring.norm().item() * two_norm(inverse)


def wmse_bounds(blocks, eps=0.0, running=(None, None), u=U32):
    """(|δL|, relative normwise gradient bound) of W-MSE on the sub-batches ``blocks`` (I, S, V, w, D).
    Per row, ŷ moves by ≤ 2‖δy‖/‖y‖ + (D/2 + 4)u (a normalisation); by Cauchy-Schwarz
    Σ_r ‖δy_r‖/‖y_r‖ ≤ ‖δY‖_F (Σ_r ‖y_r‖⁻²)^½ per block (``whitening_error``). Each of the V − 1
    pairs a view's row is in moves its dot by that, plus (D + V + 4)u·V² per row for the dots
    (or their fused form ‖Σŷ‖² − Σ‖ŷ‖²) and γ_{I·B}V² for the sum over rows; L = 2 − 2·mean over
    the I·P·B dots. The gradient goes through the same whitening and normalisation, so its
    relative error is bounded by 4× the largest relative perturbation of a block's Y (δY/‖Y‖₂:
    ‖G‖ sets both) and of a row's ŷ."""
    from oracles import lightly_whitening64

    iterations, subbatches, views, rows, dim = blocks.shape
    pairs = views * (views - 1) // 2
    batch = subbatches * rows
    moved, relative = 0.0, 0.0
    for block in blocks.detach().double().reshape(-1, rows, dim):
        error = whitening_error(block, eps, *running, u=u)
        whitened = lightly_whitening64(block, eps, *running)[0]
        row_norms = whitened.norm(dim=1)
        moved += 2 * error * row_norms.pow(-2).sum().sqrt().item() + rows * normalized_entry_error(dim, u)
        relative = max(relative, error / torch.linalg.matrix_norm(whitened, ord=2).item(),
                       2 * error / row_norms.min().item())
    arithmetic = iterations * batch * views ** 2 * ((dim + views + 4) * u + gamma(iterations * batch, u))
    value = 2 * ((views - 1) * moved + arithmetic) / (iterations * pairs * batch)
    return value, 4 * (relative + normalized_entry_error(dim, u))


# --------------------------------------------------------------------------------------------
# DSE (dense structure estimator)
# --------------------------------------------------------------------------------------------
def _decomposition_error(matrix, sigma, u):
    """How far a singular value of ``matrix`` may move in its decomposition: an SVD's
    (max(m, n) + 4)u·σ₁, or the eigenvalues of a float64 Gram √(max(m, n)·u64)·‖A‖_F (the
    torch backend's; rounding δλ ≈ u64·σ₁² moves a small σ = √λ by up to √δλ)."""
    return (max(matrix.shape) + 4) * u * sigma[0].item() + math.sqrt(max(matrix.shape) * 2.0 ** -53) * matrix.norm().item()


def _singular_sum_errors(cluster, entry_error, u):
    """(|δ Σσ|, relative error of its gradient UVᵀ) of a centred (n, D) cluster, given entrywise
    errors: each σ moves by ≤ ‖δA‖_F (Weyl) plus the decomposition's backward error (``_decomposition_error``),
    Σσ by min(n, D) times that; UVᵀ by ≤ 2·that/σ_r over the rank r = min(n − 1, D) the
    centring leaves (the centred-away direction gets no gradient)."""
    centred = cluster - cluster.mean(dim=0, keepdim=True)
    sigma = torch.linalg.svdvals(centred)
    n, dim = cluster.shape
    perturbation = entry_error.norm().item() + _decomposition_error(centred, sigma, u)
    return min(n, dim) * perturbation, 2 * perturbation / sigma[min(n - 1, dim) - 1].item()


def _mean_of_cluster_errors(clusters, row_error, u):
    """(|δ mean_c Σσ_c/√max(n_c − 1, D)|, the largest gradient relative error) over ``clusters``: the
    centred entries are off by (row error + γ_{n+1})(|x| + |mean x|)."""
    values, relatives, terms = [], [0.0], []
    for cluster in clusters:
        n, dim = cluster.shape
        entry = (row_error + gamma(n + 1, u)) * (cluster.abs() + cluster.mean(dim=0).abs())
        value, relative = _singular_sum_errors(cluster.detach(), entry, u)
        scale = math.sqrt(max(n - 1, dim))
        values.append(value / scale)
        relatives.append(relative)
        terms.append(torch.linalg.svdvals(cluster - cluster.mean(dim=0)).sum().item() / scale)
    if not values:
        return 0.0, 0.0
    return sum(values) / len(values) + gamma(len(values), u) * sum(terms) / len(terms), max(relatives)


def dse_bounds(representations, parts, weight, normalize, u=U32):
    """(|δL|, entrywise gradient bound) of DSE, from ``oracles.lightly_dse64``'s parts (same clusters).

    Rows: the normalised rows are off by e = (D/2 + 4)u relative (none without ``normalize``); R
    is the largest row norm. Average norm r̄: each centred row by 2(e + γ_{M+1})R, its norm by
    (D/2 + 2)u, the mean by γ_M. Inter term: a centroid (a mean of ≤ M rows) is off by
    (e + γ_M)R, so each distance by (2e + γ_M)R + (D/2 + 3)u·d and the means by γ_M. Singular
    sums: ``_singular_sum_errors`` per cluster. Effective dimensionality: every σ moves by
    ≤ p = ‖δX‖_F + ``_decomposition_error``, H by p·Σ|log p_k + H|/Σσ (∂H/∂σ_k = −(log p_k + H)/Σσ)
    plus γ_{m+2}Σ|p_k log p_k|, exp(H)/m by its relative e^{δH} − 1 + 2u. DSE = A/a + ED with
    A = I − ½(R_b + R_i), a = r̄ + 1e-12: δDSE ≤ δA/a + |A|δa/(a(a − δa)) + δED + 4u(|A|/a + ED).
    Gradients: each part's gradient moves relative to its norm by 2δd/d (the unit directions of
    the inter term and r̄), ``_singular_sum_errors``' ratio, 3p/σ_min + δH + p/Σσ (U diag(g) Vᵀ:
    vectors and weights); combined with the coefficients' own errors, plus 2e through the
    normalisation's Jacobian; an entry's error is ≤ the Frobenius norm of the gradient's."""
    x = parts["rows"].detach()
    batch_size, num_tokens, dim = x.shape
    rows = batch_size * num_tokens
    e = normalized_entry_error(dim, u) if normalize else 0.0
    big_r = x.norm(dim=-1).max().item()
    terms = {name: parts[name].item() for name in ("inter_term", "intra_batch", "intra_image", "effective",
                                                   "average_norm")}
    a = terms["average_norm"] + 1e-12
    centred_norms = (x - x.mean(dim=(0, 1))).norm(dim=-1)
    delta_a = 2 * (e + gamma(rows + 1, u)) * big_r + ((dim / 2 + 2) * u + gamma(rows, u)) * terms["average_norm"]
    kappa_a = 2 * 2 * (e + gamma(rows + 1, u)) * big_r / centred_norms.min().item()

    delta_i, kappa_i = 0.0, 0.0
    for _, _, distances in parts["inter"]:
        moved = (2 * e + gamma(rows, u)) * big_r + (dim / 2 + 3) * u * distances
        delta_i += moved.mean().item() + gamma(rows, u) * distances.mean().item()
        kappa_i = max(kappa_i, 2 * (moved / distances).max().item())
    delta_i = delta_i / max(len(parts["inter"]), 1) + gamma(len(parts["inter"]) + 1, u) * terms["inter_term"]

    delta_rb, kappa_rb = _mean_of_cluster_errors(parts["global"], e, u)
    image_errors = [_mean_of_cluster_errors(clusters, e, u) for clusters in parts["local"] if clusters]
    delta_ri = (sum(v for v, _ in image_errors) / max(len(image_errors), 1)
                + gamma(len(image_errors) + 1, u) * terms["intra_image"])
    kappa_ri = max([k for _, k in image_errors], default=0.0)

    flat = x.reshape(rows, dim)
    sigma = torch.linalg.svdvals(flat)
    perturbation = e * flat.norm().item() + _decomposition_error(flat, sigma, u)
    total = sigma.sum().item()
    probabilities = sigma / (total + 1e-12)
    logs = torch.log(probabilities + 1e-12)
    entropy = -(probabilities * logs).sum().item()
    delta_h = (perturbation * (logs + entropy).abs().sum().item() / total
               + gamma(len(sigma) + 2, u) * (probabilities * logs).abs().sum().item())
    delta_ed = terms["effective"] * (math.expm1(delta_h) + 2 * u)
    kappa_ed = 3 * perturbation / sigma[-1].item() + delta_h + perturbation / total

    big_a = terms["inter_term"] - 0.5 * (terms["intra_batch"] + terms["intra_image"])
    delta_big_a = delta_i + 0.5 * (delta_rb + delta_ri)
    value = (delta_big_a / a + abs(big_a) * delta_a / (a * (a - delta_a)) + delta_ed
             + 4 * u * (abs(big_a) / a + terms["effective"]))
    loss = -weight * (big_a / a + terms["effective"])

    source = parts["source"]
    def norm_of(name):  # a term without clusters is a constant 0
        if not parts[name].requires_grad:
            return 0.0
        return torch.autograd.grad(parts[name], source, retain_graph=True)[0].norm().item()

    g_i, g_rb, g_ri, g_ed, g_a = (norm_of(n) for n in ("inter_term", "intra_batch", "intra_image", "effective",
                                                       "average_norm"))
    g_big_a = g_i + 0.5 * (g_rb + g_ri)
    gradient = ((kappa_i * g_i + 0.5 * (kappa_rb * g_rb + kappa_ri * g_ri)) / a + g_big_a * delta_a / a ** 2
                + (abs(big_a) * kappa_a + delta_big_a + 2 * abs(big_a) * delta_a / a) * g_a / a ** 2
                + kappa_ed * g_ed + 2 * e * (g_big_a / a + abs(big_a) * g_a / a ** 2 + g_ed))
    return abs(weight) * value + u * abs(loss), abs(weight) * gradient
# Sliced regularizers: SIGReg (LeJEPA, LeWM) and VISReg's shape loss
# --------------------------------------------------------------------------------------------
def sigreg_bounds(proj, vectors, t, phi, weights, u=U32, num_samples=None):
    """(|δL|, entrywise |δ∂L/∂proj|) of SIGReg on ``proj`` (..., N, C) with float64 unit ``vectors``
    (C, M) (the backend's, normalised in the compute dtype: e_A = ``normalized_entry_error`` each)
    and the grid (t, φ, w) read exactly from float32.

    P = proj·A is off by ΔP = (γ_C + e_A)|proj||A|; each angle t_k P by δθ = t_k(ΔP + u|P|); a cos or
    sin (1 ulp) by δθ + 2u; the N-term sums c, s by Σ_n(δθ + 2u) + γ_N N, their means c̄ = c/N by that
    over N + u|c̄|. The error e_k = (c̄ − φ)² + s̄² moves by 2|c̄ − φ|δc̄ + 2|s̄|δs̄ + δc̄² + δs̄² + 5u e_k,
    the statistic N Σ_k w_k e_k by N Σ w δe + (γ_K + u) N Σ w e, the mean over the B·M slices by γ_BM.
    Gradient: G^c = 2w(c̄ − φ)/(BM), G^s = 2w s̄/(BM), each off by 2w/(BM)(δc̄ + 6u|c̄ − φ|) (resp. s̄);
    ∂L/∂P = Σ_k t_k(G^s cos − G^c sin) by Σ_k t_k[δG^s + δG^c + (|G^s| + |G^c|)(δθ + 2u)] +
    γ_{2K+2} Σ_k t_k(|G^s| + |G^c|); ∂L/∂proj = ∂L/∂P·Aᵀ by (|δ∂P| + (γ_M + e_A)|∂P|)|A|ᵀ."""
    x, a = proj.detach().double(), vectors.detach().double()
    t, phi, w = (v.double() for v in (t, phi, weights))
    c_dim, m = a.shape
    n_local, knots = x.shape[-2], t.shape[0]
    n = n_local if num_samples is None else num_samples
    slices = x[..., 0, 0].numel() * m
    e_a = normalized_entry_error(c_dim, u)
    p = x @ a
    delta_p = (gamma(c_dim, u) + e_a) * (x.abs() @ a.abs())
    delta_theta = t * (delta_p + u * p.abs()).unsqueeze(-1)  # (..., N, M, K)
    angles = p.unsqueeze(-1) * t
    c_mean, s_mean = angles.cos().sum(-3) / n, angles.sin().sum(-3) / n
    delta_sum = (delta_theta + 2 * u).sum(-3) + gamma(n_local, u) * n_local
    delta_c = delta_sum / n + u * c_mean.abs()
    delta_s = delta_sum / n + u * s_mean.abs()
    centred = c_mean - phi
    error = centred.square() + s_mean.square()
    delta_error = (2 * centred.abs() * delta_c + 2 * s_mean.abs() * delta_s + delta_c.square() + delta_s.square()
                   + 5 * u * error)
    statistic = n * (error @ w)
    value = (n * (delta_error @ w) + (gamma(knots, u) + u) * statistic).mean() + gamma(slices, u) * statistic.mean()
    g_c, g_s = 2 * w * centred / slices, 2 * w * s_mean / slices
    delta_g = 2 * w / slices * (delta_c + delta_s + 6 * u * (centred.abs() + s_mean.abs()))
    g_abs = (g_c.abs() + g_s.abs()).unsqueeze(-3)  # (..., 1, M, K)
    delta_grad_p = (t * (delta_g.unsqueeze(-3) + g_abs * (delta_theta + 2 * u))).sum(-1)
    delta_grad_p = delta_grad_p + gamma(2 * knots + 2, u) * (t * g_abs).sum(-1)
    grad_p = (t * (g_s.unsqueeze(-3) * angles.cos() - g_c.unsqueeze(-3) * angles.sin())).sum(-1)
    grad = (delta_grad_p + (gamma(m, u) + e_a) * grad_p.abs()) @ a.abs().T
    return value.item(), grad


def visreg_shape_bounds(z, slices, eps, u=U32):
    """(|δL|, entrywise |δ∂L/∂z|, the sorted projections' smallest gap over their largest error) of
    VISReg's shape loss on z (..., N, D) with float64 unit ``slices`` (D, S) (e_S each, as SIGReg's
    vectors). The mean is off by δμ = γ_{N+1} mean|z|, the biased std by δσ ≤ γ_{2N+6} rms(z) (a
    cancellation-free bound on the data's scale), σ̃ = σ + eps by u σ̃ more; ẑ = (z − μ)/σ̃ by
    (δμ + u|z − μ|)/σ̃ + |ẑ|(δσ/σ̃ + 2u); P = ẑS by |δẑ||S| + (γ_D + e_S)|ẑ||S|. Sorting is
    1-Lipschitz in the max-norm of each slice's column, so each residual r = sort(P) − q is off by
    δr = that column's max δP; L = Σr²/count by Σ(2|r|δr + δr²)/count + γ_{count+4} L.
    Gradient (when the sorted order cannot change: the gap ratio returned is > 2): ∂L/∂P = 2r/count
    off by 2(δr + u|r|)/count, ∂L/∂ẑ = ∂P·Sᵀ by |δ∂P||S|ᵀ + (γ_S + e_S)|∂P||S|ᵀ, and
    ∂L/∂z = (∂ẑ − mean_N ∂ẑ)/σ̃ by (δ∂ẑ + mean δ∂ẑ + γ_{N+1} mean|∂ẑ| + u|∂ẑ − mean ∂ẑ|)/σ̃ + |∂L/∂z|(δσ/σ̃ + u)."""
    x, s = z.detach().double(), slices.detach().double()
    n, d = x.shape[-2:]
    num_slices = s.shape[1]
    e_s = normalized_entry_error(d, u)
    mean = x.mean(dim=-2, keepdim=True)
    scale = x.std(dim=-2, unbiased=False, keepdim=True) + eps
    delta_mean = gamma(n + 1, u) * x.abs().mean(dim=-2, keepdim=True)
    delta_scale = gamma(2 * n + 6, u) * x.square().mean(dim=-2, keepdim=True).sqrt() + u * scale
    normalized = (x - mean) / scale
    delta_normalized = (delta_mean + u * (x - mean).abs()) / scale + normalized.abs() * (delta_scale / scale + 2 * u)
    p = normalized @ s
    delta_p = delta_normalized @ s.abs() + (gamma(d, u) + e_s) * (normalized.abs() @ s.abs())
    values, order = p.sort(dim=-2)
    from oracles import lightly_gaussian_quantiles  # lightly's float32 quantiles, exact inputs here
    quantiles = lightly_gaussian_quantiles(n).double().unsqueeze(-1)
    residuals = values - quantiles
    delta_r = delta_p.amax(dim=-2, keepdim=True)
    count = residuals.numel()
    loss = residuals.square().mean()
    value = ((2 * residuals.abs() * delta_r + delta_r.square()).sum() / count + gamma(count + 4, u) * loss).item()
    gap_ratio = (values.diff(dim=-2).amin(dim=-2, keepdim=True) / delta_r).min().item() if n > 1 else math.inf
    grad_p = torch.empty_like(p).scatter_(-2, order, 2 * residuals / count)
    delta_grad_p = torch.empty_like(p).scatter_(-2, order, (2 * (delta_r + u * residuals.abs()) / count).expand_as(p))
    grad_normalized = grad_p @ s.T
    delta_grad_normalized = delta_grad_p @ s.abs().T + (gamma(num_slices, u) + e_s) * (grad_p.abs() @ s.abs().T)
    centred = grad_normalized - grad_normalized.mean(dim=-2, keepdim=True)
    grad = (delta_grad_normalized + delta_grad_normalized.mean(dim=-2, keepdim=True)
            + gamma(n + 1, u) * grad_normalized.abs().mean(dim=-2, keepdim=True) + u * centred.abs()) / scale
    grad = grad + (centred / scale).abs() * (delta_scale / scale + u)
    return value, grad, gap_ratio


def invariance_bound(all_proj, global_proj, u=U32):
    """LeJEPA's (and VISReg's) invariance mean((c − x)²) over all views (V, N, D): |δ|, c the mean of the Vg global views: c off by γ_{Vg+1} mean|g|, c − x by u
    more of |c − x|, the square by u, the mean of ``count`` terms by γ_count."""
    a, g = all_proj.detach().double(), global_proj.detach().double()
    difference = g.mean(0) - a
    delta = gamma(g.shape[0] + 1, u) * g.abs().mean(0) + u * difference.abs()
    return ((2 * difference.abs() * delta + delta.square()).mean() + (gamma(a.numel(), u) + u)
            * difference.square().mean()).item()


def invariance_grad_bounds(all_proj, global_proj, u=U32):
    """Entrywise |δ∂/∂views| of the invariance (views = [global, local]): ∂/∂x_v = −2d_v/count, d = c − x
    off by δd (``invariance_bound``'s) + 2u|d| for the products; a global view also receives
    (1/Vg) Σ_v 2d_v/count, off by the same per view plus γ_{V+1} of Σ_v|d_v| (the V-term sum)."""
    a, g = all_proj.detach().double(), global_proj.detach().double()
    difference = g.mean(0) - a
    per_view = 2 / a.numel() * (gamma(g.shape[0] + 1, u) * g.abs().mean(0) + 3 * u * difference.abs())
    shared = (per_view.sum(0) + 2 / a.numel() * gamma(a.shape[0] + 1, u) * difference.abs().sum(0)) / g.shape[0]
    return per_view + torch.cat([shared.expand_as(g), torch.zeros_like(a[g.shape[0]:])])


def triton_skip_reason(keywords, interpreted: bool) -> Optional[str]:
    """Why a test cannot run in this process's Triton mode (None when it can), so that no compiled
    kernel is handed CPU tensors and no interpreted one CUDA tensors: ``triton`` tests build CPU
    tensors for the interpreter; ``triton`` + ``requires_cuda`` tests build CUDA tensors for the
    compiled kernels (``TRITON_INTERPRET=0``)."""
    if "triton" not in keywords:
        return None
    if "requires_cuda" in keywords:
        return ("runs compiled Triton kernels on CUDA tensors: set TRITON_INTERPRET=0 on a CUDA machine"
                if interpreted else None)
    return None if interpreted else "runs Triton kernels on CPU tensors through the interpreter (TRITON_INTERPRET=1)"


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel())
        return out


def assert_within_twice_the_official_error(results, exact, official):
    """Half-dtype inputs: each of ``results`` (a loss and its gradients from a backend) is no
    farther (max-norm) from its float64 ``exact`` than twice the official code's own result in
    that dtype, ``official`` (flash-attention's rule)."""
    for index, (got, want, theirs) in enumerate(zip(results, exact, official)):
        error, allowed = (got.double() - want).abs().max(), 2 * (theirs.double() - want).abs().max()
        assert error <= allowed, f"result {index}: error {error.item():.3g} > twice the official {allowed.item() / 2:.3g}"


# VICReg's test shapes, (N, D) or (N, *groups, D): batch 2 (lightly's smallest), odd D, N < D and
# N > D, and middle dims (lightly's groups)
VICREG_SHAPES = [
    pytest.param((7, 37), id="B7-D37"),
    pytest.param((33, 130), id="B33-D130"),
    pytest.param((130, 5), id="B130-D5"),
    pytest.param((2, 3), id="B2-D3"),
    pytest.param((5, 3, 17), id="B5-G3-D17"),
    pytest.param((6, 2, 2, 9), id="B6-G2x2-D9"),
]
