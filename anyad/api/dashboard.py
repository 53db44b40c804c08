"""``GET /``: the dashboard, plain files shipped in the package (``anyad/dashboard``).

The page and its assets hold no data, so they are served without an API key; everything
the page shows comes from the API, with the key the person types in.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from aiohttp import web

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# Nothing from anywhere else, no inline script, no framing: a hostile page cannot borrow this one.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
_cache: dict[str, bytes] = {}


def _read(name: str) -> bytes:
    data = _cache.get(name)
    if data is None:
        data = resources.files("anyad.dashboard").joinpath(name).read_bytes()
        if name == "index.html":
            # The assets' URLs carry their content's hash, so they can be cached for good.
            for asset_name in ASSETS:
                digest = hashlib.sha256(_read(asset_name)).hexdigest()[:12]
                data = data.replace(f"/ui/{asset_name}\"".encode(), f"/ui/{asset_name}?v={digest}\"".encode())
        _cache[name] = data
    return data


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_read("index.html"), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff"})


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    # Asked for by its hash (from the page): cached for a year; by its bare name: checked each time.
    cache = "public, max-age=31536000, immutable" if request.query.get("v") else "no-cache"
    return web.Response(body=_read(name), content_type=ASSETS[name], charset="utf-8",
                        headers={"Cache-Control": cache, "Content-Security-Policy": CSP,
                                 "X-Content-Type-Options": "nosniff"})
