"""The Celery side: the app and its queues, the job's pipeline tasks, webhooks and sweeps.

- ``celery_app``: the app, queue topology, every task's name, ``publish``; ``worker``: the entry
  point that registers every task; ``runtime``: what a worker process holds, and ``JobTask``;
- the pipeline: ``next_step`` (the one decision of where a queued job goes next), ``prepare``
  (inputs fetched and checked, cpu), ``run`` (claim, engine, outputs, final status; ``batching``
  for small upscales), ``outputs`` (stored outputs and the result), ``remote/`` (submit to a
  provider, poll it, its webhooks), ``failures`` (the one mapping from exceptions to job errors);
- notifications and upkeep: ``events`` (the event log's dispatcher), ``webhooks`` (delivery),
  ``sweeps`` (expiry, lost messages, silent workers, retention), ``revocation`` (a Celery revoke
  of a job's task, from Flower, cancels the job);
- what they read: ``catalog`` and ``payloads`` (tasks and their schemas), ``engines``, ``inputs``,
  ``outbound`` (the SSRF guard), ``storage``, ``model_registry``; ``diag`` and ``warmup`` (workers).

Importing this package does not import the engines or torch; the API imports it to publish.
"""
