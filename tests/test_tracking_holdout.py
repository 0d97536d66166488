"""Leave-one-sequence-out choice of tracker settings and the paired difference (issue 19)."""

from __future__ import annotations

import json
import math
import statistics

import pytest
from scipy import stats

from dfatorch._stats import paired
from dfatorch.tracking.holdout import (
    complete_settings,
    leave_one_out,
    load_scores,
    paired_difference,
)

# scores[setting][rule][sequence][seed]: "fast" wins on A and B, "slow" on C; the held-out
# choice must therefore differ by sequence.
SCORES = {
    "slow": {"bp": {"A": {0: 0.50, 1: 0.52}, "B": {0: 0.40, 1: 0.42}, "C": {0: 0.90, 1: 0.80}}},
    "fast": {"bp": {"A": {0: 0.60, 1: 0.62}, "B": {0: 0.50, 1: 0.46}, "C": {0: 0.30, 1: 0.32}}},
}


def _mean(per: dict, sequences: list[str]) -> float:
    return sum(sum(per[q].values()) / len(per[q]) for q in sequences) / len(sequences)


def test_each_held_out_sequence_gets_the_setting_best_on_the_others() -> None:
    held = {h.sequence: h for h in leave_one_out(SCORES)}
    for seq, others in {"A": ["B", "C"], "B": ["A", "C"], "C": ["A", "B"]}.items():
        tuning = {s: _mean(SCORES[s]["bp"], others) for s in SCORES}
        best = max(tuning, key=tuning.__getitem__)
        assert held[seq].setting == best
        assert held[seq].tuning_success == pytest.approx(tuning[best])
        assert dict(held[seq].success) == SCORES[best]["bp"][seq]
    # A held out: slow 0.63 vs fast 0.395 -> slow; C held out: fast wins (0.545 vs 0.46)
    assert (held["A"].setting, held["C"].setting) == ("slow", "fast")


def test_ties_go_to_the_first_setting_and_incomplete_settings_are_left_out() -> None:
    same = {"A": {0: 0.5}, "B": {0: 0.5}}
    tie = {"first": {"bp": same}, "second": {"bp": same}}
    assert {h.setting for h in leave_one_out(tie)} == {"first"}
    partial = {
        "full": {"bp": {"A": {0: 0.1, 1: 0.1}, "B": {0: 0.1, 1: 0.1}}},
        "partial": {"bp": {"A": {0: 0.9, 1: 0.9}, "B": {0: 0.9}}},  # seed 1 of B missing
    }
    assert complete_settings(partial, "bp") == ["full"]
    assert {h.setting for h in leave_one_out(partial)} == {"full"}


def test_a_rule_with_one_sequence_is_left_out() -> None:
    scores = {"s": {"bp": {"A": {0: 0.5}}, "dfa": {"A": {0: 0.5}, "B": {0: 0.4}}}}
    assert {h.rule for h in leave_one_out(scores)} == {"dfa"}


def test_paired_interval_is_the_one_sample_t_of_the_differences() -> None:
    a = [0.61, 0.55, 0.70, 0.42, 0.58]
    b = [0.60, 0.50, 0.66, 0.45, 0.51]
    d = [x - y for x, y in zip(a, b)]
    n, mean, sd = len(d), statistics.fmean(d), statistics.stdev(d)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    got = paired(a, b)
    assert got.diff == pytest.approx(mean)
    assert (got.low, got.high) == pytest.approx((mean - half, mean + half))
    assert got.df == pytest.approx(n - 1)
    assert got.p == pytest.approx(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
    # pairing matters: shuffling one side changes the interval although both means stay
    assert paired(a, b[::-1]).high != pytest.approx(got.high)


def test_rules_choose_from_the_same_candidates() -> None:
    scores = {
        "a": {"bp": {"A": {0: 0.1}, "B": {0: 0.1}}, "dfa": {"A": {0: 0.1}, "B": {0: 0.1}}},
        "b": {"bp": {"A": {0: 0.9}, "B": {0: 0.9}}, "dfa": {"A": {0: 0.9}}},  # dfa incomplete
    }
    assert {h.setting for h in leave_one_out(scores)} == {"a"}
    assert {h.setting for h in leave_one_out(scores, ["bp"])} == {"b"}


def test_per_sequence_pairs_average_the_seeds_first() -> None:
    from dfatorch.tracking.holdout import HeldOut

    held = [
        HeldOut("bp", "A", "s", 0.0, {0: 0.5, 1: 0.7}),
        HeldOut("bp", "B", "s", 0.0, {0: 0.2, 1: 0.4}),
        HeldOut("bdfa", "A", "s", 0.0, {0: 0.4, 1: 0.5}),
        HeldOut("bdfa", "B", "s", 0.0, {0: 0.35, 1: 0.3}),
    ]
    got = paired_difference(held, "bdfa", "bp")  # by sequence: the default
    want = paired([0.45, 0.325], [0.6, 0.3])
    assert got.n == (2,) and (got.diff, got.low) == pytest.approx((want.diff, want.low))
    assert paired_difference(held, "bdfa", "bp", by="run").n == (4,)
    with pytest.raises(ValueError, match="by must be"):
        paired_difference(held, "bdfa", "bp", by="seed")


def test_paired_difference_pairs_by_sequence_and_seed() -> None:
    scores = {
        "only": {
            "bp": {"A": {0: 0.5, 1: 0.6}, "B": {0: 0.4, 1: 0.3}},
            "bdfa": {"A": {0: 0.55, 1: 0.58}, "B": {0: 0.45, 1: 0.2}},
        }
    }
    diff = paired_difference(leave_one_out(scores), "bdfa", "bp", by="run")
    expected = paired([0.55, 0.58, 0.45, 0.2], [0.5, 0.6, 0.4, 0.3])
    assert (diff.diff, diff.low, diff.high) == pytest.approx((expected.diff, expected.low,
                                                              expected.high))  # fmt: skip


def test_load_scores_reads_track_eval_folders(tmp_path) -> None:
    for setting, rule, seq, seed, auc in [("a-cheap", "bp", "A", 0, 0.3), ("default", "bp", "A", 0,
                                          0.4), ("default", "bdfa", "B", 1, 0.5)]:  # fmt: skip
        folder = tmp_path / setting / f"mdnet-{rule}" / f"seed{seed}"
        folder.mkdir(parents=True)
        (folder / f"{seq}.json").write_text(json.dumps({"tracker": f"mdnet-{rule}",
                                                         "success_auc": auc}))  # fmt: skip
    scores = load_scores(tmp_path)
    assert list(scores) == ["default", "a-cheap"]
    assert scores["default"] == {"bp": {"A": {0: 0.4}}, "bdfa": {"B": {1: 0.5}}}
    assert scores["a-cheap"] == {"bp": {"A": {0: 0.3}}}


def test_report_section_shows_the_held_out_choice_and_the_paired_difference(tmp_path) -> None:
    from dfatorch.report import _tracking_holdout_section
    from dfatorch.tracking.tracker import TrackerConfig

    scores = {
        "default": {"bp": {"A": {0: 0.5, 1: 0.6}, "B": {0: 0.4, 1: 0.3}},
                    "bdfa": {"A": {0: 0.55, 1: 0.5}, "B": {0: 0.45, 1: 0.2}}},
        "iter5": {"bp": {"A": {0: 0.7, 1: 0.7}, "B": {0: 0.1, 1: 0.1}},
                  "bdfa": {"A": {0: 0.1, 1: 0.1}, "B": {0: 0.1}}},  # bdfa incomplete
    }  # fmt: skip
    for setting, per_rule in scores.items():
        config = TrackerConfig(maxiter_update=5 if setting == "iter5" else 10).to_dict()
        (tmp_path / setting).mkdir()
        (tmp_path / setting / "provenance.json").write_text(
            json.dumps({"config": config, "backbone": {"sha256": "abc"}})
        )
        for rule, per_seq in per_rule.items():
            for seq, per_seed in per_seq.items():
                for seed, auc in per_seed.items():
                    folder = tmp_path / setting / f"mdnet-{rule}" / f"seed{seed}"
                    folder.mkdir(parents=True, exist_ok=True)
                    (folder / f"{seq}.json").write_text(
                        json.dumps({"tracker": f"mdnet-{rule}", "success_auc": auc})
                    )
    text = "\n".join(_tracking_holdout_section(tmp_path))
    assert "| iter5 | `maxiter_update=5` | 0.400 ± 0.000 | incomplete |" in text
    # iter5 is incomplete for bdfa, so bp may not choose it either (it would have for B: 0.7 on
    # A): both rules choose from the same candidates
    assert "the 1 complete for every rule (default) are the choices" in text
    assert "| A | 0.550 ± 0.071 (default) | 0.525 ± 0.035 (default) |" in text
    assert "| B | 0.350 ± 0.071 (default) | 0.325 ± 0.177 (default) |" in text
    per_run = paired([0.55, 0.5, 0.45, 0.2], [0.5, 0.6, 0.4, 0.3])
    assert f"| bdfa − bp, per run | 4 | {per_run.diff:+.3f} | [{per_run.low:+.3f}, " in text
    per_seq = paired([0.525, 0.325], [0.55, 0.35])
    assert f"| bdfa − bp, per sequence | 2 | {per_seq.diff:+.3f} | [{per_seq.low:+.3f}, " in text


def test_report_section_while_runs_are_in_progress(tmp_path) -> None:
    from dfatorch.report import _tracking_holdout_section

    def record(setting: str, rule: str, seq: str, seed: int) -> None:
        folder = tmp_path / setting / f"mdnet-{rule}" / f"seed{seed}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{seq}.json").write_text(
            json.dumps({"tracker": f"mdnet-{rule}", "success_auc": 0.5})
        )

    record("default", "bp", "A", 0)  # one sequence: nothing to hold out, no provenance yet
    assert "Runs in progress" in "\n".join(_tracking_holdout_section(tmp_path))
    record("default", "bp", "B", 0)
    record("default", "dfa", "A", 1)  # dfa shares no (sequence, seed) with bp
    record("default", "dfa", "B", 1)
    text = "\n".join(_tracking_holdout_section(tmp_path))
    assert "| dfa − bp, per sequence | 0 | - | - | - |" in text


def test_paired_difference_drops_pairs_missing_on_one_side() -> None:
    from dfatorch.tracking.holdout import HeldOut

    held = [
        HeldOut("bp", "A", "s", 0.0, {0: 0.5, 1: 0.6, 2: 0.7}),
        HeldOut("bdfa", "A", "s", 0.0, {0: 0.4, 2: 0.9}),
    ]
    got = paired_difference(held, "bdfa", "bp", by="run")
    assert got.n == (2,) and got.diff == pytest.approx(((0.4 - 0.5) + (0.9 - 0.7)) / 2)
    with pytest.raises(ValueError, match="no \\(sequence, seed\\) pair"):
        paired_difference(held, "dfa", "bp")


def test_versions_section_pairs_each_setting_with_the_earlier_default(tmp_path) -> None:
    """Rows: every setting of today's records against the earlier records' *default*, over the
    (sequence, seed) runs both have; seed 2 and sequence C exist on one side only."""
    from dfatorch.report import _tracking_versions_section

    def write(root, setting: str, per_seq: dict) -> None:
        for seq, per_seed in per_seq.items():
            for seed, auc in per_seed.items():
                folder = root / setting / "mdnet-bdfa" / f"seed{seed}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / f"{seq}.json").write_text(
                    json.dumps({"tracker": "mdnet-bdfa", "success_auc": auc})
                )

    now, before = tmp_path / "now", tmp_path / "before"
    write(before, "default", {"A": {0: 0.5, 1: 0.7}, "B": {0: 0.2, 1: 0.4}, "C": {0: 0.9}})
    write(before, "iter5", {"A": {0: 0.0, 1: 0.0}, "B": {0: 0.0, 1: 0.0}})  # not the reference
    write(now, "default", {"A": {0: 0.6, 1: 0.6, 2: 0.1}, "B": {0: 0.3, 1: 0.2}})
    write(now, "iter5", {"A": {0: 0.4, 1: 0.5}, "B": {0: 0.1, 1: 0.3}})
    text = "\n".join(_tracking_versions_section(now, before))
    for setting, a in (("default", [0.6, 0.6, 0.3, 0.2]), ("iter5", [0.4, 0.5, 0.1, 0.3])):
        b = [0.5, 0.7, 0.2, 0.4]
        per_run = paired(a, b)
        per_seq = paired([(a[0] + a[1]) / 2, (a[2] + a[3]) / 2], [0.6, 0.3])
        row = (
            f"| {setting} | bdfa | 4 | {statistics.fmean(b):.3f} | {statistics.fmean(a):.3f} | "
            f"{per_seq.diff:+.3f} [{per_seq.low:+.3f}, {per_seq.high:+.3f}] | "
            f"{per_run.diff:+.3f} [{per_run.low:+.3f}, {per_run.high:+.3f}] |"
        )
        assert row in text, (row, text)
    assert _tracking_versions_section(now, tmp_path / "missing") == []
