"""Plots of training runs (PNG, matplotlib's Agg canvas; the global backend is left alone)."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "PROBE_FIELDS",
    "alignment_series",
    "plot_alignment",
    "plot_curves",
    "plot_probes",
    "save_figure",
]


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


#: What each probe field measures (axis labels); see :class:`dfatorch.callbacks.AlignmentProbe`.
PROBE_FIELDS = {
    "mean": "cos(delivered, BP gradient)",
    "scale": "|delivered| / |BP gradient|",
    "dead": "dead units (fraction)",
    "norm": "output norm",
}
# ratios and norms span decades when a run diverges; a norm is 0 when a layer dies (symlog)
_LOG_FIELDS = {"scale": "log", "norm": "symlog"}


def alignment_series(
    history: Sequence[Mapping[str, Any]], key: str = "mean"
) -> dict[str, tuple[list[int], list[float], list[float]]]:
    """Per layer, the (steps, values, stds) of probe field ``key`` logged in a run's history
    (stds: the alignment's spread over the batch for ``mean``, zeros otherwise)."""
    series: dict[str, tuple[list[int], list[float], list[float]]] = {}
    for record in history:
        for probe in record.get("alignment") or []:
            for name, value in probe["layers"].items():
                steps, values, stds = series.setdefault(name, ([], [], []))
                v = value.get(key)
                if v is None or v != v:  # NaN: no samples; None: not logged
                    continue
                steps.append(probe["step"])
                values.append(v)
                stds.append(value["std"] if key == "mean" else 0.0)
    return {k: v for k, v in series.items() if v[0]}


def plot_probes(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    fields: Sequence[str] = tuple(PROBE_FIELDS),
    title: str | None = None,
) -> Path | None:
    """The alignment probes of every hidden layer over training: one row per probe field
    (:data:`PROBE_FIELDS`), one column per run, one line per layer (the alignment with a +- std
    band); a field that no run logged gets no row. Rows share their y-axis so that runs compare at
    a glance. None if no run has probes."""
    unknown = sorted(set(fields) - set(PROBE_FIELDS))
    if unknown:
        raise ValueError(f"unknown probe fields {unknown}; known: {sorted(PROBE_FIELDS)}")
    found = {k: {f: alignment_series(h, f) for f in fields} for k, h in runs.items()}
    found = {k: v for k, v in found.items() if any(v.values())}
    # a field no run logged (records from before it existed) gets no row
    fields = [f for f in fields if any(v[f] for v in found.values())]
    if not found:
        return None
    fig = Figure(figsize=(4.2 * len(found) + 1.0, 3.2 * len(fields)))
    grid = fig.subplots(len(fields), len(found), squeeze=False, sharex="col", sharey="row")
    for col, (label, per_field) in enumerate(found.items()):
        for row, key in enumerate(fields):
            ax = grid[row][col]
            for i, (layer, (steps, values, stds)) in enumerate(per_field[key].items()):
                color = f"C{i % 10}"
                ax.plot(steps, values, color=color, label=f"layer {layer}")
                if key == "mean":
                    lo = [m - s for m, s in zip(values, stds)]
                    hi = [m + s for m, s in zip(values, stds)]
                    ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
            if key == "mean":
                ax.axhline(0, color="grey", linewidth=0.8)
                ax.set_ylim(-0.2, 1.02)
            elif key in _LOG_FIELDS and any(per_field[key].values()):
                ax.set_yscale(_LOG_FIELDS[key], **({"linthresh": 1e-2} if key == "norm" else {}))
            if col == 0:
                ax.set_ylabel(PROBE_FIELDS[key])
            if row == 0:  # long run names (every grid axis) wrap instead of overlapping
                ax.set_title(textwrap.fill(label, 48), fontsize=9)
            if row == len(fields) - 1:
                ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        grid[0][col].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_alignment(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str | None = None
) -> Path | None:
    """Gradient alignment (cosine with the true gradient) of every hidden layer over training,
    one panel per run, one line per layer with a +- std band. None if no run logged probes."""
    return plot_probes(runs, path, fields=("mean",), title=title)
