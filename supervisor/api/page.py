"""The status page: GET / (one HTML page) and its script and style under /static/, shipped in
the package (supervisor/api/static/). They hold no data, so they are served without the token;
the page asks for the token once and sends it with every API call (and as the `bearer.<token>`
subprotocol of the progress WebSocket). The Host and Origin checks apply as everywhere."""

from __future__ import annotations

from pathlib import Path

from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import NotFound

from supervisor.api.guard import without_token

STATIC = Path(__file__).resolve().parent / "static"
ASSETS = {"page.js": "text/javascript; charset=utf-8", "page.css": "text/css; charset=utf-8"}
# Only this page's own files run; nothing may frame it or send its forms elsewhere.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _page_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["Cache-Control"] = "no-cache"
    return response


def register_page(app: QuartTrio, *, token_required: bool) -> None:
    html = (STATIC / "index.html").read_text()
    if token_required:  # the page asks for the token before its first call
        html = html.replace('<html lang="en">', '<html lang="en" data-token="required">', 1)
    assets = {name: (STATIC / name).read_bytes() for name in ASSETS}

    @app.get("/")
    @without_token
    async def page() -> Response:
        return _page_headers(Response(html, content_type="text/html; charset=utf-8"))

    @app.get("/static/<name>")
    @without_token
    async def asset(name: str) -> Response:
        if name not in assets:
            raise NotFound()
        return _page_headers(Response(assets[name], content_type=ASSETS[name]))
