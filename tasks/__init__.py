"""The Celery side: app and queue topology, the job pipeline tasks, webhooks and sweeps.

Importing this package does not import the engines or torch; the API imports it to publish.
"""
