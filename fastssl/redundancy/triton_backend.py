"""The ``triton`` backend of the redundancy family: Barlow Twins and VICReg on
``fastssl.kernels.redundancy`` (ops ``fastssl::barlow_twins_triton`` and
``fastssl::vicreg_variance_covariance_triton``, with their ``_backward``).

The forward saves O(D) column statistics only; the backward rebuilds the normalised views (a
kernel), the products (torch GEMMs, cuBLAS being the better GEMM) and the input gradients (one
fused kernel per loss).
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..kernels import redundancy as kernels
from ..runtime.dtypes import compute_dtype
from .op import define_two_view_op
from . import torch_backend

Tensor = torch.Tensor


def barlow_twins_forward(z_a: Tensor, z_b: Tensor, lambda_param: float, algorithm: str = "auto"):
    """→ (loss, stats (6, D), empty products): see ``torch_backend.barlow_twins_forward``."""
    z_a, z_b = z_a.contiguous(), z_b.contiguous()
    batch, dim = z_a.shape
    gram = torch_backend.use_gram(batch, dim, algorithm)
    stats = kernels.column_stats(z_a, z_b, True, lambda_param, torch_backend.BATCH_NORM_EPS, compute_dtype(z_a, z_b))
    squared_norm = kernels.squared_norms(z_a, z_b, stats, (0, 2), 1, gram=gram, two_products=gram, symmetric=gram,
                                  scaled=True)[0] / batch**2
    loss = stats[5].sum() + lambda_param * squared_norm
    return loss, stats, stats.new_empty(0)


def barlow_twins_backward(grad: Tensor, stats: Tensor, products: Tensor, z_a: Tensor, z_b: Tensor,
                          lambda_param: float, algorithm: str = "auto") -> Tuple[Tensor, Tensor]:
    z_a, z_b, grad = z_a.contiguous(), z_b.contiguous(), grad.contiguous()
    batch, dim = z_a.shape
    a, b = kernels.normalize(z_a, stats, 0, True), kernels.normalize(z_b, stats, 2, True)
    if torch_backend.use_gram(batch, dim, algorithm):  # (b bᵀ) a, (a aᵀ) b
        grams = torch.empty(2, batch, batch, dtype=a.dtype, device=a.device)
        torch_backend.gram(a.unsqueeze(0), grams[:1])
        torch_backend.gram(b.unsqueeze(0), grams[1:])
        product_a, product_b = grams[1] @ a, grams[0] @ b
        alpha = 2 * lambda_param / batch**2
    else:  # b Cᵀ, a C with C = aᵀ b / B
        correlation = (a.T @ b).div_(batch)
        product_a, product_b = b @ correlation.T, a @ correlation
        alpha = 2 * lambda_param / batch
    grads = []
    for product, own, partner, z, rstd_row in ((product_a, a, b, z_a, 1), (product_b, b, a, z_b, 3)):
        grads.append(kernels.barlow_input_gradient(product, own, partner, stats, grad, z, lambda_param, alpha,
                                                   rstd_row))
    return grads[0], grads[1]


def barlow_twins_forward_fake(z_a: Tensor, z_b: Tensor, lambda_param: float, algorithm: str = "auto"):
    dtype = compute_dtype(z_a, z_b)
    return (z_a.new_empty((), dtype=dtype), z_a.new_empty(6, z_a.shape[1], dtype=dtype),
            z_a.new_empty(0, dtype=dtype))


def vicreg_variance_covariance_forward(z_a: Tensor, z_b: Tensor, eps: float, algorithm: str = "auto"):
    """→ ([variance, covariance], stats (6, G·D), empty products): see ``torch_backend``."""
    batch, groups, dim = z_a.shape
    z_a, z_b = z_a.reshape(batch, groups * dim).contiguous(), z_b.reshape(batch, groups * dim).contiguous()
    gram = torch_backend.use_gram(batch, dim, algorithm)
    stats = kernels.column_stats(z_a, z_b, False, eps, torch_backend.BATCH_NORM_EPS, compute_dtype(z_a, z_b))
    variance = 0.5 * (stats[4].mean() + stats[5].mean())
    covariance = 0.0
    for z, mean_row in ((z_a, 0), (z_b, 2)):
        squared_norm = kernels.squared_norms(z, z, stats, (mean_row, mean_row), groups, gram=gram, two_products=False,
                                      symmetric=True, scaled=False)
        var = stats[mean_row + 1].view(groups, dim)
        covariance = covariance + ((squared_norm / (batch - 1) ** 2 - var.pow(2).sum(dim=1)) / dim).mean()
    return torch.stack([variance, covariance]), stats, stats.new_empty(0)


def vicreg_variance_covariance_backward(grad: Tensor, stats: Tensor, products: Tensor, z_a: Tensor, z_b: Tensor,
                                        eps: float, algorithm: str = "auto") -> Tuple[Tensor, Tensor]:
    batch, groups, dim = z_a.shape
    gram = torch_backend.use_gram(batch, dim, algorithm)
    grad = grad.contiguous()  # the kernel reads [g_var, g_cov] from two adjacent elements
    grads = []
    for z, mean_row in ((z_a, 0), (z_b, 2)):
        z = z.reshape(batch, groups * dim).contiguous()
        x = kernels.normalize(z, stats, mean_row, False)
        by_group = x.view(batch, groups, dim).transpose(0, 1)  # (G, B, D)
        size = batch if gram else dim
        product_matrix = torch_backend.gram(by_group if gram else by_group.transpose(1, 2),
                                         x.new_empty(groups, size, size))
        product = torch.bmm(product_matrix, by_group) if gram else torch.bmm(by_group, product_matrix)
        grads.append(kernels.vicreg_input_gradient(product, x, stats, grad, (batch, groups, dim), z.dtype, eps,
                                                   mean_row + 1))
    return grads[0], grads[1]


def vicreg_variance_covariance_forward_fake(z_a: Tensor, z_b: Tensor, eps: float, algorithm: str = "auto"):
    batch, groups, dim = z_a.shape
    dtype = compute_dtype(z_a, z_b)
    return (z_a.new_empty(2, dtype=dtype), z_a.new_empty(6, groups * dim, dtype=dtype),
            z_a.new_empty(0, dtype=dtype))


barlow_twins = define_two_view_op(
    "barlow_twins_triton", 'float lambda_param, str algorithm="auto"', barlow_twins_forward,
    barlow_twins_forward_fake, barlow_twins_backward)
vicreg_variance_covariance = define_two_view_op(
    "vicreg_variance_covariance_triton", 'float eps, str algorithm="auto"', vicreg_variance_covariance_forward,
    vicreg_variance_covariance_forward_fake, vicreg_variance_covariance_backward)
