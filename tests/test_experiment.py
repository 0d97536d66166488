"""The experiment runner (search, resumable cells, aggregation) and the generated report."""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from dfatorch.cli import main
from dfatorch.experiment import aggregate, load_experiment, run_experiment, select
from dfatorch.train import read_metrics

SPEC = """
name = "tiny"
description = "a test sweep"

[base]
dataset = "digits"
model = "mlp"
width = 0.05
epochs = 2
batch_size = 64

[[methods]]
label = "bp"
method = "bp"

[[methods]]
label = "bdfa"
method = "bdfa"
storage = "packed"

[[grid]]
fraction = [0.5]
seed = [0, 1]

[tune]
lr = [1e-4, 3e-3]
by = ["fraction"]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory) -> tuple[Path, Path, Path]:
    """The tiny sweep, run once through the command line: (file, runs root, results root)."""
    root = tmp_path_factory.mktemp("sweep")
    path = root / "tiny.toml"
    path.write_text(SPEC)
    runs, results = root / "runs", root / "results"
    roots = ["--runs-root", str(runs), "--results-root", str(results)]
    assert main(["experiment", str(path), *roots, "--no-progress"]) == 0
    return path, runs, results


def test_sweep_search_resume_and_aggregate(swept):
    exp_file, runs, results = swept
    exp = load_experiment(exp_file)
    assert [c.key for c in exp.tuning_cells()] == [
        "tune/bp/fraction=0.5/lr=0.0001",
        "tune/bp/fraction=0.5/lr=0.003",
        "tune/bdfa/fraction=0.5/lr=0.0001",
        "tune/bdfa/fraction=0.5/lr=0.003",
    ]
    assert all(c.config.val_fraction == 0.1 and not c.config.eval_test for c in exp.tuning_cells())
    assert exp.cells({}) == []  # nothing measured before the search is done
    quiet = dict(runs_root=runs, results_root=results, progress=False, log=lambda _: None)
    summary = run_experiment(exp, **quiet)  # all done by the fixture: aggregates only

    chosen, search = select(exp, results / "tiny")
    for group, points in search.items():
        best = max(points, key=lambda p: p["val_acc"])
        assert chosen[group] == {"lr": best["lr"]}
    cells = exp.cells(chosen)
    assert len(cells) == 4 and all(c.config.lr == chosen[f"{c.labels['method']}/fraction=0.5"]["lr"]
                                   for c in cells)  # fmt: skip
    # the aggregate is the mean and sample std of the cells' own final accuracies
    for row in summary["rows"]:
        finals = [
            read_metrics(results / "tiny" / f"{row['method']}/fraction=0.5/seed={s}")[-1][
                "test_acc"
            ]
            for s in (0, 1)
        ]
        assert row["final_acc_mean"] == pytest.approx(statistics.fmean(finals))
        assert row["final_acc_std"] == pytest.approx(statistics.stdev(finals))
        assert row["seeds"] == 2
    assert summary["cells_missing"] == 0

    # finished cells are never run again; a lost cell is the only one rerun
    stamp = {c.key: (results / "tiny" / c.key / "metrics.jsonl").stat().st_mtime_ns for c in cells}
    lost = cells[1].key
    (results / "tiny" / lost / "metrics.jsonl").unlink()
    run_experiment(exp, **quiet)
    for c in cells:
        changed = (results / "tiny" / c.key / "metrics.jsonl").stat().st_mtime_ns != stamp[c.key]
        assert changed == (c.key == lost)
    assert aggregate(exp, results / "tiny")["rows"] == summary["rows"]

    # a changed configuration invalidates a cell's old result
    exp.base["epochs"] = 3
    chosen, _ = select(exp, results / "tiny")
    assert chosen == {}  # the search must be redone with the new budget


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_parallel_workers_skip_a_cell_another_worker_holds(swept):
    """A cell locked by another worker is left to it, never trained twice at once; once the lock
    is released (as when that worker dies), the next run takes the cell."""
    import dataclasses
    import fcntl
    from functools import partial

    from dfatorch.experiment import cell_status

    exp_file, runs, results = swept
    exp = load_experiment(exp_file)
    cell = exp.cells(select(exp, results / "tiny")[0])[2]
    status = partial(cell_status, runs / "tiny", results / "tiny")
    assert status(cell) == "done"
    shutil.rmtree(results / "tiny" / cell.key)  # as if unfinished
    assert status(cell) == "started"  # its checkpoint is there
    other = dataclasses.replace(cell, config=dataclasses.replace(cell.config, lr=0.5))
    assert status(other) == "pending"  # neither a result nor a checkpoint of this configuration
    lines: list[str] = []
    quiet = dict(runs_root=runs, results_root=results, progress=False, log=lines.append)
    with open(runs / "tiny" / f"{cell.key}.lock", "a") as other_worker:
        fcntl.flock(other_worker, fcntl.LOCK_EX)
        assert status(cell) == "running"
        summary = run_experiment(exp, **quiet)
        assert summary["cells_missing"] == 1
        assert not (results / "tiny" / cell.key).exists()
        assert lines == [f"[tiny] cell 1/1: {cell.key} (another worker's)"]
    lines.clear()
    assert run_experiment(exp, **quiet)["cells_missing"] == 0
    assert lines == [f"[tiny] cell 1/1: {cell.key}"]


def test_cli_experiment_report_and_align(swept, tmp_path, capsys):
    exp_file, runs, results = swept
    roots = ["--runs-root", str(runs), "--results-root", str(results)]
    assert main(["experiment", str(exp_file), "--list", *roots]) == 0
    *lines, total = capsys.readouterr().out.splitlines()
    listed = dict(line.split() for line in lines)  # each cell with where it stands
    assert listed["bdfa/fraction=0.5/seed=1"] == listed["tune/bp/fraction=0.5/lr=0.003"] == "done"
    assert total == f"tiny: {len(listed)} cells: {len(listed)} done"
    # a tracker comparison written by track-eval is included with its backbone record
    tracking = results / "tracking"
    (tracking / "backbone").mkdir(parents=True, exist_ok=True)
    from dfatorch._io import write_json
    from dfatorch.tracking.evaluate import SequenceResult

    gt = [[10.0, 10.0, 20.0, 20.0]] * 3
    record = SequenceResult.from_boxes("Seq", "mdnet-bdfa", gt, gt, track_seconds=1.0).to_dict()
    write_json(tracking / "mdnet-bdfa" / "seed0" / "Seq.json", record)
    run0 = results / "tiny" / "bp" / "fraction=0.5" / "seed=0"
    for name in ("config.json", "metrics.jsonl"):
        (tracking / "backbone" / name).write_text((run0 / name).read_text())
    out = tmp_path / "docs" / "RESULTS.md"
    assert main(["report", str(exp_file), "--results-root", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "## Online tracking: `tracking`" in text
    assert "| bdfa | 1 | 0.952 | 1.000 | 3.0 | - |" in text  # 20 of 21 overlap thresholds
    assert "Backbone: `track_cnn` pre-trained by `bp` on `digits` for 2 epochs" in text
    assert "## tiny" in text and "| bdfa | 0.5 | 2 |" in text and "**(chosen" in text
    for link in [
        line[line.index("(") + 1 : -1] for line in text.splitlines() if line.startswith("![")
    ]:
        assert (out.parent / link).stat().st_size > 5_000
    summary = json.loads((results / "tiny" / "summary.json").read_text())
    assert {r["method"] for r in summary["rows"]} == {"bp", "bdfa"}

    run_dir = runs / "tiny" / "bdfa" / "fraction=0.5" / "seed=0"
    assert main(["align", str(run_dir), "--batch-size", "64"]) == 0
    report = json.loads((run_dir / "alignment.json").read_text())
    assert [a["name"] for a in report] == ["1", "3"] and report[0]["rule"] == "bdfa"
    assert -1 <= report[0]["mean"] <= 1 and report[0]["samples"] == 64


def test_bad_experiment_files_fail_early(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[[methods]]\nlabel = "a"\nmethod = "bp"\n[base]\nepochz = 3\n')
    with pytest.raises(ValueError, match="epochz"):
        load_experiment(bad)
    bad.write_text('name = "x"\n[[methods]]\nmethod = "bp"\n')
    with pytest.raises(ValueError, match="label"):
        load_experiment(bad)
    bad.write_text('name = "x"\ndiagnostics = "false"\n[[methods]]\nlabel = "a"\nmethod = "bp"\n')
    with pytest.raises(ValueError, match="diagnostics must be true or false"):
        load_experiment(bad)


def test_one_seed_reports_no_spread():
    """One seed has no standard deviation: shown without ±, and no standard error is invented for a
    difference involving it; a reference with no finished run gives no difference at all."""
    from dfatorch._stats import mean_std
    from dfatorch.report import _pm, _versus_table

    assert mean_std([0.5]) == (0.5, None) and mean_std([]) == (None, None)
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (n - 1); population would be 0.816
    assert _pm(0.5, None) == "50.00" and _pm(0.5, 0.01) == "50.00 ± 1.00"

    def row(method, x, finals, bests):
        runs = [{"final_acc": f, "best_acc": b} for f, b in zip(finals, bests)]
        return {"method": method, "x": x, "seeds": len(finals), "runs": runs}

    rows = [
        row("bp", 1, [0.5], [0.6]),
        row("dfa", 1, [0.37, 0.4, 0.43], [0.45, 0.45, 0.45]),
        row("bp", 2, [0.48, 0.52], [0.5, 0.5]),
        row("dfa", 2, [0.53, 0.57], [0.58, 0.62]),
        row("bp", 3, [], []),
        row("dfa", 3, [0.3], [0.3]),
    ]
    lines = _versus_table({"rows": rows}, ["x"])
    # x=2, final: diff 5, Welch se = sqrt(2.83^2/2 + 2.83^2/2) = 2.83 on df = 2 (equal spreads):
    # t_{0.975, 2} = 4.303, half-width 10.54; best: bp has no spread, so df = 1 and t = 12.706
    from scipy import stats

    half = stats.t.ppf(0.975, 2) * (8.0 / 2 + 8.0 / 2) ** 0.5
    best_half = stats.t.ppf(0.975, 1) * (8.0 / 2) ** 0.5
    assert lines[2:] == [
        "| dfa | 1 | -10.00 | -15.00 |",  # one bp seed: no interval is invented
        f"| dfa | 2 | +5.00 [{5 - half:+.2f}, {5 + half:+.2f}] (Welch) "
        f"| +10.00 [{10 - best_half:+.2f}, {10 + best_half:+.2f}] (Welch) |",
    ]
    # runs under seeds pair: the interval comes from the per-seed differences (+2, +4)
    rows[3]["runs"] = [{"final_acc": f, "best_acc": 0.6} for f in (0.50, 0.56)]
    for r in rows:
        for seed, run in enumerate(r["runs"]):
            run["seed"] = seed
    lines = _versus_table({"rows": rows}, ["x"])
    paired = stats.ttest_rel([50.0, 56.0], [48.0, 52.0]).confidence_interval()
    assert lines[3].startswith(f"| dfa | 2 | +3.00 [{paired.low:+.2f}, {paired.high:+.2f}] |")
    rows[3]["runs"][1]["seed"] = 7  # the seeds no longer match: Welch's, and said so
    assert _versus_table({"rows": rows}, ["x"])[3].startswith("| dfa | 2 | +3.00 [")
    assert _versus_table({"rows": rows}, ["x"])[3].split(" | ")[2].endswith("] (Welch)")


def test_report_tables_order_numbers_numerically_and_handle_no_axis():
    from dfatorch.report import _table, _versus_table

    def row(method, b, final):
        return {"method": method, "b": b, "seeds": 1, "final_acc_mean": final,
                "final_acc_std": None, "best_acc_mean": final, "best_acc_std": None,
                "runs": [{"final_acc": final, "best_acc": final}]}  # fmt: skip

    rows = [row(m, b, 0.5) for b in (10, 2, 100, 1) for m in ("dfa", "bp")]
    body = _table({"rows": rows}, ["b"])[2:]
    assert [line.split(" | ")[:2] for line in body] == [
        [f"| {m}", str(b)] for b in (1, 2, 10, 100) for m in ("dfa", "bp")
    ]
    no_axis = [row("bp", None, 0.5), row("dfa", None, 0.4)]
    assert _versus_table({"rows": no_axis}, []) == [
        "| method | final acc − bp | best acc − bp |",
        "|---|---|---|",
        "| dfa | -10.00 | -10.00 |",
    ]


def test_a_grid_block_applies_to_the_methods_it_names(tmp_path):
    path = tmp_path / "dp.toml"
    path.write_text(
        'name = "dp"\n[base]\ndataset = "digits"\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        '[[methods]]\nlabel = "dp-sgd"\nmethod = "bp"\nprivate = true\n'
        '[[grid]]\nmethods = ["bp"]\nseed = [0, 1]\n'
        '[[grid]]\nmethods = ["dp-sgd"]\ntarget_epsilon = [1.0, 8.0]\nseed = [0]\n'
        "[tune]\nlr = [0.1, 0.3]\ntarget_epsilon = 3.0\n"
    )
    exp = load_experiment(path)
    assert exp.axes == ["seed", "target_epsilon"]
    keys = [c.key for c in exp.cells({"bp": {"lr": 0.1}, "dp-sgd": {"lr": 0.3}})]
    assert keys == ["bp/seed=0", "bp/seed=1", "dp-sgd/target_epsilon=1.0/seed=0",
                    "dp-sgd/target_epsilon=8.0/seed=0"]  # fmt: skip
    tuning = [c.key for c in exp.tuning_cells()]
    assert tuning == [
        "tune/bp/lr=0.1",
        "tune/bp/lr=0.3",
        "tune/dp-sgd/lr=0.1",
        "tune/dp-sgd/lr=0.3",
    ]
    path.write_text(path.read_text().replace('methods = ["bp"]', 'methods = ["bq"]'))
    with pytest.raises(ValueError, match=r"names unknown methods \['bq'\]"):
        load_experiment(path)


def test_each_plotted_point_is_one_configuration(tmp_path):
    """An accuracy-against-gain plot must not pool runs that differ in another grid axis (the
    optimiser here): one series per optimiser, and each point holds one run per seed."""
    from dfatorch.report import axis_series

    path = tmp_path / "gain.toml"
    path.write_text(
        'name = "gain"\n[base]\ndataset = "digits"\nmodel = "mlp"\nwidth = 0.05\nepochs = 1\n'
        '[[methods]]\nlabel = "bdfa"\nmethod = "bdfa"\n'
        '[[grid]]\noptimizer = ["sgd", "adam"]\ngain = [0.5, 1.0, 2.0]\nseed = [0]\n'
    )
    exp = load_experiment(path)
    quiet = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "results", progress=False,
                 log=lambda _: None)  # fmt: skip
    run_experiment(exp, **quiet)
    acc, _, level = axis_series(exp, tmp_path / "results" / "gain", "gain")
    assert sorted(acc) == ["bdfa (optimizer=adam)", "bdfa (optimizer=sgd)"] and not level
    for series in acc.values():
        assert sorted(series) == [0.5, 1.0, 2.0]
        assert all(len(runs) == 1 for runs in series.values())


def test_cells_waiting_for_their_search_count_as_missing(tmp_path):
    from dfatorch.experiment import aggregate

    path = tmp_path / "t.toml"
    path.write_text(
        'name = "t"\n[base]\ndataset = "digits"\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        "[[grid]]\nseed = [0, 1, 2]\n[tune]\nlr = [0.1, 0.3]\n"
    )
    summary = aggregate(load_experiment(path), tmp_path / "results")
    assert summary["cells_missing"] == 3 and summary["rows"] == []


def test_time_to_accuracy_counts_training_seconds_to_the_first_epoch_at_the_target(tmp_path):
    from dfatorch.plots import _mean_seconds
    from dfatorch.report import time_to_accuracy

    history = [
        {"epoch": 1, "epoch_seconds": 10.0, "test_acc": 0.30},
        {"epoch": 2, "epoch_seconds": 12.0, "test_acc": None},  # not evaluated this epoch
        {"epoch": 3, "epoch_seconds": 11.0, "test_acc": 0.52},
        {"epoch": 4, "epoch_seconds": 9.0, "test_acc": 0.49},
        {"epoch": 5, "epoch_seconds": 10.0, "test_acc": 0.56},
    ]
    assert time_to_accuracy(history, 0.5) == (3, 33.0)
    assert time_to_accuracy(history, 0.3) == (1, 10.0)
    assert time_to_accuracy(history, 0.55) == (5, 52.0)
    assert time_to_accuracy(history, 0.6) is None
    shifted = [dict(h, epoch_seconds=h["epoch_seconds"] + 2) for h in history]
    assert _mean_seconds([history, shifted], [1, 3]) == [11.0, 36.0]
    path = tmp_path / "t.toml"
    path.write_text('name = "t"\ntargets = [50]\n[[methods]]\nlabel = "bp"\nmethod = "bp"\n')
    with pytest.raises(ValueError, match=r"targets are test accuracies in \(0, 1\]"):
        load_experiment(path)


@pytest.mark.skipif(sys.platform == "win32", reason="no flock on Windows")
def test_a_worker_waits_for_a_search_another_worker_runs_then_shares_its_cells(swept):
    """A worker that finishes its share while another worker still runs a search waits for it
    and then trains that group's measured cells, instead of leaving them to the other worker."""
    import fcntl
    import threading

    from dfatorch.experiment import _run_cell

    exp_file, runs, results = swept
    exp = load_experiment(exp_file)
    search = exp.tuning_cells()[3]  # tune/bdfa/.../lr=0.003
    for cell in exp.cells(select(exp, results / "tiny")[0]):
        if cell.labels["method"] == "bdfa":
            shutil.rmtree(results / "tiny" / cell.key)
    shutil.rmtree(results / "tiny" / search.key)
    held, release = threading.Event(), threading.Event()

    def other_worker() -> None:
        with open(runs / "tiny" / f"{search.key}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held.set()
            release.wait(30)
            _run_cell(search, runs / "tiny", results / "tiny", progress=False)

    thread = threading.Thread(target=other_worker)
    thread.start()
    held.wait(30)
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if "waiting" in line:
            release.set()  # the other worker finishes its search only once we wait for it

    summary = run_experiment(exp, runs_root=runs, results_root=results, progress=False, log=log,
                             poll_seconds=0.05)  # fmt: skip
    thread.join()
    assert summary["cells_missing"] == 0
    assert lines[:2] == [
        f"[tiny] search 1/1: {search.key} (another worker's)",
        "[tiny] waiting for another worker's search",
    ]
    assert [line.split(": ")[1] for line in lines[2:]] == [
        "bdfa/fraction=0.5/seed=0",
        "bdfa/fraction=0.5/seed=1",
    ]


def test_an_experiment_may_declare_its_processes(tmp_path):
    path = tmp_path / "t.toml"
    body = '\n[base]\ndataset = "digits"\n[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
    path.write_text('name = "t"\nnproc = 2' + body)
    assert load_experiment(path).nproc == 2
    path.write_text('name = "t"' + body)
    assert load_experiment(path).nproc == 1
    path.write_text('name = "t"\nnproc = 0' + body)
    with pytest.raises(ValueError, match="nproc must be a positive integer"):
        load_experiment(path)


def test_a_choice_on_the_grid_edge_is_flagged():
    from dfatorch.report import _search_table, search_edges

    search = {
        "a": [{"lr": lr, "val_acc": acc} for lr, acc in ((0.1, 0.5), (0.3, 0.6), (1.0, 0.7))],
        "b": [{"lr": lr, "val_acc": acc} for lr, acc in ((0.1, 0.5), (0.3, 0.8), (1.0, 0.7))],
        "c": [{"lr": lr, "val_acc": acc} for lr, acc in ((0.1, 0.9), (0.3, 0.8), (1.0, 0.7))],
    }
    summary = {"search": search, "chosen": {"a": {"lr": 1.0}, "b": {"lr": 0.3}, "c": {"lr": 0.1}}}
    assert search_edges(summary) == {"a": ["lr"], "c": ["lr"]}
    lines = _search_table(summary)
    assert sum("**(chosen, on the grid's edge)**" in line for line in lines) == 2
    assert "| b | 0.3 | 80.00 **(chosen)** |" in lines
    assert lines[-1].startswith("2 of 3 groups chose a value on the edge")
    single = {"search": {"a": search["a"][:1]}, "chosen": {"a": {"lr": 0.1}}}
    assert search_edges(single) == {}  # one value: nothing was searched


DIVERGING = (
    SPEC.split("[[methods]]")[0].replace("tiny", "hot")
    + """[[methods]]
label = "bp"
method = "bp"

[[methods]]
label = "bp-hot"
method = "bp"
lr = 1e4

[[grid]]
seed = [0, 1]
methods = ["bp-hot"]

[[grid]]
seed = [0]
methods = ["bp"]
"""
)


def test_a_diverged_cell_is_a_result_not_a_crash(tmp_path):
    """A diverged search point loses its search; a diverged measured cell is counted, kept out
    of the means, and never run again."""
    from dfatorch.experiment import cell_diverged
    from dfatorch.report import _search_table, _table

    spec = SPEC.replace("lr = [1e-4, 3e-3]", "lr = [3e-3, 1e4]").replace(
        'name = "tiny"', 'name = "t"'
    )
    path = tmp_path / "t.toml"
    path.write_text(spec)
    exp = load_experiment(path)
    quiet = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "res", progress=False)
    logged: list[str] = []
    summary = run_experiment(exp, **quiet, log=logged.append)
    hot = [c for c in exp.tuning_cells() if c.config.lr == 1e4]
    assert hot and all(cell_diverged(tmp_path / "res" / "t", c) for c in hot)
    assert any("diverged" in line for line in logged)
    assert all(v == {"lr": 3e-3} for v in summary["chosen"].values())
    assert all(bool(p.get("diverged")) == (p["lr"] == 1e4) for ps in summary["search"].values()
               for p in ps)  # fmt: skip
    assert summary["cells_missing"] == 0 and all(r["seeds"] == 2 for r in summary["rows"])
    table = "\n".join(_search_table(summary))
    assert "| 10000 | diverged |" in table
    # a value below a diverged one is not on the grid's edge: the larger value was tried
    from dfatorch.report import search_edges

    points = [{"lr": 0.01, "val_acc": 0.2}, {"lr": 0.1, "val_acc": 0.3}]
    points.append({"lr": 0.3, "val_acc": None, "diverged": True})
    below = {"chosen": {"g": {"lr": 0.1}}, "search": {"g": points}}
    assert search_edges(below) == {}

    path2 = tmp_path / "hot.toml"
    path2.write_text(DIVERGING)
    exp2 = load_experiment(path2)
    summary2 = run_experiment(exp2, **quiet, log=lambda _: None)
    rows = {r["method"]: r for r in summary2["rows"]}
    assert rows["bp-hot"]["seeds"] == 0 and rows["bp-hot"]["diverged"] == 2
    assert sorted(rows["bp-hot"]["diverged_seeds"]) == [0, 1] and rows["bp"]["diverged_seeds"] == []
    assert rows["bp-hot"]["final_acc_mean"] is None and rows["bp"]["seeds"] == 1
    assert summary2["cells_missing"] == 0
    assert "| bp-hot | 0 (+2 diverged) | - | - |" in "\n".join(_table(summary2, []))
    from dfatorch.claims import Claim, Evidence, evaluate

    claim = Claim("(x)", "s", "t", "above", 0.0, (Evidence("hot", "bp-hot", "bp"),), "")
    assert evaluate(claim, {"hot": summary2})[0].verdict == "every seed diverged"
    ran: list[str] = []
    run_experiment(exp2, **quiet, log=ran.append)  # done: nothing runs again
    assert not [line for line in ran if "cell" in line]


def test_a_search_whose_every_value_diverged_is_reported_not_missing(tmp_path, capsys):
    from dfatorch.claims import Claim, Evidence, evaluate
    from dfatorch.report import write_report

    spec = SPEC.replace("lr = [1e-4, 3e-3]", "lr = [1e4, 3e4]").replace("tiny", "cold")
    path = tmp_path / "cold.toml"
    path.write_text(spec)
    exp = load_experiment(path)
    quiet = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "res", progress=False)
    summary = run_experiment(exp, **quiet, log=lambda _: None)
    assert summary["chosen"] == {} and summary["rows"] == []
    assert sorted(summary["search_diverged"]) == ["bdfa/fraction=0.5", "bp/fraction=0.5"]
    assert summary["cells_missing"] == 0
    out = write_report(
        [path], results_root=tmp_path / "res", benchmarks=tmp_path, out=tmp_path / "R.md"
    )
    text = out.read_text()
    assert "every searched value diverged, so its cells did not run" in text
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "res")]
    assert main(["experiment", str(path), "--list", *roots]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "cold: 4 cells: 4 diverged"  # finished
    assert "cells have not run yet" not in text
    claim = Claim("(x)", "s", "t", "above", 0.0, (Evidence("cold", "bdfa", "bp"),), "")
    assert evaluate(claim, {"cold": summary})[0].verdict == "every searched value diverged"


def test_a_data_parallel_cell_that_diverges_is_recorded(tmp_path, monkeypatch):
    """``dfatorch train`` exits 3 when training diverged; the launcher passes that code on."""
    import dfatorch.distributed
    from dfatorch.experiment import cell_diverged

    monkeypatch.setattr(dfatorch.distributed, "launch", lambda argv, nproc: 3)
    spec = SPEC.replace('[tune]\nlr = [1e-4, 3e-3]\nby = ["fraction"]\n', "").replace("tiny", "dp")
    path = tmp_path / "dp.toml"
    path.write_text(spec)
    exp = load_experiment(path)
    quiet = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "res", progress=False)
    summary = run_experiment(exp, **quiet, log=lambda _: None, nproc=2)
    assert all(cell_diverged(tmp_path / "res" / "dp", c) for c in exp.cells())
    assert all(r["seeds"] == 0 and r["diverged"] == 2 for r in summary["rows"])


def test_ctrl_c_in_the_last_evaluation_keeps_the_cell_and_stops_the_sweep(tmp_path, monkeypatch):
    """A Ctrl-C that arrives while a cell's last epoch is evaluated lets the cell finish (its
    results are written) and still stops the sweep before the next cell."""
    import math
    import os
    import signal

    import torch.nn.functional as F

    from dfatorch.data import load_dataset
    from dfatorch.train import EVAL_BATCH_SIZE

    spec = SPEC.replace('[tune]\nlr = [1e-4, 3e-3]\nby = ["fraction"]\n', "").replace(
        'name = "tiny"', 'name = "late"'
    )
    path = tmp_path / "late.toml"
    path.write_text(spec)
    exp = load_experiment(path)
    first, second = exp.cells()[:2]
    real, evaluations = F.cross_entropy, {"n": 0}
    per_pass = math.ceil(len(load_dataset("digits").test.labels) / EVAL_BATCH_SIZE)

    def interrupting(logits, target, *args, **kwargs):
        if kwargs.get("reduction") == "sum":  # evaluation passes sum the loss
            evaluations["n"] += 1
            if evaluations["n"] == per_pass + 1:  # the first batch of the last epoch's evaluation
                os.kill(os.getpid(), signal.SIGINT)
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupting)
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "res"),
             "--no-progress"]  # fmt: skip
    assert main(["experiment", str(path), *roots]) == 130
    res = tmp_path / "res" / "late"
    assert len(read_metrics(res / first.key)) == 2  # finished and recorded
    assert not (tmp_path / "runs" / "late" / second.key).exists()


def test_an_interrupted_data_parallel_cell_stops_the_sweep(tmp_path, monkeypatch):
    """The launcher passes on ``dfatorch train``'s 130 (Ctrl-C): the sweep stops there."""
    import dfatorch.distributed

    launched: list[list[str]] = []
    monkeypatch.setattr(dfatorch.distributed, "launch",
                        lambda argv, nproc: launched.append(argv) or 130)  # fmt: skip
    spec = SPEC.replace('[tune]\nlr = [1e-4, 3e-3]\nby = ["fraction"]\n', "").replace("tiny", "dq")
    path = tmp_path / "dq.toml"
    path.write_text(spec)
    quiet = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "res", progress=False)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_experiment(path), **quiet, log=lambda _: None, nproc=2)
    assert len(launched) == 1 and not (tmp_path / "res" / "dq").exists()

    def finishes_then_reports_the_ctrl_c(argv, nproc):  # the run ends, a Ctrl-C came meanwhile
        from dfatorch.train import train

        train(None, argv[argv.index("--resume") + 1], resume=True, progress=False)
        launched.append(argv)
        return 130

    monkeypatch.setattr(dfatorch.distributed, "launch", finishes_then_reports_the_ctrl_c)
    exp = load_experiment(path)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, **quiet, log=lambda _: None, nproc=2)
    assert len(launched) == 2  # the sweep stopped after that cell, whose results are kept
    assert len(read_metrics(tmp_path / "res" / "dq" / exp.cells()[0].key)) == 2


def test_memory_format_section_tabulates_the_benchmark(tmp_path):
    from dfatorch.report import _memory_format_section

    timing = {"ms_contiguous": 150.0, "ms_channels_last": 100.0, "ratio_channels_last": 0.667}
    config = {"rounds": 15, "warmup": 2, "batch_size": 64, "eval_batch_size": 128}
    load = {"before": [2.5, 2, 2], "after": [2, 2, 2]}
    machine = {"processor": "cpu", "threads": 1, "torch": "2", "load_average_1_5_15min": load}
    rule = {"step": timing, "eval": {**timing, "ratio_channels_last": 1.1}}
    data = {
        "command": "python benchmarks/memory_format.py",
        "config": {**config, "eval_images": 256},
        "machine": machine,
        "models": {"small_cnn_bn": {"bp": rule}},
    }
    path = tmp_path / "memory_format.json"
    path.write_text(json.dumps(data))
    text = "\n".join(_memory_format_section(path))
    assert "| small_cnn_bn | bp | 150.0 | 0.67 | 150.0 | 1.10 |" in text
    assert "load average 2.5 before" in text and "256 images in batches of 128" in text
    assert _memory_format_section(tmp_path / "missing.json") == []


def test_peer_accuracy_table_gives_welchs_interval_of_the_difference(tmp_path):
    from dfatorch._stats import welch
    from dfatorch.report import _peer_accuracy_section

    theirs, ours = [0.40, 0.42, 0.47], [0.45, 0.44, 0.46]
    data = {
        "command": "python benchmarks/biotorch_peer.py --train",
        "biotorch": {"version": "0.0.16"},
        "model": "resnet20 (its own activation), scope=all",
        "accuracy": {
            "budget_from": "experiments/fa_family.toml",
            "budget_overridden": {},
            "by_rule": {
                "fa": {
                    "lr": 0.03,
                    "biotorch_final_acc_mean": statistics.mean(theirs),
                    "biotorch_final_acc_std": statistics.stdev(theirs),
                    "biotorch_seeds": 3,
                    "dfatorch_final_acc_mean": statistics.mean(ours),
                    "dfatorch_final_acc_std": statistics.stdev(ours),
                    "dfatorch_seeds": 3,
                    "biotorch_final_acc_runs": theirs,
                    "dfatorch_final_acc_runs": ours,
                }
            },
        },
    }
    path = tmp_path / "biotorch_peer_train.json"
    path.write_text(json.dumps(data))
    text = "\n".join(_peer_accuracy_section(path))
    d = welch(theirs, ours)
    assert text.startswith("## Peer: biotorch 0.0.16 trained on the same budget: `resnet20`")
    assert "swapped into `resnet20` (its own activation, every hidden layer" in text
    assert (
        f"| fa | 0.03 | 43.00 ± 3.61 (3) | 45.00 ± 1.00 (3) | {100 * d.diff:+.2f} | "
        f"[{100 * d.low:+.2f}, {100 * d.high:+.2f}] |"
    ) in text
    assert _peer_accuracy_section(tmp_path / "missing.json") == []
    assert "Out of date" not in text
    # biotorch's runs of a rule that diverged at this rate: said, not dropped
    data["accuracy"]["by_rule"]["usf"] = {
        **dict.fromkeys(("biotorch_final_acc_mean", "biotorch_final_acc_std"), None),
        "lr": 0.1, "biotorch_seeds": 0, "biotorch_diverged": 3,
        "dfatorch_final_acc_mean": 0.5, "dfatorch_final_acc_std": 0.01, "dfatorch_seeds": 3,
        "biotorch_final_acc_runs": [], "dfatorch_final_acc_runs": [0.49, 0.5, 0.51],
    }  # fmt: skip
    path.write_text(json.dumps(data))
    usf = [line for line in _peer_accuracy_section(path) if line.startswith("| usf |")]
    assert usf == ["| usf | 0.1 | - (0; 3 diverged) | 50.00 ± 1.00 (3) | - | - |"]
    # the experiment's search has since moved fa's rate: the rows are flagged, not silently kept
    same = {"fa-family": {"file": "experiments/fa_family.toml", "chosen": {"fa": {"lr": 0.03}}}}
    assert "Out of date" not in "\n".join(_peer_accuracy_section(path, same))
    other = {"file": "experiments/kfac.toml", "chosen": {"fa": {"lr": 0.3}}}  # not the budget
    assert "Out of date" not in "\n".join(_peer_accuracy_section(path, {**same, "kfac": other}))
    moved = {"fa-family": {"file": "experiments/fa_family.toml", "chosen": {"fa": {"lr": 0.1}}}}
    moved["kfac"] = other
    lines = _peer_accuracy_section(path, moved)
    flag = next(i for i, line in enumerate(lines) if line.startswith("**Out of date**"))
    assert "(fa 0.1)" in lines[flag] and lines[flag - 1] == lines[flag + 1] == ""
    assert lines[flag + 2].startswith("| rule |")


def test_probe_fields_are_tabulated_and_plotted_from_the_records(tmp_path):
    """``diagnostics = true``: the report tabulates each probe field per layer as the mean over
    the last epoch's probes and seeds (recomputed here from the records) and draws the probes."""
    from dfatorch.experiment import cell_results, select
    from dfatorch.report import write_report

    path = tmp_path / "probed.toml"
    path.write_text(
        'name = "probed"\ndiagnostics = true\n'
        '[base]\ndataset = "digits"\nmodel = "mlp"\nwidth = 0.05\nepochs = 2\nbatch_size = 64\n'
        'activation = "relu"\nalign_every = 5\n'
        '[[methods]]\nlabel = "dfa"\nmethod = "dfa"\nscope = "all"\n'
        "[[grid]]\nseed = [0, 1]\n"
    )
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "res")]
    assert main(["experiment", str(path), *roots, "--no-progress"]) == 0
    out = write_report(
        [path], results_root=tmp_path / "res", benchmarks=tmp_path, out=tmp_path / "docs" / "R.md"
    )
    text = out.read_text()
    exp = load_experiment(path)
    histories = [
        cell_results(tmp_path / "res" / "probed", c)
        for c in exp.cells(select(exp, tmp_path / "res" / "probed")[0] or None)
    ]
    for key, title in (("dead", "Final dead units"), ("scale", "Final signal scale")):
        per_seed = []
        for history in histories:
            probes = history[-1]["alignment"]
            per_seed.append(sum(p["layers"]["1"][key] for p in probes) / len(probes))
        table = text[text.index(title) :].split("\n\n")[1].splitlines()
        assert table[0] == "| method | layer 1 | layer 3 |"
        want = format(sum(per_seed) / 2, ".3f" if key == "dead" else ".3g")
        assert table[2].startswith(f"| dfa | {want} |"), (key, table[2], want)
    assert "![probed-probes-1](figures/probed-probes-1.png)" in text
    assert (out.parent / "figures" / "probed-probes-1.png").stat().st_size > 5_000


def test_list_before_anything_ran_says_which_searches_are_open(tmp_path, capsys):
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "res")]
    assert main(["experiment", str(path), "--list", *roots]) == 0
    *lines, total = capsys.readouterr().out.splitlines()
    assert all(line.split()[1] == "pending" for line in lines) and len(lines) == 4
    assert total == ("tiny: 4 cells: 4 pending; 2 searches unfinished, their measured cells (and "
                     "checks) not listed yet")  # fmt: skip
    assert not (tmp_path / "runs").exists()  # listing creates nothing


def test_ctrl_c_stops_the_sweep_and_the_same_command_resumes_it(tmp_path, monkeypatch, capsys):
    """Ctrl-C in a cell stops the whole sweep (exit 130) with the cell's checkpoint saved and no
    result written for it; rerunning finishes it with the records of an uninterrupted sweep."""
    import os
    import signal

    import torch.nn.functional as F

    spec = SPEC.replace('[tune]\nlr = [1e-4, 3e-3]\nby = ["fraction"]\n', "").replace(
        'name = "tiny"', 'name = "stop"'
    )
    path = tmp_path / "stop.toml"
    path.write_text(spec)
    exp = load_experiment(path)
    first, second = exp.cells()[:2]

    def roots(name):
        return ["--runs-root", str(tmp_path / name / "runs"),
                "--results-root", str(tmp_path / name / "res"), "--no-progress"]  # fmt: skip

    assert main(["experiment", str(path), *roots("whole")]) == 0
    real, calls = F.cross_entropy, {"n": 0}

    def interrupting(logits, target, *args, **kwargs):
        if not args and not kwargs:  # a training step (evaluation sums)
            calls["n"] += 1
            if calls["n"] == 15:  # in the first cell's second epoch (12 steps an epoch)
                os.kill(os.getpid(), signal.SIGINT)
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", interrupting)
    assert main(["experiment", str(path), *roots("split")]) == 130
    assert "stopped; the same command resumes" in capsys.readouterr().out
    monkeypatch.setattr(F, "cross_entropy", real)
    runs, res = tmp_path / "split" / "runs" / "stop", tmp_path / "split" / "res" / "stop"
    assert (runs / first.key / "checkpoint.pt").exists()
    assert not (runs / second.key).exists() and not (res / first.key).exists()
    assert main(["experiment", str(path), *roots("split")]) == 0
    timing = {"epoch_seconds", "images_per_second"}
    for cell in exp.cells():
        whole = read_metrics(tmp_path / "whole" / "res" / "stop" / cell.key)
        split = read_metrics(res / cell.key)
        assert [{k: v for k, v in h.items() if k not in timing} for h in split] == [
            {k: v for k, v in h.items() if k not in timing} for h in whole
        ]


def test_a_finished_cell_counts_when_only_a_neutral_field_changes(tmp_path):
    """Device, memory layout and data folder do not change what a cell computes: turning on
    channels-last after a sweep ran reruns nothing; changing the learning rate reruns."""
    spec = SPEC.replace('[tune]\nlr = [1e-4, 3e-3]\nby = ["fraction"]\n', "").replace(
        'name = "tiny"', 'name = "same"'
    )
    quiet = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "res", progress=False)
    path = tmp_path / "same.toml"
    path.write_text(spec)
    run_experiment(load_experiment(path), **quiet, log=lambda _: None)
    for change, reruns in (('device = "cpu"\nchannels_last = true\n', False),
                           ("lr = 0.002\n", True)):  # fmt: skip
        path.write_text(spec.replace("[base]\n", "[base]\n" + change))
        ran: list[str] = []
        run_experiment(load_experiment(path), **quiet, log=ran.append)
        assert any("cell" in line for line in ran) == reruns, change
    # with compressed activations the layout decides which ops are fused: it is not neutral
    from dfatorch.experiment import _comparable
    from dfatorch.train import TrainConfig

    for bits, same in ((32, True), (8, False)):
        a, b = (TrainConfig(activation_bits=bits, channels_last=c).to_dict() for c in (0, 1))
        assert (_comparable(a) == _comparable(b)) == same, bits


def test_private_runs_clipping_is_tabulated_from_the_records(tmp_path):
    """The report's clipping table: per method and epsilon, the mean over seeds of the first and
    last epoch's clipped share and of the last epoch's mean update norm (recomputed here)."""
    from dfatorch.experiment import cell_results, select
    from dfatorch.report import write_report

    path = tmp_path / "dp.toml"
    path.write_text(
        'name = "dp"\n[base]\ndataset = "digits"\nmodel = "mlp"\nwidth = 0.05\nepochs = 2\n'
        'batch_size = 64\nprivate = true\ndelta = 1e-4\nclip = 5.0\noptimizer = "sgd"\n'
        '[[methods]]\nlabel = "dp-dfa"\nmethod = "dfa"\nscope = "all"\n'
        "[[grid]]\ntarget_epsilon = [2.0, 8.0]\nseed = [0, 1]\n"
    )
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "res")]
    assert main(["experiment", str(path), *roots, "--no-progress"]) == 0
    text = write_report(
        [path], results_root=tmp_path / "res", benchmarks=tmp_path, out=tmp_path / "R.md"
    ).read_text()
    exp = load_experiment(path)
    table = text[text.index("Clipping (per-example") :].split("\n\n")[1].splitlines()
    assert table[0] == (
        "| method | target_epsilon | clipped, first epoch (%) | clipped, last epoch (%) "
        "| mean update norm, last epoch |"
    )
    for eps, line in zip((2.0, 8.0), table[2:]):
        runs = [cell_results(tmp_path / "res" / "dp", c) for c in exp.cells(select(exp,
                tmp_path / "res" / "dp")[0] or None) if c.config.target_epsilon == eps]  # fmt: skip
        first = sum(h[0]["clipped_fraction"] for h in runs) / 2
        last = sum(h[-1]["clipped_fraction"] for h in runs) / 2
        norm = sum(h[-1]["update_norm_mean"] for h in runs) / 2
        assert 0 < last < first < 1 and norm > 0  # the clip splits the examples
        assert line == (f"| dp-dfa | {eps:g} | {100 * first:.1f} (2) | {100 * last:.1f} (2) | "
                        f"{norm:.3g} (2) |")  # fmt: skip


def test_each_search_stage_is_followed_by_its_measured_cells(tmp_path):
    """Searches run one `by` value at a time, in grid order, each followed by its measured cells,
    so a sweep ordered cheapest first has its cheap results first; `val_size` in [tune] validates
    the search on examples outside the training subset."""
    path = tmp_path / "staged.toml"
    path.write_text(
        'name = "staged"\n[base]\ndataset = "digits"\nmodel = "mlp"\nwidth = 0.05\nepochs = 1\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        '[[methods]]\nlabel = "dfa"\nmethod = "dfa"\n'
        "[[grid]]\nfraction = [0.5, 0.2]\nseed = [0]\n"
        '[tune]\nlr = [1e-3, 3e-3]\nval_size = 100\nby = ["fraction"]\n'
    )
    exp = load_experiment(path)
    stages = exp.tuning_stages()
    assert [[c.key for c in s] for s in stages] == [
        [f"tune/{m}/fraction={f}/lr={lr}" for m in ("bp", "dfa") for lr in (0.001, 0.003)]
        for f in (0.5, 0.2)
    ]
    assert all(c.config.val_size == 100 and c.config.val_fraction == 0 for s in stages for c in s)
    # a method that only some grid blocks name is searched in those stages only
    limited = path.read_text().replace("seed = [0]\n", 'seed = [0]\nmethods = ["bp"]\n')
    limited += '[[grid]]\nfraction = [0.2]\nseed = [0]\nmethods = ["dfa"]\n'
    (tmp_path / "limited.toml").write_text(limited)
    shown = [[c.key.split("/lr=")[0] for c in s][::2]
             for s in load_experiment(tmp_path / "limited.toml").tuning_stages()]  # fmt: skip
    assert shown == [["tune/bp/fraction=0.5"], ["tune/bp/fraction=0.2", "tune/dfa/fraction=0.2"]]
    both = path.read_text().replace("val_size = 100", "val_size = 100\nval_fraction = 0.1")
    (tmp_path / "both.toml").write_text(both)
    with pytest.raises(ValueError, match="val_size or val_fraction, not both"):
        load_experiment(tmp_path / "both.toml")
    lines: list[str] = []
    run_experiment(exp, runs_root=tmp_path / "runs", results_root=tmp_path / "results",
                   progress=False, log=lines.append)  # fmt: skip
    order = [line.split(": ")[1].split("/fraction=")[0] + line.split("fraction=")[1][:3]
             for line in lines if ": " in line]  # fmt: skip
    assert order == ["tune/bp0.5"] * 2 + ["tune/dfa0.5"] * 2 + ["bp0.5", "dfa0.5"] + [
        "tune/bp0.2"
    ] * 2 + ["tune/dfa0.2"] * 2 + ["bp0.2", "dfa0.2"]
    measured = exp.cells(select(exp, tmp_path / "results" / "staged")[0])
    assert len(measured) == 4 and all(c.config.val_size == 0 for c in measured)
    # every search done and the measured cells all offered at once (a restart): cheapest first,
    # by the stage of their search, not method by method
    for method in ("bp", "dfa"):
        shutil.rmtree(tmp_path / "results" / "staged" / method)
    again: list[str] = []
    run_experiment(exp, runs_root=tmp_path / "runs2", results_root=tmp_path / "results",
                   progress=False, log=again.append)  # fmt: skip
    assert [line.split(": ")[1] for line in again] == [
        "bp/fraction=0.5/seed=0", "dfa/fraction=0.5/seed=0",
        "bp/fraction=0.2/seed=0", "dfa/fraction=0.2/seed=0",
    ]  # fmt: skip


def test_plateau_rise_is_the_gain_over_the_last_third():
    from dfatorch.report import plateau_rise

    history = [
        {"epoch": e, "val_acc": v} for e, v in ((10, 0.3), (20, 0.5), (25, None), (30, 0.52))
    ]
    assert plateau_rise(history) == (20, pytest.approx(0.02))  # 20 <= 2/3 * 30 < 30
    history[1]["epoch"] = 21  # past two thirds: the evaluation before it counts
    assert plateau_rise(history) == (10, pytest.approx(0.22))
    assert plateau_rise(history[-1:]) is None and plateau_rise([]) is None
    assert plateau_rise([{"epoch": 3, "val_acc": None}]) is None


def test_chosen_table_reports_the_chosen_runs_own_plateau(swept):
    from dfatorch.report import PLATEAU_POINTS, _chosen_table, plateau_rise

    exp_file, _, results = swept
    exp = load_experiment(exp_file)
    summary = aggregate(exp, results / "tiny")
    lines = _chosen_table(exp, results / "tiny", summary)
    assert len(lines) == 2 + len(summary["chosen"]) == 4
    for line in lines[2:]:
        group = line.split(" | ")[0][2:]
        lr = summary["chosen"][group]["lr"]
        method = group.split("/")[0]
        history = read_metrics(results / "tiny" / f"tune/{method}/fraction=0.5/lr={lr}")
        epoch, rise = plateau_rise(history)
        assert f"lr={lr:g}" in line and f"{100 * rise:+.2f} (since epoch {epoch})" in line
        assert f"{100 * history[-1]['val_acc']:.2f}" in line
        assert line.endswith("| yes |" if 100 * rise < PLATEAU_POINTS else "| **no** |")


def test_a_95_interval_of_the_mean_and_axes_set_by_another_axis(tmp_path):
    from scipy import stats

    from dfatorch.report import _tied, mean_interval

    finals = [0.50, 0.52, 0.47, 0.55, 0.51]
    runs = [{"final_acc": a} for a in finals] + [{"final_acc": None}]  # one without a final
    std = statistics.stdev(finals)
    assert mean_interval({"seeds": 6, "final_acc_std": std, "runs": runs}) == pytest.approx(
        stats.t.ppf(0.975, 4) * std / 5**0.5
    )
    assert mean_interval({"seeds": 1, "final_acc_std": None, "runs": runs[:1]}) == 0.0
    path = tmp_path / "t.toml"
    path.write_text(
        'name = "t"\n[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        "[[grid]]\nfraction = [0.01]\nepochs = [100]\nlr = [0.1, 0.3]\nseed = [0, 1]\n"
        "[[grid]]\nfraction = [0.1, 0.2]\nepochs = [30]\nlr = [0.1, 0.3]\nseed = [0, 1]\n"
    )
    exp = load_experiment(path)
    # epochs is set by the fraction; lr and seed vary within a fraction
    assert [a for a in exp.axes if _tied(exp, a)] == ["epochs"]


def test_shards_split_the_search_by_place_in_the_whole_sweep(tmp_path):
    """`--shard i/n` gives cell k of the whole sweep to shard k mod n, whatever stage offers it:
    two shards run disjoint halves of the search that together cover it."""
    path = tmp_path / "tiny.toml"
    spec = SPEC.replace("fraction = [0.5]", 'fraction = [0.5, 0.3]\nmethods = ["bp"]')
    path.write_text(spec.replace("lr = [1e-4, 3e-3]", "lr = [1e-4, 1e-3, 3e-3]"))
    exp = load_experiment(path)
    assert [len(stage) for stage in exp.tuning_stages()] == [
        3,
        3,
    ]  # odd: a stage-wise count differs
    done = []
    for i in (0, 1):
        results = tmp_path / f"results{i}"
        run_experiment(exp, runs_root=tmp_path / f"runs{i}", results_root=results,
                       shard=(i, 2), progress=False, log=lambda _: None)  # fmt: skip
        done.append({c.key for c in exp.tuning_cells() if (results / "tiny" / c.key).exists()})
    keys = [c.key for c in exp.tuning_cells()]
    assert done[0] == set(keys[0::2]) and done[1] == set(keys[1::2])


def test_a_worker_told_which_methods_runs_only_their_cells(tmp_path, capsys):
    """`--methods bdfa` runs bdfa's search and measured cells and nothing of bp's; a later
    worker without it runs the rest; an unknown label is a one-line error before any run."""
    path = tmp_path / "tiny.toml"
    path.write_text(SPEC)
    roots = ["--runs-root", str(tmp_path / "runs"), "--results-root", str(tmp_path / "results")]
    assert main(["experiment", str(path), *roots, "--no-progress", "--methods", "bdfa"]) == 0
    exp = load_experiment(path)
    results = tmp_path / "results" / "tiny"
    chosen, _ = select(exp, results)
    assert list(chosen) == ["bdfa/fraction=0.5"]
    everything = exp.tuning_cells() + exp.cells({"bp/fraction=0.5": {"lr": 1e-4}, **chosen})
    ran = {c.key for c in everything if (results / c.key / "metrics.jsonl").exists()}
    assert ran == {c.key for c in everything if c.labels["method"] == "bdfa"} and len(ran) == 4
    assert aggregate(exp, results)["cells_missing"] == 2  # bp's measured cells, not yet run
    capsys.readouterr()
    assert main(["experiment", str(path), *roots, "--list", "--methods", "bp"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed[:-1]] == [
        "tune/bp/fraction=0.5/lr=0.0001",
        "tune/bp/fraction=0.5/lr=0.003",
    ]
    assert listed[-1].startswith("tiny: 2 cells: 2 pending; 1 searches unfinished")
    assert main(["experiment", str(path), *roots, "--list", "--methods", "bdfa"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "tiny: 4 cells: 4 done"  # not bp's search
    if sys.platform != "win32":  # no flock on Windows
        import fcntl

        # another worker holds bp's search: a worker told to run bdfa does not wait for it
        def log(line: str) -> None:
            assert "waiting" not in line, line

        lock_path = tmp_path / "runs" / "tiny" / f"{exp.tuning_cells()[0].key}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            where = dict(runs_root=tmp_path / "runs", results_root=results.parent)
            run_experiment(exp, **where, progress=False, log=log, poll_seconds=0.01,
                           methods=["bdfa"])  # fmt: skip
    assert main(["experiment", str(path), *roots, "--no-progress"]) == 0
    assert aggregate(exp, results)["cells_missing"] == 0
    capsys.readouterr()
    assert main(["experiment", str(path), *roots, "--methods", "bp,dfa"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("tiny: no method labelled 'dfa' (the file has bp, bdfa)")
    assert main(["experiment", str(path), "--methods", ","]) == 2
    assert "--methods wants labels" in capsys.readouterr().err


def test_the_report_names_the_stages_with_no_finished_run(tmp_path):
    from dfatorch.report import _stages_not_run

    path = tmp_path / "t.toml"
    path.write_text(
        'name = "t"\n[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        "[[grid]]\nfraction = [0.1, 0.2, 0.4]\nseed = [0, 1]\n"
        '[tune]\nlr = [0.1, 0.3]\nby = ["fraction"]\n'
    )
    exp = load_experiment(path)
    rows = [{"method": "bp", "fraction": f, "seeds": n} for f, n in ((0.1, 2), (0.2, 0))]
    assert _stages_not_run(exp, {"rows": rows}) == ["fraction=0.2", "fraction=0.4"]


def test_the_convergence_check_reruns_each_chosen_point_on_a_fresh_seed_1x_and_fx(tmp_path):
    """`[tune] check_longer = F` trains each chosen point twice more on seed (search seed + 1),
    for the search's epochs and F times as many, everything else as searched, after its group's
    measured cells; the summary, the chosen-point table and the missing counts report them."""
    from dfatorch.experiment import _convergence
    from dfatorch.report import CONVERGED_POINTS, _chosen_table, _convergence_columns

    path = tmp_path / "tiny.toml"
    path.write_text(SPEC.replace('by = ["fraction"]', 'by = ["fraction"]\ncheck_longer = 3'))
    exp = load_experiment(path)
    # before anything ran: two check runs wait for each of the two groups' choice
    assert aggregate(exp, tmp_path / "nothing")["checks_missing"] == 4
    lines: list[str] = []
    run = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "results", progress=False)
    run_experiment(exp, **run, log=lines.append)
    results = tmp_path / "results" / "tiny"
    chosen, _ = select(exp, results)
    checks = exp.convergence_cells(chosen)
    assert [c.key for c in checks] == [
        f"check/{m}/fraction=0.5/lr={chosen[f'{m}/fraction=0.5']['lr']}/length={n}"
        for m in ("bp", "bdfa")
        for n in (1, 3)
    ]
    # offered after the measured cells of their group, once
    kinds = [line.split("] ")[1].split(" ")[0] for line in lines]
    assert kinds == ["search"] * 4 + ["cell"] * 4 + ["check"] * 4
    searched = {c.key: c for c in exp.tuning_cells()}
    summary = aggregate(exp, results)
    assert summary["checks_missing"] == 0
    finals = {}
    for cell in checks:
        own = searched["tune/" + cell.key.split("/", 1)[1].rsplit("/", 1)[0]].config.to_dict()
        length = cell.labels["length"]
        config = json.loads((results / cell.key / "config.json").read_text())["config"]
        assert config == {**own, "seed": 101, "epochs": length * 2} and own["seed"] == 100
        history = read_metrics(results / cell.key)
        assert history[-1]["epoch"] == 2 * length and history[-1]["test_acc"] is None
        finals[cell.key] = history[-1]["val_acc"]
    for group in chosen:
        short, long = (finals[f"check/{group}/lr={chosen[group]['lr']}/length={n}"] for n in (1, 3))
        want = {"method": group.split("/")[0], "at": {"fraction": 0.5}, "search": group,
                "seed": 101, "epochs": [2, 6], "val_acc": [short, long],
                "diverged": [False] * 2}  # fmt: skip
        assert summary["convergence"][group] == want
    table = _chosen_table(exp, results, summary)
    assert table[0].endswith("| gain (points) | converged |")
    for row in table[2:]:
        group = row.split(" | ")[0][2:]
        short, long = (finals[f"check/{group}/lr={chosen[group]['lr']}/length={n}"] for n in (1, 3))
        gain = 100 * (long - short)
        verdict = "yes" if gain < CONVERGED_POINTS else "**no**"
        assert row.endswith(
            f"| 2 → {100 * short:.2f}, 6 → {100 * long:.2f} | {gain:+.2f} | {verdict} |"
        ), row
    check = {"epochs": [2, 6], "val_acc": [0.47, 0.5], "diverged": [False, False]}
    assert _convergence_columns(check) == " 2 → 47.00, 6 → 50.00 | +3.00 | **no** |"
    assert _convergence_columns({**check, "val_acc": [0.49, 0.5]}).endswith("| +1.00 | yes |")
    assert _convergence_columns({**check, "val_acc": [0.51, 0.5]}).endswith("| -1.00 | yes |")
    assert _convergence_columns({**check, "val_acc": [0.47, None]}) == (
        " 2 → 47.00, 6 → not run | - | - |"
    )
    assert (
        _convergence_columns({**check, "val_acc": [0.47, None], "diverged": [False, True]})
        == " 2 → 47.00, 6 → diverged | - | undetermined (diverged) |"
    )
    assert _convergence_columns(None) == " not run | - | - |"
    # the search's metric decides which accuracy a check reports: give every check run an early
    # peak above its final accuracy, which "best" must report and "final" must not
    for cell in checks:
        history = read_metrics(results / cell.key)
        history[0]["val_acc"] = 0.999
        text = "".join(json.dumps(r) + "\n" for r in history)
        (results / cell.key / "metrics.jsonl").write_text(text)
    best = load_experiment(path)
    best.tune = {**best.tune, "metric": "best"}
    assert all(c["val_acc"] == [0.999] * 2 for c in _convergence(best, results, chosen).values())
    assert _convergence(exp, results, chosen) == summary["convergence"]
    # done checks never run again; missing ones are counted, and shards split them
    again: list[str] = []
    run_experiment(exp, **run, log=again.append)
    assert not [line for line in again if "check" in line or "cell" in line]
    for cell in checks:
        shutil.rmtree(results / cell.key)
    assert aggregate(exp, results)["checks_missing"] == 4
    shard: list[str] = []
    run_experiment(exp, **run, shard=(0, 2), log=shard.append)
    ran = [line.split(": ")[1] for line in shard if "] check" in line]
    # one run of each group, one short and one long: two shards share the long runs
    assert len(ran) == 2 and ran[0].split("/")[1] != ran[1].split("/")[1]
    assert sorted(key.rsplit("=", 1)[1] for key in ran) == ["1", "3"]
    assert aggregate(exp, results)["checks_missing"] == 2
    for bad, message in [
        ("check_longer = 1", "check_longer is an integer factor >= 2"),
        ("check_longer = 2.5", "check_longer is an integer factor >= 2"),
        ("check_longer = true", "check_longer is an integer factor >= 2"),
        ("check_longer = 2\nepochs = 1", "drop one of them"),
    ]:
        path.write_text(SPEC.replace('by = ["fraction"]', f'by = ["fraction"]\n{bad}'))
        with pytest.raises(ValueError, match=message):
            load_experiment(path)


def test_peer_sections_come_per_model_checks_before_accuracy(tmp_path):
    """One biotorch section per JSON file, grouped by model: ``biotorch_peer[_MODEL].json``
    (gradients, step time) then ``biotorch_peer_train[_MODEL].json`` (accuracy), each headed by
    its model."""
    from dfatorch.report import _speed_section

    machine = {"processor": "cpu", "threads": 1, "torch": "2"}
    config = {"batch_size": 128, "rounds": 7, "warmup": 2, "threads": 1}
    for suffix, model in (("", "small_cnn (tanh)"), ("_resnet20", "resnet20 (its own activation)")):
        check = {"command": "c", "machine": machine, "config": config,
                 "biotorch": {"version": "0.0.16"}, "model": f"{model}, scope=all",
                 "gradient_check": {"fa": {"biotorch_init": "xavier", "agree": True,
                                           "max_rel_diff": 0.0, "must_agree": True}}}  # fmt: skip
        train = {"command": "t", "biotorch": {"version": "0.0.16"},
                 "model": f"{model}, scope=all",
                 "accuracy": {"budget_from": "x.toml", "by_rule": {}}}  # fmt: skip
        (tmp_path / f"biotorch_peer{suffix}.json").write_text(json.dumps(check))
        (tmp_path / f"biotorch_peer_train{suffix}.json").write_text(json.dumps(train))
    heads = [line for line in _speed_section(tmp_path) if line.startswith("## Peer")]
    assert heads == [
        "## Peer: biotorch 0.0.16 on the same model: `small_cnn`",
        "## Peer: biotorch 0.0.16 trained on the same budget: `small_cnn`",
        "## Peer: biotorch 0.0.16 on the same model: `resnet20`",
        "## Peer: biotorch 0.0.16 trained on the same budget: `resnet20`",
    ]


def _row(method, acc, **labels):
    """A summary row of two seeds at ``acc`` ± 0.01 (the fraction-plot tests)."""
    runs = [{"final_acc": acc - 0.01}, {"final_acc": acc + 0.01}]
    return {"method": method, **labels, "final_acc_mean": acc, "seeds": 2, "runs": runs}


def test_the_fraction_plot_borrows_the_named_points_of_another_experiment(tmp_path):
    """``extra_fraction_points`` adds another experiment's rows at ``at`` (methods matched by
    label, at the fraction their runs trained on), marked as borrowed; a loose ``at``, one that
    names no grid point and a clash with the plot's own point are refused."""
    from dfatorch.report import (
        FractionPoint,
        _borrowed_caption,
        _fraction_plot,
        fraction_series,
        mean_interval,
    )

    (tmp_path / "small.toml").write_text(
        'name = "small"\nextra_fraction_points = [\n'
        '  { experiment = "full", at = { dataset = "cifar10", epochs = 30 } },\n]\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n[[methods]]\nlabel = "bdfa"\nmethod = "bdfa"\n'
        "[[grid]]\nfraction = [0.01, 0.1]\nseed = [0, 1]\n"
    )
    (tmp_path / "full.toml").write_text(
        'name = "full"\n[base]\nfraction = 0.5\nepochs = 30\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        '[[methods]]\nlabel = "bdfa"\nmethod = "bdfa"\nfraction = 0.4\n'  # its own fraction
        '[[methods]]\nlabel = "dfa"\nmethod = "dfa"\n'
        '[[grid]]\ndataset = ["cifar10", "cifar100"]\nseed = [0, 1]\n'
        '[[grid]]\nmethods = ["bp"]\ndataset = ["cifar10"]\nepochs = [60]\nseed = [0, 1]\n'
    )
    small, full = load_experiment(tmp_path / "small.toml"), load_experiment(tmp_path / "full.toml")
    summaries = {
        "small": {"name": "small", "rows": [_row("bp", 0.40, fraction=0.01),
                                            _row("bp", 0.60, fraction=0.1),
                                            {**_row("bdfa", 0.0, fraction=0.1),
                                             "final_acc_mean": None},  # every seed diverged
                                            _row("bdfa", 0.30, fraction=0.01)]},
        "full": {"name": "full", "rows": [_row("bp", 0.80, dataset="cifar10", epochs=30),
                                          _row("bp", 0.82, dataset="cifar10", epochs=60),
                                          _row("bp", 0.50, dataset="cifar100", epochs=30),
                                          _row("bdfa", 0.70, dataset="cifar10", epochs=30),
                                          _row("dfa", 0.70, dataset="cifar10", epochs=30)]},
    }  # fmt: skip
    experiments = {"small": small, "full": full}
    series = fraction_series(small, summaries, experiments)
    hw = 100 * mean_interval(_row("bp", 0.5))
    assert hw > 0
    assert series == {
        "bp": [(0.01, 40.0, hw, 2, None), (0.1, 60.0, hw, 2, None), (0.5, 80.0, hw, 2, "full")],
        "bdfa": [(0.01, 30.0, hw, 2, None), (0.4, 70.0, hw, 2, "full")],
    }
    assert all(isinstance(p, FractionPoint) for points in series.values() for p in points)
    caption = " ".join(_borrowed_caption(small, series))
    assert "[full](#full) at dataset cifar10, epochs 30 (2 seeds)" in caption
    assert _borrowed_caption(small, {"bp": series["bp"][:2]}) == []
    png = _fraction_plot(series, "small", tmp_path / "fraction.png")
    assert png is not None and png.stat().st_size > 0
    # a report of some files only: the borrowed experiment lends nothing
    assert (
        fraction_series(small, {"small": summaries["small"]}, experiments)["bp"] == series["bp"][:2]
    )
    small.extra_fraction_points = [{"experiment": "full", "at": {"dataset": "cifar10"}}]
    with pytest.raises(ValueError, match=r"gets two points at fraction 0\.5"):
        fraction_series(small, summaries, experiments)
    small.extra_fraction_points = [{"experiment": "full", "at": {"epoch": 30}}]
    with pytest.raises(ValueError, match="full has no grid point at epoch 30"):
        fraction_series(small, summaries, experiments)
    small.extra_fraction_points = [{"experiment": "full", "at": {"epochs": 30}}]
    full.base["fraction"] = 0.1  # bp's borrowed point falls on its own at 10%
    clash = {**summaries, "full": {"name": "full", "rows": summaries["full"]["rows"][:1]}}
    with pytest.raises(ValueError, match="where this experiment has its own"):
        fraction_series(small, clash, experiments)
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'name = "bad"\nextra_fraction_points = [{ experiment = "full", where = { epochs = 30 } }]\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
    )
    with pytest.raises(ValueError, match="each extra_fraction_points entry"):
        load_experiment(bad)


def test_the_measured_runs_convergence_check_pairs_each_longer_run_with_its_seed(tmp_path):
    """``convergence_check``: a run at the longer schedule against the same seed, method and
    grid point at the shorter one; converged when the gain is below ``gain_below`` points."""
    from dfatorch.report import convergence_check_table

    def row(method, dataset, epochs, accs, diverged=()):
        runs = [{"seed": s, "final_acc": a} for s, a in accs.items()]
        return {"method": method, "dataset": dataset, "epochs": epochs, "runs": runs,
                "diverged": len(diverged), "diverged_seeds": list(diverged)}  # fmt: skip

    rows = [
        row("bp", "c10", 30, {0: 0.800, 1: 0.700}),
        row("bp", "c100", 30, {0: 0.400}),  # another grid point: must not pair with c10
        row("bp", "c10", 60, {1: 0.705, 0: 0.812}),  # seed order differs from the short row's
        row("dfa", "c10", 30, {0: 0.8997, 1: None}),
        row("dfa", "c10", 60, {0: 0.9097, 1: 0.5}),  # +1 point, computed as 0.99999...
        row("dfa", "c100", 60, {0: 0.500}),  # no shorter run yet
        row("fa", "c10", 30, {0: 0.5}, diverged=[1]),
        row("fa", "c10", 60, {1: 0.6}, diverged=[0]),
        row("sf", "c10", 60, {}),
    ]
    check = {"epochs": [30, 60], "gain_below": 1.0}
    lines = convergence_check_table({"rows": rows}, ["dataset", "epochs"], check)
    assert lines[0] == (
        "| method | dataset | seed | 30 epochs (%) | 60 epochs (%) | gain (points) | converged |"
    )
    assert lines[2:] == [
        "| bp | c10 | 1 | 70.00 | 70.50 | +0.50 | yes |",
        "| bp | c10 | 0 | 80.00 | 81.20 | +1.20 | **no** |",
        "| dfa | c10 | 0 | 89.97 | 90.97 | +1.00 | **no** |",
        "| dfa | c10 | 1 | no evaluation | 50.00 | - | undetermined (no evaluation) |",
        "| dfa | c100 | 0 | not run | 50.00 | - | not run |",
        "| fa | c10 | 1 | diverged | 60.00 | - | undetermined (diverged) |",
        "| fa | c10 | 0 | 50.00 | diverged | - | undetermined (diverged) |",
        "| sf | c10 | - | - | - | - | not run |",
    ]
    assert convergence_check_table({"rows": rows[:2]}, ["dataset", "epochs"], check) == []

    spec = (
        'name = "chk"\nconvergence_check = {check}\n[base]\ndataset = "digits"\nmodel = "mlp"\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        "[[grid]]\nepochs = [2]\nseed = [0, 1]\n[[grid]]\nepochs = [4]\nseed = [{long_seed}]\n"
    )
    path = tmp_path / "chk.toml"
    good = "{ epochs = [2, 4], gain_below = 1 }"
    path.write_text(spec.format(check=good, long_seed=1))
    assert load_experiment(path).convergence_check == {"epochs": [2, 4], "gain_below": 1}
    from dfatorch.report import write_report

    text = write_report(
        [path], results_root=tmp_path / "res", benchmarks=tmp_path, out=tmp_path / "R.md"
    ).read_text()
    assert "gains less than 1 point over the 2-epoch run" in text
    assert "| bp | - | - | - | - | not run |" in text  # nothing has run yet
    path.write_text(spec.format(check=good, long_seed=5))
    with pytest.raises(ValueError, match="bp/epochs=4/seed=5 has no 2-epoch run"):
        load_experiment(path)
    path.write_text(spec.format(check="{ epochs = [2, 8], gain_below = 1 }", long_seed=1))
    with pytest.raises(ValueError, match="no cell trains for 8 epochs"):
        load_experiment(path)
    for bad in ("{ epochs = [4, 2], gain_below = 1.0 }", "{ epochs = [2, 4] }",
                "{ epochs = [2, 4], gain_below = 0 }", "{ epochs = [2, 4], gain_below = inf }",
                "{ epochs = [2, 4], gain_below = true }", "{ epochs = [2.0, 4], gain_below = 1 }",
                "{ epochs = [2, 4], gain_below = 1, seed = 0 }"):  # fmt: skip
        path.write_text(spec.format(check=bad, long_seed=1))
        with pytest.raises(ValueError, match="convergence_check is"):
            load_experiment(path)


BEYOND = """
name = "edges"
[base]
dataset = "digits"
model = "mlp"
epochs = 2
[[methods]]
label = "high"
method = "bp"
[[methods]]
label = "low"
method = "bp"
[[methods]]
label = "inside"
method = "bp"
[[grid]]
seed = [0]
[tune]
lr = [0.01, 0.03, 0.1]
dropout = [0.0, 0.5]
beyond = { lr = [3.0, 0.003, 1.0, 0.3] }
check_longer = 2
"""

#: where each method's (made-up) validation accuracy peaks, in learning rate
PEAKS = {"high": 0.3, "low": 0.001, "inside": 0.03}


def _scripted_run(cell, runs_dir, results_dir, progress, nproc=1):
    """Stands in for training: writes a finished run whose accuracy is a made-up function of the
    learning rate (peaked at the method's entry in PEAKS) and dropout (0.5 scores higher)."""
    import math

    lr, dropout = cell.config.lr, cell.config.dropout
    acc = 0.9 - 0.1 * (math.log10(lr) - math.log10(PEAKS[cell.labels["method"]])) ** 2
    acc += 0.01 * dropout
    folder = results_dir / cell.key
    folder.mkdir(parents=True)
    meta = {"config": cell.config.to_dict(), "environment": {}}
    (folder / "config.json").write_text(json.dumps(meta))
    test = acc if cell.config.eval_test else None
    row = {"train_acc": acc, "val_acc": acc, "val_loss": 1.0, "test_acc": test, "test_loss": 1.0}
    rows = [{"epoch": e, **row, "epoch_seconds": 1.0} for e in range(1, cell.config.epochs + 1)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_choice_on_the_grids_end_is_searched_past_it_until_it_sits_inside(tmp_path, monkeypatch):
    """`[tune] beyond`: a group whose finished search chooses an end of a searched axis tries the
    nearest listed value past that end (across the other axes' grid values), again and again
    while its choice stays on the new end; its measured cells and checks then use that choice."""
    import dfatorch.experiment as experiment
    from dfatorch.report import _chosen_table, _search_table, search_edges

    monkeypatch.setattr(experiment, "_run_cell", _scripted_run)
    path = tmp_path / "edges.toml"
    path.write_text(BEYOND)
    exp = load_experiment(path)
    lines: list[str] = []
    run = dict(runs_root=tmp_path / "runs", results_root=tmp_path / "results", progress=False)
    summary = run_experiment(exp, **run, log=lines.append)
    results = tmp_path / "results" / "edges"
    past = [line.split(": ")[1] for line in lines if "search past the grid" in line]
    # the nearest value first, each across both dropouts; 1.0 scores below 0.3, so the search stops
    assert past == [
        f"tune/{m}/lr={lr}/dropout={d}"
        for m, lr in (("high", 0.3), ("low", 0.003), ("high", 1.0))
        for d in (0.0, 0.5)
    ]
    assert summary["chosen"] == {
        "high": {"lr": 0.3, "dropout": 0.5},
        "low": {"lr": 0.003, "dropout": 0.5},  # the list ends: still on its (new) lower end
        "inside": {"lr": 0.03, "dropout": 0.5},
    }
    lr = {c.labels["method"]: c.config.lr for c in exp.cells(summary["chosen"])}
    assert lr == {"high": 0.3, "low": 0.003, "inside": 0.03}
    assert all(json.loads((results / m / "seed=0" / "config.json").read_text())["config"]["lr"]
               == lr[m] for m in lr)  # fmt: skip
    checks = [c.key for c in exp.convergence_cells(summary["chosen"])]
    assert "check/high/lr=0.3/dropout=0.5/length=2" in checks and len(checks) == 6
    assert summary["checks_missing"] == 0
    # the report: points past the grid are marked, and only a choice on the searched ends flagged
    points = summary["search"]["high"]
    assert [p["lr"] for p in points if p.get("beyond")] == [0.3, 0.3, 1.0, 1.0]
    assert search_edges(summary) == {"low": ["lr"]}
    table = _search_table(summary)
    assert "| high | 0.3 | 0.5 | 90.50 **(chosen)** (past the grid) |" in table
    assert sum("(past the grid)" in line for line in table) == 6
    chosen_rows = _chosen_table(exp, results, summary)
    assert any(row.startswith("| high | lr=0.3, dropout=0.5 | 90.50 |") for row in chosen_rows)
    # nothing runs twice
    again: list[str] = []
    run_experiment(exp, **run, log=again.append)
    assert not [line for line in again if "search" in line or "cell" in line]
    _assert_refused(path, BEYOND, "{ lr = [3.0, 0.003, 1.0, 0.3] }", [
        ("{ lr = [0.05] }", r"lists \[0.05\], inside the searched range"),
        ("{ width = [2.0] }", "not a searched numeric axis"),
        ("{ lr = [] }", "is a list of numbers"),
        ("[0.3]", "beyond is"),
    ])  # fmt: skip


def _assert_refused(path: Path, spec: str, good: str, cases: list[tuple[str, str]]) -> None:
    """Each ``(bad, message)``: ``spec`` with ``good`` replaced by ``bad`` fails to load with
    ``message``."""
    for bad, message in cases:
        path.write_text(spec.replace(good, bad))
        with pytest.raises(ValueError, match=message):
            load_experiment(path)


SEARCH_AT = """
name = "longer"
[base]
dataset = "digits"
model = "mlp"
[[methods]]
label = "high"
method = "bp"
[[methods]]
label = "inside"
method = "bp"
[[grid]]
epochs = [2]
seed = [0]
[[grid]]
methods = ["inside"]
epochs = [4]
seed = [0, 1]
search_at = { epochs = 2 }
[tune]
lr = [0.01, 0.03, 0.1]
by = ["epochs"]
check_longer = 2
"""


def test_a_block_measured_longer_takes_the_choice_of_the_shorter_search(tmp_path, monkeypatch):
    """A ``[[grid]]`` block with ``search_at`` trains its measured runs with the choice of the
    search at those ``by`` values (no search of its own), and its convergence check trains the
    chosen point for the block's epochs and ``check_longer`` times as many, sharing the run that
    the shorter group's check already trained."""
    import dfatorch.experiment as experiment
    from dfatorch.claims import _check_of, _gain
    from dfatorch.report import _chosen_table

    monkeypatch.setattr(experiment, "_run_cell", _scripted_run)
    path = tmp_path / "longer.toml"
    path.write_text(SEARCH_AT)
    exp = load_experiment(path)
    assert [c.key for c in exp.tuning_cells()] == [
        f"tune/{m}/epochs=2/lr={lr}" for m in ("high", "inside") for lr in (0.01, 0.03, 0.1)
    ]
    # before anything ran: high waits for 1x and 2x, inside for 1x, 2x and 4x (2x shared)
    assert aggregate(exp, tmp_path / "nothing")["checks_missing"] == 5
    lines: list[str] = []
    summary = run_experiment(exp, runs_root=tmp_path / "runs", results_root=tmp_path / "results",
                             progress=False, log=lines.append)  # fmt: skip
    assert summary["chosen"] == {"high/epochs=2": {"lr": 0.1}, "inside/epochs=2": {"lr": 0.03}}
    longer = {c.key: (c.config.lr, c.config.epochs) for c in exp.cells(summary["chosen"])}
    assert longer["inside/epochs=4/seed=1"] == (0.03, 4)
    assert longer["inside/epochs=2/seed=0"] == (0.03, 2) and len(longer) == 4
    # the check of the 4-epoch group: 4 and 8 epochs, the 4-epoch run shared with the 2-epoch group
    check = summary["convergence"]["inside/epochs=4"]
    assert check["at"] == {"epochs": 4} and check["search"] == "inside/epochs=2"
    assert check["epochs"] == [4, 8]
    assert summary["convergence"]["inside/epochs=2"]["epochs"] == [2, 4]
    ran = [line.split(": ")[1] for line in lines if " check " in line and "another" not in line]
    assert sorted(ran) == sorted(
        [f"check/high/epochs=2/lr=0.1/length={n}" for n in (1, 2)]
        + [f"check/inside/epochs=2/lr=0.03/length={n}" for n in (1, 2, 4)]
    )
    assert summary["checks_missing"] == 0 and summary["cells_missing"] == 0
    # a claim at the 4-epoch point reads that group's check (the scripted runs gain nothing)
    assert _gain(_check_of(summary, "inside", {"epochs": 4})) == 0.0
    assert _check_of(summary, "inside", {"epochs": 3}) is None
    rows = _chosen_table(exp, tmp_path / "results" / "longer", summary)
    assert [r.split(" | ")[:2] for r in rows if "epochs=4" in r] == [
        ["| inside/epochs=4", "the choice of inside/epochs=2"]
    ]
    # measured only at the longer schedule: the search's own row points to the group's check
    only = tmp_path / "only" / "longer.toml"
    only.parent.mkdir()
    only.write_text(
        SEARCH_AT.replace(
            "epochs = [2]\nseed = [0]\n", 'epochs = [2]\nseed = [0]\nmethods = ["high"]\n'
        )
    )
    alone = load_experiment(only)
    summary = aggregate(alone, tmp_path / "results" / "longer")
    assert sorted(summary["convergence"]) == ["high/epochs=2", "inside/epochs=4"]
    rows = _chosen_table(alone, tmp_path / "results" / "longer", summary)
    assert next(r for r in rows if r.startswith("| inside/epochs=2 |")).endswith(
        "| measured at another schedule only: below | - | - |"
    )
    # one group, two searches' choices: refused
    path.write_text(SEARCH_AT + '[[grid]]\nmethods = ["inside"]\nepochs = [4]\nseed = [2]\n')
    with pytest.raises(ValueError, match="inside at epochs 4 would take the choices of two"):
        load_experiment(path)
    _assert_refused(path, SEARCH_AT, "{ epochs = 2 }", [
        ("{ seed = 2 }", "table of \\[tune\\] by axes"),
        ("{ epochs = [2] }", "one value per axis"),
        ("2", "search_at is a table"),
    ])  # fmt: skip


def test_the_fraction_plot_shows_one_configuration_per_point(tmp_path):
    """A fraction measured at two schedules is plotted at the longer (and the caption says so);
    rows that differ in another axis are separate series; with no series of two fractions there
    is no plot."""
    from dfatorch.report import _fraction_plot, _longer_caption, fraction_series

    (tmp_path / "f.toml").write_text(
        'name = "f"\n[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        "[[grid]]\nfraction = [0.01, 0.1]\nepochs = [10]\nseed = [0, 1]\n"
        "[[grid]]\nfraction = [0.1]\nepochs = [20]\nseed = [0, 1]\n"
    )
    exp = load_experiment(tmp_path / "f.toml")
    rows = [
        _row("bp", 0.40, fraction=0.01, epochs=10),
        _row("bp", 0.50, fraction=0.1, epochs=10),
        _row("bp", 0.60, fraction=0.1, epochs=20),  # the longest, neither first nor last
        _row("bp", 0.55, fraction=0.1, epochs=15),
    ]
    summary = {"name": "f", "rows": rows}
    series = fraction_series(exp, {"f": summary}, {"f": exp})
    assert [(p.fraction, p.mean) for p in series["bp"]] == [(0.01, 40.0), (0.1, 60.0)]
    assert "bp at 10%: 20 epochs (also measured at 10, 15)." in " ".join(_longer_caption(summary))
    # per method: another method's schedules are not this one's
    dfa = [
        _row("dfa", 0.30, fraction=0.01, epochs=10),
        _row("dfa", 0.35, fraction=0.01, epochs=30),
    ]
    caption = " ".join(_longer_caption({"rows": rows + dfa}))
    assert "longest: dfa at 1%: 30 epochs (also measured at 10); bp at 10%: 20 epochs" in caption
    assert _longer_caption({"rows": rows[:2]}) == []  # one schedule per fraction
    # another axis that varies: a series per value, never two configurations in one point
    (tmp_path / "g.toml").write_text(
        'name = "g"\n[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
        '[[grid]]\ndataset = ["mnist"]\nfraction = [0.05]\nseed = [0]\n'
        '[[grid]]\ndataset = ["digits"]\nfraction = [0.1]\nseed = [0]\n'
    )
    other = load_experiment(tmp_path / "g.toml")
    both = {"name": "g", "rows": [_row("bp", 0.3, dataset="mnist", fraction=0.05),
                                  _row("bp", 0.4, dataset="digits", fraction=0.1)]}  # fmt: skip
    split = fraction_series(other, {"g": both}, {"g": other})
    assert sorted(split) == ["bp (dataset=digits)", "bp (dataset=mnist)"]
    assert _fraction_plot(split, "g", tmp_path / "g.png") is None
    other.extra_fraction_points = [{"experiment": "f", "at": {}}]
    with pytest.raises(ValueError, match=r"one series, but its rows also vary in \['dataset'\]"):
        fraction_series(other, {"g": both, "f": summary}, {"g": other, "f": exp})
    assert _fraction_plot(series, "f", tmp_path / "f.png") is not None
