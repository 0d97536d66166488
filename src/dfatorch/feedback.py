"""Fixed random feedback matrices: initialisations, storage strategies and the projection.

A :class:`FeedbackMatrix` holds the feedback of every feedback point of a model side by side, as
one ``(num_classes, D)`` matrix ``B = [B_1 | B_2 | ...]`` with ``D = sum(d_l)``, so that a single
matmul ``e @ B`` serves every layer (:meth:`FeedbackMatrix.project`). Each block is
``pattern_l * scale_l``: a pattern drawn by a :class:`FeedbackInit` and one scale per feedback
point. Binary feedback (BDFA) has a ``{-1, +1}`` pattern, so ``B_l`` takes the two values
``-s_l`` and ``+s_l``.

How the pattern is kept is a :class:`Storage` strategy; the projection does not know which:

- ``dense``: the pattern as a float buffer (4 bytes a weight in float32).
- ``packed``: binary patterns only, 1 bit a weight in a ``uint8`` buffer, unpacked for the matmul.
- ``seeded``: nothing stored; the pattern is regenerated from its seed at every projection.

All three build ``B`` with the same operations from the same bits, so they give bit-identical
gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "FeedbackInit",
    "FeedbackMatrix",
    "Storage",
    "pack_signs",
    "sample_pattern",
    "unpack_signs",
]


class FeedbackInit(str, Enum):
    """How a feedback pattern ``B_l`` of shape ``(C, d)`` is drawn (``C`` classes, ``d`` units).

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


class Storage(str, Enum):
    """How a :class:`FeedbackMatrix` keeps its pattern (see the module docstring)."""

    DENSE = "dense"
    PACKED = "packed"
    SEEDED = "seeded"


def _generator(seed: int) -> torch.Generator:
    # Drawn on the CPU whatever the model's device: the same seed gives the same matrix anywhere.
    return torch.Generator(device="cpu").manual_seed(int(seed))


def _entry_rms(init: FeedbackInit, num_classes: int, d: int) -> float:
    """Root mean square of one entry of the float pattern of ``init``."""
    if init is FeedbackInit.GAUSSIAN:
        return 1.0 / math.sqrt(num_classes * d)
    return 1.0 / math.sqrt(3.0 * d)  # the RMS of U(-1/sqrt(d), 1/sqrt(d))


def _hadamard(order: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float32)
    while h.shape[0] < order:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def sample_pattern(
    init: FeedbackInit | str, num_classes: int, d: int, *, seed: int, binary: bool
) -> Tensor:
    """Draw the unscaled pattern of one feedback point: a float32 ``(num_classes, d)`` tensor.

    Binary patterns hold exactly ``-1.0`` and ``+1.0``; float patterns carry the init's own
    magnitude (``uniform``: ``U(-1/sqrt(d), 1/sqrt(d))``). Deterministic in ``seed``.
    """
    init = FeedbackInit(init)
    c = num_classes
    g = _generator(seed)
    if init in (FeedbackInit.UNIFORM, FeedbackInit.NORM_MATCHED):
        if binary:
            return torch.randint(0, 2, (c, d), generator=g, dtype=torch.float32).mul_(2).sub_(1)
        bound = 1.0 / math.sqrt(d)
        return torch.rand(c, d, generator=g, dtype=torch.float32).mul_(2 * bound).sub_(bound)
    if init is FeedbackInit.GAUSSIAN:
        if binary:
            return torch.randint(0, 2, (c, d), generator=g, dtype=torch.float32).mul_(2).sub_(1)
        return torch.randn(c, d, generator=g, dtype=torch.float32).mul_(_entry_rms(init, c, d))
    if init is FeedbackInit.ORTHOGONAL:
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
        pattern = pattern / pattern.pow(2).mean().sqrt() * _entry_rms(init, c, d)
        return pattern.float().contiguous()
    if init is FeedbackInit.BALANCED:
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
        return (a / rms * _entry_rms(init, c, d)).float()
    raise ValueError(f"unknown feedback init {init!r}")  # pragma: no cover - enum exhausts it


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


class FeedbackMatrix(nn.Module):
    """The feedback of all feedback points of one model: ``B = [B_1 | ... | B_L]``, ``(C, D)``.

    Args:
        num_classes: ``C``, the size of the output error ``e``.
        sizes: ``d_l``, the number of units at each feedback point (``C*H*W`` for a conv map).
        binary: per feedback point, whether its pattern is ``{-1, +1}`` (BDFA) or float (DFA).
        init: the pattern's :class:`FeedbackInit`.
        storage: a :class:`Storage` strategy; ``packed`` needs every point to be binary.
        seed: point ``l`` draws from seed ``seed * 1_000_003 + l``: independent patterns.
        gain: a factor on every scale. The default scale is ``gain`` for float patterns (their
            magnitude is the init's own) and ``gain * RMS`` of the init's float entries for binary
            patterns, so that BDFA projects signals of the same size as DFA.
        normalize: the inits scale entries by ``1/sqrt(d)`` (width normalisation, so that a wide
            layer does not receive a larger error than a narrow one); ``False`` undoes that
            factor (entries of order 1, as in unnormalised DFA).
        names: a label per feedback point (for messages and ``repr``).

    The matrix is held in registered buffers (``pattern`` or ``bits``, and ``scales``), so it
    moves with ``.to()`` and is saved in ``state_dict()``; the layout is saved as extra state and
    checked on load.
    """

    def __init__(
        self,
        num_classes: int,
        sizes: Sequence[int],
        *,
        binary: Sequence[bool],
        init: FeedbackInit | str = FeedbackInit.UNIFORM,
        storage: Storage | str = Storage.DENSE,
        seed: int = 0,
        gain: float = 1.0,
        normalize: bool = True,
        names: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.sizes = [int(d) for d in sizes]
        self.binary = [bool(b) for b in binary]
        self.init = FeedbackInit(init)
        self.storage = Storage(storage)
        self.seed = int(seed)
        self.names = list(names) if names is not None else [f"point{i}" for i in range(len(sizes))]
        if len(self.binary) != len(self.sizes) or len(self.names) != len(self.sizes):
            raise ValueError("sizes, binary and names must have one entry per feedback point")
        if not self.sizes:
            raise ValueError("a FeedbackMatrix needs at least one feedback point")
        if self.num_classes < 1 or min(self.sizes) < 1:
            raise ValueError(f"bad feedback shape: C={num_classes}, sizes={self.sizes}")
        if self.storage is Storage.PACKED and not all(self.binary):
            floats = [n for n, b in zip(self.names, self.binary) if not b]
            raise ValueError(
                "packed storage holds 1 bit a weight and needs binary feedback (bdfa) at every "
                f"feedback point; float points: {floats}"
            )
        self.normalize = bool(normalize)
        scales = [
            gain
            * (_entry_rms(self.init, self.num_classes, d) if b else 1.0)
            * (1.0 if normalize else math.sqrt(d))
            for d, b in zip(self.sizes, self.binary)
        ]
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32))
        if self.storage is Storage.DENSE:
            self.register_buffer("pattern", self._generate())
        elif self.storage is Storage.PACKED:
            self.register_buffer("bits", pack_signs(self._generate()))

    # -- the pattern ---------------------------------------------------------------------------

    @property
    def total_size(self) -> int:
        """``D``, the number of columns of ``B``."""
        return sum(self.sizes)

    def point_seed(self, index: int) -> int:
        """The seed of feedback point ``index``."""
        return self.seed * 1_000_003 + index

    def _generate(self) -> Tensor:
        return torch.cat(
            [
                sample_pattern(self.init, self.num_classes, d, seed=self.point_seed(i), binary=b)
                for i, (d, b) in enumerate(zip(self.sizes, self.binary))
            ],
            1,
        )

    def full_pattern(self, dtype: torch.dtype | None = None) -> Tensor:
        """The unscaled pattern ``(C, D)``, whatever the storage."""
        dtype = dtype or self.scales.dtype
        if self.storage is Storage.DENSE:
            return self.pattern.to(dtype)
        if self.storage is Storage.PACKED:
            return unpack_signs(self.bits, self.total_size, dtype)
        return self._generate().to(device=self.scales.device, dtype=dtype)

    def _cached(self, key: tuple[Any, ...], build: Any) -> Tensor:
        # Keys hold the buffers' data pointers and versions: .to(), load_state_dict() and in-place
        # changes such as calibration all invalidate them.
        cache: dict[tuple[Any, ...], Tensor] = self.__dict__.setdefault("_matrix_cache", {})
        value = cache.get(key)
        if value is None:
            if len(cache) > 8:
                cache.clear()
            value = cache[key] = build()
        return value

    def _key(self, dtype: torch.dtype, *extra: Any) -> tuple[Any, ...]:
        key: tuple[Any, ...] = (dtype, self.scales.data_ptr(), self.scales._version, *extra)
        if self.storage is Storage.DENSE:
            key += (self.pattern.data_ptr(), self.pattern._version)
        return key

    def column_scales(self, dtype: torch.dtype | None = None) -> Tensor:
        """The scale of every column of ``B``, ``(D,)``."""
        dtype = dtype or self.scales.dtype

        def build() -> Tensor:
            sizes = torch.tensor(self.sizes, device=self.scales.device)
            return self.scales.to(dtype).repeat_interleave(sizes)

        return self._cached(("columns", *self._key(dtype)), build)

    def matrix(self, dtype: torch.dtype | None = None) -> Tensor:
        """``B = pattern * scales``, ``(C, D)``, built by the same operations for every storage.

        Dense storage keeps the product cached (read it, do not modify it); packed and seeded
        storage rebuild it at every call, which is the memory they save.
        """
        dtype = dtype or self.scales.dtype

        def build() -> Tensor:
            return self.full_pattern(dtype) * self.column_scales(dtype)

        if self.storage is not Storage.DENSE:
            return build()
        return self._cached(("matrix", *self._key(dtype)), build)

    def blocks(self, dtype: torch.dtype | None = None) -> list[Tensor]:
        """``[B_1, ..., B_L]``, views into :meth:`matrix`."""
        return list(self.matrix(dtype).split(self.sizes, 1))

    def project(self, error: Tensor, like: Sequence[Tensor | Layout] | None = None) -> list[Tensor]:
        """``[e @ B_1, ..., e @ B_L]`` for an error ``e`` of shape ``(N, C)``, by one matmul.

        The results are slices of one ``(N, D)`` product: views, no copies. Without ``like`` they
        are ``(N, d_l)``; with ``like`` (per point, a tensor or its ``(shape, strides)``) each
        takes that point's shape *and memory layout*: for a channels-last map the columns of
        ``B_l`` are reordered (a ``C x d_l`` copy) so that the ``N x d_l`` result needs none.
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

            if self.storage is Storage.DENSE:
                matrix = self._cached(("order", tuple(orders), *self._key(error.dtype)), reordered)
            else:
                matrix = reordered()
        signals = list((error @ matrix).split(self.sizes, 1))
        if layouts is None:
            return signals
        out = []
        for signal, order, (shape, _) in zip(signals, orders, layouts):
            if order is None:
                out.append(signal.view(shape))
            else:  # view in memory order, then permute back to the logical order
                stored = signal.view(shape[0], *(shape[d] for d in order))
                out.append(stored.permute(0, *(1 + order.index(d) for d in range(1, len(shape)))))
        return out

    # -- bookkeeping ---------------------------------------------------------------------------

    def storage_bytes(self) -> dict[str, int]:
        """Bytes held: ``{"pattern": ..., "scales": ...}`` (``seeded`` holds no pattern)."""
        if self.storage is Storage.DENSE:
            pattern = self.pattern.numel() * self.pattern.element_size()
        elif self.storage is Storage.PACKED:
            pattern = self.bits.numel()
        else:
            pattern = 0
        return {"pattern": pattern, "scales": self.scales.numel() * self.scales.element_size()}

    def layout(self) -> dict[str, Any]:
        """What defines this matrix besides its buffers (saved as extra state)."""
        return {
            "num_classes": self.num_classes,
            "sizes": list(self.sizes),
            "binary": list(self.binary),
            "init": self.init.value,
            "storage": self.storage.value,
            "seed": self.seed,
            "normalize": self.normalize,
            "names": list(self.names),
        }

    def get_extra_state(self) -> dict[str, Any]:
        return self.layout()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.layout()
        # Names are labels; everything else decides the matrix and must agree.
        state = {"normalize": True, **state}  # saved before the option existed
        diff = {k: (state.get(k), v) for k, v in mine.items() if k != "names" and state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {s!r}, here {h!r}" for k, (s, h) in diff.items())
            raise ValueError(f"feedback state does not match this feedback layout ({detail})")

    def extra_repr(self) -> str:
        kinds = "".join("b" if b else "f" for b in self.binary)
        return (
            f"C={self.num_classes}, sizes={self.sizes}, kinds={kinds}, init={self.init.value}, "
            f"storage={self.storage.value}, seed={self.seed}"
        )
