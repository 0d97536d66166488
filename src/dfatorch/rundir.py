"""The files of a run folder, named in one place.

::

    RUN_DIR/config.json      everything needed to rerun: the TrainConfig, versions, git commit
    RUN_DIR/metrics.jsonl    one JSON object per epoch
    RUN_DIR/checkpoint.pt    model, optimiser, engine (feedback), RNG states, epoch and history
    RUN_DIR/alignment.json   written by ``dfatorch align``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._io import CheckpointError, read_torch_file

__all__ = ["CheckpointError", "RunDir", "load_checkpoint"]

#: What every training checkpoint holds.
CHECKPOINT_KEYS = ("config", "model", "optimizer", "engine", "rng", "epoch", "batch", "history")


@dataclass(frozen=True)
class RunDir:
    """A run folder: where each of its files lives, and how to read them."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    def __str__(self) -> str:
        return str(self.path)

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint.pt"

    @property
    def config(self) -> Path:
        return self.path / "config.json"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def alignment(self) -> Path:
        return self.path / "alignment.json"

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch records (empty if none yet)."""
        if not self.metrics.exists():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    def read_meta(self) -> dict[str, Any]:
        """The whole ``config.json``: config, environment, model, engine and data."""
        try:
            meta = json.loads(self.config.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path} is not a run folder: no config.json") from None
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{self.config} is not valid JSON ({exc.msg}, line {exc.lineno})"
            ) from None
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise ValueError(f"{self.config} has no 'config' object: not a dfatorch run")
        return meta

    def read_config(self) -> dict[str, Any]:
        """The saved TrainConfig values."""
        return self.read_meta()["config"]

    def is_finished(self) -> bool:
        """Whether the folder holds a run that completed all its epochs."""
        if not self.config.exists():
            return False
        return len(self.read_metrics()) >= self.read_config()["epochs"]

    def load_checkpoint(self) -> dict[str, Any]:
        """The checkpoint, loaded safely (see :func:`load_checkpoint`)."""
        return load_checkpoint(self.checkpoint)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a training checkpoint on the CPU, safely (``weights_only=True``: tensors and plain
    containers only). A missing, truncated or foreign file raises :class:`CheckpointError` with a
    one-line message."""
    return read_torch_file(path, "training checkpoint", required_keys=CHECKPOINT_KEYS)
