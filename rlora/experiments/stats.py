"""Small-sample statistics over seeds: Student-t intervals, Welch differences, first crossings.

A study has a handful of seeds per arm (typically 3), so every interval here is a Student-t
interval, never a normal one: with 3 seeds the 95% quantile is 4.30, not 1.96. The t quantile is
computed here (scipy is not a dependency): bisection on the t CDF, whose integral of the density
is taken by Simpson's rule on a fine grid; tests/test_study.py checks it against printed tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

CONFIDENCE = 0.95  # two-sided, for every interval of a study


def _t_cdf_upper_half(x: float, df: float) -> float:
    """P(0 <= T <= x) for x >= 0: Simpson's rule on 4096 intervals (the density is smooth and bounded)."""
    grid = np.linspace(0.0, x, 4097)
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = np.exp(log_norm - (df + 1) / 2 * np.log1p(grid**2 / df))
    h = x / 4096
    return float(h / 3 * (density[0] + density[-1] + 4 * density[1:-1:2].sum() + 2 * density[2:-1:2].sum()))


@lru_cache(maxsize=256)
def t_quantile(p: float, df: float) -> float:
    """The p-quantile (p > 0.5) of Student's t with `df` (> 0, not necessarily whole) degrees of freedom."""
    assert 0.5 < p < 1 and df > 0, f"t_quantile needs 0.5 < p < 1 and df > 0, got p={p}, df={df}"
    target = p - 0.5
    lo, hi = 0.0, 1.0
    while _t_cdf_upper_half(hi, df) < target:  # df = 1 at p = 0.975 needs 12.7: bracket first
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_upper_half(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class Interval:
    """An estimate over seeds with its two-sided CONFIDENCE Student-t interval.

    With one value per side there is no spread to measure: lo, hi, se and df are None, and the
    report prints "no band (1 seed)" instead of an interval."""

    estimate: float
    lo: float | None
    hi: float | None
    n: int  # values behind it (both sides together for a difference)
    se: float | None  # standard error of the estimate
    df: float | None  # degrees of freedom of the t quantile (Welch-Satterthwaite for a difference)

    @property
    def has_band(self) -> bool:
        return self.lo is not None

    def excludes(self, value: float) -> bool:
        """The interval lies wholly above or below `value` (False without an interval)."""
        return self.lo is not None and self.hi is not None and (self.lo > value or self.hi < value)


def _interval(estimate: float, se: float, df: float, n: int) -> Interval:
    if se == 0.0:  # every seed gave the same value: a zero-width interval, df undefined
        return Interval(estimate, estimate, estimate, n, 0.0, None)
    half = t_quantile(0.5 + CONFIDENCE / 2, df) * se
    return Interval(estimate, estimate - half, estimate + half, n, se, df)


def mean_interval(values_S: Sequence[float]) -> Interval:
    """The mean over seeds and its t interval: mean +- t(n - 1) * sd / sqrt(n)."""
    assert values_S, "mean_interval of no values"
    x = np.asarray(values_S, dtype=float)
    mean = float(x.mean())
    if len(x) < 2:
        return Interval(mean, None, None, 1, None, None)
    return _interval(mean, float(x.std(ddof=1) / math.sqrt(len(x))), len(x) - 1, len(x))


def welch_difference(a_S: Sequence[float], b_S: Sequence[float]) -> Interval:
    """mean(a) - mean(b) with Welch's t interval (unequal variances, Welch-Satterthwaite df).

    Unpaired on purpose: seed k of one arm and seed k of another share their problem stream but
    not their policy, so pairing by seed number would claim a correlation nobody measured."""
    assert a_S and b_S, "welch_difference needs values on both sides"
    a, b = np.asarray(a_S, dtype=float), np.asarray(b_S, dtype=float)
    estimate = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Interval(estimate, None, None, len(a) + len(b), None, None)
    va, vb = float(a.var(ddof=1)) / len(a), float(b.var(ddof=1)) / len(b)
    se = math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else math.inf
    return _interval(estimate, se, df, len(a) + len(b))


def pooled_sd(groups: Sequence[Sequence[float]]) -> tuple[float, int] | None:
    """The within-group standard deviation pooled over groups of >= 2 values, and its df (sum of n - 1)."""
    usable = [np.asarray(g, dtype=float) for g in groups if len(g) >= 2]
    df = sum(len(g) - 1 for g in usable)
    if df == 0:
        return None
    return math.sqrt(sum(float(((g - g.mean()) ** 2).sum()) for g in usable) / df), df


def trailing_mean(values_T: Sequence[float], window: int) -> list[float]:
    """Trailing moving average over full windows: element i is the mean of values[i .. i + window - 1]."""
    x = np.asarray(values_T, dtype=float)
    if len(x) < window:
        return []
    return [float(v) for v in np.convolve(x, np.ones(window) / window, mode="valid")]


def first_crossing(steps_T: Sequence[int], values_T: Sequence[float], level: float, window: int) -> int | None:
    """The first step whose trailing `window`-step mean (the window ending at that step) reaches `level`; None if none does."""
    smooth = trailing_mean(values_T, window)
    for i, v in enumerate(smooth):
        if v >= level:
            return int(steps_T[i + window - 1])
    return None
