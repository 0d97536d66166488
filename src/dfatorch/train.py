"""The training loop: epochs, evaluation, metrics, atomic checkpoints and exact resume.

A run lives in one folder (:class:`~dfatorch.rundir.RunDir`: ``config.json``, ``metrics.jsonl``,
``checkpoint.pt``). ``train(config, run_dir)`` starts a run; ``train(None, run_dir,
resume=True)`` continues one, from the end of the last completed epoch or from the batch where
Ctrl-C stopped it, and ends with the same metrics as an uninterrupted run with the same seed
(batches and augmentation are functions of ``(seed, epoch)``, the RNG states are saved).

The loop itself only runs forward, backward and the optimiser step; what a method adds (norm
calibration, alignment probes, divergence checks, a preconditioner, saved-tensor hooks) plugs in
as a :class:`~dfatorch.callbacks.Callback`. The loss function and the optimiser are arguments.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import __version__
from ._console import progress_bar, warn
from ._io import atomic_write, portable_path
from .callbacks import Callback, NonFiniteLossError, TrainingDiverged, TrainState, default_callbacks
from .config import DEFAULT_SEQ_LEN, OptimizerName, Schedule, TrainConfig, parse_options
from .data import BatchLoader, DatasetSplits, load_dataset, subset_and_holdout, train_val_split
from .data.loader import derive_seed
from .distributed import (
    DDPOptions,
    ProcessGroup,
    RankLost,
    all_reduce_sum,
    average_gradients,
    check_identical,
    gather_objects,
    lost_contact,
    process_group,
    shard_loss_scale,
)
from .engine import DFAEngine, Rule, Scope, Transform, attach, get_rng_states, set_rng_states
from .feedback import make_pattern
from .models import RECURRENT_MODELS, build_model, model_stats
from .rundir import CheckpointError, RunDir, load_checkpoint

__all__ = [
    "EVAL_BATCH_SIZE",
    "CheckpointError",
    "ModelTransform",
    "NonFiniteLossError",
    "OptimizerFactory",
    "RunResult",
    "TrainConfig",
    "TrainingDiverged",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "read_metrics",
    "train",
]

#: Examples per evaluation batch. Accuracy does not depend on it (eval mode scores every example
#: alone), the loss only through float rounding (about 1e-7 relative); speed does. On one CPU
#: thread the zoo's conv nets evaluate about 1.0-1.7x faster at 128 than at 500, the old value (a
#: cache effect), the MLP 0.6-0.9x as fast in two runs but at over 5,000 images per second
#: (``benchmarks/eval_speed.py`` measures it per model; ``docs/RESULTS.md`` shows the table).
EVAL_BATCH_SIZE = 128

#: Builds the optimiser of a run from the model and its configuration.
OptimizerFactory = Callable[[nn.Module, TrainConfig], torch.optim.Optimizer]
#: Changes the model a configuration builds (e.g. converts its layers) before anything attaches.
ModelTransform = Callable[[nn.Module], nn.Module]
LossFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class RunResult:
    """What a finished (or stopped) run reports."""

    run_dir: Path
    config: TrainConfig
    history: list[dict[str, Any]] = field(default_factory=list)
    #: stopped by Ctrl-C before its last epoch (its checkpoint resumes it)
    interrupted: bool = False
    #: a Ctrl-C arrived, also one during the last epoch's evaluation that let the run finish
    stop_requested: bool = False

    @property
    def final(self) -> dict[str, Any]:
        return self.history[-1] if self.history else {}

    def best(self, key: str = "test_acc") -> float | None:
        values = [h[key] for h in self.history if h.get(key) is not None]
        return max(values) if values else None


# -- building blocks ---------------------------------------------------------------------------


def cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """The default loss: cross-entropy of ``(N, C)`` logits and ``(N,)`` labels, or of ``(N, T,
    C)`` logits and per-step labels ``(N, T)`` (language modelling: the mean over every step of
    every sequence, in nats; divided by ``ln 2`` it is the bits per character)."""
    if logits.dim() == 3:
        logits, targets = logits.flatten(0, 1), targets.flatten()
    if reduction == "mean":  # the plain call, as before sequences (tests wrap it by its arguments)
        return F.cross_entropy(logits, targets)
    return F.cross_entropy(logits, targets, reduction=reduction)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA if available, else the CPU; anything else as ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"device={name!r} is not a device (auto, cpu, cuda, cuda:1, ...)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available here")
    return device


def flushing_denormals() -> bool:
    """Whether this thread flushes denormal floats to zero (1e-30 * 1e-10 = 1e-40 is one)."""
    return (torch.full((1,), 1e-30) * 1e-10).item() == 0.0


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Flush denormal floats to zero on the CPU inside the block, then restore the state before.

    Weights and Adam moments that decay towards zero (a dead channel's weights under L2 weight
    decay) end up below ``1.2e-38``, where every operation on them runs in microcode and a
    training step can take several times longer (``benchmarks/denormals.py``). Flushing changes
    only those values and what is computed from them. The CPU flag is per thread: this sets it
    for the calling thread, which does all the work with one thread (``OMP_NUM_THREADS=1``);
    PyTorch's worker threads inherit it only when they start inside the block, as they do when
    the command line (which wraps every command in this) starts them.
    """
    before = flushing_denormals()
    torch.set_flush_denormal(True)  # False (no change) where the CPU lacks the flags
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


@dataclass
class _Run:
    splits: DatasetSplits
    train_loader: BatchLoader
    eval_loaders: dict[str, BatchLoader]
    model: nn.Module
    engine: DFAEngine
    optimizer: torch.optim.Optimizer
    device: torch.device
    eval_sizes: dict[str, int] = field(default_factory=dict)
    group: ProcessGroup = field(default_factory=ProcessGroup)
    #: what the training forward pass calls: the model, or its DistributedDataParallel wrapper
    forward: nn.Module | None = None


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The default :data:`OptimizerFactory`: SGD (with momentum) or Adam, as ``config`` says."""
    params = model.parameters()
    if config.optimizer is OptimizerName.SGD:
        return torch.optim.SGD(
            params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def _build(
    config: TrainConfig,
    optimizer_factory: OptimizerFactory | None = None,
    transforms: tuple[Sequence[Transform], Sequence[Transform]] = ((), ()),
    group: ProcessGroup | None = None,
    ddp: DDPOptions | None = None,
    model_transform: ModelTransform | None = None,
    *,
    training: bool = False,
) -> _Run:
    """Everything a run needs; ``training``: for ``train()`` (says what only training should)."""
    group = group or ProcessGroup()
    device = resolve_device(config.device)
    if group.enabled and device.type == "cuda":
        device = torch.device("cuda", group.local_rank)  # one GPU per process
    splits = load_dataset(
        config.dataset,
        config.data_dir,
        download=config.download,
        label=config.label,
        permute=config.permute,
        seq_len=config.seq_len or DEFAULT_SEQ_LEN,
        text_file=config.text_file,
    )
    train_set = splits.train
    eval_sets = {}
    if config.fraction < 1:
        keep, held = subset_and_holdout(
            train_set.labels, config.fraction, config.val_size, config.seed
        )
        if config.val_size:
            eval_sets["val"] = train_set.subset(held)
        train_set = train_set.subset(keep)
    if config.val_fraction > 0:
        keep, held = train_val_split(train_set.labels, config.val_fraction, config.seed)
        train_set, eval_sets["val"] = train_set.subset(keep), train_set.subset(held)
    if config.eval_test:
        eval_sets["test"] = splits.test
    augment = config.augment if config.augment is not None else splits.name.startswith("cifar")
    norm = {"mean": splits.mean, "std": splits.std, "seed": config.seed, "device": device}
    shard = (group.rank, group.world_size)
    train_loader = BatchLoader(train_set, config.batch_size, shuffle=True, augment=augment,
                               shard=shard, poisson=config.private, **norm)  # fmt: skip
    # each rank evaluates every world_size-th example; the sums are all-reduced
    mine = {
        k: v.subset(torch.arange(group.rank, len(v), group.world_size))
        for k, v in eval_sets.items()
    }
    eval_loaders = {
        k: BatchLoader(v, EVAL_BATCH_SIZE, shuffle=False, augment=False, **norm)
        for k, v in mine.items()
    }
    torch.manual_seed(config.seed)
    options: dict[str, Any] = {
        "batch_norm": config.batch_norm,
        "dropout": config.dropout,
        "width": config.width,
    }
    if config.activation is not None:
        options["activation"] = config.activation
    for name in ("bottleneck", "trainable_units"):  # MLP-only options, passed when set
        if getattr(config, name) is not None:
            options[name] = getattr(config, name)
    if config.model in RECURRENT_MODELS:
        options.update(hidden_size=config.hidden_size, layers=config.num_layers or 1)
        if splits.per_step:  # language modelling: one-hot characters in, a prediction per step
            options.update(tokens=splits.num_classes, every_step=True)
    model = build_model(config.model, splits.input_shape, splits.num_classes, **options).to(device)
    if model_transform is not None:
        model = model_transform(model).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    module_wise = config.scope is Scope.MODULE
    engine = attach(
        model,
        config.method,
        scope=config.scope,
        conv_error=config.conv_error,
        modules=config.module_list() if module_wise else None,
        inner=config.inner if module_wise else None,
        init=make_pattern(config.init, **parse_options(config.init_options)),
        storage=config.storage,
        gain=config.gain,
        normalize=config.normalize_feedback,
        seed=config.seed,
        error_transforms=transforms[0],
        signal_transforms=transforms[1],
        example_input=_example_input(config, splits.input_shape, device),
    )
    forward: nn.Module = model
    if group.enabled:
        # the feedback is drawn lazily: draw it now and make sure every rank drew the same
        engine.materialize(torch.zeros((2, *splits.input_shape), device=device))
        check_identical("feedback", engine, group)
        forward = (ddp or DDPOptions()).wrap(model, device)
        torch.manual_seed(derive_seed(config.seed, group.rank))  # dropout masks differ by rank
    optimizer = (optimizer_factory or make_optimizer)(model, config)
    _add_learned_feedback(optimizer, engine, tell=training and group.is_main)
    sizes = {k: len(v) for k, v in eval_sets.items()}
    return _Run(splits, train_loader, eval_loaders, model, engine, optimizer, device, sizes,
                group, forward)  # fmt: skip


def _example_input(
    config: TrainConfig, input_shape: Sequence[int], device: torch.device
) -> torch.Tensor | None:
    """A zero batch for rules whose feedback must exist before the optimiser (``dkp``), and for
    module-wise DFA (its operators are checked, and refused if too large, before the run starts)."""
    method = Rule(config.method)
    module_wise = config.scope is Scope.MODULE and method is not Rule.BP
    if not module_wise and not (method.is_direct and method.learns_feedback):
        return None
    x = torch.zeros(2, *input_shape, device=device)
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last else x


def _add_learned_feedback(
    optimizer: torch.optim.Optimizer, engine: DFAEngine, *, tell: bool
) -> None:
    """Learned feedback (``kp``, ``dkp``) joins the optimiser as one more parameter group with its
    defaults (learning rate, weight decay, momentum: the Kolen-Pollack rule needs ``B`` to receive
    the same update as ``W``), unless the optimiser already holds it. ``tell``: warn when the group
    added here has no weight decay (a group an optimiser factory made itself is not checked)."""
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    learned = [p for p in engine.parameters() if p.requires_grad and id(p) not in held]
    if learned:
        optimizer.add_param_group({"params": learned})
        if tell and not optimizer.param_groups[-1].get("weight_decay"):
            warn(
                "the learned feedback (kp, dkp) trains without weight decay, so it never forgets "
                "its random start (for kp, W - B never shrinks), which the Kolen-Pollack rule "
                "relies on; give it weight decay (--weight-decay), e.g. 1e-4 as the experiment "
                "files do"
            )


def _learning_rate(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` (0 at the first step, 1 at the end of training)."""
    if config.schedule is Schedule.COSINE:
        return config.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return config.lr


def _inputs(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def evaluate(
    model: nn.Module,
    loader: BatchLoader,
    *,
    channels_last: bool = False,
    loss_fn: LossFn | None = None,
) -> tuple[float, float]:
    """Mean loss (cross-entropy unless ``loss_fn``, a batch-mean loss, is given) and accuracy of
    ``model`` over ``loader`` (eval mode, no gradients)."""
    loss_sum, correct, seen = _evaluation_sums(model, loader, channels_last, loss_fn)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


@torch.no_grad()  # for evaluate() and the trainer alike: no graph for a backward never run
def _evaluation_sums(
    model: nn.Module, loader: BatchLoader, channels_last: bool, loss_fn: LossFn | None
) -> tuple[float, int, int]:
    """Summed loss, correct predictions and examples seen over ``loader``."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    try:
        for x, y in loader:
            logits = model(_inputs(x, channels_last))
            if loss_fn is None:
                loss_sum += cross_entropy(logits, y, reduction="sum").item()
            else:
                loss_sum += loss_fn(logits, y).item() * y.numel()
            correct += int((logits.argmax(-1) == y).sum())
            seen += y.numel()
    finally:
        model.train(was_training)
    return loss_sum, correct, seen


# -- files -------------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    """``git ARGS`` in this package's folder: its output, or ``None`` outside a checkout."""
    try:
        out = subprocess.run(
            ["git", *args],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _git_commit() -> str | None:
    return _git("rev-parse", "HEAD") or None


def _git_dirty() -> bool | None:
    """Whether tracked files differ from the commit (the record's code is not that commit's)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


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
        "git_dirty": _git_dirty(),
        "argv": [portable_path(a) for a in sys.argv],
    }


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder (empty if none yet)."""
    return RunDir(run_dir).read_metrics()


def _save(
    run: RunDir, built: _Run, state: TrainState, callbacks: Sequence[Callback], batch: int
) -> None:
    """Checkpoint: ``state.epoch`` epochs done plus ``batch`` batches of the next. Written by rank
    0 (every rank holds the same weights, optimiser and engine) with every rank's RNG states."""
    rng = gather_objects(get_rng_states(), built.group)
    if not built.group.is_main:
        return
    checkpoint = {
        "format": 1,
        "config": state.config.to_dict(),
        "model": built.model.state_dict(),
        "optimizer": built.optimizer.state_dict(),
        "engine": built.engine.state_dict(),
        "rng": rng[0],
        "rank_rng": rng,
        "epoch": state.epoch,
        "batch": batch,
        "history": state.history,
        "partial": state.partial if batch else _fresh(),
        "callbacks": [{"name": type(c).__name__, "state": c.state_dict()} for c in callbacks],
    }
    atomic_write(run.checkpoint, lambda fh: torch.save(checkpoint, fh))
    where = f"after epoch {state.epoch}"
    state.checkpoint_at = where if not batch else f"{where} and {batch} batches of the next"


def _write_metrics(run: RunDir, history: list[dict[str, Any]], group: ProcessGroup) -> None:
    if not group.is_main:
        return
    text = "".join(json.dumps(h) + "\n" for h in history)
    atomic_write(run.metrics, lambda fh: fh.write(text), mode="w")


# -- the loop ----------------------------------------------------------------------------------


class _StopRequest:
    requested = False


def _agreed_stop(stop: _StopRequest, built: _Run) -> bool:
    """Whether any rank was asked to stop (all ranks must stop at the same step)."""
    return bool(all_reduce_sum([float(stop.requested)], built.group, built.device)[0])


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
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


def _resolve_config(
    config: TrainConfig | None, run: RunDir, *, resume: bool, epochs: int | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's configuration and, when resuming, its checkpoint."""
    checkpoint = None
    if resume and run.checkpoint.exists():
        checkpoint = run.load_checkpoint()
        saved = TrainConfig.from_dict(checkpoint["config"])
        if config is not None and config.to_dict() != saved.to_dict():
            given = config.to_dict()
            diff = {k: (v, given[k]) for k, v in saved.to_dict().items() if given[k] != v}
            raise ValueError(f"{run} was trained with another config (saved, given): {diff}")
        config = saved
    elif resume and config is None:
        if not run.config.exists():
            raise FileNotFoundError(f"nothing to resume in {run}: no checkpoint or config.json")
        config = TrainConfig.from_dict(run.read_config())
    elif not resume and run.checkpoint.exists():
        raise FileExistsError(f"{run} already holds a run; resume it or choose another folder")
    if config is None:
        raise ValueError("train() needs a config unless it resumes a run")
    if epochs is not None:
        config = dataclasses.replace(config, epochs=epochs)
    return config, checkpoint


def _restore(
    built: _Run, state: TrainState, checkpoint: dict[str, Any], callbacks: Sequence[Callback]
) -> None:
    built.model.load_state_dict(checkpoint["model"])
    built.engine.load_state_dict(checkpoint["engine"])
    built.optimizer.load_state_dict(checkpoint["optimizer"])
    group, saved_rng = built.group, checkpoint.get("rank_rng") or [checkpoint["rng"]]
    if len(saved_rng) != group.world_size and group.is_main:
        warn(
            f"resuming a run of {len(saved_rng)} process(es) with {group.world_size}: same data "
            "and updates, but dropout draws differ from an uninterrupted run"
        )
    set_rng_states(saved_rng[group.rank] if len(saved_rng) == group.world_size else saved_rng[0])
    state.history = list(checkpoint["history"])
    state.start_epoch, state.start_batch = checkpoint["epoch"], checkpoint["batch"]
    state.partial = {**_fresh(), **checkpoint["partial"]}
    where = f"after epoch {state.start_epoch}"
    state.checkpoint_at = where if not state.start_batch else f"{where} and more"
    # by position, checked by class name: two callbacks of one class keep their own states
    for callback, saved in zip(callbacks, checkpoint.get("callbacks", [])):
        if saved["name"] != type(callback).__name__:
            raise ValueError(
                f"the checkpoint's callbacks {[s['name'] for s in checkpoint['callbacks']]} do "
                f"not match this run's {[type(c).__name__ for c in callbacks]}: resume with the "
                "same callbacks"
            )
        callback.load_state_dict(saved["state"])


def _write_meta(run: RunDir, built: _Run, config: TrainConfig) -> None:
    if not built.group.is_main:
        return
    stats = model_stats(built.model, built.splits.input_shape)
    meta = {
        "config": config.to_dict(),
        "environment": environment(),
        "distributed": built.group.to_dict(),
        "model": {"params": stats.params, "macs_per_sample": stats.macs},
        "engine": {
            "rules": {k: v.value for k, v in built.engine.rules.items()},
            "output_layer": built.engine.layers[-1].name,
        },
        "data": {
            "train_examples": len(built.train_loader.dataset),
            "eval_examples": built.eval_sizes,
            "augment": built.train_loader.augment,
        },
    }
    atomic_write(run.config, lambda fh: fh.write(json.dumps(meta, indent=2)), mode="w")


def train(
    config: TrainConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    epochs: int | None = None,
    progress: bool = True,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    loss_fn: LossFn | None = None,
    optimizer_factory: OptimizerFactory | None = None,
    callbacks: Sequence[Callback] = (),
    error_transforms: Sequence[Transform] = (),
    signal_transforms: Sequence[Transform] = (),
    ddp: DDPOptions | None = None,
    model_transform: ModelTransform | None = None,
) -> RunResult:
    """Train a model as ``config`` says, writing ``run_dir`` (see the module docstring).

    Data-parallel when started in several processes (``torchrun --nproc-per-node N``, ``dfatorch
    train --nproc N``, or a process group the caller initialised; see
    :mod:`dfatorch.distributed`): each global batch of ``config.batch_size`` examples is shared by
    the ranks, gradients are averaged by ``DistributedDataParallel`` so that the update is the
    one-process update on the same batch, evaluation is summed over the ranks, and rank 0 alone
    writes the run folder. Every rank returns the same result.

    Args:
        config: the run's configuration; ``None`` with ``resume=True`` reads ``config.json``.
        run_dir: the run's folder (created once the data and model are built: a run that fails
            before leaves nothing behind).
        resume: continue the run in ``run_dir`` from its checkpoint; without a checkpoint the run
            starts from scratch.
        epochs: with ``resume``, a new total number of epochs (to extend a finished run).
        progress: show a progress bar with loss, accuracy and images per second.
        on_epoch: called with each epoch's record.
        loss_fn: the training loss ``loss_fn(logits, targets)``, a batch mean (default:
            cross-entropy); also the evaluation loss when given.
        optimizer_factory: builds the optimiser from ``(model, config)`` (default:
            :func:`make_optimizer`). The schedule sets each parameter group's ``lr`` every step.
        callbacks: added after the ones the config asks for (:func:`default_callbacks`).
        error_transforms, signal_transforms: passed to :func:`~dfatorch.engine.attach`; their
            state (a noise generator) is saved in the checkpoint with the engine's. A resume needs
            the same ``loss_fn``, ``optimizer_factory``, callbacks and transforms.
        ddp: how the model is wrapped in ``DistributedDataParallel`` when data-parallel.
        model_transform: applied to the model ``config`` builds (initialised from its seed),
            before the engine attaches and the optimiser is made: e.g. to convert its layers to
            another library's (``benchmarks/biotorch_peer.py``). A resume needs the same one.

    Raises:
        TrainingDiverged: the loss exploded or became NaN/inf (``NonFiniteLossError``); the last
            checkpoint is kept.
        RankLost: data-parallel, another process of the job stopped; the last checkpoint is
            kept.
        FileExistsError: ``run_dir`` holds another run and ``resume`` is false.
        CheckpointError: the checkpoint to resume from is unreadable.
    """
    run = RunDir(run_dir)
    config, checkpoint = _resolve_config(config, run, resume=resume, epochs=epochs)
    with process_group(resolve_device(config.device)) as group, flush_denormals():
        try:
            return _train(
                config, run, checkpoint, group,
                _build(config, optimizer_factory, (error_transforms, signal_transforms), group,
                       ddp, model_transform, training=True),
                progress=progress and group.is_main,
                on_epoch=on_epoch if group.is_main else None,
                loss_fn=loss_fn,
                callbacks=callbacks,
            )  # fmt: skip
        except RuntimeError as exc:
            if not (group.enabled and lost_contact(exc)):
                raise
            kept = f"the last checkpoint is kept: {run.checkpoint}" if run.checkpoint.exists() \
                else "no checkpoint was written yet"  # fmt: skip
            cause = str(exc).strip().splitlines()[0].split("] ", 1)[-1].split(". ")[0][:120]
            raise RankLost(
                f"lost contact with the other processes of the job ({cause}); {kept}"
            ) from exc


def _train(
    config: TrainConfig,
    run: RunDir,
    checkpoint: dict[str, Any] | None,
    group: ProcessGroup,
    built: _Run,
    *,
    progress: bool,
    on_epoch: Callable[[dict[str, Any]], None] | None,
    loss_fn: LossFn | None,
    callbacks: Sequence[Callback],
) -> RunResult:
    hooks = [*default_callbacks(config), *callbacks]
    eval_loss = loss_fn  # None: cross-entropy summed exactly, as evaluate() does by default
    state = TrainState(
        config=config,
        run_dir=run.path,
        model=built.model,
        engine=built.engine,
        optimizer=built.optimizer,
        loss_fn=loss_fn or cross_entropy,
        steps_per_epoch=len(built.train_loader),
        partial=_fresh(),
        group=group,
        train_size=len(built.train_loader.dataset),
    )
    if checkpoint is not None:
        _restore(built, state, checkpoint, hooks)
    if group.is_main:
        run.path.mkdir(parents=True, exist_ok=True)
    _write_meta(run, built, config)
    # the checkpoint's history is the truth after a kill -9
    _write_metrics(run, state.history, built.group)
    for callback in hooks:
        callback.on_train_start(state)

    built.model.train()
    interrupted = False
    with _graceful_interrupt() as stop:
        for epoch in range(state.start_epoch, config.epochs):
            state.epoch = epoch
            first = state.start_batch if epoch == state.start_epoch else 0
            if first == 0:
                state.partial = _fresh()
            if not _train_epoch(state, built, hooks, run, first=first, stop=stop, bar=progress):
                interrupted = True
                break
            record = _end_epoch(state, built, hooks, eval_loss)
            state.history.append(record)
            state.epoch = epoch + 1
            _save(run, built, state, hooks, batch=0)
            _write_metrics(run, state.history, built.group)
            if on_epoch is not None:
                on_epoch(record)
            if _agreed_stop(stop, built):
                interrupted = epoch + 1 < config.epochs
                break
    return RunResult(run.path, config, state.history, interrupted=interrupted,
                     stop_requested=interrupted or stop.requested)  # fmt: skip


def _train_epoch(
    state: TrainState,
    built: _Run,
    callbacks: Sequence[Callback],
    run: RunDir,
    *,
    first: int,
    stop: _StopRequest,
    bar: bool,
) -> bool:
    """Train one epoch from batch ``first``; ``False`` if Ctrl-C stopped it (checkpoint saved)."""
    config, optimizer, group = state.config, built.optimizer, built.group
    partial = state.partial
    total_steps = state.steps_per_epoch * config.epochs
    built.train_loader.set_epoch(state.epoch, start_batch=first)
    state.batch_index = first
    started = time.perf_counter() - partial["seconds"]
    desc = f"epoch {state.epoch + 1}/{config.epochs}"
    with progress_bar(
        state.steps_per_epoch, desc, bar, leave=False, dynamic_ncols=True
    ) as progress:
        progress.update(first)
        for x, y in built.train_loader:
            state.x, state.y = _inputs(x, config.channels_last), y
            for callback in callbacks:
                callback.on_batch_start(state)
            for param_group in optimizer.param_groups:
                param_group["lr"] = _learning_rate(config, state.step / total_steps)
            optimizer.zero_grad(set_to_none=True)
            with contextlib.ExitStack() as around:
                for callback in callbacks:
                    around.enter_context(callback.step_context(state))
                state.logits = built.forward(state.x)
                state.loss = state.loss_fn(state.logits, y)
                if group.enabled:  # DDP averages the ranks' gradients: scale to the global mean
                    total = built.train_loader.global_batch_size(state.batch_index)
                    state.loss_scale = shard_loss_scale(len(y), total, group.world_size)
                    (state.loss * state.loss_scale).backward()
                else:
                    state.loss.backward()
            if group.enabled:  # learned feedback lives outside the model DDP wraps
                average_gradients(built.engine.parameters(), group)
            # every rank sees the global batch's loss (callbacks decide alike) and the same stop
            local_loss = state.loss.item()  # one device sync for the loss per step
            loss_sum, seen, correct, stops = all_reduce_sum(
                [
                    local_loss * y.numel(),  # examples, or predicted steps (per-step labels)
                    y.numel(),
                    int((state.logits.detach().argmax(-1) == y).sum()),
                    float(stop.requested),
                ],
                group,
                built.device,
            )
            state.loss_value = loss_sum / seen if group.enabled else local_loss
            for callback in callbacks:
                callback.after_backward(state)
            for callback in callbacks:
                callback.before_step(state)
            optimizer.step()
            for callback in callbacks:
                callback.after_step(state)
            partial["loss_sum"] += loss_sum
            partial["correct"] += int(correct)
            partial["seen"] += int(seen)
            state.logits = state.loss = None  # let the graph go
            state.batch_index += 1
            elapsed = time.perf_counter() - started
            progress.update(1)
            progress.set_postfix(
                loss=f"{partial['loss_sum'] / partial['seen']:.3f}",
                acc=f"{partial['correct'] / partial['seen']:.3f}",
                img_s=f"{partial['seen'] / max(elapsed, 1e-9):.0f}",
                refresh=False,
            )
            if stops:  # Ctrl-C: stop at this step boundary, resumable exactly
                partial["seconds"] = elapsed
                _save(run, built, state, callbacks, batch=state.batch_index)
                return False
    partial["seconds"] = time.perf_counter() - started
    return True


def _end_epoch(
    state: TrainState, built: _Run, callbacks: Sequence[Callback], eval_loss: LossFn | None
) -> dict[str, Any]:
    """Evaluate and build the epoch's record."""
    config, partial, epoch = state.config, state.partial, state.epoch
    record: dict[str, Any] = {
        "epoch": epoch + 1,
        "train_loss": partial["loss_sum"] / max(partial["seen"], 1),
        "train_acc": partial["correct"] / max(partial["seen"], 1),
    }
    scheduled = (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs
    for split in ("test", "val"):
        loader = built.eval_loaders.get(split)
        if loader is not None and scheduled:
            sums = _evaluation_sums(built.model, loader, config.channels_last, eval_loss)
            loss_sum, correct, seen = all_reduce_sum(sums, built.group, built.device)
            record[f"{split}_loss"] = loss_sum / max(seen, 1)
            record[f"{split}_acc"] = int(correct) / max(seen, 1)
            if built.splits.per_step:  # language modelling: bits per character
                record[f"{split}_bpc"] = record[f"{split}_loss"] / math.log(2)
        elif loader is not None or split == "test":
            record[f"{split}_loss"] = record[f"{split}_acc"] = None
    for callback in callbacks:
        callback.on_epoch_end(state, record)
    seconds = partial["seconds"]
    record.update(
        epoch_seconds=seconds,
        images_per_second=partial["seen"] / max(seconds, 1e-9),
        lr=built.optimizer.param_groups[0]["lr"],
    )
    return record


def probe_batch(
    run_dir: str | Path, *, batch_size: int = 256, split: str = "train"
) -> tuple[DFAEngine, torch.Tensor, torch.Tensor, Callable[..., torch.Tensor]]:
    """The model and engine of a saved run, restored from its checkpoint, with one batch of its
    data (the first of a seeded shuffle, not augmented) and its loss: what alignment probes need."""
    checkpoint = RunDir(run_dir).load_checkpoint()
    config = TrainConfig.from_dict(checkpoint["config"])
    run = _build(config)
    run.model.load_state_dict(checkpoint["model"])
    run.engine.load_state_dict(checkpoint["engine"])
    dataset = run.train_loader.dataset if split == "train" else run.splits.test
    loader = BatchLoader(dataset, batch_size, shuffle=True, augment=False, mean=run.splits.mean,
                         std=run.splits.std, seed=config.seed, device=run.device)  # fmt: skip
    x, y = next(iter(loader))
    return run.engine, _inputs(x, config.channels_last), y, cross_entropy


def is_finished(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run that completed all its epochs."""
    return RunDir(run_dir).is_finished()


def summarize(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Final and best evaluation accuracy (test if evaluated, else validation), final loss, epochs
    and mean seconds per epoch of a run's history; for language modelling also the final bits per
    character (``final_bpc``)."""
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
        "final_bpc": evaluated[-1].get(f"{split}_bpc") if evaluated else None,
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
