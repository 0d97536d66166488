"""read_torch_file: every unreadable checkpoint is one CheckpointError with a one-line message."""

from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from dfatorch._io import CheckpointError, read_torch_file


@pytest.fixture
def good(tmp_path: Path) -> Path:
    path = tmp_path / "checkpoint.pt"
    blob = {"model": {"w": torch.arange(5000.0)}, "config": {"seed": 0}, "epoch": 3}
    torch.save(blob, path)
    return path


def _error(path: Path, **kw) -> str:
    with pytest.raises(CheckpointError) as info:
        read_torch_file(path, "checkpoint", **kw)
    assert isinstance(info.value, ValueError)  # the CLI's error handler prints ValueErrors
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message
    assert len(message) < 400, message
    return message


def test_a_good_checkpoint_loads_on_the_cpu(good: Path) -> None:
    blob = read_torch_file(good, "checkpoint", required_keys=("model", "epoch"))
    assert blob["epoch"] == 3 and blob["model"]["w"].device.type == "cpu"
    torch.testing.assert_close(blob["model"]["w"], torch.arange(5000.0))
    assert read_torch_file(str(good), "checkpoint")["config"] == {"seed": 0}  # str paths too


@pytest.mark.parametrize("share", [0.02, 0.3, 0.5, 0.9, 0.999])
def test_truncated_checkpoint(good: Path, share: float) -> None:
    data = good.read_bytes()
    cut = good.with_name("cut.pt")
    cut.write_bytes(data[: max(1, int(len(data) * share))])
    assert "(truncated or not a torch file)" in _error(cut)


def test_missing_folder_and_empty_files(tmp_path: Path) -> None:
    assert "no such file" in _error(tmp_path / "nothing.pt")
    (tmp_path / "run").mkdir()
    assert "is a folder" in _error(tmp_path / "run")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "empty" in _error(tmp_path / "empty.pt")


def test_foreign_files(tmp_path: Path) -> None:
    text = tmp_path / "notes.pt"
    text.write_text("hello, this is text\n")
    assert "is not a readable checkpoint" in _error(text)
    # a pickle of a class weights-only loading refuses: named, without torch's page of advice
    refused = tmp_path / "namespace.pt"
    torch.save(argparse.Namespace(a=1), refused)
    message = _error(refused)
    assert "argparse.Namespace" in message and "weights-only" in message
    assert "\x1b" not in message and "Please" not in message
    plain = tmp_path / "plain.pkl"
    with plain.open("wb") as fh:
        pickle.dump({"a": 1}, fh, protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "Detected pickle protocol 4" stays quiet
        _error(plain)


def test_not_a_dict_and_missing_keys(tmp_path: Path, good: Path) -> None:
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    assert "holds a list, not a dict" in _error(listed)
    message = _error(good, required_keys=("model", "optimizer", "rng"))
    assert "['optimizer', 'rng']" in message and "config, epoch, model" in message
    assert read_torch_file(good, required_keys=("model",))["epoch"] == 3


def test_what_names_the_kind_of_file(tmp_path: Path) -> None:
    (tmp_path / "x.pt").write_text("text")
    with pytest.raises(CheckpointError, match="not a readable backbone checkpoint"):
        read_torch_file(tmp_path / "x.pt", "backbone checkpoint")


def test_portable_path_keeps_no_machine_folder(tmp_path, monkeypatch):
    from dfatorch._io import portable_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert portable_path(tmp_path / "runs" / "ckpt.pt") == "runs/ckpt.pt"  # under the cwd
    assert portable_path("/elsewhere/logs/final.json") == "final.json"  # outside: the name alone
    assert portable_path("runs/x.pt") == "runs/x.pt"  # relative: as given
    assert portable_path("--rounds") == "--rounds"  # not a path
