"""Webhooks that remote providers push to us (Zhinian's signed job events).

No API key here: the provider's signature over the raw body is the authentication, checked
through the task layer (the app never imports the provider clients). A verified event only
triggers an immediate poll on the cpu queue; the worker downloads and stores the outputs.
"""

from __future__ import annotations

from flask import Blueprint, current_app, request
from flask.typing import ResponseReturnValue

from app.errors import abort

blp = Blueprint("provider_webhooks", __name__)


@blp.post("/v1/providers/zhinian/webhook")
def zhinian_webhook() -> ResponseReturnValue:
    from tasks.remote.webhooks import WebhookRefused, handle_zhinian_webhook

    svc = current_app.extensions["aiorch"]
    try:
        outcome = handle_zhinian_webhook(
            svc.settings,
            svc.db,
            svc.celery,
            request.get_data(cache=False),
            request.headers.get("X-Zhinian-Signature"),
        )
    except WebhookRefused as exc:
        abort(exc.status, code=exc.code, message=exc.message)
    # 202 when a poll was scheduled, 200 when there was nothing to do: both stop the retries.
    return {"status": outcome}, 202 if outcome == "scheduled" else 200
