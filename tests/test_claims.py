"""The verdict table: Welch's and the paired-by-seed interval against their formulas and scipy,
the verdict rules, and the claims file's checks."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats

from dfatorch._stats import welch
from dfatorch.claims import Claim, Evidence, evaluate, load_claims, overall, verdict_tables


def test_welch_interval_equals_its_formula_and_scipy():
    a, b = [61.2, 60.1, 62.9, 59.8], [63.0, 64.1, 63.6]
    d = welch(a, b)
    va, vb = statistics.variance(a) / 4, statistics.variance(b) / 3
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    diff = statistics.fmean(a) - statistics.fmean(b)
    assert d.diff == pytest.approx(diff, abs=1e-12)
    assert d.df == pytest.approx(df, rel=1e-12)
    assert d.high - d.diff == pytest.approx(stats.t.ppf(0.975, df) * se, rel=1e-12)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert d.p == pytest.approx(ref.pvalue, rel=1e-9)
    ci = ref.confidence_interval(0.95)
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    assert d.n == (4, 3)
    wide = welch(a, b, level=0.99)
    assert wide.low < d.low and wide.high > d.high


def test_one_seed_or_no_spread_gives_no_interval():
    assert welch([1.0], [2.0, 3.0]).low is None
    assert welch([1.0, 1.0], [2.0, 2.0]).p is None
    assert welch([1.0], [2.0, 3.0]).diff == pytest.approx(-1.5)
    with pytest.raises(ValueError):
        welch([], [1.0])


def _summary(**methods):
    """An experiment summary with one grid point (``fraction`` 0.1) and the given seeds' final
    accuracies (fractions) per method."""
    rows = [
        {"method": m, "fraction": 0.1, "runs": [{"final_acc": v} for v in values]}
        for m, values in methods.items()
    ]
    return {"exp": {"name": "exp", "rows": rows}}


def _claim(kind, margin=0.0):
    ev = Evidence(experiment="exp", method="a", reference="b", at={"fraction": 0.1})
    return Claim(id="(x)", source="S", text="t", kind=kind, margin=margin, evidence=(ev,))


@pytest.mark.parametrize(
    ("kind", "margin", "a", "verdict"),
    [
        ("below", 0.0, [0.50, 0.51, 0.52], "holds"),  # 10 points below b
        ("below", 0.0, [0.70, 0.71, 0.72], "contradicted"),
        ("below", 0.0, [0.58, 0.62, 0.60], "not shown"),
        ("above", 0.0, [0.70, 0.71, 0.72], "holds"),
        ("above", 0.0, [0.50, 0.51, 0.52], "contradicted"),
        ("above", 0.0, [0.58, 0.62, 0.60], "not shown"),
        ("within", 1.0, [0.598, 0.600, 0.602], "holds"),  # 0.1 point below b, tight
        ("within", 1.0, [0.570, 0.575, 0.572], "contradicted"),  # 2.8 points below
        ("within", 1.0, [0.58, 0.60, 0.62], "not shown"),
    ],
)
def test_verdict_rules(kind, margin, a, verdict):
    b = [0.600, 0.601, 0.603]
    (c,) = evaluate(_claim(kind, margin), _summary(a=a, b=b))
    assert c.verdict == verdict
    assert c.difference.diff == pytest.approx(100 * (statistics.fmean(a) - statistics.fmean(b)))


def test_missing_cells_and_single_seeds_are_said_so():
    (c,) = evaluate(_claim("above"), _summary(a=[0.7], b=[0.6, 0.61]))
    assert c.verdict == "no interval" and overall([c]) == "no interval"
    (c,) = evaluate(_claim("above"), _summary(a=[], b=[0.6, 0.61]))
    assert c.verdict == "not run" and overall([c]) == "not run"


def test_overall_counts_only_comparisons_with_an_interval():
    claim = _claim("above")
    hold = evaluate(claim, _summary(a=[0.70, 0.71, 0.72], b=[0.60, 0.61, 0.60]))
    against = evaluate(claim, _summary(a=[0.50, 0.51, 0.52], b=[0.60, 0.61, 0.60]))
    single = evaluate(claim, _summary(a=[0.5], b=[0.6]))
    assert overall(hold + hold + single) == "holds (2 of 2 settings)"
    assert overall(hold + against + hold) == "mixed: holds in 2 of 3; contradicted in 1 of 3"


def test_an_ambiguous_or_unknown_setting_is_refused():
    summary = _summary(a=[0.5, 0.6], b=[0.6, 0.7])
    summary["exp"]["rows"].append({"method": "a", "fraction": 0.2, "runs": []})
    loose = Claim(id="(x)", source="S", text="t", evidence=(Evidence("exp", "a", "b"),))
    with pytest.raises(ValueError, match="matches 2 grid points"):
        evaluate(loose, summary)
    typo = Claim("(x)", "S", "t", evidence=(Evidence("exp", "a", "b", at={"fraction": 0.3}),))
    with pytest.raises(ValueError, match="no grid point for a"):
        evaluate(typo, summary)
    summary["exp"]["cells_missing"] = 4  # a sweep that has not reached the point yet
    assert evaluate(typo, summary)[0].verdict == "not run"
    with pytest.raises(ValueError, match="no experiment named 'nope'"):
        evaluate(Claim("(x)", "S", "t", evidence=(Evidence("nope", "a", "b"),)), summary)


def test_tables_have_a_row_per_claim_and_per_comparison():
    untested = Claim(id="(u)", source="S", text="u", not_tested="no data")
    head, detail = verdict_tables(
        [_claim("above"), untested], _summary(a=[0.70, 0.71, 0.72], b=[0.60, 0.61, 0.60])
    )
    assert len(head) == 4 and len(detail) == 3
    assert "**holds**" in head[2] and "[exp](#exp)" in head[2]
    assert "**not tested**: no data" in head[3] and "needs" not in head[3]


def test_a_primary_setting_without_a_number_says_why():
    head, _ = verdict_tables([_claim("above")], _summary(a=[], b=[0.60, 0.61]))
    assert head[2].endswith("| - | not run | [exp](#exp) |")


def test_claims_file_checks(tmp_path):
    path = tmp_path / "claims.toml"
    good = (
        '[[claims]]\nid = "(1)"\nsource = "S"\ntext = "t"\nkind = "within"\nmargin = 1.0\n'
        'evidence = [{ experiment = "e", method = "a", reference = "b", '
        "at = { fraction = 0.1 } }]\n"
    )
    path.write_text(good)
    (claim,) = load_claims(path)
    assert claim.evidence[0].at == {"fraction": 0.1} and claim.margin == 1.0
    for bad, message in [
        (good.replace('"within"', '"beside"'), "is not one of"),
        (good.replace("margin = 1.0", "margin = 0.0"), "needs a positive margin"),
        (good.replace('reference = "b", ', ""), "evidence takes experiment, method, reference"),
        ('[[claims]]\nid = "(1)"\nsource = "S"\ntext = "t"\n', "say why it is not tested"),
    ]:
        path.write_text(bad)
        with pytest.raises(ValueError, match=message):
            load_claims(path)


def test_the_committed_claims_file_resolves_against_the_committed_results():
    """Every comparison in experiments/claims.toml names a grid point that exists."""
    from pathlib import Path

    from dfatorch.experiment import aggregate, load_experiment

    root = Path(__file__).resolve().parents[1]
    claims = load_claims(root / "experiments" / "claims.toml")
    names = {ev.experiment for c in claims for ev in c.evidence}
    summaries = {}
    for path in sorted((root / "experiments").glob("*.toml")):
        if path.name == "claims.toml":
            continue
        exp = load_experiment(path)
        if exp.name in names:
            summaries[exp.name] = aggregate(exp, root / "experiments" / "results" / exp.name)
    assert names <= set(summaries)
    head, _ = verdict_tables(claims, summaries)
    assert len(head) == 2 + len(claims)


def test_difference_of_differences_equals_its_formula():
    """(a − b) − (c − d): the variances add, and the Welch–Satterthwaite df sums over 4 groups."""
    from dfatorch._stats import contrast

    groups = [[50.1, 51.0, 49.2], [60.0, 60.4, 59.1], [58.0, 57.1, 58.8, 57.5], [60.2, 61.0, 60.1]]
    d = contrast(groups, [1, -1, -1, 1])
    means = [statistics.fmean(g) for g in groups]
    v = [statistics.variance(g) / len(g) for g in groups]
    df = sum(v) ** 2 / sum(vi**2 / (len(g) - 1) for vi, g in zip(v, groups))
    assert d.diff == pytest.approx(means[0] - means[1] - means[2] + means[3], abs=1e-12)
    assert d.df == pytest.approx(df, rel=1e-12)
    half = stats.t.ppf(0.975, df) * math.sqrt(sum(v))
    assert (d.low, d.high) == pytest.approx((d.diff - half, d.diff + half), rel=1e-12)
    assert d.n == (3, 3, 4, 3)


def test_a_claim_against_a_baseline_point_compares_the_gaps():
    rows = [
        {"method": m, "b": b, "runs": [{"final_acc": v + dv} for dv in (0.0, 0.002, 0.004)]}
        for m, b, v in [("dfa", 5, 0.30), ("bp", 5, 0.40), ("dfa", 800, 0.45), ("bp", 800, 0.46)]
    ]
    ev = Evidence("exp", "dfa", "bp", at={"b": 5}, baseline_at={"b": 800})
    claim = Claim(id="(B)", source="S", text="t", kind="below", evidence=(ev,))
    (c,) = evaluate(claim, {"exp": {"name": "exp", "rows": rows}})
    assert c.difference.diff == pytest.approx(-9.0) and c.verdict == "holds"
    _, detail = verdict_tables([claim], {"exp": {"name": "exp", "rows": rows}})
    assert "(dfa − bp) − the same at b 800" in detail[2] and "against b 800" in detail[2]


def test_runs_on_the_same_seeds_are_paired_by_seed_not_by_position():
    """Methods that ran the same seeds (same subset, batch order and initial weights) are
    compared on their per-seed differences: scipy's paired t; anything else falls back to Welch."""
    from dfatorch._stats import seed_contrast

    a = [(0, 50.0), (1, 56.0), (2, 47.0), (3, 53.5)]
    b = [(3, 52.0), (0, 48.5), (2, 46.0), (1, 53.0)]  # listed in another order
    d = seed_contrast([a, b], [1.0, -1.0])
    x, y = [v for _, v in sorted(a)], [v for _, v in sorted(b)]
    ref = stats.ttest_rel(x, y)
    assert d.test == "paired t" and d.df == 3 and d.n == (4, 4)
    assert d.p == pytest.approx(ref.pvalue, rel=1e-12)
    ci = ref.confidence_interval()
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert d.diff == pytest.approx(statistics.fmean(x) - statistics.fmean(y), abs=1e-12)
    # a difference of differences pairs the four groups by seed too
    c, e = [(s, v + 1.0) for s, v in a], [(s, v - 0.5 * s) for s, v in b]
    dd = seed_contrast([a, b, c, e], [1.0, -1.0, -1.0, 1.0])
    per = [(x[s] - y[s]) - (x[s] + 1.0) + (y[s] - 0.5 * s) for s in range(4)]
    assert dd.test == "paired t" and dd.diff == pytest.approx(statistics.fmean(per))
    assert dd.df == 3 and dd.n == (4, 4, 4, 4)
    assert dd.high - dd.low == pytest.approx(
        2 * stats.t.ppf(0.975, 3) * statistics.stdev(per) / 2, rel=1e-12
    )
    welch_ab = welch([v for _, v in a], [v for _, v in b])
    for other in (b[:3], [(4, 52.0), *b[1:]], [*b, (0, 52.0)], [(None, v) for _, v in b]):
        got = seed_contrast([a, other], [1.0, -1.0])  # fewer, other, repeated, unknown seeds
        assert got.test == "Welch t"
    assert seed_contrast([a, [(None, v) for _, v in b]], [1.0, -1.0]) == welch_ab
    for other in (b[:3], [(4, 52.0), *b[1:]]):
        assert seed_contrast([a, other], [1.0, -1.0]) == welch([v for _, v in a],
                                                               [v for _, v in other])  # fmt: skip
    # an unknown seed is no seed: it pairs with nothing
    unknown = seed_contrast([[(None, 50.0), (0, 53.0)], [(None, 48.0), (0, 50.0)]], [1.0, -1.0])
    assert unknown.test == "Welch t"


def test_claims_pair_seeded_runs():
    """The same accuracies: Welch's interval straddles 0, the paired one (the seeds' shared
    spread removed) lies above it."""
    a, b = [0.50, 0.56, 0.47, 0.535], [0.485, 0.53, 0.46, 0.52]
    assert evaluate(_claim("above"), _summary(a=a, b=b))[0].verdict == "not shown"
    summary = _summary(a=a, b=b)
    for row in summary["exp"]["rows"]:
        for seed, run in enumerate(row["runs"]):
            run["seed"] = seed
    (c,) = evaluate(_claim("above"), summary)
    assert c.verdict == "holds" and c.difference.test == "paired t"
    _, detail = verdict_tables([_claim("above")], summary)
    assert "paired t, 4 vs 4 seeds" in detail[2]


def test_a_reference_from_another_experiment_pairs_by_seed():
    """A follow-up experiment (same budget and seeds, another learning rate) compared with the
    reference of the original one: paired by seed across the two summaries."""
    a, b = [0.50, 0.56, 0.47, 0.535], [0.485, 0.53, 0.46, 0.52]
    follow = _summary(a=a)
    original = _summary(b=b, a=[0.1, 0.1, 0.1, 0.1])  # the original's own `a` is not used
    for summary in (follow, original):
        for row in summary["exp"]["rows"]:
            for seed, run in enumerate(row["runs"]):
                run["seed"] = seed
    summaries = {"follow": {**follow["exp"], "name": "follow"}, "orig": original["exp"]}
    ev = Evidence("follow", "a", "b", at={"fraction": 0.1}, reference_experiment="orig")
    claim = Claim(id="(x)", source="S", text="t", kind="above", evidence=(ev,))
    (c,) = evaluate(claim, summaries)
    ref = stats.ttest_rel([100 * v for v in a], [100 * v for v in b])
    assert c.verdict == "holds" and c.difference.test == "paired t"
    assert c.difference.p == pytest.approx(ref.pvalue, rel=1e-9)
    head, detail = verdict_tables([claim], summaries)
    assert "a − b of orig" in detail[2] and "[follow](#follow), [orig](#orig)" in head[2]
    both = Evidence("follow", "a", "b", at={"fraction": 0.1}, baseline_at={"fraction": 0.1},
                    reference_experiment="orig")  # fmt: skip
    _, detail = verdict_tables([Claim("(x)", "S", "t", evidence=(both,))], summaries)
    assert "(a − b of orig) − the same at fraction 0.1" in detail[2]
    lost = Evidence("follow", "a", "b", at={"fraction": 0.1}, reference_experiment="nope")
    with pytest.raises(ValueError, match="no experiment named 'nope'"):
        evaluate(Claim(id="(x)", source="S", text="t", evidence=(lost,)), summaries)


def test_a_comparison_whose_convergence_check_failed_is_not_converged():
    """Where the experiment checks convergence (`check_longer`), a side whose longer check run
    gained CONVERGED_POINTS or more makes the comparison "not converged", and one whose check has
    not finished "not checked", keeping what the interval alone says; a gain just below the bar,
    or a check at another grid point, changes nothing."""
    from dfatorch.experiment import CONVERGED_POINTS

    claim = _claim("above")
    summary = _summary(a=[0.70, 0.71, 0.72], b=[0.60, 0.61, 0.60])
    bar = CONVERGED_POINTS / 100

    def check(method, fraction, gain):
        return {"method": method, "at": {"fraction": fraction, "epochs": 10}, "seed": 101,
                "epochs": [10, 20], "val_acc": [0.5, 0.5 + gain], "diverged": [0, 0]}  # fmt: skip

    summary["exp"]["convergence"] = {
        "a/fraction=0.1/epochs=10": check("a", 0.1, bar - 1e-6),
        "b/fraction=0.2/epochs=10": check("b", 0.2, 0.3),  # another grid point
    }
    (c,) = evaluate(claim, summary)
    assert c.verdict == "holds" and c.unconverged == ()
    summary["exp"]["convergence"]["b/fraction=0.1/epochs=10"] = check("b", 0.1, bar + 0.0125)
    (c,) = evaluate(claim, summary)
    assert (c.verdict, c.interval_verdict) == ("not converged", "holds")
    assert [m for m, _ in c.unconverged] == ["b"]
    assert c.unconverged[0][1] == pytest.approx(CONVERGED_POINTS + 1.25)
    assert overall([c, *evaluate(claim, _summary(a=[0.7, 0.71], b=[0.6, 0.61]))]) == (
        "mixed: holds in 1 of 2; not converged in 1 of 2"
    )
    head, detail = verdict_tables([claim], summary)
    assert "**not converged**" in head[2]
    gain = CONVERGED_POINTS + 1.25
    assert detail[2].endswith(
        f"| not converged (the interval alone: holds; the longer check run gained b +{gain:.2f} "
        "points) |"
    )
    # a check not finished yet: the verdict waits for it, the interval's is kept
    summary["exp"]["convergence"]["b/fraction=0.1/epochs=10"]["val_acc"][1] = None
    (c,) = evaluate(claim, summary)
    assert (c.verdict, c.interval_verdict) == ("not checked", "holds")
    assert c.unchecked == (("b", "has not finished"),)
    head, detail = verdict_tables([claim], summary)
    assert "**not checked**" in head[2]
    assert detail[2].endswith(
        "| not checked (the interval alone: holds; the convergence check of b has not finished) |"
    )
    # a diverged check run is finished but tells nothing either; a failed check outweighs it
    summary["exp"]["convergence"]["b/fraction=0.1/epochs=10"]["diverged"] = [0, 1]
    assert evaluate(claim, summary)[0].unchecked == (("b", "diverged"),)
    summary["exp"]["convergence"]["a/fraction=0.1/epochs=10"] = check("a", 0.1, bar + 0.01)
    (c,) = evaluate(claim, summary)
    assert (c.verdict, c.unchecked, [m for m, _ in c.unconverged]) == ("not converged", (), ["a"])
    # ... whichever side comes first
    summary["exp"]["convergence"]["a/fraction=0.1/epochs=10"]["val_acc"][1] = None
    summary["exp"]["convergence"]["b/fraction=0.1/epochs=10"] = check("b", 0.1, bar + 0.01)
    (c,) = evaluate(claim, summary)
    assert (c.verdict, c.unchecked, [m for m, _ in c.unconverged]) == ("not converged", (), ["b"])
    summary["exp"]["convergence"]["a/fraction=0.1/epochs=10"] = check("a", 0.1, 0.0)
    # no check at that point at all (an experiment without `check_longer`): the interval decides
    del summary["exp"]["convergence"]["b/fraction=0.1/epochs=10"]
    assert evaluate(claim, summary)[0].verdict == "holds"
    # a difference of differences names each side's grid point
    wide = _summary(a=[0.70, 0.71, 0.72], b=[0.60, 0.61, 0.60])
    wide["exp"]["rows"] += [{**r, "fraction": 0.2} for r in wide["exp"]["rows"]]
    wide["exp"]["convergence"] = {
        "a/fraction=0.2/epochs=10": {**check("a", 0.2, 0.0), "val_acc": [0.5, None]},
        "b/fraction=0.1/epochs=10": {**check("b", 0.1, 0.0), "val_acc": [None, None]},
    }
    ev = Evidence("exp", "a", "b", at={"fraction": 0.2}, baseline_at={"fraction": 0.1})
    (c,) = evaluate(Claim("(x)", "S", "t", kind="above", evidence=(ev,)), wide)
    assert c.unchecked == (
        ("a at fraction 0.2", "has not finished"),
        ("b at fraction 0.1", "has not finished"),
    )
