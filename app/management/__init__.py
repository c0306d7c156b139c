"""Operators' endpoints, one module (one Blueprint, one MethodView) per resource: ``/stats``,
``/diag/backends``, ``/v1/capabilities``, ``/v1/models`` and ``/metrics``. Their queries live in
``models.stats``; broker questions (queue depths, the workers' answers) are asked here."""

from __future__ import annotations

from app.management import backends, capabilities, metrics, model_list, stats

BLUEPRINTS = (stats.blp, backends.blp, capabilities.blp, model_list.blp, metrics.blp)
