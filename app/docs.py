"""The interactive API docs' assets, served from the installed ``swagger-ui-bundle`` package.

``/v1/docs`` (flask-smorest's Swagger UI page) loads its script and style from ``ASSETS_URL``, on
this server: the page renders on a machine with no internet, and no third-party host learns who
reads the docs. Only the bundle's own files are served, public like the page itself.
"""

from __future__ import annotations

from pathlib import Path

import swagger_ui_bundle
from flask import Blueprint, send_from_directory
from flask.typing import ResponseReturnValue

from app.errors import abort

ASSETS_URL = "/v1/docs/assets/"
BUNDLE_DIR = Path(swagger_ui_bundle.swagger_ui_path)
# The files the page (flask_smorest/spec/templates/swagger_ui.html) asks for, and their maps.
ASSETS = frozenset(
    name
    for name in (
        "swagger-ui.css",
        "swagger-ui-bundle.js",
        "swagger-ui-standalone-preset.js",
        "favicon-16x16.png",
        "favicon-32x32.png",
    )
    for name in (name, f"{name}.map")
    if (BUNDLE_DIR / name).is_file()
)

blp = Blueprint("docs_assets", __name__)


@blp.get(f"{ASSETS_URL}<name>")
def asset(name: str) -> ResponseReturnValue:
    if name not in ASSETS:
        abort(404, code="not_found", message="No such docs asset.")
    response = send_from_directory(BUNDLE_DIR, name, max_age=86400)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
