"""What every benchmark script shares: the command line it records and how it emits its JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dfatorch._io import portable_path


def command(script: str, argv: list[str] | None) -> str:
    """The command that repeats this run, with paths as records keep them (no machine folders)."""
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["python", f"benchmarks/{Path(script).name}", *map(portable_path, args)])


def options(args: argparse.Namespace, *, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The parsed options, for the record, with paths kept as :func:`command` keeps them."""
    return {
        k: portable_path(v) if isinstance(v, str | Path) and v else v
        for k, v in vars(args).items()
        if k not in skip
    }


def emit(report: dict[str, Any], out: str | Path | None, *, indent: int = 2) -> None:
    """Print the report as JSON and, with ``out``, also write it there."""
    text = json.dumps(report, indent=indent)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
