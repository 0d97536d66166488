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
    """``mean(a) − mean(b)`` with Welch's two-sided confidence interval and p-value.

    ``low``, ``high``, ``p`` and ``df`` are ``None`` when either side has fewer than two values
    (no variance estimate) or both sides have none (identical constants).
    """

    diff: float
    low: float | None
    high: float | None
    p: float | None
    df: float | None
    n_a: int
    n_b: int


def welch(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Difference:
    """Welch's unequal-variance t interval for ``mean(a) − mean(b)``.

    ``se = sqrt(s_a²/n_a + s_b²/n_b)``, Welch–Satterthwaite degrees of freedom
    ``df = se⁴ / ((s_a²/n_a)²/(n_a−1) + (s_b²/n_b)²/(n_b−1))``, interval
    ``diff ± t_{(1+level)/2, df} · se``, two-sided ``p = 2 P(T_df > |diff| / se)``.
    """
    from scipy import stats  # imported here: only the report needs it, and it is slow to load

    if not a or not b:
        raise ValueError("welch needs at least one value on each side")
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(diff, None, None, None, None, len(a), len(b))
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0.0:
        return Difference(diff, None, None, None, None, len(a), len(b))
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = float(stats.t.ppf((1 + level) / 2, df)) * se
    p = float(2 * stats.t.sf(abs(diff) / se, df))
    return Difference(diff, diff - half, diff + half, p, df, len(a), len(b))
