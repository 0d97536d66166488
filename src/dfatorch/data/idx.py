"""Reader for the IDX files of MNIST and Fashion-MNIST (gzip-compressed or raw)."""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from .base import DataError, DatasetSplits, ImageDataset, make_splits

__all__ = [
    "FASHION_MNIST_CLASSES",
    "IDX_FILES",
    "MNIST_CLASSES",
    "find_idx_folder",
    "load_idx_folder",
    "read_idx_images",
    "read_idx_labels",
]

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
GZIP_MAGIC = b"\x1f\x8b"

# Official file names (without ".gz"), per split: (images, labels).
IDX_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

MNIST_CLASSES: tuple[str, ...] = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _read_bytes(path: Path) -> bytes:
    """Return the (decompressed) content of ``path``; gzip is detected by its magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc})") from exc
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupted or truncated gzip data ({exc})") from exc


def _parse_idx(path: Path, magic: int, ndim: int) -> tuple[tuple[int, ...], np.ndarray]:
    """Check the IDX header of ``path`` and return ``(dims, flat uint8 payload)``."""
    data = _read_bytes(path)
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: file too short for an IDX header ({len(data)} bytes, need {header})"
        )
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise DataError(
            f"{path}: bad IDX magic number {got} (expected {magic}); "
            "not an MNIST-style file, or images and labels swapped"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    if len(data) - header != expected:
        raise DataError(
            f"{path}: header announces dims {dims} = {expected} bytes of data, "
            f"but the file holds {len(data) - header} (truncated or corrupted)"
        )
    return dims, np.frombuffer(data, dtype=np.uint8, offset=header)


def read_idx_images(path: str | Path) -> torch.Tensor:
    """Read an IDX image file (magic 2051) into a uint8 tensor of shape (N, 1, H, W)."""
    path = Path(path)
    (n, h, w), payload = _parse_idx(path, IMAGES_MAGIC, 3)
    if h == 0 or w == 0:
        raise DataError(f"{path}: images have an empty size {h}x{w}")
    # copy(): frombuffer views are read-only, which torch warns about.
    return torch.from_numpy(payload.reshape(n, 1, h, w).copy())


def read_idx_labels(path: str | Path, num_classes: int = 10) -> torch.Tensor:
    """Read an IDX label file (magic 2049) into int64 (N,); labels must be < ``num_classes``."""
    path = Path(path)
    _, payload = _parse_idx(path, LABELS_MAGIC, 1)
    if payload.size and int(payload.max()) >= num_classes:
        bad = int(np.argmax(payload >= num_classes))
        raise DataError(
            f"{path}: label {int(payload[bad])} at index {bad} is out of range 0..{num_classes - 1}"
        )
    return torch.from_numpy(payload.astype(np.int64))


def _candidates(folder: Path, stem: str) -> list[Path]:
    # Accept the official ".gz" name, the decompressed name, and the common "." variant.
    names = [f"{stem}.gz", stem]
    dotted = stem.replace("-idx", ".idx")
    names += [f"{dotted}.gz", dotted]
    return [folder / n for n in names]


def _find_file(folder: Path, stem: str) -> Path | None:
    return next((p for p in _candidates(folder, stem) if p.is_file()), None)


def find_idx_folder(folders: Iterable[str | Path]) -> Path | None:
    """Return the first folder holding all four IDX files (gz or raw), or None."""
    for folder in folders:
        folder = Path(folder)
        stems = [s for pair in IDX_FILES.values() for s in pair]
        if all(_find_file(folder, s) is not None for s in stems):
            return folder
    return None


def _load_split(folder: Path, split: str, classes: Sequence[str], name: str) -> ImageDataset:
    img_stem, lbl_stem = IDX_FILES[split]
    img_path, lbl_path = _find_file(folder, img_stem), _find_file(folder, lbl_stem)
    if img_path is None or lbl_path is None:
        missing = img_stem if img_path is None else lbl_stem
        raise DataError(f"{folder}: missing {missing}.gz (or {missing})")
    images = read_idx_images(img_path)
    labels = read_idx_labels(lbl_path, len(classes))
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} holds {images.shape[0]} images but {lbl_path} holds "
            f"{labels.shape[0]} labels"
        )
    return ImageDataset(images, labels, tuple(classes), name)


def load_idx_folder(folder: str | Path, name: str, classes: Sequence[str]) -> DatasetSplits:
    """Load train and test splits from the four official IDX files in ``folder``."""
    folder = Path(folder)
    train = _load_split(folder, "train", classes, name)
    test = _load_split(folder, "test", classes, name)
    if train.shape != test.shape:
        raise DataError(f"{folder}: train images are {train.shape} but test images {test.shape}")
    return make_splits(train, test)
