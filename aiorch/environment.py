"""Where the client finds its server and key when the caller does not say.

This is the one place in ``aiorch/`` that reads the environment. The house rule "only config/
reads the environment" is about the server, whose settings are one typed object built in
``config/``; the client is a separate, light package (a script may install it without the
server), so it cannot lean on ``config.Settings``, and its two variables are no server setting.
"""

from __future__ import annotations

import os

DEFAULT_URL = "http://127.0.0.1:8000"


def default_url() -> str:
    """``AIORCH_URL``, else the platform's default address (``make run``)."""
    return os.environ.get("AIORCH_URL") or DEFAULT_URL


def default_key() -> str | None:
    """``AIORCH_API_KEY``, if set."""
    return os.environ.get("AIORCH_API_KEY") or None
