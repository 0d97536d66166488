"""The published claims that ``docs/RESULTS.md`` opens with, and their verdicts from our runs.

A claims file (``experiments/claims.toml``) lists each claim with the comparisons that test it::

    [[claims]]
    id = "(5)"
    source = "Han & Yoo 2019"
    text = "The hybrid with binary feedback beats BP when the training set is small"
    kind = "above"          # "below", "above", or "within" (with margin, in points)
    [[claims.evidence]]     # the first is the primary setting
    experiment = "cifar10-small-data"
    method = "bdfa-fc"
    reference = "bp"
    at = { fraction = 0.02 }
    baseline_at = { ... }   # optional: compare the difference at `at` with the one here
    reference_experiment = "..."  # optional: the reference's runs come from this experiment

or, for a claim no run tests, ``not_tested = "why"``. Each comparison is the difference of final
test accuracy (points) between the two methods' seeds at one grid point, with a 95% t interval
(:func:`dfatorch._stats.seed_contrast`): paired over seeds where both methods ran the same seeds
(a seed fixes the training subset, batch order and initial weights), Welch's otherwise; with
``baseline_at``, the difference at ``at`` minus the difference at ``baseline_at`` (a difference of
differences), as in "DFA's gap to BP at a narrow layer, against its gap at full width". With
``reference_experiment``, the reference's runs come from another experiment: for a follow-up run
to the same budget and seeds (a rerun at another learning rate), paired by seed as within one. A
comparison's verdict follows from its interval only:

- ``below`` (the claim says A < B): *holds* if the interval lies below 0, *contradicted* if above;
- ``above`` (A > B): *holds* if above 0, *contradicted* if below;
- ``within`` (A is no more than ``margin`` points below B): *holds* if the interval lies above
  ``−margin``, *contradicted* if below it;
- otherwise *not shown* (the interval straddles the boundary); *no interval* with one seed on
  either side; *not run* where the cells are missing;
- *not converged*, whatever the interval says, where the experiment checks convergence
  (``[tune] check_longer``) and the check of either method at that point failed (its longer run
  gained :data:`~dfatorch.experiment.CONVERGED_POINTS` or more); *not checked* where it checks
  convergence but the check of either method at that point has not finished, or diverged.

A claim's verdict combines its comparisons that have an interval: the common verdict if they
agree, else *mixed* with the counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._io import read_toml
from ._stats import Difference, seed_contrast
from .experiment import CONVERGED_POINTS, format_point

__all__ = ["Claim", "Comparison", "Evidence", "evaluate", "load_claims", "verdict_tables"]

KINDS = ("below", "above", "within")
LEVEL = 0.95


@dataclass(frozen=True)
class Evidence:
    """One comparison that tests a claim: ``method − reference`` in ``experiment`` at ``at``."""

    experiment: str
    method: str
    reference: str
    at: dict[str, Any] = field(default_factory=dict)
    baseline_at: dict[str, Any] | None = None
    label: str = ""
    #: the experiment that holds ``reference``'s runs, if not ``experiment``
    reference_experiment: str | None = None


@dataclass(frozen=True)
class Claim:
    """A published claim, the direction our data must show, and the comparisons that test it."""

    id: str
    source: str
    text: str
    kind: str = "above"
    margin: float = 0.0
    evidence: tuple[Evidence, ...] = ()
    not_tested: str = ""


@dataclass(frozen=True)
class Comparison:
    """An evidence row measured: the difference in points and its verdict."""

    evidence: Evidence
    difference: Difference | None
    verdict: str
    #: seeds of either side that diverged, left out of the difference (a verdict on survivors)
    diverged: int = 0
    #: the interval's verdict, kept where ``verdict`` is "not converged" or "not checked"
    interval_verdict: str = ""
    #: ``(side, gain in points)`` of each side whose convergence check failed (a side: the
    #: method, with its grid point where the comparison has a ``baseline_at``)
    unconverged: tuple[tuple[str, float], ...] = ()
    #: ``(side, why)`` of each side whose convergence check tells nothing: "has not finished"
    #: or "diverged"
    unchecked: tuple[tuple[str, str], ...] = ()


def load_claims(path: str | Path) -> list[Claim]:
    """Read and check a claims file (see the module docstring)."""
    path = Path(path)
    data = read_toml(path, "claims file")
    claims = []
    for i, raw in enumerate(data.get("claims", [])):
        where = f"{path}: claim {raw.get('id', i + 1)}"
        missing = [k for k in ("id", "source", "text") if k not in raw]
        if missing:
            raise ValueError(f"{where} lacks {missing}")
        kind = raw.get("kind", "above")
        if kind not in KINDS:
            raise ValueError(f"{where}: kind {kind!r} is not one of {list(KINDS)}")
        if kind == "within" and float(raw.get("margin", 0.0)) <= 0:
            raise ValueError(f"{where}: kind 'within' needs a positive margin (points)")
        evidence = []
        for ev in raw.get("evidence", []):
            known = {
                "experiment", "method", "reference", "at", "baseline_at", "label",
                "reference_experiment",
            }  # fmt: skip
            if set(ev) - known or not {"experiment", "method", "reference"} <= set(ev):
                raise ValueError(
                    f"{where}: evidence takes experiment, method, reference (required), at, "
                    "baseline_at, label and reference_experiment"
                )
            evidence.append(Evidence(**{**ev, "at": dict(ev.get("at", {}))}))
        if not evidence and not raw.get("not_tested"):
            raise ValueError(f"{where}: give evidence, or say why it is not tested (not_tested)")
        claims.append(
            Claim(
                id=str(raw["id"]),
                source=raw["source"],
                text=raw["text"],
                kind=kind,
                margin=float(raw.get("margin", 0.0)),
                evidence=tuple(evidence),
                not_tested=str(raw.get("not_tested", "")),
            )
        )
    return claims


def _finals(
    summary: Mapping[str, Any], method: str, at: Mapping[str, Any]
) -> tuple[list[tuple[Any, float]] | None, int]:
    """``(seed, final test accuracy in points)`` of ``method``'s seeds at the grid point ``at``,
    and how many of its seeds diverged (``-1``: every value its search tried diverged, so none
    ran)."""
    rows = [
        r
        for r in summary["rows"]
        if r["method"] == method and all(r.get(k) == v for k, v in at.items())
    ]
    if len(rows) > 1:
        raise ValueError(
            f"{summary['name']}: {method} at {dict(at)} matches {len(rows)} grid points; "
            "name the other axes in `at`"
        )
    if not rows:
        if any(g.split("/")[0] == method for g in summary.get("search_diverged", [])):
            return None, -1
        if summary.get("cells_missing"):  # the sweep has not reached it (or its search) yet
            return None, 0
        raise ValueError(f"{summary['name']}: no grid point for {method} at {dict(at)}")
    finals = [
        (r.get("seed"), 100 * r["final_acc"]) for r in rows[0]["runs"] if r["final_acc"] is not None
    ]
    return finals or None, int(rows[0].get("diverged", 0))


def _check_of(
    summary: Mapping[str, Any], method: str, at: Mapping[str, Any]
) -> Mapping[str, Any] | None:
    """``method``'s convergence check at ``at`` (``[tune] check_longer``), finished or not; None
    where the experiment has none there."""
    for check in (summary.get("convergence") or {}).values():
        if check["method"] == method and all(check["at"].get(k, v) == v for k, v in at.items()):
            return check
    return None


def _gain(check: Mapping[str, Any]) -> float | None:
    """The points of validation accuracy a convergence check gained from the longer schedule;
    None while either run has not finished, or if either diverged."""
    short, long = check["val_acc"]
    return None if short is None or long is None else 100 * (long - short)


def _verdict(kind: str, margin: float, d: Difference) -> str:
    if d.low is None or d.high is None:
        return "no interval"
    bound = -margin if kind == "within" else 0.0
    if kind == "below":
        return "holds" if d.high < bound else "contradicted" if d.low > bound else "not shown"
    return "holds" if d.low > bound else "contradicted" if d.high < bound else "not shown"


def evaluate(claim: Claim, summaries: Mapping[str, Mapping[str, Any]]) -> list[Comparison]:
    """Measure every comparison of ``claim`` in the experiment summaries (by experiment name)."""
    out = []
    for ev in claim.evidence:
        home = ev.reference_experiment or ev.experiment
        for name in (ev.experiment, home):
            if name not in summaries:
                raise ValueError(f"claim {claim.id}: no experiment named {name!r}")
        sides = ((summaries[ev.experiment], ev.method), (summaries[home], ev.reference))
        points = [ev.at] if ev.baseline_at is None else [ev.at, ev.baseline_at]
        found = [_finals(summary, m, at) for at in points for summary, m in sides]
        groups = [finals for finals, _ in found]
        diverged = [n for _, n in found]
        if any(g is None for g in groups):
            if -1 in diverged:
                why = "every searched value diverged"
            elif any(n > 0 for n in diverged):
                why = "every seed diverged"
            else:
                why = "not run"
            out.append(Comparison(ev, None, why))
            continue
        weights = [1.0, -1.0] if ev.baseline_at is None else [1.0, -1.0, -1.0, 1.0]
        d = seed_contrast(groups, weights, LEVEL)  # type: ignore[arg-type]
        verdict = _verdict(claim.kind, claim.margin, d)
        late: dict[str, float] = {}
        unchecked: dict[str, str] = {}
        for at in points:
            for summary, m in sides:
                check = _check_of(summary, m, at)
                if check is None:
                    continue
                side = m if ev.baseline_at is None else f"{m} at {format_point(at)}"
                gain = _gain(check)
                if gain is not None and gain >= CONVERGED_POINTS:
                    late[side] = gain
                elif gain is None:  # a diverged run is finished, but tells nothing either
                    unchecked[side] = "diverged" if any(check["diverged"]) else "has not finished"
        if late:
            out.append(Comparison(ev, d, "not converged", sum(diverged), verdict,
                                  tuple(late.items())))  # fmt: skip
        elif unchecked:
            out.append(Comparison(ev, d, "not checked", sum(diverged), verdict,
                                  unchecked=tuple(unchecked.items())))  # fmt: skip
        else:
            out.append(Comparison(ev, d, verdict, sum(diverged)))
    return out


def overall(comparisons: Sequence[Comparison]) -> str:
    """A claim's verdict: the common verdict of its comparisons that have an interval, or how
    they split."""
    if not comparisons:
        return "not tested"
    decided = Counter(
        c.verdict for c in comparisons if c.difference and c.difference.low is not None
    )
    if not decided:
        return "no interval" if any(c.difference for c in comparisons) else "not run"
    n = sum(decided.values())
    if len(decided) == 1:
        verdict = next(iter(decided))
        return f"{verdict} ({n} of {n} settings)" if n > 1 else verdict
    ranked = sorted(decided.items(), key=lambda kv: (-kv[1], kv[0]))
    return "mixed: " + "; ".join(f"{v} in {k} of {n}" for v, k in ranked)


def _setting(ev: Evidence) -> str:
    where = format_point(ev.at)
    if ev.baseline_at is not None:
        where += f", against {format_point(ev.baseline_at)}"
    label = f": {ev.label}" if ev.label else ""
    return ev.experiment + (f" ({where})" if where else "") + label


def _compared(ev: Evidence) -> str:
    reference = ev.reference
    if ev.reference_experiment:
        reference += f" of {ev.reference_experiment}"
    if ev.baseline_at is None:
        return f"{ev.method} − {reference}"
    return f"({ev.method} − {reference}) − the same at {format_point(ev.baseline_at)}"


def _interval(c: Comparison) -> tuple[str, str, str]:
    d = c.difference
    if d is None:
        return "-", "-", "-"
    seeds = " vs ".join(str(k) for k in d.n) + " seeds"
    if c.diverged:
        seeds += f" ({c.diverged} more diverged, left out)"
    if d.low is None or d.high is None or d.p is None:
        return f"{d.diff:+.2f}", "-", seeds
    p = f"{d.p:.2g}" if d.p >= 1e-4 else "<1e-4"
    return (
        f"{d.diff:+.2f}",
        f"[{d.low:+.2f}, {d.high:+.2f}]",
        f"{d.test}, {seeds}, p(no difference) = {p}",
    )


def _claim_text(claim: Claim) -> str:
    if claim.not_tested:
        return f"{claim.id} {claim.source}: {claim.text}"
    target = {
        "below": "below 0",
        "above": "above 0",
        "within": f"above −{claim.margin:g}",
    }[claim.kind]
    return f"{claim.id} {claim.source}: {claim.text} (needs the difference {target})"


def verdict_tables(
    claims: Sequence[Claim], summaries: Mapping[str, Mapping[str, Any]]
) -> tuple[list[str], list[str]]:
    """The verdict table (one row per claim: verdict, primary setting's difference, 95% interval,
    test, sections) and the table of every comparison behind it, as Markdown lines."""
    head = [
        "| claim | verdict | difference, primary setting (points) | 95% interval | test "
        "| sections |",
        "|---|---|---|---|---|---|",
    ]
    detail = [
        "| claim | setting | compared | difference (points) | 95% interval | test | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for claim in claims:
        if claim.not_tested:
            why = f"**not tested**: {claim.not_tested}"
            head.append(f"| {_claim_text(claim)} | {why} | - | - | - | - |")
            continue
        comparisons = evaluate(claim, summaries)
        first = comparisons[0]
        diff, interval, test = _interval(first)
        if first.difference is None:  # say why the primary setting has no number
            test = first.verdict
        compared = _compared(first.evidence)
        sections = sorted(
            {
                e
                for c in comparisons
                for e in (c.evidence.experiment, c.evidence.reference_experiment)
            }
            - {None}
        )
        links = ", ".join(f"[{s}](#{s})" for s in sections)
        head.append(
            f"| {_claim_text(claim)} | **{overall(comparisons)}** | {compared}, "
            f"{_setting(first.evidence)}: {diff} | {interval} | {test} | {links} |"
        )
        for c in comparisons:
            diff, interval, test = _interval(c)
            verdict = c.verdict
            if c.unconverged:
                gains = ", ".join(f"{m} {g:+.2f}" for m, g in c.unconverged)
                verdict += (f" (the interval alone: {c.interval_verdict}; the longer check run "
                            f"gained {gains} points)")  # fmt: skip
            elif c.unchecked:
                why = ", ".join(f"of {side} {reason}" for side, reason in c.unchecked)
                verdict += (f" (the interval alone: {c.interval_verdict}; the convergence check "
                            f"{why})")  # fmt: skip
            detail.append(
                f"| {claim.id} | {_setting(c.evidence)} | {_compared(c.evidence)} | {diff} | "
                f"{interval} | {test} | {verdict} |"
            )
    return head, detail
