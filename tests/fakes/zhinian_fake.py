"""A fake Zhinian AIGC open API following seed 003.

- Auth: ``Authorization: Bearer <key>`` or ``X-Zhinian-Api-Key: <key>``, keys mapped to client ids
  (``ZHINIAN_API_KEYS=partner-a:key-a,...``); jobs and assets are isolated per client (another
  client's job is a 404).
- ``POST /api/v1/jobs`` with ``Idempotency-Key``: same client + key + same body returns the
  existing job with ``reused: true``; same key, different body is ``409``.
- Jobs go queued -> running -> succeeded over polls; a prompt containing ``FAIL-JOB`` ends
  ``failed``, ``EXPIRE-JOB`` ends ``expired``; ``cancel(job_id)`` marks one ``cancelled``.
- ``video.generate`` jobs output a tiny real MP4 (``result.mp4``); a prompt containing
  ``NOT-VIDEO`` makes it a PNG instead, as a broken engine might, and ``MKV-VIDEO`` a Matroska file.
- Assets download through ``/api/v1/assets/<id>/download``, which redirects to a signed storage
  link that, like real object storage, refuses requests carrying API credentials.
- Finished jobs with a ``webhookUrl`` are POSTed there, signed ``X-Zhinian-Signature: sha256=<hex>``
  (HMAC-SHA256 of the raw body) when ``webhook_secret`` is set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from datetime import UTC, datetime
from typing import Any

import requests
from flask import Response, jsonify, redirect, request

from tests.fakes.common import FakeClock, FakeProvider, image_bytes, slow, video_bytes

CAPABILITIES = ("image.generate", "image.inpaint", "image.upscale", "video.generate")
STATUSES = ("queued", "running", "succeeded", "failed", "expired", "cancelled")


def sign_webhook(secret: str, raw_body: bytes) -> str:
    """The fake's own signer for webhook bodies (kept apart from the client's verifier)."""
    return "sha256=" + hmac.new(secret.encode(), raw_body, hashlib.sha256).hexdigest()


class ZhinianFake(FakeProvider):
    def __init__(
        self,
        *,
        api_keys: dict[str, str] | None = None,
        webhook_secret: str | None = None,
        clock: FakeClock | None = None,
    ):
        super().__init__(clock=clock)
        # client id -> key, as in ZHINIAN_API_KEYS.
        self.api_keys = api_keys or {"partner-a": "key-a", "partner-b": "key-b"}
        self.webhook_secret = webhook_secret
        self.jobs: dict[str, dict[str, Any]] = {}
        self.assets: dict[str, dict[str, Any]] = {}
        self.idempotency: dict[tuple[str, str], tuple[str, str]] = {}
        self.storage_tokens: dict[str, str] = {}
        self.storage_requests: list[dict[str, str]] = []
        self.webhooks_sent: list[dict[str, Any]] = []
        self._routes()

    def reset(self) -> None:
        super().reset()
        with self.lock:
            for store in (self.jobs, self.assets, self.idempotency, self.storage_tokens):
                store.clear()
            self.storage_requests.clear()
            self.webhooks_sent.clear()

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def error(message: str, status: int, headers: dict | None = None) -> Response:
        response = jsonify({"error": message})
        response.status_code = status
        response.headers.update(headers or {})
        return response

    def _client_id(self) -> str | None:
        header = request.headers.get("Authorization", "")
        key = (
            header[len("Bearer ") :]
            if header.startswith("Bearer ")
            else request.headers.get("X-Zhinian-Api-Key")
        )
        for client_id, known in self.api_keys.items():
            if key and hmac.compare_digest(known, key):
                return client_id
        return None

    def _gate(self, endpoint: str) -> tuple[str | None, Response | None]:
        self.requests.append({"method": request.method, "path": request.path, "endpoint": endpoint})
        client_id = self._client_id()
        if client_id is None:
            return None, self.error("Invalid API key.", 401)
        fault = self.faults.take(endpoint)
        slow(fault)
        if fault is None or fault.kind == "slow":
            return client_id, None
        if fault.kind == "rate_limit":
            return client_id, self.error("Too many requests.", 429, {"Retry-After": "3"})
        if fault.kind == "server_error":
            return client_id, self.error("Internal server error.", 500)
        if fault.kind == "malformed":
            return client_id, Response("{", status=200, content_type="application/json")
        raise AssertionError(f"unknown fault {fault.kind}")

    def _public(self, job: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in job.items() if not k.startswith("_")}

    def _finish(self, job: dict[str, Any], status: str) -> None:
        job["status"] = status
        job["updatedAt"] = _iso(self.clock())
        if status == "succeeded":
            asset_id = f"asset_{secrets.token_hex(6)}"
            video = job["capability"] == "video.generate"
            prompt = str(job["_body"].get("prompt") or "")
            if video and "MKV-VIDEO" in prompt:
                kind, name, mime = "video", "result.mkv", "video/x-matroska"
                data = video_bytes(container_format="matroska")
            elif video and "NOT-VIDEO" not in prompt:
                kind, name, data, mime = "video", "result.mp4", video_bytes(), "video/mp4"
            else:
                kind, name, mime = "image", "result.png", "image/png"
                data = image_bytes(fmt="PNG", size=(72, 40))
            self.assets[asset_id] = {
                "id": asset_id,
                "clientId": job["_client"],
                "kind": kind,
                "name": name,
                "_bytes": data,
                "_type": mime,
            }
            job["outputAssetIds"] = [asset_id]
        elif status == "failed":
            job["error"] = "Generation failed."
        if job.get("webhookUrl"):
            self._deliver(job)

    def _deliver(self, job: dict[str, Any]) -> None:
        event = {"succeeded": "generation.succeeded", "failed": "generation.failed"}.get(
            job["status"], f"generation.{job['status']}"
        )
        raw = json.dumps({"event": event, "job": self._public(job)}, ensure_ascii=False).encode()
        headers = {"Content-Type": "application/json"}
        if self.webhook_secret:
            headers["X-Zhinian-Signature"] = sign_webhook(self.webhook_secret, raw)
        self.webhooks_sent.append({"url": job["webhookUrl"], "body": raw, "headers": headers})
        requests.post(job["webhookUrl"], data=raw, headers=headers, timeout=5)

    def advance(self, job: dict[str, Any]) -> None:
        if job["status"] not in ("queued", "running"):
            return
        job["_polls"] += 1
        if job["_polls"] < self.polls_to_finish:
            job["status"] = "queued" if job["_polls"] == 1 else "running"
            return
        if job["_polls"] == self.polls_to_finish:
            job["status"] = "running"
            return
        prompt = str(job["_body"].get("prompt") or "")
        self._finish(
            job, "failed" if "FAIL-JOB" in prompt else "expired" if "EXPIRE-JOB" in prompt else "succeeded"
        )

    def cancel(self, job_id: str) -> None:
        with self.lock:
            self._finish(self.jobs[job_id], "cancelled")

    # -- validation -------------------------------------------------------------------------

    @staticmethod
    def _invalid(body: Any) -> str | None:
        if not isinstance(body, dict):
            return "Request body must be a JSON object."
        capability = body.get("capability")
        if capability not in CAPABILITIES:
            return "Unsupported capability."
        if capability in ("image.generate", "image.inpaint", "video.generate") and not body.get("prompt"):
            return "prompt is required."
        if capability == "image.inpaint" and len(body.get("imageUrls") or []) != 2:
            return "image.inpaint needs the original and the mask in imageUrls."
        if capability == "image.upscale" and not body.get("imageUrls"):
            return "imageUrls is required."
        settings = body.get("settings") or {}
        if capability == "video.generate" and "duration" in settings and not 4 <= settings["duration"] <= 15:
            return "duration must be 4 to 15."
        return None

    # -- routes -----------------------------------------------------------------------------

    def _routes(self) -> None:
        app = self.app

        @app.post("/api/v1/jobs")
        def create():
            client_id, denied = self._gate("submit")
            if denied is not None:
                return denied
            body = request.get_json(silent=True)
            problem = self._invalid(body)
            if problem:
                return self.error(problem, 400)
            key = request.headers.get("Idempotency-Key")
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            with self.lock:
                if key and (client_id, key) in self.idempotency:
                    known_digest, job_id = self.idempotency[(client_id, key)]
                    if known_digest != digest:
                        return self.error("Idempotency-Key was used with a different request body.", 409)
                    return jsonify({"job": self._public(self.jobs[job_id]), "reused": True})
                job_id = f"job_{secrets.token_hex(8)}"
                now = _iso(self.clock())
                self.jobs[job_id] = {
                    "id": job_id,
                    "capability": body["capability"],
                    "status": "queued",
                    "outputAssetIds": [],
                    "createdAt": now,
                    "updatedAt": now,
                    "webhookUrl": body.get("webhookUrl"),
                    "_client": client_id,
                    "_body": body,
                    "_polls": 0,
                }
                if key:
                    self.idempotency[(client_id, key)] = (digest, job_id)
                response = jsonify({"job": self._public(self.jobs[job_id]), "reused": False})
                response.status_code = 201
                return response

        @app.get("/api/v1/jobs/<job_id>")
        def get_job(job_id: str):
            client_id, denied = self._gate("poll")
            if denied is not None:
                return denied
            with self.lock:
                job = self.jobs.get(job_id)
                if job is None or job["_client"] != client_id:
                    return self.error("Job not found.", 404)
                self.advance(job)
                return jsonify({"job": self._public(job)})

        @app.get("/api/v1/jobs")
        def list_jobs():
            client_id, denied = self._gate("list")
            if denied is not None:
                return denied
            status, capability = request.args.get("status"), request.args.get("capability")
            if status and status not in STATUSES or capability and capability not in CAPABILITIES:
                return self.error("Invalid filter.", 400)
            limit = request.args.get("limit", "20")
            if not limit.isdigit() or not 1 <= int(limit) <= 200:
                return self.error("limit must be 1 to 200.", 400)
            jobs = [
                self._public(j)
                for j in sorted(self.jobs.values(), key=lambda j: j["createdAt"], reverse=True)
                if j["_client"] == client_id
                and (not status or j["status"] == status)
                and (not capability or j["capability"] == capability)
            ]
            return jsonify({"jobs": jobs[: int(limit)]})

        @app.get("/api/v1/capabilities")
        def capabilities():
            _, denied = self._gate("capabilities")
            if denied is not None:
                return denied
            return jsonify({"capabilities": [{"capability": c} for c in CAPABILITIES]})

        @app.get("/api/v1/assets/<asset_id>")
        def asset(asset_id: str):
            client_id, denied = self._gate("asset")
            if denied is not None:
                return denied
            found = self.assets.get(asset_id)
            if found is None or found["clientId"] != client_id:
                return self.error("Asset not found.", 404)
            return jsonify({"asset": {k: v for k, v in found.items() if not k.startswith("_")}})

        @app.get("/api/v1/assets/<asset_id>/download")
        def download(asset_id: str):
            client_id, denied = self._gate("download")
            if denied is not None:
                return denied
            found = self.assets.get(asset_id)
            if found is None or found["clientId"] != client_id:
                return self.error("Asset not found.", 404)
            token = secrets.token_urlsafe(16)
            self.storage_tokens[token] = asset_id
            ext = found["name"].rsplit(".", 1)[-1]
            return redirect(f"/storage/{asset_id}.{ext}?token={token}", code=302)

        @app.get("/storage/<name>")
        def storage(name: str):
            self.storage_requests.append(dict(request.headers))
            # A signed storage link allows one auth mechanism: its token. Extra credentials are
            # refused, as object stores do, which also proves the client did not leak its key.
            if "Authorization" in request.headers or "X-Zhinian-Api-Key" in request.headers:
                return Response("only one auth mechanism allowed", status=400)
            asset_id = self.storage_tokens.get(request.args.get("token", ""))
            found = self.assets.get(asset_id or "")
            if found is None or name != f"{asset_id}.{found['name'].rsplit('.', 1)[-1]}":
                return Response("forbidden", status=403)
            return Response(found["_bytes"], content_type=found["_type"])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat()
