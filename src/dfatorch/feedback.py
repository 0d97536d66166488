"""Direct feedback matrices: feedback structures, storage strategies and the projection.

A :class:`FeedbackMatrix` holds the feedback of every feedback point of a model side by side, as
one ``(num_classes, D)`` matrix ``B = [B_1 | B_2 | ...]`` with ``D = sum(d_l)``, so that a single
matmul ``e @ B`` serves every layer (:meth:`FeedbackMatrix.project`). Each block is
``pattern_l * scale_l``: a pattern drawn by a :class:`Pattern` (the *feedback structure*) and one
scale per feedback point. Binary feedback (BDFA) has a ``{-1, +1}`` pattern, so ``B_l`` takes the
two values ``-s_l`` and ``+s_l``. A *learned* point (DKP) keeps its block as an ``nn.Parameter``
that starts at ``pattern_l * scale_l`` and is trained (see :class:`FeedbackMatrix`).

Both strategies are plug-ins, one small class and one registry entry each:

- a :class:`Pattern` draws the pattern of one point (``uniform``, ``gaussian``, ``orthogonal``,
  ``balanced``, ``norm_matched``; :func:`register_pattern` adds more). Its parameters (for example
  a density) are declared by the class, saved with the matrix and checked on load;
- a :class:`PatternStorage` keeps it (:func:`register_storage` adds more):

  - ``dense``: the pattern as a float buffer (4 bytes a weight in float32).
  - ``packed``: binary patterns only, 1 bit a weight in a ``uint8`` buffer, unpacked for the matmul.
  - ``seeded``: nothing stored; the pattern is regenerated from its seed at every projection.

  All three build ``B`` with the same operations from the same bits, so they give bit-identical
  gradients. The projection does not know which one it uses. A registered fourth, ``sparse``,
  keeps only the non-zero entries (CSR of ``B^T``) and projects with a sparse matmul: the same
  ``B``, the same gradients up to float summation order.

Two structures with options are registered beside the built-in ones (not in
:class:`FeedbackInit`, which lists the dense ones): ``sparse`` (``density``: each unit connected to
``max(1, round(density * C))`` of the ``C`` sources, Crafton et al. 2019's one connection per unit
at ``density = 1/C``) and ``conv`` (``kernel``, ``dilation``, ``groups``: a fixed random
convolution, the inner feedback of module-wise DFA, :mod:`dfatorch.modulewise`). A structure also
draws the *inner operators* of module-wise DFA (``operator_kind``: ``dense``, ``sparse`` or
``conv``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ._enums import StrEnum

__all__ = [
    "PATTERNS",
    "STORAGES",
    "ConvPattern",
    "FeedbackInit",
    "FeedbackMatrix",
    "Pattern",
    "PatternStorage",
    "SparsePattern",
    "SparseStorage",
    "Storage",
    "distinct_rows",
    "make_pattern",
    "make_storage",
    "pack_signs",
    "register_pattern",
    "register_storage",
    "sample_pattern",
    "unpack_signs",
]


class FeedbackInit(StrEnum):
    """The built-in feedback structures (names in :data:`PATTERNS`): how a pattern ``B_l`` of
    shape ``(C, d)`` is drawn (``C`` classes, ``d`` units).

    - ``uniform``: Nøkland (2016): i.i.d. ``U(-1/sqrt(d), 1/sqrt(d))``. Binary: i.i.d. random signs.
    - ``gaussian``: Launay et al. (2019): i.i.d. ``N(0, 1/(C d))``. Binary: i.i.d. random signs.
    - ``orthogonal``: a deliberately chosen pattern (one candidate for Han & Yoo's initialisation):
      the ``C`` rows are mutually orthogonal, so different classes' errors are projected onto
      orthogonal directions. Float: orthonormal rows (QR of a Gaussian) scaled to the entry RMS of
      ``uniform``. Binary: rows 1..C of a Sylvester-Hadamard matrix of order ``m`` (the smallest
      power of two > C), repeated over column blocks of ``m`` with a random column permutation per
      block and a random sign per row: exactly orthogonal and zero-mean rows when ``m`` divides
      ``d``, nearly so otherwise.
    - ``balanced``: another candidate: sign-balanced, zero mean in every row and every column,
      so no unit receives a bias common to all classes and every class pushes up as many units as it
      pushes down. Float: a Gaussian, double-centred (row and column means removed), scaled to the
      entry RMS of ``uniform``. Binary: the cyclic pattern ``+1 if (i + j) mod C < C/2`` under
      random row and column permutations (exactly balanced columns for even C; rows exactly
      balanced when C divides d).

    The third candidate of the paper's idea, a scale that makes the projected signal's norm match
    the back-propagated gradient's at initialisation, is not a pattern but a scale: see
    :meth:`dfatorch.engine.DFAEngine.calibrate` (``attach(..., init="norm_matched")`` draws the
    ``uniform`` pattern and requires that calibration before the first step).
    """

    UNIFORM = "uniform"
    GAUSSIAN = "gaussian"
    ORTHOGONAL = "orthogonal"
    BALANCED = "balanced"
    NORM_MATCHED = "norm_matched"


class Storage(StrEnum):
    """The built-in storage strategies (names in :data:`STORAGES`; see the module docstring)."""

    DENSE = "dense"
    PACKED = "packed"
    SEEDED = "seeded"


def _generator(seed: int) -> torch.Generator:
    # Drawn on the CPU whatever the model's device: the same seed gives the same matrix anywhere.
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _hadamard(order: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class Pattern:
    """A feedback structure: draws the unscaled pattern of one feedback point.

    A subclass sets ``name`` (its registry key), declares its parameters with their defaults in
    ``params`` and implements :meth:`sample`; :func:`register_pattern` makes it available to
    ``attach(init=...)`` by name. Parameter values are saved with the feedback and must agree when
    a checkpoint is loaded. :meth:`entry_rms` is the root mean square of one float entry: binary
    feedback is scaled by it so that BDFA projects signals of the same size as DFA.
    """

    name: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Any]] = {}
    #: the inner operator of module-wise DFA this structure draws (:mod:`dfatorch.modulewise`):
    #: ``dense`` (a matrix drawn by :meth:`sample`), ``sparse`` or ``conv``
    operator_kind: ClassVar[str] = "dense"

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.params))
        if unknown:
            known = sorted(self.params) or "none"
            raise ValueError(f"feedback {self.name!r} has no option {unknown} (options: {known})")
        self.options: dict[str, Any] = {
            k: type(v)(options.get(k, v)) for k, v in self.params.items()
        }
        self.check()

    def check(self) -> None:
        """Refuse bad option values (``ValueError``, one line); the default accepts all."""

    def sample(
        self, num_classes: int, d: int, *, generator: torch.Generator, binary: bool
    ) -> Tensor:
        """A float32 ``(num_classes, d)`` pattern; ``{-1, +1}`` if ``binary``."""
        raise NotImplementedError

    def entry_rms(self, num_classes: int, d: int) -> float:
        """Root mean square of one entry of the float pattern."""
        return 1.0 / math.sqrt(3.0 * d)  # the RMS of U(-1/sqrt(d), 1/sqrt(d))

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}(name={self.name!r}{opts})"


#: Feedback structures by name; :func:`register_pattern` adds one.
PATTERNS: dict[str, type[Pattern]] = {}


def register_pattern(cls: type[Pattern]) -> type[Pattern]:
    """Class decorator: make a :class:`Pattern` subclass available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    PATTERNS[cls.name] = cls
    return cls


def _key(value: Any) -> str:
    return str(value.value) if isinstance(value, Enum) else str(value)


def make_pattern(spec: Pattern | FeedbackInit | str, **options: Any) -> Pattern:
    """A :class:`Pattern` from a registry name (with ``options``) or an instance (returned)."""
    if isinstance(spec, Pattern):
        if options:
            raise ValueError("options go to the Pattern's constructor when passing an instance")
        return spec
    cls = PATTERNS.get(_key(spec))
    if cls is None:
        raise ValueError(f"init={_key(spec)!r} is not one of {', '.join(map(repr, PATTERNS))}")
    return cls(**options)


def _random_signs(c: int, d: int, g: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (c, d), generator=g, dtype=torch.float32).mul_(2).sub_(1)


@register_pattern
class UniformPattern(Pattern):
    """Nøkland (2016): i.i.d. ``U(-1/sqrt(d), 1/sqrt(d))``; binary: i.i.d. random signs."""

    name = "uniform"

    def sample(
        self, num_classes: int, d: int, *, generator: torch.Generator, binary: bool
    ) -> Tensor:
        if binary:
            return _random_signs(num_classes, d, generator)
        bound = 1.0 / math.sqrt(d)
        return (
            torch.rand(num_classes, d, generator=generator, dtype=torch.float32)
            .mul_(2 * bound)
            .sub_(bound)
        )


@register_pattern
class NormMatchedPattern(UniformPattern):
    """The ``uniform`` pattern, whose scales :meth:`~dfatorch.engine.DFAEngine.calibrate` sets."""

    name = "norm_matched"


@register_pattern
class GaussianPattern(Pattern):
    """Launay et al. (2019): i.i.d. ``N(0, 1/(C d))``; binary: i.i.d. random signs."""

    name = "gaussian"

    def entry_rms(self, num_classes: int, d: int) -> float:
        return 1.0 / math.sqrt(num_classes * d)

    def sample(
        self, num_classes: int, d: int, *, generator: torch.Generator, binary: bool
    ) -> Tensor:
        if binary:
            return _random_signs(num_classes, d, generator)
        rms = self.entry_rms(num_classes, d)
        return torch.randn(num_classes, d, generator=generator, dtype=torch.float32).mul_(rms)


@register_pattern
class OrthogonalPattern(Pattern):
    """Mutually orthogonal rows (see :class:`FeedbackInit`)."""

    name = "orthogonal"

    def sample(
        self, num_classes: int, d: int, *, generator: torch.Generator, binary: bool
    ) -> Tensor:
        c, g = num_classes, generator
        if binary:
            m = 1 << max(1, math.ceil(math.log2(c + 1)))
            rows = _hadamard(m)[1 : c + 1]  # row 0 is all ones: leave it out
            blocks = [rows[:, torch.randperm(m, generator=g)] for _ in range(math.ceil(d / m))]
            flips = torch.randint(0, 2, (c, 1), generator=g, dtype=torch.float32).mul_(2).sub_(1)
            return torch.cat(blocks, 1)[:, :d].mul_(flips).contiguous()
        a = torch.randn(max(d, c), c, generator=g, dtype=torch.float64)
        q, r = torch.linalg.qr(a)  # q: orthonormal columns
        q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
        # with more classes than units the rows cannot all be orthogonal: keep orthonormal columns
        pattern = q.T if d >= c else q[:c, :d]
        pattern = pattern / pattern.pow(2).mean().sqrt() * self.entry_rms(c, d)
        return pattern.float().contiguous()


@register_pattern
class BalancedPattern(Pattern):
    """Zero mean in every row and column (see :class:`FeedbackInit`)."""

    name = "balanced"

    def sample(
        self, num_classes: int, d: int, *, generator: torch.Generator, binary: bool
    ) -> Tensor:
        c, g = num_classes, generator
        if binary:
            i = torch.arange(c).unsqueeze(1)
            j = torch.arange(d).unsqueeze(0)
            one = torch.ones((), dtype=torch.float32)
            base = torch.where((i + j) % c < c // 2, one, -one)
            if c % 2:  # odd C: alternate the extra sign between columns to stay near zero mean
                base[c - 1] = torch.where(j.squeeze(0) % 2 == 0, one, -one)
            return base[torch.randperm(c, generator=g)][:, torch.randperm(d, generator=g)]
        a = torch.randn(c, d, generator=g, dtype=torch.float64)
        a = a - a.mean(1, keepdim=True) - a.mean(0, keepdim=True) + a.mean()
        rms = a.pow(2).mean().sqrt().clamp_min(1e-12)
        return (a / rms * self.entry_rms(c, d)).float()


def distinct_rows(rows: int, cols: int, per_column: int, generator: torch.Generator) -> Tensor:
    """For each of ``cols`` columns, ``per_column`` distinct row indices in ``[0, rows)``, sorted:
    an int64 ``(cols, per_column)`` tensor, deterministic in ``generator``. Memory is
    ``O(cols * per_column)`` unless ``per_column > rows / 2`` (then ``O(cols * rows)``)."""
    m = per_column
    if 2 * m > rows:
        idx = torch.rand(cols, rows, generator=generator, dtype=torch.float32).argsort(1)[:, :m]
    else:
        idx = torch.randint(0, rows, (cols, m), generator=generator)
        while m > 1:  # draw again the entries that repeat a row of their column
            idx = idx.sort(1).values
            again = torch.zeros_like(idx, dtype=torch.bool)
            again[:, 1:] = idx[:, 1:] == idx[:, :-1]
            count = int(again.sum())
            if not count:
                break
            idx[again] = torch.randint(0, rows, (count,), generator=generator)
    return idx.sort(1).values


@register_pattern
class SparsePattern(Pattern):
    """Sparse feedback (Crafton et al. 2019, "Direct Feedback Alignment with Sparse
    Connections"): every column (unit) of ``B`` is connected to exactly
    ``m = max(1, round(density * C))`` of the ``C`` rows (classes, or the units of a module's
    output for an inner operator), chosen at random; ``density = 1/C`` is their extreme of one
    connection per unit. Float entries are ``U(-b, b)`` with ``b = sqrt(C / (m d))``, so that a
    column has the expected squared norm of ``uniform``'s (``C / (3 d)``); binary entries are
    random signs. ``density = 1`` is ``uniform`` drawn in another order.

    Kept sparsely by ``storage="sparse"`` (indices and values, sparse matmul) or not at all by
    ``seeded``; ``dense`` keeps the zeros too.
    """

    name = "sparse"
    params: ClassVar[Mapping[str, Any]] = {"density": 0.1}
    operator_kind = "sparse"

    def check(self) -> None:
        density = self.options["density"]
        if not (0 < density <= 1):
            raise ValueError(f"init='sparse': density must be in (0, 1], got {density}")

    def per_column(self, rows: int) -> int:
        """Non-zero entries per column of a ``rows``-row pattern."""
        return max(1, min(rows, round(self.options["density"] * rows)))

    def entry_rms(self, num_classes: int, d: int) -> float:
        # the RMS of a non-zero float entry: binary feedback is scaled by it, which gives its
        # columns the norm of the float ones
        return math.sqrt(num_classes / (3.0 * self.per_column(num_classes) * d))

    def sample_sparse(
        self, rows: int, cols: int, *, generator: torch.Generator, binary: bool
    ) -> tuple[Tensor, Tensor]:
        """The non-zeros of a ``(rows, cols)`` pattern, column by column: row indices and values,
        both ``(cols, m)`` (int64, float32), rows sorted within a column."""
        m = self.per_column(rows)
        index = distinct_rows(rows, cols, m, generator)
        if binary:
            values = _random_signs(cols, m, generator)
        else:
            bound = math.sqrt(rows / (m * cols))
            values = torch.rand(cols, m, generator=generator, dtype=torch.float32)
            values = values.mul_(2 * bound).sub_(bound)
        return index, values

    def sample(
        self, num_classes: int, d: int, *, generator: torch.Generator, binary: bool
    ) -> Tensor:
        index, values = self.sample_sparse(num_classes, d, generator=generator, binary=binary)
        pattern = torch.zeros(d, num_classes, dtype=torch.float32)
        pattern.scatter_(1, index, values)
        return pattern.T.contiguous()


@register_pattern
class ConvPattern(UniformPattern):
    """A fixed random convolution as the inner feedback of module-wise DFA (our reading of Han et
    al. 2020, "sparse backward weights, realised as dilated convolution in the CNN case"; see
    :class:`dfatorch.modulewise.ConvOperator` for what it computes): ``kernel`` (odd, so that the
    map keeps its size), ``dilation`` and ``groups``; weights ``k * k * C_in * C_out / groups``,
    independent of the map's height and width.

    Where the error is a vector and not a map (the projection ``e @ B_M`` onto a module's output),
    this structure draws ``uniform``'s dense pattern: ``init="conv"`` means a uniform ``B_M`` onto
    module outputs and convolutions inside the modules (``scope="module"``, ``inner="dfa"``).
    """

    name = "conv"
    params: ClassVar[Mapping[str, Any]] = {"kernel": 3, "dilation": 1, "groups": 1}
    operator_kind = "conv"

    def check(self) -> None:
        k, d, g = (self.options[n] for n in ("kernel", "dilation", "groups"))
        if k < 1 or k % 2 == 0:
            raise ValueError(f"init='conv': kernel must be odd and >= 1 (same-size maps), got {k}")
        if d < 1:
            raise ValueError(f"init='conv': dilation must be >= 1, got {d}")
        if g < 1:
            raise ValueError(f"init='conv': groups must be >= 1, got {g}")


def sample_pattern(
    init: Pattern | FeedbackInit | str, num_classes: int, d: int, *, seed: int, binary: bool
) -> Tensor:
    """Draw the unscaled pattern of one feedback point: a float32 ``(num_classes, d)`` tensor.

    Binary patterns hold exactly ``-1.0`` and ``+1.0``; float patterns carry the init's own
    magnitude (``uniform``: ``U(-1/sqrt(d), 1/sqrt(d))``). Deterministic in ``seed``.
    """
    return make_pattern(init).sample(num_classes, d, generator=_generator(seed), binary=binary)


Layout = tuple[Sequence[int], Sequence[int]]  # (shape, strides) of a feedback point


def _layout(t: Tensor | Layout) -> Layout:
    return (t.shape, t.stride()) if isinstance(t, Tensor) else t


def _memory_order(layout: Layout) -> tuple[int, ...] | None:
    """The non-batch dims from outermost to innermost in memory; ``None`` if in logical order."""
    shape, stride = layout
    dims = tuple(sorted(range(1, len(shape)), key=lambda d: -stride[d]))
    return None if dims == tuple(range(1, len(shape))) else dims


_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_signs(pattern: Tensor) -> Tensor:
    """Pack a ``{-1, +1}`` matrix ``(C, D)`` into ``uint8`` ``(C, ceil(D/8))``, 1 bit a weight."""
    c, d = pattern.shape
    bits = (pattern > 0).to(torch.uint8)
    pad = (-d) % 8
    if pad:
        bits = torch.cat([bits, bits.new_zeros(c, pad)], 1)
    weights = _BIT_WEIGHTS.to(bits.device)
    return (bits.view(c, -1, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, d: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of :func:`pack_signs`: the ``{-1, +1}`` matrix ``(C, d)`` in ``dtype``."""
    weights = _BIT_WEIGHTS.to(packed.device)
    bits = (packed.unsqueeze(-1) & weights) != 0
    signs = bits.view(packed.shape[0], -1)[:, :d]
    return signs.to(dtype).mul_(2).sub_(1)


class PatternStorage:
    """How a :class:`FeedbackMatrix` (or a layer-wise ``fa`` feedback,
    :class:`dfatorch.layerwise.RandomFeedback`) keeps its pattern: a strategy the projection does
    not see. A holder provides ``generate()`` (the whole unscaled pattern), ``scales`` and
    ``total_size`` (the pattern's columns).

    A subclass sets ``name`` and implements :meth:`store` (register buffers on the matrix),
    :meth:`pattern` (the unscaled ``(C, D)`` pattern) and :meth:`nbytes`; ``binary_only`` refuses
    float feedback, ``cache_matrix`` lets the matrix keep ``B`` between calls (dense storage; the
    others rebuild it each time, which is the memory they save). :meth:`sources` names the tensors
    a cached ``B`` depends on. :func:`register_storage` makes it available by name.
    """

    name: ClassVar[str] = ""
    binary_only: ClassVar[bool] = False
    cache_matrix: ClassVar[bool] = False

    def store(self, matrix: FeedbackMatrix, pattern: Callable[[], Tensor]) -> None:
        """Keep the pattern (``pattern()`` draws it) as buffers of ``matrix``."""

    def pattern(self, matrix: FeedbackMatrix, dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def nbytes(self, matrix: FeedbackMatrix) -> int:
        return 0

    def project(self, matrix: FeedbackMatrix, error: Tensor) -> Tensor | None:
        """``e @ B`` ``(N, D)`` in the logical column order, computed by the storage itself (a
        sparse matmul), or ``None`` for the matrix's dense matmul (the default)."""
        return None

    def macs(self, matrix: FeedbackMatrix) -> int:
        """Multiply-adds per sample of the projection: ``C * D`` for a dense matmul."""
        return matrix.num_classes * matrix.total_size

    def sources(self, matrix: FeedbackMatrix) -> tuple[Tensor, ...]:
        return ()


#: Storage strategies by name; :func:`register_storage` adds one.
STORAGES: dict[str, type[PatternStorage]] = {}


def register_storage(cls: type[PatternStorage]) -> type[PatternStorage]:
    """Class decorator: make a :class:`PatternStorage` subclass available by its ``name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    STORAGES[cls.name] = cls
    return cls


@register_storage
class DenseStorage(PatternStorage):
    """The pattern as a float buffer ``pattern``."""

    name = "dense"
    cache_matrix = True

    def store(self, matrix: FeedbackMatrix, pattern: Callable[[], Tensor]) -> None:
        matrix.register_buffer("pattern", pattern())

    def pattern(self, matrix: FeedbackMatrix, dtype: torch.dtype) -> Tensor:
        return matrix.pattern.to(dtype)

    def nbytes(self, matrix: FeedbackMatrix) -> int:
        return matrix.pattern.numel() * matrix.pattern.element_size()

    def sources(self, matrix: FeedbackMatrix) -> tuple[Tensor, ...]:
        return (matrix.pattern,)


@register_storage
class PackedStorage(PatternStorage):
    """Binary patterns as bits, 8 weights a byte, in a ``uint8`` buffer ``bits``."""

    name = "packed"
    binary_only = True

    def store(self, matrix: FeedbackMatrix, pattern: Callable[[], Tensor]) -> None:
        drawn = pattern()
        if not bool(drawn.abs().eq(1).all()):
            raise ValueError(
                f"packed storage keeps one sign a weight, but init={matrix.init!r} has other "
                "values (zeros?): use storage='sparse', 'dense' or 'seeded'"
            )
        matrix.register_buffer("bits", pack_signs(drawn))

    def pattern(self, matrix: FeedbackMatrix, dtype: torch.dtype) -> Tensor:
        return unpack_signs(matrix.bits, matrix.total_size, dtype)

    def nbytes(self, matrix: FeedbackMatrix) -> int:
        return matrix.bits.numel()


@register_storage
class SeededStorage(PatternStorage):
    """Nothing stored: the pattern is drawn again from its seeds at every call."""

    name = "seeded"

    def pattern(self, matrix: FeedbackMatrix, dtype: torch.dtype) -> Tensor:
        return matrix.generate().to(device=matrix.scales.device, dtype=dtype)


@register_storage
class SparseStorage(PatternStorage):
    """The non-zero entries only, as the CSR form of ``B^T`` (``D`` rows, one per unit):
    ``sparse_rows`` (``D + 1`` row pointers), ``sparse_columns`` (the class of each entry) and
    ``sparse_values``, int32, int32 and float32: ``4 (D + 1) + 8 nnz`` bytes. The projection is
    one sparse matmul, ``(B^T e^T)^T``, ``nnz`` multiply-adds per sample; the pattern is any
    structure's (zeros are dropped), ``init="sparse"`` being the one it is for. Not in
    :class:`Storage`, which lists the storages that give bit-identical gradients: this one sums
    in another order."""

    name = "sparse"

    def store(self, matrix: FeedbackMatrix, pattern: Callable[[], Tensor]) -> None:
        transposed = pattern().T
        counts = (transposed != 0).sum(1)
        rows = torch.zeros(transposed.shape[0] + 1, dtype=torch.int32)
        rows[1:] = counts.cumsum(0)
        unit, column = transposed.nonzero(as_tuple=True)  # row-major: sorted by unit, then class
        matrix.register_buffer("sparse_rows", rows)
        matrix.register_buffer("sparse_columns", column.to(torch.int32))
        matrix.register_buffer("sparse_values", transposed[unit, column].contiguous())

    def _unit_of_entry(self, matrix: FeedbackMatrix) -> Tensor:
        counts = matrix.sparse_rows.diff().long()
        units = torch.arange(matrix.total_size, device=counts.device)
        return units.repeat_interleave(counts)

    def pattern(self, matrix: FeedbackMatrix, dtype: torch.dtype) -> Tensor:
        dense = torch.zeros(
            matrix.total_size, matrix.num_classes, dtype=dtype, device=matrix.sparse_values.device
        )
        dense[self._unit_of_entry(matrix), matrix.sparse_columns.long()] = matrix.sparse_values.to(
            dtype
        )
        return dense.T

    def project(self, matrix: FeedbackMatrix, error: Tensor) -> Tensor:
        units = self._unit_of_entry(matrix)
        values = matrix.sparse_values.to(error.dtype) * matrix.column_scales(error.dtype)[units]
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what we need
            warnings.simplefilter("ignore", UserWarning)
            transposed = torch.sparse_csr_tensor(
                matrix.sparse_rows.long(),
                matrix.sparse_columns.long(),
                values,
                (matrix.total_size, matrix.num_classes),
                check_invariants=False,
            )
            return torch.sparse.mm(transposed, error.T).T

    def nbytes(self, matrix: FeedbackMatrix) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (matrix.sparse_rows, matrix.sparse_columns, matrix.sparse_values)
        )

    def macs(self, matrix: FeedbackMatrix) -> int:
        return int(matrix.sparse_values.numel())

    def sources(self, matrix: FeedbackMatrix) -> tuple[Tensor, ...]:
        return (matrix.sparse_values,)


def make_storage(spec: PatternStorage | Storage | str) -> PatternStorage:
    """A :class:`PatternStorage` from a registry name or an instance (returned)."""
    if isinstance(spec, PatternStorage):
        return spec
    cls = STORAGES.get(_key(spec))
    if cls is None:
        raise ValueError(f"storage={_key(spec)!r} is not one of {', '.join(map(repr, STORAGES))}")
    return cls()


class FeedbackMatrix(nn.Module):
    """The feedback of all feedback points of one model: ``B = [B_1 | ... | B_L]``, ``(C, D)``.

    Args:
        num_classes: ``C``, the size of the output error ``e``.
        sizes: ``d_l``, the number of units at each feedback point (``C*H*W`` for a conv map).
        binary: per feedback point, whether its pattern is ``{-1, +1}`` (BDFA) or float (DFA).
        init: the feedback structure: a :class:`Pattern`, or the registry name of one
            (:class:`FeedbackInit` lists the built-in ones).
        storage: a :class:`PatternStorage` or its registry name (:class:`Storage` lists the
            built-in ones); ``packed`` needs every point to be binary.
        seed: point ``l`` draws from seed ``seed * 1_000_003 + l``: independent patterns.
        gain: a factor on every scale. The default scale is ``gain`` for float patterns (their
            magnitude is the init's own) and ``gain * RMS`` of the init's float entries for binary
            patterns (:meth:`Pattern.entry_rms`), so that BDFA projects signals of the same size as
            DFA.
        normalize: the inits scale entries by ``1/sqrt(d)`` (width normalisation, so that a wide
            layer does not receive a larger error than a narrow one); ``False`` multiplies every
            scale by ``sqrt(d)`` (entries of order 1, as in unnormalised DFA).
        names: a label per feedback point (for messages and ``repr``).
        learned: per feedback point, whether its block is learned (DKP): then ``B_l`` is an
            ``nn.Parameter`` (in :attr:`learned_blocks`) that starts at ``pattern_l * scale_l``;
            the storage still keeps the pattern it started from. Learned points are float.

    The matrix is held in registered buffers (``pattern`` or ``bits``, and ``scales``), so it
    moves with ``.to()`` and is saved in ``state_dict()``; the layout, the structure's options
    included, is saved as extra state and checked on load.
    """

    def __init__(
        self,
        num_classes: int,
        sizes: Sequence[int],
        *,
        binary: Sequence[bool],
        init: Pattern | FeedbackInit | str = FeedbackInit.UNIFORM,
        storage: PatternStorage | Storage | str = Storage.DENSE,
        seed: int = 0,
        gain: float = 1.0,
        normalize: bool = True,
        names: Sequence[str] | None = None,
        learned: Sequence[bool] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.sizes = [int(d) for d in sizes]
        self.binary = [bool(b) for b in binary]
        self.structure = make_pattern(init)
        self.store = make_storage(storage)
        self.seed = int(seed)
        self.names = list(names) if names is not None else [f"point{i}" for i in range(len(sizes))]
        self.learned = [bool(b) for b in learned] if learned is not None else [False] * len(sizes)
        if len({len(self.binary), len(self.names), len(self.learned)} | {len(self.sizes)}) != 1:
            raise ValueError("sizes, binary, names and learned need one entry per feedback point")
        if any(b and ln for b, ln in zip(self.binary, self.learned)):
            raise ValueError("a learned feedback point is float: it cannot also be binary")
        if not self.sizes:
            raise ValueError("a FeedbackMatrix needs at least one feedback point")
        if self.num_classes < 1 or min(self.sizes) < 1:
            raise ValueError(f"bad feedback shape: C={num_classes}, sizes={self.sizes}")
        if self.store.binary_only and not all(self.binary):
            floats = [n for n, b in zip(self.names, self.binary) if not b]
            raise ValueError(
                f"{self.store.name} storage holds 1 bit a weight and needs binary feedback (bdfa) "
                f"at every feedback point; float points: {floats}"
            )
        self.normalize = bool(normalize)
        scales = [
            gain
            * (self.structure.entry_rms(self.num_classes, d) if b else 1.0)
            * (1.0 if normalize else math.sqrt(d))
            for d, b in zip(self.sizes, self.binary)
        ]
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))
        self.store.store(self, self.generate)
        self.learned_blocks = nn.ParameterList()
        if any(self.learned):
            with torch.no_grad():
                start = self.full_pattern(torch.float32) * self.column_scales(torch.float32)
                for block, is_learned in zip(start.split(self.sizes, 1), self.learned):
                    if is_learned:
                        self.learned_blocks.append(nn.Parameter(block.clone()))

    @property
    def learned_index(self) -> list[int]:
        """The indices of the learned points, in the order of :attr:`learned_blocks`."""
        return [i for i, b in enumerate(self.learned) if b]

    # -- the pattern ---------------------------------------------------------------------------

    @property
    def init(self) -> str:
        """The registry name of the feedback structure."""
        return self.structure.name

    @property
    def storage(self) -> str:
        """The registry name of the storage strategy."""
        return self.store.name

    @property
    def total_size(self) -> int:
        """``D``, the number of columns of ``B``."""
        return sum(self.sizes)

    def point_seed(self, index: int) -> int:
        """The seed of feedback point ``index``."""
        return self.seed * 1_000_003 + index

    def generate(self) -> Tensor:
        """Draw the whole unscaled pattern ``(C, D)`` from the seeds (on the CPU, float32)."""
        return torch.cat(
            [
                self.structure.sample(
                    self.num_classes, d, generator=_generator(self.point_seed(i)), binary=b
                )
                for i, (d, b) in enumerate(zip(self.sizes, self.binary))
            ],
            1,
        )

    def full_pattern(self, dtype: torch.dtype | None = None) -> Tensor:
        """The unscaled pattern ``(C, D)``, whatever the storage."""
        return self.store.pattern(self, dtype or self.scales.dtype)

    def _cached(self, key: tuple[Any, ...], sources: tuple[Tensor, ...], build: Any) -> Tensor:
        # A cached value is valid while the very tensors it was built from are still the buffers
        # and unchanged: the entry holds them (so their memory cannot be reused by new buffers)
        # and compares identity and version. .to(), load_state_dict() and in-place changes such
        # as calibration all invalidate it.
        cache: dict[tuple[Any, ...], tuple[tuple[Any, ...], Tensor]] = self.__dict__.setdefault(
            "_matrix_cache", {}
        )
        stamp = tuple((t, t._version, t.data_ptr()) for t in sources)
        hit = cache.get(key)
        if (
            hit is not None
            and len(hit[0]) == len(stamp)
            and all(
                a is b and va == vb and pa == pb for (a, va, pa), (b, vb, pb) in zip(hit[0], stamp)
            )
        ):
            return hit[1]
        if len(cache) > 8:
            cache.clear()
        value = build()
        cache[key] = (stamp, value)
        return value

    def _sources(self) -> tuple[Tensor, ...]:
        return (self.scales, *self.store.sources(self), *self.learned_blocks)

    def column_scales(self, dtype: torch.dtype | None = None) -> Tensor:
        """The scale of every column of ``B``, ``(D,)``."""
        dtype = dtype or self.scales.dtype

        def build() -> Tensor:
            sizes = torch.tensor(self.sizes, device=self.scales.device)
            return self.scales.to(dtype).repeat_interleave(sizes)

        return self._cached(("columns", dtype), (self.scales,), build)

    def matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """``B = pattern * scales``, ``(C, D)``, built by the same operations for every storage;
        the blocks of learned points are their parameters' current values (detached).

        Dense storage keeps the product cached (read it, do not modify it); packed and seeded
        storage rebuild it at every call, which is the memory they save.
        """
        dtype = dtype or self.scales.dtype

        def build() -> Tensor:
            fixed = self.full_pattern(dtype) * self.column_scales(dtype)
            if not len(self.learned_blocks):
                return fixed
            blocks = list(fixed.split(self.sizes, 1))
            for i, p in zip(self.learned_index, self.learned_blocks):
                blocks[i] = p.detach().to(device=fixed.device, dtype=dtype)
            return torch.cat(blocks, 1)

        if not self.store.cache_matrix:
            return build()
        return self._cached(("matrix", dtype), self._sources(), build)

    def blocks(self, dtype: torch.dtype | None = None) -> list[Tensor]:
        """``[B_1, ..., B_L]``, views into :meth:`matrix`."""
        return list(self.matrix(dtype).split(self.sizes, 1))

    def signal(self, error: Tensor, like: Sequence[Tensor | Layout] | None = None) -> Tensor:
        """``e @ B`` for an error ``e`` of shape ``(N, C)``: the ``(N, D)`` signal of every point.

        With ``like`` (per point, a tensor or its ``(shape, strides)``), the columns of a point
        whose map is stored in another memory order (channels-last) are in that order, so that
        :meth:`split` hands back views without copies.
        """
        if error.dim() != 2 or error.shape[1] != self.num_classes:
            raise ValueError(
                f"the output error has shape {tuple(error.shape)}, but the feedback was built for "
                f"(batch, {self.num_classes})"
            )
        layouts = None if like is None else [_layout(t) for t in like]
        orders = (
            [None] * len(self.sizes) if layouts is None else [_memory_order(t) for t in layouts]
        )
        projected = self.store.project(self, error)
        if projected is not None:  # the storage's own product, in logical column order
            if all(o is None for o in orders):
                return projected.contiguous()
            assert layouts is not None
            blocks = projected.split(self.sizes, 1)
            return torch.cat(  # columns of channels-last points in their memory order (a copy)
                [
                    b.contiguous()
                    if o is None
                    else b.reshape(-1, *shape[1:]).permute(0, *o).reshape(len(b), -1)
                    for b, o, (shape, _) in zip(blocks, orders, layouts)
                ],
                1,
            )
        matrix = self.matrix(error.dtype)
        if any(o is not None for o in orders):
            assert layouts is not None

            def reordered() -> Tensor:
                blocks = matrix.split(self.sizes, 1)
                return torch.cat(
                    [
                        b
                        if o is None
                        else b.view(-1, *shape[1:]).permute(0, *o).reshape(len(b), -1)
                        for b, o, (shape, _) in zip(blocks, orders, layouts)
                    ],
                    1,
                )

            if self.store.cache_matrix:
                matrix = self._cached(
                    ("order", tuple(orders), error.dtype), self._sources(), reordered
                )
            else:
                matrix = reordered()
        return error @ matrix

    def split(self, signal: Tensor, like: Sequence[Tensor | Layout] | None = None) -> list[Tensor]:
        """Split an ``(N, D)`` signal from :meth:`signal` into one view per feedback point:
        ``(N, d_l)`` without ``like``, else each point's shape and memory layout."""
        signals = list(signal.split(self.sizes, 1))
        if like is None:
            return signals
        out = []
        for s, (shape, strides) in zip(signals, (_layout(t) for t in like)):
            order = _memory_order((shape, strides))
            if order is None:
                out.append(s.view(shape))
            else:  # view in memory order, then permute back to the logical order
                stored = s.view(shape[0], *(shape[d] for d in order))
                out.append(stored.permute(0, *(1 + order.index(d) for d in range(1, len(shape)))))
        return out

    def project(self, error: Tensor, like: Sequence[Tensor | Layout] | None = None) -> list[Tensor]:
        """``[e @ B_1, ..., e @ B_L]`` for an error ``e`` of shape ``(N, C)``, by one matmul.

        The results are slices of one ``(N, D)`` product: views, no copies. Without ``like`` they
        are ``(N, d_l)``; with ``like`` (per point, a tensor or its ``(shape, strides)``) each
        takes that point's shape *and memory layout*: for a channels-last map the columns of
        ``B_l`` are reordered (a ``C x d_l`` copy) so that the ``N x d_l`` result needs none.
        """
        return self.split(self.signal(error, like), like)

    # -- bookkeeping ---------------------------------------------------------------------------

    def projection_macs(self) -> int:
        """Multiply-adds per sample of the projection ``e @ B`` (``C * D`` dense, ``nnz`` for the
        ``sparse`` storage)."""
        return self.store.macs(self)

    def storage_bytes(self) -> dict[str, int]:
        """Bytes held: ``{"pattern": ..., "scales": ...}`` (``seeded`` holds no pattern); a
        learned point's matrix counts in ``pattern`` beside the pattern it started from."""
        learned = sum(p.numel() * p.element_size() for p in self.learned_blocks)
        return {
            "pattern": self.store.nbytes(self) + learned,
            "scales": self.scales.numel() * self.scales.element_size(),
        }

    def layout(self) -> dict[str, Any]:
        """What defines this matrix besides its buffers (saved as extra state)."""
        return {
            "num_classes": self.num_classes,
            "sizes": list(self.sizes),
            "binary": list(self.binary),
            "init": self.init,
            "init_options": dict(self.structure.options),
            "storage": self.storage,
            "seed": self.seed,
            "normalize": self.normalize,
            "names": list(self.names),
            "learned": list(self.learned),
        }

    @classmethod
    def from_layout(cls, layout: Mapping[str, Any], *, gain: float = 1.0) -> FeedbackMatrix:
        """Rebuild a matrix from :meth:`layout` (its buffers then come from ``load_state_dict``)."""
        if layout["init"] not in PATTERNS:
            raise ValueError(
                f"the saved feedback uses the structure {layout['init']!r}, which is not "
                "registered here (register_pattern it before loading)"
            )
        return cls(
            layout["num_classes"],
            layout["sizes"],
            binary=layout["binary"],
            init=make_pattern(layout["init"], **layout.get("init_options", {})),
            storage=layout["storage"],
            seed=layout["seed"],
            gain=gain,
            normalize=layout.get("normalize", True),
            names=layout["names"],
            learned=layout.get("learned"),
        )

    def get_extra_state(self) -> dict[str, Any]:
        return self.layout()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.layout()
        # Names are labels; everything else decides the matrix and must agree. Checkpoints saved
        # before an option existed carry its default.
        state = {
            "normalize": True,
            "init_options": {},
            "learned": [False] * len(state.get("sizes", [])),
            **state,
        }
        diff = {k: (state.get(k), v) for k, v in mine.items() if k != "names" and state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {s!r}, here {h!r}" for k, (s, h) in diff.items())
            raise ValueError(f"feedback state does not match this feedback layout ({detail})")

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: Any,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # a learned block takes the saved dtype (a float64 run resumes in float64, exactly)
        for i, p in enumerate(self.learned_blocks):
            saved = state_dict.get(f"{prefix}learned_blocks.{i}")
            if isinstance(saved, Tensor) and saved.shape == p.shape and saved.dtype != p.dtype:
                p.data = p.data.to(saved.dtype)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        kinds = "".join(
            "l" if ln else "b" if b else "f" for b, ln in zip(self.binary, self.learned)
        )
        opts = "".join(f", {k}={v!r}" for k, v in self.structure.options.items())
        return (
            f"C={self.num_classes}, sizes={self.sizes}, kinds={kinds}, init={self.init}{opts}, "
            f"storage={self.storage}, seed={self.seed}"
        )
