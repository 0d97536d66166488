"""Transforms of the feedback path: the output error before the projection, the signal after it.

``attach(model, "dfa", error_transforms=[...], signal_transforms=[...])`` applies each callable in
order: error transforms to ``e`` of shape ``(N, C)``, signal transforms to the projected signal
``e @ B`` of shape ``(N, D)`` (every feedback point together). The output layer's gradient is never
transformed. Any ``Tensor -> Tensor`` callable works; one that is an ``nn.Module`` is saved in the
engine's ``state_dict``. A transform that draws random numbers subclasses :class:`RandomTransform`,
whose generator state is saved too, so that a resumed run draws the same numbers as an
uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ClipPerExample", "GaussianNoise", "RandomTransform"]


class RandomTransform(nn.Module):
    """Base of transforms that draw random numbers: :meth:`generator` gives a ``torch.Generator``
    on the tensor's device, seeded with ``seed`` on first use; every generator's state is part of
    ``state_dict()`` (extra state)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device | str) -> torch.Generator:
        key = str(torch.device(device))
        g = self._generators.get(key)
        if g is None:
            g = self._generators[key] = torch.Generator(device=key).manual_seed(self.seed)
        return g

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "states": {k: g.get_state() for k, g in self._generators.items()},
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])
        self._generators = {}
        for key, value in state["states"].items():
            self.generator(key).set_state(value)

    def __deepcopy__(self, memo: dict[int, Any]) -> RandomTransform:
        # torch.Generator cannot be deep-copied: copy through the saved state instead
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        generators = self.__dict__["_generators"]
        for key, value in self.__dict__.items():
            if key != "_generators":
                clone.__dict__[key] = copy.deepcopy(value, memo)
        clone._generators = {}
        for key, g in generators.items():
            clone.generator(key).set_state(g.get_state())
        return clone


class ClipPerExample(nn.Module):
    """Scale each row (example) to an L2 norm of at most ``max_norm``."""

    def __init__(self, max_norm: float) -> None:
        super().__init__()
        if not max_norm > 0:
            raise ValueError(f"max_norm must be positive, got {max_norm}")
        self.max_norm = float(max_norm)

    def forward(self, x: Tensor) -> Tensor:
        norms = x.flatten(1).norm(dim=1).clamp_min(1e-12)
        factor = (self.max_norm / norms).clamp(max=1.0)
        return x * factor.view(-1, *([1] * (x.dim() - 1)))

    def extra_repr(self) -> str:
        return f"max_norm={self.max_norm}"


class GaussianNoise(RandomTransform):
    """Add i.i.d. ``N(0, std^2)`` noise, drawn from the transform's own saved generator."""

    def __init__(self, std: float, seed: int = 0) -> None:
        super().__init__(seed)
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std}")
        self.std = float(std)

    def forward(self, x: Tensor) -> Tensor:
        g = self.generator(x.device)
        return x + torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype) * self.std

    def extra_repr(self) -> str:
        return f"std={self.std}, seed={self.seed}"
