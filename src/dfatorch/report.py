"""``docs/RESULTS.md`` and its plots, generated from experiment results (never typed by hand)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from .experiment import Experiment, aggregate, cell_results, format_value, load_experiment, select
from .plots import plot_curves, save_figure

__all__ = ["write_report"]

NOTES = {
    "cifar10": (
        "CIFAR-10 here is the copy in `../shared/datasets/cifar10`, whose pixels were decoded "
        "from JPEG (mean absolute error about 5.8/255 against the originals): accuracies compare "
        "methods run on this copy, not digit for digit with published tables."
    ),
    "cifar100": "CIFAR-100: the exact official files.",
    "mnist": "MNIST: the exact official files.",
}


def _pm(mean: float | None, std: float | None, scale: float = 100.0) -> str:
    if mean is None:
        return "-"
    return f"{scale * mean:.2f} ± {scale * (std or 0):.2f}"


def _axes(exp: Experiment) -> list[str]:
    keys: list[str] = []
    for block in exp.grid:
        keys += [k for k in block if k != "seed" and k not in keys]
    return keys


def _table(summary: dict[str, Any], axes: list[str]) -> list[str]:
    header = ["method", *axes, "seeds", "final acc (%)", "best acc (%)", "s/epoch"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = {m: i for i, m in enumerate(dict.fromkeys(r["method"] for r in summary["rows"]))}
    rows = sorted(
        summary["rows"], key=lambda r: (*(str(r.get(a)) for a in axes), order[r["method"]])
    )
    for row in rows:
        cells = [
            row["method"],
            *(format_value(row.get(a)) for a in axes),
            str(row["seeds"]),
            _pm(row["final_acc_mean"], row["final_acc_std"]),
            _pm(row["best_acc_mean"], row["best_acc_std"]),
            "-" if row["seconds_per_epoch"] is None else f"{row['seconds_per_epoch']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _search_table(summary: dict[str, Any]) -> list[str]:
    search, chosen = summary["search"], summary["chosen"]
    if not search:
        return []
    axes = [k for k in next(iter(search.values()))[0] if k != "val_acc"]
    lines = [
        "| group | " + " | ".join(axes) + " | validation acc (%) |",
        "|---|" + "---|" * (len(axes) + 1),
    ]
    for group, points in search.items():
        for p in points:
            mark = " **(chosen)**" if chosen.get(group) == {a: p[a] for a in axes} else ""
            acc = "not run" if p["val_acc"] is None else f"{100 * p['val_acc']:.2f}"
            values = " | ".join(format_value(p[a]) for a in axes)
            lines.append(f"| {group} | {values} | {acc}{mark} |")
    return lines


def _curves(exp: Experiment, results_dir: Path, figures: Path, axes: list[str]) -> list[Path]:
    """One accuracy/loss plot per grid point (without seed), methods overlaid, seeds as a band."""
    chosen, _ = select(exp, results_dir)
    groups: dict[str, dict[str, list[list[dict[str, Any]]]]] = defaultdict(dict)
    for cell in exp.cells(chosen or None):
        history = cell_results(results_dir, cell)
        if history is None:
            continue
        point = ", ".join(f"{a}={format_value(cell.labels.get(a))}" for a in axes) or "all"
        groups[point].setdefault(cell.labels["method"], []).append(history)
    paths = []
    for point, runs in sorted(groups.items()):
        slug = point.replace(", ", "_").replace("=", "") or "all"
        path = figures / f"{exp.name}-curves-{slug}.png"
        plot_curves(runs, path, title=f"{exp.name}: {point}")
        paths.append(path)
    return paths


def _fraction_plot(summary: dict[str, Any], path: Path) -> Path | None:
    rows = [r for r in summary["rows"] if r.get("fraction") is not None and r["final_acc_mean"]]
    fractions = sorted({r["fraction"] for r in rows})
    if len(fractions) < 2:
        return None
    fig = Figure(figsize=(6, 4.2))
    ax = fig.subplots()
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    for i, (method, rs) in enumerate(by_method.items()):
        rs = sorted(rs, key=lambda r: r["fraction"])
        xs = [r["fraction"] for r in rs]
        ys = [100 * r["final_acc_mean"] for r in rs]
        es = [100 * (r["final_acc_std"] or 0) for r in rs]
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, color=f"C{i}", label=method)
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("final test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(summary["name"])
    return save_figure(fig, path)


def write_report(
    experiment_files: Sequence[str | Path],
    *,
    results_root: str | Path = "experiments/results",
    out: str | Path = "docs/RESULTS.md",
    preamble: str = "",
) -> Path:
    """Aggregate every experiment's results and write the Markdown report with its plots."""
    out = Path(out)
    figures = out.parent / "figures"
    lines = [
        "# Results",
        "",
        "Generated by `dfatorch report` from the run records in `experiments/results/`; do not "
        "edit by hand. Each section names its experiment file and the command that reruns it "
        "(finished cells are skipped, so the command resumes an interrupted sweep).",
        "",
    ]
    if preamble:
        lines += [preamble, ""]
    for file in experiment_files:
        exp = load_experiment(file)
        results_dir = Path(results_root) / exp.name
        summary = aggregate(exp, results_dir)
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        axes = _axes(exp)
        lines += [f"## {exp.name}", ""]
        if exp.description:
            lines += [exp.description.strip(), ""]
        dataset = exp.base.get("dataset", "")
        if dataset in NOTES:
            lines += [NOTES[dataset], ""]
        lines += [
            f"Experiment file: `{exp.path}`. Rerun: `dfatorch experiment {exp.path}` then "
            f"`dfatorch report`.",
            "",
            "Machine: " + ("; ".join(summary["machines"]) or "-") + ".",
            "",
        ]
        if summary["cells_missing"]:
            lines += [f"**{summary['cells_missing']} cells have not run yet.**", ""]
        lines += [*_table(summary, axes), ""]
        search = _search_table(summary)
        if search:
            lines += ["Search on the validation split (one seed):", "", *search, ""]
        fraction_png = _fraction_plot(summary, figures / f"{exp.name}-fraction.png")
        if fraction_png is not None:
            link = fraction_png.relative_to(out.parent)
            lines += [f"![accuracy against training-set fraction]({link})", ""]
        for png in _curves(exp, results_dir, figures, axes):
            lines += [f"![{png.stem}]({png.relative_to(out.parent)})", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    return out
