"""Warnings as one ``warning:`` line; progress bars without carriage returns off a terminal."""

from __future__ import annotations

import io
import logging

import pytest
from tqdm import tqdm

from dfatorch._console import LineProgress, progress_bar, warn


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_warning_is_one_plain_line_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    warn("the conv layers are\n  randomly initialised")
    captured = capsys.readouterr()
    assert captured.err == "warning: the conv layers are randomly initialised\n"
    assert captured.out == ""


def test_python_users_can_silence_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    log = logging.getLogger("dfatorch")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        warn("not shown")
    finally:
        log.setLevel(level)
    assert capsys.readouterr().err == ""
    warn("shown again")
    assert capsys.readouterr().err == "warning: shown again\n"


def test_off_a_terminal_whole_lines_at_every_tenth() -> None:
    stream = io.StringIO()
    bar = progress_bar(200, "epoch 1/3", True, file=stream, min_interval=0)
    assert isinstance(bar, LineProgress)
    for step in range(200):
        bar.update(1)
        if step == 100:
            bar.set_postfix(loss="0.4210")
    bar.close()
    bar.close()  # a second close writes nothing
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text
    lines = text.splitlines()
    assert [line.split(": ")[1].split()[0] for line in lines[:-1]] == [
        f"{p}%" for p in range(10, 100, 10)
    ]
    assert lines[0].startswith("epoch 1/3: 10% (20/200 it) ")
    assert lines[-1].startswith("epoch 1/3: 100% (200/200 it) ") and "done" in lines[-1]
    assert lines[-1].endswith("loss=0.4210")
    assert text.endswith("\n")


def test_off_a_terminal_no_line_flood() -> None:
    # a short bar (under min_interval) writes only its closing line; with leave=False, nothing
    stream = io.StringIO()
    with progress_bar(1000, "fast", True, file=stream) as bar:
        bar.update(1000)
    assert stream.getvalue().count("\n") == 1
    stream = io.StringIO()
    with progress_bar(1000, "fast", True, file=stream, leave=False) as bar:
        for _ in range(1000):
            bar.update(1)
    assert stream.getvalue() == ""


def test_iterating_and_byte_counts_off_a_terminal() -> None:
    stream = io.StringIO()
    seen = list(progress_bar(None, "cells", True, iterable=range(5), file=stream, min_interval=0))
    assert seen == [0, 1, 2, 3, 4]
    assert stream.getvalue().splitlines()[-1].startswith("cells: 100% (5/5 it) ")
    stream = io.StringIO()
    bar = progress_bar(None, "file.gz", True, file=stream, unit="B", unit_scale=True)
    bar.update(3_000_000)
    bar.close()
    assert stream.getvalue().startswith("file.gz: (3.00M B) ")


def test_on_a_terminal_a_tqdm_bar_and_disabled_is_silent() -> None:
    terminal = _Terminal()
    bar = progress_bar(10, "x", True, file=terminal)
    assert isinstance(bar, tqdm) and not bar.disable
    bar.update(10)
    bar.close()
    assert "\r" in terminal.getvalue()  # the live bar redraws in place
    quiet = io.StringIO()
    bar = progress_bar(10, "x", False, file=quiet)
    assert isinstance(bar, tqdm) and bar.disable
    assert list(progress_bar(3, "x", False, iterable=range(3), file=quiet)) == [0, 1, 2]
    bar.update(10)
    bar.close()
    assert quiet.getvalue() == ""
