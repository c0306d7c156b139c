"""``GET /v1/models``: the models in the model store and the built-in engines, paged;
``DELETE /v1/models/{id}``: a model a client trained, by its owner or an admin.

A client sees the operator's models and its own (a LoRA it trained), never another client's: that
one is answered exactly like a model that does not exist. An admin key sees every model, with its
``owner``. An entry is the store's manifest entry without where its files are: no response shows a
filesystem path (contract v1.1), so ``path`` goes, and so does any ``extra`` value that is one."""

from __future__ import annotations

from typing import Any

from flask.views import MethodView
from marshmallow import Schema, fields, validate

from app.auth import job_scope
from app.errors import abort
from app.schemas import Blueprint
from app.services import current_services
from tasks.model_registry import ModelNotFound, ModelStoreError, list_models, remove_model

blp = Blueprint("models", __name__, description="Operators: installed models")

HIDDEN = ("path",)  # manifest fields that say where the files are


def public_model(entry: dict[str, Any]) -> dict[str, Any]:
    """A manifest entry as the API shows it: no file system path anywhere in it."""
    shown = {name: value for name, value in entry.items() if name not in HIDDEN}
    extra = shown.get("extra")
    if isinstance(extra, dict):
        # File names relative to the model (a detector's labels file) are kept; absolute ones go.
        shown["extra"] = {
            name: value
            for name, value in extra.items()
            if not (isinstance(value, str) and value.startswith(("/", "~", "\\")))
        }
    return shown


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
        entries = list_models(current_services().settings, args.get("type"), job_scope())
        end = args["offset"] + args["size"]
        page = entries[args["offset"] : end]
        return {"data": [public_model(entry) for entry in page], "have_next": end < len(entries)}


@blp.route("/v1/models/<string:model_id>")
class Model(MethodView):
    @blp.response(204)
    def delete(self, model_id: str) -> None:
        """Remove a model a client trained (its owner or an admin), with its files; an admin also
        removes an operator's model from the manifest (its files stay)"""
        try:
            remove_model(current_services().settings, model_id, job_scope())
        except ModelNotFound:
            abort(404, code="not_found", message=f"No model with id {model_id!r}.")
        except ModelStoreError as exc:
            abort(403, code="forbidden", message=str(exc))
