"""Alignment diagnostics (Launay, Poli & Krzakala 2019): does DFA's signal agree with BP's?

*Gradient alignment* of a hidden layer: for each sample, the cosine between the gradient the engine
delivers at the layer's output (``e @ B_l`` at a DFA layer; whatever back-propagation through the
layers above brings at a BP layer) and the true back-propagated gradient ``dL/dh_l`` for the same
weights, the same batch and the same randomness (dropout masks); reported as the mean and standard
deviation over the batch. BP layers under plain BP score 1; a DFA layer scores near 0 before its
forward weights have aligned with its feedback.

*Signal scale* of a hidden layer: the median of ``|delivered| / |true|``, the per-sample norms of
the same two gradients, over the samples where both are non-zero (``samples``). 1 under plain
BP; for DFA it says how much stronger or weaker the fixed feedback pushes a layer than
back-propagation would, which the cosine cannot.

*Unit statistics* of a hidden layer's output (the next layer's input: after activation, pooling
and dropout; :func:`unit_statistics`): the fraction of units (every non-batch position: a conv
map's channel at one position) that are exactly zero for every sample of the batch (dead ReLU
units; fewer on a larger batch) and the mean per-sample norm.

*Weight alignment*: for a direct rule (``dfa``, ``bdfa``, ``dkp``), the angle between the output
layer's weights ``W_out`` (``C x d``) and the feedback ``B_l`` of the hidden layer just below it,
which has the same shape; for deeper layers the forward path is not one matrix (nonlinearities in
between), and no angle is reported. For a layer-wise rule (``fa``, ``usf``, ``brsf``, ``frsf``,
``kp``), every hidden layer gets the angle between the next layer's ``W`` and the ``B`` that
replaces it (Lillicrap et al. 2016; Akrout et al. 2019), ``B`` as the current step would use it
(``brsf``: a draw that leaves the saved generator state unchanged).

One probe costs one extra forward and backward pass (plain BP, no cuts) on the probe batch; model
parameters, gradients, buffers and RNG states are left exactly as they were. Without probes the
engine does no extra work.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .engine import DFAEngine, get_rng_states, preserved_state, set_rng_states

__all__ = ["LayerAlignment", "gradient_alignment", "unit_statistics", "weight_alignment"]


@dataclass(frozen=True)
class LayerAlignment:
    """The alignment of one hidden layer on one probe batch."""

    name: str
    rule: str
    mean: float  #: mean over samples of cos(delivered, true)
    std: float
    samples: int  #: samples where both gradients are non-zero
    #: degrees between the forward weights and the feedback that stands for them (module docstring)
    weight_angle: float | None = None
    #: median of |delivered| / |true| over the ``samples`` (module docstring)
    scale: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cosines_and_ratios(delivered: Tensor, true: Tensor) -> tuple[Tensor, Tensor]:
    """Per sample where both are non-zero: cos(delivered, true) and |delivered| / |true|."""
    a = delivered.reshape(delivered.shape[0], -1).double()
    b = true.reshape(true.shape[0], -1).double()
    na, nb = a.norm(dim=1), b.norm(dim=1)
    keep = (na > 0) & (nb > 0)
    return (a[keep] * b[keep]).sum(1) / (na[keep] * nb[keep]), na[keep] / nb[keep]


def unit_statistics(output: Tensor) -> tuple[float, float]:
    """``(dead, norm)`` of one hidden layer's output on a batch (first dimension): the fraction of
    units (every non-batch position) that are exactly zero for every sample, and the mean over
    samples of the output's L2 norm."""
    flat = output.detach().reshape(output.shape[0], -1)
    if flat.numel() == 0:
        return math.nan, math.nan
    dead = (flat == 0).all(dim=0).double().mean().item()
    return dead, flat.double().norm(dim=1).mean().item()


def _angle(w: Tensor, b: Tensor) -> float:
    w = w.detach().to(b.dtype)
    cos = (w * b).sum() / (w.norm() * b.norm()).clamp_min(1e-30)
    return math.degrees(math.acos(max(-1.0, min(1.0, cos.item()))))


def weight_alignment(engine: DFAEngine) -> dict[str, float]:
    """Degrees between forward weights and the feedback standing for them, by hidden layer: the
    output layer's weights against the direct feedback of the hidden layer feeding it (when the
    shapes match), and every layer-wise rule's ``B`` against the weight it replaces (see the
    module docstring)."""
    angles = {}
    with torch.no_grad():
        for name, fb in engine.layer_feedback.items():
            weight = next(i.module for i in engine.layers if i.name == fb.name).weight
            angles[name] = _angle(weight, fb.matrix(weight, advance=False))
    out = engine.layers[-1].module
    if engine.feedback is None or not isinstance(out, nn.Linear):
        return angles
    blocks = dict(zip(engine.feedback.names, engine.feedback.blocks()))
    last = engine.layers[-2].name
    b = blocks.get(last)
    if b is not None and b.shape == out.weight.shape:
        angles[last] = _angle(out.weight, b)
    return angles


def gradient_alignment(
    engine: DFAEngine,
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Tensor, Any], Tensor],
    *,
    delivered: list[Tensor | None] | None = None,
    rng_state: dict[str, Any] | None = None,
) -> list[LayerAlignment]:
    """Gradient alignment of every hidden layer of ``engine``'s model on one batch.

    Args:
        delivered: the gradients the engine delivered during a training step on this same batch,
            as recorded by ``engine.recording()``; if None, a DFA pass is run here first (one more
            forward/backward, state preserved).
        rng_state: :func:`dfatorch.engine.get_rng_states` from before that step's forward pass,
            so that the BP pass draws the same dropout masks. Required with ``delivered``.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    if delivered is None:
        rng_state = get_rng_states()
        with preserved_state(engine.model), torch.enable_grad():
            with engine.capturing() as points:
                y = engine.model(*args)
            points = list(points)
            loss = loss_fn(y, targets)
            grads = torch.autograd.grad(loss, points, allow_unused=True)
        delivered = [None if g is None else g.detach() for g in grads]
    elif rng_state is None:
        raise ValueError("gradient_alignment(delivered=...) needs the rng_state of that step")
    current = get_rng_states()
    set_rng_states(rng_state)  # the BP pass draws the step's dropout masks again
    try:
        _, true = engine.true_signals(args, targets, loss_fn)
    finally:
        set_rng_states(current)
    angles = weight_alignment(engine)
    report = []
    empty = torch.zeros(0, dtype=torch.float64)
    for info, d, t in zip(engine.layers[:-1], delivered, true):
        cos, ratio = (empty, empty) if d is None else _cosines_and_ratios(d, t)
        n = cos.numel()
        report.append(
            LayerAlignment(
                name=info.name,
                rule=info.rule.value,
                mean=cos.mean().item() if n else float("nan"),
                std=cos.std(unbiased=False).item() if n else float("nan"),
                samples=n,
                weight_angle=angles.get(info.name),
                scale=ratio.quantile(0.5).item() if n else float("nan"),
            )
        )
    return report
