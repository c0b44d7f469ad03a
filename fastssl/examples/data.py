"""Datasets for the example trainers, held in memory as one image tensor.

* default: scikit-learn's digits (1,797 real 8×8 grey images of handwritten digits; ships with
  scikit-learn, no download);
* ``--data DIR`` holding CIFAR-10's python batches (``data_batch_1`` … ``data_batch_5``,
  ``test_batch``): its own 50,000 / 10,000 train / test split;
* ``--data DIR`` in ImageFolder layout (``DIR/<class>/<image>``): read with Pillow (imported
  only then), resized to ``image_size``; stratified 70/30 split.

Labels are used only by the evaluation (kNN and linear probe), never by training.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Optional

import numpy as np
import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclasses.dataclass
class Dataset:
    """Images (N, C, H, W) — float32 in [0, 1], or uint8 for large sets — and labels (N,) int64.

    ``train_index`` / ``test_index``: the evaluation protocol's split (pre-training uses only
    ``train_index``). ``natural``: photographs, where horizontal flips and colour jitter make sense
    (not for digits).
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    train_index: torch.Tensor
    test_index: torch.Tensor
    natural: bool

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1


def stratified_split(labels: torch.Tensor, test_fraction: float = 0.3, seed: int = 0):
    """The protocol's split: stratified by label, ``test_fraction`` held out, sklearn's seeded
    shuffle. Returns (train_index, test_index) as int64 tensors."""
    from sklearn.model_selection import train_test_split

    index = np.arange(len(labels))
    train, test = train_test_split(index, test_size=test_fraction, stratify=labels.cpu().numpy(),
                                   random_state=seed)
    return torch.from_numpy(train), torch.from_numpy(test)


def validation_split(dataset: Dataset, fraction: float = 0.3, seed: int = 1) -> Dataset:
    """The same data with the test split replaced by a stratified part of the train split, for
    choosing hyper-parameters without looking at the test split."""
    inner_train, validation = stratified_split(dataset.labels[dataset.train_index], fraction, seed)
    return dataclasses.replace(dataset, train_index=dataset.train_index[inner_train],
                               test_index=dataset.train_index[validation])


def load_digits() -> Dataset:
    """scikit-learn's digits: 1,797 images (1, 8, 8) with 17 grey levels, scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target, dtype=torch.int64)
    train, test = stratified_split(labels)
    return Dataset("digits", images, labels, train, test, natural=False)


def load_cifar10(directory: Path) -> Dataset:
    """CIFAR-10's python batches: 60,000 uint8 images (3, 32, 32); the first 50,000 train."""
    parts, labels = [], []
    files = sorted(directory.glob("data_batch_*")) + [directory / "test_batch"]
    for path in files:
        with open(path, "rb") as handle:
            batch = pickle.load(handle, encoding="bytes")
        parts.append(torch.from_numpy(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
        labels.append(torch.tensor(batch[b"labels"], dtype=torch.int64))
    images, labels = torch.cat(parts), torch.cat(labels)
    num_train = len(images) - len(parts[-1])
    return Dataset("cifar10", images, labels, torch.arange(num_train), torch.arange(num_train, len(images)),
                   natural=True)


def load_image_folder(directory: Path, image_size: int) -> Dataset:
    """``directory/<class>/<image>`` read with Pillow as RGB, resized to image_size², uint8."""
    try:
        from PIL import Image
    except ImportError as error:  # Pillow is needed only for this layout
        raise ImportError("--data with an image folder needs Pillow: pip install pillow") from error

    classes = sorted(p.name for p in directory.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((directory / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(path) as image:
                    image = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
                    images.append(torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1))
                labels.append(label)
    counts = torch.bincount(torch.tensor(labels, dtype=torch.int64), minlength=len(classes)) if labels else None
    if counts is None or len(classes) < 2 or int(counts.min()) < 2:
        raise ValueError(f"--data {directory} must hold at least two class folders with at least two images "
                         f"each (ImageFolder layout DIR/<class>/<image>), found classes {classes} with "
                         f"{None if counts is None else counts.tolist()} images")
    labels = torch.tensor(labels, dtype=torch.int64)
    train, test = stratified_split(labels)
    return Dataset(directory.name, torch.stack(images), labels, train, test, natural=True)


def load(data: Optional[str], image_size: int = 32) -> Dataset:
    """Digits when ``data`` is None; otherwise CIFAR-10 batches or an image folder at that path."""
    if data is None:
        return load_digits()
    directory = Path(data)
    if not directory.is_dir():
        raise ValueError(f"--data must be a directory (CIFAR-10 python batches or DIR/<class>/<image>), "
                         f"got {data!r}")
    if (directory / "data_batch_1").exists():
        return load_cifar10(directory)
    return load_image_folder(directory, image_size)


def as_float(images: torch.Tensor) -> torch.Tensor:
    """A batch of stored images → float32 in [0, 1] (uint8 storage keeps large sets small)."""
    return images.float() / 255.0 if images.dtype == torch.uint8 else images
