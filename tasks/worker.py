"""Entry point for ``celery -A tasks.worker`` (and ``aiorch worker``): the app from the environment."""

from config import Settings
from config.logs import configure_logging
from tasks.celery_app import create_celery

settings = Settings.from_env()
configure_logging(settings.log_level, settings.log_json)
celery = create_celery(settings)
