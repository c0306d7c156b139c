"""Health, readiness and output files."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, send_file
from flask.typing import ResponseReturnValue

from app.errors import abort
from models.reads import ping

blp = Blueprint("system", __name__)


@blp.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"ok": True}


@blp.get("/readyz")
def readyz() -> ResponseReturnValue:
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


@blp.get("/files/<name>")
def files(name: str) -> ResponseReturnValue:
    svc = current_app.extensions["aiorch"]
    path = svc.storage.path_for(name)
    if path is None or not path.is_file():
        abort(404, code="file_not_found", message="No such file (it may have expired).")
    response = send_file(path, conditional=True)
    # Private: the name is the only protection of a tenant's output, so no shared cache (a CDN,
    # a corporate proxy) may keep a copy to hand to whoever asks next. Only outputs are here;
    # uploads live in a folder of their own, read with the owner's key (app/assets.py).
    response.headers["Cache-Control"] = "private"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
