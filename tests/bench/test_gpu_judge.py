"""How ``make bench-gpu`` judges a case (``bench/gpu_judge.py``, ``bench/gpu_session.py``): both
ratios from given timings, the verdict on the interval of the median per-pair ratio, the spread of
each side, the raw side's encode counted in ratio (b), and pairs run in alternating order."""

from __future__ import annotations

from typing import Any

import pytest

from bench.gpu import tables
from bench.gpu_judge import (
    ENGINE_TARGET,
    FAIL,
    JOB_TARGET,
    NOT_REPORTED,
    PASS,
    SMOKE,
    UNSURE,
    Spread,
    judge,
    median_interval,
)
from bench.gpu_session import Bench, interleave, judge_case


def noisy(base: float, n: int = 15, step: float = 0.001) -> list[float]:
    """``n`` values spread evenly around ``base`` (+-step*7 for 15)."""
    return [base + step * (i - n // 2) for i in range(n)]


def test_spread_reports_median_p10_p90_and_extremes() -> None:
    spread = Spread.of([float(x) for x in range(1, 12)])  # 1..11
    assert spread == Spread(n=11, median=6.0, p10=2.0, p90=10.0, min=1.0, max=11.0)
    assert Spread.of([]) is None


def test_median_interval_of_fifteen_pairs_is_the_4th_to_12th_smallest() -> None:
    samples = [float(x) for x in range(15, 0, -1)]  # order must not matter
    assert median_interval(samples) == (4.0, 12.0)


def test_five_pairs_give_no_95_percent_interval_and_six_give_min_to_max() -> None:
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0]) is None
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (1.0, 6.0)


def test_a_ratio_passes_when_its_whole_interval_is_at_or_below_the_target() -> None:
    raw = noisy(2.0)
    engine = [r * 1.01 for r in raw]
    judgement = judge(engine, raw, ENGINE_TARGET)
    assert judgement.verdict == PASS and judgement.ok is True
    assert judgement.ratio is not None and judgement.ratio.median == pytest.approx(1.01)
    assert judgement.numerator is not None and judgement.numerator.median == pytest.approx(2.02)
    assert judgement.denominator is not None and judgement.denominator.median == pytest.approx(2.0)


def test_a_ratio_fails_when_its_whole_interval_is_above_the_target() -> None:
    raw = noisy(2.0)
    judgement = judge([r * 1.08 for r in raw], raw, ENGINE_TARGET)
    assert judgement.verdict == FAIL and judgement.ok is False


def test_a_median_below_the_target_with_an_interval_across_it_is_unsure() -> None:
    raw = [1.0] * 15
    # Per-pair ratios 1.000 .. 1.042: median 1.021 (below 1.03), but the 4th..12th smallest
    # (1.009 .. 1.033) span the target.
    engine = [1.0 + 0.003 * i for i in range(15)]
    judgement = judge(engine, raw, ENGINE_TARGET)
    assert judgement.ratio is not None and judgement.ratio.median < ENGINE_TARGET
    assert judgement.interval is not None and judgement.interval[0] < ENGINE_TARGET < judgement.interval[1]
    assert judgement.verdict == UNSURE and judgement.ok is None


def test_five_repeats_cannot_pass_a_three_percent_target() -> None:
    raw = noisy(2.0, n=5)
    assert judge([r * 1.0 for r in raw], raw, ENGINE_TARGET).verdict == UNSURE


def test_the_verdict_is_on_per_pair_ratios_so_drift_common_to_a_pair_cancels() -> None:
    # The machine slows down over the run; each job is 2 % slower than the raw call beside it.
    raw = [1.0 + 0.1 * i for i in range(15)]
    engine = [r * 1.02 for r in raw]
    judgement = judge(engine, raw, ENGINE_TARGET)
    assert judgement.ratio is not None
    assert judgement.ratio.min == pytest.approx(1.02) and judgement.ratio.max == pytest.approx(1.02)
    assert judgement.verdict == PASS


def test_a_smoke_run_gets_no_verdict_and_an_engine_without_timing_gets_na() -> None:
    raw = noisy(0.01)
    assert judge([r * 2 for r in raw], raw, ENGINE_TARGET, smoke=True).verdict == SMOKE
    missing = judge([None] * 15, raw, ENGINE_TARGET)
    assert missing.verdict == NOT_REPORTED and missing.ok is None and missing.ratio is None
    assert missing.denominator is not None and missing.denominator.median == pytest.approx(0.01)


def test_numerators_and_denominators_must_pair_up() -> None:
    with pytest.raises(ValueError, match="3 numerators for 2 denominators"):
        judge([1.0, 1.0, 1.0], [1.0, 1.0], JOB_TARGET)


def fake_bench(repeats: int = 15) -> Bench:
    # The judging needs no platform: only the rows, the repeats and the smoke flag.
    return Bench(plat=None, store=None, device="cpu", small=False, repeats=repeats)  # type: ignore[arg-type]


def test_ratio_b_counts_the_raw_sides_encode_and_judges_both_ratios() -> None:
    bench = fake_bench()
    raw_call = noisy(0.9)
    # The job takes 4 % longer than raw call + encode; its engine call 5.5 % longer than the call.
    raws = [{"call_s": c, "encode_s": 0.1} for c in raw_call]
    jobs = [{"engine_s": c * 1.055, "job_s": (c + 0.1) * 1.04} for c in raw_call]
    judged = judge_case(bench, "superres", "rrdb x4 512x512", jobs, raws)
    assert judged["engine_vs_raw"]["verdict"] == FAIL
    assert judged["job_vs_raw_plus_encode"]["verdict"] == PASS
    assert judged["job_vs_raw_plus_encode"]["ratio"]["median"] == pytest.approx(1.04)
    assert judged["job_vs_raw_plus_encode"]["denominator"]["median"] == pytest.approx(1.0)
    assert judged["job_vs_raw_plus_encode"]["difference_s"]["median"] == pytest.approx(0.04)
    rows = {row["metric"]: row for row in bench.rows}
    assert rows["rrdb x4 512x512: (a) engine call / raw call"]["pass"] is False
    assert rows["rrdb x4 512x512: (b) job started..finished / (raw call + encode)"]["pass"] is True
    assert all(row["target"] in (f"<= {ENGINE_TARGET}", f"<= {JOB_TARGET}") for row in bench.rows)


def test_pairs_alternate_which_side_runs_first() -> None:
    order: list[str] = []

    def run_job(i: int) -> dict[str, Any]:
        order.append(f"job{i}")
        return {"engine_s": None, "job_s": 1.0}

    def run_raw(i: int) -> dict[str, Any]:
        order.append(f"raw{i}")
        return {"call_s": 1.0, "encode_s": 0.0}

    jobs, raws = interleave(fake_bench(repeats=4), "case", run_job, run_raw)
    assert order == ["job0", "raw0", "raw1", "job1", "job2", "raw2", "raw3", "job3"]
    assert len(jobs) == len(raws) == 4


def test_the_table_shows_both_sides_and_the_ratio_as_median_p10_p90_with_the_interval() -> None:
    bench = fake_bench()
    raw_call = noisy(0.9)
    raws = [{"call_s": c, "encode_s": 0.1} for c in raw_call]
    jobs = [{"engine_s": None, "job_s": (c + 0.1) * 1.02} for c in raw_call]
    judge_case(bench, "faceswap", "1920x1080, 1 face(s)", jobs, raws)
    text = tables(bench.rows)
    assert "1920x1080, 1 face(s): (a) engine call / raw call" in text
    assert "raw 0.9000 [0.8944..0.9056] s; the engine reports no call time" in text
    assert (
        "job 1.0200 [1.0143..1.0257] s   raw+enc 1.0000 [0.9944..1.0056] s   ratio 1.020 [1.020..1.020]"
        in text
    )
    assert "95% CI 1.020..1.020   n=15   added +20.0 ms" in text
    assert text.count("PASS") == 1 and "n/a" in text


def test_few_pairs_are_judged_on_min_to_max_at_its_own_confidence() -> None:
    raw = [30.0, 31.0, 29.0]
    jobs: list[float | None] = [raw[0] * 1.02, raw[1] * 1.02, raw[2] * 1.04]
    judgement = judge(jobs, raw, JOB_TARGET, few_pairs=True)
    assert judgement.interval == pytest.approx((1.02, 1.04))
    assert judgement.confidence == pytest.approx(0.75)  # 1 - 2^(1-3)
    assert judgement.verdict == PASS and judgement.as_dict()["interval_confidence"] == 0.75
    # Without few_pairs three pairs give no interval, so no verdict.
    assert judge([r * 1.02 for r in raw], raw, JOB_TARGET).verdict == UNSURE


def test_few_pairs_pass_only_when_every_pair_meets_the_target() -> None:
    raw = [30.0, 30.0, 30.0]
    one_over = judge([30.3, 30.6, 31.8], raw, JOB_TARGET, few_pairs=True)  # 1.01, 1.02, 1.06
    assert one_over.verdict == UNSURE
    all_over = judge([31.8, 32.1, 33.0], raw, JOB_TARGET, few_pairs=True)
    assert all_over.verdict == FAIL
    assert judge([31.8], [30.0], JOB_TARGET, few_pairs=True).verdict == UNSURE  # one pair: no interval


def test_few_pairs_leaves_six_or_more_pairs_to_the_95_percent_interval() -> None:
    raw = noisy(2.0)
    judgement = judge([r * 1.01 for r in raw], raw, ENGINE_TARGET, few_pairs=True)
    assert judgement.confidence == 0.95 and judgement.verdict == PASS


def test_the_table_prints_a_few_pairs_confidence() -> None:
    bench = fake_bench(repeats=3)
    judgement = judge([30.6, 30.6, 30.6], [30.0, 30.0, 30.0], JOB_TARGET, few_pairs=True)
    bench.judged_row("training", "512x512 rank 16, 100 steps: (a) s/step", judgement, ("worker", "direct"))
    assert "75% CI 1.020..1.020   n=3" in tables(bench.rows)
