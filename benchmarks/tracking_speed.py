"""Frames per second of the MDNet-style tracker per sequence and update rule; print JSON.

    python benchmarks/tracking_speed.py [--backbone RUN/checkpoint.pt] [--rules bp dfa bdfa]
        [--presets default realtime] [--sequences Biker MotorRolling] [--frames N]
        [--repeats 1] [--threads T] [--out FILE]

For every sequence (image size reported: OTB's 640x360 ones are the real-time target), rule and
tracker preset (:data:`~dfatorch.tracking.tracker.TRACKER_PRESETS`; ``realtime`` fixes fc4
after the first frame), the tracker runs the sequence as in OTB's one-pass evaluation; cells are
interleaved so that drift of a shared machine hits all alike, and a short warm-up run comes first.
A cell is named by its rule, and the preset in brackets unless it is ``default``. Reported per
cell (the median over ``--repeats``):

- ``fps``: frames / (init + every update), online model updates included, image decoding not;
- ``fps_tracking_only``: the same without the online update time (what the rest costs);
- ``update_seconds`` (total), ``updates`` (count) and ``ms_per_update``: online updates only;
- ``init_seconds``: the first frame (feature map of the whole image, first training, regressor);
- ``success_auc``: so that a speed-up that breaks tracking shows;
- ``ms_per_frame``: the tracker's time per frame (first frame included) split into the phases of
  :data:`~dfatorch.tracking.tracker.PHASES` (backbone ``features``, box ``sampling``,
  ``roi_pool``, candidate ``scoring``, ``bbreg``, first-frame ``init_train``, online ``update``,
  ``store_fc4``: fc4 of the stored training samples with a fixed fc4)
  and ``other`` (the rest: bookkeeping, Python).

The summary gives each cell's fps, its mean success over the sequences (one seed: a check that
tracking still works, not an accuracy measurement) and, over the 640x360 sequences, the phases in
ms per frame and as shares of the time. ``torch.set_num_threads`` is only called with
``--threads``; the thread count used and the machine's load average (before and after: a shared
machine slows every number) are reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import command, emit

from dfatorch.tracking import list_sequences, load_sequence, run_sequence
from dfatorch.tracking.features import load_backbone
from dfatorch.tracking.tracker import PHASES, TRACKER_PRESETS, MDNetTracker, TrackerConfig

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "otb"


def _name(rule: str, preset: str) -> str:
    return rule if preset == "default" else f"{rule} ({preset})"


def _cell(backbone, rule: str, preset: str, seq, seed: int) -> dict[str, Any]:
    config = TrackerConfig.preset(preset)
    tracker = MDNetTracker(backbone, update=rule, config=config, seed=seed)
    result = run_sequence(tracker, seq)
    update = float(tracker.update_seconds)
    phases = {k: 1000 * v / result.frames for k, v in tracker.timings.seconds.items()}
    phases["other"] = 1000 * result.track_seconds / result.frames - sum(phases.values())
    return {
        "fps": result.fps,
        "fps_tracking_only": result.frames / max(result.track_seconds - update, 1e-12),
        "update_seconds": update,
        "updates": tracker.updates,
        "ms_per_update": 1000 * update / tracker.updates if tracker.updates else None,
        "init_seconds": result.init_seconds,
        "track_seconds": result.track_seconds,
        "success_auc": result.success_auc,
        "ms_per_frame": phases,
    }


def _median(cells: list[dict[str, Any]]) -> dict[str, Any]:
    """Key by key median of the repeats (nested dicts key by key)."""
    out: dict[str, Any] = {}
    for key in cells[0]:
        if isinstance(cells[0][key], dict):
            out[key] = _median([c[key] for c in cells])
            continue
        values = [c[key] for c in cells if c[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def _phases(results: dict[str, Any], names: list[str], rule: str) -> dict[str, Any]:
    """ms per frame of each phase over the sequences ``names`` (frame-weighted) and shares."""
    frames = sum(results[n]["frames"] for n in names)
    ms = {
        phase: sum(results[n][rule]["ms_per_frame"][phase] * results[n]["frames"] for n in names)
        / frames
        for phase in (*PHASES, "other")
    }
    total = sum(ms.values())
    return {"ms_per_frame": ms, "share": {k: v / total for k, v in ms.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="OTB sequences folder")
    parser.add_argument("--sequences", nargs="*", default=None, help="default: all under root")
    parser.add_argument("--rules", nargs="*", default=["bp", "dfa", "bdfa"])
    parser.add_argument(
        "--presets", nargs="*", default=["default", "realtime"], choices=TRACKER_PRESETS
    )
    parser.add_argument("--backbone", default=None, help="track_cnn checkpoint (default: random)")
    parser.add_argument("--frames", type=int, default=0, help="first N frames only (0: all)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(T)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    backbone = load_backbone(args.backbone, seed=0)
    names = args.sequences or list_sequences(args.root)
    sequences = []
    for name in names:
        seq = load_sequence(args.root / name)
        if args.frames:
            seq.frames, seq.boxes = seq.frames[: args.frames], seq.boxes[: args.frames]
        sequences.append(seq)

    warm = load_sequence(args.root / names[0])
    warm.frames, warm.boxes = warm.frames[:12], warm.boxes[:12]
    presets, rules = list(dict.fromkeys(args.presets)), list(dict.fromkeys(args.rules))
    cells = [(rule, preset) for preset in presets for rule in rules]
    names = [_name(*cell) for cell in cells]
    for rule, preset in cells:  # warm-up: first-call costs (kernels, allocator) out of timings
        _cell(backbone, rule, preset, warm, args.seed)

    started = time.perf_counter()
    results: dict[str, Any] = {}
    for seq in sequences:
        h, w = seq.load_frame(0).shape[:2]
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
        for _ in range(args.repeats):
            for rule, preset in cells:
                runs[_name(rule, preset)].append(_cell(backbone, rule, preset, seq, args.seed))
        results[seq.name] = {
            "image_size": [w, h],
            "frames": len(seq),
            "target_size": [float(v) for v in seq.boxes[0, 2:]],
            **{rule: _median(cells) for rule, cells in runs.items()},
        }

    wide = [n for n, r in results.items() if r["image_size"] == [640, 360]]
    summary = {}
    for rule in names:
        frames = sum(r["frames"] for r in results.values())
        seconds = sum(r[rule]["track_seconds"] for r in results.values())
        wide_frames = sum(results[n]["frames"] for n in wide)
        wide_seconds = sum(results[n][rule]["track_seconds"] for n in wide)
        summary[rule] = {
            "fps_all": frames / seconds,
            "fps_640x360": wide_frames / wide_seconds if wide else None,
            "min_fps_640x360": min((results[n][rule]["fps"] for n in wide), default=None),
            "phases_640x360": _phases(results, wide, rule) if wide else None,
            "success_auc_mean": statistics.mean(r[rule]["success_auc"] for r in results.values()),
        }
    defaults = TrackerConfig().to_dict()
    report = {
        "command": command(__file__, argv),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15min": {"before": load_before, "after": os.getloadavg()},
        },
        "backbone": backbone.info,
        "config": defaults,
        "presets": {
            p: {k: v for k, v in TrackerConfig.preset(p).to_dict().items() if v != defaults[k]}
            for p in presets
        },
        "seconds": time.perf_counter() - started,
        "summary": summary,
        "sequences": results,
    }
    emit(report, args.out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
