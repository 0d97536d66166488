"""Summary statistics shared by the experiment and tracking reports, so both mean the same by ±."""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, replace


def mean_std(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and *sample* standard deviation (n − 1) of ``values``.

    The deviation is ``None`` for a single value (unknown, not 0), and both are ``None`` for none.
    """
    v = [float(x) for x in values]
    if not v:
        return None, None
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None


@dataclass(frozen=True)
class Difference:
    """A contrast of group means (``mean(a) − mean(b)`` for two groups) with a two-sided t
    confidence interval and p-value of "no difference" (``test`` says which t).

    ``low``, ``high``, ``p`` and ``df`` are ``None`` when a group has fewer than two values (no
    variance estimate) or nothing varies (no group, or for a paired test no per-pair difference).
    ``n`` is the number of values in each group (for :func:`paired`, the number of pairs).
    """

    diff: float
    low: float | None
    high: float | None
    p: float | None
    df: float | None
    n: tuple[int, ...]
    test: str = "Welch t"


def contrast(
    groups: Sequence[Sequence[float]], weights: Sequence[float], level: float = 0.95
) -> Difference:
    """Welch's t interval for ``Σ w_i · mean(group_i)``.

    With ``v_i = w_i² s_i² / n_i``: ``se = sqrt(Σ v_i)``, Welch–Satterthwaite degrees of freedom
    ``df = (Σ v_i)² / Σ (v_i² / (n_i − 1))``, interval ``diff ± t_{(1+level)/2, df} · se`` and
    two-sided ``p = 2 P(T_df > |diff| / se)``. Two groups with weights ``(1, −1)`` give Welch's
    two-sample test; four with ``(1, −1, −1, 1)`` a difference of differences.
    """
    from scipy import stats  # imported here: only the report needs it, and it is slow to load

    if len(groups) != len(weights) or not groups or not all(groups):
        raise ValueError("contrast needs one weight per group and at least one value in each")
    n = tuple(len(g) for g in groups)
    diff = sum(w * statistics.fmean(g) for g, w in zip(groups, weights))
    if min(n) < 2:
        return Difference(diff, None, None, None, None, n)
    v = [w * w * statistics.variance(g) / len(g) for g, w in zip(groups, weights)]
    if sum(v) == 0.0:
        return Difference(diff, None, None, None, None, n)
    se = math.sqrt(sum(v))
    df = sum(v) ** 2 / sum(vi * vi / (k - 1) for vi, k in zip(v, n) if vi > 0)
    half = float(stats.t.ppf((1 + level) / 2, df)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    return Difference(diff, diff - half, diff + half, p, df, n)


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Welch's unequal-variance t interval for ``mean(a) − mean(b)``."""
    if not a or not b:
        raise ValueError("welch needs at least one value on each side")
    return contrast([a, b], [1.0, -1.0], level)


def paired(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """The paired t interval for ``mean(a − b)``: ``a[i]`` and ``b[i]`` share their conditions
    (seed, sequence), so only the spread of the differences counts (one-sample t, ``n − 1``
    degrees of freedom)."""
    if len(a) != len(b) or not a:
        raise ValueError("paired needs two equally long, non-empty sequences")
    return replace(contrast([[x - y for x, y in zip(a, b)]], [1.0], level), test="paired t")


def seed_contrast(
    groups: Sequence[Sequence[tuple[Hashable, float]]],
    weights: Sequence[float],
    level: float = 0.95,
) -> Difference:
    """``Σ w_i · mean(group_i)`` over runs given as ``(seed, value)`` pairs.

    A seed fixes what runs of different methods share in this library's trainer (the training
    subset, the batch order and augmentation, the initial weights), so where every group ran the
    same seeds (at least two, each once) the per-seed contrasts ``Σ w_i x_i(s)`` are paired: a
    one-sample t interval over them (``n − 1`` degrees of freedom), which removes the spread the
    groups share. Otherwise (different seeds, a seed that diverged on one side only, runs without
    a seed, ``None``) Welch's interval of :func:`contrast`.
    """
    by_seed = [dict(g) for g in groups]
    common = set(by_seed[0]) if groups else set()
    if (
        len(common) >= 2
        and None not in common
        and all(len(d) == len(g) and set(d) == common for d, g in zip(by_seed, groups))
    ):
        order = sorted(common, key=repr)
        per_seed = [sum(w * d[s] for d, w in zip(by_seed, weights)) for s in order]
        d = contrast([per_seed], [1.0], level)
        return replace(d, n=tuple(len(g) for g in groups), test="paired t")
    return contrast([[v for _, v in g] for g in groups], weights, level)
