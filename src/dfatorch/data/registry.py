"""``load_dataset``: one entry point for every supported dataset, plus data-folder resolution."""

from __future__ import annotations

import os
from pathlib import Path

from .base import DataError, DatasetSplits, ImageDataset
from .cifar import load_cifar10, load_cifar100
from .digits import load_digits
from .download import REGISTRY, download_dataset, md5sum, safe_extract_tar
from .idx import FASHION_MNIST_CLASSES, MNIST_CLASSES, find_idx_folder, load_idx_folder
from .sequence import load_text, permuted

__all__ = [
    "DATASET_NAMES",
    "DATA_ENV",
    "SEQUENCE_DATASETS",
    "SYSTEM_FASHION_MNIST_DIR",
    "TEXT_DATASETS",
    "canonical_name",
    "load_dataset",
    "resolve_data_dir",
]

DATASET_NAMES: tuple[str, ...] = (
    "digits", "mnist", "fashion-mnist", "cifar10", "cifar100",
    "seq-mnist", "seq-fashion-mnist", "tinyshakespeare", "text",
)  # fmt: skip
#: Images read as sequences by a recurrent model (28 rows of 28 pixels; ``permuted``: 784 pixels).
SEQUENCE_DATASETS: tuple[str, ...] = ("seq-mnist", "seq-fashion-mnist")
#: Character-level language modelling (per-step labels): the bundled text's folder, or any file.
TEXT_DATASETS: tuple[str, ...] = ("tinyshakespeare", "text")
#: Where ``tinyshakespeare`` is looked for under the data folder.
TINYSHAKESPEARE_FILE = Path("tinyshakespeare") / "input.txt"
DATA_ENV = "DFATORCH_DATA"
DEFAULT_DATA_DIR = Path("~/.cache/dfatorch/data")
# Where the Debian package ``dataset-fashion-mnist`` installs the official files.
SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

_ALIASES = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "sequential-mnist": "seq-mnist",
    "seq-fmnist": "seq-fashion-mnist",
}


def canonical_name(name: str) -> str:
    """Normalise a dataset name (``"CIFAR-10"`` -> ``"cifar10"``); ValueError if unknown."""
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return key


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data folder: ``data_dir``, else ``$DFATORCH_DATA``, else ``~/.cache/dfatorch/data``."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    return Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def _idx_folders(name: str, root: Path) -> list[Path]:
    # Dedicated subfolders first: MNIST and Fashion-MNIST use the same file names, so the data
    # folder itself (for a data_dir pointing straight at the files) comes last.
    if name == "mnist":
        return [root / "mnist", root / "MNIST" / "raw", root]
    return [root / "fashion-mnist", root / "FashionMNIST" / "raw", SYSTEM_FASHION_MNIST_DIR, root]


def _not_found(name: str, root: Path, looked_in: list[Path]) -> DataError:
    """One line: where we looked, the CLI flags and Python arguments that fix it, and the files
    to put where for an install by hand."""
    where = ", ".join(str(p) for p in looked_in)
    spec = REGISTRY[name]
    folder = root / spec.subdir if spec.subdir else root
    files = ", ".join(f"{f.filename} (md5 {f.md5})" for f in spec.files)
    return DataError(
        f"{name} not found (looked in {where}); fetch the official files, md5-checked, with "
        f"--download (Python: download=True), or read them from another folder with --data-dir "
        f"DIR (Python: data_dir=DIR, or ${DATA_ENV}=DIR); by hand: put {files} from "
        f"{spec.base_url} in {folder}/"
    )


def _load_idx(name: str, root: Path, download: bool) -> DatasetSplits:
    folders = _idx_folders(name, root)
    folder = find_idx_folder(folders)
    if folder is None:
        if not download:
            raise _not_found(name, root, folders)
        folder = download_dataset(name, root)
    classes = MNIST_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
    return load_idx_folder(folder, name, classes)


def _ensure_cifar(name: str, root: Path, download: bool) -> Path:
    """Return the extracted CIFAR folder, extracting a local archive or downloading if needed."""
    spec = REGISTRY[name]
    assert spec.extracted is not None
    sub, members = spec.extracted
    folder = root / sub
    if all((folder / m).is_file() for m in members):
        return folder
    archive = root / spec.files[0].filename
    if archive.is_file():
        # A hand-placed official archive: verify before trusting its contents.
        got = md5sum(archive)
        if got != spec.files[0].md5:
            raise DataError(f"{archive}: md5 {got} does not match official {spec.files[0].md5}")
        safe_extract_tar(archive, root)
        return folder
    if not download:
        raise _not_found(name, root, [folder, archive])
    return download_dataset(name, root)


def _renamed(splits: DatasetSplits, name: str) -> DatasetSplits:
    def rename(data: ImageDataset) -> ImageDataset:
        return ImageDataset(data.images, data.labels, data.classes, name)

    return DatasetSplits(rename(splits.train), rename(splits.test), splits.mean, splits.std)


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    label: str = "fine",
    permute: bool = False,
    seq_len: int = 100,
    text_file: str | Path | None = None,
) -> DatasetSplits:
    """Load train/test splits of ``name`` (``digits``, ``mnist``, ``fashion-mnist``, ``cifar10``,
    ``cifar100``) as uint8 images with train-set normalisation statistics.

    Files are looked up under :func:`resolve_data_dir` (``data_dir`` / ``$DFATORCH_DATA`` /
    ``~/.cache/dfatorch/data``): ``mnist/``, ``fashion-mnist/`` (also the Debian package folder
    ``/usr/share/datasets/fashion-mnist``, and the IDX files directly in the data folder),
    ``cifar-10-batches-py/``, ``cifar-100-python/`` (or the official ``.tar.gz`` there, which is
    md5-checked and extracted).
    With ``download=True`` missing files are fetched and md5-checked; otherwise a
    :class:`DataError` says exactly which files to put where. ``label`` selects CIFAR-100's
    ``"fine"`` (100) or ``"coarse"`` (20) classes and is ignored by other datasets.

    Sequences (:mod:`dfatorch.data.sequence`): ``seq-mnist`` and ``seq-fashion-mnist`` are the
    IDX images found as above, read by a recurrent model as 28 steps of 28 pixels; with
    ``permute=True`` as 784 steps of one pixel in a fixed random order. ``tinyshakespeare``
    (``<data folder>/tinyshakespeare/input.txt``) and ``text`` (the file ``text_file``) are
    character-level language modelling: windows of ``seq_len`` characters, the first 90% of the
    text for training and the last 10% for the test.
    """
    key = canonical_name(name)
    if label not in ("fine", "coarse"):
        raise ValueError(f"label must be 'fine' or 'coarse', got {label!r}")
    if permute and key not in SEQUENCE_DATASETS:
        raise ValueError(f"permute applies to {', '.join(SEQUENCE_DATASETS)}, not {key}")
    if text_file is not None and key != "text":
        raise ValueError(f"text_file applies to the dataset 'text', not {key}")
    if key == "text":
        if text_file is None:
            raise ValueError("dataset 'text' needs a text file: --text-file PATH (text_file=)")
        return load_text(Path(text_file).expanduser(), seq_len, name="text")
    if key == "digits":
        return load_digits()
    root = resolve_data_dir(data_dir)
    if key == "tinyshakespeare":
        path = root / TINYSHAKESPEARE_FILE
        if not path.is_file():
            raise DataError(
                f"tinyshakespeare not found ({path}); put Karpathy's char-rnn input.txt there, or "
                f"point --data-dir (Python: data_dir=, or ${DATA_ENV}) at a folder holding "
                f"{TINYSHAKESPEARE_FILE}, or train on any file with --dataset text --text-file PATH"
            )
        return load_text(path, seq_len, name="tinyshakespeare")
    if key in SEQUENCE_DATASETS:
        image_name = key.removeprefix("seq-")
        splits = _load_idx(image_name, root, download)
        splits = permuted(splits) if permute else splits
        return _renamed(splits, key)
    if key in ("mnist", "fashion-mnist"):
        return _load_idx(key, root, download)
    if key == "cifar10":
        return load_cifar10(_ensure_cifar(key, root, download))
    assert key == "cifar100"
    return load_cifar100(_ensure_cifar(key, root, download), label=label)
