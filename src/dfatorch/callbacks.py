"""Trainer callbacks: what a method adds to the training loop, at named points of one step.

One training step of :func:`dfatorch.train.train` runs::

    on_batch_start        every callback, in order
    with step_context:    every callback's context, nested in order (saved-tensor hooks, probes)
        forward, loss, loss.backward()
    after_backward        gradients are there, untouched (diagnostics, divergence checks)
    before_step           may change gradients (a preconditioner)
    optimizer.step()
    after_step
    ...
    on_epoch_end          may add keys to the epoch's record

Each hook receives the :class:`TrainState`. A callback whose state must survive a resume returns
it from :meth:`Callback.state_dict` (plain values and tensors): it is saved in the checkpoint.
The built-in ones are made from the configuration (:func:`default_callbacks`): norm-matched
calibration, alignment probes and the divergence guard.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .alignment import gradient_alignment, unit_statistics
from .distributed import ProcessGroup, gather_batch
from .engine import DFAEngine, get_rng_states
from .rundir import RunDir

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = [
    "AlignmentProbe",
    "Callback",
    "DivergenceGuard",
    "NonFiniteLossError",
    "NormMatchedCalibration",
    "TrainState",
    "TrainingDiverged",
    "default_callbacks",
]


class TrainingDiverged(RuntimeError):
    """The loss exploded; the run stopped and its last checkpoint (if any) was kept."""


class NonFiniteLossError(TrainingDiverged):
    """The loss became NaN or infinite."""


@dataclass
class TrainState:
    """What the loop knows at a callback point. ``x``, ``y``, ``logits``, ``loss`` and
    ``loss_value`` describe the step in progress; ``partial`` holds the epoch's running sums and
    is saved in the checkpoint (a callback may keep per-epoch lists there). When data-parallel,
    ``x``, ``y``, ``logits`` and ``loss`` are this rank's share and ``loss_value`` (set after the
    backward pass) is the whole batch's mean loss, the same on every rank."""

    config: TrainConfig
    run_dir: Path
    model: nn.Module
    engine: DFAEngine
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    steps_per_epoch: int
    start_epoch: int = 0
    start_batch: int = 0
    epoch: int = 0
    batch_index: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    partial: dict[str, Any] = field(default_factory=dict)
    x: Tensor | None = None
    y: Tensor | None = None
    #: the data-parallel process group (``x`` and ``y`` are this rank's share of the batch)
    group: ProcessGroup = field(default_factory=ProcessGroup)
    #: training examples (the whole training set, not one rank's share)
    train_size: int = 0
    logits: Tensor | None = None
    loss: Tensor | None = None
    loss_value: float = math.nan
    #: the factor on ``loss`` before ``backward()`` (data-parallel: the shard's share; else 1)
    loss_scale: float = 1.0
    #: where the checkpoint on disk stands, e.g. "after epoch 3" (None: no checkpoint yet)
    checkpoint_at: str | None = None

    @property
    def step(self) -> int:
        """The global step index of the step in progress (0-based)."""
        return self.epoch * self.steps_per_epoch + self.batch_index


class Callback:
    """Base class: override the hooks you need (see the module docstring for the order)."""

    def on_train_start(self, state: TrainState) -> None:
        """Once, after the model is built and a checkpoint (if any) restored."""

    def on_batch_start(self, state: TrainState) -> None:
        """Before the forward pass; ``state.x`` and ``state.y`` are the batch."""

    def step_context(self, state: TrainState) -> contextlib.AbstractContextManager[Any]:
        """A context entered around forward and backward (for example saved-tensor hooks)."""
        return contextlib.nullcontext()

    def after_backward(self, state: TrainState) -> None:
        """After ``loss.backward()``; parameter gradients are untouched."""

    def before_step(self, state: TrainState) -> None:
        """Just before ``optimizer.step()``; may change the gradients."""

    def after_step(self, state: TrainState) -> None:
        """After ``optimizer.step()``."""

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        """After evaluation; may add keys to ``record`` (the line of ``metrics.jsonl``)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


class NormMatchedCalibration(Callback):
    """``init="norm_matched"``: calibrate the feedback scales on the first batch (the whole
    global batch on every rank when data-parallel, so that the ranks' scales agree)."""

    def on_batch_start(self, state: TrainState) -> None:
        if not state.engine.calibrated:
            assert state.x is not None and state.y is not None
            x, y = gather_batch(state.x, state.y, state.group)
            state.engine.calibrate(x, y, state.loss_fn)


class AlignmentProbe(Callback):
    """Every ``every`` steps, the gradient alignment of each hidden layer (one extra BP pass on
    the same batch, weights and randomness), kept in the epoch's record under ``alignment``: per
    layer the cosine's ``mean`` and ``std`` over the batch, ``weight_angle``, the signal ``scale``
    and the layer output's ``dead`` fraction and ``norm`` (:mod:`dfatorch.alignment`; the output
    is the next layer's input, after activation, pooling and dropout). Measured on the probe batch
    (data-parallel: rank 0's share), so ``dead`` is lower on larger batches."""

    def __init__(self, every: int) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self._slots: list[Tensor | None] | None = None
        self._units: list[tuple[float, float]] = []
        self._rng: dict[str, Any] | None = None

    def _due(self, state: TrainState) -> bool:
        return state.step % self.every == 0

    @contextlib.contextmanager
    def step_context(self, state: TrainState) -> Iterator[None]:
        if not self._due(state):
            yield
            return
        self._rng = get_rng_states()  # the probe replays this step's randomness (dropout)
        with state.engine.recording() as slots, state.engine.capturing() as outputs:
            self._slots = slots
            yield
            # now, so that the outputs are not held through the probe's extra pass
            self._units = [unit_statistics(h) for h in outputs]

    def after_backward(self, state: TrainState) -> None:
        if not self._due(state):
            return
        delivered = self._slots
        if delivered is not None and state.loss_scale != 1.0:  # the shard's share: undo it
            delivered = [None if d is None else d / state.loss_scale for d in delivered]
        layers = gradient_alignment(
            state.engine, state.x, state.y, state.loss_fn, delivered=delivered,
            rng_state=self._rng,
        )  # fmt: skip
        if len(self._units) != len(layers):
            raise RuntimeError(
                f"alignment probe: captured {len(self._units)} layer outputs for {len(layers)} "
                "hidden layers"
            )
        compact = {}
        for a, (dead, norm) in zip(layers, self._units):
            compact[a.name] = {
                "mean": a.mean, "std": a.std, "weight_angle": a.weight_angle, "scale": a.scale,
                "dead": dead, "norm": norm,
            }  # fmt: skip
        state.partial.setdefault("alignment", []).append({"step": state.step, "layers": compact})
        self._slots = self._rng = None
        self._units = []

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        record["alignment"] = state.partial.get("alignment", [])


class DivergenceGuard(Callback):
    """Stop a run whose loss explodes, before the optimiser applies the step.

    A non-finite loss always stops the run. With ``factor > 0`` it also stops when the
    exponential moving average of the training loss (decay 0.9) exceeds ``factor`` times the loss
    of the run's first step (the untrained model's). Both raise :class:`TrainingDiverged` (a
    non-finite loss :class:`NonFiniteLossError`) with a message naming the checkpoint that is kept.
    Meant for runs from scratch: a fine-tuning run that starts near zero loss wants ``factor=0``.
    """

    def __init__(self, factor: float = 3.0, *, decay: float = 0.9) -> None:
        self.factor, self.decay = float(factor), float(decay)
        self.reference: float | None = None
        self.average: float | None = None

    def after_backward(self, state: TrainState) -> None:
        value = state.loss_value
        where = f"epoch {state.epoch + 1}, batch {state.batch_index + 1}"
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"the loss became {value} at {where}; stopped. {_kept(state)}; try a lower "
                "learning rate or a smaller feedback gain"
            )
        if self.factor <= 0:
            return
        if self.reference is None:
            self.reference = self.average = value
            return
        assert self.average is not None
        self.average = self.decay * self.average + (1 - self.decay) * value
        if self.average > self.factor * self.reference:
            raise TrainingDiverged(
                f"the training loss diverged at {where}: its moving average {self.average:.4g} "
                f"is over {self.factor:g}x the first step's {self.reference:.4g}; stopped. "
                f"{_kept(state)}; try a lower learning rate (or --divergence-factor 0 to "
                "train on regardless)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference, "average": self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference, self.average = state["reference"], state["average"]


def _kept(state: TrainState) -> str:
    path = RunDir(state.run_dir).checkpoint
    if state.checkpoint_at is None or not path.exists():
        return "No checkpoint was written (it diverged before the end of the first epoch)"
    return f"The last checkpoint is kept: {path} ({state.checkpoint_at})"


def default_callbacks(config: TrainConfig) -> list[Callback]:
    """The callbacks a configuration asks for, in the order the loop runs them."""
    callbacks: list[Callback] = []
    if config.init == "norm_matched":
        callbacks.append(NormMatchedCalibration())
    if config.align_every > 0:
        callbacks.append(AlignmentProbe(config.align_every))
    callbacks.append(DivergenceGuard(config.divergence_factor))
    if config.private:
        from .privacy import DifferentialPrivacy  # it imports this module

        callbacks.append(
            DifferentialPrivacy(
                clip=config.clip,
                delta=config.delta,
                batch_size=config.batch_size,
                noise_multiplier=config.noise_multiplier,
                target_epsilon=config.target_epsilon,
                seed=config.seed,
                engine=config.private_engine,
            )
        )
    if config.preconditioner == "kfac":
        from .kfac import KFACCallback  # it imports this module

        callbacks.append(KFACCallback(**config.kfac_options()))
    if config.activation_bits != 32:
        from .compression import ActivationCompression  # it imports this module

        callbacks.append(ActivationCompression(config.activation_bits))
    return callbacks
