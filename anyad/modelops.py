"""Operations on local models that any door offers: load, unload, what is loaded, and
how long a request may keep a model loaded.

The admin API (``POST /api/models/{id}/load|unload``) and the Ollama door (an empty chat
loads, ``keep_alive: 0`` unloads, ``/api/ps``) both call these, so a key's model
patterns and role hold the same way on every listener. Which paths need an admin key
is the access layer's business (``anyad.access.ADMIN_PATHS``); what a key may do to a
model is decided here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from anyad.access import admit, identity
from anyad.errors import Forbidden, InvalidRequest, NotFound

if TYPE_CHECKING:
    from anyad.daemon import Daemon
    from anyad.placement import Placement


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A loaded local model, as a door lists it (from ``Scheduler.snapshot``, whose
    ``ModelView`` has the rest: memory, queues, last use)."""

    name: str
    placement: "Placement"
    keep_alive: float
    expires_at: float | None


@dataclass(frozen=True, slots=True)
class Unloaded:
    """What an unload does: "unloaded" now, "not_loaded", or "unloading" once the
    ``pending`` requests it is serving are done."""

    state: str
    pending: int = 0

    @property
    def status(self) -> int:
        return 202 if self.state == "unloading" else 200

    def body(self, model: str) -> dict[str, object]:
        out: dict[str, object] = {"model": model, "state": self.state}
        if self.state == "unloading":
            out["pending_requests"] = self.pending
            out["message"] = f"unloading after {self.pending} request(s) in progress"
        return out


def local_model(daemon: "Daemon", request: web.Request, name: str, *, route: bool = False) -> str | None:
    """The local model ``name`` stands for, once the request's key may use it (else 403).
    With ``route``, a route's first local target counts too (None when it has none);
    without, ``name`` must be a local model (else 404)."""
    admit(request, name)
    if name in daemon.local:
        return name
    if not route:
        raise NotFound(f"no local model {name!r}", param="id")
    for target in daemon.router.resolve(name):  # 404 for an unknown name
        if target.name in daemon.local:
            admit(request, target.name)
            return target.name
    return None


async def load(daemon: "Daemon", request: web.Request, name: str, *, route: bool = False) -> str | None:
    """Load the local model ``name`` stands for (see ``local_model``); returns it."""
    model = local_model(daemon, request, name, route=route)
    if model is not None:
        await daemon.scheduler.load(model)
    return model


async def unload(daemon: "Daemon", request: web.Request, name: str, *, route: bool = False) -> Unloaded:
    """Unload the local model ``name`` stands for: now, or once it is idle."""
    model = local_model(daemon, request, name, route=route)
    if model is None:
        return Unloaded("not_loaded")
    state, pending = await daemon.scheduler.unload_when_idle(model, why=f"asked by {identity(request).name}")
    return Unloaded(state, pending)


def loaded(daemon: "Daemon", request: web.Request) -> list[LoadedModel]:
    """The loaded local models the request's key may see."""
    ident = identity(request)
    return [LoadedModel(name, v.placement, v.keep_alive, v.expires_at)
            for name, v in daemon.scheduler.snapshot().items()
            if v.loaded and v.placement is not None and ident.may_use(name)]


def check_keep_alive(daemon: "Daemon", request: web.Request, model: str, keep_alive: float | None) -> None:
    """Only admin keys may keep a model loaded longer than it is configured to stay: a user
    key pinning a model for ever (``keep_alive: -1``) would hold the machine's memory."""
    if keep_alive is None or identity(request).admin:
        return
    if math.isnan(keep_alive):
        raise InvalidRequest("keep_alive is not a number", param="keep_alive")
    try:
        targets = daemon.router.resolve(model)
    except NotFound:
        return  # the request fails on its model name anyway
    for t in targets:
        v = daemon.scheduler.view(t.name)
        if v is not None and keep_alive > v.configured_keep_alive:
            configured = "for ever" if math.isinf(v.configured_keep_alive) else f"{v.configured_keep_alive:g} s"
            raise Forbidden(f"keep_alive: the key {identity(request).name!r} may not keep {t.name!r} loaded longer "
                            f"than it is configured to stay ({configured}); that takes an admin key",
                            param="keep_alive", code="keep_alive_not_allowed")
