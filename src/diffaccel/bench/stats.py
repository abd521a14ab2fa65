"""Seed statistics for benchmark tables: 95 % intervals, significance by non-overlap, and a convergence flag.

The spread that flips rankings is the seed-to-seed one (training and sampling seeds), so an interval is taken
over K independent seeds, not bootstrapped over the samples of one: the Student-t interval of the mean,
mean ± t_{0.975, K-1} · s / √K, with s the sample standard deviation of the K per-seed values. With K = 1
there is no interval (it is reported as such, never as ± 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as _scipy_stats


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None: fewer than two finite values
    n: int

    @property
    def low(self) -> float:
        return self.mean - (self.half_width or 0.0)

    @property
    def high(self) -> float:
        return self.mean + (self.half_width or 0.0)

    def overlaps(self, other: "Interval") -> bool:
        """True unless both intervals exist and are disjoint (no interval: no claim of a difference)."""
        if self.half_width is None or other.half_width is None:
            return True
        return not (self.high < other.low or other.high < self.low)

    def format(self, digits: int = 3) -> str:
        if math.isnan(self.mean):
            return "-"
        text = f"{self.mean:.{digits}g}"
        return text if self.half_width is None else f"{text} ± {self.half_width:.2g}"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "ci95_half_width": self.half_width, "n_seeds": self.n,
                "ci95": [self.low, self.high] if self.half_width is not None else None}


def mean_interval(values, level: float = 0.95) -> Interval:
    """Mean and Student-t ``level`` interval half-width of the finite ``values`` (one per seed)."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return Interval(math.nan, None, 0)
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return Interval(mean, None, len(xs))
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    t = float(_scipy_stats.t.ppf(0.5 + level / 2, df=len(xs) - 1))
    return Interval(mean, t * sd / math.sqrt(len(xs)), len(xs))


def still_improving(curve: list[tuple[int, float]], higher_is_better: bool = False) -> bool:
    """True when the best value of a (step, value) curve is at its last evaluation: it has not flattened, and
    no "steps to reach X" figure may be read from it."""
    points = [(s, v) for s, v in curve if v is not None and math.isfinite(v)]
    if len(points) < 2:
        return True
    values = [v for _, v in points]
    best = max(values) if higher_is_better else min(values)
    return values[-1] == best


def first_step_reaching(curve: list[tuple[int, float]], target: float, higher_is_better: bool = False):
    """First step whose value is at least as good as ``target``, or None."""
    for step, value in curve:
        if value is not None and (value >= target if higher_is_better else value <= target):
            return step
    return None
