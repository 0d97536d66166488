"""Module-wise DFA (``attach(..., scope="module")``): the network is cut at module boundaries only.

This is **our reading of the abstract** of Han et al. 2020, "Extension of Direct Feedback Alignment
to Convolutional and Recurrent Neural Network for Bio-plausible Deep Learning" (arXiv 2006.12830;
only the abstract was available to us, no code is public): "we divide the network into several
modules and apply the DFA algorithm within the module", with "sparse backward weights, realised as
dilated convolution in the CNN case" and "group convolution". What we implement:

- The model is divided into *modules* (:class:`ModuleInfo`): sub-modules named by glob patterns
  over module names (``"stage*.*"``: every residual block of ``resnet20``; of nested matches the
  outermost is kept) or ``"FIRST..LAST"`` ranges of sibling modules (``"0..8"``: children 0 to 8 of
  an ``nn.Sequential``). Every hidden layer belongs to exactly one module; the output layer to
  none. The zoo's models name their own default (``model.feedback_modules``).
- The graph is cut at each module's output only: a forward hook on the module (its last child for
  a range) stashes the output ``h_M`` and hands the rest of the network a detached copy. In
  backward, ``h_M`` receives ``g_M = e @ B_M`` from the engine's one batched projection, exactly
  where DFA delivers ``e @ B_l`` to a layer (``B_M`` is drawn by the feedback structure, ``init``).
  Skip connections inside a module are fine: nothing inside is cut, except as below.
- ``inner="bp"`` (the hybrid at module scale): the module is trained inside by exact
  back-propagation of ``g_M``.
- ``method="dkp"`` (our extension of Direct Kolen-Pollack to modules): ``B_M`` is learned by
  ``dB_M = e^T h_M``, the gradient of a direct connection ``h_M -> y``, as ``dkp`` learns ``B_l``
  per layer; the inner operators below stay fixed.
- ``inner="dfa"`` (DFA within the module): each layer of the module whose output feeds the next
  layer of the same module (its *inner point*, that next layer's input, after activation,
  normalisation, pooling) receives ``A_l(g_M)`` instead of the back-propagated ``W^T delta``, where
  ``A_l`` is a fixed random linear *operator* from the module's output to that point
  (:class:`FeedbackOperator`); the graph is cut there as DFA cuts it. The module's last layer gets
  ``g_M`` back-propagated through what follows it inside the module (its activation, batch norm,
  the residual sum). ``A_l`` is drawn by the same structure as ``B_M`` (``operator_kind``):
  ``dense`` structures a dense ``(d_M, d_l)`` matrix (:class:`DenseOperator`), ``sparse`` a sparse
  one (:class:`SparseOperator`), ``conv`` a random convolution (:class:`ConvOperator`). Dense and
  sparse operators larger than :data:`MAX_OPERATOR_ENTRIES` entries are refused: between two
  ``16 x 32 x 32`` maps a dense one would hold 268 million, which is what the convolution is for.

Every operator ``A`` keeps the size of the signal: float entries are drawn so that
``E|A g|^2 = |g|^2 / 3``, as ``e @ B`` with ``uniform``'s ``B`` gives ``|e|^2 / 3`` (binary ones are
scaled to the same norm); ``gain`` multiplies it, ``normalize=False`` multiplies it by
``sqrt(d_l)``, as for ``B``.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._enums import StrEnum
from .feedback import ConvPattern, Pattern, SparsePattern, make_pattern

__all__ = [
    "MAX_OPERATOR_ENTRIES",
    "ConvOperator",
    "DenseOperator",
    "FeedbackOperator",
    "Inner",
    "ModuleInfo",
    "SparseOperator",
    "make_operator",
    "operator_from_layout",
    "resolve_modules",
]

#: The most entries a dense or sparse inner operator may hold (64 MiB of float32).
MAX_OPERATOR_ENTRIES = 2**24


class Inner(StrEnum):
    """How a module is trained inside under ``scope="module"``."""

    DFA = "dfa"  #: each layer's error from the module's output error, through a random operator
    BP = "bp"  #: exact back-propagation of the module's projected error ``e @ B_M``


@dataclass
class ModuleInfo:
    """One module of module-wise DFA: its label, the module whose forward starts it (``entry``)
    and the one whose output is its feedback point (``exit``; the same module unless it is a
    ``FIRST..LAST`` range), the execution indices of its layers and every sub-module it holds."""

    name: str
    entry: nn.Module
    exit: nn.Module
    layers: list[int]
    #: ``id()`` of every module inside, for the checks of :func:`~dfatorch.attach` (not valid in
    #: a deep copy)
    members: set[int] = field(default_factory=set, repr=False)


def _holds(root: nn.Module) -> set[int]:
    return {id(m) for m in root.modules()}


def resolve_modules(
    model: nn.Module, specs: Sequence[str], layers: Sequence[tuple[str, nn.Module]]
) -> list[ModuleInfo]:
    """The modules named by ``specs`` (globs or ``FIRST..LAST`` ranges), ordered by execution.

    ``layers`` are the model's layers in execution order, the output layer last. Raises
    ``ValueError`` (one line) for a spec that names nothing, a module without a layer or with the
    output layer, a layer in two modules or in none, and layers of a module that do not run one
    after another.
    """
    if isinstance(specs, str):
        specs = [specs]
    named = dict(model.named_modules())
    parents = {name: name.rpartition(".")[0] for name in named if name}
    top = [n for n in named if n and "." not in n]
    found: list[tuple[str, nn.Module, nn.Module, set[int]]] = []
    for spec in specs:
        spec = spec.strip()
        if ".." in spec:
            first, _, last = spec.partition("..")
            for part in (first, last):
                if part not in named or not part:
                    raise ValueError(
                        f"modules: {spec!r}: {part!r} is not a module of {type(model).__name__}"
                    )
            if parents[first] != parents[last]:
                raise ValueError(f"modules: {spec!r}: {first!r} and {last!r} are not siblings")
            siblings = [n for n in named if n and parents[n] == parents[first]]
            i, j = siblings.index(first), siblings.index(last)
            if i > j:
                raise ValueError(f"modules: {spec!r}: {last!r} comes before {first!r}")
            members: set[int] = set()
            for n in siblings[i : j + 1]:
                members |= _holds(named[n])
            found.append((spec, named[first], named[last], members))
            continue
        matched = [n for n in named if n and fnmatch.fnmatchcase(n, spec)]
        if not matched:
            raise ValueError(
                f"modules: {spec!r} matches no module of {type(model).__name__} "
                f"(its top-level modules: {', '.join(top)})"
            )
        outer = [n for n in matched if not any(n.startswith(m + ".") for m in matched)]
        found += [(n, named[n], named[n], _holds(named[n])) for n in outer]
    ids = {id(m): i for i, (_, m) in enumerate(layers)}
    output = len(layers) - 1
    owner: dict[int, str] = {}
    modules = []
    for name, entry, exit_, members in found:
        held = sorted(ids[m] for m in members if m in ids)
        if not held:
            raise ValueError(f"modules: {name!r} holds no Linear or Conv layer")
        if output in held:
            raise ValueError(
                f"modules: {name!r} holds the output layer {layers[output][0]!r}, which is trained "
                "by its true gradient: leave it out"
            )
        for i in held:
            if i in owner:
                raise ValueError(
                    f"modules: layer {layers[i][0]!r} is in two modules, {owner[i]!r} and {name!r}"
                )
            owner[i] = name
        if held != list(range(held[0], held[-1] + 1)):
            between = next(i for i in range(held[0], held[-1]) if i not in held)
            raise ValueError(
                f"modules: the layers of {name!r} do not run one after another (layer "
                f"{layers[between][0]!r} runs between them)"
            )
        modules.append(ModuleInfo(name, entry, exit_, held, members))
    missing = [layers[i][0] for i in range(output) if i not in owner]
    if missing:
        raise ValueError(
            f"scope='module': hidden layers {missing} are in no module; name modules that hold "
            "them (modules=[...])"
        )
    return sorted(modules, key=lambda m: m.layers[0])


# -- inner operators --------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed))


class FeedbackOperator(nn.Module):
    """A fixed random linear map from a module's output error ``g_M`` (per sample of shape
    ``source``) to the error of an inner point (``target``): ``A(g) = scale * P(g)``, ``P`` drawn
    once by the feedback structure from ``seed``, ``scale`` the buffer ``scales`` (one entry).

    Subclasses implement :meth:`apply_pattern`, :meth:`nbytes` and :meth:`macs`. The layout
    (kind, shapes, structure with options, seed, binary) is saved as extra state and checked on
    load; :func:`operator_from_layout` rebuilds one before its buffers are loaded.
    """

    kind: ClassVar[str] = ""

    def __init__(
        self,
        structure: Pattern,
        source: Sequence[int],
        target: Sequence[int],
        *,
        seed: int,
        binary: bool,
        gain: float,
        normalize: bool,
        name: str,
    ) -> None:
        super().__init__()
        self.structure = structure
        self.source = tuple(int(s) for s in source)
        self.target = tuple(int(s) for s in target)
        self.source_size = math.prod(self.source)
        self.target_size = math.prod(self.target)
        self.seed = int(seed)
        self.binary = bool(binary)
        self.normalize = bool(normalize)
        self.name = name
        rms = self.entry_rms() if binary else 1.0
        scale = gain * rms * (1.0 if normalize else math.sqrt(self.target_size))
        self.register_buffer("scales", torch.tensor([scale], dtype=torch.float32))

    def entry_rms(self) -> float:
        """The RMS of a (non-zero) float entry: the scale of the binary version."""
        return self.structure.entry_rms(self.source_size, self.target_size)

    def forward(self, signal: Tensor) -> Tensor:
        """``(N, *source) -> (N, *target)``; any memory layout in, logical order out."""
        n = signal.shape[0]
        out = self.apply_pattern(signal.reshape(n, *self.source))
        return out.reshape(n, *self.target) * self.scales.to(out.dtype)

    def apply_pattern(self, signal: Tensor) -> Tensor:
        raise NotImplementedError

    def dense_matrix(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """The operator as a ``(source units, target units)`` matrix (row ``i``: the image of the
        ``i``-th unit vector of the source), for checks and diagnostics."""
        basis = torch.eye(self.source_size, dtype=dtype, device=self.scales.device)
        return self(basis.reshape(self.source_size, *self.source)).reshape(self.source_size, -1)

    def nbytes(self) -> int:
        """Bytes of pattern held (the scale not included)."""
        return sum(b.numel() * b.element_size() for n, b in self.named_buffers() if n != "scales")

    def macs(self) -> int:
        """Multiply-adds per sample."""
        raise NotImplementedError

    def layout(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "init": self.structure.name,
            "init_options": dict(self.structure.options),
            "source": list(self.source),
            "target": list(self.target),
            "seed": self.seed,
            "binary": self.binary,
            "normalize": self.normalize,
            "name": self.name,
        }

    def get_extra_state(self) -> dict[str, Any]:
        return self.layout()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.layout()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k != "name" and state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {s!r}, here {h!r}" for k, (s, h) in diff.items())
            raise ValueError(f"inner feedback {self.name} does not match ({detail})")

    def extra_repr(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.structure.options.items())
        return f"{self.name}, {self.source} -> {self.target}, init={self.structure.name}{opts}"


def _too_big(what: str, name: str, entries: int, structure: Pattern) -> ValueError:
    return ValueError(
        f"init={structure.name!r}: the inner feedback {name} would be a {what} with {entries:,} "
        f"entries (the limit is {MAX_OPERATOR_ENTRIES:,}): use init='conv', a sparser "
        "init='sparse' or inner='bp'"
    )


class DenseOperator(FeedbackOperator):
    """A dense matrix ``P`` of shape ``(source units, target units)``, drawn by the structure's
    :meth:`~dfatorch.feedback.Pattern.sample` with the source units in place of the classes
    (``uniform``: ``U(-1/sqrt(d_l), 1/sqrt(d_l))``); ``A(g) = scale * g_flat @ P``."""

    kind = "dense"

    def __init__(self, structure: Pattern, source: Sequence[int], target: Sequence[int],
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(structure, source, target, **kw)
        entries = self.source_size * self.target_size
        if entries > MAX_OPERATOR_ENTRIES:
            raise _too_big(
                f"dense {self.source_size} x {self.target_size} matrix", self.name, entries,
                structure,
            )  # fmt: skip
        pattern = structure.sample(
            self.source_size, self.target_size, generator=_generator(self.seed), binary=self.binary
        )
        self.register_buffer("pattern", pattern)

    def apply_pattern(self, signal: Tensor) -> Tensor:
        return signal.reshape(signal.shape[0], -1) @ self.pattern.to(signal.dtype)

    def macs(self) -> int:
        return self.source_size * self.target_size


class SparseOperator(FeedbackOperator):
    """A sparse matrix: each target unit is connected to ``m = max(1, round(density * d_M))``
    source units (:class:`~dfatorch.feedback.SparsePattern`). Held as ``columns`` and ``values``,
    ``(d_l * m,)`` each (int32 and float32, 8 bytes an entry: every row of ``P^T`` has ``m``
    entries, so no row pointers are kept); applied by one sparse matmul, ``d_l * m`` multiply-adds
    per sample."""

    kind = "sparse"

    def __init__(self, structure: Pattern, source: Sequence[int], target: Sequence[int],
                 **kw: Any) -> None:  # fmt: skip
        super().__init__(structure, source, target, **kw)
        assert isinstance(structure, SparsePattern)
        self.per_unit = structure.per_column(self.source_size)
        entries = self.per_unit * self.target_size
        if entries > MAX_OPERATOR_ENTRIES:
            raise _too_big(
                f"sparse matrix ({self.per_unit} per unit)", self.name, entries, structure
            )
        index, values = structure.sample_sparse(
            self.source_size, self.target_size, generator=_generator(self.seed), binary=self.binary
        )
        self.register_buffer("columns", index.reshape(-1).to(torch.int32))
        self.register_buffer("values", values.reshape(-1).contiguous())

    def apply_pattern(self, signal: Tensor) -> Tensor:
        rows = torch.arange(
            0, self.values.numel() + 1, self.per_unit, device=signal.device, dtype=torch.long
        )
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we need
            warnings.simplefilter("ignore", UserWarning)
            transposed = torch.sparse_csr_tensor(
                rows,
                self.columns.long(),
                self.values.to(signal.dtype),
                (self.target_size, self.source_size),
                check_invariants=False,
            )
            return torch.sparse.mm(transposed, signal.reshape(signal.shape[0], -1).T).T

    def macs(self) -> int:
        return int(self.values.numel())


def _map_shape(shape: tuple[int, ...], name: str) -> tuple[int, int, int]:
    if len(shape) == 1:
        return shape[0], 1, 1
    if len(shape) == 3:
        return shape  # type: ignore[return-value]
    raise ValueError(
        f"init='conv': the inner feedback {name} needs flat points or 2-D maps (C, H, W), got a "
        f"point of shape {shape}"
    )


class ConvOperator(FeedbackOperator):
    """A fixed random convolution from the module's output error map to a layer's output map
    (:class:`~dfatorch.feedback.ConvPattern`; our design, from the abstract's "dilated
    convolution" and "group convolution"). For a source map ``(C_M, H_M, W_M)`` (the module's
    projected error ``e @ B_M`` reshaped to the module output's shape) and a target map
    ``(C_l, H_l, W_l)`` it computes:

    1. if the sizes differ, the source map is brought to ``H_l x W_l``: average pooling
       (``adaptive_avg_pool2d``) when the target is smaller, nearest-neighbour upsampling when it
       is larger (a flat source, ``(C_M,)``, is a ``1 x 1`` map and so broadcast over the target's
       positions; a flat target, ``(C_l,)``, is a ``1 x 1`` map and takes the source's mean);
    2. ``conv2d`` with a kernel ``(C_l, C_M / g, k, k)`` of i.i.d. ``U(-b, b)`` entries (random
       signs times ``b / sqrt(3)`` for BDFA), dilation ``d``, padding ``d (k - 1) / 2`` (zeros:
       same-size output), ``g`` groups, no bias; ``k = 1`` for a flat target.

    ``b = sqrt(d_M / (d_l * fan_in))``, ``fan_in = k^2 C_M / g``, gives ``E|A g|^2 = |g|^2 / 3``
    (before resizing effects). Weights held: ``k^2 C_M C_l / g``, independent of H and W;
    multiply-adds per sample: ``d_l * fan_in``. A dilated ``k x k`` kernel equals the dense
    ``(d (k - 1) + 1)^2`` kernel with zeros between its taps, and grouped channels give a
    block-diagonal matrix over channel groups (both checked in ``tests/test_modulewise.py``).
    """

    kind = "conv"

    def __init__(self, structure: Pattern, source: Sequence[int], target: Sequence[int],
                 **kw: Any) -> None:  # fmt: skip
        assert isinstance(structure, ConvPattern)
        name = kw["name"]
        self.source_map = _map_shape(tuple(source), name)
        self.target_map = _map_shape(tuple(target), name)
        opts = structure.options
        flat_target = len(tuple(target)) == 1
        self.kernel_size = 1 if flat_target else int(opts["kernel"])
        self.dilation = 1 if flat_target else int(opts["dilation"])
        self.groups = int(opts["groups"])
        c_in, c_out = self.source_map[0], self.target_map[0]
        if c_in % self.groups or c_out % self.groups:
            raise ValueError(
                f"init='conv': groups={self.groups} does not divide the channels of the inner "
                f"feedback {name} ({c_in} -> {c_out})"
            )
        (_, hs, ws), (_, ht, wt) = self.source_map, self.target_map
        if not ((ht <= hs and wt <= ws) or (ht >= hs and wt >= ws)):
            raise ValueError(
                f"init='conv': the inner feedback {name} maps {hs}x{ws} to {ht}x{wt}, larger in "
                "one direction and smaller in the other: not supported"
            )
        self.fan_in = self.kernel_size**2 * c_in // self.groups
        super().__init__(structure, source, target, **kw)
        bound = math.sqrt(self.source_size / (self.target_size * self.fan_in))
        shape = (c_out, c_in // self.groups, self.kernel_size, self.kernel_size)
        g = _generator(self.seed)
        if self.binary:
            kernel = torch.randint(0, 2, shape, generator=g, dtype=torch.float32).mul_(2).sub_(1)
        else:
            kernel = torch.rand(shape, generator=g, dtype=torch.float32)
            kernel = kernel.mul_(2 * bound).sub_(bound)
        self.register_buffer("kernel", kernel)

    def entry_rms(self) -> float:
        return math.sqrt(self.source_size / (3.0 * self.target_size * self.fan_in))

    def resize(self, maps: Tensor) -> Tensor:
        """Step 1: the source maps ``(N, C_M, H_M, W_M)`` at the target's height and width."""
        size = self.target_map[1:]
        if tuple(maps.shape[-2:]) == size:
            return maps
        if size[0] <= maps.shape[-2]:
            return F.adaptive_avg_pool2d(maps, size)
        return F.interpolate(maps, size=size, mode="nearest")

    def apply_pattern(self, signal: Tensor) -> Tensor:
        maps = self.resize(signal.reshape(signal.shape[0], *self.source_map))
        return F.conv2d(
            maps,
            self.kernel.to(maps.dtype),
            padding=self.dilation * (self.kernel_size - 1) // 2,
            dilation=self.dilation,
            groups=self.groups,
        )

    def macs(self) -> int:
        return self.target_size * self.fan_in


OPERATORS: dict[str, type[FeedbackOperator]] = {
    "dense": DenseOperator,
    "sparse": SparseOperator,
    "conv": ConvOperator,
}


def make_operator(
    structure: Pattern,
    source: Sequence[int],
    target: Sequence[int],
    *,
    seed: int,
    binary: bool,
    gain: float = 1.0,
    normalize: bool = True,
    name: str = "",
) -> FeedbackOperator:
    """The inner operator the structure draws (its ``operator_kind``) from a module output of
    per-sample shape ``source`` to an inner point of shape ``target``."""
    cls = OPERATORS.get(structure.operator_kind)
    if cls is None:
        raise ValueError(
            f"init={structure.name!r} draws operators of kind {structure.operator_kind!r}, which "
            f"is not one of {', '.join(map(repr, OPERATORS))}"
        )
    return cls(
        structure, source, target, seed=seed, binary=binary, gain=gain, normalize=normalize,
        name=name,
    )  # fmt: skip


def operator_from_layout(layout: Mapping[str, Any], *, gain: float = 1.0) -> FeedbackOperator:
    """Rebuild an operator from :meth:`FeedbackOperator.layout` (its buffers then come from
    ``load_state_dict``)."""
    structure = make_pattern(layout["init"], **layout.get("init_options", {}))
    return make_operator(
        structure,
        layout["source"],
        layout["target"],
        seed=layout["seed"],
        binary=layout["binary"],
        gain=gain,
        normalize=layout.get("normalize", True),
        name=layout.get("name", ""),
    )
