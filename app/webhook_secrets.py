"""The caller's webhook signing secret: read it, rotate it.

Each client verifies its webhooks with its own secret (``models.webhook_secrets``); the operator's
master ``AIORCH_WEBHOOK_SECRET`` is never returned, only the secret derived from it for the caller.
"""

from __future__ import annotations

from flask import Response, current_app, g
from flask.views import MethodView
from marshmallow import Schema, fields

from app.schemas import Blueprint
from models.webhook_secrets import WebhookSecrets

blp = Blueprint("webhook_secrets", __name__, url_prefix="/v1/webhooks", description="Webhook signing secrets")


class WebhookSecretSchema(Schema):
    secret = fields.String(
        required=True,
        metadata={"description": "Standard Webhooks secret (whsec_<base64>) that signs your webhooks"},
    )


def secrets() -> WebhookSecrets:
    services = current_app.extensions["aiorch"]
    return WebhookSecrets(services.db, services.settings)


@blp.after_request
def _not_cached(response: Response) -> Response:
    # A secret must not linger in a proxy's or a browser's cache.
    response.headers["Cache-Control"] = "no-store"
    return response


@blp.route("/secret")
class Secret(MethodView):
    @blp.response(200, WebhookSecretSchema)
    def get(self) -> dict[str, str]:
        """Your webhook signing secret"""
        return {"secret": secrets().current(g.client_id)}


@blp.route("/secret/rotate")
class SecretRotation(MethodView):
    @blp.response(200, WebhookSecretSchema)
    def post(self) -> dict[str, str]:
        """Rotate your webhook signing secret (the old one keeps signing for the grace period)"""
        return {"secret": secrets().rotate(g.client_id)}
