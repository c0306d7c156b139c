"""The training section of ``make bench-gpu`` (``bench/gpu_training.py``): its payload is one the
API takes, each side's numbers come from where the docstring says, and both ratios are judged on
a few pairs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bench.gpu_judge import FAIL, PASS, SMOKE
from bench.gpu_training import FULL, SMALL, job_sample, judge_training, loss_gap, outcome_sample
from tasks.payloads.training import TrainLoraPayload


def test_the_plans_are_the_issues_and_the_payload_passes_the_api_schema() -> None:
    assert (FULL.resolution, FULL.rank, FULL.steps) == (512, 16, 100)
    assert (SMALL.resolution, SMALL.rank) == (256, 4)
    uris = ["data:image/png;base64,AAAA"] * FULL.images
    loaded = TrainLoraPayload().load(FULL.payload("bench-sd15", uris))
    assert loaded["rank"] == 16 and loaded["steps"] == 100 and loaded["resolution"] == 512
    assert TrainLoraPayload().load(SMALL.payload("bench-sd15-small", uris, steps=2))["steps"] == 2


def test_a_jobs_seconds_per_step_come_from_its_result_meta() -> None:
    job = {
        "job_id": "j1",
        "started_at_ms": 1_000,
        "finished_at_ms": 33_500,
        "result": {
            "model_id": "lora-j1",
            "meta": {"steps": 100, "seconds": 30.0, "peak_memory_bytes": 7 * 2**30, "final_loss": 0.1},
        },
    }
    sample = job_sample(job)
    assert sample["engine_s"] == 30.0 and sample["job_s"] == pytest.approx(32.5)
    assert sample["s_per_step"] == pytest.approx(0.3) and sample["steps_per_s"] == pytest.approx(10 / 3)
    assert sample["peak_device_bytes"] == 7 * 2**30 and sample["model_id"] == "lora-j1"


def test_a_direct_calls_seconds_per_step_come_from_its_outcome() -> None:
    outcome = SimpleNamespace(
        seconds=20.0, steps=100, peak_memory_bytes=None, final_loss=0.1, dtype="float32", optimizer="AdamW"
    )
    sample = outcome_sample(outcome, wall_s=20.05)
    assert sample["call_s"] == 20.05 and sample["encode_s"] == 0.0
    assert sample["s_per_step"] == pytest.approx(0.2) and sample["peak_device_bytes"] is None


def test_both_ratios_are_judged_on_three_pairs() -> None:
    directs = [{"s_per_step": 0.2, "call_s": 21.0}] * 3
    jobs = [{"s_per_step": 0.202, "job_s": 23.0}] * 3  # the loop 1 % slower; the job 9.5 % longer
    per_step, whole = judge_training(jobs, directs, smoke=False)
    assert per_step.verdict == PASS and per_step.ratio is not None
    assert per_step.ratio.median == pytest.approx(1.01) and per_step.target == 1.05
    assert whole.verdict == FAIL and whole.confidence == pytest.approx(0.75)
    assert {j.verdict for j in judge_training(jobs, directs, smoke=True)} == {SMOKE}


def test_the_loss_gap_shows_whether_both_sides_trained_the_same_thing() -> None:
    assert loss_gap([{"final_loss": 0.5}], [{"final_loss": 0.5}]) == 0.0
    assert loss_gap([{"final_loss": 0.51}], [{"final_loss": 0.5}]) == pytest.approx(0.02)
    assert loss_gap([{"final_loss": None}], [{"final_loss": 0.5}]) is None
