"""The Python client (``aiorch.client``) and the CLI's local logic, against real HTTP servers on
127.0.0.1 whose answers each test scripts: retries and ``Retry-After``, typed errors, streams and
polling, paging, bulk chunks, uploads, downloads; and that the client stays light (no Flask, no
torch, no server package), in a fresh interpreter.

The same client against the real platform is ``tests/client/integration/test_client_cli.py``.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from aiorch import (
    ApiError,
    AsyncClient,
    Client,
    Conflict,
    JobFailed,
    NotFound,
    RateLimited,
    ServerError,
    ServiceUnavailable,
    TransportError,
    ValidationFailed,
    WaitTimeout,
)
from aiorch.batch import INVALID, Journal, RunState, idempotency_key, read_lines
from aiorch.inputs import LocalInputError, LocalInputs
from aiorch.transport import retry_after_seconds
from aiorch.watch import parse_events

ROOT = Path(__file__).resolve().parents[2]


# -- a scriptable API server -------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


# An answer: (status, headers, body), the body bytes, a JSON value, or an iterator of byte chunks
# (streamed, as an event stream is); or RESET to drop the connection without answering.
RESET = "reset"
Route = Callable[[Seen], Any]


@dataclass
class FakeApi:
    route: Route
    seen: list[Seen] = field(default_factory=list)

    def start(self) -> FakeApi:
        owner = self
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                parts = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                seen = Seen(self.command, parts.path, parse_qs(parts.query), dict(self.headers.items()), body)
                with lock:
                    owner.seen.append(seen)
                answer = owner.route(seen)
                if answer == RESET:
                    self.close_connection = True
                    self.connection.close()
                    return
                status, headers, payload = answer if isinstance(answer, tuple) else (200, {}, answer)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if isinstance(payload, Iterator):
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    try:
                        for chunk in payload:
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                            self.wfile.flush()
                        self.wfile.write(b"0\r\n\r\n")
                    except OSError:
                        self.close_connection = True
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                if not isinstance(payload, bytes):
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def calls(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]


@pytest.fixture
def api() -> Iterator[Callable[[Route], FakeApi]]:
    started: list[FakeApi] = []

    def start(route: Route) -> FakeApi:
        started.append(FakeApi(route).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


def fast_client(server: FakeApi, **options: Any) -> Client:
    """A client with tiny backoffs, so a test of five retries takes milliseconds."""
    client = Client(server.url, "test-key", poll_interval=0.01, max_poll_interval=0.05, **options)
    client.transport.backoff = 0.001
    return client


def job(job_id: str, status: str = "queued", **extra: Any) -> dict[str, Any]:
    return {"job_id": job_id, "task": "upscale", "status": status, "progress": 0, "result": None, **extra}


def error(status: int, code: str, message: str = "no", details: Any = None, **headers: str) -> Any:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return status, {k.replace("_", "-"): v for k, v in headers.items()}, {"error": body}


def hex_id(n: int) -> str:
    return f"{n:032x}"


# -- lightness ------------------------------------------------------------------------------------------

SERVER_SIDE = ["flask", "werkzeug", "flask_smorest", "marshmallow", "sqlalchemy", "alembic", "psycopg2"]
SERVER_SIDE += ["celery", "kombu", "torch"]
HEAVY = [*SERVER_SIDE, "numpy", "PIL", "diffusers", "transformers", "cv2", "onnxruntime"]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_the_client_imports_no_web_framework_engine_or_server_package() -> None:
    result = run_python(
        "import sys; import aiorch, aiorch.client, aiorch.batch, aiorch.inputs, aiorch.watch; "
        f"heavy = set({HEAVY!r}) | {{'app', 'tasks', 'models', 'inference', 'config'}}; "
        "loaded = {m.split('.')[0] for m in sys.modules}; print(sorted(heavy & loaded))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_client_commands_import_no_web_framework_engine_or_server_stack() -> None:
    result = run_python(
        "import sys; import app.cli, app.cli_client; "
        f"heavy = set({HEAVY!r}) | {{'tasks', 'models', 'inference'}}; "
        "loaded = {m.split('.')[0] for m in sys.modules}; print(sorted(heavy & loaded))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_cli_works_where_only_requests_click_and_rich_are_installed(api: Any) -> None:
    # None in sys.modules makes an import of that name fail, as where it is not installed.
    server = api(lambda seen: {"jobs": [job(hex_id(1), "succeeded")], "have_next": False})
    result = run_python(
        f"import sys; sys.modules.update(dict.fromkeys({HEAVY!r})); from app.cli import main; "
        f"main(['jobs', 'list', '--json', '--url', {server.url!r}, '--key', 'k'])"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["job_id"] == hex_id(1)
    assert server.seen[0].headers["X-API-Key"] == "k"


def test_url_and_key_come_from_the_environment_when_not_given(api: Any) -> None:
    server = api(lambda seen: job(hex_id(7)))
    env_code = (
        "import os; os.environ['AIORCH_URL'] = {url!r}; os.environ['AIORCH_API_KEY'] = 'env-key'; "
        "from aiorch import Client; print(Client().get({id!r})['job_id'])"
    )
    result = run_python(env_code.format(url=server.url, id=hex_id(7)))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == hex_id(7)
    assert server.seen[0].headers["X-API-Key"] == "env-key"


# -- retries ----------------------------------------------------------------------------------------------


def test_a_429_is_retried_after_the_seconds_retry_after_says(api: Any) -> None:
    answers = iter([error(429, "rate_limited", Retry_After="1"), (202, {}, job(hex_id(1)))])
    server = api(lambda seen: next(answers))
    client = fast_client(server)
    started = time.monotonic()
    assert client.submit("upscale", {"image_url": "https://x/a.png"})["job_id"] == hex_id(1)
    # The backoff alone would have waited a millisecond: the wait is the server's second.
    assert time.monotonic() - started >= 0.95
    posts = server.calls("/v1/jobs")
    assert len(posts) == 2
    # Both attempts carry one idempotency key, so the retry cannot make a second job.
    assert posts[0].headers["Idempotency-Key"] == posts[1].headers["Idempotency-Key"]


def test_retry_after_as_an_http_date_is_honoured() -> None:
    later = datetime.now(UTC) + timedelta(seconds=30)
    assert 28 <= (retry_after_seconds(format_datetime(later, usegmt=True)) or 0) <= 31
    assert retry_after_seconds("7") == 7
    assert retry_after_seconds("soon") is None
    assert retry_after_seconds(None) is None


def test_a_retry_after_beyond_the_bound_is_raised_not_slept(api: Any) -> None:
    server = api(lambda seen: error(429, "too_many_queued_jobs", "12 queued", Retry_After="3600"))
    client = fast_client(server, max_retry_wait=10)
    started = time.monotonic()
    with pytest.raises(RateLimited) as caught:
        client.submit("upscale", {})
    assert time.monotonic() - started < 2
    assert (caught.value.status, caught.value.code, caught.value.message) == (
        429,
        "too_many_queued_jobs",
        "12 queued",
    )
    assert caught.value.headers["Retry-After"] == "3600"
    assert len(server.seen) == 1


def test_503_is_retried_a_bounded_number_of_times(api: Any) -> None:
    server = api(lambda seen: error(503, "database_unavailable", "down"))
    client = fast_client(server, retries=3)
    with pytest.raises(ServiceUnavailable) as caught:
        client.get(hex_id(1))
    assert caught.value.code == "database_unavailable"
    assert isinstance(caught.value, ServerError)
    assert len(server.seen) == 4  # the first try and three retries


def test_a_dropped_connection_is_retried_with_the_same_idempotency_key(api: Any) -> None:
    answers = iter([RESET, RESET, (202, {}, job(hex_id(2)))])
    server = api(lambda seen: next(answers))
    assert fast_client(server).submit("upscale", {})["job_id"] == hex_id(2)
    keys = {s.headers["Idempotency-Key"] for s in server.calls("/v1/jobs")}
    assert len(server.calls("/v1/jobs")) == 3 and len(keys) == 1


def test_an_unreachable_server_is_a_transport_error_after_the_retries() -> None:
    client = Client("http://127.0.0.1:9", "k", retries=2)  # the discard port: nothing listens
    client.transport.backoff = 0.001
    with pytest.raises(TransportError):
        client.get(hex_id(1))
    assert client.transport.retried == 2


def test_a_422_is_not_retried(api: Any) -> None:
    server = api(lambda seen: error(422, "invalid_payload", "bad", {"payload": {"scale": ["too big"]}}))
    with pytest.raises(ValidationFailed):
        fast_client(server).submit("upscale", {"scale": 9})
    assert len(server.seen) == 1


# -- typed errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "cls"), [(404, NotFound), (409, Conflict), (422, ValidationFailed), (500, ServerError)]
)
def test_each_error_answer_raises_its_class_with_code_message_and_details(
    api: Any, status: int, cls: type[ApiError]
) -> None:
    server = api(lambda seen: error(status, "some_code", "Some sentence.", {"field": ["why"]}))
    with pytest.raises(cls) as caught:
        fast_client(server, retries=0).get(hex_id(1))
    assert (caught.value.status, caught.value.code) == (status, "some_code")
    assert caught.value.message == "Some sentence."
    assert caught.value.details == {"field": ["why"]}


def test_an_error_page_that_is_no_json_still_raises_a_typed_error(api: Any) -> None:
    server = api(lambda seen: (502, {"Content-Type": "text/html"}, b"<html>bad gateway</html>"))
    with pytest.raises(ServerError) as caught:
        fast_client(server, retries=0).get(hex_id(1))
    assert (caught.value.status, caught.value.code) == (502, "http_502")


# -- waiting: streams and polling --------------------------------------------------------------------


def test_the_event_parser_reads_events_across_chunks_and_skips_comments() -> None:
    raw = [b": keep-alive\n\nid: 1\nevent: jo", b'b\ndata: {"a":\r\ndata: 1}\r\n\r\n', b"id: 2\ndata: x\n\n"]
    events = list(parse_events(raw))
    assert [(e.id, e.event, e.data) for e in events] == [("1", "job", '{"a":\n1}'), ("2", "message", "x")]


def stream_of(*jobs: dict[str, Any]) -> Iterator[bytes]:
    yield b": keep-alive\n\n"
    for n, body in enumerate(jobs, start=1):
        time.sleep(0.02)
        yield f"id: {n}\nevent: job\ndata: {json.dumps(body)}\n\n".encode()


def test_wait_follows_the_event_stream_when_the_server_has_one(api: Any) -> None:
    one = hex_id(1)

    def route(seen: Seen) -> Any:
        if seen.path == "/v1/events":
            assert seen.query["ids"] == [one]
            return (
                200,
                {"Content-Type": "text/event-stream"},
                stream_of(job(one), job(one, "running", progress=50), job(one, "succeeded", progress=100)),
            )
        return error(500, "unexpected", seen.path)

    server = api(route)
    client = fast_client(server)
    changes = list(client.watch(one))
    assert [c["status"] for c in changes] == ["queued", "running", "succeeded"]
    assert client.events.supported is True
    assert client.wait(one)["status"] == "succeeded"
    assert not server.calls("/v1/jobs")  # no polling at all


def test_without_event_streams_wait_polls_fifty_ids_a_request_and_remembers(api: Any) -> None:
    ids = [hex_id(n) for n in range(1, 121)]
    polls = {i: 0 for i in ids}

    def route(seen: Seen) -> Any:
        if seen.path == "/v1/events":
            return error(404, "not_found", "Not found.")
        asked = seen.query["ids"][0].split(",")
        assert len(asked) <= 50 and seen.query["limit"] == ["50"]
        for i in asked:
            polls[i] += 1
        return {
            "jobs": [job(i, "succeeded" if polls[i] >= 2 else "running") for i in asked],
            "have_next": False,
        }

    server = api(route)
    client = fast_client(server)
    final = client.wait(ids, timeout=20)
    assert [j["job_id"] for j in final] == ids and {j["status"] for j in final} == {"succeeded"}
    assert client.events.supported is False
    client.wait(ids[0], timeout=20)
    assert len(server.calls("/v1/events")) == 1  # tried once, then remembered


def test_wait_raises_wait_timeout_with_the_latest_objects(api: Any) -> None:
    def route(seen: Seen) -> Any:
        if seen.path == "/v1/events":
            return error(404, "not_found")
        return {"jobs": [job(hex_id(1), "running", progress=10)], "have_next": False}

    with pytest.raises(WaitTimeout) as caught:
        fast_client(api(route)).wait(hex_id(1), timeout=0.5)
    assert caught.value.jobs[0]["status"] == "running"


def test_waiting_for_a_job_that_does_not_exist_is_not_found(api: Any) -> None:
    def route(seen: Seen) -> Any:
        return error(404, "not_found") if seen.path == "/v1/events" else {"jobs": [], "have_next": False}

    with pytest.raises(NotFound):
        fast_client(api(route)).wait(hex_id(9), timeout=5)


def test_run_raises_job_failed_with_the_final_job(api: Any) -> None:
    failed = job(hex_id(3), "failed", error={"code": "input_unreachable", "message": "404 from the host"})

    def route(seen: Seen) -> Any:
        if seen.path == "/v1/jobs" and seen.method == "POST":
            return 202, {}, job(hex_id(3))
        if seen.path == "/v1/events":
            return 200, {"Content-Type": "text/event-stream"}, stream_of(failed)
        return error(500, "unexpected")

    with pytest.raises(JobFailed, match="404 from the host") as caught:
        fast_client(api(route)).run("upscale", {"image_url": "https://x/a.png"})
    assert caught.value.job["status"] == "failed"


def test_submit_and_follow_reads_the_new_jobs_stream_from_its_submit(api: Any) -> None:
    """``POST /v1/jobs`` with ``Accept: text/event-stream``: the stream is the submit's answer, so
    nothing else is asked; ``run`` without a timeout goes the same way."""
    one = hex_id(1)
    steps = [job(one), job(one, "running", progress=50), job(one, "succeeded", progress=100)]

    def route(seen: Seen) -> Any:
        if seen.path == "/v1/jobs" and seen.method == "POST":
            assert seen.headers["Accept"] == "text/event-stream"
            return 200, {"Content-Type": "text/event-stream"}, stream_of(*steps)
        return error(500, "unexpected")

    server = api(route)
    client = fast_client(server)
    assert list(client.submit_and_follow("upscale", {"scale": 2})) == steps
    assert client.run("upscale", {"scale": 2})["status"] == "succeeded"
    posts = server.calls("/v1/jobs")
    assert [s.path for s in server.seen] == ["/v1/jobs", "/v1/jobs"]
    assert posts[0].json() == {"task": "upscale", "payload": {"scale": 2}}
    assert len({s.headers["Idempotency-Key"] for s in posts}) == 2


def test_submit_and_follow_goes_on_with_watch_after_a_json_answer_or_a_broken_stream(api: Any) -> None:
    one, two = hex_id(1), hex_id(2)
    final = {one: job(one, "succeeded"), two: job(two, "failed", error={"code": "x", "message": "y"})}

    def route(seen: Seen) -> Any:
        if seen.path == "/v1/jobs" and seen.method == "POST":
            if seen.json()["payload"]["n"] == 1:
                return 202, {}, job(one)  # a server without such streams
            return 200, {"Content-Type": "text/event-stream"}, stream_of(job(two), job(two, "running"))
        if seen.path == "/v1/events":
            return 200, {"Content-Type": "text/event-stream"}, stream_of(final[seen.query["ids"][0]])
        return error(500, "unexpected")

    server = api(route)
    client = fast_client(server)
    assert [c["status"] for c in client.submit_and_follow("upscale", {"n": 1})] == ["queued", "succeeded"]
    # The stream ended before its job did: the rest comes from a stream of its own, once.
    followed = [c["status"] for c in client.submit_and_follow("upscale", {"n": 2})]
    assert followed == ["queued", "running", "failed"]
    assert len(server.calls("/v1/jobs")) == 2 and len(server.calls("/v1/events")) == 2


# -- bulk, paging, cancel ---------------------------------------------------------------------------


def test_submit_many_sends_a_thousand_a_request_into_one_batch(api: Any) -> None:
    def route(seen: Seen) -> Any:
        body = seen.json()
        batch = body.get("batch_id", "b" * 32)
        return {
            "batch_id": batch,
            "jobs": [job(hex_id(n), batch_id=batch) for n, _ in enumerate(body["jobs"])],
        }

    server = api(route)
    answer = fast_client(server).submit_many({"task": "upscale", "payload": {"n": n}} for n in range(2500))
    sent = [s.json() for s in server.calls("/v1/jobs/batch")]
    assert [len(b["jobs"]) for b in sent] == [1000, 1000, 500]
    assert "batch_id" not in sent[0] and sent[1]["batch_id"] == sent[2]["batch_id"] == "b" * 32
    keys = [item["idempotency_key"] for b in sent for item in b["jobs"]]
    assert len(set(keys)) == 2500  # each item its own key, so a retried request reuses its jobs
    assert len(answer["jobs"]) == 2500 and answer["batch_id"] == "b" * 32


def test_list_pages_through_jobs_created_in_the_same_microsecond(api: Any) -> None:
    # 250 jobs, created in bursts of 40 sharing one instant (a bulk insert), served newest first
    # with an exclusive `before`, as the API does.
    base = datetime(2025, 1, 1, tzinfo=UTC)
    rows = sorted(((base + timedelta(microseconds=n // 40)).isoformat(), hex_id(n)) for n in range(250))[::-1]

    def route(seen: Seen) -> Any:
        limit = int(seen.query["limit"][0])
        before = seen.query.get("before", [None])[0]
        page = [
            r for r in rows if before is None or datetime.fromisoformat(r[0]) < datetime.fromisoformat(before)
        ]
        jobs = [job(i, created_at=t) for t, i in page[:limit]]
        return {"jobs": jobs, "have_next": len(page) > limit}

    listed = [j["job_id"] for j in fast_client(api(route)).list(page_size=30)]
    assert sorted(listed) == sorted(i for _, i in rows)
    assert len(listed) == 250  # none twice


def test_cancel_many_by_batch_and_by_ids(api: Any) -> None:
    server = api(lambda seen: {"cancelled": len(seen.json().get("ids", [1, 1, 1])), "already_final": 1})
    client = fast_client(server)
    assert client.cancel_many(batch_id="b1") == {"cancelled": 3, "already_final": 1}
    assert client.cancel_many([hex_id(1), hex_id(2)]) == {"cancelled": 2, "already_final": 1}
    assert [s.json() for s in server.calls("/v1/jobs/cancel")] == [
        {"batch_id": "b1"},
        {"ids": [hex_id(1), hex_id(2)]},
    ]


# -- files ---------------------------------------------------------------------------------------------


def test_upload_sends_file_parts_and_download_saves_whole_files(api: Any, tmp_path: Path) -> None:
    other = api(lambda seen: (200, {}, b"second-output"))

    def route(seen: Seen) -> Any:
        if seen.path == "/v1/assets":
            assert seen.headers["Content-Type"].startswith("multipart/form-data")
            count = seen.body.count(b'name="file"')
            return 201, {}, {"assets": [{"asset_id": f"a{n}"} for n in range(count)]}
        return 200, {}, b"first-output"

    server = api(route)
    images = []
    for n in range(3):
        images.append(tmp_path / f"in{n}.png")
        images[-1].write_bytes(b"\x89PNG fake %d" % n)
    client = fast_client(server)
    assert [a["asset_id"] for a in client.upload_many(images)] == ["a0", "a1", "a2"]
    assert client.upload(images[0])["asset_id"] == "a0"
    done = job(
        hex_id(4),
        "succeeded",
        result={
            "url": f"{server.url}/files/x.png",
            "files": [
                {"url": f"{server.url}/files/x.png", "filename": "x.png"},
                {"url": f"{other.url}/files/y.webp", "filename": "y.webp"},
            ],
        },
    )
    saved = client.download(done, tmp_path / "out", stem="000004")
    assert [p.name for p in saved] == ["000004-1.png", "000004-2.webp"]
    assert saved[0].read_bytes() == b"first-output" and saved[1].read_bytes() == b"second-output"
    assert not list((tmp_path / "out").glob("*.part"))
    # The key goes to its server only, never to another host named in a result.
    assert server.seen[-1].headers.get("X-API-Key") == "test-key"
    assert "X-API-Key" not in other.seen[0].headers
    with pytest.raises(JobFailed):
        client.download(job(hex_id(5), "failed"), tmp_path / "out")


# -- the CLI's local logic -------------------------------------------------------------------------


def test_local_files_in_input_fields_are_found_and_replaced(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_bytes(b"a")
    (tmp_path / "m.png").write_bytes(b"m")
    payload = {
        "image_url": "a.png",
        "mask_url": f"file://{tmp_path / 'm.png'}",
        "source_urls": ["https://example.com/s.png", "a.png"],
        "controlnets": [{"type": "canny", "image_url": str(tmp_path / "a.png")}],
        "images": ["m.png"],
        "prompt": "a.png",  # no input field: left alone
    }
    inputs = LocalInputs([tmp_path], extra_fields={"images"})
    found = inputs.find(payload)
    assert [f.field for f in found] == [
        "payload.image_url",
        "payload.mask_url",
        "payload.source_urls[1]",
        "payload.controlnets[0].image_url",
        "payload.images[0]",
    ]
    assets = {tmp_path / "a.png": "A", tmp_path / "m.png": "M"}
    replaced = inputs.replace(payload, {p.resolve(): a for p, a in assets.items()})
    assert replaced == {
        "image_url": "asset://A",
        "mask_url": "asset://M",
        "source_urls": ["https://example.com/s.png", "asset://A"],
        "controlnets": [{"type": "canny", "image_url": "asset://A"}],
        "images": ["asset://M"],
        "prompt": "a.png",
    }
    with pytest.raises(LocalInputError) as caught:
        inputs.find({"target_url": "missing.png"})
    assert caught.value.field == "payload.target_url"
    assert caught.value.as_error()["details"] == {"payload": {"target_url": ["no such file"]}}
    with pytest.raises(LocalInputError) as caught:
        inputs.find({"source_urls": ["a.png", "gone.png"]})
    assert caught.value.as_error()["details"] == {"payload": {"source_urls": {"1": ["no such file"]}}}


def test_a_jobs_file_keeps_bad_lines_with_their_error_and_skips_blank_ones(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_text('{"task": "upscale", "payload": {}}\n\n# a comment\n{not json\n[1]\n{"payload": {}}\n')
    lines = read_lines(path)
    assert [(line.number, line.error["code"] if line.error else None) for line in lines] == [
        (1, None),
        (4, "invalid_json"),
        (5, "invalid_line"),
        (6, "invalid_line"),
    ]
    assert INVALID == "invalid"


def test_a_line_keeps_its_identity_and_key_when_lines_move_and_repeats_get_their_own(tmp_path: Path) -> None:
    path = tmp_path / "jobs.jsonl"
    job_line = '{"task": "upscale", "payload": {"image_url": "a.png"}}\n'
    path.write_text(job_line * 2)
    before = read_lines(path)
    path.write_text('{"task": "upscale", "payload": {"image_url": "new.png"}}\n' + job_line * 3)
    after = read_lines(path)
    assert [line.number for line in after[1:]] == [2, 3, 4]
    assert [line.ident for line in after[1:3]] == [line.ident for line in before]
    assert len({line.ident for line in after}) == 4  # a repeat is a line of its own
    file_id = "f" * 64
    assert idempotency_key(file_id, after[1]) == idempotency_key(file_id, before[0])
    assert idempotency_key(file_id, after[2]) != idempotency_key(file_id, after[1])


def test_the_journal_survives_a_torn_last_record(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    journal.append(
        {"t": "run", "file": "/x.jsonl", "batch_id": "b"}, {"t": "asset", "sha256": "s", "asset_id": "a"}
    )
    journal.append({"t": "submitted", "line": 1, "ident": "d.0", "job_id": hex_id(1)})
    with open(journal.path, "a") as handle:
        handle.write('{"t": "done", "line": 1, "dig')  # killed mid-write
    state = RunState.load(tmp_path)
    assert (state.file, state.batch_id, state.assets) == ("/x.jsonl", "b", {"s": "a"})
    assert state.submitted == {"d.0": hex_id(1)} and state.done == {}


def test_the_async_client_has_every_method_of_the_client_as_a_coroutine_or_async_iterator() -> None:
    public = {name for name, _ in inspect.getmembers(Client, inspect.isfunction) if not name.startswith("_")}
    # ``close`` is ``aclose`` there; ``watcher`` hands out a threaded object that has no async form.
    for name in public - {"close", "watcher"}:
        method = getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name
        assert method.__doc__ == getattr(Client, name).__doc__, name
    assert inspect.isasyncgenfunction(AsyncClient.watch) and inspect.isasyncgenfunction(AsyncClient.list)
