"""Authentication: ``X-API-Key`` or ``Authorization: Bearer`` (a key, or a seed 001-style JWT signed
with the key's secret key), resolved to a client.

It runs before anything reads the request body: an unauthenticated request is answered 401 with
its body left unread (the server discards it in small chunks), so requests without a key cannot
make the API hold their bodies in memory.

Roles (contract v1.1): ``g.client_id`` is always the caller's own client (the jobs, assets and
webhook secret it creates are its client's); ``g.admin`` says whether the key is an admin key, which
may also read, list, cancel and delete other clients' jobs (``job_scope``) and is the only key
``/metrics`` answers unless ``AIORCH_METRICS_PUBLIC=1``.
"""

from __future__ import annotations

from flask import current_app, g, request

from app.errors import abort
from models.keys import TokenRefused

# Paths open without a key: health, the OpenAPI document and docs, and output files (served under
# unguessable names, as in seed 000).
# Provider webhooks carry the provider's signature instead of our key (checked in the view).
PUBLIC_PREFIXES = (
    "/healthz",
    "/readyz",
    "/files/",
    "/v1/openapi.json",
    "/v1/docs",
    "/v1/providers/zhinian/webhook",
)
# The body a request without a key may make us read: a provider's webhook event is a few ids
# (seed 003), nowhere near the limit for authenticated bodies.
PUBLIC_BODY_BYTES = 64 * 1024
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aiorch"'}
# Only an admin key may read these: the platform's figures, all clients together. /metrics is public
# instead with AIORCH_METRICS_PUBLIC=1 (a scraper on a private network, as before roles).
METRICS = "/metrics"
ADMIN_PREFIXES = (METRICS,)


def presented_key() -> str:
    key = request.headers.get("X-API-Key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authenticate() -> None:
    """before_request, the first one: sets ``g.client_id`` and ``g.admin``, or answers 401 (no
    key, or not a valid one) or 403 (an admin-only path with a client key)."""
    if request.url_rule is None or request.method == "OPTIONS":
        return  # unknown URLs get their 404 (no body is read for them either)
    services = current_app.extensions["aiorch"]
    if request.path.startswith(PUBLIC_PREFIXES) or (
        request.path == METRICS and services.settings.metrics_public
    ):
        request.max_content_length = PUBLIC_BODY_BYTES
        return
    try:
        caller = services.keyring.caller_for(presented_key())
    except TokenRefused as exc:
        abort(
            401,
            code="invalid_token",
            message=str(exc),
            headers={"WWW-Authenticate": 'Bearer realm="aiorch", error="invalid_token"'},
        )
    if caller is None:
        abort(401, headers=CHALLENGE)
    g.client_id = caller.client_id
    g.admin = caller.admin
    if request.path.startswith(ADMIN_PREFIXES) and not caller.admin:
        abort(403, code="admin_only", message=f"{request.path} answers admin keys only.")


def is_admin() -> bool:
    """Whether the request's key is an admin key (False on public paths, which have no key)."""
    return bool(g.get("admin", False))


def job_scope() -> str | None:
    """Whose jobs the caller may act on: its own client's, or None (every client's) for an admin
    key. A job outside the scope is answered exactly like one that does not exist."""
    return None if is_admin() else g.client_id
