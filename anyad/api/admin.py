"""Usage reports for every key, and the admin surface: ``GET /api/usage``,
``POST /api/models/{id}/load|unload``, ``POST /api/reload``."""

from __future__ import annotations

import asyncio

from aiohttp import web

from anyad import modelops
from anyad.daemon import DAEMON
from anyad.errors import Forbidden, InvalidRequest, Unavailable
from anyad.request_context import identity
from anyad.store import DB_NAME


async def usage(request: web.Request) -> web.Response:
    """A user key sees its own usage; an admin key anyone's (``?key=``)."""
    from anyad.store.usage import is_group_by, parse_time, report

    daemon = request.app[DAEMON]
    ident = identity(request)
    q = request.query
    key = q.get("key")
    if not ident.admin:
        if key is not None and key != ident.name:
            raise Forbidden(f"the key {ident.name!r} may see only its own usage", param="key")
        key = ident.name
    try:
        start = parse_time(q["from"]) if q.get("from") else None
        end = parse_time(q["to"]) if q.get("to") else None
    except ValueError as exc:
        raise InvalidRequest(f"from/to: {exc}", param="from") from None
    group_by = q.get("group_by", "day")
    if not is_group_by(group_by):
        raise InvalidRequest("group_by must be day, model or key", param="group_by")
    if daemon.store is not None:
        await asyncio.to_thread(daemon.store.flush)  # the report includes the requests just answered
    rows = await asyncio.to_thread(report, daemon.settings.resolved_data_dir / DB_NAME, key=key, model=q.get("model"),
                                   start=start, end=end, group_by=group_by)
    return web.json_response({"object": "list", "group_by": group_by, "data": rows})


async def load_model(request: web.Request) -> web.Response:
    model = await modelops.load(request.app[DAEMON], request, request.match_info["id"])
    return web.json_response({"model": model, "state": "loaded"})


async def unload_model(request: web.Request) -> web.Response:
    model = request.match_info["id"]
    done = await modelops.unload(request.app[DAEMON], request, model)
    return web.json_response(done.body(model), status=done.status)


async def reload(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    if daemon.load_settings is None:
        raise Unavailable("reloading needs a daemon started by `anyad serve`")
    ok = await daemon.reload_from(daemon.load_settings, actor=f"api:{identity(request).name}")
    if not ok:
        raise InvalidRequest("the new configuration was refused and the running one stays; see the daemon's log")
    return web.json_response({"reloaded": True})
