"""Object tracking on the OTB benchmark: data reader, metrics and OPE experiment runner."""

from __future__ import annotations

from .evaluate import (
    Experiment,
    SequenceResult,
    Tracker,
    draw_boxes,
    plot_report,
    run_sequence,
    tracker_name,
)
from .metrics import (
    PRECISION_THRESHOLDS,
    SUCCESS_THRESHOLDS,
    center_error,
    frame_metrics,
    iou,
    precision_at,
    precision_curve,
    success_auc,
    success_curve,
)
from .otb import (
    OTB_FRAME_RANGES,
    Sequence,
    list_sequences,
    load_sequence,
    load_sequences,
    parse_groundtruth,
    write_boxes,
)

__all__ = [
    "OTB_FRAME_RANGES",
    "PRECISION_THRESHOLDS",
    "SUCCESS_THRESHOLDS",
    "Experiment",
    "Sequence",
    "SequenceResult",
    "Tracker",
    "center_error",
    "draw_boxes",
    "frame_metrics",
    "iou",
    "list_sequences",
    "load_sequence",
    "load_sequences",
    "parse_groundtruth",
    "plot_report",
    "precision_at",
    "precision_curve",
    "run_sequence",
    "success_auc",
    "success_curve",
    "tracker_name",
    "write_boxes",
]
