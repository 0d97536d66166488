"""Declarative experiments: a TOML file of cells, a resumable runner and aggregated results.

An experiment file names a base configuration, the methods to compare, a grid and, optionally, a
hyper-parameter search on a validation split::

    name = "cifar10-small"
    description = "..."
    order = 1                   # optional: position in the report
    reference = "bp"            # optional: the method the report's differences are taken to
    targets = [0.5, 0.55]       # optional: the report gives epochs and seconds to these accuracies
    nproc = 2                   # optional: train each cell data-parallel (as --nproc)
    diagnostics = true          # optional: the report plots every probe field over training
    extra_fraction_points = [   # optional: the accuracy-against-fraction plot also shows these
      { experiment = "cifar-converged", at = { dataset = "cifar10", epochs = 30 } },  # runs
    ]                           # of another experiment (their grid point: `at`)
    convergence_check = { epochs = [30, 60], gain_below = 1.0 }  # optional: the report pairs
                                # each run at the longer schedule with the same seed's run at
                                # the shorter one (same method and grid point); converged when
                                # its final test accuracy gains less than gain_below points

    [base]                      # TrainConfig fields shared by every cell
    dataset = "cifar10"
    model = "small_cnn"
    epochs = 30

    [[methods]]                 # one entry per method: a label and TrainConfig overrides
    label = "bp"
    method = "bp"

    [[grid]]                    # cross products; several blocks are concatenated
    fraction = [0.1, 0.02]
    seed = [0, 1, 2]
    methods = ["bp"]            # optional: the block applies to these method labels only

    [tune]                      # optional: searched per method (and per `by` axis) on a held-out
    lr = [1e-4, 3e-4, 1e-3]     # split of the training set, never on the test set; lists are
    val_fraction = 0.1          # searched, other TrainConfig keys (e.g. epochs = 5) apply to the
    seed = 100                  # search runs only; val_size = 1000 instead validates on that many
                                # examples from outside the training subset (fraction < 1)
    by = ["fraction"]
    metric = "final"            # or "best": the validation accuracy that decides
    check_longer = 2            # optional: train each chosen point on a fresh seed for 1x and 2x
                                # its measured runs' epochs, to see whether longer scores higher
    beyond = { lr = [3e-5, 3e-3] }  # optional: values past a searched axis' ends, tried one at a
                                # time (nearest first, across the other axes' values) for a group
                                # whose choice sits on that end, until it sits inside

A ``[[grid]]`` block may also set ``search_at = { epochs = 30 }`` (``by`` axes only): its
measured runs then take the choice of the search at those values instead of a search of their
own, e.g. to measure at 60 epochs what was searched at 30 (their check trains 60 and 120).

Every cell is a run folder under ``runs_root``; when it finishes, its ``config.json`` and
``metrics.jsonl`` are copied under ``results_root`` (small text files, meant to be committed), and a
cell with results there is never run again: an interrupted sweep resumes where it stopped, also on
another machine. Workers started side by side on one machine share the cells: each takes the next
unfinished cell that no other worker holds (an OS lock per cell, released even when a worker is
killed). ``--shard i/n`` splits the cells between machines that share no folder; ``--methods``
runs only some methods' cells, to spend scarce compute on one comparison first.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
import time
import zlib
from collections.abc import Callable, Collection, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import read_toml, write_json
from ._stats import mean_std
from .callbacks import TrainingDiverged
from .rundir import RunDir
from .train import TrainConfig, summarize, train

__all__ = [
    "Cell",
    "Experiment",
    "aggregate",
    "load_experiment",
    "run_experiment",
    "search_cells",
    "select",
]

#: Config fields that do not change what a cell computes (a cell run elsewhere still counts): where
#: the data is read from; the memory layout, which changes float rounding only (a test bounds two
#: steps; over a run the trajectories drift apart, as on two machines); the device, which also
#: changes the random streams of on-device draws (dropout, privacy noise).
NEUTRAL = {"data_dir", "device", "download", "channels_last"}


#: the convergence check (``[tune] check_longer``): the chosen point's longer run scoring this many
#: points more on validation than its run of the measured length (both on one fresh seed) says the
#: schedule was too short. Runs of two seeds in the small-data study differ by about this much by
#: chance (√2 × the seed spread at 0.5% and 1%: 1.5 to 2.4 points); two runs of one seed share
#: their subset and initial weights and presumably differ by less (not measured).
CONVERGED_POINTS = 2.0


@dataclass(frozen=True)
class Cell:
    """One run of an experiment: where it lives, what it trains and its labels for tables."""

    key: str
    config: TrainConfig
    labels: dict[str, Any]


@dataclass
class Experiment:
    """A parsed experiment file (see the module docstring)."""

    name: str
    path: Path
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    methods: list[dict[str, Any]] = field(default_factory=list)
    grid: list[dict[str, list[Any]]] = field(default_factory=list)
    tune: dict[str, Any] | None = None
    order: int = 100  #: where the report puts it (lower first)
    reference: str = "bp"  #: the method the report's difference table subtracts
    targets: tuple[float, ...] = ()  #: test accuracies the report times each run to
    nproc: int = 1  #: data-parallel processes per cell (``dfatorch experiment --nproc`` overrides)
    #: the report plots every alignment-probe field over training (lowest seed of each setting)
    diagnostics: bool = False
    #: points the accuracy-against-fraction plot borrows from other experiments: each
    #: ``{"experiment": name, "at": {axis: value}}`` (a fraction this file cannot run, as 100%)
    extra_fraction_points: list[dict[str, Any]] = field(default_factory=list)
    #: ``{"epochs": [short, long], "gain_below": points}``: the report's check that the measured
    #: runs have converged (the same seed trained for the longer schedule gains less)
    convergence_check: dict[str, Any] | None = None

    @property
    def tune_axes(self) -> dict[str, list[Any]]:
        """The searched values: the list-valued keys of ``[tune]``."""
        return {k: v for k, v in (self.tune or {}).items() if k not in _TUNE_KEYS and _is_list(v)}

    @property
    def tune_fixed(self) -> dict[str, Any]:
        """TrainConfig overrides for the search runs only: the scalar keys of ``[tune]``."""
        return {
            k: v for k, v in (self.tune or {}).items() if k not in _TUNE_KEYS and not _is_list(v)
        }

    @property
    def axes(self) -> list[str]:
        """Every key the grid varies, in order of first appearance."""
        keys: list[str] = []
        for block in self.grid:
            keys += [k for k in block if k not in keys and k not in _BLOCK_KEYS]
        return keys

    def _grid_points(self, label: str | None = None) -> list[dict[str, Any]]:
        """The grid's points (for method ``label``: the blocks that apply to it)."""
        return [point for point, _ in self._grid_entries(label)]

    def _grid_entries(
        self, label: str | None = None
    ) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """The grid's points, each with the ``by`` values of the search whose choice it trains
        with: its own, but for those its block's ``search_at`` names (a block measured at a longer
        schedule than its search ran)."""
        by = list((self.tune or {}).get("by", []))
        entries = []
        for block in self.grid or [{}]:
            if label is not None and label not in block.get("methods", [label]):
                continue
            keys = [k for k in block if k not in _BLOCK_KEYS]
            for values in itertools.product(*(block[k] for k in keys)):
                point = dict(zip(keys, values))
                searched = {k: point.get(k) for k in by} | block.get("search_at", {})
                entries.append((point, searched))
        return entries

    def _config(self, *layers: dict[str, Any]) -> TrainConfig:
        merged: dict[str, Any] = {}
        for layer in (self.base, *layers):
            merged.update(layer)
        return TrainConfig.from_dict(merged)

    def tuning_cells(self) -> list[Cell]:
        """The search: every method x tuned-by value x point of the tuned axes, one seed."""
        return [cell for stage in self.tuning_stages() for cell in stage]

    def tuning_stages(self) -> list[list[Cell]]:
        """The search cells grouped by the value of the ``by`` axes, in the order those values
        first appear in the grid (each stage: every method's search at that value). A worker
        runs one stage's search, then the measured cells of every group whose search is done,
        then the next stage (a cell another worker holds is left to it), so a sweep ordered
        cheapest first has its cheap results first."""
        if not self.tune:
            return []
        by = list(self.tune.get("by", []))
        axes = self.tune_axes
        stages: dict[tuple[Any, ...], list[Cell]] = {}
        for _, searched in self._grid_entries():
            stages.setdefault(tuple(searched[k] for k in by), [])
        for group, cells in stages.items():
            fixed = dict(zip(by, group))
            for method in self.methods:
                label = method["label"]
                entries = self._grid_entries(label)
                if not any(tuple(s[k] for k in by) == group for _, s in entries):
                    continue  # no grid block of this method has this value
                for values in itertools.product(*axes.values()):
                    cells.append(self.search_cell(label, fixed, dict(zip(axes, values))))
        return [cells for cells in stages.values() if cells]

    def search_cell(self, label: str, fixed: dict[str, Any], point: dict[str, Any]) -> Cell:
        """The search run of method ``label`` at the ``by`` values ``fixed`` and the searched
        values ``point``."""
        method = next(m for m in self.methods if m["label"] == label)
        overrides = {k: v for k, v in method.items() if k != "label"}
        tune_run = {**self.tune_fixed, **self._validation(), "seed": self.tune_seed,
                    "eval_test": False}  # fmt: skip
        config = self._config(overrides, fixed, point, tune_run)
        key = "/".join(["tune", label, *(f"{k}={v}" for k, v in {**fixed, **point}.items())])
        return Cell(key, config, {"method": label, **fixed, **point})

    @property
    def tune_beyond(self) -> dict[str, list[Any]]:
        """``[tune] beyond``: per searched axis, the values past its ends that a group whose
        choice sits on an end tries next (see :func:`search_cells`)."""
        return dict((self.tune or {}).get("beyond", {}))

    def planned_cells(self) -> list[Cell]:
        """Every measured cell the file declares, whether or not its search has chosen (searched
        values are left as the base sets them)."""
        return self.cells({g: {} for g in _all_groups(self)})

    def search_group(self, labels: dict[str, Any]) -> str:
        """The search group a cell's labels belong to: its method and its ``by`` values."""
        by = list((self.tune or {}).get("by", []))
        return _group_key(labels["method"], {k: labels.get(k) for k in by})

    def measured_groups(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """Per group of measured cells (its method and ``by`` values), the search group whose
        choice it trains with (itself, unless its grid block sets ``search_at``) and its ``by``
        values."""
        by = list((self.tune or {}).get("by", []))
        return {
            _group_key(m["label"], at): (_group_key(m["label"], searched), at)
            for m in self.methods
            for point, searched in self._grid_entries(m["label"])
            for at in [{k: point.get(k) for k in by}]
        }

    def convergence_checks(
        self, chosen: dict[str, dict[str, Any]]
    ) -> dict[str, tuple[dict[str, Any], list[Cell]]]:
        """The convergence check (``[tune] check_longer = F``), per measured group whose search
        has chosen: its ``by`` values and two runs of the chosen point, one as long as the group's
        measured runs (their ``epochs`` where ``by`` names it, else the search's) and one ``F``
        times longer, both on a fresh seed (the search's + 1, so a fresh training subset,
        validation split and initialisation where the seed draws them; the two runs share all
        three): the chosen point's own search score is the best of its grid, lucky by selection,
        and would make any rerun look worse. The runs keep the search's configuration,
        ``[tune]``'s scalar overrides included (an ``epochs`` there is refused; a search-only
        ``target_epsilon`` or ``fraction`` would be checked as searched, not as measured). A run's
        key names its length in search schedules, so two groups measured at 1x and 2x the search's
        epochs share the 2x run. The report gives the gain of the longer run. Empty without
        ``check_longer``."""
        if not (self.tune or {}).get("check_longer"):
            return {}
        seed = self.tune_seed + 1
        runs = self.chosen_cells(chosen)
        checks = {}
        for group, (search, at) in self.measured_groups().items():
            if search not in runs:
                continue
            cell = runs[search]
            pair = []
            for length in self.check_lengths(at, cell.config.epochs):
                config = TrainConfig.from_dict(
                    {
                        **cell.config.to_dict(),
                        "seed": seed,
                        "epochs": round(cell.config.epochs * length),
                    }
                )
                key = "check/" + cell.key.removeprefix("tune/") + f"/length={length:g}"
                pair.append(Cell(key, config, {**cell.labels, "length": length}))
            checks[group] = (at, pair)
        return checks

    def check_lengths(self, at: dict[str, Any], search_epochs: int) -> tuple[float, float]:
        """The two lengths of a measured group's convergence check, in search schedules: its
        measured runs' epochs (``at``'s, else the search's) and ``check_longer`` times as many."""
        factor = (self.tune or {}).get("check_longer", 1)
        base = at.get("epochs", search_epochs) / search_epochs
        return base, base * factor

    def convergence_cells(self, chosen: dict[str, dict[str, Any]]) -> list[Cell]:
        """The runs of :meth:`convergence_checks`, each once."""
        cells = {c.key: c for _, pair in self.convergence_checks(chosen).values() for c in pair}
        return list(cells.values())

    def chosen_cells(self, chosen: dict[str, dict[str, Any]]) -> dict[str, Cell]:
        """Per search group in ``chosen``, the search cell of its chosen point (which may lie past
        the grid: ``[tune] beyond``)."""
        by = list((self.tune or {}).get("by", []))
        firsts: dict[str, Cell] = {}
        for cell in self.tuning_cells():  # one search cell per group gives its method and values
            firsts.setdefault(self.search_group(cell.labels), cell)
        return {
            group: self.search_cell(first.labels["method"],
                                    {k: first.labels[k] for k in by}, chosen[group])
            for group, first in firsts.items()
            if group in chosen
        }  # fmt: skip

    @property
    def tune_seed(self) -> int:
        """The seed of every search run."""
        return int((self.tune or {}).get("seed", 100))

    def _validation(self) -> dict[str, Any]:
        """The search's validation split: ``val_size`` examples from outside the training subset
        if ``[tune]`` names it, else ``val_fraction`` (default 0.1) carved out of the subset."""
        tune = self.tune or {}
        if "val_size" in tune:
            return {"val_size": tune["val_size"], "val_fraction": 0.0}
        return {"val_fraction": tune.get("val_fraction", 0.1)}

    def cells(self, chosen: dict[str, dict[str, Any]] | None = None) -> list[Cell]:
        """The measured cells; ``chosen`` maps a tuning group key to its selected values."""
        cells = []
        for method in self.methods:
            overrides = {k: v for k, v in method.items() if k != "label"}
            for point, searched in self._grid_entries(method["label"]):
                picked: dict[str, Any] = {}
                if self.tune:
                    group = _group_key(method["label"], searched)
                    if chosen is None or group not in chosen:
                        continue  # its search is not finished yet
                    picked = chosen[group]
                config = self._config(overrides, picked, point)
                key = "/".join([method["label"], *(f"{k}={v}" for k, v in point.items())])
                # labels give every axis its effective value, also where a block left it out
                labels = {a: getattr(config, a) for a in self.axes}
                cells.append(Cell(key, config, {"method": method["label"], **labels}))
        return cells


_TUNE_KEYS = {"val_fraction", "val_size", "seed", "by", "metric", "check_longer", "beyond"}
#: keys of a ``[[grid]]`` block that are not axes: the methods it applies to, and the ``by`` values
#: of the search its measured runs take their choice from (``search_at``)
_BLOCK_KEYS = {"methods", "search_at"}


def _is_list(value: Any) -> bool:
    return isinstance(value, list)


def _group_key(label: str, fixed: dict[str, Any]) -> str:
    return "/".join([label, *(f"{k}={v}" for k, v in fixed.items())])


def _valid_convergence_check(check: Any) -> bool:
    if not (isinstance(check, dict) and set(check) == {"epochs", "gain_below"}):
        return False
    epochs, gain = check["epochs"], check["gain_below"]
    return (
        isinstance(epochs, list)
        and len(epochs) == 2
        and all(type(e) is int for e in epochs)
        and 0 < epochs[0] < epochs[1]
        and _is_number(gain)
        and 0 < gain < math.inf
    )


def _check_beyond(path: Path, tune: dict[str, Any]) -> None:
    beyond = tune.get("beyond", {})
    if not isinstance(beyond, dict):
        raise ValueError(f"{path}: [tune] beyond is {{ axis = [values] }}, got {beyond!r}")
    for axis, values in beyond.items():
        grid = tune.get(axis)
        if not (_is_list(grid) and grid and all(_is_number(v) for v in grid)):
            raise ValueError(f"{path}: [tune] beyond names {axis!r}, not a searched numeric axis")
        if not (_is_list(values) and values and all(_is_number(v) for v in values)):
            raise ValueError(f"{path}: [tune] beyond.{axis} is a list of numbers, got {values!r}")
        inside = [v for v in values if min(grid) <= v <= max(grid)]
        if inside:
            raise ValueError(
                f"{path}: [tune] beyond.{axis} lists {inside}, inside the searched range "
                f"[{min(grid)}, {max(grid)}]: only values past its ends belong there"
            )


def _check_search_at(path: Path, block: dict[str, Any], tune: dict[str, Any]) -> None:
    """Refuse a ``search_at`` that is not a table of ``[tune] by`` axes with single values."""
    if "search_at" not in block:
        return
    at, by = block["search_at"], list(tune.get("by", []))
    if not (isinstance(at, dict) and at and set(at) <= set(by)):
        raise ValueError(
            f"{path}: a [[grid]] block's search_at is a table of [tune] by axes ({by}) with the "
            f"values whose search its runs take their choice from, got {at!r}"
        )
    if any(_is_list(v) for v in at.values()):
        raise ValueError(f"{path}: search_at names one value per axis, got {at!r}")


def _check_search_groups(exp: Experiment) -> None:
    """Refuse measured cells of one method and ``by`` values that would take two searches'
    choices (one table row, two configurations)."""
    if not exp.tune:
        return
    by = list(exp.tune.get("by", []))
    for method in exp.methods:
        takes: dict[str, str] = {}
        for point, searched in exp._grid_entries(method["label"]):
            at = {k: point.get(k) for k in by}
            search = _group_key(method["label"], searched)
            first = takes.setdefault(_group_key(method["label"], at), search)
            if first != search:
                raise ValueError(
                    f"{exp.path}: {method['label']} at {format_point(at)} would take the choices "
                    f"of two searches, {first} and {search} (search_at): one per group"
                )


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def load_experiment(path: str | Path) -> Experiment:
    """Read and check an experiment file."""
    path = Path(path)
    data = read_toml(path, "experiment file")
    known = {"name", "description", "order", "reference", "targets", "nproc", "base", "methods"}
    known |= {"grid", "tune", "diagnostics", "extra_fraction_points", "convergence_check"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (known: {sorted(known)})")
    if "name" not in data or not data.get("methods"):
        raise ValueError(f"{path}: an experiment needs a name and at least one [[methods]] entry")
    labels = [m.get("label") for m in data["methods"]]
    if None in labels or len(set(labels)) != len(labels):
        raise ValueError(f"{path}: every [[methods]] entry needs a unique label, got {labels}")
    for block in data.get("grid", []):
        stray = sorted(set(block.get("methods", [])) - set(labels))
        if stray:
            raise ValueError(f"{path}: a [[grid]] block names unknown methods {stray}")
        _check_search_at(path, block, data.get("tune") or {})
    if not (isinstance(data.get("nproc", 1), int) and data.get("nproc", 1) >= 1):
        raise ValueError(f"{path}: nproc must be a positive integer, got {data['nproc']!r}")
    if not isinstance(data.get("diagnostics", False), bool):
        raise ValueError(f"{path}: diagnostics must be true or false, got {data['diagnostics']!r}")
    if {"val_size", "val_fraction"} <= set(data.get("tune") or {}):
        raise ValueError(f"{path}: [tune] sets val_size or val_fraction, not both")
    factor = (data.get("tune") or {}).get("check_longer")
    if factor is not None and not (type(factor) is int and factor >= 2):
        raise ValueError(f"{path}: [tune] check_longer is an integer factor >= 2, got {factor!r}")
    if factor is not None and "epochs" in (data.get("tune") or {}):
        raise ValueError(
            f"{path}: [tune] sets epochs for the search runs only, so check_longer would test "
            "their schedule, not the measured runs': drop one of them"
        )
    _check_beyond(path, data.get("tune") or {})
    for extra in data.get("extra_fraction_points", []):
        if not (
            isinstance(extra, dict)
            and isinstance(extra.get("experiment"), str)
            and isinstance(extra.get("at", {}), dict)
            and set(extra) <= {"experiment", "at"}
        ):
            raise ValueError(
                f"{path}: each extra_fraction_points entry is {{ experiment = \"name\", "
                f"at = {{ axis = value }} }}, got {extra!r}"
            )  # fmt: skip
    check = data.get("convergence_check")
    if check is not None and not _valid_convergence_check(check):
        raise ValueError(
            f"{path}: convergence_check is {{ epochs = [short, long], gain_below = points }} "
            f"with 0 < short < long and finite points > 0, got {check!r}"
        )
    if not all(0 < float(t) <= 1 for t in data.get("targets", ())):
        raise ValueError(f"{path}: targets are test accuracies in (0, 1], got {data['targets']}")
    exp = Experiment(
        name=data["name"],
        path=path,
        description=data.get("description", ""),
        base=data.get("base", {}),
        methods=data["methods"],
        grid=data.get("grid", []),
        tune=data.get("tune"),
        order=int(data.get("order", 100)),
        reference=str(data.get("reference", "bp")),
        targets=tuple(float(t) for t in data.get("targets", ())),
        nproc=int(data.get("nproc", 1)),
        diagnostics=data.get("diagnostics", False),
        extra_fraction_points=list(data.get("extra_fraction_points", [])),
        convergence_check=check,
    )
    # build every cell once so that a typo fails now, not hours into the sweep
    exp.tuning_cells()
    _check_search_groups(exp)
    planned = exp.planned_cells()
    if check is not None:
        _check_pairs(exp, planned, *check["epochs"])
    return exp


def _check_pairs(exp: Experiment, planned: list[Cell], short: int, long: int) -> None:
    """Refuse a ``convergence_check`` with no pairs, or whose longer run lacks its shorter one."""

    def others(cell: Cell) -> str:
        return json.dumps({k: v for k, v in cell.labels.items() if k != "epochs"}, sort_keys=True)

    shorter = {others(c) for c in planned if c.labels.get("epochs") == short}
    longer = [c for c in planned if c.labels.get("epochs") == long]
    if not longer:
        raise ValueError(f"{exp.path}: convergence_check: no cell trains for {long} epochs")
    for cell in longer:
        if others(cell) not in shorter:
            raise ValueError(
                f"{exp.path}: convergence_check: {cell.key} has no {short}-epoch run of the same "
                "method, grid point and seed to compare with"
            )


def _all_groups(exp: Experiment) -> list[str]:
    """The search groups that measured cells take their choice from."""
    return list(dict.fromkeys(search for search, _ in exp.measured_groups().values()))


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    # fields added to TrainConfig after a cell ran take their defaults: old results stay valid
    full = {**TrainConfig().to_dict(), **config}
    neutral = NEUTRAL
    if full["activation_bits"] < 32:  # compressed activations fuse ops on contiguous maps only
        neutral = NEUTRAL - {"channels_last"}
    return {k: v for k, v in full.items() if k not in neutral}


def cell_results(results_dir: Path, cell: Cell) -> list[dict[str, Any]] | None:
    """The finished history of ``cell`` under ``results_dir``, or None if it is not done (or was
    done with another configuration)."""
    folder = results_dir / cell.key
    run = RunDir(folder)
    if not run.is_finished():
        return None
    if _comparable(run.read_config()) != _comparable(cell.config.to_dict()):
        return None
    return run.read_metrics()


#: the exit code of ``dfatorch train`` when training diverged (``cli.main``)
DIVERGED_EXIT = 3
#: the exit code of ``dfatorch train`` stopped by Ctrl-C, its checkpoint saved
INTERRUPTED_EXIT = 130
#: beside a cell's result files: the cell diverged (the message and the epochs it completed)
DIVERGED = "diverged.json"


def cell_diverged(results_dir: Path, cell: Cell) -> str | None:
    """Why ``cell`` diverged, if it did (under its current configuration), else None. A diverged
    cell is done: it is not run again, takes no part in means, and loses a search."""
    folder = results_dir / cell.key
    marker = folder / DIVERGED
    if not marker.exists() or not (folder / "config.json").exists():
        return None
    if _comparable(RunDir(folder).read_config()) != _comparable(cell.config.to_dict()):
        return None
    return str(json.loads(marker.read_text())["message"])


def _cell_done(results_dir: Path, cell: Cell) -> bool:
    return (
        cell_results(results_dir, cell) is not None or cell_diverged(results_dir, cell) is not None
    )


def cell_status(runs_dir: Path, results_dir: Path, cell: Cell) -> str:
    """Where ``cell`` stands: ``done``, ``diverged``, ``running`` (a worker holds it),
    ``started`` (a checkpoint of its configuration waits to be resumed) or ``pending``."""
    if cell_diverged(results_dir, cell) is not None:
        return "diverged"
    if cell_results(results_dir, cell) is not None:
        return "done"
    if _held_elsewhere(runs_dir / f"{cell.key}.lock"):
        return "running"
    run = RunDir(runs_dir / cell.key)
    resumable = run.checkpoint.exists() and run.config.exists()
    if resumable and _comparable(run.read_config()) == _comparable(cell.config.to_dict()):
        return "started"
    return "pending"


def _held_elsewhere(path: Path) -> bool:
    """Whether a worker holds the lock file ``path``: a shared lock probe on the file opened read
    only; it neither creates the file nor needs write access. (A worker that tries the file at
    that very moment retries: see :func:`_cell_lock`.)"""
    try:
        import fcntl
    except ImportError:
        return False
    try:
        handle = open(path, "rb")  # noqa: SIM115 (closed below, after the probe)
    except FileNotFoundError:
        return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


#: how many times a worker tries a cell's lock (50 ms apart) before leaving the cell to its holder
_LOCK_TRIES = 4


@contextmanager
def _cell_lock(path: Path) -> Iterator[bool]:
    """Try to hold an exclusive lock on ``path``; yields whether this process got it.

    ``flock`` locks belong to the open file, so the OS drops them when a worker dies: a killed
    sweep leaves nothing stale behind. Where ``fcntl`` is missing (Windows) every worker gets the
    lock, and parallel workers must be kept apart with ``--shard``.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        # a few tries: a probe (``--list``) holds the file for microseconds, a worker for minutes
        for attempt in range(_LOCK_TRIES):
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if attempt == _LOCK_TRIES - 1:
                    yield False
                    return
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_cell(
    cell: Cell, runs_dir: Path, results_dir: Path, progress: bool, nproc: int = 1
) -> None:
    run_dir = runs_dir / cell.key
    run = RunDir(run_dir)
    resume = run.checkpoint.exists()
    if resume and _comparable(run.read_config()) != _comparable(cell.config.to_dict()):
        shutil.rmtree(run_dir)  # a stale run of an older version of this cell
        resume = False
    diverged: str | None = None
    stop = False  # Ctrl-C in the last epoch's evaluation: the cell finished, the sweep stops
    try:
        if nproc > 1:
            stop = _train_in_processes(cell, run, resume, progress, nproc)
        else:
            result = train(None if resume else cell.config, run_dir, resume=resume,
                           progress=progress)  # fmt: skip
            if result.interrupted:  # Ctrl-C: the run keeps its checkpoint; the sweep stops
                raise KeyboardInterrupt
            stop = result.stop_requested
    except TrainingDiverged as exc:  # a result (too high a learning rate), not a failure
        diverged = str(exc)
    target = results_dir / cell.key
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in (run.config, run.metrics):
        if path.exists():
            shutil.copy2(path, staging / path.name)
    if diverged is not None:
        if not run.config.exists():
            write_json(staging / run.config.name, {"config": cell.config.to_dict()})
        epochs = len(run.read_metrics()) if run.metrics.exists() else 0
        write_json(staging / DIVERGED, {"message": diverged, "epochs_completed": epochs})
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    if stop:
        raise KeyboardInterrupt


def _train_in_processes(cell: Cell, run: RunDir, resume: bool, progress: bool, nproc: int) -> bool:
    """Train a cell data-parallel: its config goes in the run folder, and ``nproc`` processes
    continue that run (``train --resume`` of a folder without a checkpoint starts it). Returns
    whether a Ctrl-C arrived that let the run finish; raises ``KeyboardInterrupt`` for one that
    stopped it."""
    from .distributed import launch

    if not resume:
        shutil.rmtree(run.path, ignore_errors=True)
        write_json(run.config, {"config": cell.config.to_dict()})
    argv = ["train", "--resume", str(run.path), *([] if progress else ["--no-progress"])]
    code = launch(argv, nproc)
    if code == DIVERGED_EXIT:
        raise TrainingDiverged(
            f"cell {cell.key}: training diverged (the ranks' messages are above)"
        )
    if code == INTERRUPTED_EXIT:
        if not run.is_finished():
            raise KeyboardInterrupt
        return True
    if code != 0:
        raise RuntimeError(f"cell {cell.key}: the {nproc} training processes failed (code {code})")
    return False


#: a search cell with its score (None while not run, or diverged) and whether it diverged
_Scored = tuple[Cell, float | None, bool]


def _searched(exp: Experiment, results_dir: Path) -> dict[str, list[_Scored]]:
    """Per search group, its cells with their scores: the grid's, then those past the grid's ends
    that ``[tune] beyond`` adds while the group's finished search chooses an end. An added value
    is searched across the grid values of the other axes; the next one is added only once those
    runs have finished and the choice still sits on the (new) end."""
    metric = (exp.tune or {}).get("metric", "final")

    def scored(cell: Cell) -> _Scored:
        history = cell_results(results_dir, cell)
        score = None
        if history is not None:
            s = summarize(history)
            score = s["best_acc"] if metric == "best" else s["final_acc"]
        return cell, score, cell_diverged(results_dir, cell) is not None

    groups: dict[str, list[_Scored]] = {}
    for cell in exp.tuning_cells():
        groups.setdefault(exp.search_group(cell.labels), []).append(scored(cell))
    beyond, axes = exp.tune_beyond, exp.tune_axes
    by = list((exp.tune or {}).get("by", []))
    for points in groups.values():
        labels = points[0][0].labels
        fixed = {k: labels[k] for k in by}
        searched = {axis: list(axes[axis]) for axis in beyond}
        while (best := _best(points, list(axes))) is not None:
            added = []
            for axis, extra in beyond.items():
                low, high = min(searched[axis]), max(searched[axis])
                if best[axis] == high and any(v > high for v in extra):
                    value = min(v for v in extra if v > high)  # the nearest first
                elif best[axis] == low and any(v < low for v in extra):
                    value = max(v for v in extra if v < low)
                else:
                    continue
                searched[axis].append(value)
                others = {a: v for a, v in axes.items() if a != axis}
                for combo in itertools.product(*others.values()):
                    point = {**dict(zip(others, combo)), axis: value}
                    point = {a: point[a] for a in axes}  # in the file's order, as cell keys are
                    added.append(scored(exp.search_cell(labels["method"], fixed, point)))
            if not added:
                break
            points += added
    return groups


def _best(points: list[_Scored], axes: list[str]) -> dict[str, Any] | None:
    """The searched values of the best-scoring point, once every point has finished (a diverged
    point loses); None before, or if every point diverged."""
    scored = [(cell, s) for cell, s, _ in points if s is not None]
    if not scored or not all(s is not None or d for _, s, d in points):
        return None
    best = max(scored, key=lambda cs: cs[1])[0]  # ties: the first listed point wins
    return {k: best.labels[k] for k in axes}


def search_cells(exp: Experiment, results_dir: Path) -> list[Cell]:
    """Every search cell of ``exp`` as its results stand: the grid's and those past its ends
    (``[tune] beyond``)."""
    return [cell for points in _searched(exp, results_dir).values() for cell, _, _ in points]


def select(exp: Experiment, results_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Pick the tuned values per group from finished search cells.

    Returns ``(chosen, search)``: the values for every group whose search is complete (past the
    grid's ends too, where ``[tune] beyond`` asks), and the whole search (every point's
    validation accuracy, ``"beyond": True`` on points past the grid) for the report.
    """
    if not exp.tune:
        return {}, {}
    axes = list(exp.tune_axes)
    grid = {c.key for c in exp.tuning_cells()}
    chosen, search = {}, {}
    for group, points in _searched(exp, results_dir).items():
        search[group] = [
            {**{k: c.labels[k] for k in axes}, "val_acc": s,
             **({"diverged": True} if d else {}), **({} if c.key in grid else {"beyond": True})}
            for c, s, d in points
        ]  # fmt: skip
        best = _best(points, axes)
        if best is not None:
            chosen[group] = best
    return chosen, search


def search_diverged(search: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The search groups in which every searched point diverged: nothing to choose, so their
    measured cells never run (they are not missing: the search is their result)."""
    return [g for g, points in search.items() if points and all(p.get("diverged") for p in points)]


def method_labels(exp: Experiment, methods: Collection[str] | None = None) -> set[str]:
    """The labels of ``methods`` (every method of ``exp`` for None); ValueError for a label the
    file does not have."""
    labels = [m["label"] for m in exp.methods]
    unknown = sorted(set(methods or ()) - set(labels))
    if unknown:
        raise ValueError(f"{exp.name}: no method labelled {', '.join(map(repr, unknown))} "
                         f"(the file has {', '.join(labels)})")  # fmt: skip
    return set(labels if methods is None else methods)


def run_experiment(
    exp: Experiment,
    *,
    runs_root: str | Path = "runs/experiments",
    results_root: str | Path = "experiments/results",
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    log: Callable[[str], None] = print,
    nproc: int = 1,
    poll_seconds: float = 20.0,
    methods: Collection[str] | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell (search first, then the measured cells whose search is done,
    then its convergence check if the file asks for one), then aggregate. Returns the summary
    (also written to ``results_root/NAME/summary.json``). ``nproc > 1`` trains each cell
    data-parallel in that many processes.

    A worker whose own share is done while another worker still runs a search waits for that
    search (checking every ``poll_seconds``) and then shares its group's measured cells, instead
    of leaving them all to the other worker.

    ``methods`` (labels) runs only those methods' cells, searches and checks included, to spend
    scarce compute on one comparison first; the summary still covers every method.

    Ctrl-C stops the sweep: ``KeyboardInterrupt`` is raised after the running cell saved its
    checkpoint (or, if the Ctrl-C came during its last evaluation, its results); calling again
    resumes.
    """
    runs_dir = Path(runs_root) / exp.name
    results_dir = Path(results_root) / exp.name
    index, count = shard
    wanted = method_labels(exp, methods)

    # a cell's shard follows from its place in the whole sweep, however the cells are offered
    every = exp.tuning_cells() + exp.cells({g: {} for g in _all_groups(exp)})
    place = {c.key: i for i, c in enumerate(every)}
    # the search groups in the order their stages run
    groups = list(dict.fromkeys(exp.search_group(c.labels) for c in exp.tuning_cells()))
    stage_of = {exp.search_group(c.labels): i for i, s in enumerate(exp.tuning_stages()) for c in s}
    measured = exp.measured_groups()

    def shard_of(cell: Cell) -> int:
        if cell.key in place:
            return place[cell.key] % count
        if cell.key.startswith("tune/"):  # a search point past the grid: spread by its name
            return zlib.crc32(cell.key.encode()) % count
        # a convergence check (its key names the chosen point): after the sweep, by its group
        group = groups.index(exp.search_group(cell.labels))
        length = cell.labels["length"]
        if length not in (1, (exp.tune or {}).get("check_longer")):  # measured longer: by name
            return zlib.crc32(cell.key.encode()) % count
        # the long run alternates sides from group to group, so two shards share the long runs
        second = (length > 1) != (group % 2 == 1)
        return (len(place) + 2 * group + second) % count

    def stage_rank(cell: Cell) -> int:
        """A measured cell's place in a cheapest-first sweep: its search's stage."""
        search, _ = measured.get(exp.search_group(cell.labels), ("", {}))
        return stage_of.get(search, 0)

    def run(cells: Iterable[Cell], what: str) -> None:
        mine = [c for c in cells if shard_of(c) == index and c.labels["method"] in wanted]
        todo = [c for c in mine if not _cell_done(results_dir, c)]
        for n, cell in enumerate(todo, 1):
            # Beside the run folder, not in it: a stale run folder is deleted with what is in it.
            with _cell_lock(runs_dir / f"{cell.key}.lock") as held:
                # Another worker may hold this cell, or have finished it since the list was made.
                if not held or _cell_done(results_dir, cell):
                    log(f"[{exp.name}] {what} {n}/{len(todo)}: {cell.key} (another worker's)")
                    continue
                log(f"[{exp.name}] {what} {n}/{len(todo)}: {cell.key}")
                _run_cell(cell, runs_dir, results_dir, progress, nproc)
                why = cell_diverged(results_dir, cell)
                if why is not None:
                    log(f"[{exp.name}] {cell.key} diverged: {why.splitlines()[0]}")

    def searches_held_elsewhere() -> bool:
        for cell in search_cells(exp, results_dir):
            if cell.labels["method"] in wanted and not _cell_done(results_dir, cell):
                with _cell_lock(runs_dir / f"{cell.key}.lock") as held:
                    if not held:
                        return True
        return False

    seen: set[str] = set()

    def run_chosen() -> bool:
        """Run the search points past the grid that finished searches call for (``[tune]
        beyond``), then the measured cells not offered yet of every group whose search is done,
        then those groups' convergence checks."""
        past = [
            c for c in search_cells(exp, results_dir) if c.key not in place and c.key not in seen
        ]
        seen.update(c.key for c in past)
        run(past, "search past the grid")
        chosen, _ = select(exp, results_dir)
        fresh = [c for c in exp.cells(chosen) if c.key not in seen]
        fresh.sort(key=stage_rank)
        checks = [c for c in exp.convergence_cells(chosen) if c.key not in seen]
        seen.update(c.key for c in fresh + checks)
        run(fresh, "cell")
        run(checks, "check")
        return bool(past or fresh or checks)

    for stage in exp.tuning_stages():
        run(stage, "search")
        while run_chosen():  # a search past the grid can finish a group's search
            pass
    waiting = False
    while True:
        busy = searches_held_elsewhere()  # before select: a search ending now is seen there
        if run_chosen():
            waiting = False
            continue
        if not busy:
            break
        if not waiting:
            log(f"[{exp.name}] waiting for another worker's search")
            waiting = True
        time.sleep(poll_seconds)
    summary = aggregate(exp, results_dir)
    write_json(results_dir / "summary.json", summary)
    return summary


def aggregate(exp: Experiment, results_dir: str | Path) -> dict[str, Any]:
    """Mean and standard deviation over seeds of each (method, grid point without seed)."""
    results_dir = Path(results_dir)
    chosen, search = select(exp, results_dir)
    rows: dict[str, dict[str, Any]] = {}
    machines = set()
    cells = exp.cells(chosen or None)
    # the cells of groups whose search has not finished are missing too; those of groups whose
    # every searched point diverged are not (they will never run)
    failed = search_diverged(search)
    never = len(exp.cells({g: {} for g in failed})) if failed else 0
    missing = (
        len(exp.cells({g: {} for g in _all_groups(exp)})) - len(cells) - never if exp.tune else 0
    )
    convergence = _convergence(exp, results_dir, chosen)
    # a run two groups share (``search_at``) counts once: by its search and epochs
    checks_missing = len({(c["search"], epochs) for c in convergence.values()
                          for epochs, acc, diverged in zip(c["epochs"], c["val_acc"], c["diverged"])
                          if acc is None and not diverged})  # fmt: skip
    if exp.tune and exp.tune.get("check_longer"):  # groups not chosen yet: their checks wait too
        epochs = {exp.search_group(c.labels): c.config.epochs for c in exp.tuning_cells()}
        waiting = {(search, length)
                   for search, at in exp.measured_groups().values()
                   if search not in chosen and search not in failed
                   for length in exp.check_lengths(at, epochs[search])}  # fmt: skip
        checks_missing += len(waiting)
    for cell in cells:
        history = cell_results(results_dir, cell)
        group = {k: v for k, v in cell.labels.items() if k != "seed"}
        key = json.dumps(group, sort_keys=True)
        row = rows.setdefault(key, {**group, "runs": [], "diverged": 0, "diverged_seeds": []})
        if history is None:
            if cell_diverged(results_dir, cell) is not None:
                row["diverged"] += 1
                row["diverged_seeds"].append(cell.labels.get("seed"))
            else:
                missing += 1
            continue
        env = RunDir(results_dir / cell.key).read_meta()["environment"]
        machines.add(
            f"{env.get('processor')} / {env.get('platform')} / {env.get('threads')} threads"
        )
        row["runs"].append({"seed": cell.labels.get("seed"), **summarize(history)})
    table = []
    for row in rows.values():
        runs = row.pop("runs")
        finals = [r["final_acc"] for r in runs if r["final_acc"] is not None]
        bests = [r["best_acc"] for r in runs if r["best_acc"] is not None]
        final_mean, final_std = mean_std(finals)
        best_mean, best_std = mean_std(bests)
        spe = mean_std([r["seconds_per_epoch"] for r in runs])[0]
        bpc_mean, bpc_std = mean_std(
            [r["final_bpc"] for r in runs if r.get("final_bpc") is not None]
        )
        table.append(
            {
                **row,
                "seeds": len(runs),
                "final_acc_mean": final_mean,
                "final_acc_std": final_std,
                "best_acc_mean": best_mean,
                "best_acc_std": best_std,
                "final_bpc_mean": bpc_mean,
                "final_bpc_std": bpc_std,
                "seconds_per_epoch": spe,
                "runs": runs,
            }
        )
    return {
        "name": exp.name,
        "file": str(exp.path),
        "description": exp.description,
        "machines": sorted(machines),
        "cells_missing": missing,
        "chosen": chosen,
        "search": search,
        "search_diverged": failed if exp.tune else [],
        "convergence": convergence,
        "checks_missing": checks_missing,
        "rows": table,
    }


def _convergence(exp: Experiment, results_dir: Path, chosen: dict[str, Any]) -> dict[str, Any]:
    """Per measured group whose search has chosen, its convergence check: the method, its ``by``
    values, the search group it took its choice from, the seed, the two runs' epochs, their
    validation accuracies (by the search's metric; None while not run) and whether each
    diverged."""
    key = "best_acc" if (exp.tune or {}).get("metric") == "best" else "final_acc"
    searches = exp.measured_groups()
    out: dict[str, Any] = {}
    for group, (at, pair) in exp.convergence_checks(chosen).items():
        histories = [cell_results(results_dir, cell) for cell in pair]
        out[group] = {
            "method": pair[0].labels["method"], "at": at, "search": searches[group][0],
            "seed": pair[0].config.seed, "epochs": [c.config.epochs for c in pair],
            "val_acc": [None if h is None else summarize(h)[key] for h in histories],
            "diverged": [cell_diverged(results_dir, c) is not None for c in pair],
        }  # fmt: skip
    return out


def format_value(value: Any) -> str:
    """Short text for a table cell (``-`` where a cell has no value on this axis)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if not math.isnan(value) else "nan"
    return str(value)


def format_point(at: dict[str, Any]) -> str:
    """A grid point as text: ``fraction 0.1, epochs 40``."""
    return ", ".join(f"{k} {format_value(v)}" for k, v in at.items())
