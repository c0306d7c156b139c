"""Stored files as HTTP answers: ``/files/<name>`` and ``/v1/assets/{id}/content``.

The API serves every stored file itself, whichever backend holds it: a local file is sent by the
web server (``send_file``: conditional requests and ranges); an object of an S3-compatible bucket
is streamed through in chunks as the bucket sends it, never held whole in memory, with its
length, ETag and Last-Modified, so conditional and range requests answer as for a local file. No
redirect to a presigned bucket URL: the URLs clients hold stay ours (``AIORCH_PUBLIC_URL``), the
bucket need not be reachable from clients, and ``Cache-Control: private`` is ours to set.
"""

from __future__ import annotations

import unicodedata
from urllib.parse import quote

from flask import Response, request, send_file
from werkzeug.wsgi import wrap_file

from tasks.storage import Blob


def stored_file_response(blob: Blob, mimetype: str, download_name: str | None = None) -> Response:
    if blob.path is not None:
        response = send_file(blob.path, mimetype=mimetype, conditional=True, download_name=download_name)
    else:
        assert blob.stream is not None  # a backend's Blob has a path or a stream
        response = Response(
            wrap_file(request.environ, blob.stream), mimetype=mimetype, direct_passthrough=True
        )
        response.content_length = blob.size
        if blob.last_modified is not None:
            response.last_modified = blob.last_modified
        if blob.etag:
            response.set_etag(blob.etag)
        if download_name is not None:
            response.headers.set("Content-Disposition", "inline", **_filename(download_name))
        response.make_conditional(request.environ, accept_ranges=True, complete_length=blob.size)
    # Private: a name (or a key) is the only protection of a tenant's file, so no shared cache (a
    # CDN, a corporate proxy) may keep a copy to hand to whoever asks next.
    response.headers["Cache-Control"] = "private"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _filename(name: str) -> dict[str, str]:
    """``Content-Disposition`` file name parameters, as ``send_file`` writes them (RFC 6266: an
    ASCII ``filename`` and, for other names, ``filename*`` in UTF-8)."""
    if name.isascii():
        return {"filename": name}
    simple = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii")
    return {"filename": simple, "filename*": f"UTF-8''{quote(name, safe='!#$&+-.^_`|~')}"}
