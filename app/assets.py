"""The assets resource: a client's stored images, its uploads and its jobs' outputs.

``POST /v1/assets`` takes ``multipart/form-data`` (one or more ``file`` parts) or JSON
``{"url": ...}``, fetched through the same guarded ``Fetcher`` as a job input. Either way the bytes
pass the input checks (``tasks.inputs.check_image``: bytes, format, pixels) before anything is
stored, and the client's uploads stay under ``AIORCH_ASSET_QUOTA_BYTES``. An asset is read by its
owner only: another client's id answers ``404`` exactly like an id that never existed, here and
as ``asset://<id>`` in a job (``tasks.runtime.Runtime``). Uploads expire after
``AIORCH_RESULT_RETENTION`` like outputs, and the same sweep deletes them.

Large ``data:`` inputs of a job become assets here too (``data_inputs_to_assets``, called by
``app.jobs.create_job``), so the jobs table never holds image bytes. Such an asset belongs to the
client, not the job: deleting the job leaves it listed until its retention ends.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any, NoReturn
from urllib.parse import unquote, urlsplit

from flask import Response, current_app, g, request
from flask.views import MethodView
from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates

from app.errors import abort
from app.schemas import Blueprint
from app.services import Services
from app.stored_files import stored_file_response
from models.assets import UPLOAD, AssetStore, QuotaExceeded, new_asset_id
from models.jobs import StoredFile
from models.public import iso
from tasks.catalog import TaskSpec
from tasks.inputs import CheckedImage, Fetcher, InputProblem, TransientFetchError, check_image
from tasks.outbound import UrlPolicy
from tasks.payloads import InputRef, input_refs, replace_input
from tasks.payloads.base import HTTP_URL_PATTERN
from tasks.storage import CONTENT_TYPES

blp = Blueprint("assets", __name__, url_prefix="/v1/assets", description="Stored images: uploads and outputs")

MAX_FILES = 32  # file parts in one upload
# A ``data:`` input longer than this (characters of the URI) is stored as an asset at submit; a
# shorter one (a mask, a thumbnail) stays inline, where it costs the row less than an asset would.
DATA_INLINE_LIMIT = 64 * 1024
_CONTROL = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


class AssetSchema(Schema):
    """An asset (an upload or a job's output) as its owner sees it."""

    asset_id = fields.String(metadata={"description": "32 hex characters; use as asset://<asset_id>"})
    filename = fields.String(allow_none=True)
    content_type = fields.String()
    size = fields.Integer(metadata={"description": "Bytes"})
    width = fields.Integer(allow_none=True)
    height = fields.Integer(allow_none=True)
    created_at = fields.String()
    expires_at = fields.String(allow_none=True)


class AssetsCreatedSchema(Schema):
    assets = fields.List(fields.Nested(AssetSchema))


class AssetListSchema(Schema):
    assets = fields.List(fields.Nested(AssetSchema))
    have_next = fields.Boolean()


class AssetQueryArgsSchema(Schema):
    class Meta:
        unknown = RAISE

    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    before = fields.AwareDateTime(format="iso", default_timezone=UTC)

    @validates("before")
    def _before(self, value: datetime, **_: Any) -> None:
        try:
            value.astimezone(UTC)  # 0001-01-01T00:00+23:59 is before the first instant we can store
        except OverflowError:
            raise ValidationError("out of range") from None


class AssetUrlSchema(Schema):
    """Register an image by URL: fetched and checked like a job input."""

    class Meta:
        unknown = RAISE

    url = InputRef(required=True, validate=validate.Length(max=2048), metadata={"pattern": HTTP_URL_PATTERN})

    def __init__(self, *args: Any, url_policy: UrlPolicy = UrlPolicy(), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.url_policy = url_policy  # read by InputRef, as in the payload schemas

    @validates("url")
    def _http_only(self, value: str, **_: Any) -> None:
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValidationError("must be an http(s) URL")


_MULTIPART_BODY = {
    "type": "object",
    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
    "required": ["file"],
}


def services() -> Services:
    return current_app.extensions["aiorch"]


def asset_store() -> AssetStore:
    return AssetStore(services().db)


def _fetcher() -> Fetcher:
    """The API process's fetcher (one connection pool), for URL registration and ``data:``."""
    fetcher = current_app.extensions.get("aiorch.fetcher")
    if fetcher is None:
        fetcher = current_app.extensions["aiorch.fetcher"] = Fetcher(services().settings)
    return fetcher


def asset_object(row: StoredFile) -> dict[str, Any]:
    """The public view of an asset: never a path or a storage name beyond the output's own."""
    return {
        "asset_id": row.asset_id,
        "filename": row.filename,
        "content_type": row.content_type,
        "size": row.size,
        "width": row.width,
        "height": row.height,
        "created_at": iso(row.created_at),
        "expires_at": iso(row.expires_at),
    }


def owned_asset(asset_id: str) -> StoredFile:
    """The caller's asset, or 404 (another client's is not found, never forbidden)."""
    row = asset_store().get(g.client_id, asset_id)
    if row is None:
        abort(404, code="asset_not_found", message=f"No asset {asset_id}.")
    return row


def refuse_input(problem: InputProblem, under: str | None = None) -> NoReturn:
    """An input that failed its checks as the API's answer: ``413`` for bytes, else ``422``;
    ``details`` names the field (nested under ``under``, e.g. a job's ``payload``)."""
    status = 413 if problem.code == "input_too_large" else 422
    details: dict[str, Any] = {problem.field: [problem.message]}
    abort(status, code=problem.code, message=problem.message, details={under: details} if under else details)


def clean_filename(raw: str | None) -> str | None:
    """A client's file name as a label only: the last path segment, no control characters."""
    if not raw:
        return None
    name = _CONTROL.sub("", raw.replace("\\", "/").rsplit("/", 1)[-1]).strip()
    return name[:255] or None


def store_uploads(
    svc: Services, client_id: str, items: list[tuple[CheckedImage, str | None]]
) -> list[StoredFile]:
    """Checked images -> upload assets of ``client_id``: files first, then the rows in one
    transaction within the quota (``413 quota_exceeded``, and no file left behind)."""
    rows = []
    try:
        for checked, filename in items:
            saved = svc.storage.save_upload(checked.data, checked.ext)
            asset_id = new_asset_id()
            rows.append(
                StoredFile(
                    name=saved.name,
                    asset_id=asset_id,
                    client_id=client_id,
                    filename=filename or f"{asset_id}.{checked.ext}",
                    content_type=CONTENT_TYPES[checked.ext],
                    size=saved.size,
                    width=checked.width,
                    height=checked.height,
                )
            )
        AssetStore(svc.db).add_uploads(rows, svc.settings.asset_quota_bytes, svc.settings.result_retention)
    except QuotaExceeded as exc:
        svc.storage.delete_files([(UPLOAD, row.name) for row in rows])
        abort(
            413,
            code="quota_exceeded",
            message=f"Your stored uploads would pass your quota of {exc.quota} bytes "
            f"({exc.used} used, {exc.adding} more); delete some assets first.",
            details={"quota_bytes": exc.quota, "used_bytes": exc.used, "adding_bytes": exc.adding},
        )
    except BaseException:
        svc.storage.delete_files([(UPLOAD, row.name) for row in rows])
        raise
    return rows


def discard_uploads(svc: Services, rows: list[StoredFile]) -> None:
    """Undo ``store_uploads`` (the request they were made for failed after all)."""
    if rows:
        AssetStore(svc.db).discard([row.name for row in rows])
        svc.storage.delete_files([(UPLOAD, row.name) for row in rows])


def data_inputs_to_assets(
    svc: Services, client_id: str, spec: TaskSpec, payload: dict[str, Any]
) -> tuple[dict[str, Any], list[StoredFile]]:
    """The payload to store, and the uploads made for it.

    Every ``data:`` input over its byte limit is refused here (``413``), not after a ``202``. An
    image one longer than ``DATA_INLINE_LIMIT`` is checked like an upload (``422`` not an image,
    too many pixels) and replaced by ``asset://<id>`` of a new upload of the client."""
    settings = svc.settings
    found: list[tuple[str, int | None]] = []  # field, list index
    items: list[tuple[CheckedImage, str | None]] = []
    for field in spec.inputs:
        value = payload.get(field)
        for index, (label, ref) in enumerate(input_refs(field, value)):
            if not (isinstance(ref, str) and ref.startswith("data:")):
                continue
            # Videos stay inline (assets are images), under their own byte limit.
            cap = settings.max_video_bytes if field in spec.videos else settings.max_input_bytes
            if _decoded_size(ref) > cap:
                refuse_input(
                    InputProblem("input_too_large", f"the input is over the {cap} byte limit", label),
                    "payload",
                )
            if len(ref) <= DATA_INLINE_LIMIT or field in spec.videos:
                continue
            try:
                checked = _fetcher().load(ref, label)
            except InputProblem as problem:
                refuse_input(problem, "payload")
            found.append((field, index if isinstance(value, list) else None))
            items.append((checked, f"{field}.{checked.ext}"))
    if not items:
        return payload, []
    rows = store_uploads(svc, client_id, items)
    stored = dict(payload)
    for (field, position), row in zip(found, rows, strict=True):
        stored[field] = replace_input(stored[field], position, f"asset://{row.asset_id}")
    return stored, rows


def _decoded_size(ref: str) -> int:
    """Bytes a base64 ``data:`` URI decodes to (the payload schema admits base64 only)."""
    body = ref.partition(",")[2].rstrip("=")
    return len(body) * 3 // 4


def _multipart_items() -> list[tuple[CheckedImage, str | None]]:
    settings = services().settings
    # A part whose name werkzeug cannot read (a line break in it, say) comes back as None.
    names = {*request.form.keys(), *(k for k in request.files if k != "file")}
    unknown = sorted(name if name is not None else "(unnamed part)" for name in names)
    if unknown:
        abort(
            422,
            code="validation_error",
            message="Send the images as parts named file.",
            details={name: ["unknown field; send images as parts named file"] for name in unknown},
        )
    parts = request.files.getlist("file")
    if not parts:
        abort(
            422,
            code="validation_error",
            message="No file part.",
            details={"file": ["at least one file part"]},
        )
    if len(parts) > MAX_FILES:
        abort(
            422,
            code="validation_error",
            message=f"At most {MAX_FILES} files per upload.",
            details={"file": [f"at most {MAX_FILES} files per upload"]},
        )
    items = []
    for index, part in enumerate(parts):
        label = f"file[{index}]"
        # One byte over the limit is enough to refuse it, without reading the rest.
        data = part.stream.read(settings.max_input_bytes + 1)
        try:
            checked = check_image(data, label, settings)
        except InputProblem as problem:
            refuse_input(problem)
        items.append((checked, clean_filename(part.filename)))
    return items


def _url_item() -> tuple[CheckedImage, str | None]:
    settings = services().settings
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        abort(422, code="validation_error", message="The body must be a JSON object.")
    try:
        url = AssetUrlSchema(url_policy=UrlPolicy.from_settings(settings)).load(body)["url"]
    except ValidationError as exc:
        abort(422, code="validation_error", message="The request has invalid fields.", details=exc.messages)
    try:
        checked = _fetcher().load(url, "url")
    except InputProblem as problem:
        refuse_input(problem)
    except TransientFetchError as exc:
        # Not a 5xx: nothing of ours failed. The client may try again later.
        abort(422, code="input_unreachable", message=str(exc), details={"url": [str(exc)]})
    name = unquote(PurePosixPath(urlsplit(url).path).name)
    return checked, clean_filename(name)


@blp.route("")
class Assets(MethodView):
    @blp.doc(
        requestBody={
            "required": True,
            "content": {
                "application/json": {"schema": AssetUrlSchema},
                "multipart/form-data": {"schema": _MULTIPART_BODY},
            },
        }
    )
    @blp.response(201, AssetsCreatedSchema)
    def post(self) -> dict[str, Any]:
        """Upload images (multipart file parts) or register one by URL"""
        if request.mimetype == "multipart/form-data":
            items = _multipart_items()
        elif request.is_json:
            items = [_url_item()]
        else:
            abort(
                415,
                code="unsupported_media_type",
                message='Send multipart/form-data with one or more file parts, or JSON {"url": ...}.',
            )
        rows = store_uploads(services(), g.client_id, items)
        return {"assets": [asset_object(row) for row in rows]}

    @blp.arguments(AssetQueryArgsSchema, location="query", unknown=RAISE)
    @blp.response(200, AssetListSchema)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """List assets (uploads and outputs), newest first"""
        rows, more = asset_store().page(g.client_id, args["limit"], args.get("before"))
        return {"assets": [asset_object(row) for row in rows], "have_next": more}


@blp.route("/<asset_id>")
class AssetById(MethodView):
    @blp.response(200, AssetSchema)
    def get(self, asset_id: str) -> dict[str, Any]:
        """Get an asset"""
        return asset_object(owned_asset(asset_id))

    @blp.response(204)
    def delete(self, asset_id: str) -> None:
        """Delete an asset and its file"""
        row = asset_store().delete(g.client_id, asset_id)
        if row is None:
            abort(404, code="asset_not_found", message=f"No asset {asset_id}.")
        services().storage.delete_files([(row.kind, row.name)])


@blp.route("/<asset_id>/content")
class AssetContent(MethodView):
    @blp.response(200, description="The asset's bytes", content_type="application/octet-stream")
    def get(self, asset_id: str) -> Response:
        """Download an asset's bytes"""
        row = owned_asset(asset_id)
        blob = services().storage.open_file(row.kind, row.name)
        if blob is None:
            abort(404, code="asset_not_found", message=f"No asset {asset_id}.")
        # The owner's bytes, fetched with its key: no shared cache may keep them.
        return stored_file_response(blob, row.content_type, download_name=row.filename)
