"""Containers for image classification data: :class:`ImageDataset`, :class:`DatasetSplits`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["DataError", "DatasetSplits", "ImageDataset", "channel_stats", "make_splits"]


class DataError(ValueError):
    """A data file is missing, corrupted or does not match its format.

    The message always names the file (or folder) and says what is wrong with it.
    """


# eq=False: the generated __eq__ would compare tensors elementwise and fail on truth-testing.
@dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory image classification dataset.

    Attributes:
        images: uint8 tensor of shape (N, C, H, W), pixel values 0..255.
        labels: int64 tensor of shape (N,), values in ``0 .. len(classes) - 1``; or (N, T), a
            label per time step (character-level language modelling: the next character).
        classes: human-readable class names; the label ``i`` means ``classes[i]``.
        name: short dataset name (``"cifar10"``, ``"mnist"``...), used in logs and errors.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"{self.name}: images must be uint8 (N, C, H, W), "
                f"got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() not in (1, 2):
            raise ValueError(
                f"{self.name}: labels must be int64 (N,) or (N, T), "
                f"got {self.labels.dtype} {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(
                f"{self.name}: {self.images.shape[0]} images but {self.labels.shape[0]} labels"
            )
        if not isinstance(self.classes, tuple):
            # Accept lists but store a tuple, so the dataset stays immutable.
            object.__setattr__(self, "classes", tuple(self.classes))
        if self.labels.numel() and (
            int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)
        ):
            raise ValueError(
                f"{self.name}: labels must lie in 0..{len(self.classes) - 1}, got "
                f"{int(self.labels.min())}..{int(self.labels.max())}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, n={len(self)}, shape={self.shape}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(classes)``)."""
        return len(self.classes)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        c, h, w = self.images.shape[1:]
        return (int(c), int(h), int(w))

    def subset(self, indices: torch.Tensor | Sequence[int]) -> ImageDataset:
        """Return a new dataset with the examples at ``indices`` (in that order)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return ImageDataset(self.images[idx], self.labels[idx], self.classes, self.name)

    def class_counts(self) -> torch.Tensor:
        """Number of examples per class, int64 tensor of shape (num_classes,)."""
        return torch.bincount(self.labels.flatten(), minlength=self.num_classes)


def channel_stats(
    images: torch.Tensor, chunk: int = 4096
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images (N, C, H, W) in [0, 1] units.

    Accumulates in float64 over chunks so that 50 000 CIFAR images need no multi-GB temporaries.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += x.sum(dim=(0, 2, 3)).cpu()
        total_sq += x.square().sum(dim=(0, 2, 3)).cpu()
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


@dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Train and test sets plus the per-channel mean/std of the TRAIN images in [0, 1] units."""

    train: ImageDataset
    test: ImageDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.train.shape != self.test.shape:
            raise ValueError(f"train shape {self.train.shape} != test shape {self.test.shape}")
        if self.train.classes != self.test.classes:
            raise ValueError("train and test sets have different class lists")
        if not len(self.mean) == len(self.std) == self.train.shape[0]:
            raise ValueError(
                f"mean/std need one value per channel ({self.train.shape[0]}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape of one image, ``(C, H, W)``."""
        return self.train.shape

    @property
    def name(self) -> str:
        """Name of the dataset (the train set's name)."""
        return self.train.name

    @property
    def per_step(self) -> bool:
        """Labels per time step ``(N, T)`` (language modelling): the inputs are token ids."""
        return self.train.labels.dim() == 2


def make_splits(train: ImageDataset, test: ImageDataset) -> DatasetSplits:
    """Bundle train and test sets, computing the normalisation statistics on ``train`` only."""
    mean, std = channel_stats(train.images)
    return DatasetSplits(train=train, test=test, mean=mean, std=std)
