"""Health, readiness and output files."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask.typing import ResponseReturnValue
from marshmallow import Schema, fields

from app.errors import ErrorSchema, abort
from app.schemas import Blueprint
from app.stored_files import stored_file_response
from models.assets import OUTPUT
from models.reads import ping
from tasks.storage import CONTENT_TYPES

blp = Blueprint("system", __name__, description="Health, readiness and output files (no key needed)")
PUBLIC: dict[str, Any] = {"security": []}  # these answer without an API key


class HealthSchema(Schema):
    ok = fields.Boolean()


class ReadySchema(Schema):
    ok = fields.Boolean()
    checks = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        metadata={"description": "database, broker (and storage, when it is a bucket): ok"},
    )


# An output's bytes, in whichever format storage keeps it.
FILE_TYPES = sorted({*CONTENT_TYPES.values(), "application/octet-stream"})
FILE_RESPONSE = {
    "description": "The file (Cache-Control: private)",
    "content": {kind: {"schema": {"type": "string", "format": "binary"}} for kind in FILE_TYPES},
}


@blp.route("/healthz")
@blp.doc(**PUBLIC)
@blp.response(200, HealthSchema)
def healthz() -> dict[str, Any]:
    """Liveness: the API process answers"""
    return {"ok": True}


@blp.route("/readyz")
@blp.doc(**PUBLIC)
@blp.response(200, ReadySchema)
@blp.alt_response(503, schema=ErrorSchema, description="not_ready: a dependency is unreachable")
def readyz() -> ResponseReturnValue:
    """Readiness: the database and the broker are reachable"""
    svc = current_app.extensions["aiorch"]
    checks: dict[str, str] = {}
    # "unreachable", not the driver's exception class: a probe needs the verdict, the log the rest.
    try:
        ping(svc.db)
        checks["database"] = "ok"
    except Exception:  # any driver error means not ready
        checks["database"] = "unreachable"
    try:
        with svc.celery.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        checks["broker"] = "ok"
    except Exception:  # any transport error: the broker is down or refuses us
        checks["broker"] = "unreachable"
    if svc.storage.shared:
        # A bucket (AIORCH_STORAGE_URL) is a dependency like the others; a local folder is not.
        try:
            svc.storage.ping()
            checks["storage"] = "ok"
        except Exception:  # any client error: the endpoint is down, or the bucket refuses us
            checks["storage"] = "unreachable"
    ready = all(value == "ok" for value in checks.values())
    if not ready:
        abort(
            503,
            code="not_ready",
            message="A dependency is unreachable.",
            details=checks,
            headers={"Retry-After": "5"},
        )
    return {"ok": True, "checks": checks}


@blp.route("/files/<name>")
@blp.doc(**PUBLIC, responses={"200": FILE_RESPONSE})
@blp.alt_response(404, schema=ErrorSchema, description="file_not_found: no such file, or it expired")
def files(name: str) -> ResponseReturnValue:
    """An output file, by the unguessable name in its job's result"""
    svc = current_app.extensions["aiorch"]
    # Only outputs are here (local folder or bucket alike, app/stored_files.py); uploads live
    # under a key of their own, read with the owner's key (app/assets.py).
    blob = svc.storage.open_file(OUTPUT, name)
    if blob is None:
        abort(404, code="file_not_found", message="No such file (it may have expired).")
    return stored_file_response(blob, CONTENT_TYPES[name.rpartition(".")[2]])
