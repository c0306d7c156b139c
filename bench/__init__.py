"""Benchmarks (``make bench``, ``make bench-gpu``): dev tooling beside the product, never installed.

``python -m bench.run`` measures the job path against a raw Celery floor; ``python -m bench.gpu``
measures each GPU engine through a worker against the bare library call; both reuse the test
suite's ``Platform`` (tests/support/), which starts the API and workers as an operator would.
``python -m bench.encode`` times the output encoders the jobs use, in one process.
"""
