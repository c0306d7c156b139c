"""A new local task is two files: an engine module and its payload schema.

``tests/support/demo_task`` holds both for ``demo_invert``; registering its engine is all it takes
for the catalog, the API, the time estimate, the warm-up, the blocking endpoint list and the run
path to know the task. The last tests check that the platform's own tasks come from the same
registry, so no second list can drift from it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from flask.testing import FlaskClient
from PIL import Image

from app import create_app
from config import Settings
from inference.base import NullControl
from inference.engines import REGISTRY
from inference.registry import Engine, EngineCall, LocalTask
from tasks import catalog, payloads
from tasks.engines import ENGINES
from tests.conftest import KEYS
from tests.support.demo_task import engine as demo_engine
from tests.support.demo_task.payload import DemoInvertPayload
from tests.support.images import data_uri

ALICE = {"X-API-Key": KEYS[0][1]}


@pytest.fixture
def demo_task() -> Iterator[Engine]:
    REGISTRY.register(demo_engine.ENGINE)
    try:
        yield demo_engine.ENGINE
    finally:
        REGISTRY.unregister(demo_engine.ENGINE.name)


def test_the_demo_task_is_unknown_until_its_engine_is_registered() -> None:
    with pytest.raises(catalog.UnknownTask):
        catalog.resolve("demo_invert")
    assert "demo_invert" not in catalog.TASKS


def test_a_registered_engine_and_its_payload_schema_make_a_task_the_catalog_runs(
    demo_task: Engine, settings: Settings
) -> None:
    spec = catalog.resolve("demo_invert")
    assert (spec.queue, spec.engine, spec.schema) == ("gpu.vision", "demo", DemoInvertPayload)
    assert spec.inputs == ("image_url",) and spec.videos == ()
    assert (spec.predict_seconds, catalog.time_limits(spec)) == (
        0.5,
        {"soft_time_limit": 30, "time_limit": 40},
    )
    assert catalog.blocking_endpoints()["/demo-invert"] == "demo_invert"
    assert "PIL.ImageChops" in REGISTRY.warmup_modules(["gpu.vision"])

    # The run path: the payload checked by the task's schema, then the engine the spec names.
    picture = Image.new("RGB", (32, 24), (10, 200, 40))
    payload = catalog.payload_schema(spec, settings).load({"image_url": data_uri(picture)})
    assert payload["amount"] == 1.0
    call = EngineCall(spec.name, payload, {"image_url": picture}, NullControl(), 1, settings)
    result = ENGINES[spec.engine or ""](call)
    assert result.backend == "demo-invert"
    assert result.images[0].image.getpixel((5, 5)) == (245, 55, 215)


def test_the_api_takes_lists_and_refuses_the_new_task_by_its_schema(
    demo_task: Engine, settings: Settings
) -> None:
    client: FlaskClient = create_app(settings).test_client()
    tasks = {t["task"]: t for t in client.get("/v1/capabilities", headers=ALICE).get_json()["tasks"]}
    listed = tasks["demo_invert"]
    assert (listed["queue"], listed["installed"], listed["inputs"]) == ("gpu.vision", True, ["image_url"])
    assert "amount" in {p["name"] for p in listed["parameters"]}

    image = data_uri(Image.new("RGB", (32, 24)))
    bad = client.post(
        "/v1/jobs", json={"task": "demo_invert", "payload": {"image_url": image, "amount": 2}}, headers=ALICE
    )
    assert bad.status_code == 422 and "amount" in str(bad.get_json()["error"]["details"])
    made = client.post(
        "/v1/jobs", json={"task": "demo_invert", "payload": {"image_url": image}}, headers=ALICE
    )
    assert made.status_code == 202, made.get_json()
    job = made.get_json()
    assert job["task"] == "demo_invert" and job["predict_time"] == 0.5


def test_a_declared_task_without_a_payload_schema_is_refused_naming_the_missing_file(
    settings: Settings,
) -> None:
    orphan = Engine(
        "orphan", "gpu.vision", (LocalTask("orphan_task", "no schema"),), run=demo_engine.run_demo_invert
    )
    REGISTRY.register(orphan)
    try:
        with pytest.raises(LookupError, match=r"tasks/payloads/.*@payload_for\('orphan_task'\)"):
            catalog.TASKS.get("orphan_task")
    finally:
        REGISTRY.unregister("orphan")
    assert "upscale" in catalog.TASKS  # the catalog is whole again


def test_an_engine_cannot_take_a_task_another_engine_serves() -> None:
    thief = Engine("thief", "gpu.superres", (LocalTask("upscale", "again"),), run=demo_engine.run_demo_invert)
    with pytest.raises(ValueError, match="already served by engine 'upscale'"):
        REGISTRY.register(thief)
    with pytest.raises(ValueError, match="unknown queue"):
        Engine("lost", "gpu.nowhere", (LocalTask("lost_task", "x"),), run=demo_engine.run_demo_invert)


def test_every_local_task_the_catalog_lists_is_declared_once_by_a_registered_engine() -> None:
    for engine, task in REGISTRY.tasks():
        spec = catalog.TASKS[task.name]
        assert (spec.engine, spec.queue, spec.model_types) == (engine.name, engine.queue, task.model_types)
        assert spec.predict_seconds == task.predict_seconds
        assert spec.schema is payloads.schema_for(task.name)
        if task.blocking_path:
            assert catalog.blocking_endpoints()[task.blocking_path] == task.name
    local = {name for name, spec in catalog.TASKS.items() if not spec.remote_only}
    assert local == {task.name for _, task in REGISTRY.tasks()}


def test_the_warm_up_of_a_queue_is_what_its_engines_declare() -> None:
    assert REGISTRY.warmup_modules(["gpu.superres"]) == ["inference.superres", "inference.lanczos"]
    assert REGISTRY.warmup_modules(["gpu.vision"]) == ["inference.background", "inference.detection"]
    assert REGISTRY.warmup_modules(["cpu"]) == []
