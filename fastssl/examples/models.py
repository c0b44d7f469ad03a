"""Encoders and heads for the example trainers.

Backbones (``--arch``), each mapping images (N, C, H, W) in [0, 1] to features (N, F):

=============  ==============================================================  ===========
``cnn``        3 conv layers (32, 64, 128 channels), one 2× pool, global average   default
``cnn-wide``   the same with 64, 128, 256 channels
``mlp``        flatten → 512 → 128 (fixed input size: local crops are resized)
``resnet18``   CIFAR-style ResNet-18 (3×3 stem, no max-pool), 512 features         larger data
``vit``        ViT on 2×2 patches: 4 pre-norm blocks of width 64, 4 heads; the     dinov2, mae
               features are its class token and mean patch token, 128 in all
=============  ==============================================================  ===========

Convolutional backbones end in global average pooling, so multi-crop's smaller local crops go
through the same weights; the ViT interpolates its position embeddings to a smaller patch grid. Every backbone first standardises its input with the training set's
per-channel mean and std (fixed buffers).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("cnn", "cnn-wide", "mlp", "resnet18", "vit")


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


def transformer(dim: int, depth: int, heads: int) -> nn.TransformerEncoder:
    """``depth`` pre-norm transformer blocks (GELU MLP of 4·dim, no dropout) on (N, T, dim) tokens."""
    block = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                       norm_first=True)
    return nn.TransformerEncoder(block, depth, enable_nested_tensor=False)


class VisionTransformer(nn.Module):
    """A small ViT that also exposes its tokens, for the patch-level methods (DINOv2's iBOT
    loss, MAE). Patches p×p of the standardised image → ``dim``-wide tokens, learned position
    embeddings (bicubically resized for a smaller patch grid), a class token, ``depth`` blocks,
    a final LayerNorm.

    ``forward(images)`` (N, C, H, W) → features (N, 2·dim): the class token and the mean patch
    token, side by side (DINOv2's linear-evaluation features). ``tokens(images, mask=None,
    keep=None)`` → (N, 1 + T, dim), class token first: ``mask`` (N, h, w) bool replaces the
    masked patches by the learned mask token before the blocks (iBOT); ``keep`` (N, T) int64
    gives the patches to encode, the others are dropped (MAE).
    """

    def __init__(self, standardize: Standardize, channels: int, image_size: int, patch_size: int = 2,
                 dim: int = 64, depth: int = 4, heads: int = 4):
        super().__init__()
        self.standardize, self.patch_size, self.dim = standardize, patch_size, dim
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(channels, dim, patch_size, patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        # Unit-variance positions (not ViT's 0.02): on a 4×4 grid the pooled features need the
        # layout from the start (random-init kNN-5 41% → 72%, DINOv2-style 64% → 94%).
        self.position = nn.Parameter(torch.randn(1, dim, self.grid, self.grid))
        self.blocks = transformer(dim, depth, heads)
        self.norm = nn.LayerNorm(dim)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """(1, height·width, dim) position embeddings for a height × width patch grid."""
        position = self.position
        if (height, width) != (self.grid, self.grid):
            position = F.interpolate(position, size=(height, width), mode="bicubic", align_corners=False)
        return position.flatten(2).transpose(1, 2)

    def tokens(self, images: torch.Tensor, mask: Optional[torch.Tensor] = None,
               keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        patches = self.patch_embed(self.standardize(images))  # (N, dim, h, w)
        height, width = patches.shape[-2:]
        patches = patches.flatten(2).transpose(1, 2)
        if mask is not None:
            patches = torch.where(mask.reshape(len(patches), -1, 1), self.mask_token.to(patches.dtype), patches)
        patches = patches + self.positions(height, width)
        if keep is not None:
            patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, self.dim))
        tokens = torch.cat([self.class_token.expand(len(patches), -1, -1), patches], dim=1)
        return self.norm(self.blocks(tokens))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(images)
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)


class MAEDecoder(nn.Module):
    """MAE's light decoder: encoder tokens (N, 1 + K, D) of the K kept patches (``keep``
    (N, K) int64, of ``num_patches``) → predicted pixels (N, num_patches, pixels) of every patch.
    A linear map to ``dim``, the mask token at the dropped patches, its own position
    embeddings, ``depth`` blocks, LayerNorm, a linear map to the patch's pixels."""

    def __init__(self, encoder_dim: int, num_patches: int, pixels: int, dim: int, depth: int, heads: int = 4):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(0.02 * torch.randn(1, 1 + num_patches, dim))
        self.blocks = transformer(dim, depth, heads)
        self.norm = nn.LayerNorm(dim)
        self.predict = nn.Linear(dim, pixels)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(tokens)
        n, dim = len(tokens), tokens.shape[-1]
        patches = self.mask_token.to(tokens.dtype).expand(n, self.position.shape[1] - 1, dim).clone()
        patches.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, dim), tokens[:, 1:])
        tokens = torch.cat([tokens[:, :1], patches], dim=1) + self.position
        return self.predict(self.norm(self.blocks(tokens)))[:, 1:]


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
    elif arch == "vit":
        vit = VisionTransformer(Standardize(mean, std), channels, height)
        return vit, 2 * vit.dim, True
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
