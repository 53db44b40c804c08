"""``GET /``: the dashboard, plain files shipped in the package (``anyad/dashboard``).

The page and its assets hold no data, so they are served without an API key; everything
the page shows comes from the API, with the key the person types in.
"""

from __future__ import annotations

from importlib import resources

from aiohttp import web

ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
_cache: dict[str, bytes] = {}


def _read(name: str) -> bytes:
    data = _cache.get(name)
    if data is None:
        data = _cache[name] = resources.files("anyad.dashboard").joinpath(name).read_bytes()
    return data


async def index(request: web.Request) -> web.Response:
    return web.Response(body=_read("index.html"), content_type="text/html", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return web.Response(body=_read(name), content_type=ASSETS[name], charset="utf-8",
                        headers={"Cache-Control": "no-cache"})
