"""Plots of training runs (PNG, matplotlib's Agg canvas; the global backend is left alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["alignment_series", "plot_alignment", "plot_curves", "save_figure"]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to a PNG file at ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _split(history: Sequence[Mapping[str, Any]]) -> str:
    return "test" if any(h.get("test_acc") is not None for h in history) else "val"


def _mean_seconds(
    histories: Sequence[Sequence[Mapping[str, Any]]], epochs: list[int]
) -> list[float]:
    """The training seconds up to the end of each of ``epochs``, averaged over the histories."""
    totals = []
    for hist in histories:
        so_far, by_epoch = 0.0, {}
        for h in hist:
            so_far += h.get("epoch_seconds") or 0.0
            by_epoch[h["epoch"]] = so_far
        totals.append([by_epoch[e] for e in epochs])
    return [sum(col) / len(col) for col in zip(*totals)]


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]]],
    path: str | Path,
    *,
    title: str | None = None,
    x: str = "epoch",
) -> Path:
    """Accuracy and loss per epoch (evaluation split solid, training dashed), one colour per run.

    ``runs`` maps a label to a history (a list of per-epoch records as in ``metrics.jsonl``) or to
    several histories (seeds), drawn as their mean with a band of +- one standard deviation.
    ``x="seconds"`` puts the training seconds so far (the sum of ``epoch_seconds``, averaged over
    the seeds) on the horizontal axis instead of the epoch: time-to-accuracy curves.
    """
    if x not in ("epoch", "seconds"):
        raise ValueError(f"x must be 'epoch' or 'seconds', got {x!r}")
    fig = Figure(figsize=(11, 4.2))
    acc_ax, loss_ax = fig.subplots(1, 2)
    for i, (label, value) in enumerate(runs.items()):
        histories = [value] if value and isinstance(value[0], Mapping) else list(value)
        histories = [h for h in histories if h]
        if not histories:
            continue
        color = f"C{i % 10}"
        split = _split(histories[0])
        for ax, key in ((acc_ax, "acc"), (loss_ax, "loss")):
            for prefix, style in ((split, "-"), ("train", "--")):
                # epochs where every history has a value (evaluation may run every few epochs)
                values = [
                    {h["epoch"]: h.get(f"{prefix}_{key}") for h in hist} for hist in histories
                ]
                epochs = sorted(e for e in values[0] if all(v.get(e) is not None for v in values))
                if not epochs:
                    continue
                stacked = [[v[e] for v in values] for e in epochs]
                mean = [sum(col) / len(col) for col in stacked]
                width = 1.6 if style == "-" else 1.0
                name = f"{label} ({prefix})"
                xs = epochs if x == "epoch" else _mean_seconds(histories, epochs)
                ax.plot(xs, mean, style, color=color, label=name, linewidth=width)
                if len(histories) > 1:
                    std = [
                        (sum((x - m) ** 2 for x in col) / len(col)) ** 0.5
                        for col, m in zip(stacked, mean)
                    ]
                    lo = [m - d for m, d in zip(mean, std)]
                    hi = [m + d for m, d in zip(mean, std)]
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    xlabel = "epoch" if x == "epoch" else "training seconds"
    acc_ax.set_xlabel(xlabel)
    acc_ax.set_ylabel("accuracy")
    loss_ax.set_xlabel(xlabel)
    loss_ax.set_ylabel("cross-entropy")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def alignment_series(
    history: Sequence[Mapping[str, Any]],
) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per layer, the (steps, means, stds) of the alignment probes logged in a run's history."""
    series: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for record in history:
        for probe in record.get("alignment") or []:
            for name, value in probe["layers"].items():
                steps, means, stds = series.setdefault(name, ([], [], []))
                if value["mean"] is None or value["mean"] != value["mean"]:  # NaN: no samples
                    continue
                steps.append(probe["step"])
                means.append(value["mean"])
                stds.append(value["std"])
    return series


def plot_alignment(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str | None = None
) -> Path | None:
    """Gradient alignment (cosine with the true gradient) of every hidden layer over training,
    one panel per run, one line per layer with a +- std band. None if no run logged probes."""
    found = {k: alignment_series(h) for k, h in runs.items()}
    found = {k: v for k, v in found.items() if v}
    if not found:
        return None
    fig = Figure(figsize=(5.5 * len(found), 4.0))
    axes = fig.subplots(1, len(found), squeeze=False)[0]
    for ax, (label, series) in zip(axes, found.items()):
        for i, (layer, (steps, means, stds)) in enumerate(series.items()):
            color = f"C{i % 10}"
            ax.plot(steps, means, color=color, label=f"layer {layer}")
            lo = [m - s for m, s in zip(means, stds)]
            hi = [m + s for m, s in zip(means, stds)]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        ax.axhline(0, color="grey", linewidth=0.8)
        ax.set_ylim(-0.2, 1.02)
        ax.set_xlabel("step")
        ax.set_ylabel("cos(delivered, BP gradient)")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
