"""Training with the activations kept for the backward pass stored at 8 or 4 bits.

After Chakrabarti & Moseley, "Backprop with Approximate Activations for Memory-efficient Network
Training" (NeurIPS 2019, BLPA): the forward pass stays exact; only the copies of the activations
that autograd *saves for the backward pass* are quantised, through
:func:`torch.autograd.graph.saved_tensors_hooks`. Back-propagation and DFA both need them (DFA's
weight gradients are ``delta_l h_{l-1}^T``), so the saving applies to every rule::

    with dfatorch.compressed_activations(bits=4) as stats:
        loss = criterion(model(x), y)
        loss.backward()
    stats.ratio   # float bytes / stored bytes of the tensors that were quantised

or from the trainer: ``TrainConfig(activation_bits=8)``, ``--activation-bits 8`` (the
:class:`ActivationCompression` callback).

**What is quantised.** Every floating-point saved tensor of at least ``min_numel`` elements that is
not a parameter (nor a view of one: ``Linear`` saves ``weight.t()``). Integer tensors of that size
(max-pool indices where the pool is not fused: see below) are stored exactly in the narrowest
integer type that holds their values (int16 for indices into a 32x32 map; one min/max, so one
synchronisation on an accelerator), unless ``narrow_integers=False``. Left as they are, by
reference: parameters, bool tensors, tensors below ``min_numel`` and non-dense (overlapping,
expanded) tensors. The input batch is an activation like any other and is quantised too. Batch norm
(in training mode, affine) is a fused op (below): it stores the normalised ``x_hat``, not its input.
Measured (``benchmarks/activation_gradients.py``, one CIFAR-10 batch of 128 at initialisation, bp):
at 8 bits every layer's weight gradient has cosine >= 0.9997 with the exact one, with or without
batch norm; at 4 bits >= 0.98 for the conv and linear weights; the batch-norm scale (gamma)
gradients, which sum ``dy * x_hat`` and so feel the code's noise most, at least 0.970 (``vgg_cnn``)
and 0.983 (``small_cnn --batch-norm``) at 4 bits, where storing batch norm's input through the hooks
gave 0.915 and 0.947.

**The code.** Per channel (dim 1) the range
``[lo, hi]`` is the channel's min and max widened to contain 0, cut into ``L = 2**bits`` bins of
width ``s = (hi - lo) / (L - 1)`` placed so that **0 is a bin edge**: code ``k`` stands for the bin
``((k - z) s, (k - z + 1) s]`` with ``z = floor(-lo / s) + 1`` and decodes to the bin's midpoint
(clamped to ``[lo, hi]``). A tensor whose channels are small (a fully connected layer's
``(N, features)`` at ``N < 512``) or that has fewer than two dims gets one range for the whole
tensor instead: per-feature ranges would cost 8 bytes a feature, as much as the codes of 16
examples at 4 bits. Every value comes back within half a bin, and

* the sign is exact without an extra bit: a value ``> 0`` gets a code ``>= z`` and decodes to at
  least ``s / 2 > 0``; a value ``<= 0`` gets a code ``< z`` and decodes to at most 0. ReLU's
  mask (``result > 0``), the sign of a pre-activation and of tanh's output survive exactly. This
  is BLPA's per-channel shift ("bin index >= shift" is "value > 0"), applied to any saved tensor;
  we chose it over a separate 1-bit mask because the mask would cost a ninth (8 bits) or a fifth
  (4 bits) more memory;
* a channel without negative values (a ReLU output) decodes its zeros to exactly 0 (the clamp at
  ``lo = 0``), so the many exact zeros of a ReLU layer carry no bias into the next layer's weight
  gradient;
* the price of keeping 0 in the range: a channel far from 0 (all values in ``[5, 6]``) is coded
  over ``[0, 6]``.

Codes are ``uint8``; at 4 bits two codes share a byte (low nibble first). Each channel adds its
``lo`` and ``hi`` (two floats of the tensor's computing dtype: float32, or float64 for float64
tensors) to the stored bytes. A channel holding inf or NaN decodes to non-finite values (the
forward pass, and so the loss, is exact: the divergence guard still sees it).

**Fused ops** (``fused=True``, the default): inside the context a
:class:`~torch.overrides.TorchFunctionMode` runs three ops on tensors that need a gradient (and
have at least ``min_numel`` elements, C-contiguous) as autograd Functions of their own, with the
same forward and, batch norm aside, the same gradients bit for bit:

* **2-d max-pooling** stores, of each maximum, only its position inside its window
  (``dh * kw + dw``: 2 bits for a 2x2 window, 4 for 3x3, packed four or two a byte) instead of
  int64 indices into the plane (32x smaller for 2x2, 16x for 3x3), and not its input (its
  backward needs only the shape). The backward rebuilds the int64 indices a chunk of rows at a
  time and runs the op's own backward on each chunk (``max_pool2d_with_indices_backward``).
* **tanh and ReLU** store their output through the hooks (quantised, shared with other saves of
  it), and their backward decodes it a chunk of rows at a time (``tanh_backward``,
  ``threshold_backward`` per chunk): the decoded copy of a large feature map never exists whole
  next to its gradients, which is what kept the peak of a step up. Where the output's codes are
  already decoded whole for another save (a linear layer after the activation) that copy is used.

* **batch norm** in training mode (affine) stores ``x_hat = (x - mean) / std`` quantised
  instead of its input (as BLPA does) and computes its backward from it with the exact weight and
  ``1 / std``; at 4 bits the stored copy is clipped to +-3 (BLPA's range). Its gradients are the
  exact formula on the decoded ``x_hat``: equal to the native op's where ``x_hat`` is stored
  without loss, and closer to exact than the hooks' code of the input (see above).

They cost time: a 4-bit step at batch 128 took 1.09x (``small_cnn``) and 1.16x (``vgg_cnn``, batch
norm's extra pass included) the hooks-only step's (``fused=False``), measured interleaved in one
process on a loaded 2-core machine.

A fused op frees what it stored at its backward: backward through it a second time
(``retain_graph=True``) is an error, as is an in-place change of a stored output before its
backward. In-place activations, max-pooling that returns its indices and other ops run as they
are (through the hooks).

**A tensor saved by two ops is stored once** (tanh saves its output, the linear layer after it saves
the same tensor as its input): within one context, a save whose tensor has the same data pointer,
dtype, device, shape, strides and version as an earlier one whose tensor is still alive reuses the
packed copy. (Alive: a dead tensor's memory can be reused by a new one with the same address.) A
view with another shape (``Flatten``) is a different key and is stored again. In the backward pass
such a tensor is decoded once, at its first unpacking, and that copy is kept until its last.

Everything is deterministic (no random rounding), on whatever device the tensor lives: a resumed
run equals an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from .callbacks import Callback, TrainState

__all__ = [
    "BITS",
    "ActivationCompression",
    "CompressionStats",
    "compressed_activations",
    "dequantize",
    "pack_nibbles",
    "per_channel",
    "quantize",
    "unpack_nibbles",
]

#: The supported code widths.
BITS = (8, 4)
#: Saved tensors with fewer elements are kept exact (their scales would cost more than they save).
MIN_NUMEL = 1024
#: A tensor gets one range per channel when its channels have at least this many elements, else
#: one range in all (a channel's range costs 8 bytes: 3% of its codes at 4 bits from here on).
CHANNEL_NUMEL = 512
#: Batch norm's stored ``x_hat`` is clipped to +-this at 4 bits (BLPA's fixed range of 6 standard
#: deviations); at 8 bits the bins are fine enough that clipping would cost more than it gains.
BN_RANGE = 3.0
#: The code is computed in chunks of about this many elements (bounded float temporaries).
CHUNK_NUMEL = 1 << 18


def _check_bits(bits: Any) -> int:
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"bits must be 8 or 4, got {bits!r}")
    return int(bits)


@dataclass
class CompressionStats:
    """Bytes of the saved tensors of one ``compressed_activations`` context, counted in the pack
    hook (exact and device-independent). Each tensor counts once, however many ops save it."""

    bits: int
    #: quantised tensors, their bytes as they were, and their bytes as stored (codes + lo/hi)
    compressed_tensors: int = 0
    float_bytes: int = 0
    stored_bytes: int = 0
    #: integer tensors (max-pool indices) stored exactly in the narrowest integer type that
    #: holds their values: their bytes as they were and as stored
    integer_tensors: int = 0
    integer_bytes: int = 0
    integer_stored_bytes: int = 0
    #: non-parameter tensors stored as they are (bool, small, non-dense) and their bytes
    kept_tensors: int = 0
    kept_bytes: int = 0
    #: saves of parameters (held by reference: no copy, no bytes)
    parameters: int = 0
    #: saves that reused the packed copy of a tensor already saved by another op
    shared: int = 0
    #: bytes autograd would have saved that are not stored at all: a fused max-pool's input (its
    #: backward needs only the shape) where no earlier op saved the same tensor
    skipped_bytes: int = 0

    @property
    def ratio(self) -> float:
        """Float bytes over stored bytes of the quantised tensors (``nan`` if there were none)."""
        return self.float_bytes / self.stored_bytes if self.stored_bytes else float("nan")

    @property
    def saved_bytes(self) -> int:
        """Bytes of every non-parameter saved tensor as stored."""
        return self.stored_bytes + self.integer_stored_bytes + self.kept_bytes

    @property
    def exact_bytes(self) -> int:
        """The same tensors' bytes without the hooks (as autograd would keep them)."""
        return self.float_bytes + self.integer_bytes + self.kept_bytes + self.skipped_bytes

    @property
    def total_ratio(self) -> float:
        """``exact_bytes / saved_bytes``: over every non-parameter saved tensor."""
        return self.exact_bytes / self.saved_bytes if self.saved_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "saved_bytes": self.saved_bytes, "exact_bytes": self.exact_bytes,
                "ratio": self.ratio, "total_ratio": self.total_ratio}  # fmt: skip


# -- the code --------------------------------------------------------------------------------


class _Packed:
    """A quantised saved tensor (what the pack hook returns and the graph holds)."""

    __slots__ = ("__weakref__", "bits", "cache", "codes", "dtype", "hi", "lo", "perm", "shape",
                 "source", "uses")  # fmt: skip

    def __init__(self, codes: Tensor, lo: Tensor, hi: Tensor, bits: int, shape: torch.Size,
                 perm: list[int], dtype: torch.dtype) -> None:  # fmt: skip
        self.codes, self.lo, self.hi, self.bits = codes, lo, hi, bits
        self.shape, self.perm, self.dtype = shape, perm, dtype
        self.source: weakref.ref[Tensor] | None = None
        #: saves not yet unpacked, and the decoded tensor kept for them meanwhile
        self.uses, self.cache = 1, None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.lo, self.hi))


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Flat ``uint8`` codes in ``[0, 2**bits)`` (``bits`` in 1, 2, 4, 8) -> ``8 // bits`` codes a
    byte, the first in the lowest bits (a count that does not fill the last byte is padded with
    zeros)."""
    flat = codes.reshape(-1)
    per = 8 // bits
    if per == 1:
        return flat
    if flat.numel() % per:
        flat = torch.cat([flat, flat.new_zeros(per - flat.numel() % per)])
    groups = flat.view(-1, per)
    out = groups[:, 0].clone()
    for j in range(1, per):
        out |= groups[:, j] << (j * bits)
    return out


def unpack_bits(packed: Tensor, numel: int, bits: int) -> Tensor:
    """The inverse of :func:`pack_bits`: the first ``numel`` codes."""
    per = 8 // bits
    if per == 1:
        return packed[:numel]
    out = packed.new_empty(packed.numel(), per)
    for j in range(per):
        torch.bitwise_right_shift(packed, j * bits, out=out[:, j])
    return out.view(-1)[:numel].bitwise_and_(2**bits - 1)


def pack_nibbles(codes: Tensor) -> Tensor:
    """Flat ``uint8`` codes in ``[0, 16)`` -> half as many bytes (element ``2i`` in the low nibble
    of byte ``i``, ``2i + 1`` in the high one; an odd count is padded with a zero)."""
    return pack_bits(codes, 4)


def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    """The inverse of :func:`pack_nibbles`: the first ``numel`` codes."""
    return unpack_bits(packed, numel, 4)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_channel(x: Tensor) -> bool:
    """Whether ``x`` gets one range per channel (dim 1) rather than one for the whole tensor: when
    it has two dims or more and each channel at least :data:`CHANNEL_NUMEL` elements."""
    return x.ndim >= 2 and x.numel() >= CHANNEL_NUMEL * x.shape[1]


def _channel_range(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dim 1) min and max, widened to contain 0, shaped to broadcast against ``x``."""
    if not per_channel(x):
        shape = [1] * x.ndim
        return x.min().clamp(max=0).reshape(shape), x.max().clamp(min=0).reshape(shape)
    dims = [d for d in range(x.ndim) if d != 1]
    return x.amin(dim=dims, keepdim=True).clamp(max=0), x.amax(dim=dims, keepdim=True).clamp(min=0)


def _grid(lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Bin width ``s`` and ``z``, the number of codes for values ``<= 0`` (0 is a bin edge)."""
    s = (hi - lo) / (2**bits - 1)
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero channel: any width decodes to 0
    return s, torch.floor(-lo / s) + 1


def _rows(x: Tensor) -> int:
    """Rows (along dim 0) per chunk: the code is computed chunk by chunk so that its float
    temporaries stay small (a few MiB) next to the tensor."""
    if x.ndim == 0:
        return 1
    per_row = max(x.numel() // max(x.shape[0], 1), 1)
    return max(CHUNK_NUMEL // per_row, 1)


def _encode(x: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    d = torch.div(x, s).ceil_().sub_(1)  # code - z: the bin ((code - z) s, (code - z + 1) s]
    # the sign decides the side of 0 even where rounding of x / s would not (underflow)
    d = torch.where(x > 0, d.clamp(min=0), d.clamp(max=-1))
    return d.add_(z).clamp_(0, 2**bits - 1).to(torch.uint8)


def _decode(k: Tensor, p: _Packed, s: Tensor, z: Tensor) -> Tensor:
    value = k.to(s.dtype).sub_(z).add_(0.5).mul_(s)
    return torch.clamp(value, min=p.lo, max=p.hi)


def quantize(x: Tensor, bits: int) -> _Packed:
    """``x`` (floating point, dense) as ``bits``-bit codes with per-channel ``lo``/``hi``."""
    bits = _check_bits(bits)
    work = x.to(_work_dtype(x.dtype))
    lo, hi = _channel_range(work)
    s, z = _grid(lo, hi, bits)
    codes = torch.empty_like(x, dtype=torch.uint8)  # the same strides (channels-last stays)
    if x.ndim == 0:
        codes.copy_(_encode(work, s, z, bits))
    rows = _rows(x)
    for i in range(0, x.shape[0] if x.ndim else 0, rows):
        codes[i : i + rows] = _encode(work[i : i + rows], s, z, bits)
    # stored in the tensor's own memory order
    perm = sorted(range(x.ndim), key=lambda d: (-x.stride(d), d))
    flat = codes.permute(perm).reshape(-1)
    if bits == 4:
        flat = pack_nibbles(flat)
    return _Packed(flat, lo, hi, bits, x.shape, perm, x.dtype)


def dequantize(p: _Packed) -> Tensor:
    """The tensor back: every value within half a bin of the original, with its exact sign."""
    numel = p.shape.numel()
    codes = unpack_nibbles(p.codes, numel) if p.bits == 4 else p.codes
    permuted = [p.shape[d] for d in p.perm]
    inverse = sorted(range(len(p.perm)), key=lambda i: p.perm[i])
    k = codes.reshape(permuted).permute(inverse)
    out = torch.empty(permuted, dtype=p.dtype, device=codes.device).permute(inverse)
    s, z = _grid(p.lo, p.hi, p.bits)
    if out.ndim == 0:
        out.copy_(_decode(k, p, s, z))
    rows = _rows(out)
    for i in range(0, out.shape[0] if out.ndim else 0, rows):
        out[i : i + rows] = _decode(k[i : i + rows], p, s, z)
    return out


def code_range(codes: Tensor, bits: int, start: int, stop: int) -> Tensor:
    """Codes ``start:stop`` of the flat ``bits``-bit codes packed by :func:`pack_bits` (only the
    bytes that hold them are unpacked)."""
    per = 8 // bits
    first, last = start // per, -(-stop // per)
    k = unpack_bits(codes[first:last], (last - first) * per, bits)
    return k[start - first * per : stop - first * per]


def _decoded_rows(p: _Packed, rows: int) -> Iterator[tuple[slice, Tensor]]:
    """A C-contiguous quantised tensor decoded ``rows`` rows (dim 0) at a time: each chunk equals
    the same rows of :func:`dequantize`'s result."""
    per_row = p.shape[1:].numel()
    s, z = _grid(p.lo, p.hi, p.bits)
    for i in range(0, p.shape[0], rows):
        j = min(i + rows, p.shape[0])
        k = code_range(p.codes, p.bits, i * per_row, j * per_row).reshape(j - i, *p.shape[1:])
        yield slice(i, j), _decode(k, p, s, z).to(p.dtype)


# -- the hooks -------------------------------------------------------------------------------


def _is_parameter(t: Tensor) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter) or (base.is_leaf and base.requires_grad)


def _is_dense(t: Tensor) -> bool:
    perm = sorted(range(t.ndim), key=lambda d: (-t.stride(d), d))
    return t.permute(perm).is_contiguous()


_NARROWABLE = (torch.int64, torch.int32, torch.int16)


def _narrowest(t: Tensor) -> torch.dtype | None:
    """The smallest integer dtype that holds every value of ``t`` (None: none is smaller)."""
    lo, hi = torch.stack(torch.aminmax(t)).tolist()  # one synchronisation on an accelerator
    for dtype in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dtype)
        if info.min <= lo and hi <= info.max:
            return dtype if info.bits < torch.iinfo(t.dtype).bits else None
    return None


class _Narrowed:
    """An integer saved tensor in a narrower integer type (exact)."""

    __slots__ = ("__weakref__", "dtype", "source", "uses", "values")

    def __init__(self, values: Tensor, dtype: torch.dtype) -> None:
        self.values, self.dtype = values, dtype
        self.source: weakref.ref[Tensor] | None = None
        self.uses = 1

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size()


class _Hooks:
    def __init__(self, bits: int, min_numel: int, narrow_integers: bool = True) -> None:
        self.bits, self.min_numel, self.narrow_integers = bits, min_numel, narrow_integers
        self.stats = CompressionStats(bits=bits)
        # key -> packed copy; an entry lives as long as the graph holds the copy
        self.packed: weakref.WeakValueDictionary[tuple[Any, ...], Any] = (
            weakref.WeakValueDictionary()
        )
        self.kept: dict[tuple[Any, ...], weakref.ref[Tensor]] = {}

    @staticmethod
    def _key(t: Tensor) -> tuple[Any, ...]:
        return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride(), t._version)

    def saved(self, t: Tensor) -> bool:
        """Whether ``t`` (this very tensor, unchanged) is already stored by an earlier save."""
        key = self._key(t)
        seen = self.kept.get(key)
        return (seen is not None and seen() is not None) or self._reuse(key) is not None

    def _reuse(self, key: tuple[Any, ...]) -> Any:
        """The packed copy of an earlier save of the same, still living tensor, or None."""
        packed = self.packed.get(key)
        if packed is not None and packed.source is not None and packed.source() is not None:
            return packed
        return None

    def pack(self, t: Tensor) -> Any:
        stats = self.stats
        if t.is_floating_point() and _is_parameter(t):
            stats.parameters += 1
            return t
        key = self._key(t)
        large = t.numel() >= self.min_numel and _is_dense(t)
        narrow = self.narrow_integers and large and t.dtype in _NARROWABLE
        if not narrow and (not t.is_floating_point() or not large):
            seen = self.kept.get(key)
            if seen is None or seen() is None:
                self.kept[key] = weakref.ref(t)
                stats.kept_tensors += 1
                stats.kept_bytes += t.numel() * t.element_size()
            else:
                stats.shared += 1
            return t
        packed = self._reuse(key)
        if packed is not None:
            stats.shared += 1
            packed.uses += 1
            return packed
        with torch.no_grad():
            if narrow:
                dtype = _narrowest(t)
                packed = _Narrowed(t.detach() if dtype is None else t.detach().to(dtype), t.dtype)
                stats.integer_tensors += 1
                stats.integer_bytes += t.numel() * t.element_size()
                stats.integer_stored_bytes += packed.nbytes
            else:
                packed = quantize(t.detach(), self.bits)
                stats.compressed_tensors += 1
                stats.float_bytes += t.numel() * t.element_size()
                stats.stored_bytes += packed.nbytes
        packed.source = weakref.ref(t)
        self.packed[key] = packed
        return packed

    @staticmethod
    def unpack(p: Any) -> Tensor:
        if isinstance(p, _Packed):
            # a tensor saved by two ops (tanh and the linear layer after it) is decoded once:
            # the copy is kept until its last save is unpacked, as autograd keeps the original
            out = p.cache
            if out is None:
                with torch.no_grad():
                    out = dequantize(p)
            p.uses -= 1
            p.cache = out if p.uses > 0 else None
            return out
        if isinstance(p, _Narrowed):
            return p.values.to(p.dtype)
        return p


# -- fused ops: max-pooling, tanh and ReLU ---------------------------------------------------


def _saved_rows(p: Any) -> Iterator[tuple[slice, Tensor]]:
    """A saved tensor (as :meth:`_Hooks.pack` returned it) row chunk by row chunk, for a backward
    that uses it elementwise: decoded chunk by chunk when this is its last use and it is
    C-contiguous, else decoded whole (and kept for its other uses) and cut into chunks."""
    if isinstance(p, _Packed) and p.cache is None and p.uses == 1 and p.perm == sorted(p.perm):
        p.uses = 0
        yield from _decoded_rows(p, _rows(torch.empty(p.shape, device="meta")))
        return
    whole = _Hooks.unpack(p)
    rows = _rows(whole)
    for i in range(0, whole.shape[0], rows):
        yield slice(i, i + rows), whole[i : i + rows]


def _take(ctx: Any, name: str) -> Any:
    """``ctx.<name>``, let go of (the graph would keep it until it is itself freed)."""
    value = getattr(ctx, name)
    if value is None:
        raise RuntimeError(
            "Trying to backward through the graph a second time: compressed_activations frees "
            "what a fused op stored after its backward (retain_graph=True is not supported)"
        )
    setattr(ctx, name, None)
    return value


def _check_version(p: Any, version: int) -> None:
    source = p.source() if p.source is not None else None
    if source is not None and source._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an "
            f"inplace operation: its version is {source._version}; expected version {version}"
        )


_ELEMENTWISE_BACKWARD = {
    "tanh": lambda grad, y, out: torch.ops.aten.tanh_backward.grad_input(grad, y, grad_input=out),
    "relu": lambda grad, y, out: torch.ops.aten.threshold_backward.grad_input(
        grad, y, 0, grad_input=out
    ),
}
_ELEMENTWISE_FORWARD = {"tanh": torch.tanh, "relu": torch.relu}


class _SavedOutputActivation(torch.autograd.Function):
    """tanh or ReLU whose output is stored through the hooks (quantised, shared with other saves
    of it) and whose backward decodes it a chunk of rows at a time, so that the decoded copy of a
    large feature map never exists whole. Same gradients, bit for bit, as the op's own backward
    on the decoded output."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kind: str, hooks: _Hooks) -> Tensor:  # type: ignore[override]
        y = _ELEMENTWISE_FORWARD[kind](x)
        ctx.kind, ctx.saved, ctx.version = kind, hooks.pack(y), y._version
        return y

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        saved = _take(ctx, "saved")
        _check_version(saved, ctx.version)
        out = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        for rows, y in _saved_rows(saved):
            _ELEMENTWISE_BACKWARD[ctx.kind](grad[rows], y, out[rows])
        return out, None, None


def _index_bits(window: int) -> int:
    """The narrowest of 1, 2, 4 and 8 bits that holds ``window`` positions."""
    return next(b for b in (1, 2, 4, 8) if window <= 2**b)


class _PoolGeometry:
    """A 2-d max-pool's windows: maps an index into the input plane to the position inside its
    output cell's window (``dh * kw + dw``) and back."""

    def __init__(
        self,
        shape: torch.Size,
        kernel: tuple[int, int],
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        ceil_mode: bool,
    ) -> None:
        self.shape, self.kernel, self.stride = shape, kernel, stride
        self.padding, self.dilation, self.ceil_mode = padding, dilation, ceil_mode
        self.bits = _index_bits(kernel[0] * kernel[1])

    def _origins(self, out_hw: tuple[int, int], device: torch.device) -> tuple[Tensor, Tensor]:
        h0 = torch.arange(out_hw[0], device=device) * self.stride[0] - self.padding[0]
        w0 = torch.arange(out_hw[1], device=device) * self.stride[1] - self.padding[1]
        return h0.view(-1, 1), w0.view(1, -1)

    def encode(self, index: Tensor) -> Tensor:
        """Flat window positions (``uint8``) of ``index`` (int64, ``(N, C, Ho, Wo)``)."""
        width = self.shape[-1]
        h0, w0 = self._origins(index.shape[-2:], index.device)
        codes = torch.empty(index.shape, dtype=torch.uint8, device=index.device)
        rows = _rows(index)
        for i in range(0, index.shape[0], rows):
            chunk = index[i : i + rows]
            dh = (
                torch.div(chunk, width, rounding_mode="floor")
                .sub_(h0)
                .div_(self.dilation[0], rounding_mode="floor")
            )
            dw = (
                torch.remainder(chunk, width).sub_(w0).div_(self.dilation[1], rounding_mode="floor")
            )
            codes[i : i + rows] = dh.mul_(self.kernel[1]).add_(dw)
        return pack_bits(codes, self.bits)

    def decode(self, codes: Tensor, out_shape: torch.Size, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of the int64 input-plane indices."""
        per_row = out_shape[1:].numel()
        rel = code_range(codes, self.bits, start * per_row, stop * per_row).to(torch.int64)
        rel = rel.view(stop - start, *out_shape[1:])
        h0, w0 = self._origins(out_shape[-2:], codes.device)
        dh = torch.div(rel, self.kernel[1], rounding_mode="floor")
        h = dh.mul(self.dilation[0]).add_(h0)
        w = rel.sub_(dh.mul_(self.kernel[1])).mul_(self.dilation[1]).add_(w0)
        return h.mul_(self.shape[-1]).add_(w)


class _MaxPool2d(torch.autograd.Function):
    """2-d max-pooling that stores, of each maximum, only its position inside its window (2 bits
    for a 2x2 window, 4 for 3x3; exact) and not the input (its backward needs only the shape);
    the backward rebuilds the int64 indices a chunk of rows at a time and runs the op's own
    backward on each chunk: the same gradient, bit for bit."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, geometry: _PoolGeometry, hooks: _Hooks) -> Tensor:  # type: ignore[override]
        k, s = list(geometry.kernel), list(geometry.stride)
        p, d = list(geometry.padding), list(geometry.dilation)
        out, index = torch.ops.aten.max_pool2d_with_indices(x, k, s, p, d, geometry.ceil_mode)
        ctx.geometry, ctx.out_shape = geometry, out.shape
        ctx.codes = geometry.encode(index)
        stats = hooks.stats
        stats.integer_tensors += 1
        stats.integer_bytes += index.numel() * index.element_size()
        stats.integer_stored_bytes += ctx.codes.numel()
        if not hooks.saved(x):  # autograd would have kept the input for the shape
            stats.skipped_bytes += x.numel() * x.element_size()
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        codes, g = _take(ctx, "codes"), ctx.geometry
        out = torch.empty(g.shape, dtype=grad.dtype, device=grad.device)
        like = grad.new_empty(()).expand(g.shape)  # the op's backward reads only the shape
        k, s, p, d = list(g.kernel), list(g.stride), list(g.padding), list(g.dilation)
        rows = _rows(grad)
        for i in range(0, g.shape[0], rows):
            j = min(i + rows, g.shape[0])
            index = g.decode(codes, ctx.out_shape, i, j)
            torch.ops.aten.max_pool2d_with_indices_backward.grad_input(
                grad[i:j], like[i:j], k, s, p, d, g.ceil_mode, index, grad_input=out[i:j]
            )
        return out, None, None


class _BatchNorm(torch.autograd.Function):
    """Batch norm in training mode (affine) that stores the normalised ``x_hat = (x - mean) /
    std`` (quantised per channel) instead of its input, as BLPA does, and computes its backward
    from ``x_hat`` with the exact weight and ``1 / std``:

    ``d_beta = sum dy``, ``d_gamma = sum dy x_hat``,
    ``dx = gamma / std (dy - d_beta / M - x_hat d_gamma / M)`` (sums over the ``M`` positions of a
    channel). ``x_hat`` is centred and scaled per channel, so its code is as fine as the channel's
    spread allows, where the code of ``x`` itself widens its range to reach 0 (a channel with a
    large mean gets coarse bins); and at 4 bits, as in BLPA, the stored copy is clipped to
    ``[-BN_RANGE, BN_RANGE]`` (+-3: 0.3% of a normal channel's values lie beyond), which makes the
    bins ``6 / 15`` wide instead of the extremes' ``(max - min) / 15`` (at 8 bits clipping cost
    more than it gained: cosine of gamma's gradient 0.98 clipped, 0.9999 not). The forward is
    the native op (running statistics included); only the stored copy is clipped and quantised."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, args: tuple[Any, ...], hooks: _Hooks
    ) -> Tensor:
        running_mean, running_var, momentum, eps = args
        y = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        dims = [d for d in range(x.ndim) if d != 1]
        var, mean = torch.var_mean(x, dims, correction=0)
        invstd = torch.rsqrt(var + eps)
        shape = [1, -1] + [1] * (x.ndim - 2)
        x_hat = torch.empty_like(x)
        rows = _rows(x)
        for i in range(0, x.shape[0], rows):
            chunk = x_hat[i : i + rows]
            torch.mul(x[i : i + rows] - mean.view(shape), invstd.view(shape), out=chunk)
            if hooks.bits == 4:
                chunk.clamp_(-BN_RANGE, BN_RANGE)
        # the per-channel 1/std stays exact (not through the hooks, whatever min_numel says)
        ctx.saved, ctx.invstd = hooks.pack(x_hat), invstd
        ctx.save_for_backward(weight)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = _take(ctx, "saved")
        (weight,), invstd = ctx.saved_tensors, ctx.invstd
        dims = [d for d in range(dy.ndim) if d != 1]
        shape = [1, -1] + [1] * (dy.ndim - 2)
        rows = _rows(dy)
        d_beta = dy.sum(dims)
        d_gamma = torch.zeros_like(d_beta)
        for r, x_hat in _decoded_rows(saved, rows):
            d_gamma += (dy[r] * x_hat).sum(dims)
        dx = None
        if ctx.needs_input_grad[0]:
            m = dy.numel() // dy.shape[1]
            mean_dy, mean_dy_xhat = (d_beta / m).view(shape), (d_gamma / m).view(shape)
            scale = (weight * invstd).view(shape)
            dx = torch.empty(dy.shape, dtype=dy.dtype, device=dy.device)
            for r, x_hat in _decoded_rows(saved, rows):
                torch.mul(dy[r] - mean_dy - x_hat * mean_dy_xhat, scale, out=dx[r])
        return dx, d_gamma, d_beta, None, None


_BATCH_NORM_SIGNATURE = inspect.signature(F.batch_norm)
_MAX_POOL_SIGNATURE = inspect.signature(F._max_pool2d)
_TANH = (torch.tanh, Tensor.tanh)
_RELU = (torch.relu, Tensor.relu, F.relu)


class _FusedOps(TorchFunctionMode):
    """Routes 2-d max-pooling, tanh, ReLU and training-mode batch norm on tensors that need a
    gradient to the fused ops above (when their saved tensors would be stored compactly);
    everything else runs as it is."""

    def __init__(self, hooks: _Hooks) -> None:
        super().__init__()
        self.hooks = hooks

    def _wanted(self, x: Any, *params: Any) -> bool:
        """Whether an op on ``x`` (with ``params``) builds a graph and ``x`` is one to fuse for."""
        grad = any(isinstance(t, Tensor) and t.requires_grad for t in (x, *params))
        return (
            torch.is_grad_enabled() and grad and isinstance(x, Tensor)
            and x.is_floating_point() and x.is_contiguous() and x.numel() >= self.hooks.min_numel
        )  # fmt: skip

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.max_pool2d and args and self._wanted(args[0]):
            bound = _MAX_POOL_SIGNATURE.bind(*args, **kwargs)
            bound.apply_defaults()
            a = bound.arguments
            kernel = _pair(a["kernel_size"])
            stride = _pair(a["stride"] if a["stride"] not in (None, []) else kernel)
            geometry = _PoolGeometry(a["input"].shape, kernel, stride, _pair(a["padding"]),
                                     _pair(a["dilation"]), bool(a["ceil_mode"]))  # fmt: skip
            if (not a["return_indices"] and a["input"].ndim == 4
                    and kernel[0] * kernel[1] <= 256):  # fmt: skip
                return _MaxPool2d.apply(a["input"], geometry, self.hooks)
        if func is F.batch_norm and args:
            a = _BATCH_NORM_SIGNATURE.bind(*args, **kwargs)
            a.apply_defaults()
            b = a.arguments
            affine = b["weight"] is not None and b["bias"] is not None
            if b["training"] and affine and self._wanted(b["input"], b["weight"], b["bias"]):
                F._verify_batch_size(b["input"].size())
                rest = (b["running_mean"], b["running_var"], b["momentum"], b["eps"])
                return _BatchNorm.apply(b["input"], b["weight"], b["bias"], rest, self.hooks)
        plain = len(args) == 1 and not kwargs.get("inplace", False)  # in-place: as it is
        if (func in _TANH or func in _RELU) and plain and self._wanted(args[0]):
            kind = "tanh" if func in _TANH else "relu"
            return _SavedOutputActivation.apply(args[0], kind, self.hooks)
        return func(*args, **kwargs)


@contextlib.contextmanager
def compressed_activations(
    bits: int, *, min_numel: int = MIN_NUMEL, narrow_integers: bool = True, fused: bool = True
) -> Iterator[CompressionStats]:
    """Store the tensors autograd saves for the backward pass at ``bits`` (8 or 4) bits while the
    context is open (see the module docstring); yields the byte counts, filled as ops save.
    ``narrow_integers``: integer tensors (max-pool indices) of at least ``min_numel`` elements in
    the narrowest integer type that holds them (exact; ``False``: as they are). ``fused``: 2-d
    max-pooling, tanh, ReLU and batch norm run as fused ops (pool indices as window positions,
    outputs decoded chunk by chunk in the backward, the same gradients bit for bit; batch norm
    stores ``x_hat``); ``False``: only the hooks.

    The backward pass may run after the context closes (the graph holds the packed copies)."""
    bits = _check_bits(bits)
    if min_numel < 0:
        raise ValueError(f"min_numel must be >= 0, got {min_numel}")
    hooks = _Hooks(bits, min_numel, narrow_integers)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack))
        if fused:
            stack.enter_context(_FusedOps(hooks))
        yield hooks.stats


class ActivationCompression(Callback):
    """Trainer callback: every step's forward and backward under :func:`compressed_activations`.
    Adds the last step's byte counts to each epoch's record under ``saved_activations``."""

    def __init__(self, bits: int, *, min_numel: int = MIN_NUMEL) -> None:
        self.bits, self.min_numel = _check_bits(bits), min_numel
        self.last: CompressionStats | None = None

    @contextlib.contextmanager
    def step_context(self, state: TrainState) -> Iterator[CompressionStats]:
        with compressed_activations(self.bits, min_numel=self.min_numel) as stats:
            yield stats
        self.last = stats

    def on_epoch_end(self, state: TrainState, record: dict[str, Any]) -> None:
        if self.last is not None:
            keys = ("bits", "float_bytes", "stored_bytes", "exact_bytes", "saved_bytes")
            record["saved_activations"] = {k: self.last.to_dict()[k] for k in keys}
