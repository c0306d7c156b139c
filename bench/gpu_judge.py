"""How ``make bench-gpu`` judges a case: paired, interleaved timings against a target ratio.

Each case runs ``n`` pairs, a job through the platform and the bare library call, one after the
other and in alternating order, so drift of the machine (clocks, heat, other load) hits both sides
of a pair alike. The verdict is on the median of the per-pair ratios, with a distribution-free
confidence interval for that median from the order statistics (the sign-test interval: no
assumption about the shape of the noise). A target is met when the whole interval lies at or
below it, missed when the whole interval lies above it; an interval that straddles the target
leaves the case UNSURE (more repeats narrow it). Five repeats give no 95 % interval at all;
fifteen give the 4th..12th smallest ratio.

A case whose every run is long (LoRA training) can afford only a few pairs
(``FEW_REPEATS``). ``judge(..., few_pairs=True)`` then judges on the smallest..largest per-pair
ratio, the widest interval there is, which holds the median with confidence ``1 - 2^(1-n)``
(75 % for 3 pairs, 94 % for 5): a PASS means every pair met the target, which happens by chance
with probability at most ``2^-n`` (1/8 for 3) when the median ratio is above it. The judgement
carries that confidence, and the table prints it in place of 95 %.

Two ratios are judged per case (the issue "Ready for the first real GPU"):

(a) the engine's own call inside the worker / the raw library call: what the engine wrapper costs;
(b) the job's ``started_at..finished_at`` / (raw call + the same output encode): what a user waits
    for beyond the model's own work (claim, payload checks, decoding inputs, loading or finding
    the pipeline, storage, the final database write).

Pure Python: imported by the unit tests without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.stats import percentile

ENGINE_TARGET = 1.03  # (a) engine call / raw call
JOB_TARGET = 1.05  # (b) job started..finished / (raw call + encode)
MIN_REPEATS = 15
FEW_REPEATS = 3  # pairs of a case whose runs are long (training); judged with few_pairs
CONFIDENCE = 0.95

PASS, FAIL, UNSURE, SMOKE, NOT_REPORTED = "PASS", "FAIL", "UNSURE", "smoke", "n/a"


@dataclass(frozen=True)
class Spread:
    """Where samples lie: median, 10th and 90th percentiles, extremes."""

    n: int
    median: float
    p10: float
    p90: float
    min: float
    max: float

    @classmethod
    def of(cls, samples: list[float]) -> Spread | None:
        if not samples:
            return None

        def at(q: float) -> float:
            value = percentile(samples, q)
            assert value is not None
            return value

        return cls(len(samples), at(50), at(10), at(90), min(samples), max(samples))

    def as_dict(self, digits: int = 4) -> dict[str, Any]:
        return {k: v if isinstance(v, int) else round(v, digits) for k, v in asdict(self).items()}


def median_interval(samples: list[float], confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """A distribution-free interval holding the population median with at least ``confidence``:
    the k-th smallest and k-th largest sample, k the largest rank with P(Binomial(n, 1/2) < k) at
    most (1 - confidence) / 2. None when there are too few samples for any such k (n < 6 at 95 %)."""
    n = len(samples)
    tail = (1 - confidence) / 2
    below = 0.0  # P(B <= k - 1), B ~ Binomial(n, 1/2)
    k = 0
    while k < n // 2:
        below += math.comb(n, k) / 2**n
        if below > tail:
            break
        k += 1
    if k == 0:
        return None
    ordered = sorted(samples)
    return ordered[k - 1], ordered[n - k]


@dataclass(frozen=True)
class Judgement:
    """One ratio of one case: both sides' spreads, the per-pair ratios' spread, the verdict."""

    target: float
    verdict: str  # PASS, FAIL, UNSURE, SMOKE (no verdict on a smoke run), NOT_REPORTED
    numerator: Spread | None
    denominator: Spread | None
    ratio: Spread | None
    interval: tuple[float, float] | None  # of the median per-pair ratio
    ratio_of_medians: float | None
    difference: Spread | None = None  # per pair, numerator - denominator: the seconds added
    confidence: float = CONFIDENCE  # of ``interval``; lower for a few-pairs min..max interval

    @property
    def ok(self) -> bool | None:
        """True or False for a resolved verdict, None otherwise (the JSON's ``pass``)."""
        return {PASS: True, FAIL: False}.get(self.verdict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "verdict": self.verdict,
            "pass": self.ok,
            "numerator": self.numerator and self.numerator.as_dict(),
            "denominator": self.denominator and self.denominator.as_dict(),
            "ratio": self.ratio and self.ratio.as_dict(),
            "median_ratio_interval": self.interval and [round(x, 4) for x in self.interval],
            "interval_confidence": round(self.confidence, 4),
            "ratio_of_medians": self.ratio_of_medians,
            "difference_s": self.difference and self.difference.as_dict(),
        }


def min_max_interval(samples: list[float]) -> tuple[tuple[float, float], float] | None:
    """The smallest..largest sample and the confidence with which it holds the population median,
    ``1 - 2^(1-n)`` (the chance that not all ``n`` samples fall on one side of it); None for
    fewer than two samples, whose interval says nothing."""
    if len(samples) < 2:
        return None
    return (min(samples), max(samples)), 1 - 2.0 ** (1 - len(samples))


def judge(
    numerators: Sequence[float | None],
    denominators: Sequence[float],
    target: float,
    *,
    smoke: bool = False,
    few_pairs: bool = False,
) -> Judgement:
    """Judge ``numerator[i] / denominator[i] <= target`` over interleaved pairs.

    A pair whose numerator is None (the engine reported no timing) is left out; when none is left
    the verdict is NOT_REPORTED. ``smoke``: a run on tiny models, whose ratios measure Python
    overhead against milliseconds of compute, gets no verdict. ``few_pairs``: too few pairs for a
    95 % interval (n < 6) are judged on ``min_max_interval`` at its own, lower confidence."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators for {len(denominators)} denominators")
    pairs = [(a, b) for a, b in zip(numerators, denominators, strict=True) if a is not None and b > 0]
    num = [a for a, _ in pairs]
    den = [b for _, b in pairs]
    ratios = [a / b for a, b in pairs]
    interval = median_interval(ratios)
    confidence = CONFIDENCE
    if interval is None and few_pairs and (widest := min_max_interval(ratios)) is not None:
        interval, confidence = widest
    # With no numerator at all the denominators are still worth reporting.
    num_spread, den_spread = Spread.of(num), Spread.of(den if pairs else [b for b in denominators if b > 0])
    of_medians = round(num_spread.median / den_spread.median, 4) if num_spread and den_spread else None
    if not ratios:
        verdict = NOT_REPORTED
    elif smoke:
        verdict = SMOKE
    elif interval is not None and interval[1] <= target:
        verdict = PASS
    elif interval is not None and interval[0] > target:
        verdict = FAIL
    else:
        verdict = UNSURE
    difference = Spread.of([a - b for a, b in pairs])
    return Judgement(
        target,
        verdict,
        num_spread,
        den_spread,
        Spread.of(ratios),
        interval,
        of_medians,
        difference,
        confidence,
    )
