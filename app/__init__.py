"""The Flask API: app factory, blueprints, auth and errors. Never imports the engines or torch."""

from __future__ import annotations

from typing import TYPE_CHECKING

from config import Settings

if TYPE_CHECKING:
    from celery import Celery
    from flask import Flask


def create_app(settings: Settings | None = None, celery: Celery | None = None) -> Flask:
    # Imported here, not at module level: ``python -m app.cli`` imports this package first, and
    # the gunicorn master (and every other CLI command) need not carry the whole web stack.
    from flask import Flask

    from app import assets, batches, blocking, docs, jobs, provider_webhooks, streams, system, webhook_secrets
    from app.auth import authenticate
    from app.errors import JsonApi, register_error_handlers
    from app.management import BLUEPRINTS as MANAGEMENT
    from app.schemas import JobIdConverter, StrictJSONProvider, max_body_bytes
    from app.services import Services

    settings = settings or Settings.from_env()
    app = Flask("aiorch")
    app.config.update(
        API_TITLE="aiorch",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="docs",
        # Swagger UI from the installed swagger-ui-bundle package (app/docs.py): no CDN, so the
        # docs render offline.
        OPENAPI_SWAGGER_UI_URL=docs.ASSETS_URL,
        # Nor Swagger UI's default badge from its online validator.
        OPENAPI_SWAGGER_UI_CONFIG={"validatorUrl": None},
        MAX_CONTENT_LENGTH=max_body_bytes(settings.max_input_bytes),
        JSON_SORT_KEYS=False,
    )
    app.json = StrictJSONProvider(app)
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["aiorch"] = Services.build(settings, celery)
    api = JsonApi(app, spec_kwargs={"info": {"description": "Self-hosted AI image job platform"}})
    api.spec.components.security_scheme("ApiKey", {"type": "apiKey", "in": "header", "name": "X-API-Key"})
    api.spec.components.security_scheme("Bearer", {"type": "http", "scheme": "bearer"})
    api.spec.options["security"] = [{"ApiKey": []}, {"Bearer": []}]
    app.url_map.converters["job_id"] = JobIdConverter
    api.register_converter(JobIdConverter, lambda _converter: JobIdConverter.SCHEMA)
    api.register_blueprint(jobs.blp)
    api.register_blueprint(jobs.legacy)
    batches.register(api)  # /v1/jobs/batch, /v1/jobs/cancel, /v1/batches/{batch_id}
    for resource in MANAGEMENT:  # /stats, /diag/backends, /v1/capabilities, /v1/models, /metrics
        api.register_blueprint(resource)
    api.register_blueprint(blocking.blp)
    api.register_blueprint(streams.blp)  # /v1/jobs/{job_id}/events, /v1/events
    api.register_blueprint(webhook_secrets.blp)
    api.register_blueprint(assets.blp)
    api.register_blueprint(system.blp)  # /healthz, /readyz, /files/{name}: in the spec too
    app.register_blueprint(docs.blp)
    app.register_blueprint(provider_webhooks.blp)
    # Authentication first: nothing may read a body before the key is checked (app/auth.py).
    app.before_request(authenticate)
    app.before_request(_json_without_content_type)
    register_error_handlers(app)
    return app


def _json_without_content_type() -> None:
    """``curl -d '{...}'`` sends JSON labelled as a form. A body that starts like a JSON object is
    read as JSON instead of being silently seen as empty (which would name every field missing)."""
    from flask import g, request

    if "client_id" not in g or request.method not in ("POST", "PUT", "PATCH") or request.is_json:
        return  # without a client (public or unknown URLs) no body is read here
    if request.mimetype not in ("", "application/x-www-form-urlencoded", "text/plain"):
        return
    head = request.get_data(cache=True)[:64].lstrip()
    if head.startswith(b"{"):
        request.environ["CONTENT_TYPE"] = "application/json"
        for cached in ("_parsed_content_type", "mimetype", "mimetype_params", "content_type"):
            request.__dict__.pop(cached, None)  # werkzeug caches the parsed header
