"""Content safety checks that need no model: a configurable prompt blocklist.

Output checks (a safety-checker model shipped with a diffusers pipeline) live with the pipeline in
``inference/diffusion/loader.py``; both refuse with ``ContentRejected``, so the job ends ``rejected`` and
``error.code`` says which check refused it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from inference.base import ContentRejected


def check_prompt(texts: Iterable[str | None], blocklist: Iterable[str], *, field: str = "prompt") -> None:
    """Refuse when any text contains a blocked word or phrase (whole words, any case)."""
    terms = [t for t in blocklist if t]
    if not terms:
        return
    # Whole-word matching: "ass" must not refuse "glass", but a phrase may span spaces.
    pattern = re.compile(r"\b(" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE)
    for text in texts:
        if text and pattern.search(text):
            raise ContentRejected(f"the {field} contains a blocked term", code="prompt_blocked", field=field)
