"""The ``torch`` backend of Barlow Twins and VICReg: exact algebra that never builds D×D when N < D.

Same contracts as ``reference.barlow_twins`` and ``reference.vicreg_variance_covariance``. Both
losses need only the diagonal of a D×D product and its squared Frobenius norm, and the norm has
an exact N×N form (N = batch, D = features):

    ‖aᵀb‖²_F = ⟨a aᵀ, b bᵀ⟩_F        (Barlow Twins, C = aᵀb / N)
    ‖xᵀx‖²_F = ‖x xᵀ‖²_F             (VICReg, Cov = xᵀx / (B − 1))

so the *Gram* path costs O(N²D) time and N² memory, the *direct* path O(ND²) and D². ``"auto"``
takes Gram exactly when N < D (never a D×D matrix then); ``"gram"`` / ``"direct"`` force one.
Both give the same numbers to fp32 rounding.

Barlow Twins, with a, b the batch-normalised views and c_i = C_ii:

    L = Σ_i (1 − c_i)² + λ (‖C‖²_F − Σ_i c_i²)
    ∂L/∂a = (2/N) ((c − 1) − λc) ⊙ b + (2λ/N²) (b bᵀ) a      (= … + (2λ/N) b Cᵀ, direct)

and the batch-norm backward dz = rstd ⊙ (g − mean_n g − a ⊙ mean_n(g ⊙ a)) (a = (z − mean) · rstd
from torch's batch-norm statistics kernel, on each view less its rounded mean so that no CPU
kernel set cancels digits of a feature far from zero: see ``_batch_normalize``). VICReg per view and
group, x the centred view, v the unbiased variance, s = sqrt(v + eps):

    variance   = ½ mean relu(1 − s)          ∂/∂x = −[s < 1] x / (2 G D (B − 1) s)
    covariance = (‖x xᵀ‖²_F / (B − 1)² − Σ v²) / D, averaged over the G groups
                 ∂/∂x = 4 ((x xᵀ) x / (B − 1)² − v ⊙ x / (B − 1)) / (G D)

and the centring's backward dz = dx − mean_b dx. (The mean terms vanish in exact arithmetic, as
the columns of a, b and x sum to zero; in fp32 they keep the rounding of a mean — large for a
feature far from zero — out of the gradient, as autograd through the reference does.)

Saved for the backward: the inputs (no copy), O(D) statistics (mean, rstd or variance, c) and
the small product matrix of the chosen path (two N×N Grams, or C when N ≥ D, which is then no
larger than an input). Normalised copies of the views are recomputed from the saved statistics, in O(ND).

VICRegL's ``mutual_nearest_neighbors`` (indices, no gradient): each block of images' distance
matrix gives the nearest cell both ways, from differences for grids and a GEMM for features.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..runtime import library
from ..runtime.blocks import blocks
from ..runtime.dtypes import compute_dtype
from ..runtime.validation import check_choice
from .op import define_nearest_neighbors_op, define_two_view_op

Tensor = torch.Tensor

ALGORITHMS = ("auto", "gram", "direct")
BATCH_NORM_EPS = 1e-5  # lightly's F.batch_norm default
GRAM_BLOCK = 256  # rows per GEMM of a symmetric product: smaller GEMMs lose more speed than they save


def use_gram(batch: int, dim: int, algorithm: str) -> bool:
    """True for the N×N Gram path: forced by ``algorithm="gram"``, or ``"auto"`` with N < D."""
    check_choice("algorithm", algorithm, ALGORITHMS)
    return algorithm == "gram" or (algorithm == "auto" and batch < dim)


def gram(x: Tensor, out: Tensor) -> Tensor:
    """x xᵀ of (G, M, K) ``x`` into ``out`` (G, M, M), as a SYRK would: only the row blocks on
    and above the diagonal are multiplied (k + 1 of 2k halves for k blocks), the rest mirrored."""
    rows = x.shape[1]
    for start in range(0, rows, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, rows)
        block = torch.bmm(x[:, start:stop], x[:, start:].transpose(1, 2))
        out[:, start:stop, start:] = block
        out[:, stop:, start:stop] = block[:, :, stop - start:].transpose(1, 2)
    return out


def _shift(z: Tensor, dtype: torch.dtype) -> Tensor:
    """z − z.mean(0) in ``dtype``, a new tensor: exact for a feature far from zero (Sterbenz), and
    what is left has a mean of the order of the mean's rounding. The same bits in the forward and
    the backward."""
    z = z.to(dtype)
    return z - z.mean(dim=0)


def _normalize_(shifted: Tensor, mean: Tensor, rstd: Tensor) -> Tensor:
    """(shifted − mean) · rstd in place."""
    return shifted.sub_(mean).mul_(rstd)


def _batch_normalize(z: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor, Tensor]:
    """(N, D) → (normalised z, mean, rstd) in ``dtype``, as ``F.batch_norm`` in training mode
    (biased variance; lightly's own call), with mean that of ``_shift(z)``.

    The statistics are those of the shifted z, from torch's batch-norm statistics kernel, and
    the normalisation is (shifted − mean) · rstd, because torch's fused kernel forms its output as
    z·rstd + (−mean·rstd), which cancels for a feature far from zero on the scalar kernel
    (``ATEN_CPU_CAPABILITY=default``: 300 ± 1e-3 lost 4e-3 of a loss of 70). Centring z by its
    rounded mean alone is not enough for the gradient: that mean can be off by an ulp of 300
    (3e-5, 3% of such a feature's spread); the shifted z's own mean takes that out too.
    """
    shifted = _shift(z, dtype)
    mean, variance = torch.batch_norm_update_stats(shifted, None, None, 0.0)
    rstd = torch.rsqrt(variance + BATCH_NORM_EPS)
    return _normalize_(shifted, mean, rstd), mean, rstd


def _batch_norm_backward_(grad: Tensor, normalized: Tensor, rstd: Tensor) -> Tensor:
    """Batch norm's backward in place on ``grad``: rstd ⊙ (g − mean_n g − a ⊙ mean_n(g ⊙ a)), with a
    the normalised z (whose columns have mean 0 to rounding, so this is the exact derivative)."""
    scale = torch.linalg.vecdot(grad, normalized, dim=0) / grad.shape[0]
    return grad.sub_(grad.mean(dim=0)).addcmul_(normalized, scale, value=-1).mul_(rstd)


# --------------------------------------------------------------------------------------------
# Barlow Twins
# --------------------------------------------------------------------------------------------
def barlow_twins_forward(z_a: Tensor, z_b: Tensor, lambda_param: float,
                         algorithm: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """Barlow Twins loss of (N, D) views, and what the backward needs.

    Returns (loss () , stats (5, D) = [mean_a, rstd_a, mean_b, rstd_b, c], products): mean is that
    of the view less its rounded mean (``_shift``; the batch mean is z.mean(0) + mean); products
    is (2, N, N) = [a aᵀ, b bᵀ] on the Gram path, (1, D, D) = [C] on the direct path. All in
    float32 (float64 for float64 inputs).
    """
    n, d = z_a.shape
    dtype = compute_dtype(z_a, z_b)
    a, mean_a, rstd_a = _batch_normalize(z_a, dtype)
    b, mean_b, rstd_b = _batch_normalize(z_b, dtype)
    diagonal = torch.linalg.vecdot(a, b, dim=0) / n
    if use_gram(n, d, algorithm):
        products = torch.empty(2, n, n, dtype=dtype, device=a.device)
        gram(a.unsqueeze(0), products[:1])
        gram(b.unsqueeze(0), products[1:])
        squared_norm = torch.dot(products[0].flatten(), products[1].flatten()) / n**2
    else:
        products = torch.mm(a.T, b).div_(n).unsqueeze(0)
        squared_norm = torch.dot(products.flatten(), products.flatten())
    off_diagonal = squared_norm - diagonal.pow(2).sum()
    loss = (1 - diagonal).pow(2).sum() + lambda_param * off_diagonal
    return loss, torch.stack([mean_a, rstd_a, mean_b, rstd_b, diagonal]), products


def barlow_twins_backward(grad: Tensor, stats: Tensor, products: Tensor, z_a: Tensor, z_b: Tensor,
                          lambda_param: float, algorithm: str = "auto") -> Tuple[Tensor, Tensor]:
    """Gradients of ``grad`` × ``barlow_twins_forward``'s loss w.r.t. z_a, z_b, in their dtype."""
    n, d = z_a.shape
    mean_a, rstd_a, mean_b, rstd_b, diagonal = stats
    a = _normalize_(_shift(z_a, stats.dtype), mean_a, rstd_a)  # the forward's a and b, bit for bit
    b = _normalize_(_shift(z_b, stats.dtype), mean_b, rstd_b)
    coefficient = 2 * ((diagonal - 1) - lambda_param * diagonal) / n * grad
    if use_gram(n, d, algorithm):  # ∂‖C‖²/∂a = (2/N²) (b bᵀ) a
        scale = 2 * lambda_param / n**2 * grad
        grad_a, grad_b = (products[1] * scale) @ a, (products[0] * scale) @ b
    else:  # = (2/N) b Cᵀ
        correlation = products[0] * (2 * lambda_param / n * grad)
        grad_a, grad_b = b @ correlation.T, a @ correlation
    grad_a.addcmul_(b, coefficient)
    grad_b.addcmul_(a, coefficient)
    return (_batch_norm_backward_(grad_a, a, rstd_a).to(z_a.dtype),
            _batch_norm_backward_(grad_b, b, rstd_b).to(z_b.dtype))


def barlow_twins_forward_fake(z_a: Tensor, z_b: Tensor, lambda_param: float, algorithm: str = "auto"):
    n, d = z_a.shape
    dtype = compute_dtype(z_a, z_b)
    products = (2, n, n) if use_gram(n, d, algorithm) else (1, d, d)
    return z_a.new_empty((), dtype=dtype), z_a.new_empty(5, d, dtype=dtype), z_a.new_empty(products, dtype=dtype)


# --------------------------------------------------------------------------------------------
# VICReg
# --------------------------------------------------------------------------------------------
# rows per step of ``_column_squares``: at least 32, and as many as fit SQUARES_SCRATCH elements, so
# that the scratch stays in cache at D = 8192 and narrow views take a few steps, not hundreds (at
# 8192 × 4, 32-row steps made the step 0.36× lightly's; 1.38× now: bench.sweep, 1 thread, process clock)
SQUARES_BLOCK = 32
SQUARES_SCRATCH = 32 * 8192


def _column_squares(x: Tensor) -> Tensor:
    """Σ_b x² of (G, B, D) ``x`` → (G, D), in blocks of rows: one small scratch instead of an
    N×D temporary (a fresh N×D buffer costs its page faults, more than the multiply itself)."""
    step = max(SQUARES_BLOCK, SQUARES_SCRATCH // (x.shape[0] * x.shape[2]))
    scratch = x.new_empty(x.shape[0], min(step, x.shape[1]), x.shape[2])
    total = x.new_zeros(x.shape[0], x.shape[2])
    for start in range(0, x.shape[1], step):
        block = x[:, start:start + step]
        squares = torch.mul(block, block, out=scratch[:, :block.shape[1]])
        total.add_(squares.sum(dim=1))
    return total


def _centre(z: Tensor, out: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``out`` (G, B, D) ← x = z − mean of the (B, G, D) view z, in out's dtype; returns (x, mean
    (G, D), unbiased variance (G, D), residual mean r = mean_b x (G, D)).

    The variance by the corrected two-pass algorithm: Σ x² − (Σ x)² / B removes the error of the
    rounded mean (a feature at 300 ± 1e-3 has a mean good to ~1% of its spread in fp32), as
    accurate as ``torch.var_mean``, whose dim-0 Welford kernel is ~40× slower on CPU. r is what
    the rounded mean left (the gradient's centring takes it out, see ``vicreg_forward``).
    """
    batch = z.shape[0]
    z = z.to(out.dtype)
    mean = z.mean(dim=0)
    x = torch.sub(z.transpose(0, 1), mean.unsqueeze(1), out=out)
    residual = x.sum(dim=1)
    variance = (_column_squares(x) - residual.pow(2) / batch) / (batch - 1)
    return x, mean, variance, residual / batch


def _centred_groups(z: Tensor, mean: Tensor) -> Tensor:
    """(B, G, D) view minus its batch mean (G, D), as (G, B, D) in the mean's dtype."""
    return (z.to(mean.dtype) - mean).transpose(0, 1)


def vicreg_variance_covariance_forward(z_a: Tensor, z_b: Tensor, eps: float,
                                       algorithm: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    """VICReg's [variance, covariance] terms of two (B, G, D) views, and what the backward needs.

    Returns (terms (2,), stats (2, 2, G, D) = per view [mean, unbiased variance], products):
    products is (2, G, B, B) = per view x xᵀ on the Gram path, (2, G, D, D) = xᵀx on the direct
    path. All in float32 (float64 for float64 inputs).
    """
    batch, groups, dim = z_a.shape
    dtype = compute_dtype(z_a, z_b)
    on_gram = use_gram(batch, dim, algorithm)
    size = batch if on_gram else dim
    products = torch.empty(2, groups, size, size, dtype=dtype, device=z_a.device)
    stats = torch.empty(2, 2, groups, dim, dtype=dtype, device=z_a.device)
    variance = covariance = 0.0
    for view, z in enumerate((z_a, z_b)):
        x, mean, var, _ = _centre(z, torch.empty(groups, batch, dim, dtype=dtype, device=z.device))
        stats[view, 0], stats[view, 1] = mean, var
        gram(x if on_gram else x.transpose(1, 2), products[view])
        squared_norm = torch.linalg.vecdot(products[view].flatten(1), products[view].flatten(1))
        off_diagonal = squared_norm / (batch - 1) ** 2 - var.pow(2).sum(dim=1)
        variance = variance + 0.5 * torch.relu(1 - torch.sqrt(var + eps)).mean()
        covariance = covariance + (off_diagonal / dim).mean()
    return torch.stack([variance, covariance]), stats, products


def vicreg_variance_covariance_backward(grad: Tensor, stats: Tensor, products: Tensor, z_a: Tensor, z_b: Tensor,
                                        eps: float, algorithm: str = "auto") -> Tuple[Tensor, Tensor]:
    """Gradients of ``grad · [variance, covariance]`` w.r.t. the (B, G, D) views, in their dtype."""
    batch, groups, dim = z_a.shape
    grad_variance, grad_covariance = grad
    on_gram = use_gram(batch, dim, algorithm)
    grads = []
    for z, (mean, var), product in zip((z_a, z_b), stats, products):
        x = _centred_groups(z, mean)
        std = torch.sqrt(var + eps)
        hinge = (std < 1).to(std.dtype) / (2 * groups * dim * (batch - 1) * std)
        column = -grad_variance * hinge - grad_covariance * 4 * var / (groups * dim * (batch - 1))
        scaled = product * (grad_covariance * 4 / (groups * dim * (batch - 1) ** 2))
        # contiguous (G, B, D), not x's transposed layout: baddbmm_ into a strided output runs
        # one GEMM per group (VICRegL's hundreds of match groups)
        grad_x = torch.mul(x, column[:, None, :], out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
        if on_gram:
            grad_x.baddbmm_(scaled, x)
        else:
            grad_x.baddbmm_(x, scaled)
        # the centring's backward (the mean's rounding only), written in z's (B, G, D) layout
        grad_z = torch.empty(batch, groups, dim, dtype=grad_x.dtype, device=grad_x.device)
        torch.sub(grad_x, grad_x.mean(dim=1, keepdim=True), out=grad_z.transpose(0, 1))
        grads.append(grad_z.to(z.dtype))
    return grads[0], grads[1]


def vicreg_variance_covariance_forward_fake(z_a: Tensor, z_b: Tensor, eps: float, algorithm: str = "auto"):
    batch, groups, dim = z_a.shape
    dtype = compute_dtype(z_a, z_b)
    size = batch if use_gram(batch, dim, algorithm) else dim
    return (z_a.new_empty(2, dtype=dtype), z_a.new_empty(2, 2, groups, dim, dtype=dtype),
            z_a.new_empty(2, groups, size, size, dtype=dtype))


# --------------------------------------------------------------------------------------------
# VICReg, whole: invariance + variance + covariance and their gradients in one op
# --------------------------------------------------------------------------------------------
def vicreg_forward(z_a: Tensor, z_b: Tensor, lambda_param: float, mu_param: float, nu_param: float, eps: float,
                   algorithm: str, with_gradient: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """VICReg of two (B, G, D) views (``reference.vicreg``) and, ``with_gradient``, ∂loss/∂z_a,
    ∂loss/∂z_b (B, G, D) in closed form, in float32 (float64 for float64 inputs).

    Per view, x the centred view, v its unbiased variance, s = sqrt(v + eps), r = mean_b x (the
    rounding of the mean) and P = I − 11ᵀ/B the centring's backward:

        ∂/∂z_a = (2λ / (B G D)) (z_a − z_b) + column ⊙ (x − r) + α (P x xᵀ) x        (Gram)
                                                 … + α (x − r) xᵀx                     (direct)
        column = −μ [s < 1] / (2 G D (B − 1) s) − 4ν v / (G D (B − 1)),  α = 4ν / (G D (B − 1)²)

    (P applied to the N×N Gram, not to the (B, D) product; the −column ⊙ r row rides in the same
    GEMM as one more row of x against a column of ones.) Beyond the GEMMs: the difference, each
    view's centring and statistics, and one addcmul per view starting its gradient; nothing is
    recomputed in the backward, which only scales the gradients. Three N×D buffers are live at
    most (the difference, which becomes z_b's gradient, one centred view at a time, z_a's
    gradient): each fresh one costs page faults worth several elementwise passes.
    """
    batch, groups, dim = z_a.shape
    dtype = compute_dtype(z_a, z_b)
    on_gram = use_gram(batch, dim, algorithm)
    size = batch if on_gram else dim
    invariance_scale = 2 * lambda_param / z_a.numel()
    difference = torch.empty(groups, batch, dim, dtype=dtype, device=z_a.device)
    torch.sub(z_a.to(dtype).transpose(0, 1), z_b.to(dtype).transpose(0, 1), out=difference)
    loss = lambda_param * torch.dot(difference.flatten(), difference.flatten()) / difference.numel()
    buffer = torch.empty(groups, batch + (1 if on_gram else 0), dim, dtype=dtype, device=z_a.device)
    product = torch.empty(groups, size, size, dtype=dtype, device=z_a.device)
    gradients = []
    for sign, z in ((1.0, z_a), (-1.0, z_b)):
        x, _, var, residual = _centre(z, buffer[:, :batch])
        gram(x if on_gram else x.transpose(1, 2), product)
        squared_norm = torch.linalg.vecdot(product.flatten(1), product.flatten(1))
        std = torch.sqrt(var + eps)
        covariance = ((squared_norm / (batch - 1) ** 2 - var.pow(2).sum(dim=1)) / dim).mean()
        loss = loss + mu_param * 0.5 * torch.relu(1 - std).mean() + nu_param * covariance
        if not with_gradient:
            gradients.append(library.empty_grad(z))
            continue
        normaliser = groups * dim * (batch - 1)
        column = -mu_param * (std < 1).to(dtype) / (2 * normaliser * std) - nu_param * 4 * var / normaliser
        alpha = nu_param * 4 / (normaliser * (batch - 1))
        # started = invariance term + column ⊙ x, as scale · (±difference + x ⊙ column / scale) in
        # one addcmul (z_b's in place: the difference's last use); the GEMM's beta restores the scale
        scale = sign * invariance_scale
        last = sign < 0
        if scale != 0:
            started = torch.addcmul(difference, x, (column / scale).unsqueeze(1),
                                    out=difference if last else torch.empty_like(difference))
        else:
            started = torch.mul(x, column.unsqueeze(1), out=difference if last else torch.empty_like(difference))
        beta = scale if scale != 0 else 1.0
        if on_gram:  # [α P G | 1] [x; −(column ⊙ r)]: the Gram's rows less their mean, then the r row
            weights = torch.empty(groups, batch, batch + 1, dtype=dtype, device=z.device)
            torch.sub(product, product.mean(dim=1, keepdim=True), out=weights[:, :, :batch]).mul_(alpha)
            weights[:, :, batch] = 1
            torch.mul(column, residual, out=buffer[:, batch]).neg_()
            gradient = started.baddbmm_(weights, buffer, beta=beta)
        else:  # α (x − r) C = α x C − α r C, and −column ⊙ r: one row subtracted from every row
            gradient = started.baddbmm_(x, product, beta=beta, alpha=alpha)
            correction = torch.baddbmm((column * residual).unsqueeze(1), residual.unsqueeze(1), product, alpha=alpha)
            gradient.sub_(correction)
        gradients.append(gradient.transpose(0, 1))
    return loss, gradients[0], gradients[1]


def vicreg_forward_fake(z_a: Tensor, z_b: Tensor, lambda_param: float, mu_param: float, nu_param: float, eps: float,
                        algorithm: str, with_gradient: bool):
    dtype = compute_dtype(z_a, z_b)
    return (z_a.new_empty((), dtype=dtype),
            *(z.new_empty(z.shape[1], z.shape[0], z.shape[2], dtype=dtype).transpose(0, 1) if with_gradient
              else library.empty_grad(z) for z in (z_a, z_b)))


vicreg = library.define_precomputed_gradient_op(
    "vicreg", "Tensor z_a, Tensor z_b, float lambda_param, float mu_param, float nu_param, float eps, str algorithm",
    2, 0, vicreg_forward, vicreg_forward_fake)


# --------------------------------------------------------------------------------------------
# VICRegL's nearest neighbours
# --------------------------------------------------------------------------------------------
DIRECT_DISTANCE_MAX_DIM = 4  # grids (C = 2): differences, not the matmul form (see below)


def _squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """(G, Na, C), (G, M, C) → (G, Na, M) squared Euclidean distances.

    Few coordinates (grids): the differences themselves, exact to rounding — the matmul form
    ‖a‖² + ‖b‖² − 2a·b would cancel for pixel coordinates (‖a‖² ~ 1e5 against neighbours a few
    pixels apart). Feature vectors: that matmul form (a GEMM, as torch.cdist's) on both sets less
    b's mean, so that a common offset of the features cancels before the products.
    """
    if a.shape[-1] <= DIRECT_DISTANCE_MAX_DIM:
        return (a.unsqueeze(2) - b.unsqueeze(1)).pow(2).sum(dim=-1)
    centre = b.mean(dim=1, keepdim=True)
    a, b = a - centre, b - centre
    norms_a, norms_b = a.pow(2).sum(dim=-1), b.pow(2).sum(dim=-1)
    return torch.baddbmm(norms_b.unsqueeze(1), a, b.transpose(1, 2), alpha=-2).add_(norms_a.unsqueeze(2))


def mutual_nearest_neighbors_forward(a: Tensor, b: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``reference.mutual_nearest_neighbors`` in blocks of images: a block's distances from a to
    all S sets at once (one GEMM, (block, Na, S·Nb)) give both directions' minima (one distance per
    pair, where lightly runs cdist twice per pair), so memory is O(block·Na·S·Nb) beyond the
    O(B·S·(Na + Nb)) results."""
    dtype = compute_dtype(a, b)
    batch, sets, rows_a, rows_b = a.shape[0], b.shape[1], a.shape[1], b.shape[2]
    a_index = torch.empty(batch, sets, rows_a, dtype=torch.long, device=a.device)
    b_index = torch.empty(batch, sets, rows_b, dtype=torch.long, device=a.device)
    a_distance = torch.empty(batch, sets, rows_a, dtype=dtype, device=a.device)
    b_distance = torch.empty(batch, sets, rows_b, dtype=dtype, device=a.device)
    per_image = rows_a * sets * rows_b * (a.shape[-1] if a.shape[-1] <= DIRECT_DISTANCE_MAX_DIM else 1)
    for part in blocks(batch, per_image):
        distances = _squared_distances(a[part].to(dtype), b[part].flatten(1, 2).to(dtype))
        distances = distances.unflatten(2, (sets, rows_b)).transpose(1, 2)  # (block, S, Na, Nb)
        torch.min(distances, dim=3, out=(a_distance[part], a_index[part]))
        torch.min(distances, dim=2, out=(b_distance[part], b_index[part]))
    return a_index, a_distance, b_index, b_distance


barlow_twins = define_two_view_op("barlow_twins", 'float lambda_param, str algorithm="auto"',
                                  barlow_twins_forward, barlow_twins_forward_fake, barlow_twins_backward)
vicreg_variance_covariance = define_two_view_op(
    "vicreg_variance_covariance", 'float eps, str algorithm="auto"',
    vicreg_variance_covariance_forward, vicreg_variance_covariance_forward_fake, vicreg_variance_covariance_backward)
mutual_nearest_neighbors = define_nearest_neighbors_op("mutual_nearest_neighbors", mutual_nearest_neighbors_forward)
