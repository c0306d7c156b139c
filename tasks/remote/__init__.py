"""Remote providers, on the cpu queue: a job whose route starts with a provider is submitted to the
route's first available backend, then polled until it is final.

- ``submit``: claim the job and hand it to the first backend that accepts it (or to a local engine
  where the route says ``local``), retrying later while every backend is unavailable;
- ``poll``: ask the provider (one batch call for every due job of that provider where it has one),
  re-publish with a countdown while the job runs, then store its checked outputs;
- ``webhooks``: a provider's signed push (Zhinian), which triggers one immediate poll;
- ``recovery``: the sweep's side, resuming a silent job's poll or submit;
- ``provider_inputs``: what a provider is sent (our checked copies of the inputs), and
  ``common``: clients, routes and deadlines, the poll schedule, and the end of a remote job.

Every fact a later step needs (the claim, the provider's id and name, the next poll's time) is
kept in Postgres rather than in memory, so a worker killed at any point is resumed, never repeated.
"""
