"""Box samplers of MDNet (Nam & Han 2016): Gaussian, uniform and whole-image, IoU-filtered.

Boxes are ``(x, y, w, h)`` float64 numpy arrays in 0-based image pixels (the GOT-10k convention
of :mod:`dfatorch.tracking.otb`). Every sampler draws from the ``numpy.random.Generator`` it is
given, so a seeded generator gives the same boxes every time. All work is vectorised over the
boxes; the only loop is over batches of draws when an IoU filter rejects too many.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from .metrics import iou

__all__ = ["SampleKind", "clip_boxes", "sample_boxes"]

Bounds = tuple[float, float, float, float]


class SampleKind(str, Enum):
    """How :func:`sample_boxes` spreads boxes around a reference box."""

    #: centre offset ``trans * mean(w, h) * clip(N(0, 0.5^2), -1, 1)``, size ``scale ** clip(...)``
    GAUSSIAN = "gaussian"
    #: centre offset ``trans * mean(w, h) * U(-1, 1)``, size ``scale ** U(-1, 1)``
    UNIFORM = "uniform"
    #: centre anywhere in the bounds, size ``scale ** U(-1, 1)`` (MDNet's whole-image negatives)
    WHOLE = "whole"


def clip_boxes(boxes: np.ndarray, bounds: Bounds, min_size: float = 1.0) -> np.ndarray:
    """Clip boxes ``(n, 4)`` to lie inside ``bounds = (x0, y0, x1, y1)`` (a copy).

    Sizes are first clamped to ``[min(min_size, bound size), bound size]``, then boxes are shifted
    (not shrunk) into the bounds, so a box keeps its shape where it can.
    """
    x0, y0, x1, y1 = bounds
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    bw, bh = x1 - x0, y1 - y0
    out[:, 2] = np.clip(out[:, 2], min(min_size, bw), bw)
    out[:, 3] = np.clip(out[:, 3], min(min_size, bh), bh)
    out[:, 0] = np.clip(out[:, 0], x0, x1 - out[:, 2])
    out[:, 1] = np.clip(out[:, 1], y0, y1 - out[:, 3])
    return out


def _draw(
    rng: np.random.Generator,
    box: np.ndarray,
    n: int,
    kind: SampleKind,
    trans: float,
    scale: float,
    aspect: float,
    bounds: Bounds,
) -> np.ndarray:
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    size = np.broadcast_to(box[2:], (n, 2)).copy()
    if kind is SampleKind.GAUSSIAN:
        shift = np.clip(0.5 * rng.standard_normal((n, 2)), -1, 1)
        zoom = np.clip(0.5 * rng.standard_normal((n, 1)), -1, 1)
    else:
        shift = rng.uniform(-1, 1, (n, 2))
        zoom = rng.uniform(-1, 1, (n, 1))
    size *= scale**zoom
    if aspect != 1.0:  # w and h stretched independently (MDNet's bounding-box-regression samples)
        size *= aspect ** rng.uniform(-1, 1, (n, 2))
    if kind is SampleKind.WHOLE:
        x0, y0, x1, y1 = bounds
        lo = np.array([x0, y0]) + size / 2
        hi = np.maximum(np.array([x1, y1]) - size / 2, lo)
        centre = lo + rng.uniform(0, 1, (n, 2)) * (hi - lo)
    else:
        centre = np.array([cx, cy]) + trans * box[2:].mean() * shift
    return np.concatenate([centre - size / 2, size], axis=1)


def sample_boxes(
    rng: np.random.Generator,
    box: np.ndarray | tuple[float, float, float, float],
    n: int,
    *,
    kind: SampleKind | str = SampleKind.GAUSSIAN,
    trans: float = 0.6,
    scale: float = 1.05,
    aspect: float = 1.0,
    bounds: Bounds,
    iou_range: tuple[float, float] | None = None,
    min_size: float = 10.0,
    max_draws: int = 20,
) -> np.ndarray:
    """Draw up to ``n`` boxes around ``box`` as MDNet's ``SampleGenerator`` does.

    Args:
        rng: the source of randomness (seed it for reproducible boxes).
        box: the reference box ``(x, y, w, h)``.
        n: how many boxes to return.
        kind: see :class:`SampleKind`.
        trans: centre spread in units of ``mean(w, h)`` of ``box``.
        scale: size factor range, ``scale ** [-1, 1]``.
        aspect: independent width/height factor range, ``aspect ** [-1, 1]`` (1: off).
        bounds: ``(x0, y0, x1, y1)``: every box is clipped to lie inside (:func:`clip_boxes`).
        iou_range: keep only boxes whose IoU with ``box`` is in ``[lo, hi]`` (after clipping).
        min_size: smallest width and height (MDNet: 10 pixels).
        max_draws: give up after this many batches of ``2 n`` draws; fewer than ``n`` boxes are
            then returned (only when the IoU range is nearly impossible within the bounds).

    Returns:
        float64 array ``(m, 4)``, ``m <= n`` (``m == n`` unless the filter starved).
    """
    kind = SampleKind(kind)
    box = np.asarray(box, dtype=np.float64).reshape(4)
    if n <= 0:
        return np.zeros((0, 4))
    kept: list[np.ndarray] = []
    count = 0
    for _ in range(max_draws):
        draws = clip_boxes(
            _draw(rng, box, 2 * n, kind, trans, scale, aspect, bounds), bounds, min_size
        )
        if iou_range is not None:
            overlap = iou(draws, box)
            draws = draws[(overlap >= iou_range[0]) & (overlap <= iou_range[1])]
        kept.append(draws)
        count += len(draws)
        if count >= n:
            break
    return np.concatenate(kept)[:n]
