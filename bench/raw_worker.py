"""Entry point for ``celery -A bench.raw_worker:app worker``: the floor's app from the environment,
configured the way ``tasks.worker`` configures the platform's workers."""

from bench.raw_celery import build
from config import Settings
from config.logs import configure_logging

settings = Settings.from_env()
configure_logging(settings.log_level, settings.log_json)
app = build(settings)
