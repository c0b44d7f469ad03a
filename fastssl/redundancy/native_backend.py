"""The ``native`` backend of the redundancy family: Barlow Twins' Gram path in one
``fastssl::barlow_twins_gram_forward`` call and one ``_backward`` call from ``csrc/redundancy/``
(CPU, OpenMP; the normalisation, diagonal and statistics fused around the GEMMs), as the op
``fastssl::barlow_twins_native``. The direct path (N ≥ D under ``"auto"``) is the torch
backend's, whose D×D GEMMs are ~80% of its time. Imported by the registry only once the
extension is loaded; the C++ schemas name this module as the home of their fakes.
"""
from __future__ import annotations

from typing import Tuple

import torch

from ..runtime import native
from . import torch_backend
from .op import define_two_view_op

native.require("cpu")

Tensor = torch.Tensor
not_supported_reasons = native.cpu_only_reasons


def _barlow_twins_forward(z_a: Tensor, z_b: Tensor, lambda_param: float,
                          algorithm: str = "auto") -> Tuple[Tensor, Tensor, Tensor]:
    if not torch_backend.use_gram(z_a.shape[0], z_a.shape[1], algorithm):
        return torch_backend.barlow_twins_forward(z_a, z_b, lambda_param, algorithm)
    return torch.ops.fastssl.barlow_twins_gram_forward(z_a, z_b, lambda_param)


def _barlow_twins_backward(grad: Tensor, stats: Tensor, products: Tensor, z_a: Tensor, z_b: Tensor,
                           lambda_param: float, algorithm: str = "auto") -> Tuple[Tensor, Tensor]:
    if not torch_backend.use_gram(z_a.shape[0], z_a.shape[1], algorithm):
        return torch_backend.barlow_twins_backward(grad, stats, products, z_a, z_b, lambda_param, algorithm)
    return torch.ops.fastssl.barlow_twins_gram_backward(grad, stats, products, z_a, z_b, lambda_param)


@torch.library.register_fake("fastssl::barlow_twins_gram_forward")
def _barlow_twins_gram_forward_fake(z_a, z_b, lambda_param):
    return torch_backend.barlow_twins_forward_fake(z_a, z_b, lambda_param, "gram")


@torch.library.register_fake("fastssl::barlow_twins_gram_backward")
def _barlow_twins_gram_backward_fake(grad, stats, products, z_a, z_b, lambda_param):
    return torch.empty_like(z_a), torch.empty_like(z_b)


barlow_twins = define_two_view_op("barlow_twins_native", 'float lambda_param, str algorithm="auto"',
                                  _barlow_twins_forward, torch_backend.barlow_twins_forward_fake,
                                  _barlow_twins_backward)
