"""A short SimCLR run on scikit-learn's digits (1,797 real 8×8 images, shipped with sklearn).

    python -m fastssl.examples.train --steps 30

Prints the loss per step, then the kNN-5 accuracy of the trained encoder's features against
the same encoder at random initialisation (stratified 70/30 split). The bundled-trainers issue
grows this into every method; this is the foundation's end-to-end check that the losses train.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

import fastssl


def load_digits(device: torch.device):
    """Digits as (N, 1, 8, 8) float images in [0, 1] and (N,) labels."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32, device=device).unsqueeze(1) / 16.0
    return images, torch.tensor(data.target, device=device)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A batched random affine crop (rotation, scale, shift) plus pixel noise, all in torch."""
    n = images.shape[0]

    def uniform(low, high):
        return low + (high - low) * torch.rand(n, generator=generator, device=images.device)

    angle, scale = uniform(-0.35, 0.35), uniform(0.8, 1.15)
    shift_x, shift_y = uniform(-0.2, 0.2), uniform(-0.2, 0.2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    warped = F.grid_sample(images, grid, align_corners=False, padding_mode="zeros")
    noise = 0.05 * torch.randn(warped.shape, generator=generator, device=images.device)
    return (warped + noise).clamp(0, 1)


class Encoder(nn.Module):
    """A small MLP encoder (64 → 256 → 128) with a SimCLR projection head (128 → 64)."""

    def __init__(self, feature_dim: int = 128, projection_dim: int = 64):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.BatchNorm1d(256), nn.ReLU(),
                                      nn.Linear(256, feature_dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(feature_dim, projection_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


@torch.no_grad()
def knn_accuracy(encoder: Encoder, images: torch.Tensor, labels: torch.Tensor, k: int = 5, seed: int = 0) -> float:
    """kNN-k accuracy (cosine, majority vote) on a stratified 70/30 split of the backbone features."""
    from sklearn.model_selection import train_test_split

    encoder.eval()
    features = F.normalize(encoder.backbone(images), dim=1)
    index = torch.arange(len(labels)).numpy()
    train, test = train_test_split(index, test_size=0.3, stratify=labels.cpu().numpy(), random_state=seed)
    similarity = features[test] @ features[train].T
    neighbours = labels[train][similarity.topk(k, dim=1).indices]
    predicted = torch.mode(neighbours, dim=1).values
    return (predicted == labels[test]).float().mean().item()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images, labels = load_digits(device)
    encoder = Encoder().to(device)
    random_init_accuracy = knn_accuracy(encoder, images, labels, seed=args.seed)
    criterion = fastssl.NTXentLoss(temperature=args.temperature, backend=args.backend)
    optimizer = torch.optim.Adam(encoder.parameters(), lr=args.lr)
    print(f"SimCLR on digits: {len(images)} images, batch {args.batch_size}, {args.steps} steps, "
          f"backend {args.backend} on {device}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        encoder.train()
        batch = images[torch.randint(len(images), (args.batch_size,), generator=generator, device=device)]
        loss = criterion(encoder(augment(batch, generator)), encoder(augment(batch, generator)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss at step {step}")
        print(f"step {step:4d}  loss {loss.item():.4f}")
    elapsed = time.perf_counter() - start
    accuracy = knn_accuracy(encoder, images, labels, seed=args.seed)
    print(f"done in {elapsed:.1f} s; kNN-5 accuracy {100 * accuracy:.1f}% "
          f"(same encoder at random init: {100 * random_init_accuracy:.1f}%)")


if __name__ == "__main__":
    main()
