"""A fake Volcengine visual API following seed 002, with the HMAC-SHA256 request signature checked.

The signature is verified the way the gateway does it: from the request as received (method,
path, raw query string, the headers named in SignedHeaders, the body bytes), rebuilt and signed
here with code of its own, so a client signer that gets any part wrong is refused with
``SignatureDoesNotMatch``.

Behaviour the tests steer:
- tasks answer in_queue, then generating, then done (base64 JPEGs) over polls;
- tasks older than 12 hours (by the fake's clock) answer ``not_found``;
- a positive_prompt containing ``BLOCKED`` is refused at submit with 50412 (text risk), an image
  URL containing ``risky`` with 50411, and a prompt containing ``NSFW-OUTPUT`` finishes with
  50511 (output image risk) at GetResult;
- ``faults.add("rate_limit" | "server_error" | "slow" | "malformed", on="submit"|"poll")``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import urllib.parse
from datetime import UTC, datetime
from typing import Any

from flask import Response, jsonify, request

from tests.fakes.common import FakeClock, FakeProvider, image_bytes, slow

VERSION = "2022-08-31"
LIFETIME_S = 12 * 3600
MAX_SKEW_S = 900  # the gateway's default X-Expires
_AUTH = re.compile(
    r"^HMAC-SHA256 Credential=(?P<ak>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/request, "
    r"SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<sig>[0-9a-f]{64})$"
)


def _encode(text: str) -> str:
    # RFC 3986 unreserved characters stay, everything else is %XX of its UTF-8 bytes.
    unreserved = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.~")
    return "".join(chr(b) if b in unreserved else f"%{b:02X}" for b in text.encode())


def expected_signature(
    secret: str,
    *,
    method: str,
    path: str,
    raw_query: str,
    headers: dict[str, str],
    signed: list[str],
    body: bytes,
    x_date: str,
    region: str,
    service: str,
) -> str:
    """The signature the gateway expects for a request as it arrived."""
    params = urllib.parse.parse_qsl(raw_query, keep_blank_values=True)
    query = "&".join(f"{_encode(k)}={_encode(v)}" for k, v in sorted(params, key=lambda kv: kv[0]))
    header_block = "".join(f"{name}:{' '.join(headers[name].split())}\n" for name in signed)
    canonical = (
        f"{method}\n{'/'.join(_encode(seg) for seg in (path or '/').split('/'))}\n{query}\n{header_block}\n"
        f"{';'.join(signed)}\n{hashlib.sha256(body).hexdigest()}"
    )
    scope = f"{x_date[:8]}/{region}/{service}/request"
    to_sign = f"HMAC-SHA256\n{x_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    k_date = hmac.new(secret.encode(), x_date[:8].encode(), hashlib.sha256).digest()
    k_region = hmac.new(k_date, region.encode(), hashlib.sha256).digest()
    k_service = hmac.new(k_region, service.encode(), hashlib.sha256).digest()
    k_signing = hmac.new(k_service, b"request", hashlib.sha256).digest()
    return hmac.new(k_signing, to_sign.encode(), hashlib.sha256).hexdigest()


class VolcengineFake(FakeProvider):
    def __init__(
        self,
        *,
        keys: dict[str, str] | None = None,
        req_keys: tuple[str, ...] = ("img2img_anime_accelerated_maintain_id",),
        clock: FakeClock | None = None,
    ):
        super().__init__(clock=clock)
        self.keys = keys or {"AKLTtest": "secret-test"}
        self.req_keys = set(req_keys)
        self.region, self.service = "cn-north-1", "cv"
        self.tasks: dict[str, dict[str, Any]] = {}
        self.result_bodies: list[dict[str, Any]] = []
        self._routes()

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.tasks.clear()
            self.result_bodies.clear()

    # -- answers ----------------------------------------------------------------------------

    def gateway_error(self, code: str, message: str, status: int = 401) -> Response:
        action = request.args.get("Action", "")
        body = {
            "ResponseMetadata": {
                "RequestId": "fake-req",
                "Action": action,
                "Version": VERSION,
                "Service": self.service,
                "Region": self.region,
                "Error": {"CodeN": 100010, "Code": code, "Message": message},
            }
        }
        response = jsonify(body)
        response.status_code = status
        return response

    @staticmethod
    def answer(code: int, message: str, data: Any = None, status: int = 200, headers: dict | None = None):
        response = jsonify(
            {
                "code": code,
                "data": data,
                "message": message,
                "request_id": "fake-req",
                "status": code,
                "time_elapsed": "1.0ms",
            }
        )
        response.status_code = status
        response.headers.update(headers or {})
        return response

    def _verify(self) -> Response | None:
        match = _AUTH.match(request.headers.get("Authorization", ""))
        if not match:
            return self.gateway_error("MissingAuthenticationToken", "no valid Authorization header")
        secret = self.keys.get(match["ak"])
        if secret is None:
            return self.gateway_error("InvalidAccessKey", "unknown access key")
        x_date = request.headers.get("X-Date", "")
        try:
            when = datetime.strptime(x_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
        except ValueError:
            return self.gateway_error("InvalidTimestamp", "X-Date is not YYYYMMDD'T'HHMMSS'Z'")
        if abs(when.timestamp() - self.clock()) > MAX_SKEW_S or match["date"] != x_date[:8]:
            return self.gateway_error("InvalidTimestamp", "X-Date is too far from now or off the scope")
        if (match["region"], match["service"]) != (self.region, self.service):
            return self.gateway_error("SignatureDoesNotMatch", "wrong credential scope")
        body = request.get_data(cache=True)
        if request.headers.get("X-Content-Sha256") != hashlib.sha256(body).hexdigest():
            return self.gateway_error("SignatureDoesNotMatch", "X-Content-Sha256 does not match the body")
        signed = match["signed"].split(";")
        if "host" not in signed or "x-date" not in signed or signed != sorted(signed):
            return self.gateway_error("SignatureDoesNotMatch", "host and x-date must be signed, sorted")
        headers = {name: request.headers.get(name, "") for name in signed}
        expected = expected_signature(
            secret,
            method=request.method,
            path=request.path,
            raw_query=request.query_string.decode(),
            headers=headers,
            signed=signed,
            body=body,
            x_date=x_date,
            region=match["region"],
            service=match["service"],
        )
        if not hmac.compare_digest(expected, match["sig"]):
            return self.gateway_error("SignatureDoesNotMatch", "the request signature does not match")
        return None

    def _fault(self, endpoint: str) -> Response | None:
        fault = self.faults.take(endpoint)
        slow(fault)
        if fault is None or fault.kind == "slow":
            return None
        if fault.kind == "rate_limit":
            return self.answer(50429, "Request Has Reached API Limit", status=429)
        if fault.kind == "server_error":
            return self.answer(50500, "Internal Error", status=500)
        if fault.kind == "malformed":
            return Response("<html>bad gateway", status=200, content_type="application/json")
        raise AssertionError(f"unknown fault {fault.kind}")

    # -- actions ----------------------------------------------------------------------------

    def _submit(self, body: dict[str, Any]) -> Response:
        if body.get("req_key") not in self.req_keys:
            return self.answer(50400, "Invalid req_key", status=400)
        if body.get("image_urls") and body.get("binary_data_base64"):
            return self.answer(50400, "image_urls and binary_data_base64 are exclusive", status=400)
        for side in ("width", "height"):
            if side in body and not 600 <= body[side] <= 1500:
                return self.answer(50400, f"{side} out of [600, 1500]", status=400)
        prompt = str(body.get("positive_prompt") or "")
        if "BLOCKED" in prompt:
            return self.answer(50412, "Text Risk Not Pass", status=400)
        if any("risky" in url for url in body.get("image_urls") or []):
            return self.answer(50411, "Pre Img Risk Not Pass", status=400)
        task_id = str(7392616336519610000 + self.next_id())
        with self.lock:
            self.tasks[task_id] = {
                "req_key": body["req_key"],
                "polls": 0,
                "created": self.clock(),
                "body": body,
                "risky_output": "NSFW-OUTPUT" in prompt,
            }
        return self.answer(10000, "Success", {"task_id": task_id})

    def _result(self, body: dict[str, Any]) -> Response:
        self.result_bodies.append(body)
        task = self.tasks.get(str(body.get("task_id")))
        if task is None or self.clock() - task["created"] >= LIFETIME_S:
            return self.answer(10000, "Success", {"status": "not_found"})
        if body.get("req_key") != task["req_key"]:
            return self.answer(50400, "req_key does not match the task", status=400)
        if "req_json" in body:
            try:
                json.loads(body["req_json"])
            except (TypeError, ValueError):
                return self.answer(50400, "req_json is not a JSON string", status=400)
        with self.lock:
            task["polls"] += 1
            polls = task["polls"]
        if polls == 1:
            return self.answer(10000, "Success", {"status": "in_queue"})
        if polls <= self.polls_to_finish:
            return self.answer(10000, "Success", {"status": "generating"})
        if task["risky_output"]:
            return self.answer(50511, "Post Img Risk Not Pass", status=400)
        width, height = task["body"].get("width", 96), task["body"].get("height", 64)
        images = [base64.b64encode(image_bytes(fmt="JPEG", size=(width // 10, height // 10))).decode()]
        data = {
            "algorithm_base_resp": {"status_code": 0, "status_message": "Success"},
            "binary_data_base64": images,
            "image_urls": [""],
            "request_id": "",
            "status": "done",
        }
        return self.answer(10000, "Success", data)

    def _routes(self) -> None:
        @self.app.post("/")
        def action():
            self.requests.append(
                {"action": request.args.get("Action"), "query": request.query_string.decode()}
            )
            denied = self._verify()
            if denied is not None:
                return denied
            if request.args.get("Version") != VERSION:
                return self.gateway_error("InvalidVersion", "unsupported Version", status=400)
            action_name = request.args.get("Action")
            endpoint = {"CVSync2AsyncSubmitTask": "submit", "CVSync2AsyncGetResult": "poll"}.get(action_name)
            if endpoint is None:
                return self.gateway_error("InvalidActionOrVersion", "unknown Action", status=404)
            fault = self._fault(endpoint)
            if fault is not None:
                return fault
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                return self.answer(50400, "body must be a JSON object", status=400)
            return self._submit(body) if endpoint == "submit" else self._result(body)
