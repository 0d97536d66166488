"""The ``dfatorch`` command line: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import traceback
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, with its help, type and choices from the field itself."""
    from .config import TrainConfig, choices

    defaults = TrainConfig()
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata.get("help", "")
        kind = hints[f.name]
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind)
        if base is bool:
            action = parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default
            )
            # set after creation: some Python versions append their own "(default: ...)"
            action.help = help_text + ("" if default is None else f" (default: {default})")
            continue
        converter: Any = base if base in (int, float) else str
        shown = "" if default is None else f" (default: {default})"
        parser.add_argument(
            flag,
            type=converter,
            default=default,
            choices=choices(f.name),
            metavar=f.name.upper() if choices(f.name) is None else None,
            help=help_text + shown,
        )


def _config_from(args: argparse.Namespace, **overrides: Any) -> Any:
    from .train import TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    values.update(overrides)
    return TrainConfig(**values)


def _resume_line() -> Any:
    """A trainer callback that prints where a resumed run continues."""
    from .callbacks import Callback

    class ResumeLine(Callback):
        def on_train_start(self, state: Any) -> None:
            if state.start_epoch or state.start_batch:
                at = f"epoch {state.start_epoch + 1}, batch {state.start_batch + 1}"
                print(f"resuming from {at} ({state.run_dir})", flush=True)

    return ResumeLine()


def _print_summary(rows: list[tuple[str, list[dict[str, Any]]]]) -> None:
    from .train import summary_table

    print(summary_table(rows))


def _rank() -> int:
    """This process's rank under torchrun or ``--nproc`` (0 when not data-parallel)."""
    return int(os.environ.get("RANK", "0") or 0)


def _without_option(argv: Sequence[str], flag: str) -> list[str]:
    """``argv`` less ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == flag:
            skip = True
        elif not token.startswith(flag + "="):
            out.append(token)
    return out


def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run this command again in ``args.nproc`` data-parallel processes."""
    from .distributed import launch

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--nproc inside a data-parallel job (torchrun): leave it out")
    return launch(argv, args.nproc)


def cmd_train(args: argparse.Namespace) -> int:
    from .experiment import INTERRUPTED_EXIT
    from .train import train

    if args.nproc > 1:
        if not args.resume:
            _config_from(args)  # a bad option fails here, once, not in every process
        return _launch(args, _without_option(args.argv, "--nproc"))
    if args.resume:
        run_dir = Path(args.resume)
        config = None
    else:
        config = _config_from(args)
        name = f"{config.dataset}-{config.model}-{config.method}-{config.scope}-s{config.seed}"
        run_dir = Path(args.out) if args.out else Path("runs") / name
    result = train(
        config,
        run_dir,
        resume=bool(args.resume),
        epochs=args.epochs if args.resume and args.epochs_given else None,
        progress=not args.no_progress,
        on_epoch=None if args.no_progress else _epoch_line,
        callbacks=[_resume_line()],
    )
    if _rank() != 0:
        return INTERRUPTED_EXIT if result.stop_requested else 0
    _print_summary([(str(run_dir), result.history)])
    print(f"run folder: {run_dir}")
    if result.interrupted:
        print(f"interrupted: checkpoint saved; continue with: dfatorch train --resume {run_dir}")
    return INTERRUPTED_EXIT if result.stop_requested else 0


def _epoch_line(record: dict[str, Any]) -> None:
    split = "test" if record.get("test_acc") is not None else "val"
    print(
        f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f} acc "
        f"{record['train_acc']:.4f}  {split} loss {record[f'{split}_loss']:.4f} acc "
        f"{record[f'{split}_acc']:.4f}  {record['epoch_seconds']:.1f}s "
        f"({record['images_per_second']:.0f} img/s)",
        flush=True,
    )


def parse_method(token: str, default_scope: str) -> dict[str, str]:
    """``"bdfa"`` or ``"bdfa:fc"`` -> ``{"method": "bdfa", "scope": "fc"}``."""
    from .config import choices

    method, _, scope = token.strip().partition(":")
    methods, scopes = choices("method") or [], choices("scope") or []
    if method not in methods or (scope and scope not in scopes):
        raise ValueError(
            f"--methods: {token.strip()!r} is not METHOD[:SCOPE] with METHOD one of "
            f"{', '.join(methods)} and SCOPE one of {', '.join(scopes)} (e.g. dfa:all)"
        )
    return {"method": method, "scope": scope or default_scope}


def cmd_compare(args: argparse.Namespace) -> int:
    from .plots import plot_curves
    from .rundir import RunDir
    from .train import read_metrics, train

    specs = [parse_method(t, args.scope) for t in args.methods.split(",") if t.strip()]
    out = Path(args.out or f"runs/compare-{args.dataset}-{args.model}")
    rows = []
    for spec in specs:
        label = spec["method"] if spec["method"] == "bp" else f"{spec['method']}-{spec['scope']}"
        run_dir = out / label
        if not RunDir(run_dir).is_finished():
            print(f"== {label} ==", flush=True)
            resume = RunDir(run_dir).checkpoint.exists()
            train(
                None if resume else _config_from(args, **spec),
                run_dir,
                resume=resume,
                progress=not args.no_progress,
            )
        rows.append((label, read_metrics(run_dir)))
    _print_summary(rows)
    png = plot_curves(dict(rows), out / "compare.png", title=f"{args.dataset} / {args.model}")
    (out / "compare.json").write_text(json.dumps({k: v for k, v in rows}, indent=1))
    print(f"plot: {png}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_curves, plot_probes
    from .train import read_metrics

    runs = {Path(d).name or str(d): read_metrics(d) for d in args.run_dirs}
    empty = [k for k, v in runs.items() if not v]
    if empty:
        print(f"error: no metrics.jsonl records in {empty}", file=sys.stderr)
        return 2
    print(f"plot: {plot_curves(runs, args.out)}")
    out = Path(args.out)
    aligned = plot_probes(runs, out.with_name(out.stem + "-alignment" + out.suffix))
    if aligned is not None:
        print(f"alignment plot (every probe field logged): {aligned}")
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from .alignment import gradient_alignment
    from .train import probe_batch

    engine, x, y, loss_fn = probe_batch(args.run_dir, batch_size=args.batch_size, split=args.split)
    report = gradient_alignment(engine, x, y, loss_fn)
    rows = [("layer", "rule", "cos mean", "cos std", "scale", "samples", "W_out angle")]
    for a in report:
        angle = "-" if a.weight_angle is None else f"{a.weight_angle:.1f} deg"
        cells = (f"{a.mean:.4f}", f"{a.std:.4f}", f"{a.scale:.3g}", str(a.samples), angle)
        rows.append((a.name, a.rule, *cells))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    from .rundir import RunDir

    out = RunDir(args.run_dir).alignment
    out.write_text(json.dumps([a.as_dict() for a in report], indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard wants I/N, e.g. 0/2, got {text!r}") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _labels(text: str) -> list[str]:
    labels = [t.strip() for t in text.split(",") if t.strip()]
    if not labels:
        raise argparse.ArgumentTypeError(f"--methods wants labels, comma-separated: {text!r}")
    return labels


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiment import INTERRUPTED_EXIT, load_experiment, method_labels, run_experiment

    experiments = [load_experiment(file) for file in args.files]  # every file's errors first
    wanted = {exp.name: method_labels(exp, args.methods) for exp in experiments}
    for exp in experiments:
        if args.list:
            from collections import Counter

            from .experiment import cell_status, search_cells, search_diverged, select

            results = Path(args.results_root) / exp.name
            chosen, searched = select(exp, results)
            cells = search_cells(exp, results) + exp.cells(chosen if exp.tune else None)
            cells += exp.convergence_cells(chosen)
            cells = [c for c in cells if c.labels["method"] in wanted[exp.name]]
            width = max((len(c.key) for c in cells), default=0)
            counts: Counter[str] = Counter()
            for cell in cells:
                status = cell_status(Path(args.runs_root) / exp.name, results, cell)
                counts[status] += 1
                print(f"{cell.key:<{width}}  {status}")
            open_searches = {exp.search_group(c.labels) for c in exp.tuning_cells()
                             if c.labels["method"] in wanted[exp.name]}  # fmt: skip
            open_searches -= {*chosen, *search_diverged(searched)}
            waiting = (f"; {len(open_searches)} searches unfinished, their measured cells (and "
                       "checks) not listed yet" if open_searches else "")  # fmt: skip
            print(f"{exp.name}: {len(cells)} cells: "
                  + ", ".join(f"{n} {s}" for s, n in counts.most_common()) + waiting)  # fmt: skip
            continue
        try:
            summary = run_experiment(
                exp,
                runs_root=args.runs_root,
                results_root=args.results_root,
                shard=args.shard,
                progress=not args.no_progress,
                nproc=args.nproc or exp.nproc,
                methods=args.methods,
            )
        except KeyboardInterrupt:
            print(f"{exp.name}: stopped; the same command resumes the sweep from the last "
                  "checkpoint")  # fmt: skip
            return INTERRUPTED_EXIT
        checks = summary["checks_missing"]
        print(f"{exp.name}: {len(summary['rows'])} rows, {summary['cells_missing']} cells missing"
              + (f", {checks} convergence-check runs missing" if checks else ""))  # fmt: skip
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    # the whole report opens with the verdicts; a report of named files only if asked
    default = Path("experiments/claims.toml")
    claims = Path(args.claims) if args.claims else None
    if claims is None and not args.files and default.exists():
        claims = default
    files = args.files or sorted(
        str(p) for p in Path("experiments").glob("*.toml") if p.resolve() != default.resolve()
    )
    written = write_report(files, results_root=args.results_root, out=args.out, claims=claims)
    print(f"wrote {written}")
    return 0


NPROC_HELP = (
    "train data-parallel in N processes on this machine (gloo on the CPU, NCCL on GPUs; each "
    "global batch of --batch-size is shared by the processes); torchrun --nproc-per-node N -m "
    "dfatorch train ... does the same (default: 1)"
)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2, got {text!r}") from None


def tracker_config(options: Sequence[str], preset: str = "default") -> Any:
    """A TrackerConfig: the ``preset`` with ``KEY=VALUE`` strings (values parsed as JSON where
    they can be) over it."""
    from .tracking import TrackerConfig

    fields = {f.name: f for f in dataclasses.fields(TrackerConfig)}
    values: dict[str, Any] = {}
    for option in options:
        key, sep, text = option.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"--tracker-option {option!r}: want KEY=VALUE with KEY one of {sorted(fields)}"
            )
        if fields[key].type in ("bool", bool):  # a string "False" would be truthy
            if text.strip().lower() not in ("true", "false"):
                raise ValueError(f"--tracker-option {option!r}: {key} is true or false")
            values[key] = text.strip().lower() == "true"
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        values[key] = tuple(value) if isinstance(value, list) else value
    return TrackerConfig.preset(preset, **values)


def cmd_track(args: argparse.Namespace) -> int:
    from .tracking import track_sequence

    result = track_sequence(
        args.seq_dir,
        update=args.update,
        out_dir=args.out,
        backbone=args.backbone,
        seed=args.seed,
        progress=not args.no_progress,
        config=tracker_config(args.tracker_option, args.tracker_preset),
    )
    print(
        f"{result.name}: success {result.success_auc:.3f}, precision@20 {result.precision20:.3f}, "
        f"{result.fps:.1f} fps ({result.update_seconds:.2f} s in online updates); wrote {args.out}"
    )
    return 0


def cmd_track_eval(args: argparse.Namespace) -> int:
    from .tracking import evaluate_updates

    updates = [u.strip() for u in args.update.split(",") if u.strip()]
    evaluate_updates(
        args.root,
        updates=updates,
        seeds=args.seeds,
        out_dir=args.out,
        backbone=args.backbone,
        progress=not args.no_progress,
        config=tracker_config(args.tracker_option, args.tracker_preset),
    )
    print((Path(args.out) / "report.md").read_text())
    return 0


def _add_tracker_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backbone",
        help="conv backbone: a checkpoint of `dfatorch train --model track_cnn ...` (or a state "
        "dict); default: random conv layers (a baseline, warned about)",
    )
    parser.add_argument(
        "--tracker-preset",
        default="default",
        metavar="NAME",
        help="default, realtime or mdnet. realtime: fc4 fixed after the first frame, online "
        "updates several times cheaper (30 fps for bdfa on 2 cores); mdnet: MDNet's own sizes "
        "(about 5x the update cost); --tracker-option values apply over it",
    )
    parser.add_argument(
        "--tracker-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrackerConfig field, e.g. fc4_from_backbone=true (repeatable)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: dfatorch train: argument --epochs: ...``."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="dfatorch",
        description="Train networks by DFA, binary DFA and Han & Yoo's hybrid BP+DFA.",
    )
    parser.add_argument("--version", action="version", version=f"dfatorch {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train one model", description="Train one model.")
    _add_config_arguments(p)
    p.add_argument("--out", help="run folder (default: runs/DATASET-MODEL-METHOD-SCOPE-sSEED)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR exactly")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or epoch lines")
    p.add_argument("--nproc", type=_positive_int, default=1, metavar="N",
                   help=NPROC_HELP)  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "compare",
        help="train several methods on the same data, seed and budget; table and plot",
        description="Train several methods on the same data, seed and budget.",
    )
    _add_config_arguments(p)
    p.add_argument(
        "--methods", default="bp,dfa,bdfa", help="e.g. bp,dfa,bdfa or bp,dfa:all,bdfa:fc"
    )
    p.add_argument(
        "--out", help="folder for the runs, table and plot (default: runs/compare-DATASET-MODEL)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="draw the curves of runs", description="Draw run curves.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="curves.png", help="PNG file to write (default: curves.png)")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "align",
        help="gradient alignment per layer of a saved run, on one probe batch",
        description="Cosine between the engine's signal and the true gradient, per hidden layer.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--batch-size", type=int, default=256, help="probe batch size")
    p.add_argument("--split", choices=["train", "test"], default="train")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser(
        "track",
        help="track one OTB sequence with the MDNet-style tracker (online FC updates by a rule)",
        description="Track SEQ_DIR (OTB layout); write boxes (OTB format) and annotated frames.",
    )
    p.add_argument("seq_dir", metavar="SEQ_DIR")
    p.add_argument(
        "--update",
        default="bdfa",
        choices=["bp", "dfa", "bdfa"],
        help="rule of the online updates of the fully connected layers (default: bdfa)",
    )
    p.add_argument("--out", default="runs/track", help="output folder (default: runs/track)")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds sampling and the online updates (default: 0)"
    )
    _add_tracker_arguments(p)
    p.set_defaults(func=cmd_track)

    p = sub.add_parser(
        "track-eval",
        help="OTB one-pass evaluation of update rules over every sequence under ROOT",
        description="Run every sequence under ROOT with each rule and seed; tables and plots.",
    )
    p.add_argument("root", metavar="ROOT")
    p.add_argument("--update", default="bp,dfa,bdfa", help="rules to compare (default: all)")
    p.add_argument("--seeds", type=_int_list, default=[0, 1, 2], help="default: 0,1,2")
    p.add_argument("--out", default="runs/track-eval", help="output folder (resumable)")
    _add_tracker_arguments(p)
    p.set_defaults(func=cmd_track_eval)

    p = sub.add_parser(
        "experiment",
        help="run the cells of experiment files (finished cells are skipped)",
        description="Run every unfinished cell of experiment files, then aggregate.",
    )
    p.add_argument("files", nargs="+", metavar="FILE.toml")
    p.add_argument(
        "--runs-root",
        default="runs/experiments",
        help="run folders with checkpoints (default: runs/experiments)",
    )
    p.add_argument(
        "--results-root",
        default="experiments/results",
        help="results to commit (default: experiments/results)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        default=(0, 1),
        help="only every N-th cell from I (I/N), to split cells between machines; workers "
        "on one machine need no shards: they skip cells another worker holds",
    )
    p.add_argument(
        "--list",
        action="store_true",
        help="list the cells and where each stands (done, running, pending...), and exit",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=_positive_int, default=None, metavar="N",
                   help="train each cell in N data-parallel processes (default: the file's "
                        "nproc, else 1)")  # fmt: skip
    p.add_argument("--methods", type=_labels, default=None, metavar="LABEL[,LABEL...]",
                   help="run (or list) only these methods' cells, searches and checks "
                        "included, to spend scarce compute on one comparison first "
                        "(default: all)")  # fmt: skip
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser(
        "report",
        help="write docs/RESULTS.md and its plots from experiment results",
        description="Generate docs/RESULTS.md from experiments/results.",
    )
    p.add_argument("files", nargs="*", metavar="FILE.toml", help="default: experiments/*.toml")
    p.add_argument(
        "--results-root",
        default="experiments/results",
        help="where the results are (default: experiments/results)",
    )
    p.add_argument("--out", default="docs/RESULTS.md", help="default: docs/RESULTS.md")
    p.add_argument(
        "--claims",
        metavar="FILE.toml",
        help="the claims the report opens with a verdict on (default, when no experiment files "
        "are named: experiments/claims.toml)",
    )
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    args.epochs_given = "--epochs" in argv
    args.argv = argv
    from .callbacks import TrainingDiverged
    from .distributed import RankLost
    from .train import flush_denormals

    # in a data-parallel job every rank may report the same error: say which one speaks
    data_parallel = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    prefix = f"error (rank {_rank()}): " if data_parallel else "error: "
    try:
        # the whole command, so that PyTorch's worker threads start with the flag and keep it
        with flush_denormals():
            return int(args.func(args))
    except TrainingDiverged as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return 3
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return 2
    except RankLost as exc:
        print(f"{prefix}{exc}", file=sys.stderr)
        return 4


def run() -> None:
    """The ``dfatorch`` command (console script and ``python -m dfatorch``): :func:`main`, then
    the exit. A rank of a data-parallel job (``WORLD_SIZE > 1``: :func:`launch`, torchrun) leaves
    without interpreter finalisation: gloo's worker threads may still hold tensors then, and
    destroying them during finalisation can abort a rank whose run has finished ("terminate
    called without an active exception", SIGABRT), failing the job. Its files are written and
    closed by then (atomically, by the trainer); what the rank printed is flushed first."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        raise SystemExit(main())
    try:
        code = main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        code = 130
    except BaseException:  # the traceback a normal exit would print, then the same exit code
        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
