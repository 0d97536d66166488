"""The training loop: epochs, evaluation, metrics, atomic checkpoints and exact resume.

A run lives in one folder::

    RUN_DIR/config.json      everything needed to rerun: the TrainConfig, versions, git commit
    RUN_DIR/metrics.jsonl    one JSON object per epoch
    RUN_DIR/checkpoint.pt    model, optimiser, engine (feedback), RNG states, epoch and history

``train(config, run_dir)`` starts a run; ``train(None, run_dir, resume=True)`` continues one,
from the end of the last completed epoch or from the batch where Ctrl-C stopped it, and ends with
the same metrics as an uninterrupted run with the same seed (batches and augmentation are functions
of ``(seed, epoch)``, the RNG states are saved).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from ._io import atomic_write
from .alignment import gradient_alignment
from .data import BatchLoader, DatasetSplits, load_dataset, stratified_subset, train_val_split
from .engine import DFAEngine, attach, get_rng_states, set_rng_states
from .models import build_model, model_stats

__all__ = [
    "NonFiniteLossError",
    "RunResult",
    "TrainConfig",
    "evaluate",
    "load_checkpoint",
    "read_metrics",
    "train",
]

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Everything that defines a run; saved in ``config.json``, rebuilt by :meth:`from_dict`.

    Data: ``dataset`` (digits, mnist, fashion-mnist, cifar10, cifar100), ``fraction`` (a
    class-stratified, seeded subset of the training set), ``val_fraction`` (held out from the
    training set for model selection; reported as ``val_*``), ``augment`` (random crop with 4-pixel
    padding and horizontal flip; default on for CIFAR only).
    Model: a zoo name and its options. Rule: the arguments of :func:`dfatorch.attach`.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    label: str = "fine"
    fraction: float = 1.0
    val_fraction: float = 0.0
    augment: bool | None = None
    model: str = "small_cnn"
    activation: str | None = None
    batch_norm: bool = False
    dropout: float = 0.0
    width: float = 1.0
    trainable_units: int | None = None
    method: str = "bdfa"
    scope: str = "fc"
    conv_error: str = "backprop"
    init: str = "uniform"
    storage: str = "dense"
    gain: float = 1.0
    normalize_feedback: bool = True
    epochs: int = 20
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    seed: int = 0
    device: str = "auto"
    channels_last: bool = False
    eval_test: bool = True
    eval_every: int = 1
    align_every: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError("epochs, batch_size and eval_every must be >= 1")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Rebuild a config from ``asdict`` output, refusing unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}")
        return cls(**data)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def best(self, key: str = "test_acc") -> float | None:
        values = [h[key] for h in self.history if h.get(key) is not None]
        return max(values) if values else None


# -- building blocks ---------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA if available, else the CPU; anything else as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class _Run:
    splits: DatasetSplits
    train_loader: BatchLoader
    eval_loaders: dict[str, BatchLoader]
    model: nn.Module
    engine: DFAEngine
    optimizer: torch.optim.Optimizer
    device: torch.device


def _build(config: TrainConfig) -> _Run:
    device = resolve_device(config.device)
    splits = load_dataset(
        config.dataset, config.data_dir, download=config.download, label=config.label
    )
    train_set = splits.train
    if config.fraction < 1:
        train_set = train_set.subset(
            stratified_subset(train_set.labels, config.fraction, config.seed)
        )
    eval_sets = {}
    if config.val_fraction > 0:
        keep, held = train_val_split(train_set.labels, config.val_fraction, config.seed)
        train_set, eval_sets["val"] = train_set.subset(keep), train_set.subset(held)
    if config.eval_test:
        eval_sets["test"] = splits.test
    augment = config.augment if config.augment is not None else splits.name.startswith("cifar")
    norm = {"mean": splits.mean, "std": splits.std, "seed": config.seed, "device": device}
    train_loader = BatchLoader(train_set, config.batch_size, shuffle=True, augment=augment, **norm)
    eval_loaders = {
        k: BatchLoader(v, 500, shuffle=False, augment=False, **norm) for k, v in eval_sets.items()
    }
    torch.manual_seed(config.seed)
    options: dict[str, Any] = {
        "batch_norm": config.batch_norm,
        "dropout": config.dropout,
        "width": config.width,
    }
    if config.activation is not None:
        options["activation"] = config.activation
    if config.trainable_units is not None:
        options["trainable_units"] = config.trainable_units
    model = build_model(config.model, splits.input_shape, splits.num_classes, **options).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    engine = attach(
        model,
        config.method,
        scope=config.scope,
        conv_error=config.conv_error,
        init=config.init,
        storage=config.storage,
        gain=config.gain,
        normalize=config.normalize_feedback,
        seed=config.seed,
    )
    params = model.parameters()
    if config.optimizer == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    else:
        optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return _Run(splits, train_loader, eval_loaders, model, engine, optimizer, device)


def _learning_rate(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` (0 at the first step, 1 at the end of training)."""
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr


def _inputs(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: BatchLoader, *, channels_last: bool = False
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``loader`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for x, y in loader:
            logits = model(_inputs(x, channels_last))
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
    finally:
        model.train(was_training)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


# -- files -------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, Any]:
    """Versions, machine, threads and git commit, recorded with every run and benchmark."""
    return {
        "dfatorch": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "argv": sys.argv,
    }


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of ``run_dir/metrics.jsonl`` (empty if none yet)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    return torch.load(path, map_location=map_location, weights_only=True)


def _save(run_dir: Path, run: _Run, config: TrainConfig, position: dict[str, Any]) -> None:
    state = {
        "format": 1,
        "config": asdict(config),
        "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "engine": run.engine.state_dict(),
        "rng": get_rng_states(),
        **position,
    }
    atomic_write(run_dir / CHECKPOINT, lambda fh: torch.save(state, fh))


def _write_metrics(run_dir: Path, history: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(run_dir / METRICS, lambda fh: fh.write(text), mode="w")


# -- the loop ----------------------------------------------------------------------------------


class _StopRequest:
    requested = False


@contextlib.contextmanager
def _graceful_interrupt() -> Iterator[_StopRequest]:
    """Turn the first Ctrl-C into a request to stop at the next step boundary (a second one
    interrupts at once). Only the main thread can receive signals; elsewhere nothing changes."""
    stop = _StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _fresh() -> dict[str, Any]:
    """Running sums of the epoch in progress."""
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0, "alignment": []}


def _compact(layers: list[Any]) -> dict[str, dict[str, float | None]]:
    return {a.name: {"mean": a.mean, "std": a.std, "weight_angle": a.weight_angle} for a in layers}


def _position(
    epoch: int, batch: int, history: list[dict[str, Any]], partial: dict[str, Any]
) -> dict[str, Any]:
    """Where a checkpoint stands: ``epoch`` epochs done plus ``batch`` batches of the next."""
    return {"epoch": epoch, "batch": batch, "history": history, "partial": partial}


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool) -> Iterator[Any]:
    bar = tqdm(total=total, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
    try:
        yield bar
    finally:
        bar.close()


def train(
    config: TrainConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    epochs: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> RunResult:
    """Train a model as ``config`` says, writing ``run_dir`` (see the module docstring).

    Args:
        config: the run's configuration; ``None`` with ``resume=True`` reads ``config.json``.
        run_dir: the run's folder (created if needed).
        resume: continue the run in ``run_dir`` from its checkpoint; without a checkpoint the run
            starts from scratch.
        epochs: with ``resume``, a new total number of epochs (to extend a finished run).
        progress: show a progress bar with loss, accuracy and images per second.
        on_epoch: called with each epoch's record.

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the last good checkpoint is kept).
        FileExistsError: ``run_dir`` holds another run and ``resume`` is false.
    """
    run_dir = Path(run_dir)
    ckpt_path = run_dir / CHECKPOINT
    checkpoint = None
    if resume and ckpt_path.exists():
        checkpoint = load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(checkpoint["config"])
        if config is not None and asdict(config) != asdict(saved):
            diff = {
                k: (v, asdict(config)[k])
                for k, v in asdict(saved).items()
                if asdict(config)[k] != v
            }
            raise ValueError(f"{run_dir} was trained with another config (saved, given): {diff}")
        config = saved
    elif resume and config is None:
        if not (run_dir / CONFIG).exists():
            raise FileNotFoundError(f"nothing to resume in {run_dir}: no {CHECKPOINT} or {CONFIG}")
        config = TrainConfig.from_dict(json.loads((run_dir / CONFIG).read_text())["config"])
    elif not resume and ckpt_path.exists():
        raise FileExistsError(f"{run_dir} already holds a run; resume it or choose another folder")
    if config is None:
        raise ValueError("train() needs a config unless it resumes a run")
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    run_dir.mkdir(parents=True, exist_ok=True)

    run = _build(config)
    stats = model_stats(run.model, run.splits.input_shape)
    history: list[dict[str, Any]] = []
    start_epoch, start_batch = 0, 0
    partial = _fresh()
    if checkpoint is not None:
        run.model.load_state_dict(checkpoint["model"])
        run.engine.load_state_dict(checkpoint["engine"])
        run.optimizer.load_state_dict(checkpoint["optimizer"])
        set_rng_states(checkpoint["rng"])
        history = list(checkpoint["history"])
        start_epoch, start_batch = checkpoint["epoch"], checkpoint["batch"]
        partial = {**_fresh(), **checkpoint["partial"]}
    meta = {
        "config": asdict(config),
        "environment": environment(),
        "model": {"params": stats.params, "macs_per_sample": stats.macs},
        "engine": {
            "rules": {k: v.value for k, v in run.engine.rules.items()},
            "output_layer": run.engine.layers[-1].name,
        },
        "data": {
            "train_examples": len(run.train_loader.dataset),
            "eval_examples": {k: len(v.dataset) for k, v in run.eval_loaders.items()},
            "augment": run.train_loader.augment,
        },
    }
    atomic_write(run_dir / CONFIG, lambda fh: fh.write(json.dumps(meta, indent=2)), mode="w")
    _write_metrics(run_dir, history)  # the checkpoint's history is the truth after a kill -9

    steps_per_epoch = len(run.train_loader)
    total_steps = steps_per_epoch * config.epochs
    model, optimizer = run.model, run.optimizer
    model.train()
    interrupted = False
    with _graceful_interrupt() as stop:
        for epoch in range(start_epoch, config.epochs):
            first = start_batch if epoch == start_epoch else 0
            if first == 0:
                partial = _fresh()
            run.train_loader.set_epoch(epoch, start_batch=first)
            batch_index = first
            started = time.perf_counter() - partial["seconds"]
            with _progress(steps_per_epoch, f"epoch {epoch + 1}/{config.epochs}", progress) as bar:
                bar.update(first)
                for x, y in run.train_loader:
                    x = _inputs(x, config.channels_last)
                    if config.init == "norm_matched" and not run.engine.calibrated:
                        run.engine.calibrate(x, y, F.cross_entropy)
                    step = epoch * steps_per_epoch + batch_index
                    for group in optimizer.param_groups:
                        group["lr"] = _learning_rate(config, step / total_steps)
                    optimizer.zero_grad(set_to_none=True)
                    probe = config.align_every > 0 and step % config.align_every == 0
                    before = get_rng_states() if probe else None
                    recorder = run.engine.recording() if probe else contextlib.nullcontext()
                    with recorder as delivered:
                        logits = model(x)
                        loss = F.cross_entropy(logits, y)
                        value = loss.item()
                        if not math.isfinite(value):
                            kept = f"{ckpt_path} (epoch {len(history)})"
                            raise NonFiniteLossError(
                                f"the loss became {value} at epoch {epoch + 1}, batch "
                                f"{batch_index + 1}; stopped. The last good checkpoint is kept: "
                                f"{kept}; try a lower learning rate or a smaller feedback gain."
                            )
                        loss.backward()
                    if probe:  # same weights, batch and dropout masks: before the update
                        layers = gradient_alignment(
                            run.engine, x, y, F.cross_entropy, delivered=delivered,
                            rng_state=before,
                        )  # fmt: skip
                        partial["alignment"].append({"step": step, "layers": _compact(layers)})
                    optimizer.step()
                    partial["loss_sum"] += value * len(y)
                    partial["correct"] += int((logits.detach().argmax(1) == y).sum())
                    partial["seen"] += len(y)
                    batch_index += 1
                    elapsed = time.perf_counter() - started
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{partial['loss_sum'] / partial['seen']:.3f}",
                        acc=f"{partial['correct'] / partial['seen']:.3f}",
                        img_s=f"{partial['seen'] / max(elapsed, 1e-9):.0f}",
                        refresh=False,
                    )
                    if stop.requested:  # Ctrl-C: stop at this step boundary, resumable exactly
                        partial["seconds"] = elapsed
                        position = _position(epoch, batch_index, history, partial)
                        _save(run_dir, run, config, position)
                        interrupted = True
                        break
            if interrupted:
                break
            seconds = time.perf_counter() - started
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "train_loss": partial["loss_sum"] / max(partial["seen"], 1),
                "train_acc": partial["correct"] / max(partial["seen"], 1),
            }
            scheduled = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
            for split in ("test", "val"):
                loader = run.eval_loaders.get(split)
                if loader is not None and scheduled:
                    record[f"{split}_loss"], record[f"{split}_acc"] = evaluate(
                        model, loader, channels_last=config.channels_last
                    )
                elif loader is not None or split == "test":
                    record[f"{split}_loss"] = record[f"{split}_acc"] = None
            if config.align_every > 0:
                record["alignment"] = partial["alignment"]
            record.update(
                epoch_seconds=seconds,
                images_per_second=partial["seen"] / max(seconds, 1e-9),
                lr=optimizer.param_groups[0]["lr"],
            )
            history.append(record)
            _save(run_dir, run, config, _position(epoch + 1, 0, history, _fresh()))
            _write_metrics(run_dir, history)
            if on_epoch is not None:
                on_epoch(record)
            if stop.requested:
                interrupted = epoch + 1 < config.epochs
                break
    return RunResult(run_dir, config, history, interrupted=interrupted)


def probe_batch(
    run_dir: str | Path, *, batch_size: int = 256, split: str = "train"
) -> tuple[DFAEngine, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """The model and engine of a saved run, restored from its checkpoint, with one batch of its
    data (the first of a seeded shuffle, not augmented) and its loss: what alignment probes need."""
    run_dir = Path(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT)
    config = TrainConfig.from_dict(checkpoint["config"])
    run = _build(config)
    run.model.load_state_dict(checkpoint["model"])
    run.engine.load_state_dict(checkpoint["engine"])
    dataset = run.train_loader.dataset if split == "train" else run.splits.test
    loader = BatchLoader(dataset, batch_size, shuffle=True, augment=False, mean=run.splits.mean,
                         std=run.splits.std, seed=config.seed, device=run.device)  # fmt: skip
    x, y = next(iter(loader))
    return run.engine, _inputs(x, config.channels_last), y, F.cross_entropy


def is_finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run that completed all its epochs."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        return False
    epochs = json.loads(path.read_text())["config"]["epochs"]
    return len(read_metrics(run_dir)) >= epochs


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best evaluation accuracy (test if evaluated, else validation), final loss, epochs
    and mean seconds per epoch of a run's history."""
    if not history:
        return {"epochs": 0, "split": None}
    split = "test" if any(h.get("test_acc") is not None for h in history) else "val"
    evaluated = [h for h in history if h.get(f"{split}_acc") is not None]
    return {
        "epochs": len(history),
        "split": split,
        "final_acc": evaluated[-1][f"{split}_acc"] if evaluated else None,
        "best_acc": max(h[f"{split}_acc"] for h in evaluated) if evaluated else None,
        "final_loss": evaluated[-1][f"{split}_loss"] if evaluated else None,
        "final_train_acc": history[-1]["train_acc"],
        "seconds_per_epoch": sum(h["epoch_seconds"] for h in history) / len(history),
    }


def summary_table(results: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """A text table of runs: final and best accuracies, final loss, mean seconds per epoch."""
    rows = [("run", "epochs", "final acc", "best acc", "final loss", "s/epoch", "split")]
    for name, history in results:
        s = summarize(history)
        if s["epochs"] == 0 or s["final_acc"] is None:
            rows.append((name, str(s["epochs"]), "-", "-", "-", "-", "-"))
            continue
        rows.append(
            (
                name,
                str(s["epochs"]),
                f"{s['final_acc']:.4f}",
                f"{s['best_acc']:.4f}",
                f"{s['final_loss']:.4f}",
                f"{s['seconds_per_epoch']:.2f}",
                s["split"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
