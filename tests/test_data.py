"""Tests for dfatorch.data: readers, safety checks, downloads, subsets, augmentation, batching."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dfatorch.data import (
    REGISTRY,
    BatchLoader,
    DataError,
    DatasetSplits,
    DownloadError,
    ImageDataset,
    canonical_name,
    channel_stats,
    crop,
    download_dataset,
    download_file,
    flip,
    load_cifar10,
    load_cifar100,
    load_dataset,
    load_digits,
    load_idx_folder,
    load_pickle,
    md5sum,
    normalize,
    random_crop,
    random_crop_offsets,
    random_flip,
    random_flip_mask,
    read_idx_images,
    read_idx_labels,
    resolve_data_dir,
    safe_extract_tar,
    stratified_subset,
    subset_and_holdout,
    train_val_split,
)
from dfatorch.data.download import RemoteDataset, RemoteFile
from dfatorch.data.idx import MNIST_CLASSES

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------- helpers


def write_idx(path: Path, magic: int, dims: tuple[int, ...], payload: bytes, gz: bool) -> Path:
    """Write an IDX file (optionally gzip-compressed) with an arbitrary header and payload."""
    raw = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_idx_pair(
    folder: Path, prefix: str, n: int, *, gz: bool = True, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Write ``{prefix}-images-idx3-ubyte[.gz]`` and labels with ``n`` random 28x28 images."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    suffix = ".gz" if gz else ""
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(
        folder / f"{prefix}-images-idx3-ubyte{suffix}", 2051, (n, 28, 28), images.tobytes(), gz
    )
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, (n,), labels.tobytes(), gz)
    return images, labels


def write_mnist_folder(folder: Path, *, gz: bool = True) -> None:
    write_idx_pair(folder, "train", 30, gz=gz, seed=0)
    write_idx_pair(folder, "t10k", 20, gz=gz, seed=1)


def write_cifar10_meta(folder: Path) -> None:
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer"]
    names += [b"dog", b"frog", b"horse", b"ship", b"truck"]
    meta = {b"num_cases_per_batch": 10000, b"label_names": names, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def write_fake_cifar10(folder: Path, batch: dict) -> Path:
    """A CIFAR-10 folder whose data_batch_1 is ``batch`` and whose other files are stubs.

    The loader checks data_batch_1 before any other batch, so the stubs are never parsed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    write_cifar10_meta(folder)
    for name in [f"data_batch_{i}" for i in range(2, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"stub")
    path = folder / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return path


class _Evil:
    """Pickles as a call to os.system: what a malicious dataset file would contain."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return (os.system, (self.command,))


def random_dataset(n: int = 100, shape: tuple[int, int, int] = (3, 8, 8)) -> ImageDataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, *shape), generator=gen, dtype=torch.uint8)
    labels = torch.arange(n) % 10
    return ImageDataset(images, labels, tuple(str(i) for i in range(10)), "random")


def make_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server on 127.0.0.1 serving a temporary folder: yields (folder, base URL)."""
    root = tmp_path / "srv"
    root.mkdir()

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """URL of a local port nothing listens on: connecting fails at once, like being offline."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


# --------------------------------------------------------------------------- containers


def test_image_dataset_basics_and_validation() -> None:
    ds = random_dataset(20)
    assert len(ds) == 20 and ds.num_classes == 10 and ds.shape == (3, 8, 8)
    sub = ds.subset(torch.tensor([3, 1]))
    assert torch.equal(sub.images, ds.images[[3, 1]]) and sub.labels.tolist() == [3, 1]
    assert ds.class_counts().tolist() == [2] * 10
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(ds.images.float(), ds.labels, ds.classes, "x")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(ds.images, ds.labels[:5], ds.classes, "x")
    with pytest.raises(ValueError, match=r"0\.\.9"):
        ImageDataset(ds.images, ds.labels + 1, ds.classes, "x")


def test_channel_stats_and_splits() -> None:
    ds = random_dataset(50)
    mean, std = channel_stats(ds.images, chunk=7)  # chunking must not change the result
    x = ds.images.double() / 255
    assert np.allclose(mean, x.mean(dim=(0, 2, 3)).numpy())
    assert np.allclose(std, x.std(dim=(0, 2, 3), unbiased=False).numpy())
    splits = DatasetSplits(ds, ds.subset(range(5)), mean, std)
    assert splits.num_classes == 10 and splits.input_shape == (3, 8, 8)


# --------------------------------------------------------------------------- restricted unpickler


def test_restricted_unpickler_refuses_os_system(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _Evil(f"touch {marker}")}, protocol=2))
    with pytest.raises(DataError) as info:
        load_pickle(path)
    msg = str(info.value)
    assert str(path) in msg and "system" in msg and "forbidden" in msg
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        (eval, r"forbidden global (__builtin__|builtins)\.eval"),
        (np.array([1, "a"], dtype=object), "object dtype"),
    ],
)
def test_restricted_unpickler_refuses_other_globals(
    tmp_path: Path, obj: object, needle: str
) -> None:
    path = tmp_path / "evil"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=needle) as info:
        load_pickle(path)
    assert str(path) in str(info.value)


def test_restricted_unpickler_loads_numpy_arrays(tmp_path: Path) -> None:
    # Protocol 2 from Python 3 encodes bytes via _codecs.encode(..., "latin1"): must be allowed.
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "ok"
    path.write_bytes(pickle.dumps({b"data": arr, b"labels": [1, 2, 3]}, protocol=2))
    obj = load_pickle(path)
    assert np.array_equal(obj[b"data"], arr) and obj[b"labels"] == [1, 2, 3]


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    data = np.zeros((10, 3072), np.uint8)
    path = write_fake_cifar10(tmp_path / "c10", {b"data": data, b"labels": [0] * 10})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupted") as info:
        load_cifar10(tmp_path / "c10")
    assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def full_batch_data() -> np.ndarray:
    return np.zeros((10_000, 3072), np.uint8)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("wrong_size", r"shape \(10, 3072\), expected \(10000, 3072\)"),
        ("wrong_dtype", "uint8"),
        ("label_out_of_range", "label 10 at index 5"),
        ("label_count", "9999 labels"),
        ("missing_key", "missing key"),
    ],
)
def test_cifar_bad_batch_names_file(
    tmp_path: Path, full_batch_data: np.ndarray, case: str, needle: str
) -> None:
    labels = [0] * 10_000
    batch: dict = {b"data": full_batch_data, b"labels": labels}
    if case == "wrong_size":
        batch[b"data"] = full_batch_data[:10]
    elif case == "wrong_dtype":
        batch[b"data"] = np.zeros((10_000, 3072), np.int16)
    elif case == "label_out_of_range":
        batch[b"labels"] = [*labels[:5], 10, *labels[6:]]
    elif case == "label_count":
        batch[b"labels"] = labels[:-1]
    else:
        del batch[b"labels"]
    path = write_fake_cifar10(tmp_path, batch)
    with pytest.raises(DataError, match=needle) as info:
        load_cifar10(tmp_path)
    assert str(path) in str(info.value)


def test_cifar_missing_files_named(tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path, {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]})
    (tmp_path / "batches.meta").unlink()
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match=r"batches\.meta") as info:
        load_cifar10(tmp_path)
    assert "test_batch" in str(info.value) and str(tmp_path) in str(info.value)
    with pytest.raises(DataError, match="meta"):
        load_cifar100(tmp_path)


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_idx_gz_and_raw_load(tmp_path: Path, gz: bool) -> None:
    images, labels = write_idx_pair(tmp_path, "train", 12, gz=gz)
    suffix = ".gz" if gz else ""
    got_images = read_idx_images(tmp_path / f"train-images-idx3-ubyte{suffix}")
    got_labels = read_idx_labels(tmp_path / f"train-labels-idx1-ubyte{suffix}")
    assert got_images.dtype == torch.uint8 and got_images.shape == (12, 1, 28, 28)
    assert np.array_equal(got_images[:, 0].numpy(), images)
    assert got_labels.dtype == torch.int64 and got_labels.tolist() == labels.tolist()


def test_idx_detects_gzip_by_magic_not_suffix(tmp_path: Path) -> None:
    # gzip data without ".gz" and raw data with ".gz" both load.
    gz_no_suffix = write_idx(tmp_path / "a", 2049, (3,), bytes([1, 2, 3]), gz=True)
    raw_with_suffix = write_idx(tmp_path / "b.gz", 2049, (3,), bytes([4, 5, 6]), gz=False)
    assert read_idx_labels(gz_no_suffix).tolist() == [1, 2, 3]
    assert read_idx_labels(raw_with_suffix).tolist() == [4, 5, 6]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_loads_and_counts_must_match(tmp_path: Path, gz: bool) -> None:
    write_mnist_folder(tmp_path, gz=gz)
    splits = load_idx_folder(tmp_path, "mnist", MNIST_CLASSES)
    assert len(splits.train) == 30 and len(splits.test) == 20 and splits.input_shape == (1, 28, 28)
    # 30 train images but only 20 labels: the message names both files.
    suffix = ".gz" if gz else ""
    shutil.copy(
        tmp_path / f"t10k-labels-idx1-ubyte{suffix}", tmp_path / f"train-labels-idx1-ubyte{suffix}"
    )
    with pytest.raises(DataError, match="30 images") as info:
        load_idx_folder(tmp_path, "mnist", MNIST_CLASSES)
    assert "train-labels-idx1-ubyte" in str(info.value)


@pytest.mark.parametrize(
    ("magic", "dims", "payload", "reader", "needle"),
    [
        (2049, (2, 2, 2), bytes(8), read_idx_images, "bad IDX magic number 2049"),
        (2051, (2, 2, 2), bytes(7), read_idx_images, "truncated"),
        (2051, (2, 2, 2), bytes(9), read_idx_images, "holds 9"),
        (2049, (3,), bytes([0, 10, 1]), read_idx_labels, "label 10 at index 1"),
        (2051, (3,), bytes(3), read_idx_labels, "bad IDX magic"),
    ],
)
def test_idx_errors_name_file(
    tmp_path: Path, magic: int, dims: tuple[int, ...], payload: bytes, reader, needle: str
) -> None:
    path = write_idx(tmp_path / "bad-idx-ubyte.gz", magic, dims, payload, gz=True)
    with pytest.raises(DataError, match=needle) as info:
        reader(path)
    assert str(path) in str(info.value)


def test_idx_truncated_gzip_and_short_header(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.gz", 2049, (100,), bytes(100), gz=True)
    path.write_bytes(path.read_bytes()[:-12])  # cut the gzip trailer and some data
    with pytest.raises(DataError, match="gzip") as info:
        read_idx_labels(path)
    assert str(path) in str(info.value)
    short = tmp_path / "short"
    short.write_bytes(b"\x00\x00\x08")
    with pytest.raises(DataError, match="too short") as info:
        read_idx_images(short)
    assert str(short) in str(info.value)


# --------------------------------------------------------------------------- digits


def test_digits_loads_and_is_deterministic() -> None:
    splits = load_digits()
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.input_shape == (1, 8, 8) and splits.num_classes == 10
    assert splits.train.images.dtype == torch.uint8 and int(splits.train.images.max()) == 255
    assert abs(len(splits.test) / 1797 - 0.2) < 0.01
    # Stratified: every class is ~20 % test.
    test_counts = splits.test.class_counts().double()
    all_counts = test_counts + splits.train.class_counts().double()
    assert torch.all((test_counts / all_counts - 0.2).abs() < 0.01)
    again = load_dataset("digits")
    assert torch.equal(again.train.images, splits.train.images)
    assert torch.equal(again.test.labels, splits.test.labels)


def test_normalize_gives_zero_mean_unit_std_on_train() -> None:
    splits = load_digits()
    x = normalize(splits.train.images, splits.mean, splits.std)
    assert x.dtype == torch.float32
    assert abs(float(x.mean())) < 1e-4
    assert abs(float(x.std(unbiased=False)) - 1.0) < 1e-4
    with pytest.raises(ValueError):
        normalize(splits.train.images, (0.5, 0.5), (0.2, 0.2))


# --------------------------------------------------------------------------- subsets


def test_stratified_subset_proportions_and_seed() -> None:
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10 + [3] * 1)[torch.randperm(161)]
    idx = stratified_subset(labels, 0.1, seed=0)
    assert torch.equal(idx, torch.sort(idx).values) and idx.unique().numel() == idx.numel()
    assert torch.bincount(labels[idx], minlength=4).tolist() == [10, 5, 1, 1]  # >= 1 per class
    assert torch.equal(idx, stratified_subset(labels, 0.1, seed=0))
    assert not torch.equal(idx, stratified_subset(labels, 0.1, seed=1))
    assert stratified_subset(labels, 1.0, seed=0).tolist() == list(range(161))
    for bad in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError):
            stratified_subset(labels, bad, seed=0)


def test_train_val_split_stratified_disjoint() -> None:
    labels = torch.tensor([0] * 100 + [1] * 40 + [2] * 1)
    train, val = train_val_split(labels, 0.25, seed=3)
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(141))
    assert torch.bincount(labels[val], minlength=3).tolist() == [25, 10, 0]
    again = train_val_split(labels, 0.25, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    with pytest.raises(ValueError):
        train_val_split(labels, 1.0, seed=0)


def test_holdout_comes_from_outside_the_unchanged_subset() -> None:
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10 + [3] * 1)[torch.randperm(161)]
    train, val = subset_and_holdout(labels, 0.1, 30, seed=4)
    assert torch.equal(train, stratified_subset(labels, 0.1, seed=4))  # same subset, same size
    assert set(train.tolist()).isdisjoint(val.tolist()) and val.numel() == 30
    assert torch.equal(val, torch.sort(val).values) and val.unique().numel() == 30
    # proportional to class sizes 100:50:10:1 (quotas 18.6, 9.3, 1.9, 0.2; largest remainder)
    assert torch.bincount(labels[val], minlength=4).tolist() == [19, 9, 2, 0]
    again = subset_and_holdout(labels, 0.1, 30, seed=4)
    assert torch.equal(val, again[1])
    assert subset_and_holdout(labels, 0.1, 0, seed=4)[1].numel() == 0
    # everything outside the subset can be held out, not one more
    spare = 161 - train.numel()
    assert subset_and_holdout(labels, 0.1, spare, seed=4)[1].numel() == spare
    with pytest.raises(ValueError, match="leaves 144"):
        subset_and_holdout(labels, 0.1, spare + 1, seed=4)
    with pytest.raises(ValueError, match="val_size"):
        subset_and_holdout(labels, 0.1, -1, seed=4)
    # class 0's share (one of two by size 1:1:4) has no example outside the subset: class 2 takes it
    tiny = torch.tensor([0, 1, 2, 2, 2, 2])
    train, val = subset_and_holdout(tiny, 0.5, 2, seed=0)
    assert torch.bincount(tiny[train], minlength=3).tolist() == [1, 1, 2]
    assert torch.bincount(tiny[val], minlength=3).tolist() == [0, 0, 2]


# --------------------------------------------------------------------------- augmentation


def test_flip_is_exactly_a_horizontal_flip() -> None:
    x = random_dataset(16).images
    assert torch.equal(flip(x, torch.ones(16, dtype=torch.bool)), x.flip(-1))
    assert torch.equal(flip(x, torch.zeros(16, dtype=torch.bool)), x)
    out = random_flip(x, torch.Generator().manual_seed(5))
    mask = random_flip_mask(16, torch.Generator().manual_seed(5))
    assert out.shape == x.shape and 0 < int(mask.sum()) < 16
    for i in range(16):
        assert torch.equal(out[i], x[i].flip(-1) if mask[i] else x[i])


def test_crop_matches_padded_window() -> None:
    x = random_dataset(32).images
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)  # identity
    out = random_crop(x, 4, torch.Generator().manual_seed(7))
    offsets = random_crop_offsets(32, 4, torch.Generator().manual_seed(7))
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert int(offsets.min()) >= 0 and int(offsets.max()) <= 8
    padded = F.pad(x, (4, 4, 4, 4))
    for i, (top, left) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, top : top + 8, left : left + 8])
    centre = torch.full((32, 2), 4)
    assert torch.equal(crop(x, centre, 4), x)


# --------------------------------------------------------------------------- BatchLoader


def _epoch(loader: BatchLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(loader)


def test_batch_loader_shapes_and_plain_order() -> None:
    ds = random_dataset(50)
    mean, std = channel_stats(ds.images)
    loader = BatchLoader(ds, 16, shuffle=False, augment=False, mean=mean, std=std, seed=0)
    assert len(loader) == 4
    batches = _epoch(loader)
    assert [b[0].shape[0] for b in batches] == [16, 16, 16, 2]
    x = torch.cat([b[0] for b in batches])
    assert x.dtype == torch.float32 and batches[0][1].dtype == torch.int64
    assert torch.equal(x, normalize(ds.images, mean, std))
    assert torch.equal(torch.cat([b[1] for b in batches]), ds.labels)
    dropped = BatchLoader(
        ds, 16, shuffle=True, augment=False, mean=mean, std=std, seed=0, drop_last=True
    )
    assert len(dropped) == 3 and len(_epoch(dropped)) == 3


def test_batch_loader_set_epoch_reproducible() -> None:
    ds = random_dataset(60)
    mean, std = channel_stats(ds.images)
    kwargs = dict(shuffle=True, augment=True, mean=mean, std=std, seed=11, device="cpu")
    a = BatchLoader(ds, 16, **kwargs)
    history = [_epoch(a) for _ in range(3)]  # epochs 0, 1, 2 (auto-advancing)
    assert a.epoch == 3
    b = BatchLoader(ds, 16, **kwargs)
    b.set_epoch(2)
    for (xa, ya), (xb, yb) in zip(history[2], _epoch(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Different epochs shuffle differently; each epoch visits every example once.
    assert not torch.equal(history[0][0][1], history[1][0][1])
    assert sorted(torch.cat([y for _, y in history[1]]).tolist()) == sorted(ds.labels.tolist())
    # Resuming mid-epoch gives exactly the remaining batches.
    b.set_epoch(1, start_batch=2)
    rest = _epoch(b)
    assert len(rest) == len(history[1]) - 2
    for (xa, _), (xb, _) in zip(history[1][2:], rest, strict=True):
        assert torch.equal(xa, xb)


def test_batch_loader_augment_changes_images_eval_does_not() -> None:
    ds = random_dataset(40)
    mean, std = channel_stats(ds.images)
    plain = BatchLoader(ds, 40, shuffle=False, augment=False, mean=mean, std=std, seed=0)
    aug = BatchLoader(ds, 40, shuffle=False, augment=True, mean=mean, std=std, seed=0)
    (x_plain, _), (x_aug, _) = next(iter(plain)), next(iter(aug))
    assert x_plain.shape == x_aug.shape and not torch.equal(x_plain, x_aug)
    assert torch.equal(next(iter(plain))[0], x_plain)  # no randomness without augmentation


# --------------------------------------------------------------------------- downloads


def test_download_file_ok_and_bad_md5(http_root: tuple[Path, str], tmp_path: Path) -> None:
    root, url = http_root
    archive = make_tar(root / "small.tar.gz", {"pkg/a.txt": b"hello", "pkg/b.txt": b"world"})
    good_md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    out = tmp_path / "out"
    dest = download_file(
        url + "small.tar.gz", out / "small.tar.gz", good_md5, timeout=10, progress=False
    )
    assert dest.read_bytes() == archive.read_bytes() and md5sum(dest) == good_md5
    assert sorted(p.name for p in out.iterdir()) == ["small.tar.gz"]  # no temp file left
    files = safe_extract_tar(dest, out)
    assert sorted(p.name for p in files) == ["a.txt", "b.txt"]
    assert (out / "pkg" / "b.txt").read_bytes() == b"world"

    bad = tmp_path / "bad"
    with pytest.raises(DataError, match="md5 mismatch") as info:
        download_file(url + "small.tar.gz", bad / "x.tar.gz", "0" * 32, timeout=10, progress=False)
    assert str(bad / "x.tar.gz") in str(info.value)
    assert list(bad.iterdir()) == []  # neither the file nor a temp file remains


def test_download_file_http_error(http_root: tuple[Path, str], tmp_path: Path) -> None:
    _, url = http_root
    dest = tmp_path / "out" / "missing.gz"
    with pytest.raises(DownloadError, match="save it as") as info:
        download_file(url + "missing.gz", dest, "0" * 32, timeout=10, progress=False)
    assert str(dest) in str(info.value) and "404" in str(info.value)
    assert list(dest.parent.iterdir()) == []  # no partial or temp file


def test_download_dataset_via_mirror_env(
    http_root: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, url = http_root
    members = {"fake-cifar/x.bin": b"\x01" * 100, "fake-cifar/y.bin": b"\x02" * 10}
    (root / "cifar10").mkdir()  # the mirror layout is $DFATORCH_MIRROR/<dataset>/<file>
    archive = make_tar(root / "cifar10" / "fake.tar.gz", members)
    spec = RemoteDataset(
        "cifar10",
        "http://invalid.example/",
        (RemoteFile("fake.tar.gz", md5sum(archive)),),
        extracted=("fake-cifar", ("x.bin", "y.bin")),
    )
    monkeypatch.setitem(REGISTRY, "cifar10", spec)
    monkeypatch.setenv("DFATORCH_MIRROR", url)
    data_dir = tmp_path / "data"
    folder = download_dataset("cifar10", data_dir, progress=False)
    assert folder == data_dir / "fake-cifar"
    assert (folder / "x.bin").read_bytes() == b"\x01" * 100
    assert not (data_dir / "fake.tar.gz").exists()  # archive removed after extraction


def test_load_mnist_with_download(
    http_root: tuple[Path, str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, url = http_root
    monkeypatch.delenv("DFATORCH_MIRROR", raising=False)  # the patched registry URL must be used
    write_mnist_folder(root)
    files = tuple(
        RemoteFile(f.filename, md5sum(root / f.filename)) for f in REGISTRY["mnist"].files
    )
    monkeypatch.setitem(REGISTRY, "mnist", RemoteDataset("mnist", url, files, subdir="mnist"))
    data_dir = tmp_path / "data"
    with pytest.raises(DataError, match="download=True"):
        load_dataset("mnist", data_dir)
    splits = load_dataset("mnist", data_dir, download=True)
    assert "\r" not in capsys.readouterr().err  # not a terminal: no progress bar redraws
    assert len(splits.train) == 30 and len(splits.test) == 20
    assert sorted(p.name for p in (data_dir / "mnist").iterdir()) == sorted(
        f.filename for f in files
    )
    assert len(load_dataset("MNIST", data_dir).train) == 30  # now found locally, no network


def test_offline_failure_names_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        download_dataset("mnist", tmp_path, base_url=closed_port_url(), timeout=5, progress=False)
    msg = str(info.value)
    assert str(tmp_path / "mnist") in msg
    for f in REGISTRY["mnist"].files:
        assert f.filename in msg and f.md5 in msg
    assert list((tmp_path / "mnist").iterdir()) == []


@pytest.mark.parametrize(
    "name", ["../evil.txt", "/tmp/dfatorch-abs-evil.txt", "ok/../../evil.txt", "a/../../evil.txt"]
)
def test_archive_traversal_refused(tmp_path: Path, name: str) -> None:
    archive = make_tar(tmp_path / "evil.tar.gz", {"good.txt": b"fine", name: b"pwned"})
    dest = tmp_path / "out"
    with pytest.raises(DataError, match="refusing") as info:
        safe_extract_tar(archive, dest)
    assert str(archive) in str(info.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not Path("/tmp/dfatorch-abs-evil.txt").exists()
    assert list(dest.iterdir()) == []  # checked before anything is written


def test_archive_symlink_refused(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(DataError, match="not a regular file"):
        safe_extract_tar(archive, tmp_path / "out")


def test_corrupted_archive(tmp_path: Path) -> None:
    archive = tmp_path / "broken.tar.gz"
    archive.write_bytes(b"not a tar file at all")
    with pytest.raises(DataError, match="corrupted") as info:
        safe_extract_tar(archive, tmp_path / "out")
    assert str(archive) in str(info.value)


# --------------------------------------------------------------------------- registry


def test_missing_dataset_message_says_where(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "mnist") in msg and "train-images-idx3-ubyte.gz" in msg
    # one line, for the CLI (its flags) and for Python (its arguments)
    assert "\n" not in msg
    for name in ("--download", "download=True", "--data-dir", "data_dir=", "DFATORCH_DATA"):
        assert name in msg
    with pytest.raises(DataError) as info:
        load_dataset("cifar-10", tmp_path)
    msg = str(info.value)
    assert "cifar-10-python.tar.gz" in msg and str(tmp_path / "cifar-10-batches-py") in msg


def test_hand_placed_archive_with_bad_md5(tmp_path: Path) -> None:
    archive = make_tar(tmp_path / "cifar-10-python.tar.gz", {"cifar-10-batches-py/x": b"x"})
    with pytest.raises(DataError, match="does not match official") as info:
        load_dataset("cifar10", tmp_path)
    assert str(archive) in str(info.value)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_resolve_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DFATORCH_DATA", raising=False)
    assert resolve_data_dir() == Path("~/.cache/dfatorch/data").expanduser()
    monkeypatch.setenv("DFATORCH_DATA", str(tmp_path / "env"))
    assert resolve_data_dir() == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"


def test_canonical_names() -> None:
    assert canonical_name("CIFAR-10") == "cifar10"
    assert canonical_name("fashion_mnist") == "fashion-mnist"
    with pytest.raises(ValueError, match="unknown dataset"):
        canonical_name("imagenet")
    with pytest.raises(ValueError, match="label"):
        load_dataset("digits", label="medium")


# --------------------------------------------------------------------------- real data


def _build_once(dataset: str, dirname: str) -> Path:
    """Build CIFAR from shared/ into the data folder once; skip when shared/ is absent.

    Builds into a temporary folder and renames, so a concurrent test run never sees a half-built
    dataset.
    """
    script = SHARED / dataset / "build.py"
    if not script.is_file():
        pytest.skip(f"{script} not found: real {dataset} data is not available here")
    root = resolve_data_dir()
    if (root / dirname).is_dir():
        return root
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as tmp:
        subprocess.run([sys.executable, str(script), tmp], check=True, capture_output=True)
        try:
            os.rename(Path(tmp) / dirname, root / dirname)
        except OSError:
            if not (root / dirname).is_dir():  # lost a race to another build: fine
                raise
    return root


@pytest.fixture(scope="module")
def cifar10_splits() -> DatasetSplits:
    return load_dataset("cifar10", _build_once("cifar10", "cifar-10-batches-py"))


@pytest.mark.data
def test_real_mnist() -> None:
    if not (SHARED / "mnist").is_dir():
        pytest.skip(f"{SHARED / 'mnist'} not found")
    splits = load_dataset("mnist", SHARED)  # finds SHARED/mnist
    assert torch.equal(load_dataset("mnist", SHARED / "mnist").test.labels, splits.test.labels)
    assert len(splits.train) == 60_000 and len(splits.test) == 10_000
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    assert abs(splits.mean[0] - 0.1307) < 1e-3 and abs(splits.std[0] - 0.3081) < 1e-3
    x = normalize(splits.train.images[:20_000], splits.mean, splits.std)
    assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1) < 0.02
    # These three files are byte-exact copies of the official ones: checks the registry md5s.
    for f in REGISTRY["mnist"].files:
        if f.filename != "train-images-idx3-ubyte.gz":  # re-gzipped in shared/
            assert md5sum(SHARED / "mnist" / f.filename) == f.md5


@pytest.mark.data
def test_real_fashion_mnist(tmp_path: Path) -> None:
    if not FASHION_SYSTEM_DIR.is_dir():
        pytest.skip(f"{FASHION_SYSTEM_DIR} not found (apt-get install dataset-fashion-mnist)")
    splits = load_dataset("fashion-mnist", tmp_path)  # empty data dir: found in the system dir
    assert len(splits.train) == 60_000 and len(splits.test) == 10_000
    assert splits.train.class_counts().tolist() == [6000] * 10
    assert splits.train.classes[0] == "T-shirt/top"


@pytest.mark.data
@pytest.mark.slow
def test_real_cifar10(cifar10_splits: DatasetSplits) -> None:
    s = cifar10_splits
    assert len(s.train) == 50_000 and len(s.test) == 10_000 and s.num_classes == 10
    assert s.input_shape == (3, 32, 32) and s.train.classes[0] == "airplane"
    assert s.train.class_counts().tolist() == [5000] * 10
    assert s.test.class_counts().tolist() == [1000] * 10
    # Pixels are JPEG-decoded, so the statistics are close to, not equal to, the published ones.
    assert np.allclose(s.mean, (0.4914, 0.4822, 0.4465), atol=5e-3)
    assert np.allclose(s.std, (0.2470, 0.2435, 0.2616), atol=5e-3)
    loader = BatchLoader(s.train, 128, shuffle=True, augment=True, mean=s.mean, std=s.std, seed=0)
    x, y = next(iter(loader))
    assert x.shape == (128, 3, 32, 32) and y.shape == (128,) and len(loader) == 391


@pytest.mark.data
@pytest.mark.slow
def test_real_cifar100_fine_and_coarse() -> None:
    root = _build_once("cifar100", "cifar-100-python")
    fine = load_dataset("cifar100", root)
    assert len(fine.train) == 50_000 and len(fine.test) == 10_000 and fine.num_classes == 100
    assert fine.train.class_counts().tolist() == [500] * 100
    assert fine.test.class_counts().tolist() == [100] * 100
    assert np.allclose(fine.mean, (0.5071, 0.4865, 0.4409), atol=1e-3)
    coarse = load_dataset("cifar100", root, label="coarse")
    assert coarse.num_classes == 20 and coarse.train.class_counts().tolist() == [2500] * 20
    assert torch.equal(coarse.train.images, fine.train.images)
    assert fine.train.classes[0] == "apple" and coarse.train.classes[0] == "aquatic_mammals"
