"""The one error shape: ``{"error": {"code", "message", "details"?}}`` for every failure.

flask-smorest's own errors (webargs validation), Flask's 404/405 and anything raised with
``abort`` all pass through ``error_response``; an unexpected exception becomes a plain 500 with
no stack trace in the body (the trace goes to the log).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from flask_smorest import Api
from marshmallow import Schema, fields, validate

# The views' abort. flask_smorest re-exports this same function but ships no py.typed, so through
# it mypy sees Any and cannot tell that abort never returns; imported from webargs it is NoReturn.
from webargs.flaskparser import abort as abort
from werkzeug.exceptions import HTTPException, InternalServerError, ServiceUnavailable, UnprocessableEntity

from app.schemas import JsonTooDeep
from models.db import database_unreachable
from tasks.storage_backends import StorageUnavailable

log = logging.getLogger("aiorch.api")

DEFAULT_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "rate_limited",
    500: "internal_error",
    501: "not_implemented",
    503: "service_unavailable",
    504: "timeout",
}
DEFAULT_MESSAGES = {
    400: "The request is malformed.",
    401: "A valid API key is required (X-API-Key, or Authorization: Bearer with a key or a signed JWT).",
    404: "Not found.",
    405: "This method is not allowed on this URL.",
    413: "The request body is too large.",
    422: "The request has invalid fields.",
    500: "Something went wrong on our side.",
}


# Where webargs reads from, and so how it nests its messages (``{"json": {"task": [...]}}``), and
# the name a refusal of that location as a whole goes under in ``details``.
LOCATIONS = {
    "json": "body",
    "form": "body",
    "json_or_form": "body",
    "files": "body",
    "query": "query",
    "querystring": "query",
    "headers": "headers",
    "cookies": "cookies",
    "view_args": "path",
}
# marshmallow's key for an error of the data as a whole rather than of one field.
WHOLE = "_schema"
# Statuses that mean "your input is wrong": their details always name what was wrong.
INPUT_STATUSES = (400, 422)


def field_details(details: Any, where: str = "body") -> dict[str, Any]:
    """``details`` as an object keyed by what was wrong, whatever shape it came in.

    webargs' location level goes (clients want fields, not "json"); marshmallow's ``_schema``
    (the data as a whole) is named after the location (``body``, ``query``); a bare list or
    sentence (webargs' ``["Invalid JSON body."]``) is the location's own. A client can always
    read ``details`` as an object whose keys name the fields."""
    if isinstance(details, dict) and len(details) == 1:
        ((key, inner),) = details.items()
        if key in LOCATIONS:
            details, where = inner, LOCATIONS[key]
    if not isinstance(details, dict):
        return {where: details if isinstance(details, list) else [details]}
    return {(where if key == WHOLE else key): value for key, value in details.items()}


def error_body(
    status: int, code: str | None = None, message: str | None = None, details: Any = None
) -> dict[str, Any]:
    error: dict[str, Any] = {
        "code": code or DEFAULT_CODES.get(status, "error"),
        "message": message or DEFAULT_MESSAGES.get(status, "The request failed."),
    }
    if details is None and status in INPUT_STATUSES:
        # Bad input that named nothing (a body that is no JSON object, say) is the body's fault.
        details = [error["message"]]
    if details is not None:
        error["details"] = field_details(details)
    return {"error": error}


def error_response(exc: HTTPException) -> ResponseReturnValue:
    status = exc.code or 500
    data = getattr(exc, "data", None) or {}
    details = data.get("details")
    if details is None:
        details = data.get("messages")  # webargs' validation errors
    message = data.get("message")
    if message is None and status not in DEFAULT_MESSAGES and exc.description:
        message = exc.description
    response = jsonify(error_body(status, data.get("code"), message, details))
    response.status_code = status
    for name, value in (data.get("headers") or {}).items():
        response.headers[name] = value
    if status == 405 and hasattr(exc, "valid_methods") and exc.valid_methods:
        response.headers["Allow"] = ", ".join(exc.valid_methods)
    return response


class ErrorDetailSchema(Schema):
    code = fields.String(required=True, validate=validate.Regexp(r"^[a-z][a-z0-9_]*$"))
    message = fields.String(required=True, validate=validate.Length(min=1))
    details = fields.Dict(
        metadata={
            "description": "An object: for bad input, keyed by the fields that were wrong (nested as "
            "the request nests them; body for the body as a whole, query for the query), each with "
            "what was wrong"
        }
    )


class ErrorSchema(Schema):
    """The one error shape (documents every error response of the OpenAPI spec)."""

    error = fields.Nested(ErrorDetailSchema, required=True)


class JsonApi(Api):
    """flask-smorest's Api with our error shape instead of its own."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> ResponseReturnValue:
        return error_response(error)


def register_error_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, error_response)

    @app.errorhandler(JsonTooDeep)
    def _too_deep(exc: JsonTooDeep) -> ResponseReturnValue:
        refused = UnprocessableEntity()
        refused.data = {"code": "json_too_deep", "message": str(exc)}  # type: ignore[attr-defined]
        return error_response(refused)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> ResponseReturnValue:
        if isinstance(exc, HTTPException):
            return error_response(exc)
        if database_unreachable(exc):
            # The database is down or restarting: a client should retry, not report a bug.
            log.warning("database unavailable: %s", exc.__class__.__name__)
            unavailable = ServiceUnavailable()
            unavailable.data = {  # type: ignore[attr-defined]
                "code": "database_unavailable",
                "message": "The job database is unreachable; retry shortly.",
                "headers": {"Retry-After": "5"},
            }
            return error_response(unavailable)
        if isinstance(exc, StorageUnavailable):
            # The bucket (AIORCH_STORAGE_URL) is down or restarting: retry, as for the database.
            log.warning("storage unavailable: %s", exc)
            unavailable = ServiceUnavailable()
            unavailable.data = {  # type: ignore[attr-defined]
                "code": "storage_unavailable",
                "message": "The file storage is unreachable; retry shortly.",
                "headers": {"Retry-After": "5"},
            }
            return error_response(unavailable)
        log.exception("unhandled error")
        return error_response(InternalServerError())


# What each documented error status means where an operation lists it (``documents``).
ERROR_DESCRIPTIONS = {
    400: "bad_request: the body or a header is malformed (details name it)",
    401: "unauthorized: no valid API key",
    404: "not found, or not yours",
    409: "conflict: idempotency_key_reused (the key came with another body), or a final job",
    413: "payload_too_large or input_too_large: the body or an input is over its limit",
    415: "unsupported_media_type: send a JSON body",
    422: "the request has invalid fields (details name them)",
    429: "rate_limited or too_many_queued_jobs: retry after Retry-After seconds",
    501: "task_not_installed: no backend for this task is installed on this platform",
    503: "broker_unavailable, database_unavailable or storage_unavailable: retry after Retry-After seconds",
    504: "timeout: the job did not finish in time; it goes on (details.job_id)",
}


def documents(blp: Any, *statuses: int) -> Any:
    """Decorator: list these error responses (the one error shape) on an operation of ``blp``,
    so the spec says every answer the operation can give, not only its success."""

    def apply(view: Any) -> Any:
        documented = view
        for status in statuses:
            documented = blp.alt_response(status, schema=ErrorSchema, description=ERROR_DESCRIPTIONS[status])(
                documented
            )
        # flask-smorest's alt_response only documents: each of its wrappers calls straight through
        # and carries its own deep copy of the operation's documentation. The view keeps the
        # documentation they built and loses the wrappers: a request passes through none of them,
        # and each API process holds one copy per operation instead of one per status (~1.5 MB).
        view._apidoc = documented._apidoc
        return view

    return apply
