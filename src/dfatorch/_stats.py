"""Summary statistics shared by the experiment and tracking reports, so both mean the same by ±."""

from __future__ import annotations

import statistics
from collections.abc import Iterable


def mean_std(values: Iterable[float]) -> tuple[float | None, float | None]:
    """Mean and *sample* standard deviation (n − 1) of ``values``.

    The deviation is ``None`` for a single value (unknown, not 0), and both are ``None`` for none.
    """
    v = [float(x) for x in values]
    if not v:
        return None, None
    return statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None
