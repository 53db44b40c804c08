"""Liveness, readiness and the model list: cheap, never waiting on a model."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from anyad import __version__
from anyad.daemon import DAEMON, Daemon
from anyad.errors import ModelNotFound
from anyad.metrics import CONTENT_TYPE
from anyad.request_context import identity


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


def scrape(daemon: Daemon, in_flight: int) -> bytes:
    """The metrics text, from the scheduler's snapshot, the devices and the breakers now.
    Blocking (NVML and psutil can take milliseconds): run it in a worker thread."""
    probe, router = daemon.probe, daemon.router
    devices = probe.snapshot() if probe is not None else None
    breakers = {target: b.state == "open" for target, b in list(router.breakers.items())}
    return daemon.metrics.render(daemon.scheduler.snapshot(measure=True), devices, breakers,
                                 router.connectivity.offline, in_flight)


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text, made off the event loop."""
    daemon = request.app[DAEMON]
    body = await asyncio.to_thread(scrape, daemon, daemon.in_flight)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def status(request: web.Request) -> web.Response:
    """Loaded models and their queues, circuit breakers, offline state."""
    return web.json_response(request.app[DAEMON].status())


async def timeline(request: web.Request) -> web.Response:
    """The last hour in steps, for the dashboard's charts (``anyad.timeline``), its gauges
    sampled now (off the event loop: NVML and psutil reads take a moment)."""
    daemon = request.app[DAEMON]
    await asyncio.to_thread(daemon.sample_gauges)
    return web.json_response(daemon.metrics.timeline.json())
