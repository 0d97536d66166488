"""Files that are never seen half-written (write a temporary file beside, then rename), and
torch files read safely: every way a checkpoint can be unreadable is one :class:`CheckpointError`
with a one-line message that names the file."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

__all__ = ["CheckpointError", "atomic_write", "portable_path", "read_torch_file", "write_json"]


def atomic_write(path: str | Path, write: Callable[[IO[Any]], None], mode: str = "wb") -> None:
    """Call ``write(file)`` on a temporary file in ``path``'s folder, sync it, rename it to
    ``path``. A crash (even ``kill -9``) leaves the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, mode) as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_toml(path: str | Path, kind: str) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes one ``ValueError`` line naming the file and
    what it should have been (``kind``: "experiment file", "claims file")."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with Path(path).open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not a valid {kind} (TOML: {exc})") from None


def write_json(path: str | Path, data: Any, *, indent: int | None = 1) -> None:
    """Write ``data`` as JSON to ``path`` atomically."""
    text = json.dumps(data, indent=indent)
    atomic_write(path, lambda fh: fh.write(text), mode="w")


class CheckpointError(ValueError):
    """A checkpoint (or other torch file) is missing, unreadable or not what the caller expects.

    The message is one line: the file's path, what is wrong, and a short cause.
    """


def _cause(exc: BaseException, limit: int = 160) -> str:
    """The first useful line of ``exc``'s message (torch's weights-only errors run to a page),
    shortened to ``limit`` characters and prefixed by the exception's class."""
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # weights_only refusals bury the reason ("Unsupported global: GLOBAL x.Y ...") in the middle
    marked = [ln for ln in lines if ln.startswith(("Unsupported", "WeightsUnpickler error:"))]
    line = (marked or lines or [""])[0].replace("\x1b[1m", "").replace("\x1b[0m", "")
    line = line.removeprefix("WeightsUnpickler error: ").split(". Please ")[0]
    line = line.split(". This is an internal")[0]  # torch's advice on corrupt zip archives
    if len(line) > limit:
        line = line[: limit - 3] + "..."
    name = type(exc).__name__
    return f"{name}: {line}" if line else name


def read_torch_file(
    path: str | Path, what: str = "checkpoint", *, required_keys: Iterable[str] = ()
) -> dict[str, Any]:
    """Load a dict saved by :func:`torch.save`, on the CPU, with ``weights_only=True``.

    Args:
        path: the file.
        what: what the file should be, for the message (``"checkpoint"``, ``"backbone
            checkpoint"``).
        required_keys: keys the dict must hold (e.g. ``("model", "config")``).

    Returns:
        The loaded dict (an ``OrderedDict`` for a bare state dict).

    Raises:
        CheckpointError: (a ``ValueError``) the file is missing or a folder, unreadable,
            truncated or corrupt, not a torch file, holds objects ``weights_only`` refuses, is
            not a dict, or lacks one of ``required_keys``. The message is one line, e.g.
            ``runs/x/checkpoint.pt is not a readable checkpoint (truncated or not a torch file):
            RuntimeError: PytorchStreamReader failed reading zip archive...``.
    """
    import torch  # here: the atomic writers above need no torch

    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a {what} file")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file (expected a {what})")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is an empty file, not a {what}")
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": the error below says all there is to say
            warnings.simplefilter("ignore")
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as exc:
        raise CheckpointError(f"{path}: cannot read the {what} ({_cause(exc)})") from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path} is not a readable {what} (not a torch file, or it holds objects that "
            f"weights-only loading refuses): {_cause(exc)}"
        ) from exc
    except (
        RuntimeError,  # PytorchStreamReader failed reading zip archive...
        EOFError,  # an empty file
        OSError,  # [Errno 22] Invalid argument: a zip cut short
        zipfile.BadZipFile,
        KeyError,  # a text file: "invalid load key" surfaces as KeyError on some versions
        ValueError,
        AttributeError,
        IndexError,
        TypeError,
    ) as exc:
        raise CheckpointError(
            f"{path} is not a readable {what} (truncated or not a torch file): {_cause(exc)}"
        ) from exc
    if not isinstance(blob, dict):
        kind = type(blob).__name__
        raise CheckpointError(f"{path} is not a {what}: it holds a {kind}, not a dict")
    missing = [k for k in required_keys if k not in blob]
    if missing:
        found = sorted(map(str, blob))
        shown = ", ".join(found[:8]) + (", ..." if len(found) > 8 else "")
        raise CheckpointError(
            f"{path} is not a {what}: it lacks the keys {missing} (found: {shown or 'none'})"
        )
    return blob


def portable_path(path: str | Path) -> str:
    """``path`` as records should keep it: relative to the working directory when it lies under
    it, else its file name alone, so that no folder of the machine that ran it (a home, a
    temporary folder) is written into results that others read. Anything that is not an absolute
    path is returned as it is."""
    text = str(path)
    if not os.path.isabs(text):
        return text
    try:
        return str(Path(text).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return Path(text).name
