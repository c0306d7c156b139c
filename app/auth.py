"""Authentication: ``X-API-Key`` or ``Authorization: Bearer`` (a key, or a seed 001-style JWT signed
with the key's secret key), resolved to a client.

It runs before anything reads the request body: an unauthenticated request is answered 401 with
its body left unread (the server discards it in small chunks), so requests without a key cannot
make the API hold their bodies in memory.
"""

from __future__ import annotations

from flask import current_app, g, request

from app.errors import abort
from models.keys import TokenRefused

# Paths open without a key: health, metrics, the OpenAPI document and docs, and output files
# (served under unguessable names, as in seed 000).
# Provider webhooks carry the provider's signature instead of our key (checked in the view).
PUBLIC_PREFIXES = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/files/",
    "/v1/openapi.json",
    "/v1/docs",
    "/v1/providers/zhinian/webhook",
)
# The body a request without a key may make us read: a provider's webhook event is a few ids
# (seed 003), nowhere near the limit for authenticated bodies.
PUBLIC_BODY_BYTES = 64 * 1024
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="aiorch"'}


def presented_key() -> str:
    key = request.headers.get("X-API-Key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authenticate() -> None:
    """before_request, the first one: sets ``g.client_id`` or answers 401."""
    if request.url_rule is None or request.method == "OPTIONS":
        return  # unknown URLs get their 404 (no body is read for them either)
    if request.path.startswith(PUBLIC_PREFIXES):
        request.max_content_length = PUBLIC_BODY_BYTES
        return
    services = current_app.extensions["aiorch"]
    try:
        client = services.keyring.client_for(presented_key())
    except TokenRefused as exc:
        abort(
            401,
            code="invalid_token",
            message=str(exc),
            headers={"WWW-Authenticate": 'Bearer realm="aiorch", error="invalid_token"'},
        )
    if client is None:
        abort(401, headers=CHALLENGE)
    g.client_id = client
