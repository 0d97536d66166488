"""Summary statistics shared by the experiment and tracking reports, so both mean the same by ±."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


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
    """A contrast of group means (``mean(a) − mean(b)`` for two groups) with Welch's two-sided
    confidence interval and p-value of "no difference".

    ``low``, ``high``, ``p`` and ``df`` are ``None`` when a group has fewer than two values (no
    variance estimate) or no group varies.
    """

    diff: float
    low: float | None
    high: float | None
    p: float | None
    df: float | None
    n: tuple[int, ...]


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
    return contrast([[x - y for x, y in zip(a, b)]], [1.0], level)
