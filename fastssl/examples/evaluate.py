"""Evaluation of frozen features: kNN, a linear probe, and collapse monitors.

Protocol (the issue's): features of the un-augmented images from the backbone in eval mode, L2
normalised; kNN-5 by cosine similarity with a majority vote (ties → the smaller label) over the
train split, scored on the test split. The linear probe is an L2-regularised multinomial logistic
regression on standardised features, fitted by full-batch L-BFGS on the train split.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, as_float

Tensor = torch.Tensor


@torch.no_grad()
def embed(backbone: nn.Module, images: Tensor, device: torch.device, batch_size: int = 1024) -> Tensor:
    """Backbone features (N, F) float32 of stored images (N, C, H, W), in eval mode (the module's
    train/eval mode is restored afterwards)."""
    was_training = backbone.training
    backbone.eval()
    features = [backbone(as_float(images[i:i + batch_size].to(device))).float()
                for i in range(0, len(images), batch_size)]
    backbone.train(was_training)
    return torch.cat(features)


def knn_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor,
                 k: int = 5, chunk: int = 4096) -> float:
    """Fraction of test rows whose k nearest train rows (cosine) vote for the right label."""
    train_features = F.normalize(train_features, dim=1)
    correct = 0
    for start in range(0, len(test_features), chunk):
        queries = F.normalize(test_features[start:start + chunk], dim=1)
        neighbours = train_labels[(queries @ train_features.T).topk(k, dim=1).indices]
        correct += int((torch.mode(neighbours, dim=1).values == test_labels[start:start + chunk]).sum())
    return correct / len(test_features)


def linear_probe_accuracy(train_features: Tensor, train_labels: Tensor, test_features: Tensor,
                          test_labels: Tensor, num_classes: int, weight_decay: float = 1e-3,
                          iterations: int = 200) -> float:
    """Test accuracy of a logistic regression (weights (F, num_classes)) fitted on the train
    features; standardised with the train statistics."""
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    x_train, x_test = (train_features - mean) / std, (test_features - mean) / std
    with torch.enable_grad():
        linear = nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        optimizer = torch.optim.LBFGS(linear.parameters(), max_iter=iterations, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss = F.cross_entropy(linear(x_train), train_labels) + weight_decay * linear.weight.square().sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    with torch.no_grad():
        return (linear(x_test).argmax(1) == test_labels).float().mean().item()


def collapse_monitors(features: Tensor) -> Tuple[float, float]:
    """(mean per-dimension std of the L2-normalised rows, effective rank) of features (N, D).

    A collapsed representation has std → 0 (all rows alike) or effective rank → 1 (rows on a
    line); spread-out normalised features have std near 1/√D. Effective rank (RankMe) is
    exp(entropy) of the singular values normalised to sum 1, at most min(N, D).
    """
    normalised = F.normalize(features.float(), dim=1)
    std = normalised.std(dim=0).mean().item()
    singular = torch.linalg.svdvals(normalised)
    p = singular / singular.sum() + 1e-12
    return std, math.exp(-(p * p.log()).sum().item())


def evaluate(backbone: nn.Module, dataset: Dataset, device: torch.device) -> Dict[str, float]:
    """kNN-5 and linear-probe accuracy of the backbone's frozen features on the dataset's split."""
    train_features = embed(backbone, dataset.images[dataset.train_index], device)
    test_features = embed(backbone, dataset.images[dataset.test_index], device)
    train_labels = dataset.labels[dataset.train_index].to(device)
    test_labels = dataset.labels[dataset.test_index].to(device)
    return {
        "knn": knn_accuracy(train_features, train_labels, test_features, test_labels),
        "linear": linear_probe_accuracy(train_features, train_labels, test_features, test_labels,
                                        dataset.num_classes),
    }
