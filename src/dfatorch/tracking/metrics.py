"""OTB evaluation metrics: pure functions on numpy arrays.

Conventions (those of the OTB toolkit and the GOT-10k toolkit's OTB experiment):

* A box is ``(x, y, w, h)``: top-left corner, width, height, in pixels, treated as the
  continuous rectangle ``[x, x + w) x [y, y + h)``. Arrays of boxes have shape ``(..., 4)``
  and functions work elementwise over the leading axes (row ``i`` of ``a`` with row ``i`` of
  ``b``).
* IoU: intersection area over union area; a box with ``w <= 0`` or ``h <= 0`` has area 0, so
  its IoU is 0 (also for two identical empty boxes).
* Centre error: Euclidean distance between the centres ``(x + w/2, y + h/2)``. OTB uses
  ``x + (w-1)/2`` on 1-based pixels; the distance is the same since the offsets cancel.
* Success curve: for each overlap threshold ``t``, the fraction of frames with IoU
  **strictly greater** than ``t``; thresholds ``0, 0.05, ..., 1`` (21 values). The success
  score (AUC) is the mean of that curve, so a frame counts ``k/21`` when its IoU lies in
  ``((k-1)/20, k/20]``.
* Precision curve: for each distance threshold ``t`` (0, 1, ..., 50 pixels), the fraction of
  frames with centre error **less than or equal to** ``t``; precision@20 is its value at 20.
* Frames without ground truth carry NaN (in the IoU / error arrays) and are left out of both
  numerator and denominator. A frame where the tracker failed (NaN box) while the ground truth
  exists is a failure: IoU 0 and error ``inf`` (see :func:`frame_metrics`).
* When no frame is left, curves and scores are NaN.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PRECISION_THRESHOLDS",
    "SUCCESS_THRESHOLDS",
    "center_error",
    "frame_metrics",
    "iou",
    "precision_at",
    "precision_curve",
    "success_auc",
    "success_curve",
]

# arange / 20 rather than linspace: every threshold is the float nearest to k/20
# (linspace gives 0.15000000000000002), so an IoU of exactly 0.15 is judged as OTB's MATLAB
# 0:0.05:1 would judge it.
SUCCESS_THRESHOLDS: np.ndarray = np.arange(21) / 20.0
PRECISION_THRESHOLDS: np.ndarray = np.arange(0, 51, dtype=np.float64)
SUCCESS_THRESHOLDS.flags.writeable = False  # shared defaults: keep them immutable
PRECISION_THRESHOLDS.flags.writeable = False


def _boxes(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.shape[-1:] != (4,):
        raise ValueError(f"boxes must have shape (..., 4), got {a.shape}")
    return a


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``a[i]`` and ``b[i]``, shape ``(...)``.

    Empty boxes (``w <= 0`` or ``h <= 0``) give 0; a row with a NaN in either box gives NaN.
    """
    a, b = np.broadcast_arrays(_boxes(a), _boxes(b))
    iw = np.minimum(a[..., 0] + a[..., 2], b[..., 0] + b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
    ih = np.minimum(a[..., 1] + a[..., 3], b[..., 1] + b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = np.clip(a[..., 2], 0, None) * np.clip(a[..., 3], 0, None)
    area_b = np.clip(b[..., 2], 0, None) * np.clip(b[..., 3], 0, None)
    union = area_a + area_b - inter
    out = np.zeros(np.shape(union))
    np.divide(inter, union, out=out, where=union > 0)
    nan = np.isnan(a).any(axis=-1) | np.isnan(b).any(axis=-1)
    out[nan] = np.nan
    return out


def center_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in pixels between the centres of ``a[i]`` and ``b[i]``; NaN in, NaN out."""
    a, b = _boxes(a), _boxes(b)
    ca = a[..., :2] + a[..., 2:] / 2.0
    cb = b[..., :2] + b[..., 2:] / 2.0
    return np.sqrt(np.sum((ca - cb) ** 2, axis=-1))


def frame_metrics(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame IoU and centre error of predictions against ground truth, shape (T,) each.

    Frames whose ground truth is missing (a NaN, or ``w <= 0`` / ``h <= 0``) get NaN in
    both, so the curves leave them out. Frames whose prediction has a NaN count as failures:
    IoU 0 and error ``inf`` (excluding them would reward a tracker for giving up).
    """
    pred, gt = _boxes(pred).reshape(-1, 4), _boxes(gt).reshape(-1, 4)
    if pred.shape != gt.shape:
        raise ValueError(f"{len(pred)} predicted boxes but {len(gt)} ground-truth boxes")
    ious = iou(pred, gt)
    errors = center_error(pred, gt)
    failed = np.isnan(pred).any(axis=1)
    ious[failed] = 0.0
    errors[failed] = np.inf
    missing = np.isnan(gt).any(axis=1) | (gt[:, 2] <= 0) | (gt[:, 3] <= 0)
    ious[missing] = np.nan
    errors[missing] = np.nan
    return ious, errors


def _valid(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    return values[~np.isnan(values)]


def success_curve(ious: np.ndarray, thresholds: np.ndarray = SUCCESS_THRESHOLDS) -> np.ndarray:
    """Fraction of frames with IoU strictly greater than each threshold (NaN frames left out)."""
    ious = _valid(ious)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if ious.size == 0:
        return np.full(thresholds.shape, np.nan)
    return np.mean(ious[:, None] > thresholds[None, :], axis=0)


def success_auc(ious: np.ndarray) -> float:
    """OTB success score: mean of the success curve over the 21 thresholds 0, 0.05, ..., 1."""
    return float(np.mean(success_curve(ious)))


def precision_curve(
    errors: np.ndarray, thresholds: np.ndarray = PRECISION_THRESHOLDS
) -> np.ndarray:
    """Fraction of frames with centre error <= each threshold in pixels (NaN frames left out)."""
    errors = _valid(errors)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if errors.size == 0:
        return np.full(thresholds.shape, np.nan)
    return np.mean(errors[:, None] <= thresholds[None, :], axis=0)


def precision_at(errors: np.ndarray, threshold: float = 20.0) -> float:
    """Fraction of frames with centre error <= ``threshold`` pixels (OTB precision@20)."""
    return float(precision_curve(errors, np.array([threshold]))[0])
