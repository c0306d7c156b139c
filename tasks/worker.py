"""Entry point for ``celery -A tasks.worker`` (and ``aiorch worker``): the app from the environment,
with every task of the platform registered.

Each module of ``celery_app.TASK_MODULES`` is imported here, so whatever loads this app (a worker,
beat, Flower, ``celery inspect``) knows every task by its name; a test holds the two lists equal.
"""

import os

import tasks.diag  # noqa: F401  (the worker's inspect command and status files)
import tasks.events  # noqa: F401
import tasks.prepare  # noqa: F401
import tasks.remote.poll  # noqa: F401
import tasks.remote.submit  # noqa: F401
import tasks.revocation  # noqa: F401  (a revoke of a job's task cancels the job)
import tasks.run  # noqa: F401
import tasks.scheduling  # noqa: F401  (a worker's slots, and filling them fairly)
import tasks.sweeps  # noqa: F401
import tasks.warmup  # noqa: F401  (the pool children's engine imports)
import tasks.webhooks  # noqa: F401
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
