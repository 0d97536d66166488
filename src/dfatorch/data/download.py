"""Download of the official dataset files with md5 verification and safe archive extraction.

Mirrors: pass ``base_url`` (files are fetched from ``{base_url}/{filename}``) or set the environment
variable ``DFATORCH_MIRROR`` (files are fetched from ``$DFATORCH_MIRROR/{dataset}/{filename}``,
because MNIST and Fashion-MNIST share file names).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from .._console import progress_bar
from .base import DataError

__all__ = [
    "MIRROR_ENV",
    "REGISTRY",
    "DownloadError",
    "RemoteDataset",
    "RemoteFile",
    "download_dataset",
    "download_file",
    "manual_instructions",
    "md5sum",
    "safe_extract_tar",
]

MIRROR_ENV = "DFATORCH_MIRROR"
_CHUNK = 1 << 20


class DownloadError(DataError):
    """A file could not be fetched (network failure); the message says how to install it by hand."""


@dataclass(frozen=True)
class RemoteFile:
    """One official file and its md5 checksum."""

    filename: str
    md5: str


@dataclass(frozen=True)
class RemoteDataset:
    """Where a dataset's official files live and where they go under the data folder.

    Attributes:
        name: registry key (``"cifar10"``...).
        base_url: official URL prefix; file URLs are ``base_url + filename``.
        files: the files to fetch.
        subdir: folder, relative to the data folder, that receives the files (``""``: the data
            folder itself).
        extracted: for archives, the folder the archive unpacks to (relative to the data folder)
            and the files it must contain; empty for datasets used as downloaded.
    """

    name: str
    base_url: str
    files: tuple[RemoteFile, ...]
    subdir: str = ""
    extracted: tuple[str, tuple[str, ...]] | None = None


REGISTRY: dict[str, RemoteDataset] = {
    "cifar10": RemoteDataset(
        "cifar10",
        "https://www.cs.toronto.edu/~kriz/",
        (RemoteFile("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),),
        extracted=(
            "cifar-10-batches-py",
            (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"),
        ),
    ),
    "cifar100": RemoteDataset(
        "cifar100",
        "https://www.cs.toronto.edu/~kriz/",
        (RemoteFile("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),),
        extracted=("cifar-100-python", ("train", "test", "meta")),
    ),
    "mnist": RemoteDataset(
        "mnist",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        (
            RemoteFile("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            RemoteFile("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        ),
        subdir="mnist",
    ),
    "fashion-mnist": RemoteDataset(
        "fashion-mnist",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        (
            RemoteFile("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            RemoteFile("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            RemoteFile("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            RemoteFile("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        ),
        subdir="fashion-mnist",
    ),
}

# Network-side failures only; local disk errors (plain OSError) propagate unchanged.
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def md5sum(path: str | Path) -> str:
    """Hex md5 digest of a file, read in 1 MiB chunks."""
    h = hashlib.md5()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def download_file(
    url: str, dest: str | Path, md5: str, *, timeout: float = 60.0, progress: bool = True
) -> Path:
    """Fetch ``url`` to ``dest`` and verify its md5; return ``dest``.

    Streams into a temporary file beside ``dest`` and renames it only once the checksum
    matches, so ``dest`` is never a partial or unverified file. A ``dest`` that already has the
    right checksum is kept without downloading.

    Raises:
        DataError: the downloaded bytes do not match ``md5`` (nothing is left behind).
        DownloadError: the network request failed; the message says where to put the file.
    """
    dest = Path(dest)
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5()
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    total = int(resp.headers.get("Content-Length") or 0) or None
                    bar = _progress_bar(total, dest.name, progress)
                    try:
                        for chunk in iter(lambda: resp.read(_CHUNK), b""):
                            out.write(chunk)
                            digest.update(chunk)
                            if bar is not None:
                                bar.update(len(chunk))
                    finally:
                        if bar is not None:
                            bar.close()
            except _NETWORK_ERRORS as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    exc.close()  # an HTTPError holds the open response; don't leak the socket
                raise DownloadError(
                    f"could not download {url} ({exc}). To install it by hand, download that "
                    f"file and save it as {dest} (md5 {md5})."
                ) from exc
        got = digest.hexdigest()
        if got != md5:
            raise DataError(
                f"{dest}: md5 mismatch for the file downloaded from {url}: got {got}, expected "
                f"{md5} (corrupted download or wrong mirror); the file was deleted"
            )
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _progress_bar(total: int | None, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    return progress_bar(total, desc, True, unit="B", unit_scale=True, leave=False)


def _check_member(archive: Path, dest: Path, member: tarfile.TarInfo) -> Path:
    name = member.name
    parts = PurePosixPath(name).parts
    if (
        name.startswith(("/", "\\"))
        or PureWindowsPath(name).drive
        or PurePosixPath(name).is_absolute()
    ):
        raise DataError(f"{archive}: refusing archive member with absolute path {name!r}")
    if ".." in parts or ".." in PureWindowsPath(name).parts:
        raise DataError(f"{archive}: refusing archive member {name!r} (path traversal via '..')")
    if not (member.isfile() or member.isdir()):
        # Links and device files could point outside the destination.
        raise DataError(f"{archive}: refusing archive member {name!r} (not a regular file/dir)")
    target = (dest / name).resolve()
    if target != dest and not target.is_relative_to(dest):
        raise DataError(f"{archive}: refusing archive member {name!r} (escapes {dest})")
    return target


def safe_extract_tar(archive: str | Path, dest: str | Path) -> list[Path]:
    """Extract a (possibly compressed) tar archive into ``dest``; return the extracted files.

    Every member is checked before anything is written: absolute paths, ``..`` components,
    links, devices and anything resolving outside ``dest`` raise :class:`DataError`.
    """
    archive = Path(archive)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    dest = dest.resolve()
    written: list[Path] = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            targets = [_check_member(archive, dest, m) for m in members]
            for member, target in zip(members, targets, strict=True):
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isfile() members always have data
                    raise DataError(f"{archive}: cannot read member {member.name!r}")
                with src, target.open("wb") as out:
                    shutil.copyfileobj(src, out, _CHUNK)
                written.append(target)
    except (tarfile.TarError, EOFError) as exc:
        raise DataError(f"{archive}: corrupted or truncated archive ({exc})") from exc
    return written


def _base_url(spec: RemoteDataset, base_url: str | None) -> str:
    if base_url:
        return base_url.rstrip("/") + "/"
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        return f"{mirror.rstrip('/')}/{spec.name}/"
    return spec.base_url


def manual_instructions(name: str, data_dir: str | Path) -> str:
    """Human-readable instructions for installing dataset ``name`` by hand under ``data_dir``."""
    spec = REGISTRY[name]
    folder = Path(data_dir) / spec.subdir if spec.subdir else Path(data_dir)
    files = "\n".join(
        f"    {f.filename}  (md5 {f.md5}, from {spec.base_url}{f.filename})" for f in spec.files
    )
    text = f"To install {name} by hand, put these files in {folder}/:\n{files}\n"
    if spec.extracted is not None:
        sub, members = spec.extracted
        text += (
            f"The archive is verified and extracted on the next load; or extract it yourself so "
            f"that {folder / sub}/ contains {', '.join(members)}.\n"
        )
    return text


def download_dataset(
    name: str,
    data_dir: str | Path,
    *,
    base_url: str | None = None,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download (and for archives, safely extract) the official files of ``name``.

    Returns the folder holding the usable files (``data_dir/mnist``,
    ``data_dir/cifar-10-batches-py``...). Archives are deleted after a successful extraction.
    """
    if name not in REGISTRY:
        raise ValueError(f"no download known for {name!r}; known: {sorted(REGISTRY)}")
    spec = REGISTRY[name]
    root = Path(data_dir)
    folder = root / spec.subdir if spec.subdir else root
    url_prefix = _base_url(spec, base_url)
    for remote in spec.files:
        dest = folder / remote.filename
        try:
            download_file(
                url_prefix + remote.filename, dest, remote.md5, timeout=timeout, progress=progress
            )
        except DownloadError as exc:
            raise DownloadError(f"{exc}\n{manual_instructions(name, root)}") from exc
        if spec.extracted is not None:
            safe_extract_tar(dest, folder)
            dest.unlink()
    return folder / spec.extracted[0] if spec.extracted is not None else folder
