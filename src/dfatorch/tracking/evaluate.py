"""Run trackers over OTB sequences and report OTB one-pass evaluation (OPE) results.

A tracker is any object with ``init(image, box)`` and ``update(image) -> box`` (the GOT-10k
toolkit's interface), where ``image`` is a uint8 RGB array (H, W, 3) and a box is
``(x, y, w, h)`` floats in 0-based pixels. It may expose ``name: str`` and
``update_seconds: float`` (total time spent in online model updates, reset by ``init``).
"""

from __future__ import annotations

import inspect
import json
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageDraw

from .._console import progress_bar
from .._io import write_json
from .._stats import mean_std
from .metrics import (
    PRECISION_THRESHOLDS,
    SUCCESS_THRESHOLDS,
    frame_metrics,
    precision_at,
    precision_curve,
    success_auc,
    success_curve,
)
from .otb import Sequence, list_sequences, load_sequences, write_boxes

__all__ = [
    "Experiment",
    "SequenceResult",
    "Tracker",
    "draw_boxes",
    "plot_report",
    "run_sequence",
    "tracker_name",
]

Box = tuple[float, float, float, float]

_COLORS = [
    (0, 200, 0),
    (230, 25, 25),
    (30, 100, 255),
    (255, 200, 0),
    (200, 0, 200),
    (0, 200, 200),
    (255, 120, 0),
    (120, 60, 20),
]


class Tracker(Protocol):
    """The tracker interface used by :func:`run_sequence` (GOT-10k convention)."""

    def init(self, image: np.ndarray, box: Box) -> None: ...

    def update(self, image: np.ndarray) -> Box: ...


# eq=False: the generated __eq__ would compare arrays elementwise and fail on truth-testing.
@dataclass(eq=False)
class SequenceResult:
    """Result of one tracker on one sequence (one seed).

    Attributes:
        name: sequence name.
        tracker: tracker name.
        boxes: predicted boxes (T, 4), 0-based ``x, y, w, h``; row 0 is the ground truth.
        gt: ground-truth boxes (T, 4); NaN rows are frames without ground truth.
        ious, errors: per-frame IoU and centre error (:func:`~.metrics.frame_metrics`).
        success_auc: OTB success score of this sequence.
        precision20: fraction of frames with centre error <= 20 pixels.
        fps: frames / tracking seconds (``init`` and every ``update``; image loading excluded).
        update_seconds: the tracker's ``update_seconds`` after the run (time spent in online
            model updates), or None if it has no such attribute.
        frames: number of frames.
        init_seconds: time spent in ``tracker.init``.
        track_seconds: time spent in ``tracker.init`` and ``tracker.update``.
        load_seconds: time spent reading and decoding images (not in ``fps``).
        seed: random seed of the run, if any.
    """

    name: str
    tracker: str
    boxes: np.ndarray
    gt: np.ndarray
    ious: np.ndarray
    errors: np.ndarray
    success_auc: float
    precision20: float
    fps: float
    update_seconds: float | None
    frames: int
    init_seconds: float = 0.0
    track_seconds: float = 0.0
    load_seconds: float = 0.0
    seed: int | None = None

    @classmethod
    def from_boxes(
        cls,
        name: str,
        tracker: str,
        boxes: np.ndarray,
        gt: np.ndarray,
        *,
        update_seconds: float | None = None,
        init_seconds: float = 0.0,
        track_seconds: float = 0.0,
        load_seconds: float = 0.0,
        seed: int | None = None,
    ) -> SequenceResult:
        """Build a result, computing per-frame metrics, scores and fps from boxes and timings."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
        ious, errors = frame_metrics(boxes, gt)
        return cls(
            name=name,
            tracker=tracker,
            boxes=boxes,
            gt=gt,
            ious=ious,
            errors=errors,
            success_auc=success_auc(ious),
            precision20=precision_at(errors, 20.0),
            fps=len(boxes) / track_seconds if track_seconds > 0 else math.nan,
            update_seconds=update_seconds,
            frames=len(boxes),
            init_seconds=init_seconds,
            track_seconds=track_seconds,
            load_seconds=load_seconds,
            seed=seed,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite numbers become ``null``."""
        return {
            "name": self.name,
            "tracker": self.tracker,
            "seed": self.seed,
            "frames": self.frames,
            "success_auc": _finite(self.success_auc),
            "precision20": _finite(self.precision20),
            "fps": _finite(self.fps),
            "update_seconds": _finite(self.update_seconds),
            "init_seconds": self.init_seconds,
            "track_seconds": self.track_seconds,
            "load_seconds": self.load_seconds,
            "boxes": _to_list(self.boxes),
            "gt": _to_list(self.gt),
            "ious": _to_list(self.ious),
            "errors": _to_list(self.errors),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SequenceResult:
        """Inverse of :meth:`to_dict`; per-frame metrics are recomputed from the boxes."""
        return cls.from_boxes(
            d["name"],
            d["tracker"],
            _from_list(d["boxes"]),
            _from_list(d["gt"]),
            update_seconds=d.get("update_seconds"),
            init_seconds=d.get("init_seconds", 0.0),
            track_seconds=d.get("track_seconds", 0.0),
            load_seconds=d.get("load_seconds", 0.0),
            seed=d.get("seed"),
        )


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else float(v)


def _to_list(a: np.ndarray) -> list:
    # JSON has no NaN/inf: write null (metrics are recomputed from boxes when reading back).
    return np.where(np.isfinite(a), a, None).tolist()


def _from_list(rows: list) -> np.ndarray:
    return np.array(rows, dtype=np.float64)  # null -> NaN


def _as_box(box: Any, frame: int) -> np.ndarray:
    try:
        out = np.asarray(box, dtype=np.float64).reshape(4)
    except (TypeError, ValueError) as e:
        raise ValueError(f"frame {frame}: tracker returned {box!r}, expected (x, y, w, h)") from e
    return out


def tracker_name(tracker: object) -> str:
    """The tracker's ``name`` attribute, or its class name."""
    return str(getattr(tracker, "name", None) or type(tracker).__name__)


def run_sequence(
    tracker: Tracker,
    seq: Sequence,
    *,
    visualize_dir: str | Path | None = None,
    visualize_frames: Iterable[int] = (0, 10, 50, 100),
    name: str | None = None,
    progress: bool = False,
) -> SequenceResult:
    """Track one sequence with OTB's one-pass evaluation (OPE).

    ``tracker.init`` gets frame 0 and its ground-truth box, then ``tracker.update`` each later
    frame. As in OTB, frame 0's prediction is the ground-truth box and counts in the metrics.
    ``init``/``update`` are timed with :func:`time.perf_counter`; image loading is timed
    separately and excluded from ``fps``. With ``visualize_dir``, the frames
    ``visualize_frames`` (0-based indices) are saved there as ``<seq>_<image stem>.png`` with
    the ground truth (green) and the prediction (red).
    """
    name = name or tracker_name(tracker)
    gt = seq.boxes
    if not np.all(np.isfinite(gt[0])):
        raise ValueError(f"{seq.name}: frame 0 has no ground truth to initialise the tracker")
    show = set(visualize_frames) if visualize_dir is not None else set()
    boxes = np.empty((len(seq), 4), dtype=np.float64)
    load_s = init_s = update_s = 0.0

    frames = progress_bar(len(seq), seq.name, progress, iterable=range(len(seq)), leave=False)
    for i in frames:
        t0 = time.perf_counter()
        image = seq.load_frame(i)
        t1 = time.perf_counter()
        load_s += t1 - t0
        if i == 0:
            tracker.init(image, tuple(float(v) for v in gt[0]))
            init_s = time.perf_counter() - t1
            boxes[0] = gt[0]
        else:
            box = tracker.update(image)
            update_s += time.perf_counter() - t1
            boxes[i] = _as_box(box, i)
        if i in show:
            draw_boxes(
                image,
                {"ground truth": gt[i], name: boxes[i]},
                Path(visualize_dir) / f"{seq.name}_{seq.frames[i].stem}.png",
            )

    online = getattr(tracker, "update_seconds", None)
    return SequenceResult.from_boxes(
        seq.name,
        name,
        boxes,
        gt,
        update_seconds=None if online is None else float(online),
        init_seconds=init_s,
        track_seconds=init_s + update_s,
        load_seconds=load_s,
    )


def draw_boxes(
    image: np.ndarray,
    boxes: Mapping[str, Iterable[float]],
    path: str | Path,
    colors: Mapping[str, tuple[int, int, int]] | None = None,
    width: int = 2,
) -> None:
    """Save ``image`` (uint8 H x W x 3) as a PNG with one labelled rectangle per named box.

    Boxes are 0-based ``(x, y, w, h)``; NaN or empty boxes are skipped. Colours default to a
    fixed palette in the order of ``boxes`` (the first, usually the ground truth, is green).
    """
    img = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for k, (label, box) in enumerate(boxes.items()):
        color = (colors or {}).get(label, _COLORS[k % len(_COLORS)])
        x, y, w, h = (float(v) for v in box)
        # Legend in the top-left corner, one line per box, drawn even if the box is missing.
        draw.text((4, 4 + 12 * k), label, fill=color)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            continue
        draw.rectangle((x, y, x + w - 1, y + h - 1), outline=color, width=width)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    try:
        import torch
    except ImportError:  # the evaluation code itself does not need torch
        return
    torch.manual_seed(seed)


def _make_tracker(factory: Callable[..., Tracker], seed: int) -> Tracker:
    """``factory(seed=seed)`` if it has a ``seed`` parameter, ``factory(seed)`` if its first
    parameter is a required positional one, else ``factory()``.
    """
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # some builtins have no signature
        return factory()
    if any(p.name == "seed" and p.kind != p.POSITIONAL_ONLY for p in params):
        return factory(seed=seed)
    # Only a *required* first parameter gets the seed: an optional one may mean something else.
    first = params[0] if params else None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if first is not None and first.kind in positional and first.default is first.empty:
        return factory(seed)
    return factory()


class Experiment:
    """OTB one-pass evaluation (OPE) of trackers on a folder of OTB sequences.

    Results go to ``out_dir/<tracker name>/seed<seed>/<sequence>.txt`` (boxes, OTB format)
    and ``<sequence>.json`` (boxes, ground truth, timings). A cell (sequence, seed) whose
    JSON exists is skipped by :meth:`run`, so an interrupted run resumes where it stopped.

    Args:
        root: folder with the OTB sequence folders.
        sequences: sequence names (``"Biker"``, ``"Jogging.1"``); default: all under ``root``.
        out_dir: folder for the results.
    """

    def __init__(
        self, root: str | Path, sequences: Iterable[str] | None = None, *, out_dir: str | Path
    ) -> None:
        self.root = Path(root)
        self.out_dir = Path(out_dir)
        self.sequences = list(sequences) if sequences is not None else list_sequences(root)
        if not self.sequences:
            raise ValueError(f"{self.root}: no sequences to evaluate")

    def result_path(self, name: str, seq: str, seed: int) -> Path:
        """The JSON file of one cell."""
        if not name or any(c in name for c in "/\\") or name in {".", ".."}:
            raise ValueError(f"tracker name {name!r} must be usable as a folder name")
        return self.out_dir / name / f"seed{seed}" / f"{seq}.json"

    def run(
        self,
        name: str,
        tracker_factory: Callable[..., Tracker],
        *,
        seeds: Iterable[int] = (0,),
        visualize: bool = False,
        progress: bool = True,
    ) -> list[SequenceResult]:
        """Run a fresh tracker on every (sequence, seed) cell without results yet.

        For each cell, Python's, numpy's and torch's RNGs are seeded with the seed, then
        ``tracker_factory`` builds the tracker: it gets the seed if it has a ``seed``
        parameter or a required positional one (``lambda seed: ...``), else no argument. With
        ``visualize``, a few frames per cell are saved under ``.../seed<seed>/frames/``.
        Returns the results of all cells, those found on disk included.
        """
        results = []
        cells = [(seed, seq) for seed in seeds for seq in self.sequences]
        for seed, seq_name in progress_bar(len(cells), name, progress, iterable=cells):
            path = self.result_path(name, seq_name, seed)
            if path.is_file():  # finished earlier: resume
                results.append(self.load_result(name, seq_name, seed))
                continue
            (seq,) = load_sequences(self.root, [seq_name])
            _seed_everything(seed)
            tracker = _make_tracker(tracker_factory, seed)
            result = run_sequence(
                tracker,
                seq,
                name=name,
                visualize_dir=path.parent / "frames" if visualize else None,
                progress=progress,
            )
            result.seed = seed
            path.parent.mkdir(parents=True, exist_ok=True)
            write_boxes(path.with_suffix(".txt"), result.boxes)
            write_json(path, result.to_dict())
            results.append(result)
        return results

    def load_result(self, name: str, seq: str, seed: int) -> SequenceResult:
        """Read one cell's result written by :meth:`run`."""
        path = self.result_path(name, seq, seed)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no result for {name} on {seq} (seed {seed})")
        return SequenceResult.from_dict(json.loads(path.read_text()))

    def seeds(self, name: str) -> list[int]:
        """Seeds with a result folder for tracker ``name``."""
        base = self.out_dir / name
        found = [p.name[4:] for p in base.glob("seed*") if p.is_dir()]
        return sorted(int(s) for s in found if s.lstrip("-").isdigit())

    def report(self, names: Iterable[str]) -> dict[str, Any]:
        """Scores of each tracker, per sequence and overall, as mean and std over seeds.

        Per tracker ``name``: ``{"seeds", "sequences": {seq: {...}}, "overall": {...}}``.

        * ``success_score`` / ``precision20`` (and their curves): the OTB toolkit's and
          GOT-10k's convention: per-sequence curves averaged over sequences, each sequence
          weighing the same.
        * ``success_score_pooled`` / ``precision20_pooled``: all frames of all sequences
          pooled, long sequences weighing more.
        * ``*_std``: sample std over seeds (``None`` for one seed); ``fps``: total frames over
          total tracking seconds.

        Raises:
            FileNotFoundError: a tracker has no results, or a cell is missing (run it again).
        """
        report: dict[str, Any] = {}
        for name in names:
            seeds = self.seeds(name)
            if not seeds:
                raise FileNotFoundError(f"{self.out_dir / name}: no results for {name}")
            cells = {
                (seed, seq): self.load_result(name, seq, seed)
                for seed in seeds
                for seq in self.sequences
            }
            report[name] = self._report_one(seeds, cells)
        return report

    def _report_one(
        self, seeds: list[int], cells: dict[tuple[int, str], SequenceResult]
    ) -> dict[str, Any]:
        per_seq = {}
        for seq in self.sequences:
            rs = [cells[(seed, seq)] for seed in seeds]
            succ, succ_std = mean_std(r.success_auc for r in rs)
            prec, prec_std = mean_std(r.precision20 for r in rs)
            updates = [r.update_seconds for r in rs if r.update_seconds is not None]
            per_seq[seq] = {
                "success_score": succ,
                "success_score_std": succ_std,
                "precision20": prec,
                "precision20_std": prec_std,
                "fps": sum(r.frames for r in rs) / max(sum(r.track_seconds for r in rs), 1e-12),
                "update_seconds": float(np.mean(updates)) if updates else None,
                "frames": rs[0].frames,
            }

        succ_curves, prec_curves, pooled_s, pooled_p = [], [], [], []
        for seed in seeds:
            rs = [cells[(seed, seq)] for seq in self.sequences]
            succ_curves.append(np.mean([success_curve(r.ious) for r in rs], axis=0))
            prec_curves.append(np.mean([precision_curve(r.errors) for r in rs], axis=0))
            all_ious = np.concatenate([r.ious for r in rs])
            all_errors = np.concatenate([r.errors for r in rs])
            pooled_s.append(success_auc(all_ious))
            pooled_p.append(precision_at(all_errors, 20.0))
        succ = [float(np.mean(c)) for c in succ_curves]
        prec = [float(c[20]) for c in prec_curves]  # thresholds are 0..50 px: index 20 is 20 px
        all_cells = list(cells.values())
        track = sum(r.track_seconds for r in all_cells)
        scores = {
            "success_score": succ,
            "precision20": prec,
            "success_score_pooled": pooled_s,
            "precision20_pooled": pooled_p,
        }
        overall: dict[str, Any] = {}
        for key, values in scores.items():
            overall[key], overall[key + "_std"] = mean_std(values)
        overall |= {
            "fps": sum(r.frames for r in all_cells) / max(track, 1e-12),
            "sequences": len(self.sequences),
            "frames": sum(per_seq[s]["frames"] for s in self.sequences),
            "success_curve": np.mean(succ_curves, axis=0).tolist(),
            "precision_curve": np.mean(prec_curves, axis=0).tolist(),
        }
        return {"seeds": seeds, "sequences": per_seq, "overall": overall}

    def plot(self, names: Iterable[str], path: str | Path) -> dict[str, Any]:
        """Write OTB-style success and precision plots (one PNG); returns the report."""
        report = self.report(list(names))
        plot_report(report, path)
        return report


def plot_report(report: Mapping[str, Any], path: str | Path) -> None:
    """Success and precision plots of OPE side by side, from :meth:`Experiment.report`.

    As in OTB's plots, legends show each tracker's score in brackets and are sorted by it.
    """
    # Figure + Agg canvas directly: no pyplot, so the global matplotlib backend is untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(fig)
    ax_s, ax_p = fig.subplots(1, 2)
    panels = [
        (ax_s, "success_curve", "success_score", SUCCESS_THRESHOLDS, "Overlap threshold"),
        (ax_p, "precision_curve", "precision20", PRECISION_THRESHOLDS, "Location error threshold"),
    ]
    for ax, curve_key, score_key, x, xlabel in panels:
        ranked = sorted(report.items(), key=lambda kv: -kv[1]["overall"][score_key])
        for name, perf in ranked:
            o = perf["overall"]
            label = f"{name} [{o[score_key]:.3f}]"
            if len(perf["seeds"]) > 1:
                label = f"{name} [{o[score_key]:.3f}±{o[score_key + '_std']:.3f}]"
            ax.plot(x, o[curve_key], linewidth=2, label=label)
        ax.set_xlim(x[0], x[-1])
        ax.set_ylim(0, 1)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    ax_s.set(title="Success plots of OPE", ylabel="Success rate")
    ax_p.set(title="Precision plots of OPE", ylabel="Precision")
    ax_s.legend(loc="lower left", fontsize=8)
    ax_p.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=100)
