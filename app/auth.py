"""API-key authentication: ``X-API-Key`` or ``Authorization: Bearer``, resolved to a client."""

from __future__ import annotations

from flask import current_app, g, request

from app.errors import abort

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


def presented_key() -> str:
    key = request.headers.get("X-API-Key", "").strip()
    if key:
        return key
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def authenticate() -> None:
    """before_request: sets ``g.client_id`` or answers 401."""
    if request.url_rule is None or request.path.startswith(PUBLIC_PREFIXES) or request.method == "OPTIONS":
        return  # unknown URLs get their 404, public ones no check
    services = current_app.extensions["aiorch"]
    client = services.keyring.client_for(presented_key())
    if client is None:
        abort(401, headers={"WWW-Authenticate": 'Bearer realm="aiorch"'})
    g.client_id = client
