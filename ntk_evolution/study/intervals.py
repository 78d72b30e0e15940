"""Uncertainty over seeds: the mean and 95% interval of a figure, and the verdict of a claim on
the interval of its effect (scripts/reproduce.py).

An effect is oriented so that a positive value is the claimed direction. A claim **holds** when
its interval lies above zero (it excludes no effect and the opposite direction), is
**contradicted** when its interval lies at or below zero (it excludes the claimed direction),
and is **not resolved** otherwise, or when the interval cannot be computed (one seed, or a
figure that is not finite on some seed).

Intervals are Student's t (mean +- t_{0.975, n-1} s / sqrt(n), s the sample standard deviation
with n - 1) below BOOTSTRAP_FROM seeds, and a percentile bootstrap of the mean from there
(BOOTSTRAP_RESAMPLES resamples of the seeds with replacement, drawn by
numpy.random.default_rng(BOOTSTRAP_SEED).integers(0, n, (BOOTSTRAP_RESAMPLES, n)); the interval
is numpy.quantile of the resampled means at 0.025 and 0.975). With few seeds the t interval is
the honest one: a bootstrap of 3 values can only return means of those 3 values.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95
BOOTSTRAP_FROM = 20
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
MAX_SEEDS_NEEDED = 10_000  # beyond this, "no practical number of seeds" resolves a claim

HOLDS, CONTRADICTED, NOT_RESOLVED = "holds", "contradicted", "not resolved"
STUDENT_T, BOOTSTRAP = "student-t", "bootstrap-percentile"


def method_for(n: int) -> str | None:
    """The interval method used for n seeds (None below 2 seeds: no interval)."""
    if n < 2:
        return None
    return BOOTSTRAP if n >= BOOTSTRAP_FROM else STUDENT_T


def t_quantile(n: int, level: float = LEVEL) -> float:
    """The two-sided Student's t quantile for n values (n - 1 degrees of freedom)."""
    return float(stats.t.ppf(0.5 + level / 2, n - 1))


def interval(values, level: float = LEVEL) -> dict:
    """Mean, sample standard deviation and the `level` interval of the mean of `values` (one
    per seed), with the method used. Non-finite values or fewer than 2 give a NaN interval."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    mean = float(np.mean(v)) if n else math.nan
    sd = float(np.std(v, ddof=1)) if n > 1 else math.nan
    method = method_for(n)
    lo = hi = math.nan
    if method is not None and np.all(np.isfinite(v)):
        if method == STUDENT_T:
            half = t_quantile(n, level) * sd / math.sqrt(n)
            lo, hi = mean - half, mean + half
        else:
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            means = v[rng.integers(0, n, (BOOTSTRAP_RESAMPLES, n))].mean(axis=1)
            lo, hi = (float(q) for q in np.quantile(means, [0.5 - level / 2, 0.5 + level / 2]))
    return {
        "per_seed": [float(x) for x in v],
        "mean": mean,
        "sd": sd,
        "interval": [float(lo), float(hi)],
        "method": method,
        "level": level,
    }


def verdict(lo: float, hi: float) -> str:
    """The verdict of a claim whose effect (positive = claimed direction) has interval
    [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_RESOLVED
    if lo > 0:
        return HOLDS
    if hi <= 0:
        return CONTRADICTED
    return NOT_RESOLVED


def seeds_needed(mean: float, sd: float, level: float = LEVEL) -> int | None:
    """The fewest seeds whose Student's t interval would exclude zero if the mean and the
    spread stayed as observed: the smallest n >= 2 with t_{n-1} sd / sqrt(n) < |mean|. None
    when no number up to MAX_SEEDS_NEEDED would (a zero or non-finite mean or spread)."""
    if not (math.isfinite(mean) and math.isfinite(sd)) or mean == 0:
        return None
    if sd == 0:
        return 2

    # the half-width shrinks monotonically in n: bisect on [2, MAX_SEEDS_NEEDED]
    def resolves(n):
        return t_quantile(n, level) * sd / math.sqrt(n) < abs(mean)

    if not resolves(MAX_SEEDS_NEEDED):
        return None
    lo, hi = 2, MAX_SEEDS_NEEDED
    while lo < hi:
        mid = (lo + hi) // 2
        if resolves(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def judge(values, level: float = LEVEL) -> dict:
    """interval() of an effect's per-seed values with its verdict and, when not resolved, the
    seeds that would resolve it at the observed mean and spread."""
    out = interval(values, level)
    out["verdict"] = verdict(*out["interval"])
    out["seeds_needed"] = (
        seeds_needed(out["mean"], out["sd"], level) if out["verdict"] == NOT_RESOLVED else None
    )
    return out


def format_interval(summary: dict, digits: int = 4) -> str:
    """'mean [lo, hi]', or just the mean where there is no interval."""
    mean, (lo, hi) = summary["mean"], summary["interval"]
    if not math.isfinite(mean):
        return "nan"
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"
