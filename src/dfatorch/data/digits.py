"""scikit-learn's bundled 8x8 ``digits`` dataset: tiny, offline, good for smoke tests."""

from __future__ import annotations

import numpy as np
import torch

from .base import DatasetSplits, ImageDataset, make_splits
from .subset import train_val_split

__all__ = ["load_digits"]


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> DatasetSplits:
    """Load the 1797 sklearn digits as uint8 (N, 1, 8, 8) images with a stratified split.

    Pixel values 0..16 are scaled to 0..255 (``round(x * 255 / 16)``). The train/test split is
    class-stratified and deterministic for a given ``seed`` (default: 20 % test, seed 0).
    """
    from sklearn.datasets import load_digits as sk_load_digits  # heavy import, only when needed

    bunch = sk_load_digits()
    pixels = np.rint(np.asarray(bunch.images, dtype=np.float64) * 255.0 / 16.0)
    images = torch.from_numpy(pixels.clip(0, 255).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    full = ImageDataset(images, labels, tuple(str(d) for d in range(10)), "digits")
    train_idx, test_idx = train_val_split(labels, test_fraction, seed)
    return make_splits(full.subset(train_idx), full.subset(test_idx))
