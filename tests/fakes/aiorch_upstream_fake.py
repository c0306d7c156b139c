"""A fake upstream aiorch / AHV instance following seed 000 and the public contract (ARCHITECTURE.md).

- ``X-API-Key`` (or ``Authorization: Bearer``) on every ``/v1/*``; errors are
  ``{"error": {"code", "message", "details"}}`` with 401/404/409/422/429/503 as the contract says.
- ``POST /v1/jobs`` -> 202 job object; ``Idempotency-Key``: same body -> 200 with ``reused: true``,
  different body -> 409.
- ``GET /v1/jobs/<id>`` and ``GET /v1/jobs?ids=a,b`` (at most 50) advance jobs queued -> running ->
  succeeded; a payload prompt containing ``NSFW`` ends ``rejected``; ``face_detect`` answers JSON;
  ``ahv_video`` outputs a tiny real MP4 (a PNG when the prompt contains ``NOT-VIDEO``).
- ``POST /v1/jobs/<id>/cancel``: queued/running -> cancelled, finished -> 409.
- Outputs are served at ``/files/<32 hex>.<ext>`` without a key, as in seed 000.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import UTC, datetime
from typing import Any

from flask import Response, jsonify, request

from tests.fakes.common import VIDEO_FRAMES, FakeClock, FakeProvider, image_bytes, slow, video_bytes

TASKS = {
    "faceswap",
    "faceswap_multi",
    "face_detect",
    "upscale",
    "generate",
    "inpaint",
    "remove_object",
    "outpaint",
    "remove_background",
    "gg_image",
    "cx_image",
    "ahv_image",
    "ahv_video",
}
BATCH_LIMIT = 50


class UpstreamFake(FakeProvider):
    def __init__(self, *, api_keys: dict[str, str] | None = None, clock: FakeClock | None = None):
        super().__init__(clock=clock)
        self.api_keys = api_keys or {"key-a": "client-a", "key-b": "client-b"}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        self.batch_sizes: list[int] = []
        self._routes()

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.jobs.clear()
            self.idempotency.clear()
            self.batch_sizes.clear()

    @staticmethod
    def error(status: int, code: str, message: str, details: Any = None, retry_after: int | None = None):
        response = jsonify({"error": {"code": code, "message": message, "details": details}})
        response.status_code = status
        if retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        return response

    def _gate(self, endpoint: str) -> tuple[str | None, Response | None]:
        self.requests.append({"method": request.method, "path": request.path, "endpoint": endpoint})
        key = request.headers.get("X-API-Key")
        if key is None and request.headers.get("Authorization", "").startswith("Bearer "):
            key = request.headers["Authorization"][len("Bearer ") :]
        client = self.api_keys.get(key or "")
        if client is None:
            return None, self.error(401, "unauthorized", "A valid X-API-Key is required.")
        fault = self.faults.take(endpoint)
        slow(fault)
        if fault is None or fault.kind == "slow":
            return client, None
        if fault.kind == "rate_limit":
            return client, self.error(429, "rate_limited", "Too many requests.", retry_after=11)
        if fault.kind == "server_error":
            return client, self.error(503, "unavailable", "The database is unreachable.", retry_after=4)
        if fault.kind == "malformed":
            return client, Response("{", status=200, content_type="application/json")
        raise AssertionError(f"unknown fault {fault.kind}")

    def _public(self, job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if not k.startswith("_")}

    def _advance(self, job: dict[str, Any]) -> None:
        if job["status"] not in ("queued", "running"):
            return
        job["_polls"] += 1
        now = self.clock()
        if job["_polls"] <= self.polls_to_finish:
            if job["_polls"] == self.polls_to_finish:
                job.update(status="running", progress=50, started_at=_iso(now), started_at_ms=int(now * 1000))
            return
        job.update(finished_at=_iso(now), finished_at_ms=int(now * 1000), progress=100)
        payload = job["_payload"]
        if "NSFW" in str(payload.get("prompt") or ""):
            job.update(
                status="rejected", ok=False, error={"code": "content_rejected", "message": "NSFW blocked"}
            )
            return
        if job["task"] == "face_detect":
            job.update(
                status="succeeded",
                ok=True,
                result={"ok": True, "status": "succeeded", "faces": [{"index": 0, "box": [1, 2, 30, 40]}]},
            )
            return
        meta: dict[str, Any] = {"width": 50, "height": 30, "backend": "UPVN1-1"}
        if job["task"] == "ahv_video" and "NOT-VIDEO" not in str(payload.get("prompt") or ""):
            name = f"{secrets.token_hex(16)}.mp4"
            self.files[name] = (video_bytes(size=(64, 48)), "video/mp4")
            meta = {"width": 64, "height": 48, "frames": VIDEO_FRAMES, "backend": "veo-3.1"}
        else:
            name = f"{secrets.token_hex(16)}.png"
            self.files[name] = (image_bytes(fmt="PNG", size=(50, 30)), "image/png")
        job.update(
            status="succeeded",
            ok=True,
            result={
                "ok": True,
                "status": "succeeded",
                "url": f"{request.host_url}files/{name}",
                "filename": name,
                "meta": meta,
            },
        )

    def _routes(self) -> None:
        app = self.app

        @app.post("/v1/jobs")
        def create():
            client, denied = self._gate("submit")
            if denied is not None:
                return denied
            body = request.get_json(silent=True)
            if not isinstance(body, dict) or not isinstance(body.get("payload"), dict):
                return self.error(
                    422, "invalid_body", "task and payload are required.", {"payload": "required"}
                )
            if body.get("task") not in TASKS:
                return self.error(422, "unknown_task", "Unknown task.", {"task": body.get("task")})
            key = request.headers.get("Idempotency-Key")
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            with self.lock:
                if key and (client, key) in self.idempotency:
                    known, job_id = self.idempotency[(client, key)]
                    if known != digest:
                        return self.error(409, "idempotency_conflict", "Same key, different body.")
                    return jsonify({**self._public(self.jobs[job_id]), "reused": True})
                now = self.clock()
                job_id = secrets.token_hex(16)
                self.jobs[job_id] = {
                    "job_id": job_id,
                    "task": body["task"],
                    "status": "queued",
                    "progress": 0,
                    "ok": None,
                    "created_at": _iso(now),
                    "created_at_ms": int(now * 1000),
                    "queued_at": _iso(now),
                    "queued_at_ms": int(now * 1000),
                    "started_at": None,
                    "started_at_ms": None,
                    "finished_at": None,
                    "finished_at_ms": None,
                    "duration": None,
                    "predict_time": 3,
                    "result": None,
                    "error": None,
                    "attempts": 0,
                    "metadata": body.get("metadata") or {},
                    "webhook_url": body.get("webhook_url"),
                    "_client": client,
                    "_payload": body["payload"],
                    "_polls": 0,
                }
                if key:
                    self.idempotency[(client, key)] = (digest, job_id)
                response = jsonify(self._public(self.jobs[job_id]))
                response.status_code = 202
                return response

        @app.get("/v1/jobs/<job_id>")
        def get_job(job_id: str):
            client, denied = self._gate("poll")
            if denied is not None:
                return denied
            with self.lock:
                job = self.jobs.get(job_id)
                if job is None or job["_client"] != client:
                    return self.error(404, "not_found", "No such job.")
                self._advance(job)
                return jsonify(self._public(job))

        @app.get("/v1/jobs")
        def list_jobs():
            client, denied = self._gate("batch")
            if denied is not None:
                return denied
            ids = [i for i in (request.args.get("ids") or "").split(",") if i]
            if not ids:
                return self.error(422, "invalid_query", "This fake only serves ?ids= look-ups.")
            if len(ids) > BATCH_LIMIT:
                return self.error(422, "invalid_query", f"At most {BATCH_LIMIT} ids.", {"ids": len(ids)})
            self.batch_sizes.append(len(ids))
            with self.lock:
                jobs = [self.jobs[i] for i in ids if i in self.jobs and self.jobs[i]["_client"] == client]
                for job in jobs:
                    self._advance(job)
                return jsonify({"jobs": [self._public(j) for j in jobs], "have_next": False})

        @app.post("/v1/jobs/<job_id>/cancel")
        def cancel(job_id: str):
            client, denied = self._gate("cancel")
            if denied is not None:
                return denied
            with self.lock:
                job = self.jobs.get(job_id)
                if job is None or job["_client"] != client:
                    return self.error(404, "not_found", "No such job.")
                if job["status"] not in ("queued", "running"):
                    return self.error(409, "job_finished", f"The job is already {job['status']}.")
                job.update(status="cancelled", ok=False)
                return jsonify(self._public(job))

        @app.get("/files/<name>")
        def files(name: str):
            if name not in self.files:
                return self.error(404, "not_found", "No such file.")
            data, content_type = self.files[name]
            return Response(data, content_type=content_type)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds")
