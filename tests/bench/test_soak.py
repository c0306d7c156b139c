"""The soak's arithmetic (bench/soak.py): the fitted slopes and what counts as flat."""

from __future__ import annotations

from bench.soak import FDS_FLAT, ROLES, fitted, judge, slope


def sample(t: float, rss: float, fds: int, backlog: int) -> dict:
    roles = {role: {"rss_mb": rss, "fds": fds, "procs": 1} for role in ROLES}
    return {"t": t, **roles, "queues": {"cpu": backlog}, "not_final": backlog, "event_rows": 0}


def test_slope_is_the_least_squares_line_through_the_points() -> None:
    assert slope([0, 1, 2, 3], [1, 3, 5, 7]) == 2
    assert slope([0, 1, 2], [4, 4, 4]) == 0
    assert slope([5], [1]) == 0


def test_the_warm_up_is_left_out_of_the_fit() -> None:
    samples = [sample(0, 10, 3, 0), sample(60, 100, 3, 0), sample(120, 100, 3, 0), sample(180, 100, 3, 0)]
    fit = fitted(samples, 60, lambda s: s["api"]["rss_mb"])
    assert fit["n"] == 3 and fit["slope_per_hour"] == 0 and fit["growth_over_span"] == 0


def test_a_leak_fails_and_a_flat_run_passes() -> None:
    def results(rss_step: float, fd_step: int, backlog_step: int) -> dict:
        samples = [
            sample(t, 100 + rss_step * i, 20 + fd_step * i, backlog_step * i)
            for i, t in enumerate(range(0, 600, 60))
        ]
        series = {}
        for role in ROLES:
            series[f"{role}_rss_mb"] = fitted(samples, 0, lambda s, r=role: s[r]["rss_mb"])
            series[f"{role}_fds"] = fitted(samples, 0, lambda s, r=role: s[r]["fds"])
        series["ready_messages"] = fitted(samples, 0, lambda s: sum(s["queues"].values()))
        series["jobs_not_final"] = fitted(samples, 0, lambda s: s["not_final"])
        return {"series": series, "args": {"rate": 3.0}}

    assert all(v["ok"] for v in judge(results(0.1, 0, 0)))
    leaky = {v["what"]: v["ok"] for v in judge(results(2.0, FDS_FLAT, 5))}
    assert not leaky["api RSS growth"] and not leaky["api open fds growth"]
    assert not leaky["jobs_not_final growth"] and not leaky["ready_messages growth"]
