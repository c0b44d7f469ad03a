"""Batched image augmentations in plain torch (no torchvision): one affine grid per image, so a
whole batch of views is a single ``grid_sample`` on CPU or GPU.

Each view: random resized crop with a small rotation (and horizontal flip for photographs), then
brightness / contrast jitter (plus saturation and grey-scale for colour images), then Gaussian
pixel noise. Multi-crop (SwAV, DINO) adds smaller local crops at a lower resolution.
All randomness comes from the ``torch.Generator`` passed in, so a seed fixes every view.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def stream_seed(*keys: int) -> int:
    """A seed for an independent random stream per tuple of integer ``keys`` (such as seed,
    epoch, rank), so a resumed run draws what the uninterrupted one drew."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


def _uniform(like: Tensor, low: float, high: float, generator: torch.Generator) -> Tensor:
    """(N,) uniform samples in [low, high), on ``like``'s device and in its dtype, N = len(like)."""
    return low + (high - low) * torch.rand(like.shape[0], generator=generator, device=like.device, dtype=like.dtype)


def random_resized_crop(images: Tensor, size: int, scale: Tuple[float, float], ratio: Tuple[float, float],
                        max_rotation: float, flip: bool, generator: torch.Generator, padding_mode: str) -> Tensor:
    """(N, C, H, W) → (N, C, size, size): per image, a crop of area fraction ~ U(scale) (above 1
    zooms out), aspect ratio log-uniform in ``ratio``, placed anywhere inside the image (centred
    when larger than it), rotated by U(±max_rotation) radians, optionally mirrored."""
    n = images.shape[0]
    area = _uniform(images, *scale, generator)
    log_ratio = _uniform(images, math.log(ratio[0]), math.log(ratio[1]), generator)
    width, height = torch.sqrt(area * log_ratio.exp()), torch.sqrt(area / log_ratio.exp())
    # affine_grid works in [-1, 1] coordinates: a crop of relative width w spans w there too.
    centre_x = _uniform(images, -1.0, 1.0, generator) * (1 - width).clamp(min=0)
    centre_y = _uniform(images, -1.0, 1.0, generator) * (1 - height).clamp(min=0)
    angle = _uniform(images, -max_rotation, max_rotation, generator)
    mirror = torch.ones_like(angle)
    if flip:
        mirror = torch.where(_uniform(images, 0.0, 1.0, generator) < 0.5, -mirror, mirror)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([width * cos * mirror, -height * sin, centre_x], dim=1),
        torch.stack([width * sin * mirror, height * cos, centre_y], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode=padding_mode, align_corners=False)


def color_jitter(images: Tensor, strength: float, grayscale_probability: float, generator: torch.Generator) -> Tensor:
    """Per-image brightness and contrast factors in [1 − s, 1 + s]; for 3 channels also
    saturation, and grey-scale with ``grayscale_probability``. Values stay in [0, 1]."""
    n = images.shape[0]

    def factor():
        return _uniform(images, 1 - strength, 1 + strength, generator).view(n, 1, 1, 1)

    images = images * factor()
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * factor() + mean
    if images.shape[1] == 3:
        grey = (images * images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        images = (images - grey) * factor() + grey
        to_grey = (_uniform(images, 0.0, 1.0, generator) < grayscale_probability).view(n, 1, 1, 1)
        images = torch.where(to_grey, grey.expand_as(images), images)
    return images.clamp(0, 1)


@dataclasses.dataclass
class Augment:
    """Makes ``global_crops`` views at the image size and ``local_crops`` smaller views.

    Call with a float batch (N, C, H, W) in [0, 1] and a generator; returns the list of views,
    global crops first (each (N, C, H, W); local crops (N, C, local_size, local_size)).
    """

    image_size: int
    natural: bool
    global_crops: int = 2
    local_crops: int = 0
    local_size: int = 0
    global_scale: Tuple[float, float] = (0.5, 1.2)
    local_scale: Tuple[float, float] = (0.35, 0.7)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    max_rotation: float = 0.3
    jitter: float = 0.4
    grayscale_probability: float = 0.2
    noise: float = 0.05

    def view(self, images: Tensor, size: int, scale: Sequence[float], generator: torch.Generator) -> Tensor:
        # Digits sit on a black background: zero padding is the background; photographs reflect.
        padding = "reflection" if self.natural else "zeros"
        out = random_resized_crop(images, size, tuple(scale), self.ratio, self.max_rotation, self.natural,
                                  generator, padding)
        out = color_jitter(out, self.jitter, self.grayscale_probability, generator)
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        return (out + self.noise * noise).clamp(0, 1)

    def __call__(self, images: Tensor, generator: torch.Generator) -> List[Tensor]:
        views = [self.view(images, self.image_size, self.global_scale, generator) for _ in range(self.global_crops)]
        views += [self.view(images, self.local_size, self.local_scale, generator) for _ in range(self.local_crops)]
        return views
