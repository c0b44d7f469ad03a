"""Independent float64 formulas: what every backend is tested against, written from the definitions
(DEFINITIONS.md: lightly's code and the papers), never from fastssl's code. One section per family.
"""
import math

import torch
import torch.nn.functional as F


def prototype_scores(*shape, dtype=torch.float32, scale=1.0):
    """Scores of normalised embeddings against normalised prototypes: uniform in [-1, 1]."""
    return ((torch.rand(*shape, dtype=torch.float64) * 2 - 1) * scale).to(dtype)


# ============================================================================================
# Clustering and distillation: Sinkhorn-Knopp, SwAV, DINO, soft-target pairs
# ============================================================================================
def lightly_sinkhorn64(scores, iterations, epsilon):
    """lightly's ``sinkhorn`` verbatim (linear domain), in float64."""
    q = torch.exp(scores.double() / epsilon).t()
    q = q / q.sum()
    batch = q.shape[1]
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / q.sum(dim=0, keepdim=True)
        q = q / batch
    q = q * batch
    return q.t()


def log_domain_sinkhorn64(scores, iterations, epsilon):
    """lightly's algorithm with every division written as a subtraction of logs (float64)."""
    log_q = scores.double().t() / epsilon
    log_q = log_q - torch.logsumexp(log_q.flatten(), dim=0)
    batch = log_q.shape[1]
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - math.log(batch)
    return torch.exp(log_q + math.log(batch)).t()


def marginal_sinkhorn64(scores, iterations, epsilon, row_marginals=None, col_marginals=None, tolerance=0.0):
    """SeLA-style Sinkhorn on the (K, B) plan, linear domain, float64.

    Prototype totals are scaled to r (normalised), sample totals to c (normalised); stop after
    the first iteration whose prototype totals are all within ``tolerance`` (relative) of r.
    Returns (codes = plan / c, transposed to (B, K), iterations run).
    """
    q = torch.exp(scores.double() / epsilon).t()
    q = q / q.sum()
    k, b = q.shape
    r = torch.full((k,), 1.0 / k, dtype=torch.float64) if row_marginals is None else row_marginals.double()
    c = torch.full((b,), 1.0 / b, dtype=torch.float64) if col_marginals is None else col_marginals.double()
    r, c = r / r.sum(), c / c.sum()
    done = 0
    for _ in range(iterations):
        q = q * (r / q.sum(dim=1))[:, None]
        q = q * (c / q.sum(dim=0))[None, :]
        done += 1
        if tolerance > 0 and (q.sum(dim=1) / r - 1).abs().max().item() < tolerance:
            break
    return (q / c[None, :]).t(), done


def lightly_swav64(high, low, queue, temperature=0.1, iterations=3, epsilon=0.05):
    """lightly's ``SwaVLoss.forward`` in float64 on the given (float64) crops."""
    n_crops = len(high) + len(low)
    crops = list(high) + list(low)
    batch = high[0].shape[0]
    loss = 0.0
    for i in range(len(high)):
        with torch.no_grad():
            outputs = high[i].detach().double()
            if queue is not None:
                outputs = torch.cat((outputs, queue[i].detach().double()))
            q = lightly_sinkhorn64(outputs, iterations, epsilon)[:batch]
        subloss = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            subloss = subloss - torch.mean(torch.sum(q * F.log_softmax(crops[v] / temperature, dim=1), dim=1))
        loss = loss + subloss / (n_crops - 1)
    return loss / len(high)


def lightly_dino64(teacher, student, center, teacher_temp, student_temp, dtype=torch.float64):
    """lightly's ``DINOLoss.forward`` (before the center update), computed in ``dtype``."""
    t = torch.stack([x.to(dtype) for x in teacher])
    s = torch.stack([x.to(dtype) for x in student])
    t_out = F.softmax((t - center.to(dtype).reshape(1, 1, -1)) / teacher_temp, dim=-1)
    s_out = F.log_softmax(s / student_temp, dim=-1)
    loss = -torch.einsum("tbd,sbd->ts", t_out, s_out)
    loss = loss * (1 - torch.eye(*loss.shape, dtype=dtype))  # fill_diagonal_(0)
    n_terms = loss.numel() - min(loss.shape)
    return loss.sum() / (n_terms * t.shape[1])


def lightly_teacher_temp(warmup_teacher_temp, teacher_temp, warmup_epochs, epoch):
    """lightly's schedule: a float32 ``torch.linspace`` indexed by epoch, ``teacher_temp`` after.

    lightly divides by that float32 0-dim tensor, so float64 inputs see the float32-rounded value.
    """
    if epoch is not None and epoch < warmup_epochs:
        step = (teacher_temp - warmup_teacher_temp) / (warmup_epochs - 1) if warmup_epochs > 1 else 0.0
        return float(torch.tensor(warmup_teacher_temp + step * epoch, dtype=torch.float32))
    return teacher_temp


def lightly_center64(teacher, center, momentum):
    batch_center = torch.stack([x.double() for x in teacher]).mean(dim=(0, 1))
    return center.double() * momentum + batch_center.reshape(center.shape) * (1 - momentum)


def marginal_check_per_iteration64(scores, iterations, epsilon, row_marginals):
    """The stopping statistic max_k |total_k / r_k − 1| after each iteration (float64 oracle)."""
    if row_marginals is None:
        row_marginals = torch.ones(scores.shape[1], dtype=torch.float64)
    return [(marginal_sinkhorn64(scores, n, epsilon, row_marginals)[0].sum(dim=0)
             / (row_marginals.double() / row_marginals.sum()) / scores.shape[0] - 1).abs().max().item()
            for n in range(1, iterations + 1)]


def pair_losses64(targets, logits, scale):
    """−(1/B) Σ_b Σ_k q_tbk · log softmax(σ x_sb)_k for every pair (t, s), float64."""
    log_p = F.log_softmax(scale * logits.double(), dim=-1)
    return -torch.einsum("tbk,sbk->ts", targets.double(), log_p) / logits.shape[1]


# ============================================================================================
# Independent formulas (written from the definitions, not from fastssl's code)
# ============================================================================================
# ============================================================================================
# Redundancy: Barlow Twins, VICReg
# ============================================================================================
def barlow_formula(z_a, z_b, lambda_param=5e-3):
    """lightly's BarlowTwinsLoss in whatever dtype the inputs carry (float64 for the oracle)."""
    n, d = z_a.shape

    def bn(z):
        centred = z - z.sum(dim=0) / n
        biased_var = (centred * centred).sum(dim=0) / n
        return centred / torch.sqrt(biased_var + BN_EPS)

    c = bn(z_a).T @ bn(z_b) / n
    eye = torch.eye(d, dtype=torch.bool)
    on_diag = ((1 - c[eye]) ** 2).sum()
    off_diag = (c[~eye] ** 2).sum()
    return on_diag + lambda_param * off_diag


def vicreg_terms(z_a, z_b, eps=1e-4):
    """(invariance, variance, covariance) as lightly's VICRegLoss, inputs (B, ..., D)."""
    b, d = z_a.shape[0], z_a.shape[-1]
    invariance = ((z_a - z_b) ** 2).mean()

    def variance_term(z):
        mean = z.sum(dim=0) / b
        unbiased_var = ((z - mean) ** 2).sum(dim=0) / (b - 1)
        return torch.relu(1 - torch.sqrt(unbiased_var + eps)).mean()

    def covariance_term(z):
        centred = z - z.sum(dim=0) / b
        cov = torch.einsum("b...c,b...d->...cd", centred, centred) / (b - 1)  # (..., D, D)
        nondiag = ~torch.eye(d, dtype=torch.bool)
        return (cov[..., nondiag] ** 2).sum(-1).div(d).mean()

    variance = 0.5 * (variance_term(z_a) + variance_term(z_b))
    covariance = covariance_term(z_a) + covariance_term(z_b)
    return invariance, variance, covariance


def vicreg_formula(z_a, z_b, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4):
    inv, var, cov = vicreg_terms(z_a, z_b, eps)
    return lambda_param * inv + mu_param * var + nu_param * cov


# ============================================================================================
# NegativeCosineSimilarity
# ============================================================================================
# ============================================================================================
# Cosine: BYOL / SimSiam
# ============================================================================================
def neg_cos_formula(x0, x1, dim=1, eps=1e-8):
    """−mean of x0·x1 / (max(‖x0‖, eps) · max(‖x1‖, eps)) along ``dim`` (lightly's definition)."""
    dot = (x0 * x1).sum(dim=dim)
    # max(sqrt(s), eps) written as sqrt(max(s, eps²)): the same value, and a zero vector gets
    # the true (zero) derivative of its clamped norm instead of autograd's 0 · ∞ = NaN
    n0 = torch.sqrt((x0 * x0).sum(dim=dim).clamp_min(eps * eps))
    n1 = torch.sqrt((x1 * x1).sum(dim=dim).clamp_min(eps * eps))
    return -(dot / (n0 * n1)).mean()


# ============================================================================================
# Regularizers: KoLeo
# ============================================================================================
def koleo64(x, p=2.0, eps=1e-8):
    """lightly's KoLeoLoss.forward, row by row in float64 (written from its code, not fastssl's)."""
    rows = [r / max(r.norm().item(), eps) for r in x.double()]
    total = 0.0
    for i, row in enumerate(rows):
        others = [(float(row @ other), j) for j, other in enumerate(rows) if j != i] or [(0.0, i)]
        j = max(others, key=lambda pair: (pair[0], -pair[1]))[1]
        total += math.log(float((row - rows[j] + eps).abs().pow(p).sum() ** (1 / p)) + eps)
    return -total / len(rows)


# ============================================================================================
# Independent float64 formulas
# ============================================================================================
# ============================================================================================
# Contrastive: NT-Xent, MoCo, CLIP, InfoNCE
# ============================================================================================
def lightly_nt_xent(out0, out1, temperature):
    """lightly 1.6 ``NTXentLoss.forward`` without a memory bank, in float64."""
    out0 = F.normalize(out0.double(), dim=1)
    out1 = F.normalize(out1.double(), dim=1)
    batch = out0.shape[0]
    logits_00 = out0 @ out0.T / temperature
    logits_01 = out0 @ out1.T / temperature
    logits_10 = out1 @ out0.T / temperature
    logits_11 = out1 @ out1.T / temperature
    off_diagonal = ~torch.eye(batch, dtype=torch.bool)
    logits_00 = logits_00[off_diagonal].view(batch, -1)
    logits_11 = logits_11[off_diagonal].view(batch, -1)
    logits = torch.cat([torch.cat([logits_01, logits_00], dim=1),
                        torch.cat([logits_10, logits_11], dim=1)], dim=0)
    labels = torch.arange(batch).repeat(2)
    return F.cross_entropy(logits, labels, reduction="mean")


def lightly_dcl64(out0, out1, temperature, weight_fn=None):
    """lightly 1.6 ``DCLLoss.forward`` (one process), in float64."""
    out0, out1 = F.normalize(out0.double(), dim=1), F.normalize(out1.double(), dim=1)
    batch = out0.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool)

    def side(a, b):
        same, other = a @ a.T / temperature, a @ b.T / temperature
        positive = -torch.diagonal(other)
        if weight_fn is not None:
            positive = positive * weight_fn(a, b)
        negatives = torch.cat([same[off_diagonal].view(batch, -1), other[off_diagonal].view(batch, -1)], dim=1)
        return (positive + torch.logsumexp(negatives, dim=1)).mean()

    return 0.5 * (side(out0, out1) + side(out1, out0))


def lightly_macl64(z0, z1, temperature=0.1, alpha=0.5, a_0=0.0):
    """lightly 1.6 ``MACLLoss.forward``, in float64."""
    out = torch.cat([F.normalize(z0.double(), dim=-1), F.normalize(z1.double(), dim=-1)])
    batch, rows = z0.shape[0], 2 * z0.shape[0]
    cov = out @ out.T
    mask = torch.ones_like(cov, dtype=torch.bool)
    mask.diagonal()[:] = False
    mask.diagonal(batch)[:] = False
    mask.diagonal(-batch)[:] = False
    negatives = cov.masked_select(mask).view(rows, -1)
    positives = torch.cat([torch.diag(cov, batch), torch.diag(cov, -batch)]).reshape(rows, 1)
    t = temperature * (1 + alpha * (positives.detach().mean() - a_0))
    log_positive = F.log_softmax(torch.cat([positives, negatives], dim=1) / t, dim=1)[:, 0]
    weights = 1.0 / (1.0 - log_positive.exp() + 1e-8)
    return (-weights.detach() * log_positive).mean()


def mises_fisher_weights64(out0, out1, sigma=0.5):
    """lightly's ``negative_mises_fisher_weights``: 2 − N·softmax(x0·x1/σ), no gradient."""
    similarity = (out0.detach() * out1.detach()).sum(dim=1) / sigma
    return 2 - out0.shape[0] * torch.softmax(similarity, dim=0)


def lightly_nt_xent_in_dtype(out0, out1, temperature):
    """The same lightly code without the float64 cast (the naive error budget of a dtype)."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    batch = out0.shape[0]
    off_diagonal = ~torch.eye(batch, dtype=torch.bool)
    logits_00 = (out0 @ out0.T / temperature)[off_diagonal].view(batch, -1)
    logits_11 = (out1 @ out1.T / temperature)[off_diagonal].view(batch, -1)
    logits = torch.cat([torch.cat([out0 @ out1.T / temperature, logits_00], dim=1),
                        torch.cat([out1 @ out0.T / temperature, logits_11], dim=1)], dim=0)
    return F.cross_entropy(logits, torch.arange(batch).repeat(2))


def lightly_moco(out0, out1, bank, temperature):
    """lightly 1.6 ``NTXentLoss`` with a memory bank (K, D): [pos | out0·bankᵀ]/τ, label 0."""
    out0 = F.normalize(out0.double(), dim=1)
    out1 = F.normalize(out1.double(), dim=1)
    positive = (out0 * out1).sum(dim=1, keepdim=True)
    negative = out0 @ bank.double().T
    logits = torch.cat([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(out0.shape[0], dtype=torch.long))


def clip_formula(image, text, logit_scale):
    """CLIP's symmetric CE in the inputs' dtype (float64 inputs: the exact formula)."""
    logits = logit_scale * (F.normalize(image, dim=1) @ F.normalize(text, dim=1).T)
    targets = torch.arange(image.shape[0])
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def moco_formula(out0, out1, bank, temperature):
    """lightly's memory-bank logits in the inputs' dtype (float64 inputs: the exact formula)."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    logits = torch.cat([(out0 * out1).sum(dim=1, keepdim=True), out0 @ bank.to(out0.dtype).T], dim=1)
    return F.cross_entropy(logits / temperature, torch.zeros(out0.shape[0], dtype=torch.long))


def multi_view_formula(views, temperature, labels=None):
    """SimCLR over V views (SupCon-style positives) in float64: mean over the V·B rows."""
    batch, n_views = views[0].shape[0], len(views)
    stacked = torch.cat(views)
    ids = torch.arange(batch).repeat(n_views) if labels is None else labels.repeat(n_views)
    not_self = ~torch.eye(n_views * batch, dtype=torch.bool)
    positive = (ids[:, None] == ids[None, :]) & not_self
    return multi_positive_rows(stacked, stacked, positive, not_self, temperature).mean()


def cross_entropy_formula(query, keys, temperature, normalize=True):
    """(N, M) float64 logits q·kᵀ/τ (normalised rows when ``normalize``)."""
    query, keys = query.double(), keys.double()
    if normalize:
        query, keys = F.normalize(query, dim=1), F.normalize(keys, dim=1)
    return query @ keys.T / temperature


def symmetric_formula(out0, out1, temperature):
    """½ (CE rows + CE columns) of out0·out1ᵀ/τ in the inputs' dtype (float64: exact)."""
    return clip_formula(out0, out1, 1 / temperature)


BN_EPS = 1e-5  # lightly's F.batch_norm default


def multi_positive_rows(query, keys, positive, allowed, temperature, normalize=True):
    """Per-row SupCon L_out in float64, one row at a time.

    Row i: log-softmax of q_i·k_j/τ over the keys with ``allowed[i, j]``; loss = mean over the
    allowed positives ``positive[i, j]`` of −log p; 0 for a row without any positive.
    """
    query, keys = query.double(), keys.double()
    if normalize:
        query, keys = F.normalize(query, dim=1), F.normalize(keys, dim=1)
    losses = []
    for i in range(query.shape[0]):
        logits = (keys @ query[i]) / temperature
        log_p = logits - torch.logsumexp(logits[allowed[i]], dim=0)
        chosen = positive[i] & allowed[i]
        losses.append(-log_p[chosen].mean() if chosen.any() else logits.new_zeros(()))
    return torch.stack(losses)


# ============================================================================================
# Spectral: TiCo, MMCR, FroSSL, EMP-SSL, hypersphere (lightly 1.6's formulas, float64)
# ============================================================================================
def tico64(z_a, z_b, covariance=None, beta=0.9, rho=8.0):
    """lightly's ``TiCoLoss.forward``: (loss, the updated covariance)."""
    a, b = F.normalize(z_a.double(), dim=1), F.normalize(z_b.double(), dim=1)
    batch_covariance = (a.T @ a).detach() / a.shape[0]
    previous = torch.zeros_like(batch_covariance) if covariance is None else covariance.double()
    updated = beta * previous + (1 - beta) * batch_covariance
    loss = 1.0 - (a * b).sum(dim=1).mean() + rho * ((a @ updated) * a).sum(dim=1).mean()
    return loss, updated


def mmcr64(online, momentum, lmda=5e-3):
    """lightly's ``MMCRLoss.forward``: −‖c‖_* + λ Σ_b ‖z_b‖_* / B by SVD."""
    z = torch.cat([online.double(), momentum.double()], dim=1)
    c = z.mean(dim=1)
    return -torch.linalg.svdvals(c).sum() + lmda * torch.linalg.svdvals(z).sum() / z.shape[0]


def frossl64(views, invariance_weight=1.0):
    """lightly's ``FroSSLLoss.forward`` (its trace is a Python float: no gradient through it)."""
    unit = [F.normalize(z.double(), p=2, dim=0) for z in views]
    mean = torch.stack(unit).mean(dim=0)
    total = 0.0
    for z in unit:
        gram = z.T @ z if z.shape[0] > z.shape[1] else z @ z.T
        gram = gram / torch.trace(gram).item()
        total = total + 2 * torch.log(torch.linalg.norm(gram, ord="fro"))
        total = total + invariance_weight * len(views) * z.shape[1] * F.mse_loss(z, mean)
    return total


def emp_ssl64(views, tcr_eps=0.2, inv_coef=200.0):
    """lightly's ``EMPSSLLoss.forward``: the D×D total coding rate and the cosine invariance."""
    z = torch.stack([v.double() for v in views])
    _, batch, dim = z.shape
    identity = torch.eye(dim, dtype=torch.float64)
    tcr = 0.5 * torch.logdet(identity + dim / (batch * tcr_eps) * torch.einsum("vbd,vbe->vde", z, z)).mean()
    return tcr - inv_coef * F.cosine_similarity(z, z.mean(0, keepdim=True), dim=-1).mean()


def hypersphere64(z_a, z_b, t=1.0, lam=1.0, alpha=2.0):
    """lightly's ``HypersphereLoss.forward``, uniformity as a logsumexp (lightly's exp().mean().log()
    in float64 is the same number wherever it does not underflow)."""
    x, y = F.normalize(z_a.double()), F.normalize(z_b.double())

    def uniformity(v):
        exponents = -t * torch.pdist(v, p=2).pow(2)
        return torch.logsumexp(exponents, dim=0) - math.log(exponents.numel())

    return (x - y).norm(dim=1).pow(alpha).mean() + lam * (uniformity(x) + uniformity(y)) / 2.0


# ============================================================================================
# Regularizers: CO2
# ============================================================================================
def lightly_co2_64(out0, out1, negatives=None, alpha=1.0, t_consistency=0.05):
    """lightly 1.6 ``CO2Regularizer.forward``'s value in float64 (with its gradient: lightly's own
    return drops it), ``negatives`` the bank (K, D) before this call's update or None."""
    x0, x1 = F.normalize(out0.double(), dim=1), F.normalize(out1.double(), dim=1)

    def log_labels(a, b):
        positive = (a * b).sum(dim=1, keepdim=True)
        if negatives is None:
            negative = (a @ b.T)[~torch.eye(a.shape[0], dtype=torch.bool)].view(a.shape[0], -1)
        else:
            negative = a @ negatives.double().T
        return F.log_softmax(torch.cat([positive, negative], dim=1) / t_consistency, dim=-1)

    p, q = log_labels(x0, x1), log_labels(x1, x0)
    kl = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)
    return alpha * 0.5 * (kl(p, q) + kl(q, p)), p, q


def lightly_patch_kernel_alignment64(student, teacher, mask=None):
    """lightly 1.6 ``PatchKernelAlignmentLoss`` (no token subsampling) in float64."""
    s, t = student.double(), teacher.double().detach()
    w = torch.ones(s.shape[:2], dtype=torch.float64) if mask is None else (~mask).double()
    n = w.sum(dim=-1).clamp(min=1.0)

    def centred_kernel(x):
        k = x @ x.transpose(-2, -1)
        row = (k * w[:, None, :]).sum(dim=-1) / n[:, None]
        col = (k * w[:, :, None]).sum(dim=1) / n[:, None]
        total = (k * w[:, None, :] * w[:, :, None]).sum(dim=(1, 2)) / (n * n)
        return (k - row[:, :, None] - col[:, None, :] + total[:, None, None]) * w[:, :, None] * w[:, None, :]

    k_s, k_t = centred_kernel(s), centred_kernel(t)
    cka = (k_s * k_t).sum(dim=(1, 2)) / ((k_s * k_s).sum(dim=(1, 2)).clamp_min(1e-6).sqrt()
                                         * (k_t * k_t).sum(dim=(1, 2)).clamp_min(1e-6).sqrt())
    enough = (w.sum(dim=-1) >= 2).double()
    return ((1.0 - cka) * enough).sum() / enough.sum().clamp(min=1.0)


# ============================================================================================
# Sliced: SIGReg (LeJEPA, LeWM) and VISReg
# ============================================================================================
def lightly_sigreg_grid(knots=17, t_max=3.0):
    """lightly's SIGReg buffers (t, φ, weights), float32 as it builds them."""
    t = torch.linspace(0, t_max, knots, dtype=torch.float32)
    dt = t_max / (knots - 1)
    weights = torch.full((knots,), 2 * dt, dtype=torch.float32)
    weights[[0, -1]] = dt
    window = torch.exp(-t.square() / 2.0)
    return t, window, weights * window


def lightly_unit_columns(rows, columns, dtype=torch.float32, seed=None):
    """lightly's draw of SIGReg's vectors and VISReg's slices (one ``torch.randn`` (rows, columns) in
    the input's dtype from the global generator, seeded ``seed`` first when given), normalised in
    float64."""
    if seed is not None:
        torch.manual_seed(seed)
    draw = torch.randn(rows, columns, dtype=dtype).double()
    return draw / draw.norm(dim=0)


def sigreg_formula(proj, vectors, knots=17, t_max=3.0, num_samples=None):
    """lightly's SIGReg statistic on given unit ``vectors`` (C, M), in proj's dtype (float64 for the
    exact value) on lightly's float32 grid: mean over (..., m) of N Σ_k w_k [(mean_n cos(t_k P) − φ_k)²
    + (mean_n sin(t_k P))²], P = proj @ vectors; ``num_samples``: the global batch (default N)."""
    t, phi, weights = (x.to(proj.dtype) for x in lightly_sigreg_grid(knots, t_max))
    n = proj.shape[-2] if num_samples is None else num_samples
    angles = (proj @ vectors.to(proj.dtype)).unsqueeze(-1) * t
    error = (angles.cos().sum(-3) / n - phi).square() + (angles.sin().sum(-3) / n).square()
    return ((error @ weights) * n).mean()


def lejepa64(local_proj, global_proj, vectors, lambda_param=0.05, knots=17, t_max=3.0):
    """lightly's ``LeJEPALoss`` in float64 on given SIGReg ``vectors``."""
    local_proj, global_proj = local_proj.double(), global_proj.double()
    all_proj = torch.cat([global_proj, local_proj], dim=0)
    invariance = (global_proj.mean(0) - all_proj).square().mean()
    return lambda_param * sigreg_formula(all_proj, vectors, knots, t_max) + (1 - lambda_param) * invariance


def lewm64(predicted, target, embeddings, vectors, lambda_param=0.1, normalize=False, knots=17, t_max=3.0):
    """lightly's ``LeWMLoss`` in float64 on given SIGReg ``vectors``: the MSE to the detached target
    (both layer-normalised with ``normalize``) + λ SIGReg of the embeddings with the batch on dim −2."""
    predicted, target = predicted.double(), target.double().detach()
    if normalize:
        predicted, target = (F.layer_norm(x, (x.shape[-1],)) for x in (predicted, target))
    sigreg_input = embeddings.double().flatten(start_dim=1, end_dim=-2).transpose(0, 1)
    return (predicted - target).square().mean() + lambda_param * sigreg_formula(sigreg_input, vectors, knots, t_max)


def lightly_gaussian_quantiles(count):
    """lightly's VISReg quantiles: float32 ``Normal(0, 1).icdf(i / (count + 1))``, i = 1..count."""
    positions = torch.arange(1, count + 1, dtype=torch.float32) / (count + 1)
    return torch.distributions.Normal(loc=0.0, scale=1.0).icdf(positions)


def visreg_shape_formula(z, slices, eps=1e-4):
    """lightly's ``visreg_shape_loss`` on given unit ``slices`` (D, S), in z's dtype (float64 for the
    exact value; the quantiles are lightly's float32 ones)."""
    std = z.std(dim=-2, unbiased=False, keepdim=True)
    projections = ((z - z.mean(dim=-2, keepdim=True)) / (std.detach() + eps)) @ slices.to(z.dtype)
    quantiles = lightly_gaussian_quantiles(z.shape[-2]).to(z.dtype).unsqueeze(-1)
    return (projections.sort(dim=-2).values - quantiles).square().mean()


def visreg64(local_proj, global_proj, slices, lambda_param=0.9, lambda_scale=1.0, lambda_shape=1.0,
             lambda_center=1.0, eps=1e-4):
    """lightly's ``VISRegLoss.forward_components`` in float64 on given ``slices``: (total, pred, scale,
    shape, center)."""
    global_proj = global_proj.double()
    proj = torch.cat([global_proj, local_proj.double()], dim=0)
    pred = (global_proj.mean(0) - proj).square().mean()
    scale = (1.0 - proj.std(dim=-2, unbiased=False)).square().mean()
    shape = visreg_shape_formula(proj, slices, eps)
    center = proj.mean(dim=-2).square().mean()
    total = (1 - lambda_param) * pred + lambda_param * (lambda_scale * scale + lambda_shape * shape
                                                        + lambda_center * center)
    return total, pred, scale, shape, center


def lightly_detcon64(pred0, pred1, target0, target1, mask0, mask1, temperature, dtype=torch.float64):
    """lightly 1.6 ``DetConBLoss.forward`` (one process), in float64 (or ``dtype``, as a peer computing
    in the inputs' dtype does), per row: (loss, row losses (2·B·M,) before the 1/A weights, the
    weights (2·B·M,)). Excluded logits get −inf where lightly subtracts 1e9 (the same zero after exp)."""
    b, m, _ = pred0.shape
    p0, p1, t0, t1 = (F.normalize(x.to(dtype), dim=2) for x in (pred0, pred1, target0, target1))
    own_image = torch.eye(b, dtype=dtype)[:, None, :, None]  # (b, 1, b, 1)

    def same(x, y):  # (b, m, 1, m)
        return (x.unsqueeze(2) == y.unsqueeze(1)).to(dtype).unsqueeze(2)

    def side(p, t_same, t_other, mask, other_mask):
        cross = torch.einsum("abk,uvk->abuv", p, t_other) / temperature
        within = torch.einsum("abk,uvk->abuv", p, t_same) / temperature
        within = within.masked_fill((own_image * same(mask, mask)) > 0, float("-inf"))
        labels = (own_image * same(mask, other_mask)).reshape(b, m, -1)
        labels = torch.cat([labels, torch.zeros_like(labels)], dim=2)
        count = labels.sum(dim=2)
        logits = torch.cat([cross, within], dim=2).reshape(b, m, -1)
        log_probs = torch.log_softmax(logits, dim=2)
        rows = -torch.where(labels > 0, log_probs, torch.zeros_like(log_probs)).sum(dim=2) / count.clamp_min(1)
        weights = (count > 0).to(dtype) / same(mask, mask).sum(dim=(2, 3))
        return rows.reshape(-1), weights.reshape(-1)

    rows0, weights0 = side(p0, t0, t1, mask0, mask1)
    rows1, weights1 = side(p1, t1, t0, mask1, mask0)
    loss = (weights0 * rows0).mean() + (weights1 * rows1).mean()
    return loss, torch.cat([rows0, rows1]), torch.cat([weights0, weights1])


# =====================================================================================# VICRegL (lightly's VICRegLLoss)
# ============================================================================================
def _nearest_neighbors64(input_maps, candidate_maps, distances, num_matches):
    """lightly's models.utils.nearest_neighbors: each input row's nearest candidate, then the
    num_matches inputs with the smallest such distance, in increasing distance."""
    if num_matches is None or num_matches == -1 or num_matches > input_maps.size(1):
        num_matches = input_maps.size(1)
    values, nearest = distances.topk(k=1, dim=2, largest=False)
    closest = values.squeeze(-1).topk(k=num_matches, dim=1, largest=False).indices
    dim = input_maps.shape[2]
    filtered = torch.gather(input_maps, 1, closest.unsqueeze(-1).expand(-1, -1, dim))
    selected = torch.gather(candidate_maps, 1, nearest.expand(-1, -1, dim))
    return filtered, torch.gather(selected, 1, closest.unsqueeze(-1).expand(-1, -1, dim))


def lightly_vicregl_terms64(global_views, global_grids, local_views=None, local_grids=None, lambda_param=25.0,
                            mu_param=25.0, nu_param=1.0, alpha=0.75, eps=1e-4, num_matches=(20, 4)):
    """lightly's VICRegLLoss as a weighted sum, term by term, in the inputs' dtype (float64 for the
    oracle): views are (global (B, D), local map (B, H, W, C)) pairs, grids (B, H, W, 2).

    Returns [(weight, kind, operands)] with the loss Σ weight · term(operands): kind "invariance"
    (MSE of two global features), "variance" / "covariance" (one view's global features) and
    "vicreg" (lightly's VICRegLoss with ν/2 on a matched (filtered, nearest) pair of (B, k, C)
    rows). Distances exact (from the differences, not the matmul shortcut), matching as lightly's
    models.utils.nearest_neighbors."""
    def distances(x, y):  # torch.cdist without the matmul shortcut, written out (CPU cdist has no half kernels)
        return (x.unsqueeze(2) - y.unsqueeze(1)).pow(2).sum(dim=-1).sqrt()

    local_views, local_grids = list(local_views or []), list(local_grids or [])
    views = list(global_views) + local_views
    invariance, matched = [], []
    for (g_a, l_a), grid_a in zip(global_views, global_grids):
        invariance += [(g_a, g_b) for g_b, _ in global_views if g_a is not g_b]
        invariance += [(g_a, g_b) for g_b, _ in local_views]
        for (_, l_b), grid_b in zip(views, list(global_grids) + local_grids):
            if l_b is l_a:
                continue
            z_a, z_b = l_a.flatten(1, 2), l_b.flatten(1, 2)
            pair = []
            for d_ab in (distances(z_a, z_b), distances(grid_a.flatten(1, 2), grid_b.flatten(1, 2))):
                pair.append(_nearest_neighbors64(z_a, z_b, d_ab, num_matches[0]))
                pair.append(_nearest_neighbors64(z_b, z_a, d_ab.transpose(1, 2), num_matches[1]))
            matched.append(pair)
    terms = [(alpha * lambda_param / len(invariance), "invariance", pair) for pair in invariance]
    terms += [(alpha * mu_param / len(views), "variance", (g,)) for g, _ in views]
    terms += [(alpha * nu_param / len(views), "covariance", (g,)) for g, _ in views]
    terms += [((1 - alpha) / (2 * len(matched)), "vicreg", rows) for pair in matched for rows in pair]
    return terms


def lightly_vicregl_term64(kind, operands, lambda_param=25.0, mu_param=25.0, nu_param=1.0, eps=1e-4):
    """One term of ``lightly_vicregl_terms64``."""
    if kind == "invariance":
        return ((operands[0] - operands[1]) ** 2).mean()
    if kind == "vicreg":
        return vicreg_formula(*operands, lambda_param, mu_param, 0.5 * nu_param, eps)
    z = operands[0]
    _, variance, covariance = vicreg_terms(z, z, eps)  # each twice the one view's, ½ for the variance
    return variance if kind == "variance" else 0.5 * covariance


def lightly_vicregl64(*views_and_grids, lambda_param=25.0, mu_param=25.0, nu_param=1.0, alpha=0.75, eps=1e-4,
                      num_matches=(20, 4)):
    """lightly's VICRegLLoss (``lightly_vicregl_terms64`` summed), shape (1,)."""
    params = dict(lambda_param=lambda_param, mu_param=mu_param, nu_param=nu_param, eps=eps)
    terms = lightly_vicregl_terms64(*views_and_grids, **params, alpha=alpha, num_matches=num_matches)
    return sum(weight * lightly_vicregl_term64(kind, operands, **params) for weight, kind, operands in terms).reshape(1)
def lightly_whitening64(x, eps=0.0, running_mean=None, running_variance=None):
    """lightly's ``Whitening2d.forward`` in float64 on (n, D): m = mean, C = x_cᵀx_c/(n − 1) (or the
    running ones), L⁻¹ = solve_triangular(chol((1 − eps)C + eps·I), I), y = x_c·L⁻ᵀ (its 1×1
    conv2d). Returns (y, m, C)."""
    x = x.double()
    mean = x.mean(dim=0) if running_mean is None else running_mean.double().reshape(-1)
    centred = x - mean
    covariance = centred.T @ centred / (x.shape[0] - 1) if running_variance is None else running_variance.double()
    identity = torch.eye(x.shape[1], dtype=torch.float64)
    inverse_root = torch.linalg.solve_triangular(torch.linalg.cholesky((1 - eps) * covariance + eps * identity),
                                                 identity, upper=False)
    return centred @ inverse_root.T, mean, covariance


def lightly_wmse64(input, permutations, num_samples=2, w_size=256, eps=0.0, running_mean=None, running_variance=None):
    """lightly's ``WMSELoss.forward`` in float64 with the permutations it drew ((w_iter, B)): z filled
    sub-batch by sub-batch and view by view, ``norm_mse_loss`` of every pair of views, averaged.
    Returns (loss, [(m, C) of each whitening call, in lightly's order])."""
    x = input.double()
    batch = x.shape[0] // num_samples
    loss, statistics = 0.0, []
    for permutation in permutations:
        z = torch.empty_like(x)
        for index in permutation.view(-1, w_size):
            for i in range(num_samples):
                whitened, mean, covariance = lightly_whitening64(x[index + i * batch], eps, running_mean, running_variance)
                z[index + i * batch] = whitened
                statistics.append((mean, covariance))
        for i in range(num_samples - 1):
            for j in range(i + 1, num_samples):
                x0, x1 = (F.normalize(z[v * batch:(v + 1) * batch]) for v in (i, j))
                loss = loss + 2 - 2 * (x0 * x1).sum(dim=-1).mean()
    return loss / (len(permutations) * num_samples * (num_samples - 1) // 2), statistics


def lightly_kmeans64(x, num_clusters, max_iters=20, tol=1e-4):
    """lightly's ``DSERegularizer._kmeans`` (k-means++ seeds by randint/multinomial, Lloyd steps with
    a randint re-seed of each empty cluster in order) in float64: (centroids, labels)."""
    num_points = x.shape[0]
    num_clusters = min(num_clusters, num_points)
    centroids = x[torch.randint(num_points, (1,))]
    for _ in range(num_clusters - 1):
        probabilities = torch.cdist(x, centroids).min(dim=1).values.square()
        probabilities = probabilities / (probabilities.sum() + 1e-12)
        if torch.sum(probabilities) == 0:
            probabilities = torch.ones_like(probabilities) / probabilities.numel()
        centroids = torch.cat((centroids, x[torch.multinomial(probabilities, 1)]), dim=0)
    for _ in range(max_iters):
        labels = torch.argmin(torch.cdist(x, centroids), dim=1)
        new_centroids = []
        for cluster_index in range(num_clusters):
            cluster = x[labels == cluster_index]
            new_centroids.append(cluster.mean(dim=0) if cluster.shape[0] > 0
                                 else x[torch.randint(num_points, (1,))].squeeze(0))
        new_centroids = torch.stack(new_centroids)
        shift = (new_centroids - centroids).pow(2).sum().sqrt()
        centroids = new_centroids
        if shift < tol:
            break
    return centroids, torch.argmin(torch.cdist(x, centroids), dim=1)


def _centred_singular_sum64(cluster):
    centred = cluster - cluster.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(centred).sum() / math.sqrt(max(cluster.shape[0] - 1, cluster.shape[1]))


def lightly_dse64(representations, weight=1.0, normalize=True, local_clusters=3, global_clusters=24,
                  max_kmeans_iters=20, tol=1e-4):
    """lightly's ``DSERegularizer.forward`` in float64, its draws in its order. Returns (loss, parts):
    the terms (inter, intra_batch, intra_image, effective, average_norm) and the clusters ((n, D)
    row sets with more than one row: "local" per image, "global"), the (row, other centroid)
    pairs of the inter term and the normalised rows, for the error bounds."""
    x = representations.double()
    source = x
    if normalize:
        x = F.normalize(x, dim=-1)
    batch_size, _, dim = x.shape
    average_norm = torch.norm(x - x.mean(dim=(0, 1), keepdim=True), dim=-1).mean()
    parts = {"local": [], "global": [], "inter": [], "rows": x, "source": source}
    image_terms = []
    for image in x:
        _, labels = lightly_kmeans64(image.detach(), local_clusters, max_kmeans_iters, tol)
        clusters = [image[labels == c] for c in torch.unique(labels)]
        clusters = [c for c in clusters if c.shape[0] > 1]
        parts["local"].append(clusters)
        if clusters:
            image_terms.append(torch.stack([_centred_singular_sum64(c) for c in clusters]).mean())
    inter_terms, intra_terms = [], []
    group_images = max(global_clusters // local_clusters, 1)
    for start in range(0, batch_size, group_images):
        group = x[start:start + group_images].reshape(-1, dim)
        centroids, labels = lightly_kmeans64(group.detach(), global_clusters, max_kmeans_iters, tol)
        if centroids.shape[0] > 1:
            distances = torch.cdist(group, centroids)
            mask = torch.zeros_like(distances, dtype=torch.bool)
            mask[torch.arange(group.shape[0]), labels] = True
            other = distances.masked_fill(mask, float("inf")).min(dim=1)
            inter_terms.append(other.values.mean())
            parts["inter"].append((group, centroids[other.indices], other.values))
        clusters = [group[labels == c] for c in torch.unique(labels)]
        parts["global"] += [c for c in clusters if c.shape[0] > 1]
        intra_terms += [_centred_singular_sum64(c) for c in clusters if c.shape[0] > 1]
    zero = x.new_zeros(())
    inter = torch.stack(inter_terms).mean() if inter_terms else zero
    intra_batch = torch.stack(intra_terms).mean() if intra_terms else zero
    intra_image = torch.stack(image_terms).mean() if image_terms else zero
    flat = x.reshape(-1, dim)
    singular_values = torch.linalg.svdvals(flat)
    probabilities = singular_values / (singular_values.sum() + 1e-12)
    effective = torch.exp(-torch.sum(probabilities * torch.log(probabilities + 1e-12))) / min(flat.shape)
    a = average_norm + 1e-12
    dse = inter / a + effective - 0.5 * (intra_batch / a + intra_image / a)
    parts.update(inter_term=inter, intra_batch=intra_batch, intra_image=intra_image, effective=effective,
                 average_norm=average_norm)
    return -weight * dse, parts
# =====================================================================================


# ============================================================================================
# CAPI, Gram anchoring (DINOv3)
# ============================================================================================
def lightly_capi_sinkhorn(logits, iterations=3, epsilon=1e-8):
    """lightly's capi_loss.sinkhorn_knopp, single process, in the dtype of ``logits`` (B, S, K)."""
    q = logits.transpose(0, 1)
    q = torch.exp(q - torch.amax(q, dim=1, keepdim=True))
    for _ in range(iterations):
        q = q / (torch.sum(q, dim=1, keepdim=True) + epsilon)
        q = q / (torch.sum(q, dim=2, keepdim=True) + epsilon)
    return q.transpose(0, 1)


def lightly_capi(teacher, student, index=None, teacher_temperature=0.06, student_temperature=0.12, iterations=3,
                 dtype=torch.float64):
    """lightly's CAPILoss.forward in ``dtype`` (float64: the oracle; a half dtype: its own rounding)."""
    assignments = lightly_capi_sinkhorn(teacher.detach().to(dtype) / teacher_temperature, iterations)
    if index is not None:
        assignments = torch.gather(assignments, 1, index.unsqueeze(-1).expand(-1, -1, assignments.shape[-1]))
    log_probs = F.log_softmax(student.to(dtype) / student_temperature, dim=-1)
    return -torch.sum(assignments * log_probs, dim=-1).mean()


def dinov3_gram64(student, teacher, apply_norm=True, img_level=True, remove_neg=True, remove_only_teacher_neg=False):
    """DINOv3's GramLoss.forward in float64 (written from its code)."""
    s, t = student.double(), teacher.double()
    if apply_norm:
        s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    if not img_level and s.dim() == 3:
        s, t = s.flatten(0, 1), t.flatten(0, 1)
    student_sim, target_sim = s @ s.transpose(-1, -2), t @ t.transpose(-1, -2)
    if remove_neg:
        target_sim = torch.where(target_sim < 0, 0.0, target_sim)
        student_sim = torch.where(student_sim < 0, 0.0, student_sim)
    elif remove_only_teacher_neg:
        student_sim = torch.where((student_sim < 0) & (target_sim < 0), 0.0, student_sim)
        target_sim = torch.where(target_sim < 0, 0.0, target_sim)
    return torch.nn.functional.mse_loss(student_sim, target_sim)
# MSN / PMSN (lightly's msn_loss.py and pmsn_loss.py, verbatim in the given dtype)
# ============================================================================================
def lightly_msn_sinkhorn(probabilities_of_ranks, iterations):
    """lightly's MSN ``sinkhorn`` (linear domain) on each rank's (B_r, K) probabilities, its
    all-reduces written out (one rank: one tensor in the list). Returns each rank's codes."""
    q = [p.T for p in probabilities_of_ranks]
    total = sum(x.sum() for x in q)
    q = [x / total for x in q]
    num_prototypes = q[0].shape[0]
    for _ in range(iterations):
        row_sum = sum(x.sum(dim=1, keepdim=True) for x in q)
        q = [x / row_sum / num_prototypes for x in q]
        q = [x / x.sum(dim=0, keepdim=True) / x.shape[1] for x in q]
    return [(x * x.shape[1]).T for x in q]


def lightly_msn_targets(targets_of_ranks, prototypes, temperature=0.1, target_sharpen_temperature=0.25,
                        sinkhorn_iterations=3):
    """MSNLoss.forward's no-grad target side on each rank's targets (B_r, D)."""
    prototypes = F.normalize(prototypes, dim=1)
    probs = [F.softmax(F.normalize(t, dim=1) @ prototypes.T / temperature, dim=1) for t in targets_of_ranks]
    probs = [p ** (1.0 / target_sharpen_temperature) for p in probs]
    probs = [p / p.sum(dim=1, keepdim=True) for p in probs]
    return lightly_msn_sinkhorn(probs, sinkhorn_iterations) if sinkhorn_iterations > 0 else probs


def lightly_power_law(size, exponent, dtype=torch.float64):
    k = torch.arange(1, size + 1, dtype=dtype)
    power_dist = k ** (-exponent)
    return power_dist / power_dist.sum()


def lightly_msn_loss(anchors, target_probs, prototypes, temperature=0.1, regularization_weight=1.0,
                     regularization="msn"):
    """MSNLoss.forward's anchor side given the target probabilities (B, K); ``regularization``:
    "msn" (mean entropy), a float (PMSN's power-law exponent) or a callable (PMSNCustomLoss)."""
    num_views = anchors.shape[0] // target_probs.shape[0]
    anchor_probs = F.softmax(F.normalize(anchors, dim=1) @ F.normalize(prototypes, dim=1).T / temperature, dim=1)
    loss = torch.mean(torch.sum(torch.log(anchor_probs ** (-target_probs.repeat((num_views, 1)))), dim=1))
    if regularization_weight > 0:
        mean = anchor_probs.mean(dim=0)
        if regularization == "msn":
            reg = -torch.sum(torch.log(mean ** (-mean))) + math.log(float(len(mean)))
        else:
            prior = (lightly_power_law(len(mean), regularization, mean.dtype) if isinstance(regularization, float)
                     else regularization(mean))
            reg = F.kl_div(input=mean.log(), target=prior, reduction="sum")
        loss = loss + regularization_weight * reg
    return loss


def lightly_msn(anchors, targets, prototypes, target_sharpen_temperature=0.25, temperature=0.1,
                sinkhorn_iterations=3, regularization_weight=1.0, regularization="msn"):
    """lightly's MSNLoss / PMSNLoss / PMSNCustomLoss on one process."""
    with torch.no_grad():
        target_probs = lightly_msn_targets([targets], prototypes, temperature, target_sharpen_temperature,
                                           sinkhorn_iterations)[0]
    return lightly_msn_loss(anchors, target_probs, prototypes, temperature, regularization_weight, regularization)
# Masked prediction: MAE (facebookresearch/mae), wav2vec 2.0 and HuBERT (fairseq)
# ============================================================================================
def mae_patchify(images, patch_size):
    """MAE's ``patchify``: (N, C, H, W) → (N, HW/p², p²C) through ``einsum('nchpwq->nhwpqc')``."""
    n, c, h, w = images.shape
    p = patch_size
    x = images.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def mae64(pred, target, mask, patch_size=None, norm_pix_loss=True, dtype=torch.float64):
    """MAE's ``forward_loss`` verbatim, in ``dtype`` (float64: the oracle; a half dtype: the
    official code's own rounding). ``target``: images (with ``patch_size``) or patches."""
    t = target.to(dtype)
    if patch_size is not None:
        t = mae_patchify(t, patch_size)
    if norm_pix_loss:
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)
        t = (t - mean) / (var + 1.e-6) ** .5
    loss = (pred.to(dtype) - t) ** 2
    loss = loss.mean(dim=-1)
    m = mask.to(dtype)
    return (loss * m).sum() / m.sum()


def fairseq_sample_negatives(batch, frames, num_negatives):
    """fairseq ``Wav2Vec2Model.sample_negatives``'s draw (``cross_sample_negatives=0``, no padding),
    its lines in order, returned as (B, T, K) indices within each utterance."""
    tszs = torch.arange(frames).unsqueeze(-1).expand(-1, num_negatives).flatten()
    neg_idxs = torch.randint(low=0, high=frames - 1, size=(batch, num_negatives * frames))
    neg_idxs[neg_idxs >= tszs] += 1
    return neg_idxs.view(batch, frames, num_negatives)


def _cosine64(a, b):
    """cos(a, b) over the last dim as ``torch.cosine_similarity`` (each side over max(‖v‖, 1e-8))."""
    return ((a / a.norm(dim=-1, keepdim=True).clamp_min(1e-8)) * (b / b.norm(dim=-1, keepdim=True).clamp_min(1e-8))
            ).sum(-1)


def wav2vec2_logits64(x, y, negatives, logit_temp=0.1, dtype=torch.float64):
    """(B, T, K + 1) logits of fairseq's ``compute_preds``: positive first, a distractor equal to
    the positive −inf; in a half ``dtype`` the cosines are rounded to it (``.type_as(x)``) and
    divided by the temperature in it, as fairseq does."""
    x64, y64 = x.double(), y.double()
    batch = torch.arange(x.shape[0])[:, None, None]
    distractors = y64[batch, negatives]  # (B, T, K, C)
    candidates = torch.cat([y64[:, :, None], distractors], dim=2)
    cosines = _cosine64(x64[:, :, None], candidates).to(dtype)
    logits = (cosines / logit_temp).double()
    equal = (y[:, :, None] == y[batch, negatives]).all(-1)
    return torch.cat([logits[..., :1], logits[..., 1:].masked_fill(equal, float("-inf"))], dim=-1)


def wav2vec2_contrastive64(x, y, negatives, logit_temp=0.1, dtype=torch.float64):
    """Mean over the B·T frames of −log softmax(logits)₀ (fairseq's summed cross-entropy over its
    sample size)."""
    logits = wav2vec2_logits64(x, y, negatives, logit_temp, dtype)
    return (torch.logsumexp(logits, dim=-1) - logits[..., 0]).mean()


def diversity64(codevector_logits):
    """fairseq ``GumbelVectorQuantizer``: p̄ = mean softmax over frames per group, perplexity
    Σ_g exp(−Σ_v p̄ log(p̄ + 1e-7)); loss (GV − perplexity)/GV."""
    groups, entries = codevector_logits.shape[-2:]
    probs = torch.softmax(codevector_logits.double().reshape(-1, groups, entries), dim=-1).mean(dim=0)
    perplexity = torch.exp(-(probs * torch.log(probs + 1e-7)).sum(dim=-1)).sum()
    return (groups * entries - perplexity) / (groups * entries)


def hubert_logits64(features, targets, codes, logit_temp=0.1, dtype=torch.float64):
    """(N, V) logits of fairseq's ``compute_nce`` over the codes, the target's column the positive
    and every other code equal to the target's embedding −inf (in a half ``dtype`` the cosines
    rounded to it and divided in it)."""
    cosines = _cosine64(features.double()[:, None, :], codes.double()[None, :, :]).to(dtype)
    logits = (cosines / logit_temp).double()
    equal = (codes[targets][:, None, :] == codes[None, :, :]).all(-1)
    equal[torch.arange(len(targets)), targets] = False
    return logits.masked_fill(equal, float("-inf"))


def hubert64(features, targets, codes, mask, padding_mask=None, logit_temp=0.1, pred_masked_weight=1.0,
             pred_nomask_weight=0.0, dtype=torch.float64):
    """fairseq's ``hubert`` criterion for one label set: (w_m Σ_masked ℓ + w_u Σ_unmasked ℓ) over
    the sample size (the frame counts of the terms with a weight > 0), padding left out."""
    d = features.shape[-1]
    f, t, m = features.reshape(-1, d), targets.reshape(-1), mask.reshape(-1)
    valid = torch.ones_like(m) if padding_mask is None else ~padding_mask.reshape(-1)
    logits = hubert_logits64(f, t, codes, logit_temp, dtype)
    per_frame = torch.logsumexp(logits, dim=-1) - logits.gather(1, t[:, None])[:, 0]
    loss, sample_size = 0.0, 0
    for weight, chosen in ((pred_masked_weight, m & valid), (pred_nomask_weight, ~m & valid)):
        if weight > 0:
            loss = loss + weight * per_frame[chosen].sum()
            sample_size += int(chosen.sum())
    return loss / sample_size
# --------------------------------------------------------------------------------------------
# iBOT (lightly's IBOTPatchLoss / IBOTPlusPlusPatchLoss) and DINOv2's Sinkhorn-Knopp teacher
# --------------------------------------------------------------------------------------------
def dinov2_sinkhorn_teacher64(teacher, teacher_temp, ranks=1, rows_of_ranks=None):
    """DINOv2's ``sinkhorn_knopp_teacher`` (3 iterations, linear domain) on the (N, K) teacher
    rows, float64. ``rows_of_ranks``: a list of every rank's rows (the all-reduced sums are sums
    over all of them); then the codes of ``teacher`` (one of them) are returned."""
    everyone = torch.cat([r.double() for r in rows_of_ranks]) if rows_of_ranks is not None else teacher.double()
    q = torch.exp(everyone / teacher_temp).t()
    total_rows = q.shape[1]
    num_prototypes = q.shape[0]
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True)
        q = q / num_prototypes
        q = q / q.sum(dim=0, keepdim=True)
        q = q / total_rows
    q = (q * total_rows).t()
    if rows_of_ranks is None:
        return q
    start = 0
    for r in rows_of_ranks:
        if r is teacher:
            return q[start:start + r.shape[0]]
        start += r.shape[0]
    raise ValueError("teacher must be one of rows_of_ranks")


def ibot_from_targets64(targets, student, mask, student_temp):
    """lightly's ``IBOTPatchLoss`` weighting on given (M, K) targets: Σ_m CE_m / max(n_b, 1) / B."""
    loss = -(targets.double() * F.log_softmax(student.double() / student_temp, dim=-1)).sum(dim=-1)
    num_masked = mask.sum(dim=(1, 2), keepdim=True).double().clamp(min=1.0)
    weight = (1.0 / num_masked).expand_as(mask)[mask]
    return (loss * weight).sum() / mask.shape[0]


def lightly_ibot64(teacher, student, mask, center, teacher_temp, student_temp, dtype=torch.float64):
    """lightly's ``IBOTPatchLoss.forward`` (before the center update), computed in ``dtype``."""
    t_out = F.softmax((teacher.to(dtype) - center.to(dtype).reshape(1, -1)) / teacher_temp, dim=-1)
    loss = -(t_out * F.log_softmax(student.to(dtype) / student_temp, dim=-1)).sum(dim=-1)
    # in exact arithmetic (lightly's clamp of the integer counts to 1.0 makes float32 weights)
    weight = (1.0 / mask.sum(dim=(1, 2), keepdim=True).to(dtype).clamp(min=1.0)).expand_as(mask)[mask]
    return (loss * weight).sum() / mask.shape[0]


def lightly_ibot_plus_plus64(teacher, student, mask, center, teacher_temp, student_temp, visible_loss_weight=1.0,
                             targets=None):
    """lightly's ``IBOTPlusPlusPatchLoss.forward`` in float64 on (B, N, K) outputs and a (B, N)
    mask or None (``targets``: given (B·N, K) teacher targets instead of the centred softmax)."""
    batch, tokens = teacher.shape[:2]
    t_flat, s_flat = teacher.double().flatten(0, 1), student.double().flatten(0, 1)
    if targets is None:
        targets = F.softmax((t_flat - center.double().reshape(1, -1)) / teacher_temp, dim=-1)
    ce = -(targets.double() * F.log_softmax(s_flat / student_temp, dim=-1)).sum(dim=-1).view(batch, tokens)
    if mask is None:
        return ce.mean()
    m = mask.reshape(batch, tokens).double()
    masked = (ce * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
    visible = (ce * (1 - m)).sum(dim=1) / (1 - m).sum(dim=1).clamp(min=1.0)
    return (masked + visible_loss_weight * visible).mean()


def roi_align_aligned64(feature_map, boxes, out_h, out_w):
    """torchvision's ``roi_align(feature_map, [batch index, boxes], (out_h, out_w), spatial_scale=1,
    sampling_ratio=-1, aligned=True)`` with one box per sample, as its per-sample loop, in float64:
    bin (p, q) averages ceil(extent / out) × ceil(extent / out) bilinear samples; a sample more than
    a pixel outside the map is 0, one just outside reads the edge. Returns (B, out_h · out_w, C)."""
    fm, bx = feature_map.double(), boxes.detach().double()  # differentiable in feature_map
    batch, channels, height, width = fm.shape

    def bilinear(image, y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return torch.zeros(channels, dtype=torch.float64)
        y, x = max(y, 0.0), max(x, 0.0)
        y_low, x_low = int(y), int(x)
        y_high, x_high = min(y_low + 1, height - 1), min(x_low + 1, width - 1)
        if y_low >= height - 1:
            y_low, y = height - 1, float(height - 1)
        if x_low >= width - 1:
            x_low, x = width - 1, float(width - 1)
        ly, lx = y - y_low, x - x_low
        return ((1 - ly) * (1 - lx) * image[:, y_low, x_low] + (1 - ly) * lx * image[:, y_low, x_high]
                + ly * (1 - lx) * image[:, y_high, x_low] + ly * lx * image[:, y_high, x_high])

    out = torch.zeros(batch, out_h, out_w, channels, dtype=torch.float64)
    for b in range(batch):
        x0, y0, x1, y1 = (v - 0.5 for v in bx[b].tolist())
        bin_h, bin_w = (y1 - y0) / out_h, (x1 - x0) / out_w
        grid_h, grid_w = math.ceil((y1 - y0) / out_h), math.ceil((x1 - x0) / out_w)
        count = max(grid_h * grid_w, 1)
        for p in range(out_h):
            for q in range(out_w):
                total = torch.zeros(channels, dtype=torch.float64)
                for iy in range(max(grid_h, 0)):
                    y = y0 + p * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(max(grid_w, 0)):
                        total += bilinear(fm[b], y, x0 + q * bin_w + (ix + 0.5) * bin_w / grid_w)
                out[b, p, q] = total / count
    return out.reshape(batch, out_h * out_w, channels)
