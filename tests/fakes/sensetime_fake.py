"""A fake SenseTime Miaohua API following seed 001.

Auth is checked for real: the bearer JWT's HS256 signature is recomputed here with the secret key
of its ``iss`` (by hand, not with PyJWT, so the client's use of PyJWT is checked against an
independent implementation), ``exp`` is required and enforced, ``nbf`` is honoured. Failures answer
error code 16 as the seed's error table says.

Behaviour the tests steer:
- jobs answer PENDING, then RUNNING, then SUCCESS over ``polls_to_finish`` + 1 polls;
- a prompt containing ``BLOCKED`` is refused at submit with code 18 (sensitive words);
- a prompt containing ``NSFW-OUTPUT`` finishes FAILED with image error_code ``Sensitive``;
- ``faults.add("rate_limit" | "server_error" | "slow" | "malformed", on=...)``;
- ``fetch_inputs = True`` makes a submit download its image URLs, as the real service does
  ("必须是公开可访"): a URL it cannot fetch is refused with code 3, and ``fetched`` records what came.

LoRA training (section 10: ``/v1/lora/train``, ``/v1/lora/result/<id>``, ``/v1/lora/results``,
``/v1/lora/cancel``):
- a training answers PENDING for ``lora_pending_polls`` polls, then RUNNING with a
  ``training_progress`` that grows each poll for ``lora_running_polls`` polls, then SUCCESS with a
  ``lora_id``; the base model must be one of the fake's Checkpoint models (else code 5);
- a ``trigger_word`` containing ``NO-HUMAN`` with ``main_object`` Human (the default) fails after
  its first RUNNING poll with the seed's own message about images without a person;
- ``/v1/lora/cancel`` cancels a training only while it waits (PENDING), as the seed says; a running
  one answers ``success: false``. ``cancels`` records every cancel asked for.

Free outpaint (``/v1/outpaint/imgen_free``, section 2.2): ``width``/``height`` in [640, 6000] and
multiples of 64 (code 3 otherwise), ``free_x``/``free_y`` in [0, 6000] with their remainder past a
multiple of 8 ignored, as the seed says; under ``fetch_inputs`` the input must be 256 px or more and
under 6000 a side and fit the output at ``free_x``/``free_y``. Its images are ``width`` x ``height``,
the fetched input pasted at the place the seed's rules give (``placed`` on the task), so a test can
see where the picture went.

``controlnet_configs`` on ``/v1/imgenstd/imgen`` are checked as the seed's table says (at most
three; ``type`` of its enum; ``img_url`` required; ``weight`` (0, 2]; ``guidance_start`` and
``guidance_end`` in [0, 1]; ``pre_processor`` one the type lists, ``pass`` for all): anything else
is code 3. Their ``img_url``s are fetched like the other inputs under ``fetch_inputs``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
from typing import Any

import requests
from flask import Response, jsonify, request
from PIL import Image

from tests.fakes.common import FakeClock, FakeProvider, image_bytes, slow

BATCH_LIMIT = 50
# Seed 001's imgen_free: output sides, their step, the placement's step, the input's sides.
FREE_SIDES = (640, 6000)
FREE_SIDE_STEP = 64
FREE_OFFSET_STEP = 8
FREE_INPUT = (256, 6000)
# Seed 001 section 10's limits on a training request.
LORA_MAX_IMAGES = 1000
LORA_TEXT_LIMITS = {"model_name": 64, "description": 1024, "trigger_word": 256}
LORA_ENUMS = {"main_object": ("Human", "Style"), "task_type": ("NORMAL", "VIP")}
# The seed's example of a failed training's state_msg (its spelling).
NO_HUMAN_MESSAGE = (
    "Images were not avaliable for main object 'Human', pleases update your images or choose another "
    "main object"
)
# Seed 001's controlnet_configs: the types and each type's pre_processor values ("pass" for all).
CONTROLNET_TYPES = frozenset(
    {
        "canny", "depth", "ip2p", "lineart", "lineart_anime", "mlsd", "normal", "openpose", "scribble",
        "shuffle", "softedge", "tile", "seg", "brightness", "reference_only", "ip_adapter_faceid",
    }
)  # fmt: skip
CONTROLNET_PRE_PROCESSORS = {
    "canny": ("canny", "invert"),
    "openpose": ("openpose", "openpose_face", "openpose_faceonly", "openpose_full", "openpose_hand"),
    "lineart": ("lineart_coarse", "lineart_realistic", "lineart_standard"),
    "lineart_anime": ("lineart_anime", "lineart_anime_denoise"),
    "tile": ("tile_colorfix", "tile_colorfix_sharp", "tile_resample"),
    "ip_adapter_faceid": ("face_id_plus", "plus_vith"),
}
_IMAGE_FAMILIES = {"imgenstd", "erase", "outpaint", "inpaint", "sup_res", "split", "stylization"}
# What each submit endpoint requires, per the seed's parameter tables.
_REQUIRED = {
    ("imgenstd", "imgen"): ("model_id", "prompt"),
    ("erase", "imgen"): ("model_id", "img_url", "mask_img_url"),
    ("outpaint", "imgen"): ("model_id", "img_url"),
    ("outpaint", "imgen_free"): ("model_id", "img_url", "width", "height"),
    ("inpaint", "imgen"): ("model_id", "img_url", "mask_img_url", "prompt"),
    ("sup_res", "imgen"): ("model_id", "img_url"),
    ("split", "imgen"): ("model_id", "img_url"),
    ("stylization", "imgen"): ("model_id", "img_url"),
}


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


class SenseTimeFake(FakeProvider):
    def __init__(
        self,
        *,
        keys: dict[str, str] | None = None,
        clock: FakeClock | None = None,
        model_count: int = 230,
    ):
        super().__init__(clock=clock)
        self.keys = keys or {"test-ak": "test-sk"}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.batch_sizes: list[int] = []
        self.tokens: list[str] = []
        self.model_pages: list[tuple[int, int]] = []
        self.fetch_inputs = False
        self.fetched: list[dict[str, Any]] = []
        self.lora_pending_polls = 1
        self.lora_running_polls = 3
        self.cancels: list[dict[str, Any]] = []
        self.models = [
            {
                "id": f"model{i:03d}",
                "name": f"Model {i}",
                "description": "",
                "base_model_type": "mini1.5",
                "model_type": "LORA" if i % 3 == 0 else "Checkpoint",
                "trigger_words": "",
            }
            for i in range(model_count)
        ]
        self._routes()

    def reset(self) -> None:
        super().reset()
        with self.lock:
            self.tasks.clear()
            self.batch_sizes.clear()
            self.tokens.clear()
            self.model_pages.clear()
            self.fetched.clear()
            self.fetch_inputs = False
            self.lora_pending_polls = 1
            self.lora_running_polls = 3
            self.cancels.clear()

    # -- helpers ----------------------------------------------------------------------------

    @staticmethod
    def error(code: int, message: str, status: int, headers: dict | None = None) -> Response:
        response = jsonify({"error": {"code": code, "message": message, "details": ["trace_id:fake"]}})
        response.status_code = status
        for name, value in (headers or {}).items():
            response.headers[name] = value
        return response

    def _check_token(self) -> str | None:
        """The reason the bearer token is refused, or None when it is valid."""
        header = request.headers.get("Authorization", "")
        if not header.startswith("Bearer "):
            return "missing bearer token"
        token = header[len("Bearer ") :]
        parts = token.split(".")
        if len(parts) != 3:
            return "malformed token"
        try:
            head = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, json.JSONDecodeError):
            return "malformed token"
        if head.get("alg") != "HS256":
            return "alg must be HS256"
        secret = self.keys.get(claims.get("iss"))
        if secret is None:
            return "unknown iss"
        expected = hmac.new(secret.encode(), f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            return "bad signature"
        now = self.clock()
        if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
            return "token expired"
        if isinstance(claims.get("nbf"), int) and claims["nbf"] > now:
            return "token not yet valid"
        self.tokens.append(token)
        return None

    def _gate(self, endpoint: str) -> Response | None:
        """Auth, then any injected fault for this endpoint kind."""
        self.requests.append({"method": request.method, "path": request.path, "endpoint": endpoint})
        reason = self._check_token()
        if reason:
            return self.error(16, f"Unauthenticated: {reason}", 401)
        fault = self.faults.take(endpoint)
        slow(fault)
        if fault is None or fault.kind == "slow":
            return None
        if fault.kind == "rate_limit":
            headers = (
                {"Retry-After": str(fault.params["retry_after"])} if "retry_after" in fault.params else {}
            )
            return self.error(8, "Too Many Requests", 429, headers)
        if fault.kind == "server_error":
            return self.error(2, "Internal Error", 500)
        if fault.kind == "malformed":
            return Response("{not json", status=200, content_type="application/json")
        raise AssertionError(f"unknown fault {fault.kind}")

    def _input_urls(self, body: dict[str, Any]) -> list[str]:
        urls = [body.get("img_url"), body.get("mask_img_url"), (body.get("base_img") or {}).get("url")]
        urls += [face.get("url") for face in body.get("faces") or [] if isinstance(face, dict)]
        urls += [cn.get("img_url") for cn in body.get("controlnet_configs") or [] if isinstance(cn, dict)]
        return [url for url in urls if isinstance(url, str) and url]

    def _fetch(self, url: str) -> str | None:
        """Download one input like the real service; the reason it is refused, or None."""
        if not url.startswith(("http://", "https://")):
            return f"{url[:16]!r} is not a public URL"
        try:
            response = requests.get(url, timeout=5)
        except requests.RequestException as exc:
            return f"cannot fetch {url}: {type(exc).__name__}"
        self.fetched.append({"url": url, "status": response.status_code, "body": response.content})
        return None if response.status_code == 200 else f"{url} answered {response.status_code}"

    def _new_task(self, family: str, body: dict[str, Any]) -> Response:
        if self.fetch_inputs:
            for url in self._input_urls(body):
                problem = self._fetch(url)
                if problem:
                    return self.error(3, f"Invalid Params: {problem}", 400)
        canvas: dict[str, Any] = {}
        if family == "outpaint.free":
            found = self._free_canvas(body)
            if isinstance(found, Response):
                return found
            canvas = found
        prompt = str(body.get("prompt") or "")
        if "BLOCKED" in prompt:
            return self.error(18, "触发敏感词", 400)
        task_id = f"st-{self.next_id():05d}"
        with self.lock:
            self.tasks[task_id] = {
                "family": family,
                "polls": 0,
                "body": body,
                "samples": int(body.get("samples") or 1),
                "fmt": "PNG" if body.get("format") == "PNG" else "JPEG",
                "sensitive": "NSFW-OUTPUT" in prompt,
                **canvas,
            }
        return jsonify({"task_id": task_id})

    def _free_canvas(self, body: dict[str, Any]) -> dict[str, Any] | Response:
        """imgen_free's checks (seed 001 section 2.2): the output's size, where the input goes in it
        and, when the input was fetched, the input itself; an error answer, or the task's fields."""
        for name in ("width", "height"):
            value = body[name]
            low, high = FREE_SIDES
            if not isinstance(value, int) or not low <= value <= high or value % FREE_SIDE_STEP:
                message = f"{name} must be in [{low}, {high}] and a multiple of {FREE_SIDE_STEP}"
                return self.error(3, f"Invalid Params: {message}", 400)
        placed = []
        for name in ("free_x", "free_y"):
            value = body.get(name, 0)
            if not isinstance(value, int) or not 0 <= value <= FREE_SIDES[1]:
                return self.error(3, f"Invalid Params: {name} must be in [0, {FREE_SIDES[1]}]", 400)
            # "free_x需要是8的倍数(如不是8的倍数,则忽略余数)"
            placed.append(value - value % FREE_OFFSET_STEP)
        source = None
        fetched = [item for item in self.fetched if item["url"] == body["img_url"]]
        if fetched:
            source = Image.open(io.BytesIO(fetched[-1]["body"])).convert("RGB")
            if not all(FREE_INPUT[0] <= side < FREE_INPUT[1] for side in source.size):
                return self.error(3, "Invalid Params: the image must be 256*256 to 6000*6000 px", 400)
            if source.width + placed[0] > body["width"] or source.height + placed[1] > body["height"]:
                return self.error(3, "Invalid Params: the image does not fit at free_x, free_y", 400)
        return {"canvas": (body["width"], body["height"]), "placed": tuple(placed), "source": source}

    def _canvas_image(self, task: dict[str, Any], index: int) -> str:
        """A free outpaint's output: ``width`` x ``height``, the input (when fetched) at ``placed``."""
        image = Image.open(io.BytesIO(image_bytes(size=task["canvas"], seed=index))).convert("RGB")
        if task["source"] is not None:
            image.paste(task["source"], task["placed"])
        buffer = io.BytesIO()
        image.save(buffer, format=task["fmt"])
        name = f"out{self.next_id()}.{'jpg' if task['fmt'] == 'JPEG' else 'png'}"
        self.files[name] = (buffer.getvalue(), f"image/{task['fmt'].lower()}")
        return name

    def _advance(self, task_id: str) -> dict[str, Any]:
        """One poll of a task: count it and produce the state the seed's result body shows."""
        with self.lock:
            task = self.tasks[task_id]
            task["polls"] += 1
            if task["polls"] == 1:
                state = "PENDING"
            elif task["polls"] <= self.polls_to_finish:
                state = "RUNNING"
            else:
                state = "FAILED" if task["sensitive"] else "SUCCESS"
            if state in ("SUCCESS", "FAILED") and "images" not in task:
                task["images"] = [self._image(task, i) for i in range(task["samples"])]
            return {"state": state, "images": task.get("images", []) if state != "PENDING" else []}

    def _image(self, task: dict[str, Any], index: int) -> dict[str, Any]:
        if task["sensitive"]:
            return {"index": index, "seed": 1000 + index, "small": "", "raw": "", "error_code": "Sensitive"}
        if "canvas" in task:
            name = self._canvas_image(task, index)
        else:
            name = self.store_image(fmt=task["fmt"], seed=index)
        small = self.store_image(fmt=task["fmt"], size=(16, 12), seed=index)
        base = request.host_url
        return {
            "index": index,
            "seed": 1000 + index,
            "small": f"{base}files/{small}",
            "raw": f"{base}files/{name}",
            "error_code": "",
        }

    def _result_body(self, task_id: str) -> dict[str, Any]:
        state = self._advance(task_id)
        message = {"SUCCESS": "OK", "FAILED": "generation failed"}.get(state["state"], "")
        return {
            "state": state["state"],
            "state_message": message,
            "task_id": task_id,
            "images": state["images"],
        }

    @staticmethod
    def _controlnet_problem(configs: Any) -> str | None:
        """What the seed's controlnet_configs table refuses in ``configs``, or None."""
        if configs is None:
            return None
        if not isinstance(configs, list) or len(configs) > 3:
            return "must be a list of at most 3"
        for config in configs:
            if not isinstance(config, dict) or config.get("type") not in CONTROLNET_TYPES:
                return "type must be one of the seed's"
            if not isinstance(config.get("img_url"), str) or not config["img_url"]:
                return "img_url is required"
            weight = config.get("weight", 1)
            if not isinstance(weight, (int, float)) or not 0 < weight <= 2:
                return "weight must be in (0, 2]"
            for name in ("guidance_start", "guidance_end"):
                value = config.get(name, 0)
                if not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    return f"{name} must be in [0, 1]"
            pre = config.get("pre_processor")
            allowed = ("pass", *CONTROLNET_PRE_PROCESSORS.get(config["type"], ()))
            if pre is not None and pre not in allowed:
                return f"pre_processor {pre!r} is not one of {config['type']}'s"
        return None

    # -- LoRA training ----------------------------------------------------------------------

    def _lora_problem(self, body: dict[str, Any]) -> Response | None:
        """The seed's checks of a training request; the error answer, or None when it is fine."""
        base = body.get("base_model_id")
        images = body.get("images")
        if not base or not isinstance(images, list) or not images:
            return self.error(3, "Invalid Params: base_model_id and images are required", 400)
        if not all(isinstance(url, str) and url for url in images) or len(set(images)) > LORA_MAX_IMAGES:
            return self.error(3, f"Invalid Params: images are at most {LORA_MAX_IMAGES} urls", 400)
        for name, limit in LORA_TEXT_LIMITS.items():
            if name in body and (not isinstance(body[name], str) or len(body[name]) > limit):
                return self.error(3, f"Invalid Params: {name} is at most {limit} characters", 400)
        for name, allowed in LORA_ENUMS.items():
            if name in body and body[name] not in allowed:
                return self.error(3, f"Invalid Params: {name} must be one of {', '.join(allowed)}", 400)
        unknown = set(body) - {"base_model_id", "images", *LORA_TEXT_LIMITS, *LORA_ENUMS}
        if unknown:
            return self.error(3, f"Invalid Params: unknown {', '.join(sorted(unknown))}", 400)
        if not any(m["id"] == base and m["model_type"] == "Checkpoint" for m in self.models):
            return self.error(5, f"base model {base} is not valid", 400)
        return None

    def _new_training(self, body: dict[str, Any]) -> Response:
        problem = self._lora_problem(body)
        if problem is not None:
            return problem
        if self.fetch_inputs:
            for url in body["images"]:
                reason = self._fetch(url)
                if reason:
                    return self.error(3, f"Invalid Params: {reason}", 400)
        task_id = f"lora-task-{self.next_id():05d}"
        no_human = "NO-HUMAN" in str(body.get("trigger_word") or "")
        with self.lock:
            self.tasks[task_id] = {
                "family": "lora",
                "polls": 0,
                "body": body,
                "state": "PENDING",
                "progress": 0.0,
                "fails": no_human and body.get("main_object", "Human") == "Human",
            }
        return jsonify({"task_id": task_id})

    def _training_body(self, task_id: str) -> dict[str, Any]:
        """One poll of a training: count it, move it on, and answer as the seed's result does."""
        with self.lock:
            task = self.tasks[task_id]
            if task["state"] in ("PENDING", "RUNNING"):  # a final training stays as it is
                task["polls"] += 1
                running = task["polls"] - self.lora_pending_polls  # the RUNNING polls so far
                if task["fails"] and running > 1:
                    task["state"] = "FAILED"
                elif 0 < running <= self.lora_running_polls:
                    task["state"] = "RUNNING"
                    task["progress"] = round(running / (self.lora_running_polls + 1), 4)
                elif running > self.lora_running_polls:
                    task["state"], task["progress"] = "SUCCESS", 1.0
            state = task["state"]
            message = {"FAILED": NO_HUMAN_MESSAGE, "CANCELLED": "cancelled by the user"}.get(state, "")
            return {
                "state": state,
                "state_msg": message,
                "task_id": task_id,
                "lora_id": f"lora-{task_id}" if state == "SUCCESS" else "",
                "training_progress": task["progress"],
            }

    def _cancel_training(self, task_id: Any) -> Response:
        with self.lock:
            task = self.tasks.get(task_id) if isinstance(task_id, str) else None
            if task is None or task["family"] != "lora":
                return self.error(5, "task not found", 404)
            # "等待状态才能被取消": only a training that waits can be cancelled.
            success = task["state"] == "PENDING"
            self.cancels.append({"task_id": task_id, "state": task["state"], "success": success})
            if success:
                task["state"] = "CANCELLED"
        return jsonify({"success": success})

    # -- routes -----------------------------------------------------------------------------

    def _routes(self) -> None:
        app = self.app

        @app.post("/v1/<family>/<action>")
        def submit(family: str, action: str):
            required = _REQUIRED.get((family, action))
            if family == "face" and action in ("imggen", "detect"):
                required = ("model_id", "base_img", "faces") if action == "imggen" else ("img_url",)
            if required is None:
                return self.error(12, "Not Implemented", 404)
            denied = self._gate("submit")
            if denied is not None:
                return denied
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                return self.error(3, "Invalid Params: body must be a JSON object", 400)
            missing = [name for name in required if body.get(name) in (None, "", [])]
            if missing:
                return self.error(3, f"Invalid Params: missing {', '.join(missing)}", 400)
            if family == "face" and action == "imggen" and len(body["faces"]) > 4:
                return self.error(3, "Invalid Params: at most 4 faces", 400)
            samples = body.get("samples", 1)
            if not isinstance(samples, int) or not 1 <= samples <= 8:
                return self.error(3, "Invalid Params: samples must be in [1, 8]", 400)
            problem = self._controlnet_problem(body.get("controlnet_configs"))
            if family == "imgenstd" and problem:
                return self.error(3, f"Invalid Params: controlnet_configs {problem}", 400)
            key = f"face.{action}" if family == "face" else family
            return self._new_task(f"{key}.free" if action == "imgen_free" else key, body)

        @app.get("/v1/<family>/result/<task_id>")
        def result(family: str, task_id: str):
            denied = self._gate("poll")
            if denied is not None:
                return denied
            task = self.tasks.get(task_id)
            if task is None or task["family"] not in (family, f"{family}.free"):
                return self.error(5, "task not found", 404)
            return jsonify(self._result_body(task_id))

        @app.get("/v1/<family>/results")
        def results(family: str):
            denied = self._gate("batch")
            if denied is not None:
                return denied
            # The seed sends the ids as a JSON body on GET.
            body = request.get_json(silent=True) or {}
            ids = body.get("task_ids")
            if not isinstance(ids, list) or not ids:
                return self.error(3, "Invalid Params: task_ids required", 400)
            if len(ids) > BATCH_LIMIT:
                return self.error(3, f"Invalid Params: at most {BATCH_LIMIT} task_ids", 400)
            self.batch_sizes.append(len(ids))
            found = [
                i for i in ids if i in self.tasks and self.tasks[i]["family"] in (family, f"{family}.free")
            ]
            return jsonify({"results": [self._result_body(task_id) for task_id in found]})

        @app.post("/v1/lora/train")
        def lora_train():
            denied = self._gate("submit")
            if denied is not None:
                return denied
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                return self.error(3, "Invalid Params: body must be a JSON object", 400)
            return self._new_training(body)

        @app.get("/v1/lora/result/<task_id>")
        def lora_result(task_id: str):
            denied = self._gate("poll")
            if denied is not None:
                return denied
            if self.tasks.get(task_id, {}).get("family") != "lora":
                return self.error(5, "task not found", 404)
            return jsonify(self._training_body(task_id))

        @app.get("/v1/lora/results")
        def lora_results():
            denied = self._gate("batch")
            if denied is not None:
                return denied
            ids = (request.get_json(silent=True) or {}).get("task_ids")
            if not isinstance(ids, list) or not ids or len(ids) > BATCH_LIMIT:
                return self.error(3, f"Invalid Params: 1 to {BATCH_LIMIT} task_ids", 400)
            self.batch_sizes.append(len(ids))
            found = [i for i in ids if self.tasks.get(i, {}).get("family") == "lora"]
            return jsonify({"results": [self._training_body(task_id) for task_id in found]})

        @app.post("/v1/lora/cancel")
        def lora_cancel():
            denied = self._gate("cancel")
            if denied is not None:
                return denied
            return self._cancel_training((request.get_json(silent=True) or {}).get("task_id"))

        @app.get("/v1/face/imggen/<task_id>")
        def faceswap_result(task_id: str):
            denied = self._gate("poll")
            if denied is not None:
                return denied
            if self.tasks.get(task_id, {}).get("family") != "face.imggen":
                return self.error(5, "task not found", 404)
            state = self._advance(task_id)
            if state["state"] != "SUCCESS":
                return jsonify({"task": {"state": 0, "img_url": "", "img_raw_url": ""}})
            image = state["images"][0]
            return jsonify({"task": {"state": 1, "img_url": image["small"], "img_raw_url": image["raw"]}})

        @app.get("/v1/face/detect/<task_id>")
        def detect_result(task_id: str):
            denied = self._gate("poll")
            if denied is not None:
                return denied
            if self.tasks.get(task_id, {}).get("family") != "face.detect":
                return self.error(5, "task not found", 404)
            state = self._advance(task_id)
            if state["state"] != "SUCCESS":
                return jsonify({"state": 0, "faces": []})
            faces = [
                {"index": 0, "coords": {"x1": 10, "y1": 12, "x2": 40, "y2": 44}},
                {"index": 1, "coords": {"x1": 50, "y1": 8, "x2": 80, "y2": 41}},
            ]
            return jsonify({"state": 1, "faces": faces})

        @app.get("/v1/<kind>/models")
        def models(kind: str):
            denied = self._gate("models")
            if denied is not None:
                return denied
            try:
                size = int(request.args.get("size", 10))
                offset = int(request.args.get("offset", 0))
            except ValueError:
                return self.error(3, "Invalid Params: size and offset are integers", 400)
            if not 1 <= size <= 100 or offset < 0:
                return self.error(3, "Invalid Params: size in 1~100, offset >= 0", 400)
            mtp = request.args.get("mtp", "ALL")
            pool = [m for m in self.models if mtp == "ALL" or m["model_type"] == mtp]
            self.model_pages.append((size, offset))
            page = pool[offset : offset + size]
            return jsonify({"have_next": offset + size < len(pool), "data": page})

        @app.get("/files/<name>")
        def files(name: str):
            # Output links are public storage URLs: no token needed, and none expected.
            fault = self.faults.take("download")
            slow(fault)
            if name not in self.files:
                return Response("gone", status=404)
            data, content_type = self.files[name]
            return Response(data, content_type=content_type)
