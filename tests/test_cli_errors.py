"""Every bad input to every subcommand: a non-zero exit, one ``error: ...`` line on stderr, no
traceback, and no file created or changed (a run that fails before its first epoch leaves no
run folder).

Argparse's own errors (a malformed value, an unknown choice) are one line too:
``error: dfatorch CMD: argument --flag: ...``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dfatorch
from dfatorch.cli import main
from dfatorch.experiment import load_experiment
from dfatorch.models import build_model
from dfatorch.train import TrainConfig

pytestmark = pytest.mark.slow  # ~50 cases, a few seconds each at worst


@dataclass
class Case:
    """One bad command line; ``must``/``must_not``: substrings of its error line."""

    id: str
    argv: list[str]
    must: tuple[str, ...] = ()
    must_not: tuple[str, ...] = ()
    argparse: bool = False

    def param(self):
        return pytest.param(self, id=self.id)


SEQ = "otb/Synth"
CASES = [
    # train: out-of-range values, each named by its own name
    Case("train-epochs-0", ["train", "--epochs", "0"], ("epochs",), ("batch_size", "eval_every")),
    Case("train-batch-size-0", ["train", "--batch-size", "0"], ("batch_size",),
         ("epochs", "eval_every")),
    Case("train-eval-every-0", ["train", "--eval-every", "0"], ("eval_every",),
         ("epochs", "batch_size")),
    Case("train-fraction-2", ["train", "--fraction", "2"], ("fraction",)),
    # recurrent models and sequence data
    Case("train-text-no-file", ["train", "--dataset", "text", "--model", "gru"],
         ("text_file", "--text-file")),
    Case("train-text-missing", ["train", "--dataset", "text", "--text-file", "nowhere.txt",
                                "--model", "gru"], ("nowhere.txt", "not found")),
    Case("train-lstm-fa", ["train", "--model", "lstm", "--method", "fa"], ("lstm", "bp, dfa")),
    Case("train-hidden-size-mlp", ["train", "--model", "mlp", "--hidden-size", "8"],
         ("hidden_size", "rnn, gru, lstm")),
    Case("train-permute-mnist", ["train", "--dataset", "mnist", "--permute"], ("permute",)),
    Case("train-lr-negative", ["train", "--lr", "-1"], ("lr",)),
    Case("train-val-fraction-1", ["train", "--val-fraction", "1"], ("val_fraction",)),
    Case("train-val-size-whole-set", ["train", "--val-size", "100"], ("val_size", "fraction < 1")),
    Case("train-val-size-and-fraction", ["train", "--fraction", "0.5", "--val-size", "100",
                                         "--val-fraction", "0.1"], ("val_size or val_fraction",)),
    Case("train-val-size-float", ["train", "--fraction", "0.5", "--val-size", "10.5"],
         ("--val-size",), argparse=True),
    Case("train-val-size-negative", ["train", "--fraction", "0.5", "--val-size", "-1"],
         ("val_size",)),
    Case("train-val-size-too-big", ["train", "--fraction", "0.5", "--val-size", "5000",
                                    "--out", "run"], ("val_size=5000", "leaves")),
    Case("train-optimizer-x", ["train", "--optimizer", "sgdd", "--out", "run"], ("sgdd",)),
    Case("train-epochs-not-a-number", ["train", "--epochs", "abc"], ("--epochs",),
         argparse=True),
    # train: unknown names; the run folder must not be left behind
    Case("train-method-bdfaa", ["train", "--method", "bdfaa", "--out", "run"],
         ("--method", "bdfaa"), argparse=True),
    Case("train-scope-x", ["train", "--scope", "x", "--out", "run"], ("--scope",), argparse=True),
    Case("train-init-x", ["train", "--init", "x", "--out", "run"], ("--init",), argparse=True),
    Case("train-storage-x", ["train", "--storage", "x", "--out", "run"], ("storage",)),
    Case("train-conv-error-x", ["train", "--conv-error", "x", "--out", "run"], ("--conv-error",),
         argparse=True),
    Case("train-activation-x", ["train", "--activation", "x", "--out", "run"], ("activation",)),
    Case("train-model-unknown", ["train", "--model", "nosuch", "--out", "run"], ("nosuch",)),
    Case("train-dataset-unknown", ["train", "--dataset", "nosuch", "--out", "run"], ("nosuch",)),
    Case("train-label-x", ["train", "--label", "x", "--out", "run"], ("label",)),
    Case("train-device-unknown", ["train", "--device", "nosuch", "--out", "run"], ("nosuch",)),
    Case("train-missing-data",
         ["train", "--dataset", "mnist", "--data-dir", "nodata", "--out", "run"],
         ("nodata", "--download", "download=True", "--data-dir", "data_dir")),
    # train --resume: missing, truncated, foreign checkpoints
    Case("train-resume-missing", ["train", "--resume", "nosuchrun"], ("nosuchrun",)),
    Case("train-resume-truncated", ["train", "--resume", "run_truncated"], ("run_truncated",)),
    Case("train-resume-text", ["train", "--resume", "run_text"], ("run_text",)),
    Case("train-resume-pickle", ["train", "--resume", "run_pickle"], ("run_pickle",)),
    Case("train-resume-folder", ["train", "--resume", "run_folder"], ("run_folder",)),
    # compare
    Case("compare-methods-bdfaa", ["compare", "--methods", "bp,bdfaa", "--out", "cmp"],
         ("bdfaa",)),
    Case("compare-batch-size-0", ["compare", "--batch-size", "0", "--out", "cmp"],
         ("batch_size",), ("epochs", "eval_every")),
    Case("compare-model-unknown", ["compare", "--model", "nosuch", "--methods", "bp", "--out",
         "cmp"], ("nosuch",)),
    Case("compare-scope-x", ["compare", "--scope", "x", "--methods", "dfa", "--out", "cmp"],
         ("scope",)),
    # plot
    Case("plot-missing-run", ["plot", "nosuchrun", "--out", "c.png"], ("nosuchrun",)),
    Case("plot-run-without-metrics", ["plot", "run_text", "--out", "c.png"], ("run_text",)),
    # align
    Case("align-missing-run", ["align", "nosuchrun"], ("nosuchrun",)),
    Case("align-truncated", ["align", "run_truncated"], ("run_truncated",)),
    Case("align-text", ["align", "run_text"], ("run_text",)),
    Case("align-pickle", ["align", "run_pickle"], ("run_pickle",)),
    Case("align-split-x", ["align", "run_truncated", "--split", "x"], ("--split",),
         argparse=True),
    # track
    Case("track-missing-sequence", ["track", "nosuchseq", "--out", "t"], ("nosuchseq",)),
    Case("track-backbone-missing", ["track", SEQ, "--backbone", "missing.pt", "--out", "t"],
         ("missing.pt", "no such file")),
    Case("track-backbone-truncated", ["track", SEQ, "--backbone", "truncated.pt", "--out", "t"],
         ("truncated.pt", "truncated")),
    Case("track-backbone-text", ["track", SEQ, "--backbone", "text.pt", "--out", "t"],
         ("text.pt",)),
    Case("track-backbone-pickle", ["track", SEQ, "--backbone", "pickle.pt", "--out", "t"],
         ("pickle.pt",)),
    Case("track-backbone-folder", ["track", SEQ, "--backbone", "run_text", "--out", "t"],
         ("run_text", "folder")),
    Case("track-backbone-not-a-track-cnn",
         ["track", SEQ, "--backbone", "other_model.pt", "--out", "t"], ("conv",)),
    Case("track-update-bdfaa", ["track", SEQ, "--update", "bdfaa"], ("--update",),
         argparse=True),
    Case("track-option-unknown", ["track", SEQ, "--tracker-option", "nosuch=1", "--out", "t"],
         ("nosuch",)),
    # track-eval
    Case("track-eval-missing-root", ["track-eval", "nosuchroot", "--out", "e"], ("nosuchroot",)),
    Case("track-eval-backbone-truncated",
         ["track-eval", "otb", "--backbone", "truncated.pt", "--out", "e"], ("truncated.pt",)),
    Case("track-eval-update-bdfaa", ["track-eval", "otb", "--update", "bp,bdfaa", "--out", "e"],
         ("bdfaa",)),
    Case("track-eval-seeds-x", ["track-eval", "otb", "--seeds", "a", "--out", "e"], ("--seeds",),
         argparse=True),
    # experiment
    Case("experiment-missing-file", ["experiment", "missing.toml"], ("missing.toml",)),
    Case("experiment-method-bdfaa",
         ["experiment", "bad_method.toml", "--runs-root", "xr", "--results-root", "xs"],
         ("bdfaa",)),
    Case("experiment-not-toml",
         ["experiment", "garbage.toml", "--runs-root", "xr", "--results-root", "xs"],
         ("garbage.toml",)),
    Case("experiment-truncated-checkpoint",
         ["experiment", "ok.toml", "--runs-root", "xruns", "--results-root", "xs",
          "--no-progress"], ("checkpoint.pt",)),
    Case("experiment-shard-bad", ["experiment", "ok.toml", "--shard", "3/2"], ("--shard",),
         argparse=True),
    Case("experiment-methods-unknown",
         ["experiment", "ok.toml", "--runs-root", "xr", "--results-root", "xs", "--methods",
          "bp,dfa"], ("no method labelled 'dfa'", "the file has bp")),
    Case("experiment-list-methods-unknown", ["experiment", "ok.toml", "--list", "--methods", "x"],
         ("no method labelled 'x'",)),
    # the second file's label is refused before the first file runs (its checkpoint would fail)
    Case("experiment-methods-unknown-in-second-file",
         ["experiment", "ok.toml", "other.toml", "--runs-root", "xruns", "--results-root", "xs",
          "--no-progress", "--methods", "bp"], ("other: no method labelled 'bp'",)),
    Case("experiment-methods-empty", ["experiment", "ok.toml", "--methods", ","], ("--methods",),
         argparse=True),
    # report
    Case("report-missing-file", ["report", "missing.toml", "--out", "rep/R.md"],
         ("missing.toml",)),
    Case("report-method-bdfaa",
         ["report", "bad_method.toml", "--results-root", "xs", "--out", "rep/R.md"],
         ("bdfaa",)),
    Case("report-not-toml", ["report", "garbage.toml", "--results-root", "xs", "--out",
         "rep/R.md"], ("garbage.toml",)),
]  # fmt: skip


# -- the bad inputs on disk -------------------------------------------------------------------


def _write_inputs(root: Path) -> None:
    # a real trainer checkpoint, then the same cut in half
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10)
    config = dataclasses.asdict(TrainConfig(model="mlp", epochs=1))
    torch.save({"model": model.state_dict(), "config": config, "epoch": 1}, root / "good.pt")
    data = (root / "good.pt").read_bytes()
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "text.pt").write_text("this is not a checkpoint\n")
    torch.save(argparse.Namespace(model=1), root / "pickle.pt")  # refused by weights_only
    torch.save({"model": model.state_dict()}, root / "other_model.pt")  # an MLP, no conv layers
    for run, source in [("run_truncated", "truncated.pt"), ("run_text", "text.pt"),
                        ("run_pickle", "pickle.pt")]:  # fmt: skip
        (root / run).mkdir()
        (root / run / "checkpoint.pt").write_bytes((root / source).read_bytes())
    (root / "run_folder" / "checkpoint.pt").mkdir(parents=True)
    # a tiny OTB sequence
    seq = root / SEQ
    (seq / "img").mkdir(parents=True)
    for t in range(3):
        Image.fromarray(np.full((48, 48, 3), 40 * t, np.uint8)).save(seq / "img" / f"{t + 1}.png")
    (seq / "groundtruth_rect.txt").write_text("10,10,8,8\n" * 3)
    # experiment files: an unknown method, not TOML at all, and a valid one whose (only) cell
    # has a truncated checkpoint to resume from
    (root / "bad_method.toml").write_text(
        'name = "bad"\n[base]\ndataset = "digits"\nepochs = 1\n'
        '[[methods]]\nlabel = "x"\nmethod = "bdfaa"\n'
    )
    (root / "garbage.toml").write_text("this is not toml\n")
    (root / "other.toml").write_text(
        'name = "other"\n[base]\ndataset = "digits"\nmodel = "mlp"\nepochs = 1\n'
        '[[methods]]\nlabel = "dfa"\nmethod = "dfa"\n'
    )
    (root / "ok.toml").write_text(
        'name = "ok"\n[base]\ndataset = "digits"\nmodel = "mlp"\nepochs = 1\n'
        '[[methods]]\nlabel = "bp"\nmethod = "bp"\n'
    )
    (cell,) = load_experiment(root / "ok.toml").cells(None)
    run_dir = root / "xruns" / "ok" / cell.key
    run_dir.mkdir(parents=True)
    (run_dir / "checkpoint.pt").write_bytes((root / "truncated.pt").read_bytes())
    meta = {"config": dataclasses.asdict(cell.config)}
    (run_dir / "config.json").write_text(json.dumps(meta))
    (root / "xruns" / "ok" / f"{cell.key}.lock").touch()


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size if p.is_file() else 0)
        for p in root.rglob("*")
    }


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    _write_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DFATORCH_DATA", raising=False)
    return tmp_path


def _run_in_process(argv: list[str]) -> tuple[int, str, str]:
    """``main(argv)`` as the console script runs it: an uncaught exception is a traceback."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception:
            traceback.print_exc()
            code = 1
    return code, out.getvalue(), err.getvalue()


def _check(case: Case, code: int, out: str, err: str, changed: list[str]) -> None:
    assert code != 0, f"exit 0 for {case.argv}"
    assert "Traceback" not in out + err, err
    lines = err.splitlines()
    assert len(lines) == 1, f"stderr is not one line: {err!r}"
    assert lines[0].startswith("error: "), err
    if case.argparse:  # argparse's errors name the subcommand and the flag
        assert re.match(r"error: dfatorch [\w-]+: argument ", lines[0]), err
    message = lines[0]
    for text in case.must:
        assert text in message, f"{text!r} not in {message!r}"
    for text in case.must_not:
        assert text not in message, f"{text!r} in {message!r}"
    assert changed == [], f"files created or changed: {changed}"


def _changed(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input_is_one_error_line(case: Case, workspace: Path) -> None:
    before = _snapshot(workspace)
    code, out, err = _run_in_process(case.argv)
    _check(case, code, out, err, _changed(before, _snapshot(workspace)))


SUBPROCESS_CASES = [
    Case("track-backbone-truncated", ["track", SEQ, "--backbone", "truncated.pt", "--out", "t"],
         ("truncated.pt",)).param(),
    Case("train-resume-truncated", ["train", "--resume", "run_truncated"],
         ("run_truncated",)).param(),
]  # fmt: skip


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_bad_input_from_the_console(case: Case, workspace: Path) -> None:
    """The same through ``python -m dfatorch``: what a user's shell shows."""
    src = str(Path(dfatorch.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    before = _snapshot(workspace)
    proc = subprocess.run(
        [sys.executable, "-m", "dfatorch", *case.argv],
        capture_output=True,
        text=True,
        env=env,
        cwd=workspace,
        timeout=300,
    )
    _check(case, proc.returncode, proc.stdout, proc.stderr, _changed(before, _snapshot(workspace)))


def test_every_subcommand_is_walked() -> None:
    from dfatorch.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {c.argv[0] for c in CASES} == set(sub.choices)
