"""K-FAC preconditioning, distributed as in Pauloski et al. (2020), for back-propagation and for
the updates of DFA and its relatives.

Used between the backward pass and any optimiser::

    precond = KFACPreconditioner(model, lr=lambda step: opt.param_groups[0]["lr"])
    loss.backward(); precond.step(); opt.step()

**Factors** (Martens & Grosse 2015 for linear layers; Grosse & Martens 2016, "KFC", for
convolutions). For a layer ``s = W a`` (bias as the last column of ``W`` and an appended 1 in
``a``; a convolution's ``a`` is one unfolded input patch, ``C_in/groups * kh * kw`` values, and
``s`` one output position) with ``n`` examples of ``T`` positions each (``T = 1`` for a linear
layer on ``(n, in)`` inputs)::

    A = 1/(n T) sum_{i,t} a_{i,t} a_{i,t}^T          G = 1/n sum_{i,t} g_{i,t} g_{i,t}^T

``g_{i,t} = d loss_i / d s_{i,t}``, the gradient of example ``i``'s own loss at the layer's
output: the gradient that reaches the output (a tensor hook) times ``n / N`` for a loss that is a
batch mean averaged over ``N`` data-parallel ranks (``n`` the global batch; one process: ``N = 1``).
``G (x) A`` is then ``T`` times the Kronecker product of the per-position means, the KFC
approximation of the Fisher block. A grouped convolution has one pair ``(A_j, G_j)`` per group
(block-diagonal across groups). Running averages ``A <- xi A + (1 - xi) A_batch`` (the first batch
sets ``A``), every ``factor_update_steps`` steps.

**Under DFA** the gradient that reaches a hidden layer's output is the signal the layer actually
receives, ``(e B_l) * f'(a_l)`` (the engine's projection through the activation's derivative), so
``G`` is built from it and K-FAC shapes DFA's update ``(e B_l * f') a^T``: nothing here knows the
method. Attach the engine before creating the preconditioner (either order gives the same
statistics: hooks on a tensor changed in place see its gradient before the change).

**Preconditioned gradient** of a layer, ``M = [dW | db]`` (``dim G x dim A``), damping ``lam``:

- ``eigen`` (Pauloski et al.): ``A = Q_A diag(d_A) Q_A^T``, ``G = Q_G diag(d_G) Q_G^T`` and
  ``V = Q_G [(Q_G^T M Q_A) / (d_G d_A^T + lam)] Q_A^T``, i.e. ``(G (x) A + lam I)^-1 vec(M)``
  exactly (eigenvalues clamped at 0; damping applied at every step).
- ``inverse``: factored Tikhonov damping (Martens & Grosse 2015, section 6.3):
  ``V = (G + lam_G I)^-1 M (A + lam_A I)^-1`` with ``lam_A = pi sqrt(lam)``, ``lam_G = sqrt(lam) /
  pi``, ``pi = sqrt((tr(A) / dim A) / (tr(G) / dim G))`` (``pi = 1`` if a trace is 0); the damping
  is the one at the step of the inversion.

**KL clipping**: every preconditioned gradient is multiplied by ``nu = min(1, sqrt(kappa / sum_l
lr^2 |V_l . M_l|))`` (``.``: the sum of the elementwise product; over the preconditioned layers).

**Distributed** (inside an initialised ``torch.distributed`` group with the model in
``DistributedDataParallel``): the factor statistics' sums and example counts are all-reduced
(summed) in one collective, so the factors equal the one-process factors on the global batch, also
for shards of unequal size; the decompositions (eigen or inverse) of the ``2L`` factors are
assigned to ranks once, greedily by estimated cost (``groups * dim^3``, largest first to the least
loaded rank), computed by their rank and broadcast. Every rank then preconditions every layer
from its (DDP-averaged, identical) gradients.

**Failures**: a non-finite batch statistic leaves that factor's running average as it was; a
decomposition that fails or returns non-finite values is retried in float64 with more damping
(``1e-6``, then ``1e-3`` times the mean diagonal), then the previous decomposition is kept (the
layer is left unpreconditioned if it has none); a non-finite preconditioned gradient leaves the
layer's gradient as it was. Each is one ``warning:`` line (the first time per layer and cause) and
is counted in :attr:`KFACPreconditioner.skipped`. Weights never become NaN through K-FAC.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from ._console import warn
from ._enums import StrEnum
from .callbacks import Callback, TrainState

__all__ = [
    "SOLVERS",
    "ComputeMethod",
    "EigenSolver",
    "FactorSolver",
    "InverseSolver",
    "KFACCallback",
    "KFACPreconditioner",
    "Preconditioner",
    "register_solver",
]

#: A hyper-parameter: a value, or a function of the step (0-based count of ``step()`` calls).
Hyper = float | Callable[[int], float]
IntHyper = int | Callable[[int], int]


class Preconditioner(StrEnum):
    """The trainer's preconditioners (``--preconditioner``)."""

    NONE = "none"
    KFAC = "kfac"


class ComputeMethod(StrEnum):
    """The built-in ways to turn the factors into the preconditioner (names in :data:`SOLVERS`)."""

    EIGEN = "eigen"
    INVERSE = "inverse"


class _SolveFailed(RuntimeError):
    """A decomposition did not converge or produced non-finite values."""


class FactorSolver:
    """How a layer's Kronecker factors become its preconditioner (a registry entry).

    A subclass sets ``name``, says what it keeps per factor (:meth:`layout`: tensors of a fixed
    shape, so that they can be broadcast), computes them (:meth:`decompose`, for one factor, its
    groups batched) and applies them to a gradient (:meth:`apply`). ``(A, G)`` are ``(groups, d,
    d)`` tensors; gradients ``(groups, dim G, dim A)``.
    """

    name: ClassVar[str] = ""
    #: whether :meth:`decompose` depends on the damping (then it is recomputed only with them)
    damped_decomposition: ClassVar[bool] = False

    def layout(self, groups: int, dim: int) -> dict[str, tuple[int, ...]]:
        """The shapes of what :meth:`decompose` returns for a ``(groups, dim, dim)`` factor."""
        raise NotImplementedError

    def shifts(self, a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        """The diagonal shifts ``(lam_A, lam_G)``, one per group, added before decomposing."""
        zero = a.new_zeros(a.shape[0])
        return zero, zero.clone()

    def decompose(self, factor: Tensor, shift: Tensor) -> dict[str, Tensor]:
        """The decomposition of a symmetric ``(groups, d, d)`` factor shifted by ``shift``;
        raises :class:`RuntimeError` if it fails."""
        raise NotImplementedError

    def apply(
        self, grad: Tensor, a: dict[str, Tensor], g: dict[str, Tensor], damping: float
    ) -> Tensor:
        """The preconditioned gradient of ``grad`` ``(groups, dim G, dim A)``."""
        raise NotImplementedError


#: Factor solvers by name; :func:`register_solver` adds one.
SOLVERS: dict[str, type[FactorSolver]] = {}


def register_solver(cls: type[FactorSolver]) -> type[FactorSolver]:
    """Class decorator: make a :class:`FactorSolver` available as ``compute_method=cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    SOLVERS[cls.name] = cls
    return cls


@register_solver
class EigenSolver(FactorSolver):
    """``V = Q_G [(Q_G^T M Q_A) / (d_G d_A^T + lam)] Q_A^T`` (damping at every step)."""

    name = "eigen"

    def layout(self, groups: int, dim: int) -> dict[str, tuple[int, ...]]:
        return {"values": (groups, dim), "vectors": (groups, dim, dim)}

    def decompose(self, factor: Tensor, shift: Tensor) -> dict[str, Tensor]:
        values, vectors = torch.linalg.eigh(factor + _eye_like(factor, shift))
        return {"values": values.clamp(min=0), "vectors": vectors}

    def apply(
        self, grad: Tensor, a: dict[str, Tensor], g: dict[str, Tensor], damping: float
    ) -> Tensor:
        qa, qg = a["vectors"], g["vectors"]
        rotated = qg.mT @ grad @ qa
        rotated = rotated / (g["values"][:, :, None] * a["values"][:, None, :] + damping)
        return qg @ rotated @ qa.mT


@register_solver
class InverseSolver(FactorSolver):
    """``V = (G + lam_G I)^-1 M (A + lam_A I)^-1``, factored Tikhonov damping (see the module
    docstring); inverted through a Cholesky factorisation."""

    name = "inverse"
    damped_decomposition = True

    def layout(self, groups: int, dim: int) -> dict[str, tuple[int, ...]]:
        return {"inverse": (groups, dim, dim)}

    def shifts(self, a: Tensor, g: Tensor, damping: float) -> tuple[Tensor, Tensor]:
        mean_a = a.diagonal(dim1=-2, dim2=-1).mean(-1)
        mean_g = g.diagonal(dim1=-2, dim2=-1).mean(-1)
        pi = (mean_a / mean_g).sqrt()
        pi = torch.where(torch.isfinite(pi) & (pi > 0), pi, torch.ones_like(pi))
        root = math.sqrt(damping)
        return pi * root, root / pi

    def decompose(self, factor: Tensor, shift: Tensor) -> dict[str, Tensor]:
        chol, info = torch.linalg.cholesky_ex(factor + _eye_like(factor, shift))
        if bool(info.any()):
            raise _SolveFailed("the damped factor is not positive definite")
        return {"inverse": torch.cholesky_inverse(chol)}

    def apply(
        self, grad: Tensor, a: dict[str, Tensor], g: dict[str, Tensor], damping: float
    ) -> Tensor:
        return g["inverse"] @ grad @ a["inverse"]


def _eye_like(factor: Tensor, shift: Tensor) -> Tensor:
    eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
    return eye * shift.to(factor.dtype)[:, None, None]


def make_solver(spec: ComputeMethod | str | FactorSolver) -> FactorSolver:
    """A :class:`FactorSolver` from a registry name or an instance (returned)."""
    if isinstance(spec, FactorSolver):
        return spec
    key = str(spec.value) if isinstance(spec, ComputeMethod) else str(spec)
    cls = SOLVERS.get(key)
    if cls is None:
        raise ValueError(f"compute_method={key!r} is not one of {', '.join(map(repr, SOLVERS))}")
    return cls()


# -- layers -------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Layer:
    """One preconditioned module: its factor shapes, statistics in progress and factors."""

    name: str
    module: nn.Module
    groups: int
    a_dim: int  # per group, with the bias's 1
    g_dim: int  # output units per group
    bias: bool
    dtype: torch.dtype
    A: Tensor | None = None
    G: Tensor | None = None
    parts: dict[str, dict[str, Tensor] | None] = field(
        default_factory=lambda: {"A": None, "G": None}
    )
    # the step in progress (local sums; reduced and cleared by step())
    sum_a: Tensor | None = None
    sum_g: Tensor | None = None
    rows_a: int = 0
    rows_g: int = 0
    examples: int = 0

    def clear(self) -> None:
        self.sum_a = self.sum_g = None
        self.rows_a = self.rows_g = self.examples = 0

    def patches(self, x: Tensor) -> Tensor:
        """The layer's inputs as ``(groups, a_dim, rows)`` columns (with the bias's 1s)."""
        module = self.module
        x = x.detach().to(self.dtype)
        if isinstance(module, nn.Linear):
            cols = x.reshape(-1, x.shape[-1]).t().unsqueeze(0)
        else:
            assert isinstance(module, nn.Conv2d)
            if x.dim() == 3:
                x = x.unsqueeze(0)
            x, padding = _pad(module, x)
            u = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
            cols = u.transpose(0, 1).reshape(self.groups, -1, u.shape[0] * u.shape[2])
        if self.bias:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], 1, cols.shape[2])], 1)
        return cols

    def outputs(self, grad: Tensor) -> Tensor:
        """Gradients at the output as ``(groups, g_dim, rows)`` columns."""
        grad = grad.detach().to(self.dtype)
        if isinstance(self.module, nn.Linear):
            return grad.reshape(-1, grad.shape[-1]).t().unsqueeze(0)
        if grad.dim() == 3:
            grad = grad.unsqueeze(0)
        return grad.transpose(0, 1).reshape(self.groups, self.g_dim, -1)

    def gradient(self) -> Tensor | None:
        """``[dW | db]`` as ``(groups, g_dim, a_dim)``, or ``None`` without a gradient."""
        weight = self.module.weight
        if weight.grad is None:
            return None
        m = weight.grad.reshape(self.groups, self.g_dim, -1)
        if self.bias:
            b = self.module.bias.grad
            if b is None:
                return None
            m = torch.cat([m, b.reshape(self.groups, self.g_dim, 1)], 2)
        return m.to(self.dtype)

    def set_gradient(self, v: Tensor) -> None:
        weight = self.module.weight
        w = v[:, :, : v.shape[2] - int(self.bias)]
        weight.grad.copy_(w.reshape(weight.shape))
        if self.bias:
            self.module.bias.grad.copy_(v[:, :, -1].reshape(self.module.bias.shape))


def _pad(module: nn.Conv2d, x: Tensor) -> tuple[Tensor, Any]:
    """``x`` padded as the convolution pads it, and the padding left for ``unfold``."""
    padding: Any = module.padding
    if module.padding_mode == "zeros" and not isinstance(padding, str):
        return x, padding
    if isinstance(padding, str):
        pads: list[int] = []
        for d, k in zip(reversed(module.dilation), reversed(module.kernel_size)):
            total = d * (k - 1) if padding == "same" else 0
            pads += [total // 2, total - total // 2]
    else:
        pads = [p for p in reversed(padding) for _ in range(2)]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode), 0


def _describe(name: str, module: nn.Module) -> _Layer | None:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor) or not weight.requires_grad:
        return None
    bias = module.bias is not None and module.bias.requires_grad
    dtype = torch.promote_types(weight.dtype, torch.float32)
    if isinstance(module, nn.Linear):
        return _Layer(name, module, 1, module.in_features + bias, module.out_features, bias, dtype)
    if isinstance(module, nn.Conv2d):
        g = module.groups
        per = module.in_channels // g * module.kernel_size[0] * module.kernel_size[1]
        return _Layer(name, module, g, per + bias, module.out_channels // g, bias, dtype)
    return None


class _ForwardHook:
    """Adds a layer's input statistics and hooks its output for the gradient's (an object, not a
    closure: it names its preconditioner and layer)."""

    __slots__ = ("layer", "owner")

    def __init__(self, owner: KFACPreconditioner, layer: _Layer) -> None:
        self.owner, self.layer = owner, layer

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        owner, layer = self.owner, self.layer
        if not (owner.capturing and torch.is_grad_enabled() and owner._factor_due()):
            return
        if not (isinstance(out, Tensor) and out.requires_grad and args):
            return
        x = args[0]
        with torch.no_grad():
            cols = layer.patches(x)
            s = cols @ cols.mT
            layer.sum_a = s if layer.sum_a is None else layer.sum_a + s
        layer.rows_a += cols.shape[2]
        layer.examples += x.shape[0] if x.dim() > 1 else 1
        out.register_hook(_BackwardHook(layer))


class _BackwardHook:
    __slots__ = ("layer",)

    def __init__(self, layer: _Layer) -> None:
        self.layer = layer

    def __call__(self, grad: Tensor) -> None:
        layer = self.layer
        with torch.no_grad():
            cols = layer.outputs(grad)
            s = cols @ cols.mT
            layer.sum_g = s if layer.sum_g is None else layer.sum_g + s
        layer.rows_g += cols.shape[2]


# -- the preconditioner ------------------------------------------------------------------------


def _check(name: str, value: Any, *, step: int | None = None) -> Any:
    """Validate a hyper-parameter value (``step``: it came from a callable at that step)."""
    at = f" (at step {step})" if step is not None else ""
    if name in ("factor_update_steps", "inv_update_steps"):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}{at}")
        return value
    if name == "kl_clip":
        if value is None:
            return None
        if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
            raise ValueError(f"kl_clip must be None or a number >= 0 (0: off), got {value!r}{at}")
        return float(value) or None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}{at}")
    if name == "damping" and not value > 0:
        raise ValueError(f"damping must be > 0, got {value!r}{at}")
    if name == "factor_decay" and not 0 <= value < 1:
        raise ValueError(f"factor_decay must be in [0, 1), got {value!r}{at}")
    if name == "lr" and not value >= 0:
        raise ValueError(f"lr must be >= 0, got {value!r}{at}")
    return float(value)


class KFACPreconditioner:
    """K-FAC for the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` (see the module docstring
    for the equations): call :meth:`step` between ``loss.backward()`` and ``optimizer.step()``.

    Hyper-parameters are values or functions of the step (the number of :meth:`step` calls so
    far), evaluated at every step.

    Args:
        model: the model (not its ``DistributedDataParallel`` wrapper); hooks are registered on
            its layers (:meth:`remove` takes them off).
        factor_update_steps: update the factors every this many steps.
        inv_update_steps: recompute the decompositions every this many steps.
        damping: ``lam`` (> 0).
        factor_decay: ``xi`` of the running averages, in ``[0, 1)``.
        kl_clip: ``kappa`` of the KL clipping; ``None`` or 0: no clipping.
        lr: the optimiser's learning rate, for the KL clipping (required with ``kl_clip``), e.g.
            ``lambda step: opt.param_groups[0]["lr"]``.
        compute_method: ``"eigen"``, ``"inverse"`` (:class:`ComputeMethod`), another registered
            name or a :class:`FactorSolver`.
        skip_layers: module names (shell patterns, e.g. ``"features.*"``) left unpreconditioned.
        distributed: all-reduce factors and share the decompositions over the ranks of the
            default process group; ``None``: whenever ``torch.distributed`` is initialised with
            more than one process.

    Layers other than ``nn.Linear`` and ``nn.Conv2d`` (batch norm, ``Conv1d``), frozen layers and
    the engine's learned feedback keep their plain gradients (:attr:`skipped_modules` names the
    parametrised modules left out). The loss is assumed to be a mean over the batch (averaged
    over ranks when data-parallel, as the trainer's and plain DDP's are). Statistics are
    recorded by every forward pass with gradients enabled (and the backward pass that follows)
    while :attr:`capturing` is true, on the steps where factors update: run other passes (probes,
    evaluation in train mode) under ``torch.no_grad()`` or with ``capturing = False``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        factor_update_steps: IntHyper = 1,
        inv_update_steps: IntHyper = 10,
        damping: Hyper = 0.003,
        factor_decay: Hyper = 0.95,
        kl_clip: Hyper | None = 0.001,
        lr: Hyper | None = None,
        compute_method: ComputeMethod | str | FactorSolver = ComputeMethod.EIGEN,
        skip_layers: Sequence[str] = (),
        distributed: bool | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise TypeError("pass the model inside DistributedDataParallel (ddp.module)")
        self._hyper: dict[str, Any] = {
            "factor_update_steps": factor_update_steps,
            "inv_update_steps": inv_update_steps,
            "damping": damping,
            "factor_decay": factor_decay,
            "kl_clip": kl_clip,
            "lr": lr,
        }
        for name, value in self._hyper.items():
            if not callable(value) and not (name == "lr" and value is None):
                _check(name, value)
        if lr is None and kl_clip is not None and (callable(kl_clip) or kl_clip):
            raise ValueError(
                "kl_clip needs lr, the optimiser's learning rate (a number or a function of the "
                "step, e.g. lambda step: opt.param_groups[0]['lr']); or set kl_clip=None"
            )
        self.solver = make_solver(compute_method)
        self.layers: list[_Layer] = []
        self.skipped_modules: list[str] = []
        for name, module in model.named_modules():
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                continue
            if any(fnmatch.fnmatchcase(name, pattern) for pattern in skip_layers):
                continue
            layer = _describe(name, module)
            if layer is None:
                self.skipped_modules.append(name)
            else:
                self.layers.append(layer)
        if not self.layers:
            raise ValueError(
                "the model has no trainable nn.Linear or nn.Conv2d layer for K-FAC to precondition"
            )
        if distributed is None:
            distributed = dist.is_available() and dist.is_initialized()
        elif distributed and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("distributed=True needs an initialised torch.distributed group")
        self.world_size = dist.get_world_size() if distributed else 1
        self.rank = dist.get_rank() if distributed else 0
        self.owners = self._assign(self.world_size)
        self.steps = 0
        #: whether the hooks record statistics (the trainer turns it on around forward/backward)
        self.capturing = True
        #: the KL-clip factor ``nu`` of the last step (1.0 without clipping)
        self.last_kl_scale = 1.0
        #: what was skipped, by ``"layer: cause"``, counted
        self.skipped: dict[str, int] = {}
        self._warned_empty = False
        self._handles = [
            layer.module.register_forward_hook(_ForwardHook(self, layer)) for layer in self.layers
        ]

    # -- hyper-parameters -------------------------------------------------------------------

    def hyper(self, name: str, step: int | None = None) -> Any:
        """The value of hyper-parameter ``name`` at ``step`` (default: the current step)."""
        value = self._hyper[name]
        if not callable(value):
            return value if value is None else _check(name, value)
        at = self.steps if step is None else step
        return _check(name, value(at), step=at)

    def _factor_due(self) -> bool:
        return self.steps % self.hyper("factor_update_steps") == 0

    # -- work assignment ------------------------------------------------------------------------

    def _assign(self, world_size: int) -> dict[tuple[int, str], int]:
        """Each factor's rank: largest estimated cost first, to the least loaded rank."""
        items = [(i, kind) for i in range(len(self.layers)) for kind in ("A", "G")]

        def cost(item: tuple[int, str]) -> float:
            layer = self.layers[item[0]]
            dim = layer.a_dim if item[1] == "A" else layer.g_dim
            return float(layer.groups * dim**3)

        load = [0.0] * world_size
        owners: dict[tuple[int, str], int] = {}
        for item in sorted(items, key=lambda it: (-cost(it), it)):
            rank = min(range(world_size), key=lambda r: (load[r], r))
            owners[item] = rank
            load[rank] += cost(item)
        return owners

    # -- the step -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        """Record statistics within this context (whatever :attr:`capturing` says outside)."""
        previous, self.capturing = self.capturing, True
        try:
            yield
        finally:
            self.capturing = previous

    def step(self) -> None:
        """Update the factors and decompositions when due, and replace the gradients of the
        preconditioned layers by their preconditioned (and KL-clipped) versions. Every rank must
        call it at every step (it runs collectives when distributed)."""
        if self._factor_due():
            self.update_factors()
        if self.steps % self.hyper("inv_update_steps") == 0:
            self.update_decompositions()
        self.apply()
        self.steps += 1

    def update_factors(self) -> None:
        """Fold this step's statistics (all-reduced when distributed) into the running factors."""
        decay = self.hyper("factor_decay")
        sums, counts = [], []
        for layer in self.layers:
            for total, dim in ((layer.sum_a, layer.a_dim), (layer.sum_g, layer.g_dim)):
                if total is None:
                    shape = (layer.groups, dim, dim)
                    device = layer.module.weight.device
                    total = torch.zeros(shape, dtype=layer.dtype, device=device)
                sums.append(total)
            counts += [layer.rows_a, layer.rows_g, layer.examples]
        device = self.layers[0].module.weight.device
        count = torch.tensor(counts, dtype=torch.float64, device=device)
        if self.world_size > 1:
            sums = _all_reduce(sums)
            dist.all_reduce(count)
        totals = count.tolist()
        if not any(totals) and self.capturing and not self._warned_empty:
            self._warned_empty = True
            if self.rank == 0:
                warn(
                    f"K-FAC recorded no statistics at step {self.steps}: create the "
                    "preconditioner before the forward pass (and keep it capturing)"
                )
        batches: list[tuple[_Layer, str, Tensor]] = []
        for i, layer in enumerate(self.layers):
            rows_a, rows_g, n = totals[3 * i : 3 * i + 3]
            layer.clear()
            if rows_a == 0 or rows_g == 0:
                continue  # the layer was not used this step
            batches.append((layer, "A", sums[2 * i] / rows_a))
            batches.append((layer, "G", sums[2 * i + 1] * (n / self.world_size**2)))
        finite = _all_finite([batch for _, _, batch in batches])  # one device sync
        for (layer, kind, batch), ok in zip(batches, finite):
            if not ok:
                self._skip(layer, f"non-finite {kind} statistics; its running average is kept")
                continue
            old = getattr(layer, kind)
            setattr(layer, kind, batch if old is None else old * decay + batch * (1 - decay))

    def update_decompositions(self) -> None:
        """Recompute every factor's decomposition, each on its rank, and share them."""
        damping = self.hyper("damping")
        work: list[tuple[_Layer, str, int, int]] = []
        for i, layer in enumerate(self.layers):
            if layer.A is None or layer.G is None:
                continue
            shift_a, shift_g = self.solver.shifts(layer.A, layer.G, damping)
            for kind, shift in (("A", shift_a), ("G", shift_g)):
                owner, outcome = self.owners[(i, kind)], 0
                if owner == self.rank:
                    layer.parts[kind], outcome = self._solve(layer, kind, shift)
                work.append((layer, kind, owner, outcome))
        if self.world_size > 1:
            work = self._share(work)
        for layer, kind, _, outcome in work:  # every rank counts what the owners met
            if 0 < outcome < len(_EXTRA_DAMPING):
                self._skip(layer, f"{kind} needed extra damping ({_EXTRA_DAMPING[outcome]:g} x "
                                  "its mean diagonal, in float64) to decompose")  # fmt: skip
            elif outcome == len(_EXTRA_DAMPING):
                kept = "the previous one is kept" if layer.parts[kind] is not None else (
                    "the layer stays unpreconditioned")  # fmt: skip
                self._skip(layer, f"the decomposition of {kind} failed; {kept}")

    def _solve(
        self, layer: _Layer, kind: str, shift: Tensor
    ) -> tuple[dict[str, Tensor] | None, int]:
        """The decomposition and the outcome: the index in :data:`_EXTRA_DAMPING` of the extra
        damping it needed, or ``len(_EXTRA_DAMPING)`` if it failed (the previous one returned)."""
        factor: Tensor = getattr(layer, kind)
        factor = (factor + factor.mT) / 2
        scale = factor.diagonal(dim1=-2, dim2=-1).mean(-1).abs()
        for outcome, extra in enumerate(_EXTRA_DAMPING):
            work = factor if extra == 0 else factor.double()
            try:
                parts = self.solver.decompose(work, shift.to(work) + extra * scale.to(work))
            except RuntimeError:
                continue
            if all(_all_finite(list(parts.values()))):
                return {k: t.to(layer.dtype) for k, t in parts.items()}, outcome
        return layer.parts[kind], len(_EXTRA_DAMPING)

    def _share(
        self, work: list[tuple[_Layer, str, int, int]]
    ) -> list[tuple[_Layer, str, int, int]]:
        """Broadcast every decomposition from its rank, with whether there is one and the
        outcome of computing it; returns ``work`` with every owner's outcome."""
        pending = []
        for layer, kind, owner, outcome in work:
            dim = layer.a_dim if kind == "A" else layer.g_dim
            layout = self.solver.layout(layer.groups, dim)
            size = sum(math.prod(s) for s in layout.values())
            device = layer.module.weight.device
            parts = layer.parts[kind]
            if owner == self.rank:
                body = (
                    torch.cat([parts[k].reshape(-1) for k in layout])
                    if parts is not None
                    else torch.zeros(size, dtype=layer.dtype, device=device)
                )
                flat = torch.cat([body, body.new_tensor([float(parts is not None), outcome])])
            else:
                flat = torch.empty(size + 2, dtype=layer.dtype, device=device)
            handle = dist.broadcast(flat, owner, async_op=True)
            pending.append((layer, kind, owner, layout, flat, handle))
        shared = []
        for layer, kind, owner, layout, flat, handle in pending:
            handle.wait()
            present, outcome = (int(v) for v in flat[-2:].tolist())
            shared.append((layer, kind, owner, outcome))
            if not present:
                layer.parts[kind] = None
                continue
            out, offset = {}, 0
            for key, shape in layout.items():
                numel = math.prod(shape)
                out[key] = flat[offset : offset + numel].view(shape)
                offset += numel
            layer.parts[kind] = out
        return shared

    def apply(self) -> None:
        """Precondition every layer with decompositions, then scale by the KL-clip factor."""
        damping = self.hyper("damping")
        done: list[tuple[_Layer, Tensor, Tensor]] = []
        for layer in self.layers:
            a, g = layer.parts["A"], layer.parts["G"]
            m = layer.gradient() if a is not None and g is not None else None
            if m is not None:
                assert a is not None and g is not None
                done.append((layer, m, self.solver.apply(m, a, g, damping)))
        finite = _all_finite([t for _, m, v in done for t in (v, m)])  # one device sync
        kept = []
        for (layer, m, v), v_ok, m_ok in zip(done, finite[::2], finite[1::2]):
            if v_ok:
                kept.append((layer, m, v))
            elif m_ok:  # a non-finite gradient is the caller's; a non-finite V ours
                self._skip(layer, "non-finite preconditioned gradient; the plain one is used")
        nu = 1.0
        kappa = self.hyper("kl_clip")
        if kappa is not None and kept:
            lr = self.hyper("lr")
            products = torch.stack([(v * m).sum().abs().to(torch.float64) for _, m, v in kept])
            total = float(products.sum()) * lr**2
            if total > 0 and math.isfinite(total):
                nu = min(1.0, math.sqrt(kappa / total))
        self.last_kl_scale = nu
        for layer, _, v in kept:
            layer.set_gradient(v * nu if nu != 1.0 else v)

    def _skip(self, layer: _Layer, cause: str) -> None:
        key = f"{layer.name or '<model>'}: {cause}"
        if key not in self.skipped and self.rank == 0:
            warn(f"K-FAC, layer {key} (step {self.steps}; further ones are counted in .skipped)")
        self.skipped[key] = self.skipped.get(key, 0) + 1

    # -- inspection, saving, removal --------------------------------------------------------

    @property
    def layer_names(self) -> list[str]:
        """The preconditioned modules, in the model's order."""
        return [layer.name for layer in self.layers]

    def factors(self, name: str) -> tuple[Tensor | None, Tensor | None]:
        """``(A, G)`` of layer ``name``, ``(groups, d, d)`` each (``None`` before the first
        update)."""
        for layer in self.layers:
            if layer.name == name:
                return layer.A, layer.G
        raise KeyError(f"{name!r} is not a preconditioned layer ({self.layer_names})")

    def state_dict(self) -> dict[str, Any]:
        """Step count, factors and decompositions (a resumed run continues exactly)."""
        return {
            "format": 1,
            "compute_method": self.solver.name,
            "steps": self.steps,
            "skipped": dict(self.skipped),
            "layers": {
                layer.name: {
                    "A": layer.A,
                    "G": layer.G,
                    "parts_A": layer.parts["A"],
                    "parts_G": layer.parts["G"],
                }
                for layer in self.layers
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (same layers and compute method)."""
        if state.get("compute_method") != self.solver.name:
            raise ValueError(
                f"the K-FAC state was saved with compute_method={state.get('compute_method')!r}; "
                f"this preconditioner uses {self.solver.name!r}"
            )
        saved = state["layers"]
        if sorted(saved) != sorted(self.layer_names):
            raise ValueError(
                f"the K-FAC state holds layers {sorted(saved)}, this model has "
                f"{sorted(self.layer_names)}"
            )
        for layer in self.layers:
            entry = saved[layer.name]
            device = layer.module.weight.device
            for kind, dim in (("A", layer.a_dim), ("G", layer.g_dim)):
                value = entry[kind]
                if value is not None and tuple(value.shape) != (layer.groups, dim, dim):
                    raise ValueError(
                        f"the K-FAC state's {kind} of {layer.name!r} has shape "
                        f"{tuple(value.shape)}, expected {(layer.groups, dim, dim)}"
                    )
                setattr(layer, kind, None if value is None else value.to(device, layer.dtype))
                parts = entry[f"parts_{kind}"]
                layer.parts[kind] = (
                    None
                    if parts is None
                    else {k: t.to(device, layer.dtype) for k, t in parts.items()}
                )
            layer.clear()
        self.steps = int(state["steps"])
        self.skipped = dict(state.get("skipped", {}))

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


#: the extra damping (times a factor's mean diagonal) of successive decomposition attempts
_EXTRA_DAMPING = (0.0, 1e-6, 1e-3)


def _all_finite(tensors: list[Tensor]) -> list[bool]:
    """Whether each tensor is all finite, with one device synchronisation."""
    if not tensors:
        return []
    device = tensors[0].device
    return torch.stack([torch.isfinite(t).all().to(device) for t in tensors]).tolist()


def _all_reduce(tensors: list[Tensor]) -> list[Tensor]:
    """Sum ``tensors`` over the ranks: one collective per dtype and device."""
    out: list[Tensor | None] = [None] * len(tensors)
    buckets: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        buckets.setdefault((t.dtype, t.device), []).append(i)
    for indices in buckets.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in indices])
        dist.all_reduce(flat)
        offset = 0
        for i in indices:
            numel = tensors[i].numel()
            out[i] = flat[offset : offset + numel].view_as(tensors[i])
            offset += numel
    return [t for t in out if t is not None]


# -- the trainer's callback ---------------------------------------------------------------------


class KFACCallback(Callback):
    """K-FAC in :func:`dfatorch.train.train`: the preconditioner is built on the trained model
    when training starts (data-parallel when the run is), records statistics during the forward
    and backward pass of each step only (not during probes or evaluation), preconditions in
    ``before_step`` with the optimiser's current learning rate for the KL clipping, and its state
    is saved in the checkpoint. ``options`` go to :class:`KFACPreconditioner` (not ``lr``).

    Each epoch's record gains ``kfac``: the mean KL-clip factor over the epoch's steps and the
    count of skipped updates (see :attr:`KFACPreconditioner.skipped`).
    """

    def __init__(self, **options: Any) -> None:
        if "lr" in options:
            raise ValueError("KFACCallback takes the learning rate from the optimiser; drop lr")
        self.options = options
        self.preconditioner: KFACPreconditioner | None = None
        self._pending: dict[str, Any] | None = None

    def on_train_start(self, state: TrainState) -> None:
        optimizer = state.optimizer
        self.preconditioner = KFACPreconditioner(
            state.model,
            lr=lambda step: float(optimizer.param_groups[0]["lr"]),
            distributed=state.group.enabled,
            **self.options,
        )
        self.preconditioner.capturing = False
        if self._pending:
            self.preconditioner.load_state_dict(self._pending)
            self._pending = None

    def step_context(self, state: TrainState) -> contextlib.AbstractContextManager[Any]:
        assert self.preconditioner is not None
        return self.preconditioner.capture()

    def before_step(self, state: TrainState) -> None:
        assert self.preconditioner is not None
        self.preconditioner.step()
        sums = state.partial.setdefault("kfac", {"kl_scale_sum": 0.0, "steps": 0})
        sums["kl_scale_sum"] += self.preconditioner.last_kl_scale
        sums["steps"] += 1

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        sums = state.partial.get("kfac", {"kl_scale_sum": 0.0, "steps": 0})
        skipped = self.preconditioner.skipped if self.preconditioner else {}
        record["kfac"] = {
            "kl_scale": sums["kl_scale_sum"] / sums["steps"] if sums["steps"] else None,
            "skipped": sum(skipped.values()),
        }

    def state_dict(self) -> dict[str, Any]:
        if self.preconditioner is None:
            return dict(self._pending or {})
        return self.preconditioner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.preconditioner is None:
            self._pending = state
        else:
            self.preconditioner.load_state_dict(state)
