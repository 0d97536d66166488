"""Object tracking on the OTB benchmark: data reader, metrics, OPE experiment runner, and an
MDNet-style tracker whose fully connected layers learn online by BP, DFA or BDFA."""

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
from .features import Backbone, FeatureExtractor, FeatureMap, load_backbone, roi_align
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
from .run import evaluate_updates, track_sequence
from .sampling import SampleKind, clip_boxes, sample_boxes
from .tracker import BoxRegressor, MDNetTracker, TrackerConfig, build_head

__all__ = [
    "OTB_FRAME_RANGES",
    "PRECISION_THRESHOLDS",
    "SUCCESS_THRESHOLDS",
    "Backbone",
    "BoxRegressor",
    "Experiment",
    "FeatureExtractor",
    "FeatureMap",
    "MDNetTracker",
    "SampleKind",
    "Sequence",
    "SequenceResult",
    "Tracker",
    "TrackerConfig",
    "build_head",
    "center_error",
    "clip_boxes",
    "draw_boxes",
    "evaluate_updates",
    "frame_metrics",
    "iou",
    "list_sequences",
    "load_backbone",
    "load_sequence",
    "load_sequences",
    "parse_groundtruth",
    "plot_report",
    "precision_at",
    "precision_curve",
    "roi_align",
    "run_sequence",
    "sample_boxes",
    "success_auc",
    "success_curve",
    "track_sequence",
    "tracker_name",
    "write_boxes",
]
