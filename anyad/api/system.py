"""Liveness, readiness and the model list: cheap, never waiting on a model."""

from __future__ import annotations

import asyncio

from aiohttp import web

from anyad import __version__
from anyad.access import identity
from anyad.server import DAEMON


async def health(request: web.Request) -> web.Response:
    state = "draining" if request.app[DAEMON].draining else "ok"
    return web.json_response({"status": state, "version": __version__})


async def ready(request: web.Request) -> web.Response:
    ok, models = request.app[DAEMON].ready()
    return web.json_response({"ready": ok, "models": models}, status=200 if ok else 503)


async def list_models(request: web.Request) -> web.Response:
    daemon = request.app[DAEMON]
    ident = identity(request)  # a key sees only the models it may use
    data = [{"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by, **m.meta,
             **({"source": daemon.sources[m.id]} if m.id in daemon.sources else {})}
            for m in daemon.router.models() if ident.may_use(m.id)]
    return web.json_response({"object": "list", "data": data})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, made off the event loop: NVML and psutil can take milliseconds."""
    from anyad.metrics import CONTENT_TYPE

    daemon = request.app[DAEMON]
    body = await asyncio.to_thread(daemon.metrics.render, daemon, daemon.in_flight)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def status(request: web.Request) -> web.Response:
    """Loaded models and their queues, circuit breakers, offline state."""
    return web.json_response(request.app[DAEMON].status())
