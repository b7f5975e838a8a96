"""Intervals and paired comparisons (eval/stats.py) against cases worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from picoalign.eval.stats import excludes_zero, length_controlled, mean_ci, paired


def test_bootstrap_of_two_values_spans_them():
    """x = [0, 1]: a resample of two draws has mean 0, 0.5 or 1 with probability 1/4, 1/2, 1/4.
    Both ends carry 25% > 2.5% of the mass, so the 95% percentile interval is exactly [0, 1]."""
    ci = mean_ci([0.0, 1.0], seed=3)
    assert ci == {"mean": 0.5, "ci_low": 0.0, "ci_high": 1.0, "n": 2}


def test_bootstrap_of_a_constant_has_no_width():
    assert mean_ci([0.25] * 7) == {"mean": 0.25, "ci_low": 0.25, "ci_high": 0.25, "n": 7}
    assert mean_ci([]) == {"mean": None, "ci_low": None, "ci_high": None, "n": 0}


def test_bootstrap_interval_matches_the_normal_one_for_a_large_sample():
    """For n = 400 draws the percentile interval is close to mean ± 1.96·s/√n."""
    x = np.random.default_rng(0).normal(1.0, 2.0, size=400)
    ci = mean_ci(x, seed=1)
    half = 1.96 * x.std(ddof=1) / math.sqrt(x.size)
    assert ci["ci_low"] == pytest.approx(x.mean() - half, abs=0.1 * half)
    assert ci["ci_high"] == pytest.approx(x.mean() + half, abs=0.1 * half)
    assert ci == mean_ci(x, seed=1)  # deterministic for a seed


def test_paired_difference_win_rate_and_ties():
    """A − B per prompt = [0.2, 0.2, 0.0, -0.1]: mean 0.075; wins 2, tie 1 (half), loss 1 → 62.5%."""
    a, b = [0.5, 0.4, 0.3, 0.0], [0.3, 0.2, 0.3, 0.1]
    c = paired(a, b)
    assert c["mean_diff"] == pytest.approx(0.075)
    assert c["win_rate"] == 0.625 and c["n"] == 4
    assert c["ci_low"] <= 0.075 <= c["ci_high"]
    with pytest.raises(ValueError, match="same prompts"):
        paired([1.0, 2.0], [1.0])


def test_pairing_removes_what_the_prompts_share():
    """Prompt difficulty varies a lot (±5) but A is always exactly B + 0.1: the paired interval
    is [0.1, 0.1], while the two means' own intervals overlap almost completely."""
    base = np.random.default_rng(2).normal(0, 5, size=32)
    c = paired(base + 0.1, base)
    assert (c["mean_diff"], c["ci_low"], c["ci_high"], c["win_rate"]) == (0.1, 0.1, 0.1, 1.0)
    assert excludes_zero(c)
    ia, ib = mean_ci(base + 0.1), mean_ci(base)
    assert ia["ci_low"] < ib["ci_high"]  # unpaired, the same data shows nothing


def test_length_control_takes_out_a_difference_that_is_only_length():
    """d = 0.01 · Δwords exactly: at equal length nothing is left (intercept 0, slope 0.01)."""
    length_diff = np.array([10.0, 20.0, 30.0, 40.0, -5.0, 15.0])
    d = 0.01 * length_diff
    assert length_controlled(d, length_diff) == pytest.approx(0.0, abs=1e-12)
    c = paired(d, np.zeros(6), len_a=length_diff + 100, len_b=np.full(6, 100.0))
    assert c["ci_low"] > 0  # the raw difference is real...
    assert c["length_controlled"]["diff_at_equal_length"] == pytest.approx(0.0, abs=1e-9)
    assert c["survives_length_control"] is False  # ...but it is all length


def test_length_control_keeps_a_difference_that_is_not_length():
    """d = 0.3 + 0.01 · Δwords + small noise: the intercept is about 0.3 and survives."""
    rng = np.random.default_rng(4)
    ld = rng.normal(0, 20, size=40)
    d = 0.3 + 0.01 * ld + rng.normal(0, 0.02, size=40)
    c = paired(d, np.zeros(40), len_a=ld, len_b=np.zeros(40))
    assert c["length_controlled"]["diff_at_equal_length"] == pytest.approx(0.3, abs=0.02)
    assert c["survives_length_control"] is True
    # equal lengths everywhere: the controlled difference is the plain mean
    assert length_controlled(np.array([0.1, 0.3]), np.zeros(2)) == pytest.approx(0.2)
    assert math.isnan(length_controlled(np.array([0.1, 0.3]), np.full(2, 5.0)))
