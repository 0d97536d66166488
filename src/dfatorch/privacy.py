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
import logging
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .callbacks import Callback, TrainState

#: added to each norm in the clip factor ``min(1, clip / (norm + eps))``, as opacus does
_CLIP_EPS = 1e-6

__all__ = [
    "DifferentialPrivacy",
    "PrivacyAccountant",
    "check_private_model",
    "noise_for_epsilon",
]


def _require(module: str) -> Any:
    """Import an optional dependency of private training, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0].replace("_", "-")
        raise ImportError(
            f"private training needs {package}: pip install 'dfatorch[privacy]'"
        ) from None


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    dp_event, rdp = _require("dp_accounting.dp_event"), _require("dp_accounting.rdp")

    if steps == 0:
        return 0.0
    # at small noise some orders do not converge and are left out (a warning each): the epsilon
    # is then from the other orders, still an upper bound
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        accountant = rdp.RdpAccountant()
        gaussian = dp_event.GaussianDpEvent(noise_multiplier)
        accountant.compose(dp_event.PoissonSampledDpEvent(sample_rate, gaussian), steps)
        return float(accountant.get_epsilon(delta))
    finally:
        absl.setLevel(level)


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
    """Refuse modules that mix the examples of a batch (batch norm): ``ValueError`` naming the
    first one."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"layer {name!r} is batch norm, whose statistics mix the examples of a batch: "
                "not differentially private; use group norm (nn.GroupNorm) or no normalisation"
            )


class _NativeUpdates:
    """Per-example updates of ``nn.Linear`` and ``nn.Conv2d`` layers from the layer's input and the
    gradient at its output, which forward and backward hooks keep for the step.

    A linear layer's per-example update is rank one, ``g_i = d_i h_i^T`` (``d_i`` the gradient at
    its output: ``(e_i B_l) * f'(a_l,i)`` under DFA, the back-propagated one under BP), so its norm
    is ``|d_i| sqrt(|h_i|^2 + 1)`` (with a bias) and the clipped sum is one matmul,
    ``(c * d)^T h``: no per-example gradient is ever stored (opacus stores ``N`` of them). A conv
    layer's per-example update is summed over positions and is computed explicitly from the
    unfolded input. Then, as opacus's ``DPOptimizer`` does (same formulas, same noise calls, so the
    same generator gives the same update; a test checks it): clip factors
    ``min(1, clip / (norm_i + eps))``, the clipped sum, ``N(0, (sigma clip)^2)`` noise per
    coordinate, division by the expected batch size.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers: list[nn.Module] = []
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or (
                isinstance(module, nn.Conv2d) and (module.groups != 1 or
                                                   isinstance(module.padding, str))
            ):  # fmt: skip
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}): per-example updates are "
                    "computed for nn.Linear and ungrouped nn.Conv2d layers; use "
                    "private_engine='opacus' for other layers"
                )
            self.layers.append(module)
        self._inputs: dict[nn.Module, torch.Tensor] = {}
        self._grads: dict[nn.Module, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._forward) for m in self.layers]
        self.enabled = False

    def _forward(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        if not (self.enabled and torch.is_grad_enabled()) or not out.requires_grad:
            return
        self._inputs[module] = args[0].detach()

        def keep(grad: torch.Tensor) -> None:
            self._grads[module] = grad.detach()

        out.register_hook(keep)

    def clear(self) -> None:
        self._inputs.clear()
        self._grads.clear()

    def _per_example(self, module: nn.Module, n: int) -> tuple[Any, torch.Tensor]:
        """The layer's per-example factors (for the clipped sum) and squared norms; the gradient
        at the output is multiplied by ``n``: per-example losses, not the batch mean's share."""
        h, d = self._inputs[module], self._grads[module] * n
        bias = module.bias is not None and module.bias.requires_grad
        if isinstance(module, nn.Linear):
            if h.dim() == 2:
                norms = d.pow(2).sum(1) * (h.pow(2).sum(1) + float(bias))
                return ("linear", h, d), norms
            g = torch.einsum("n...o,n...i->noi", d, h)  # sequences: sum over positions
            db = d.reshape(n, -1, d.shape[-1]).sum(1)
            return ("explicit", g, db), g.flatten(1).pow(2).sum(1) + bias * db.pow(2).sum(1)
        assert isinstance(module, nn.Conv2d)
        u = torch.nn.functional.unfold(h, module.kernel_size, module.dilation, module.padding,
                                       module.stride)  # fmt: skip
        g = torch.einsum("nop,nkp->nok", d.flatten(2), u)
        db = d.flatten(2).sum(2)
        return ("explicit", g, db), g.flatten(1).pow(2).sum(1) + bias * db.pow(2).sum(1)

    def clipped_sums(
        self, clip: float
    ) -> tuple[dict[torch.nn.Parameter, torch.Tensor], torch.Tensor]:
        """Every parameter's sum of clipped per-example updates (all layers clipped together), and
        each example's update norm before clipping."""
        missing = [m for m in self.layers if m not in self._grads]
        if missing:
            raise RuntimeError(f"no gradient reached {len(missing)} layer(s) this step")
        n = next(iter(self._grads.values())).shape[0]
        parts = {m: self._per_example(m, n) for m in self.layers}
        norms = torch.stack([sq for _, sq in parts.values()], 1).sum(1).sqrt()
        factors = (clip / (norms + _CLIP_EPS)).clamp(max=1.0)
        sums: dict[torch.nn.Parameter, torch.Tensor] = {}
        for module, ((kind, a, b), _) in parts.items():
            if kind == "linear":
                scaled = b * factors[:, None]
                weight, bias = scaled.t() @ a, scaled.sum(0)
            else:
                weight = torch.einsum("n,nok->ok", factors, a)
                bias = factors @ b
            sums[module.weight] = weight.view_as(module.weight)
            if module.bias is not None and module.bias.requires_grad:
                sums[module.bias] = bias
        return sums, norms


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
        engine: who computes the per-example updates: ``"native"`` (linear and conv layers, from
            the layer's input and output gradient, no per-example gradients stored) or
            ``"opacus"`` (its ``GradSampleModule``, any layer opacus supports, much slower on
            wide layers). Both clip, noise and scale alike.

    Each epoch's record gains ``epsilon`` and ``noise_multiplier``, and two clipping diagnostics
    over the epoch's examples: ``clipped_fraction`` (the share whose update the clip scaled down)
    and ``update_norm_mean`` (the mean norm before clipping); both ``None`` for an epoch resumed
    from a checkpoint that did not count them. Where nearly every update is clipped, the private
    sum is ``clip`` times (a sum of unit vectors + noise of standard deviation
    ``noise_multiplier``), so under SGD the learning rate and the clip act as one knob, their
    product. Like the training loss, the diagnostics read the data without noise: the epsilon
    does not cover them; do not publish them from a private deployment.
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
        engine: str = "native",
    ) -> None:
        if engine not in ("native", "opacus"):
            raise ValueError(f"engine must be 'native' or 'opacus', got {engine!r}")
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
        self.engine = engine
        self._samples: Any = None  # per-example updates: _NativeUpdates or GradSampleModule
        self._dp: Any = None  # opacus DPOptimizer: clip, noise and scale (engine="opacus")
        self._params: list[nn.Parameter] = []
        # this epoch's examples, how many were clipped, the sum of their update norms: summed on
        # the model's device (no host sync per step); unknown for an epoch resumed from a
        # checkpoint that did not count them
        self._clip_stats = torch.zeros(3, dtype=torch.float64)
        self._clip_unknown = False

    # -- set-up ----------------------------------------------------------------------------

    def on_train_start(self, state: TrainState) -> None:
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
        device = next(state.model.parameters()).device
        # float64 counts, where the device has them (MPS has not: float32, exact to 16M examples)
        dtype = torch.float32 if device.type == "mps" else torch.float64
        self._clip_stats = self._clip_stats.to(device, dtype)
        self._clip_unknown = self._clip_unknown and state.start_batch > 0
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        if self._saved_generator is not None:
            self.generator.set_state(self._saved_generator)
        # the optimiser's order: the noise is drawn parameter by parameter in it, as opacus does
        self._params = [p for g in state.optimizer.param_groups for p in g["params"]
                        if p.requires_grad]  # fmt: skip
        if self.engine == "native":
            self._samples = _NativeUpdates(state.model)
            return
        opacus = _require("opacus")
        errors = _require("opacus.validators").ModuleValidator.validate(state.model, strict=False)
        if errors:
            raise ValueError(f"opacus cannot train this model: {str(errors[0]).splitlines()[0]}")
        self._samples = opacus.GradSampleModule(state.model, batch_first=True,
                                                loss_reduction="mean")  # fmt: skip
        self._samples.disable_hooks()  # on only for the step's own forward and backward
        self._dp = _require("opacus.optimizers").DPOptimizer(
            state.optimizer,
            noise_multiplier=self.accountant.noise_multiplier,
            max_grad_norm=self.clip,
            expected_batch_size=self.batch_size,
            loss_reduction="mean",
            generator=self.generator,
        )

    # -- each step -------------------------------------------------------------------------

    def on_batch_start(self, state: TrainState) -> None:
        if self.engine == "native":
            self._samples.clear()
            return
        for p in state.model.parameters():
            p.grad_sample = None
            p.summed_grad = None

    @contextlib.contextmanager
    def step_context(self, state: TrainState) -> Iterator[None]:
        if self.engine == "native":
            self._samples.enabled = True
            try:
                yield
            finally:
                self._samples.enabled = False
            return
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
        """Per-example clip, sum, noise, divide by ``q N``: ``p.grad`` becomes the private
        update."""
        if self.engine == "opacus":
            self._count_clipped(self._opacus_norms())
            self._dp.pre_step()
            return
        assert self.accountant is not None
        sums, norms = self._samples.clipped_sums(self.clip)
        self._count_clipped(norms)
        std = self.accountant.noise_multiplier * self.clip
        for p in self._params:
            total = sums[p]
            noise = torch.normal(mean=0, std=std, size=total.shape, device=total.device,
                                 generator=self.generator)  # fmt: skip
            p.grad = ((total + noise) / self.batch_size).view_as(p).to(p.dtype)
        self._samples.clear()

    def _opacus_norms(self) -> torch.Tensor:
        """Each example's update norm, all parameters together, from opacus's per-example
        gradients, as its ``DPOptimizer`` computes them to clip (none for an empty batch)."""
        samples = self._dp.grad_samples
        if not samples or len(samples[0]) == 0:
            return torch.zeros(0, device=self._clip_stats.device)
        per_parameter = [g.reshape(len(g), -1).norm(2, dim=1) for g in samples]
        return torch.stack(per_parameter, 1).norm(2, dim=1)

    def _count_clipped(self, norms: torch.Tensor) -> None:
        """Add a step's examples to the epoch's counts: clipped where the clip factor
        ``min(1, clip / (norm + eps))`` is below 1."""
        self._clip_stats[0] += len(norms)
        self._clip_stats[1] += (norms + _CLIP_EPS > self.clip).sum()
        self._clip_stats[2] += norms.sum()

    def after_step(self, state: TrainState) -> None:
        assert self.accountant is not None
        self.accountant.step()

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        assert self.accountant is not None
        record["epsilon"] = self.accountant.epsilon(self.delta)
        record["noise_multiplier"] = self.accountant.noise_multiplier
        seen, clipped, norm_sum = self._clip_stats.tolist()
        known = seen > 0 and not self._clip_unknown
        record["clipped_fraction"] = clipped / seen if known else None
        record["update_norm_mean"] = norm_sum / seen if known else None
        self._clip_stats.zero_()
        self._clip_unknown = False

    # -- state -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "generator": None if self.generator is None else self.generator.get_state(),
            "clip_stats": None if self._clip_unknown else self._clip_stats.tolist(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["accountant"] is not None:
            self.accountant = PrivacyAccountant(1.0, 1.0)
            self.accountant.load_state_dict(state["accountant"])
        self._saved_generator = state["generator"]
        stats = state.get("clip_stats")  # absent in checkpoints from before they were counted
        self._clip_unknown = stats is None  # only if resumed mid-epoch: see on_train_start
        self._clip_stats = torch.tensor(stats or [0, 0, 0], dtype=torch.float64)
        if self.generator is not None and self._saved_generator is not None:
            self.generator.set_state(self._saved_generator)
