"""Datasets for dfatorch: loaders for the official files, safe downloads, batching, augmentation.

Typical use::

    from dfatorch.data import BatchLoader, load_dataset

    splits = load_dataset("cifar10")  # DataError explains where to put the files if missing
    train = BatchLoader(splits.train, 128, shuffle=True, augment=True,
                        mean=splits.mean, std=splits.std, seed=0, device="cuda")
"""

from __future__ import annotations

from .base import DataError, DatasetSplits, ImageDataset, channel_stats, make_splits
from .cifar import RestrictedUnpickler, load_cifar10, load_cifar100, load_pickle
from .digits import load_digits
from .download import (
    REGISTRY,
    DownloadError,
    download_dataset,
    download_file,
    manual_instructions,
    md5sum,
    safe_extract_tar,
)
from .idx import load_idx_folder, read_idx_images, read_idx_labels
from .loader import (
    BatchLoader,
    crop,
    derive_seed,
    flip,
    normalize,
    random_crop,
    random_crop_offsets,
    random_flip,
    random_flip_mask,
)
from .registry import DATASET_NAMES, canonical_name, load_dataset, resolve_data_dir
from .sequence import load_text, permuted
from .subset import stratified_subset, subset_and_holdout, train_val_split

__all__ = [
    "DATASET_NAMES",
    "REGISTRY",
    "BatchLoader",
    "DataError",
    "DatasetSplits",
    "DownloadError",
    "ImageDataset",
    "RestrictedUnpickler",
    "canonical_name",
    "channel_stats",
    "crop",
    "derive_seed",
    "download_dataset",
    "download_file",
    "flip",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_idx_folder",
    "load_pickle",
    "load_text",
    "make_splits",
    "manual_instructions",
    "md5sum",
    "normalize",
    "permuted",
    "random_crop",
    "random_crop_offsets",
    "random_flip",
    "random_flip_mask",
    "read_idx_images",
    "read_idx_labels",
    "resolve_data_dir",
    "safe_extract_tar",
    "stratified_subset",
    "subset_and_holdout",
    "train_val_split",
]
