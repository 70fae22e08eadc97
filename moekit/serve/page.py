"""The pages: static files shipped in the package (``moekit/serve/static``), no build step, nothing
fetched from another origin, served with a strict Content-Security-Policy (scripts and styles from
this origin only, no inline script, no framing).

``moekit serve`` answers ``/`` with the chat and routing page (``index.html``); ``moekit dashboard``
with the training dashboard (``dashboard.html``). ``/static/NAME`` serves the files of that folder
and nothing else. The pages are public (they hold no data); what they show comes from the JSON
endpoints, which need the server's key when it has one.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response

from moekit.serve.protocol import APIError

STATIC = Path(__file__).with_name("static")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "Cache-Control": "no-cache"}
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
#: Paths answered without the API key: the page and its files (they hold no data).
PUBLIC_PREFIXES = ("/static/",)
PUBLIC_PATHS = ("/",)


def _file(name: str) -> Response:
    path = STATIC / name
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix], headers=HEADERS)


def add_page(app: FastAPI, page: str) -> None:
    """Serve ``static/<page>`` at ``/`` and the folder's files at ``/static/NAME``."""
    files = {p.name for p in STATIC.iterdir() if p.suffix in _TYPES}  # a fixed list: no path is ever joined
    if page not in files:
        raise FileNotFoundError(f"page {page!r} is not in {STATIC}: one of {sorted(files)}")

    @app.get("/", include_in_schema=False)
    async def index():
        return _file(page)

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in files:
            raise APIError(404, f"no file {name!r} here", "not_found_error", code="not_found")
        return _file(name)
