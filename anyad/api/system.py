"""Liveness, readiness and the model list: cheap, never waiting on a model."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from anyad import __version__
from anyad.access import identity
from anyad.errors import ModelNotFound
from anyad.server import DAEMON


async def health(request: web.Request) -> web.Response:
    state = "draining" if request.app[DAEMON].draining else "ok"
    return web.json_response({"status": state, "version": __version__})


async def ready(request: web.Request) -> web.Response:
    ok, models = request.app[DAEMON].ready()
    return web.json_response({"ready": ok, "models": models}, status=200 if ok else 503)


def _visible_models(request: web.Request) -> list[dict[str, Any]]:
    daemon = request.app[DAEMON]
    ident = identity(request)  # a key sees only the models it may use
    return [{"id": m.id, "object": "model", "created": m.created, "owned_by": m.owned_by, **m.meta,
             **({"source": daemon.sources[m.id]} if m.id in daemon.sources else {})}
            for m in daemon.router.models() if ident.may_use(m.id)]


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _visible_models(request)})


async def get_model(request: web.Request) -> web.Response:
    """One model of the list; one this key may not use is as absent as an unknown one."""
    model_id = request.match_info["id"]
    for m in _visible_models(request):
        if m["id"] == model_id:
            return web.json_response(m)
    raise ModelNotFound(f"The model {model_id[:200]!r} does not exist", param="model")


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, made off the event loop: NVML and psutil can take milliseconds."""
    from anyad.metrics import CONTENT_TYPE

    daemon = request.app[DAEMON]
    body = await asyncio.to_thread(daemon.metrics.render, daemon, daemon.in_flight)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def status(request: web.Request) -> web.Response:
    """Loaded models and their queues, circuit breakers, offline state."""
    return web.json_response(request.app[DAEMON].status())
