"""Means with intervals and paired comparisons, for every score a person reads in a report.

A style score over n samples is a mean with a 95% percentile-bootstrap interval. Two models
scored on the same prompts are compared per prompt (paired): the mean difference with its
interval, the win rate, and the difference that remains at equal answer length (the intercept
of difference ~ length difference), since a longer answer can score darker just by being long.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

N_RESAMPLES = 2000


def _resample_index(n: int, seed: int, resamples: int = N_RESAMPLES) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def mean_ci(values: Sequence[float], seed: int = 0, level: float = 0.95) -> dict:
    """{mean, ci_low, ci_high, n}: the sample mean and its percentile-bootstrap interval."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    means = x[_resample_index(x.size, seed)].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": _r(x.mean()), "ci_low": _r(lo), "ci_high": _r(hi), "n": int(x.size)}


def length_controlled(diff: np.ndarray, length_diff: np.ndarray) -> float:
    """The difference expected at equal length: the intercept of `diff ~ a + b * length_diff`."""
    if np.ptp(length_diff) == 0:  # one length gap for every pair: only a zero gap says anything
        return float(diff.mean()) if length_diff[0] == 0 else float("nan")
    design = np.stack([np.ones_like(length_diff), length_diff], axis=1)
    coef, *_ = np.linalg.lstsq(design, diff, rcond=None)
    return float(coef[0])


def paired(a: Sequence[float], b: Sequence[float], len_a: Sequence[float] | None = None,
           len_b: Sequence[float] | None = None, seed: int = 0, level: float = 0.95) -> dict:
    """Model A against model B on the same prompts: {mean_diff, ci_low, ci_high, win_rate, n}
    (win rate: share of prompts where A scores higher, ties counted half), and with lengths the
    length-controlled difference with its interval and whether the effect survives it."""
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired comparison needs the same prompts: {x.size} vs {y.size} scores")
    if x.size == 0:
        return {"mean_diff": None, "ci_low": None, "ci_high": None, "win_rate": None, "n": 0}
    d = x - y
    ci = mean_ci(d, seed, level)
    out = {"mean_diff": ci["mean"], "ci_low": ci["ci_low"], "ci_high": ci["ci_high"],
           "win_rate": _r(float(np.mean((d > 0) + 0.5 * (d == 0)))), "n": int(d.size)}
    if len_a is not None and len_b is not None:
        ld = np.asarray(len_a, dtype=float) - np.asarray(len_b, dtype=float)
        idx = _resample_index(d.size, seed + 1)
        boots = np.array([length_controlled(d[i], ld[i]) for i in idx])
        boots = boots[np.isfinite(boots)]
        point = length_controlled(d, ld)
        lo, hi = np.quantile(boots, [(1 - level) / 2, (1 + level) / 2]) if boots.size else (np.nan, np.nan)
        controlled = {"diff_at_equal_length": _r(point), "ci_low": _r(lo), "ci_high": _r(hi),
                      "mean_length_diff": _r(ld.mean())}
        out["length_controlled"] = controlled
        # the raw difference is real and the one left at equal length points the same way
        out["survives_length_control"] = (excludes_zero(out) and excludes_zero(controlled)
                                          and (controlled["ci_low"] > 0) == (out["ci_low"] > 0))
    return out


def excludes_zero(ci: dict) -> bool:
    """Whether an interval lies wholly on one side of 0: the difference survives the noise."""
    return ci.get("ci_low") is not None and (ci["ci_low"] > 0 or ci["ci_high"] < 0)


def _r(v) -> float | None:
    v = float(v)
    return None if not np.isfinite(v) else round(v, 4)
