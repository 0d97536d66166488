"""CIFAR-10 / CIFAR-100 loaders for the official python pickles, read with a restricted unpickler.

The official files are pickles, and ``pickle.load`` on a downloaded file can run arbitrary code.
:class:`RestrictedUnpickler` only resolves the few globals that numpy array pickles need, so a
tampered file fails with :class:`DataError` instead of executing anything.
"""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataError, DatasetSplits, ImageDataset, make_splits

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

__all__ = [
    "CIFAR10_DIRNAME",
    "CIFAR100_DIRNAME",
    "RestrictedUnpickler",
    "load_cifar10",
    "load_cifar100",
    "load_pickle",
]

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR100_DIRNAME = "cifar-100-python"
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN_FILES, "test_batch", "batches.meta")
CIFAR100_FILES = ("train", "test", "meta")
_PIXELS = 3 * 32 * 32


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only numpy array reconstruction globals.

    Allowed: ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``
    (ndarray subtype only), ``numpy.ndarray``, ``numpy.dtype`` (no object dtypes) and
    ``_codecs.encode`` restricted to latin-1 (Python 3 writes bytes that way with protocol 2,
    as the CIFAR-10 rebuild script does). Anything else raises :class:`DataError`.
    """

    def __init__(self, file: Any, path: str | Path, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self._path = Path(path)

    def find_class(self, module: str, name: str) -> Any:
        """Return one of the allowed callables, or raise DataError naming the forbidden global."""
        path = self._path

        def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
            if subtype is not np.ndarray:
                raise DataError(f"{path}: forbidden array subtype {subtype!r} in pickle")
            return _np_reconstruct(subtype, shape, dtype)

        def make_dtype(*args: Any) -> np.dtype:
            dt = np.dtype(*args)
            if dt.hasobject:  # object arrays could smuggle arbitrary pickled objects
                raise DataError(f"{path}: forbidden object dtype in pickle")
            return dt

        def latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
            if not isinstance(obj, str) or encoding.lower().replace("-", "") != "latin1":
                raise DataError(f"{path}: forbidden _codecs.encode(..., {encoding!r}) in pickle")
            return codecs.encode(obj, "latin1", errors)

        allowed = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): make_dtype,
            ("_codecs", "encode"): latin1_encode,
        }
        try:
            return allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{path}: refusing to unpickle forbidden global {module}.{name} "
                "(the file is corrupted or malicious; CIFAR pickles only contain numpy arrays)"
            ) from None


def load_pickle(path: str | Path) -> Any:
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (latin-1 for Python 2 strings)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return RestrictedUnpickler(f, path, encoding="latin1").load()
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except MemoryError:
        raise
    except Exception as exc:  # truncated / garbled pickles raise a zoo of exception types
        raise DataError(
            f"{path}: cannot unpickle ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupted"
        ) from exc


def _as_str(value: Any) -> str:
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _load_dict(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    """Load a pickled dict, decode its keys to str, and check that ``required`` keys exist."""
    obj = load_pickle(path)
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}")
    out = {_as_str(k): v for k, v in obj.items()}
    missing = [k for k in required if k not in out]
    if missing:
        raise DataError(f"{path}: missing key(s) {missing}; found {sorted(out)}")
    return out


def _check_data(path: Path, data: Any, expected_n: int) -> np.ndarray:
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, {_PIXELS}), got {desc}")
    if data.shape != (expected_n, _PIXELS):
        raise DataError(
            f"{path}: 'data' has shape {data.shape}, expected ({expected_n}, {_PIXELS}) "
            "(wrong or truncated batch)"
        )
    return data


def _check_labels(path: Path, key: str, labels: Any, n: int, num_classes: int) -> np.ndarray:
    try:
        arr = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{path}: {key!r} is not a label sequence ({exc})") from exc
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise DataError(f"{path}: {key!r} must be a flat list of ints, got {arr.dtype} {arr.shape}")
    if arr.shape[0] != n:
        raise DataError(f"{path}: {arr.shape[0]} labels in {key!r} but {n} images")
    if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
        bad = int(np.argmax((arr < 0) | (arr >= num_classes)))
        raise DataError(
            f"{path}: label {int(arr[bad])} at index {bad} in {key!r} "
            f"is out of range 0..{num_classes - 1}"
        )
    return arr.astype(np.int64)


def _names(path: Path, meta: dict[str, Any], key: str, count: int) -> tuple[str, ...]:
    names = meta[key]
    if not isinstance(names, (list, tuple)) or len(names) != count:
        got = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(f"{path}: {key!r} should list {count} class names, got {got}")
    return tuple(_as_str(n) for n in names)


def _to_tensors(data: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Rows are channel-major: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels)


def _resolve(root: str | Path, dirname: str) -> Path:
    """Accept either the dataset folder itself or the folder containing it."""
    root = Path(root)
    return root / dirname if (root / dirname).is_dir() else root


def _require_files(folder: Path, names: tuple[str, ...], dataset: str) -> None:
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise DataError(f"{folder}: {dataset} file(s) missing: {', '.join(missing)}")


def load_cifar10(root: str | Path) -> DatasetSplits:
    """Load CIFAR-10 from ``root`` (the ``cifar-10-batches-py`` folder or its parent).

    Returns 50 000 train and 10 000 test images, uint8 (N, 3, 32, 32), 10 classes.
    """
    folder = _resolve(root, CIFAR10_DIRNAME)
    _require_files(folder, CIFAR10_FILES, "CIFAR-10")
    meta_path = folder / "batches.meta"
    classes = _names(meta_path, _load_dict(meta_path, ("label_names",)), "label_names", 10)

    def load(names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
        datas, labels = [], []
        for name in names:
            path = folder / name
            batch = _load_dict(path, ("data", "labels"))
            datas.append(_check_data(path, batch["data"], 10_000))
            labels.append(_check_labels(path, "labels", batch["labels"], 10_000, 10))
        return np.concatenate(datas), np.concatenate(labels)

    train = ImageDataset(*_to_tensors(*load(CIFAR10_TRAIN_FILES)), classes, "cifar10")
    test = ImageDataset(*_to_tensors(*load(("test_batch",))), classes, "cifar10")
    return make_splits(train, test)


def load_cifar100(root: str | Path, label: str = "fine") -> DatasetSplits:
    """Load CIFAR-100 from ``root`` (the ``cifar-100-python`` folder or its parent).

    ``label="fine"`` gives the 100 fine classes, ``label="coarse"`` the 20 superclasses.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    folder = _resolve(root, CIFAR100_DIRNAME)
    _require_files(folder, CIFAR100_FILES, "CIFAR-100")
    counts = {"fine": 100, "coarse": 20}
    key, count = f"{label}_labels", counts[label]
    meta_path = folder / "meta"
    meta = _load_dict(meta_path, ("fine_label_names", "coarse_label_names"))
    classes = _names(meta_path, meta, f"{label}_label_names", count)

    def load(name: str, n: int) -> ImageDataset:
        path = folder / name
        batch = _load_dict(path, ("data", "fine_labels", "coarse_labels"))
        data = _check_data(path, batch["data"], n)
        labels = _check_labels(path, key, batch[key], n, count)
        # Validate the other label set too: a damaged file should fail whichever view is asked.
        other = "coarse" if label == "fine" else "fine"
        _check_labels(path, f"{other}_labels", batch[f"{other}_labels"], n, counts[other])
        ds_name = "cifar100" if label == "fine" else "cifar100-coarse"
        return ImageDataset(*_to_tensors(data, labels), classes, ds_name)

    return make_splits(load("train", 50_000), load("test", 10_000))
