"""``GET /v1/models``: the models in the model store and the built-in engines, paged."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from marshmallow import Schema, fields, validate

from app.schemas import Blueprint
from app.services import current_services
from tasks.model_registry import list_models

blp = Blueprint("models", __name__, description="Operators: installed models")


class ModelQueryArgsSchema(Schema):
    type = fields.String(validate=validate.Length(max=32))
    size = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0))


@blp.route("/v1/models")
class Models(MethodView):
    @blp.arguments(ModelQueryArgsSchema, location="query")
    @blp.response(200)
    def get(self, args: dict[str, Any]) -> dict[str, Any]:
        """Models in the model store and built-in engines, paged"""
        entries = list_models(current_services().settings, args.get("type"))
        end = args["offset"] + args["size"]
        return {"data": entries[args["offset"] : end], "have_next": end < len(entries)}
