"""Entry point for ``celery -A tasks.worker`` (and ``aiorch worker``): the app from the environment."""

import os

from config import Settings
from config.logs import configure_logging
from tasks.celery_app import create_celery

# Files this process writes (outputs, checked inputs, broker folders, diagnostics) are its user's
# only. ``aiorch worker`` sets the same umask before it execs celery; this covers workers, beat and
# Flower started with ``celery -A tasks.worker`` directly (the Docker images do).
os.umask(0o077)

settings = Settings.from_env()
configure_logging(settings.log_level, settings.log_json)
celery = create_celery(settings)
