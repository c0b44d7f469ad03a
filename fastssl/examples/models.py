"""Encoders and heads for the example trainers.

Backbones (``--arch``), each mapping images (N, C, H, W) in [0, 1] to features (N, F):

=============  ==============================================================  ===========
``cnn``        3 conv layers (32, 64, 128 channels), one 2× pool, global average   default
``cnn-wide``   the same with 64, 128, 256 channels
``mlp``        flatten → 512 → 128 (fixed input size: local crops are resized)
``resnet18``   CIFAR-style ResNet-18 (3×3 stem, no max-pool), 512 features         larger data
=============  ==============================================================  ===========

Convolutional backbones end in global average pooling, so multi-crop's smaller local crops go
through the same weights. Every backbone first standardises its input with the training set's
per-channel mean and std (fixed buffers).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("cnn", "cnn-wide", "mlp", "resnet18")


class Standardize(nn.Module):
    """(x − mean) / std per channel; mean and std (C,) are buffers, saved with the model."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.reshape(1, -1, 1, 1).clone())
        self.register_buffer("std", std.reshape(1, -1, 1, 1).clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def small_cnn(channels: int, width: int) -> nn.Sequential:
    """(N, C, H, W) → (N, 4·width); any H, W ≥ 2. Pools after the first layer: the wide layers
    run at a quarter of the pixels."""
    return nn.Sequential(conv_bn_relu(channels, width), nn.MaxPool2d(2), conv_bn_relu(width, 2 * width),
                         conv_bn_relu(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class BasicBlock(nn.Module):
    """ResNet's two 3×3 convolutions with an identity (or 1×1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False), nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True), nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_channels))
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


def resnet18(channels: int) -> nn.Sequential:
    """CIFAR-style ResNet-18: (N, C, H, W) → (N, 512)."""
    layers, width = [conv_bn_relu(channels, 64)], 64
    for out_channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(width, out_channels, stride), BasicBlock(out_channels, out_channels, 1)]
        width = out_channels
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def build_backbone(arch: str, image_shape: Sequence[int], mean: torch.Tensor,
                   std: torch.Tensor) -> Tuple[nn.Module, int, bool]:
    """Returns (backbone, feature dim, whether it takes inputs smaller than ``image_shape``)."""
    channels, height, width = image_shape
    if arch == "cnn":
        body, features, any_size = small_cnn(channels, 32), 128, True
    elif arch == "cnn-wide":
        body, features, any_size = small_cnn(channels, 64), 256, True
    elif arch == "mlp":
        body = nn.Sequential(nn.Flatten(), nn.Linear(channels * height * width, 512), nn.BatchNorm1d(512),
                             nn.ReLU(inplace=True), nn.Linear(512, 128))
        features, any_size = 128, False
    elif arch == "resnet18":
        body, features, any_size = resnet18(channels), 512, True
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    return nn.Sequential(Standardize(mean, std), body), features, any_size


def mlp(*dims: int, last_batch_norm: bool = False) -> nn.Sequential:
    """Linear → BatchNorm → ReLU between consecutive ``dims``; a plain Linear at the end
    (followed by an affine-free BatchNorm when ``last_batch_norm``, as SimSiam's projector)."""
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        last = i == len(dims) - 2
        layers.append(nn.Linear(d_in, d_out, bias=last and not last_batch_norm))  # BN follows: no bias
        if not last:
            layers += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_batch_norm:
            layers.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*layers)


class CosineLinear(nn.Module):
    """Scores x̂ · ŵ_k of the L2-normalised input against L2-normalised weight rows: SwAV's
    prototypes and DINO's weight-normalised last layer (g fixed to 1). (N, D) → (N, K)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.normal_(self.weight, std=in_dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))
