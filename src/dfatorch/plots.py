"""Plots of training runs (PNG, matplotlib's Agg canvas; the global backend is left alone)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["plot_curves", "save_figure"]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to a PNG file at ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _split(history: Sequence[Mapping[str, Any]]) -> str:
    return "test" if any(h.get("test_acc") is not None for h in history) else "val"


def plot_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]] | Sequence[Sequence[Mapping[str, Any]]]],
    path: str | Path,
    *,
    title: str | None = None,
) -> Path:
    """Accuracy and loss per epoch (evaluation split solid, training dashed), one colour per run.

    ``runs`` maps a label to a history (a list of per-epoch records as in ``metrics.jsonl``) or to
    several histories (seeds), drawn as their mean with a band of +- one standard deviation.
    """
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
                curves = [[h.get(f"{prefix}_{key}") for h in hist] for hist in histories]
                n = min(len(c) for c in curves)
                if n == 0 or any(v is None for c in curves for v in c[:n]):
                    continue
                xs = list(range(1, n + 1))
                mean = [sum(c[j] for c in curves) / len(curves) for j in range(n)]
                name = f"{label} ({prefix})"
                ax.plot(
                    xs, mean, style, color=color, label=name, linewidth=1.6 if style == "-" else 1
                )
                if len(curves) > 1:
                    std = [
                        (sum((c[j] - mean[j]) ** 2 for c in curves) / len(curves)) ** 0.5
                        for j in range(n)
                    ]
                    lo = [m - s for m, s in zip(mean, std)]
                    hi = [m + s for m, s in zip(mean, std)]
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    acc_ax.set_xlabel("epoch")
    acc_ax.set_ylabel("accuracy")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("cross-entropy")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=7, loc="lower right")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
