"""The inputs a provider sees: never the client's raw references, always our own checked copies.

``prepare`` fetched and checked every input into storage; the provider gets those bytes, inline as
a base64 ``data:`` URI where it takes base64 (Volcengine), else as a public URL of ours
(``<public_url>/files/<name>``, 128 random bits), so an ``asset://`` id, a ``data:`` URI or a URL
only we can reach works at every provider, and what it sees is exactly what we validated.
"""

from __future__ import annotations

import base64
import io
from datetime import timedelta
from typing import Any

from PIL import Image

from config.routes import DEFAULT_TIMEOUT, Route
from models.assets import OUTPUT
from models.db import utcnow
from models.jobs import Job, StoredFile
from models.jobstore import Claim, ClaimRefused
from tasks.payloads import replace_input
from tasks.runtime import Runtime
from tasks.storage import encode_image, input_name

# Providers that take input images inline as base64 (Volcengine's binary_data_base64); the others
# fetch a public URL of ours.
INLINE_INPUTS = {"volcengine"}
# Formats a public copy keeps as they are; anything else (BMP, TIFF, GIF) is sent as PNG.
PUBLIC_FORMATS = {"jpg", "png", "webp"}
# A public input copy outlives the route's deadline by this much, then the retention sweep
# deletes it (it is deleted at once when the job finishes).
PUBLIC_COPY_GRACE = 3600.0


def provider_payload(rt: Runtime, job: Job, claim: Claim, kind: str, route: Route | None) -> dict[str, Any]:
    """The job's payload as a provider of ``kind`` gets it: every input replaced by our own
    checked copy, inline or as a public URL (see the module's docstring), and no ``watermark``.

    The visible label is drawn by us on the downloaded outputs (``tasks.outputs``), as on a local
    job's: no provider's own watermark can say our text, position and opacity alike (Volcengine's
    two fixed labels in four corners, SenseTime's fixed "图片由 AI 生成"), so the same job shows
    the same label wherever it ran, drawn once.
    """
    payload = dict(job.payload)
    payload.pop("watermark", None)
    inputs = job.inputs or {}
    if not inputs:
        return payload
    if kind in INLINE_INPUTS:
        for field, entry in inputs.items():
            refs = [_data_uri(rt, job.id, e) for e in (entry if isinstance(entry, list) else [entry])]
            payload[field] = _with_refs(payload.get(field), entry, refs)
        return payload
    names = _public_copies(rt, job, claim, route)
    for field, entry in inputs.items():
        entries = entry if isinstance(entry, list) else [entry]
        refs = [rt.storage.url_for(names[input_name(e)]) for e in entries]
        payload[field] = _with_refs(payload.get(field), entry, refs)
    return payload


def _with_refs(value: Any, entry: Any, refs: list[str]) -> Any:
    """The payload's ``value`` with its references (a list field's in order; an object's in a
    list of objects, such as ``controlnets[].image_url``) replaced by ``refs``."""
    if not isinstance(entry, list):
        return refs[0]
    if not isinstance(value, list):
        return refs
    for index, ref in enumerate(refs):
        value = replace_input(value, index, ref)
    return value


def _data_uri(rt: Runtime, job_id: str, entry: dict[str, Any]) -> str:
    data = rt.storage.read_input(job_id, entry)
    mime = {"jpg": "jpeg"}.get(entry["ext"], entry["ext"])
    return f"data:image/{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _public_copies(rt: Runtime, job: Job, claim: Claim, route: Route | None) -> dict[str, str]:
    """Public copies (``/files/<name>``, 128 random bits) of the job's inputs: input name -> name.

    Made once per job: the names are kept in ``jobs.inputs``, so a submit retried later (or at the
    next backend) sends the same URLs. Each copy is a stored file of the job, so deleting the job
    deletes it, and it expires after the route's deadline in case the job never finishes here.
    """
    inputs = job.inputs or {}
    entries = [e for value in inputs.values() for e in (value if isinstance(value, list) else [value])]
    names: dict[str, str] = {}
    missing = []
    for entry in entries:
        name = entry.get("public_name")
        if name and rt.storage.has_file(OUTPUT, name):
            names[input_name(entry)] = name
        else:
            missing.append(entry)
    if not missing:
        return names
    timeout = route.timeout if route is not None else DEFAULT_TIMEOUT
    expires = utcnow() + timedelta(seconds=timeout + PUBLIC_COPY_GRACE)
    rows = []
    for entry in missing:
        data = rt.storage.read_input(job.id, entry)
        ext = entry["ext"]
        if ext not in PUBLIC_FORMATS:
            with Image.open(io.BytesIO(data)) as image:
                data, ext = (
                    encode_image(image.convert("RGBA" if "A" in image.getbands() else "RGB"), "png"),
                    "png",
                )
        saved = rt.storage.save_output(data, ext)
        entry["public_name"] = saved.name
        names[input_name(entry)] = saved.name
        rows.append(
            # Served at /files like an output, but no asset of the client (no asset_id): a copy
            # of its input for the provider's eyes only, deleted when the job finishes.
            StoredFile(
                name=saved.name,
                kind=OUTPUT,
                job_id=job.id,
                client_id=job.client_id,
                content_type=saved.content_type,
                size=saved.size,
                expires_at=expires,
            )
        )
    if not rt.store.record_inputs(claim, dict(inputs), rows):
        # Fenced off meanwhile: the copies are nobody's.
        rt.storage.delete_outputs([row.name for row in rows])
        raise ClaimRefused("the claim was lost while copying the inputs")
    return names


def delete_public_copies(rt: Runtime, job_id: str) -> None:
    """Forget and delete the public copies of an ended job's inputs."""
    job = rt.store.get(job_id)
    inputs = (job.inputs if job is not None else None) or {}
    names = [
        e["public_name"]
        for value in inputs.values()
        for e in (value if isinstance(value, list) else [value])
        if isinstance(e, dict) and e.get("public_name")
    ]
    if not names:
        return
    rt.store.delete_files(names)
    rt.storage.delete_outputs(names)
