"""Differentially private training for every method: DP-SGD for BP, DP-DFA and DP-BDFA for the
feedback methods, one mechanism.

**Mechanism** (the Gaussian mechanism of DP-SGD, Abadi et al. 2016, applied to whatever update
the method computes). Each step samples a batch by Poisson sampling (every training example joins
independently with probability ``q = batch_size / N``; :class:`~dfatorch.data.BatchLoader` with
``poisson=True``). Per example ``i`` the method's update of every parameter is computed, by
opacus's ``GradSampleModule`` hooks: under BP it is the example's gradient; under DFA the hooks see
the signal the engine delivers, so a hidden layer's per-example update is
``((e_i B_l) * f'(a_l,i)) h_{l-1,i}^T`` and the output layer's is its true per-example gradient
(the tests check both against those formulas). Each example's update, all parameters
together, is clipped to norm ``clip``; the clipped updates are summed, Gaussian noise of standard
deviation ``noise_multiplier * clip`` is added to every coordinate, and the sum is divided by the
expected batch size ``q N`` (opacus's ``DPOptimizer.pre_step``, which this module calls). Adding
or removing one example changes the clipped sum by at most ``clip``: that is the sensitivity the
accountant uses.

**Why the noise is on the update and not on the projection** (as in Ohana et al. 2021's photonic
DFA): noise added to ``e B`` reaches the update multiplied by ``f'(a_l)`` and ``h_{l-1}``, which
depend on the data, so its privacy needs a data-dependent bound (they clip the signal and bound
the activations to get one). Clipping each example's whole update and adding the noise after the
sum gives the plain Gaussian mechanism, which a maintained accountant composes exactly, with no
assumption on the activations. Batch norm mixes examples within a batch, which this analysis does
not allow: refused (use group norm).

**Accounting**: Google's ``dp-accounting`` RDP accountant composes the Poisson-subsampled
Gaussian mechanism over the steps taken (:class:`PrivacyAccountant`); ``noise_for_epsilon``
searches the noise multiplier that ends training at a target epsilon, with that accountant.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .callbacks import Callback, TrainState

__all__ = [
    "DifferentialPrivacy",
    "PrivacyAccountant",
    "check_private_model",
    "noise_for_epsilon",
]


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    from dp_accounting import dp_event, rdp

    if steps == 0:
        return 0.0
    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, steps)
    return float(accountant.get_epsilon(delta))


class PrivacyAccountant:
    """The privacy spent by ``steps`` Poisson-subsampled Gaussian steps (``dp-accounting``'s RDP
    accountant): ``epsilon(delta)`` after :meth:`step` was called ``steps`` times."""

    def __init__(self, noise_multiplier: float, sample_rate: float) -> None:
        if noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.noise_multiplier = float(noise_multiplier)
        self.sample_rate = float(sample_rate)
        self.steps = 0

    def step(self, count: int = 1) -> None:
        self.steps += count

    def epsilon(self, delta: float, *, steps: int | None = None) -> float:
        """Epsilon at ``delta`` after the steps taken (or after ``steps``)."""
        n = self.steps if steps is None else steps
        return _rdp_epsilon(self.noise_multiplier, self.sample_rate, n, delta)

    def state_dict(self) -> dict[str, Any]:
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
                "steps": self.steps}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.noise_multiplier = float(state["noise_multiplier"])
        self.sample_rate = float(state["sample_rate"])
        self.steps = int(state["steps"])


def noise_for_epsilon(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, *, tolerance: float = 0.005
) -> float:
    """The smallest noise multiplier (within ``tolerance``, relative) whose ``steps`` steps at
    ``sample_rate`` spend at most ``target_epsilon`` at ``delta`` (bisection on the accountant)."""
    if target_epsilon <= 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    low, high = 0.0, 1.0
    while _rdp_epsilon(high, sample_rate, steps, delta) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"no noise multiplier reaches epsilon {target_epsilon} in {steps} "
                             "steps")  # fmt: skip
    while high - low > tolerance * high:
        mid = (low + high) / 2
        if mid > 0 and _rdp_epsilon(mid, sample_rate, steps, delta) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


def check_private_model(model: nn.Module) -> None:
    """Refuse modules that mix examples (batch norm) or that opacus cannot give per-example
    updates for: ``ValueError`` naming the first one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"layer {name!r} is batch norm, whose statistics mix the examples of a batch: "
                "not differentially private; use group norm (nn.GroupNorm) or no normalisation"
            )
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise ValueError(f"not trainable privately: {str(errors[0]).splitlines()[0]}")


class DifferentialPrivacy(Callback):
    """Clip each example's update, add calibrated Gaussian noise, count the privacy spent.

    Args:
        clip: the bound on each example's update norm (all parameters together).
        delta: the delta of the reported (epsilon, delta); below ``1 / N``.
        batch_size: the expected batch size ``q N`` of the Poisson sampling (the trainer's
            ``batch_size``): the sampling probability is ``q = batch_size / N``, and the noisy sum
            is divided by it.
        noise_multiplier: the noise's standard deviation over ``clip``; or ``None`` with
            ``target_epsilon``: found by the accountant for the run's total steps when training
            starts, and kept (saved) from then on.
        target_epsilon: the budget; training refuses to start (or resume) if its planned steps
            would spend more.
        seed: seeds the noise generator (its state is saved: a resumed run draws the same noise).

    Each epoch's record gains ``epsilon`` and ``noise_multiplier``.
    """

    def __init__(
        self,
        *,
        clip: float,
        delta: float,
        batch_size: int,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        seed: int = 0,
    ) -> None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        if (noise_multiplier is None) == (target_epsilon is None):
            raise ValueError("give exactly one of noise_multiplier and target_epsilon")
        if target_epsilon is not None and target_epsilon <= 0:
            raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
        if noise_multiplier is not None and noise_multiplier <= 0:
            raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
        self.clip, self.delta, self.batch_size = float(clip), float(delta), int(batch_size)
        self.target_epsilon = target_epsilon
        self.noise_multiplier = noise_multiplier
        self.accountant: PrivacyAccountant | None = None
        self.seed = seed
        self.generator: torch.Generator | None = None  # on the model's device, at the start
        self._saved_generator: torch.Tensor | None = None
        self._samples: Any = None  # opacus GradSampleModule: per-example update hooks
        self._dp: Any = None  # opacus DPOptimizer: clip, noise and scale

    # -- set-up ----------------------------------------------------------------------------

    def on_train_start(self, state: TrainState) -> None:
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        if state.group.enabled:
            raise ValueError("private training runs in one process (data-parallel: not yet)")
        check_private_model(state.model)
        n = state.train_size
        if not 0 < self.batch_size <= n:
            raise ValueError(f"batch size {self.batch_size} must be in 1..{n} (training examples)")
        if self.delta >= 1 / n:
            raise ValueError(
                f"delta {self.delta:g} must be below 1/N = {1 / n:.3g} (N = {n} training "
                "examples): a larger delta allows leaking one example"
            )
        total_steps = state.steps_per_epoch * state.config.epochs
        if self.accountant is None:  # not restored from a checkpoint
            sigma = self.noise_multiplier
            if sigma is None:
                assert self.target_epsilon is not None
                sigma = noise_for_epsilon(self.target_epsilon, self.delta, self.batch_size / n,
                                          total_steps)  # fmt: skip
            self.accountant = PrivacyAccountant(sigma, self.batch_size / n)
        if self.target_epsilon is not None:
            planned = self.accountant.epsilon(self.delta, steps=total_steps)
            if planned > self.target_epsilon * (1 + 1e-9):
                raise ValueError(
                    f"training to {state.config.epochs} epochs ({total_steps} steps) at noise "
                    f"multiplier {self.accountant.noise_multiplier:.4g} would spend epsilon "
                    f"{planned:.3f} > the target {self.target_epsilon:g} (delta "
                    f"{self.delta:g}); stop earlier or start a new run with the longer plan"
                )
        self._samples = GradSampleModule(state.model, batch_first=True, loss_reduction="mean")
        self._samples.disable_hooks()  # on only for the step's own forward and backward
        device = next(state.model.parameters()).device
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        if self._saved_generator is not None:
            self.generator.set_state(self._saved_generator)
        self._dp = DPOptimizer(
            state.optimizer,
            noise_multiplier=self.accountant.noise_multiplier,
            max_grad_norm=self.clip,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
            generator=self.generator,
        )

    # -- each step -------------------------------------------------------------------------

    def on_batch_start(self, state: TrainState) -> None:
        for p in state.model.parameters():
            p.grad_sample = None
            p.summed_grad = None

    @contextlib.contextmanager
    def step_context(self, state: TrainState) -> Iterator[None]:
        self._samples.enable_hooks()
        try:
            with warnings.catch_warnings():
                # a layer whose input is cut (DFA) or is the data: opacus still gets its
                # gradient at the output, which is all it needs
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield
        finally:
            self._samples.disable_hooks()

    def before_step(self, state: TrainState) -> None:
        # per-example clip, sum, noise, divide by q N: p.grad becomes the private update
        self._dp.pre_step()

    def after_step(self, state: TrainState) -> None:
        assert self.accountant is not None
        self.accountant.step()

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        assert self.accountant is not None
        record["epsilon"] = self.accountant.epsilon(self.delta)
        record["noise_multiplier"] = self.accountant.noise_multiplier

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accountant"] is not None:
            self.accountant = PrivacyAccountant(1.0, 1.0)
            self.accountant.load_state_dict(state["accountant"])
        self._saved_generator = state["generator"]
        if self.generator is not None and self._saved_generator is not None:
            self.generator.set_state(self._saved_generator)
