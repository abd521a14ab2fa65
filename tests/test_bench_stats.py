"""Seed intervals, significance and the convergence flag of the benchmark tables, on numbers with known answers."""

import math

import pytest

from diffaccel.bench.stats import first_step_reaching, mean_interval, still_improving


def test_t_interval_of_three_values_closed_form():
    iv = mean_interval([1.0, 2.0, 3.0])
    # mean 2, s = 1, t_{0.975, 2} = 4.302652729749464
    assert iv.mean == 2.0 and iv.n == 3
    assert iv.half_width == pytest.approx(4.302652729749464 / math.sqrt(3), rel=1e-10)


def test_interval_covers_the_mean_95_percent_of_the_time():
    import random

    rng = random.Random(0)
    trials, hits = 4000, 0
    for _ in range(trials):
        iv = mean_interval([rng.gauss(5.0, 2.0) for _ in range(3)])
        hits += iv.low <= 5.0 <= iv.high
    # binomial sd of the coverage over 4000 trials is 0.0034: 4 sd either side
    assert abs(hits / trials - 0.95) < 0.014


def test_one_seed_has_no_interval_and_claims_no_difference():
    one = mean_interval([4.0])
    assert one.half_width is None and one.format() == "4"
    assert one.overlaps(mean_interval([100.0, 101.0, 102.0]))


def test_overlap_decides_significance():
    a, b = mean_interval([1.0, 1.1, 0.9]), mean_interval([2.0, 2.1, 1.9])
    assert not a.overlaps(b) and not b.overlaps(a)
    c = mean_interval([1.0, 3.0, 2.0])
    assert c.overlaps(a) and c.overlaps(b)


def test_non_finite_values_are_dropped():
    iv = mean_interval([1.0, float("nan"), None, 3.0])
    assert iv.n == 2 and iv.mean == 2.0


def test_still_improving_flags_a_curve_whose_best_is_last():
    assert still_improving([(1, 9.0), (2, 5.0), (3, 4.0)])
    assert not still_improving([(1, 9.0), (2, 4.0), (3, 4.5)])
    assert still_improving([(1, 0.1), (2, 0.5)], higher_is_better=True)
    assert not still_improving([(1, 0.6), (2, 0.5)], higher_is_better=True)


def test_first_step_reaching():
    curve = [(100, 9.0), (200, 5.0), (300, 4.0)]
    assert first_step_reaching(curve, 5.0) == 200
    assert first_step_reaching(curve, 1.0) is None
