"""Liveness, readiness and the model list: cheap, never waiting on a model."""

from __future__ import annotations

from aiohttp import web

from anyad import __version__
from anyad.server import DAEMON


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "version": __version__})


async def ready(request: web.Request) -> web.Response:
    ok, models = request.app[DAEMON].ready()
    return web.json_response({"ready": ok, "models": models}, status=200 if ok else 503)


async def list_models(request: web.Request) -> web.Response:
    data = [{"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by, **m.meta}
            for m in request.app[DAEMON].router.models()]
    return web.json_response({"object": "list", "data": data})


async def status(request: web.Request) -> web.Response:
    """Loaded models and their queues, circuit breakers, offline state."""
    return web.json_response(request.app[DAEMON].status())
