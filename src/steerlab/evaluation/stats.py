"""Uncertainty for evaluation numbers: bootstrap intervals over items, and steerability.

Every interval here is a 95% percentile bootstrap over the items (prompts, or A/B items)
of one cell, with a fixed seed, so a report is reproducible. Paired statistics (a cell
minus the baseline, or minus a neighbour) resample the same items on both sides.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

RESAMPLES = 2000


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def bootstrap_ci(
    values: Sequence[float], *, seed: int = 0, resamples: int = RESAMPLES
) -> tuple[float, float]:
    """The 95% percentile-bootstrap interval of the mean (NaN values dropped)."""
    data = torch.tensor([v for v in values if math.isfinite(v)], dtype=torch.float64)
    if data.numel() == 0:
        return float("nan"), float("nan")
    if data.numel() == 1:
        return float(data[0]), float(data[0])
    gen = torch.Generator().manual_seed(seed)
    index = torch.randint(0, data.numel(), (resamples, data.numel()), generator=gen)
    means = data[index].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Per-item differences ``a - b`` (items where either is NaN dropped)."""
    return [x - y for x, y in zip(a, b, strict=True) if math.isfinite(x) and math.isfinite(y)]


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95% bootstrap interval and the number of items."""

    mean: float
    lo: float
    hi: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float], seed: int = 0) -> Estimate:
        lo, hi = bootstrap_ci(values, seed=seed)
        return cls(mean(values), lo, hi, sum(1 for v in values if math.isfinite(v)))

    def excludes(self, value: float) -> bool:
        """Whether the interval lies entirely on one side of ``value``."""
        return self.lo > value or self.hi < value

    def text(self, digits: int = 3) -> str:
        if not math.isfinite(self.mean):
            return "-"
        return f"{self.mean:.{digits}f} [{self.lo:.{digits}f}, {self.hi:.{digits}f}]"


def logit(p: float, eps: float = 1e-6) -> float:
    """``log(p / (1 - p))``: for an A/B score p(match)/(p(match)+p(other)) this is the
    logit difference log p(match) − log p(other)."""
    q = min(max(p, eps), 1 - eps)
    return math.log(q / (1 - q))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``ys`` against ``xs``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


@dataclass(frozen=True)
class Steerability:
    """Tan et al. (2024): per item, the slope of the logit difference (matching minus
    non-matching answer) against the multiplier over a symmetric range; the mean slope
    (with its interval) and the share of anti-steerable items (negative slope)."""

    slope: Estimate
    anti_steerable: float
    multipliers: tuple[float, ...]


def symmetric(multipliers: Sequence[float]) -> tuple[float, ...]:
    """The multipliers whose negation is also present (0 included): a symmetric range."""
    present = set(multipliers)
    return tuple(sorted(m for m in present if -m in present))


def steerability(scores: Mapping[float, Sequence[float]], seed: int = 0) -> Steerability | None:
    """From per-item A/B scores at each multiplier; None without a symmetric range of at
    least two multipliers."""
    ms = [m for m in symmetric(list(scores)) if m in scores]
    if len(ms) < 2:
        return None
    n = len(scores[ms[0]])
    slopes = [slope(ms, [logit(scores[m][i]) for m in ms]) for i in range(n)]
    anti = sum(1 for s in slopes if s < 0) / n if n else float("nan")
    return Steerability(Estimate.of(slopes, seed), anti, tuple(ms))
