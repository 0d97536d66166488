"""Layer-wise feedback: the error goes back through the layer above, with ``B`` in place of ``W``.

A hidden layer ``l`` under a *layer-wise* rule receives at its output the error of the next layer
``l+1`` sent back through a matrix ``B_{l+1}`` of ``W_{l+1}``'s shape instead of ``W_{l+1}``::

    Linear:  dL/dh_l := delta_{l+1} @ B_{l+1}            (BP: delta_{l+1} @ W_{l+1})
    Conv:    dL/dh_l := conv_transpose(delta_{l+1}, B_{l+1})  (same stride, padding, groups)

where ``delta_{l+1} = dL/da_{l+1}`` is the gradient at the next layer's output. Everything between
``a_l`` and ``h_l`` (``f'``, pooling, normalisation) and every weight gradient
``dW_{l+1} = delta_{l+1}^T h_l`` stay exact autograd. The rules differ only in ``B`` (one
:class:`LayerFeedback` subclass per mechanism, with a parameter; :data:`LAYER_FEEDBACK` maps the
rule names to them):

- ``fa`` (Lillicrap et al. 2016, feedback alignment): ``B = s * P``, ``P`` a fixed pattern drawn
  once by the feedback structure (``init``; the default ``uniform`` draws
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, PyTorch's default initialisation of ``W``), ``s = gain``.
  It is a :class:`~dfatorch.feedback.PatternStorage` client: ``dense`` keeps ``P``, ``seeded``
  draws it again at every backward pass.
- ``usf``, ``brsf``, ``frsf`` (sign-concordant feedback, Liao, Leibo & Poggio 2016, as biotorch
  0.0.16 defines them): ``B = M o sign(W)`` from the *current* ``W`` at every backward pass, with
  ``M = s`` a constant (uSF; ``s = gain * RMS`` of the structure's entries, ``1/sqrt(3 fan_in)`` for
  ``uniform``: biotorch's scaling factor for PyTorch's default init), ``M = s |P_t|`` drawn again at
  every backward pass from a generator whose state is in ``state_dict`` (brSF), or
  ``M = s |P|`` drawn once (frSF), ``s = gain``.
- ``kp`` (Kolen-Pollack as adapted by Akrout et al. 2019, "Deep learning without weight
  transport", eqs. 16-17): ``B`` starts as ``fa``'s and is learned. It is an ``nn.Parameter`` of
  the engine, kept in ``W``'s shape (the paper's ``B_{l+1}`` is its transpose), and its gradient is
  set to exactly ``W``'s gradient, ``dB := dW_{l+1} = delta_{l+1}^T h_l``. With ``B`` in the same
  optimiser as ``W`` (same learning rate ``eta``, same weight decay ``lambda``), SGD gives the
  paper's updates ``W <- (1 - eta lambda) W - eta dW`` and ``B <- (1 - eta lambda) B - eta dW``, so
  ``W - B`` shrinks by ``(1 - eta lambda)`` every step.

``normalize=False`` multiplies ``s`` by ``sqrt(fan_in)`` (entries of order 1), as for DFA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from .feedback import Pattern, PatternStorage

__all__ = [
    "LAYER_FEEDBACK",
    "LayerFeedback",
    "RandomFeedback",
    "SignFeedback",
    "backward_products",
    "conv_geometry",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def conv_geometry(module: nn.Module, name: str, rule: str) -> dict[str, Any] | None:
    """The ``stride``/``padding``/``dilation``/``groups`` the backward pass needs (``None`` for a
    linear layer); refuses what :func:`input_gradient` cannot express."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, _CONVS):
        raise TypeError(f"layer {name!r} ({type(module).__name__}) is not a Linear or Conv layer")
    if module.padding_mode != "zeros":
        raise ValueError(
            f"layer {name!r} pads with {module.padding_mode!r}; the layer-wise rule {rule!r} "
            f"sends the error back through zero padding only (set it to 'bp' with rules=...)"
        )
    padding: Any = module.padding
    if isinstance(padding, str):
        kernel, dilation = module.kernel_size, module.dilation
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        if padding == "valid":
            padding = tuple(0 for _ in total)
        elif all(t % 2 == 0 for t in total):
            padding = tuple(t // 2 for t in total)
        else:
            raise ValueError(
                f"layer {name!r} uses padding='same' with an even kernel (asymmetric padding), "
                f"which the layer-wise rule {rule!r} does not support"
            )
    return {
        "stride": list(module.stride),
        "padding": list(padding),
        "dilation": list(module.dilation),
        "groups": int(module.groups),
    }


def backward_products(
    geometry: dict[str, Any] | None,
    grad: Tensor,
    x: Tensor,
    matrix: Tensor,
    *,
    need_input: bool = True,
    need_weight: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """The two products of a layer's backward pass with its weight replaced by ``matrix``:

    - the input gradient: ``grad @ B`` (linear) or the transposed convolution of ``grad`` with
      kernel ``B`` (convolution; ``torch.nn.grad.conv*d_input`` with ``B``);
    - the weight gradient ``grad^T x`` (linear) or ``conv*d_weight(x, grad)``: what autograd gives
      ``W``, computed again for Kolen-Pollack's ``B``.

    ``grad`` is the gradient at the layer's output, ``x`` its input.
    """
    if geometry is None:
        grad_x = grad @ matrix.to(grad.dtype) if need_input else None
        grad_w = None
        if need_weight:
            flat = grad.reshape(-1, grad.shape[-1])
            grad_w = flat.T @ x.reshape(-1, x.shape[-1]).to(grad.dtype)
        return grad_x, grad_w
    dims = len(geometry["stride"])
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
        grad,
        x.to(grad.dtype),
        matrix.to(grad.dtype),
        None,
        geometry["stride"],
        geometry["padding"],
        geometry["dilation"],
        False,
        [0] * dims,
        geometry["groups"],
        [need_input, need_weight, False],
    )
    return grad_x, grad_w


class LayerFeedback(nn.Module):
    """The backward matrix ``B`` of one layer, in the shape of its weight ``W``.

    Subclasses implement :meth:`matrix`. The *pattern* is drawn by a feedback structure
    (:class:`~dfatorch.feedback.Pattern`) as ``(out_channels, fan_in)`` and viewed in ``W``'s
    shape; ``scales`` (one entry, a buffer) is the factor ``s``. ``kind`` names what ``B`` is for
    storage messages: ``"float"``, ``"sign-derived"`` or ``"learned"``. The layout (rule, shape,
    structure, seed) is saved as extra state and checked on load.
    """

    kind: str = "float"
    learned: bool = False

    def __init__(
        self,
        rule: str,
        name: str,
        weight: Tensor,
        geometry: dict[str, Any] | None,
        *,
        init: Pattern,
        seed: int,
        gain: float,
        normalize: bool,
        sign_scaled: bool = False,
    ) -> None:
        super().__init__()
        self.rule = rule
        self.name = name
        self.shape = tuple(weight.shape)
        self.geometry = geometry
        self.structure = init
        self.seed = int(seed)
        self.normalize = bool(normalize)
        self.rows = int(self.shape[0])
        self.total_size = math.prod(self.shape[1:])  # fan_in: the pattern's columns
        rms = init.entry_rms(self.rows, self.total_size) if sign_scaled else 1.0
        scale = gain * rms * (1.0 if normalize else math.sqrt(self.total_size))
        self.register_buffer("scales", torch.tensor([scale], dtype=torch.float32))

    def generate(self, generator: torch.Generator | None = None) -> Tensor:
        """Draw the unscaled pattern ``(out_channels, fan_in)`` (CPU, float32) from the seed, or
        from ``generator``."""
        g = generator or torch.Generator(device="cpu").manual_seed(self.seed)
        return self.structure.sample(self.rows, self.total_size, generator=g, binary=False)

    def matrix(self, weight: Tensor, *, advance: bool = True) -> Tensor:
        """``B`` for this backward pass, from the current ``weight`` (shape and dtype of
        ``weight``). ``advance=False`` leaves any random state as it was (for diagnostics)."""
        raise NotImplementedError

    def stored_bytes(self) -> int:
        """Bytes of pattern or learned matrix held (0 where ``B`` is derived on the fly)."""
        return 0

    def layout(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "shape": list(self.shape),
            "init": self.structure.name,
            "init_options": dict(self.structure.options),
            "seed": self.seed,
            "normalize": self.normalize,
        }

    def get_extra_state(self) -> dict[str, Any]:
        return self.layout()

    def set_extra_state(self, state: dict[str, Any]) -> None:
        mine = self.layout()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {s!r}, here {h!r}" for k, (s, h) in diff.items())
            raise ValueError(f"feedback of layer {self.name!r} does not match ({detail})")

    def extra_repr(self) -> str:
        return f"{self.name!r}, rule={self.rule}, shape={self.shape}, init={self.structure.name}"


class RandomFeedback(LayerFeedback):
    """``B = s * P``: fixed (``fa``, kept by a storage) or learned (``kp``, an ``nn.Parameter``
    that starts at ``s * P`` and receives ``W``'s gradient)."""

    def __init__(
        self,
        rule: str,
        name: str,
        weight: Tensor,
        geometry: dict[str, Any] | None,
        *,
        init: Pattern,
        storage: PatternStorage,
        seed: int,
        gain: float,
        normalize: bool,
        learned: bool = False,
    ) -> None:
        super().__init__(
            rule, name, weight, geometry, init=init, seed=seed, gain=gain, normalize=normalize
        )
        self.learned = learned
        self.kind = "learned" if learned else "float"
        self.store = storage
        if learned:
            start = (self.generate() * self.scales).view(self.shape)
            self.weight = nn.Parameter(start.to(dtype=weight.dtype))
        else:
            storage.store(self, self.generate)
        self.to(weight.device)

    def matrix(self, weight: Tensor, *, advance: bool = True) -> Tensor:
        if self.learned:
            return self.weight.detach().to(weight.dtype)
        pattern = self.store.pattern(self, weight.dtype).view(self.shape)
        return pattern.to(weight.device) * self.scales.to(weight.dtype)

    def stored_bytes(self) -> int:
        if self.learned:
            return self.weight.numel() * self.weight.element_size()
        return self.store.nbytes(self)

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "storage": None if self.learned else self.store.name}


class SignFeedback(LayerFeedback):
    """``B = M o sign(W)`` from the current ``W``; ``magnitude`` says what ``M`` is:
    ``"uniform"`` (``s``, uSF), ``"batch"`` (``s |P_t|``, a new draw at every backward pass,
    brSF) or ``"fixed"`` (``s |P|``, drawn once, frSF)."""

    kind = "sign-derived"
    MAGNITUDES = ("uniform", "batch", "fixed")

    def __init__(
        self,
        rule: str,
        name: str,
        weight: Tensor,
        geometry: dict[str, Any] | None,
        *,
        init: Pattern,
        storage: PatternStorage,
        seed: int,
        gain: float,
        normalize: bool,
        magnitude: str,
    ) -> None:
        if magnitude not in self.MAGNITUDES:
            raise ValueError(f"magnitude={magnitude!r} is not one of {self.MAGNITUDES}")
        super().__init__(
            rule,
            name,
            weight,
            geometry,
            init=init,
            seed=seed,
            gain=gain,
            normalize=normalize,
            sign_scaled=magnitude == "uniform",
        )
        self.magnitude = magnitude
        if magnitude == "fixed":
            self.register_buffer("pattern", self.generate().abs_())
        elif magnitude == "batch":
            # the generator's state is a buffer: saved, restored and copied with the engine
            start = torch.Generator(device="cpu").manual_seed(self.seed).get_state()
            self.register_buffer("rng_state", start)
        self.to(weight.device)

    def _draw(self, advance: bool) -> Tensor:
        g = torch.Generator(device="cpu")
        g.set_state(self.rng_state.cpu())
        drawn = self.generate(g).abs_()
        if advance:
            self.rng_state.copy_(g.get_state())
        return drawn

    def matrix(self, weight: Tensor, *, advance: bool = True) -> Tensor:
        signs = torch.sign(weight.detach())
        scale = self.scales.to(device=weight.device, dtype=weight.dtype)
        if self.magnitude == "uniform":
            return signs * scale
        pattern = self.pattern if self.magnitude == "fixed" else self._draw(advance)
        magnitude = pattern.to(device=weight.device, dtype=weight.dtype).view(self.shape)
        return magnitude * scale * signs

    def stored_bytes(self) -> int:
        if self.magnitude != "fixed":
            return 0
        return self.pattern.numel() * self.pattern.element_size()

    def layout(self) -> dict[str, Any]:
        return {**super().layout(), "magnitude": self.magnitude}


#: The layer-wise rules by name: one mechanism (the backward matrix ``B``), two classes with a
#: parameter each.
LAYER_FEEDBACK: dict[str, Callable[..., LayerFeedback]] = {
    "fa": partial(RandomFeedback, learned=False),
    "kp": partial(RandomFeedback, learned=True),
    "usf": partial(SignFeedback, magnitude="uniform"),
    "brsf": partial(SignFeedback, magnitude="batch"),
    "frsf": partial(SignFeedback, magnitude="fixed"),
}
