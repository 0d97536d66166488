"""Choosing the tracker's settings without scoring on the sequences they were chosen on.

With a handful of sequences there is no separate test set, so each sequence is held out in turn
(leave-one-sequence-out): every rule's setting is the one with the best mean success on the
*other* sequences, and that setting's runs on the held-out sequence are its score. The scores of a
rule therefore never saw the sequence they are measured on. Pure functions over
``scores[setting][rule][sequence][seed] -> success AUC`` (read from ``track-eval`` folders by
:func:`load_scores`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .._stats import Difference, paired

__all__ = ["HeldOut", "Scores", "candidates", "complete_settings", "leave_one_out", "load_scores",
           "paired_difference", "paired_runs", "shared_runs"]  # fmt: skip

#: ``scores[setting][rule][sequence][seed]``: success AUC of one run
Scores = Mapping[str, Mapping[str, Mapping[str, Mapping[int, float]]]]


@dataclass(frozen=True)
class HeldOut:
    """One rule's score on one held-out sequence.

    Attributes:
        rule: the update rule.
        sequence: the held-out sequence.
        setting: the setting chosen on the other sequences.
        tuning_success: that setting's mean success there (all seeds, sequences weighed alike).
        success: its success on the held-out sequence, per seed.
    """

    rule: str
    sequence: str
    setting: str
    tuning_success: float
    success: Mapping[int, float]


def complete_settings(scores: Scores, rule: str) -> list[str]:
    """The settings (in ``scores``' order) with a run of ``rule`` for every sequence and every
    seed that any setting has for it (the full grid): only those can be compared fairly."""
    runs = {s: scores[s].get(rule, {}) for s in scores}
    sequences = {q for per in runs.values() for q in per}
    seeds = {seed for per in runs.values() for by_seed in per.values() for seed in by_seed}
    return [s for s, per in runs.items() if sequences
            and all(seed in per.get(q, {}) for q in sequences for seed in seeds)]  # fmt: skip


def candidates(scores: Scores, rules: list[str]) -> list[str]:
    """The settings complete (:func:`complete_settings`) for every one of ``rules``: the rules
    compared must choose from the same candidates, or their difference mixes two procedures."""
    complete = [set(complete_settings(scores, rule)) for rule in rules]
    return [s for s in scores if all(s in c for c in complete)]


def leave_one_out(scores: Scores, rules: list[str] | None = None) -> list[HeldOut]:
    """For every rule and sequence: the setting with the best mean success on the other
    sequences (ties: the first in ``scores``' order), scored on the held-out one.

    Only the :func:`candidates` of all ``rules`` (default: every rule with runs) take part. With
    one candidate there is no choice and the result is its scores. With none, or runs on fewer
    than two sequences (nothing to choose on), the result is empty."""
    names = rules or sorted({r for per in scores.values() for r in per})
    settings = candidates(scores, names)
    out: list[HeldOut] = []
    if not settings:
        return out
    for rule in names:
        sequences = sorted(scores[settings[0]][rule])
        if len(sequences) < 2:
            continue
        for held in sequences:
            others = [q for q in sequences if q != held]
            best = max(settings, key=lambda s: _mean_success(scores[s][rule], others))
            out.append(HeldOut(rule, held, best, _mean_success(scores[best][rule], others),
                               dict(scores[best][rule][held])))  # fmt: skip
    return out


def _mean_success(per: Mapping[str, Mapping[int, float]], sequences: list[str]) -> float:
    """Mean success over ``sequences``, each the mean over its seeds (sequences weigh alike)."""
    return statistics.fmean(statistics.fmean(per[q].values()) for q in sequences)


def paired_difference(
    held: list[HeldOut], rule: str, baseline: str, *, by: str = "sequence"
) -> Difference:
    """``rule − baseline`` success on the held-out runs with the paired t interval
    (:func:`paired_runs`, which says what ``by`` means)."""
    if rule == baseline:
        raise ValueError(f"paired_difference compares two rules, got {rule!r} twice")
    a: dict[str, dict[int, float]] = {}
    b: dict[str, dict[int, float]] = {}
    for h in held:
        if h.rule in (rule, baseline):
            (a if h.rule == rule else b).setdefault(h.sequence, {}).update(h.success)
    try:
        return paired_runs(a, b, by=by)
    except LookupError:
        raise ValueError(
            f"no (sequence, seed) pair has runs of both {rule} and {baseline}"
        ) from None


def paired_runs(
    a: Mapping[str, Mapping[int, float]],
    b: Mapping[str, Mapping[int, float]],
    *,
    by: str = "sequence",
) -> Difference:
    """``a − b`` success over the (sequence, seed) runs both have (``[sequence][seed]``), with
    the paired t interval (:func:`dfatorch._stats.paired`).

    ``by="sequence"``: one pair per sequence, each side its mean over the seeds both have (the
    sequences are the sample a tracker should generalise over: ``n`` = sequences). ``by="run"``:
    one pair per (sequence, seed), as if the runs were independent, which they are not (the
    seeds of a sequence share its difficulty): a narrower interval than the data support.
    Raises ``LookupError`` when no run is in both."""
    if by not in ("sequence", "run"):
        raise ValueError(f"by must be 'sequence' or 'run', not {by!r}")
    keys = shared_runs(a, b)
    if not keys:
        raise LookupError("no (sequence, seed) run on both sides")
    if by == "run":
        return paired([a[q][seed] for q, seed in keys], [b[q][seed] for q, seed in keys])
    sequences = sorted({q for q, _ in keys})
    mean_a = [statistics.fmean(a[q][s] for k, s in keys if k == q) for q in sequences]
    mean_b = [statistics.fmean(b[q][s] for k, s in keys if k == q) for q in sequences]
    return paired(mean_a, mean_b)


def shared_runs(
    a: Mapping[str, Mapping[int, float]], b: Mapping[str, Mapping[int, float]]
) -> list[tuple[str, int]]:
    """The (sequence, seed) runs both ``a`` and ``b`` (``[sequence][seed]``) have, sorted."""
    return sorted((q, seed) for q in a.keys() & b.keys() for seed in a[q].keys() & b[q].keys())


def load_scores(root: str | Path) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """``scores[setting][rule][sequence][seed]`` from the records
    ``root/<setting>/<tracker>/seed<N>/<seq>.json`` (``dfatorch track-eval --out root/<setting>``;
    settings in name order, ``default`` first; the rule is the tracker name less ``mdnet-``)."""
    scores: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir())
    folders.sort(key=lambda p: p.name != "default")
    for folder in folders:
        for record in sorted(folder.glob("*/seed*/*.json")):
            data = json.loads(record.read_text())
            rule = str(data["tracker"]).removeprefix("mdnet-")
            seed = int(record.parent.name.removeprefix("seed"))
            per = scores.setdefault(folder.name, {}).setdefault(rule, {})
            per.setdefault(record.stem, {})[seed] = float(data["success_auc"])
    return scores
