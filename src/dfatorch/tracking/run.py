"""Library entry points of the tracking commands: track one sequence, compare update rules.

Both record which backbone was used (a checkpoint's path and hash, or "random, seed N") next to
every result, and warn when the conv layers are not pre-trained.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .._console import warn
from .._io import write_json
from ..engine import Rule, _enum
from .evaluate import Experiment, SequenceResult, plot_report, run_sequence
from .features import Backbone, load_backbone
from .otb import load_sequence, write_boxes
from .tracker import MDNetTracker, TrackerConfig

__all__ = [
    "evaluate_updates",
    "report_tables",
    "resolve_backbone",
    "track_sequence",
    "tracker_label",
]

BackboneSpec = str | Path | Backbone | None


def tracker_label(update: Rule | str) -> str:
    """The tracker's name for update rule ``update`` (``"mdnet-bdfa"``); a result folder name."""
    return f"mdnet-{Rule(update).value}"


def resolve_backbone(
    backbone: BackboneSpec, *, seed: int = 0, device: torch.device | str | None = None
) -> Backbone:
    """A :class:`Backbone` from a checkpoint path, an existing backbone, or ``None`` (random,
    seeded by ``seed``, with a ``warning: ...`` line on stderr from the ``"dfatorch"`` logger:
    tracking with untrained conv layers is a baseline)."""
    if isinstance(backbone, Backbone):
        return backbone
    resolved = load_backbone(backbone, seed=seed, device=device)
    if resolved.is_random:
        warn(
            "no backbone checkpoint given: the tracker's conv layers are randomly initialised "
            f"(seed {seed}), not pre-trained; pre-train them with `dfatorch train --dataset "
            "cifar10 --model track_cnn --method bp --out RUN` and pass RUN/checkpoint.pt"
        )
    return resolved


def track_sequence(
    seq_dir: str | Path,
    *,
    update: Rule | str = Rule.BDFA,
    out_dir: str | Path,
    backbone: BackboneSpec = None,
    seed: int = 0,
    frames_to_draw: Iterable[int] = (0, 10, 50, 100),
    progress: bool = True,
    config: TrackerConfig | None = None,
    backbone_seed: int | None = None,
) -> SequenceResult:
    """Track one OTB sequence folder with the MDNet-style tracker and online ``update`` rule.

    Writes to ``out_dir``: ``<seq>.txt`` (boxes in OTB format), ``<seq>.json`` (the result, the
    backbone it used, the rule, seed and configuration) and ``frames/<seq>_<frame>.png`` for the
    0-based frames ``frames_to_draw`` (ground truth green, prediction red).

    Args:
        backbone: a checkpoint path (see :func:`~dfatorch.tracking.features.load_backbone`), a
            :class:`Backbone`, or ``None`` for random conv layers (recorded and warned about).
        seed: the tracker's seed.
        backbone_seed: seed of a random backbone (default: ``seed``).
    """
    seq = load_sequence(seq_dir)
    bb = resolve_backbone(backbone, seed=seed if backbone_seed is None else backbone_seed)
    tracker = MDNetTracker(bb, update=update, config=config, seed=seed)
    out = Path(out_dir)
    result = run_sequence(
        tracker,
        seq,
        visualize_dir=out / "frames",
        visualize_frames=frames_to_draw,
        progress=progress,
    )
    result.seed = seed
    write_boxes(out / f"{seq.name}.txt", result.boxes)
    record = {
        **result.to_dict(),
        "update": tracker.rule.value,
        "online_updates": tracker.updates,
        "backbone": bb.info,
        "backbone_description": bb.describe(),
        "config": tracker.config.to_dict(),
    }
    write_json(out / f"{seq.name}.json", record)
    return result


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


#: :class:`TrackerConfig` fields added after results were first recorded, each with the value
#: that reproduces what the tracker did before the field existed (not today's default, which
#: may change): a record that lacks the field was made with that value.
_ADDED_FIELDS: dict[str, Any] = {"online_fc4": True}


def _identity(provenance: dict[str, Any]) -> dict[str, Any]:
    """``provenance`` without the backbone checkpoint's path: a checkpoint is the same backbone
    wherever it lies (its hash says which it is). A config that predates a field of
    :data:`_ADDED_FIELDS` gets the value that field's absence meant."""
    backbone = provenance.get("backbone")
    if isinstance(backbone, dict) and backbone.get("sha256"):
        backbone = {k: v for k, v in backbone.items() if k != "path"}
    config = provenance.get("config")
    if isinstance(config, dict):
        config = {**_ADDED_FIELDS, **config}
    return {**provenance, "backbone": backbone, "config": config}


def _check_provenance(out_dir: Path, provenance: dict[str, Any]) -> None:
    """Refuse to mix results of another backbone or configuration in one folder: the experiment
    resumes by skipping finished cells, which would silently combine them. Checkpoints are
    compared by hash, not by path."""
    path = out_dir / "provenance.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if _identity(saved) != _identity(provenance):
            raise ValueError(
                f"{out_dir} holds results of another backbone or tracker configuration "
                f"(see {path}); use another out_dir or delete it"
            )
    else:
        write_json(path, provenance)


def report_tables(report: dict[str, Any], names: dict[str, str]) -> list[str]:
    """Markdown tables of :meth:`Experiment.report` for the trackers ``names`` (rule -> tracker
    name): overall success, precision and speed, then per sequence."""

    def pm(d: dict[str, Any], key: str) -> str:
        std = d[key + "_std"]
        return f"{d[key]:.3f}" if std is None else f"{d[key]:.3f} ± {std:.3f}"

    lines = [
        "Overall (OTB OPE; mean ± sample std over seeds; each sequence weighs the same):",
        "",
        "| update | seeds | success (AUC) | precision@20 | fps | online update s / seq |",
        "|---|---|---|---|---|---|",
    ]
    for rule, name in names.items():
        r = report[name]
        o = r["overall"]
        upd = [s["update_seconds"] for s in r["sequences"].values() if s["update_seconds"]]
        mean_upd = f"{sum(upd) / len(upd):.2f}" if upd else "-"
        lines.append(
            f"| {rule} | {len(r['seeds'])} | {pm(o, 'success_score')} | {pm(o, 'precision20')} "
            f"| {o['fps']:.1f} | {mean_upd} |"
        )
    if "bp" in names and "bdfa" in names:
        gap = (
            report[names["bdfa"]]["overall"]["success_score"]
            - report[names["bp"]]["overall"]["success_score"]
        )
        lines += ["", f"BDFA − BP success: {gap:+.3f}"]
    lines += [
        "",
        "Per sequence (success / precision@20 / fps):",
        "",
        "| sequence | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    sequences = next(iter(report.values()))["sequences"]
    for seq in sequences:
        cells = []
        for name in names.values():
            s = report[name]["sequences"][seq]
            cells.append(f"{pm(s, 'success_score')} / {s['precision20']:.3f} / {s['fps']:.1f}")
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    return lines


def _markdown(report: dict[str, Any], backbone: Backbone, names: dict[str, str]) -> str:
    head = ["# MDNet-style tracker: online update rules", "", f"Backbone: {backbone.describe()}."]
    return "\n".join([*head, "", *report_tables(report, names)]) + "\n"


def evaluate_updates(
    root: str | Path,
    *,
    updates: Sequence[Rule | str] = ("bp", "dfa", "bdfa"),
    seeds: Iterable[int] = (0, 1, 2),
    out_dir: str | Path,
    backbone: BackboneSpec = None,
    progress: bool = True,
    config: TrackerConfig | None = None,
    sequences: Iterable[str] | None = None,
    backbone_seed: int = 0,
) -> dict[str, Any]:
    """Run every sequence under ``root`` with every update rule and seed; compare the rules.

    One backbone (random ones seeded by ``backbone_seed``) and one configuration for all runs,
    so the rules differ in the rule only. Results resume: finished (rule, sequence, seed) cells
    in ``out_dir`` are kept (a folder of another backbone or configuration is refused).

    Writes to ``out_dir``: per-run results (see :class:`~dfatorch.tracking.evaluate.Experiment`),
    ``report.md`` (tables), ``report.json`` (the report, backbone, configuration, machine) and
    ``success_precision.png`` (OTB success and precision plots).

    Returns:
        :meth:`Experiment.report`'s dict, by tracker name (``"mdnet-bp"``, ...); each entry also
        holds ``"update"`` (the rule) and ``"backbone"`` (its provenance).
    """
    out = Path(out_dir)
    # every input checked before anything is written or warned about
    experiment = Experiment(root, sequences, out_dir=out)
    names = {r.value: tracker_label(r) for r in (_enum(Rule, u, "update") for u in updates)}
    if not names:
        choices = ", ".join(r.value for r in Rule)
        raise ValueError(f"no update rule to evaluate (choose from {choices})")
    bb = resolve_backbone(backbone, seed=backbone_seed)
    cfg = config or TrackerConfig()
    _check_provenance(out, {"backbone": bb.info, "config": cfg.to_dict()})
    seeds = list(seeds)
    for rule, name in names.items():

        def factory(seed: int, rule: str = rule) -> MDNetTracker:
            return MDNetTracker(bb, update=rule, config=cfg, seed=seed)

        experiment.run(name, factory, seeds=seeds, progress=progress)
    report = experiment.report(list(names.values()))
    for rule, name in names.items():
        report[name]["update"] = rule
        report[name]["backbone"] = bb.info
    plot_report(report, out / "success_precision.png")
    (out / "report.md").write_text(_markdown(report, bb, names))
    write_json(
        out / "report.json",
        {
            "backbone": bb.info,
            "backbone_description": bb.describe(),
            "config": cfg.to_dict(),
            "machine": _machine(),
            "report": report,
        },
    )
    return report
