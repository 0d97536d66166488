"""Sequence data: images read row by row (sequential MNIST), pixel-permuted sequences, and
character-level language modelling from a text file.

Everything stays an :class:`~dfatorch.data.base.ImageDataset`, so that subsets, batching and
normalisation are shared with the image datasets; a recurrent model reads an input ``(N, C, H,
W)`` as ``H`` time steps of ``C W`` features (see :class:`dfatorch.models.RecurrentNet`):

- sequential (Fashion-)MNIST: the images as they are, ``(1, 28, 28)``: 28 steps of 28 pixels;
- permuted: ``(1, 784, 1)``, 784 steps of one pixel, the pixels in a fixed order drawn from
  :data:`PERMUTATION_SEED` (the same for every run, so that runs are comparable);
- text: ``(1, T, 1)`` windows of character ids (uint8, a vocabulary of at most 256 characters,
  sorted), with per-step labels ``(N, T)``: the next character at every step. The first 90% of
  the text gives the training windows, the last 10% the test windows (non-overlapping, the
  remainder shorter than ``T + 1`` characters dropped). Normalisation is the identity on ids
  (mean 0, std 1/255), so a model receives the ids as floats.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .base import DataError, DatasetSplits, ImageDataset

__all__ = ["PERMUTATION_SEED", "TEXT_TRAIN_SHARE", "load_text", "permuted", "text_windows"]

#: Seed of the fixed pixel permutation of permuted sequential datasets.
PERMUTATION_SEED = 0
#: The share of a text used for training (the rest is the test text).
TEXT_TRAIN_SHARE = 0.9


def permuted(splits: DatasetSplits, seed: int = PERMUTATION_SEED) -> DatasetSplits:
    """``splits`` as pixel sequences ``(C, H W, 1)``, the pixels of every image in the same
    seeded random order (one permutation for train and test)."""
    c, h, w = splits.input_shape
    order = torch.randperm(h * w, generator=torch.Generator().manual_seed(seed))

    def apply(data: ImageDataset) -> ImageDataset:
        images = data.images.reshape(len(data), c, h * w)[:, :, order].reshape(-1, c, h * w, 1)
        return ImageDataset(images.contiguous(), data.labels, data.classes, data.name)

    return DatasetSplits(apply(splits.train), apply(splits.test), splits.mean, splits.std)


def text_windows(
    ids: torch.Tensor, seq_len: int, classes: tuple[str, ...], name: str
) -> ImageDataset:
    """Non-overlapping windows of ``seq_len`` ids ``(N, 1, T, 1)`` and their next ids ``(N, T)``."""
    count = (len(ids) - 1) // seq_len
    if count < 1:
        raise DataError(f"{name}: {len(ids)} characters, too few for one window of {seq_len} + 1")
    used = ids[: count * seq_len + 1]
    inputs = used[:-1].reshape(count, 1, seq_len, 1)
    targets = used[1:].reshape(count, seq_len).to(torch.int64)
    return ImageDataset(inputs.contiguous(), targets.contiguous(), classes, name)


def load_text(path: Path, seq_len: int, name: str = "text") -> DatasetSplits:
    """Character-level language modelling on the UTF-8 text file ``path`` (see the module)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: text file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(codes)
    if len(vocab) > 256:
        raise DataError(f"{path}: {len(vocab)} distinct characters; at most 256 are supported")
    ids = torch.from_numpy(np.searchsorted(vocab, codes).astype(np.uint8))
    classes = tuple(chr(int(c)) for c in vocab)
    split = int(len(ids) * TEXT_TRAIN_SHARE)
    train = text_windows(ids[:split], seq_len, classes, name)
    test = text_windows(ids[split:], seq_len, classes, name)
    return DatasetSplits(train, test, mean=(0.0,), std=(1 / 255,))
