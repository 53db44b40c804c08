"""Every hook a plugin may implement, in one place.

A plugin is a module (or object) with functions named like these, marked with
``@anyad.hookimpl``, found through the entry-point group ``anyad.plugins`` and run
only when its name is in ``[plugins] enabled``. A hook may be a plain function or
``async def``. Arguments are passed by name; a hook may accept any subset of them.

Failures: a hook that raises is logged and the request goes on, except the two that
guard a request (``anyad_before_request``, ``anyad_remote_request``): there a crash
fails the request with a 500 in OpenAI's error shape (a guard that breaks must not let
the request through), and an ``anyad.errors.AnyadError`` raised on purpose is the
refusal the client gets (e.g. ``anyad.errors.Forbidden("not on Sundays")``).

What a plugin may rely on of the ``daemon`` the hooks receive is ``DaemonSurface``
below: its settings, its models and routes, and the local models' state as
``daemon.scheduler.snapshot()`` gives it (frozen ``anyad.scheduler.ModelView`` copies:
state, placement, memory estimated and measured, slots, queue, keep-alive, last use).
Anything else on the daemon (``scheduler.models`` included) is its own working state
and may change between versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Protocol

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from anyad.backend import Backend
    from anyad.config import Settings
    from anyad.router import Router, Target
    from anyad.scheduler import ModelView
    from anyad.stream import ChatRequest, Chunk, Usage

PROJECT = "anyad"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class SchedulerSurface(Protocol):
    def snapshot(self, *, measure: bool = False) -> Mapping[str, ModelView]:
        """Every local model now, by name. ``measure``: also ask the device what each worker
        process holds (blocking, milliseconds: call it from a thread)."""
        ...

    def view(self, name: str, *, measure: bool = False) -> ModelView | None:
        """One local model now (None: no such local model)."""
        ...


class PluginsSurface(Protocol):
    def options(self, name: str) -> dict[str, Any]:
        """The table ``[plugins.<name>]`` of the config."""
        ...


class DaemonSurface(Protocol):
    """The stable part of the ``daemon`` a hook receives. To serve a listener of its own,
    a plugin hands the daemon as it is to ``anyad.server.gateway_app`` (keys, limits,
    errors and accounting as on the main listener)."""

    @property
    def settings(self) -> Settings:
        """The configuration in force (a reload may replace it: read it when needed)."""
        ...

    @property
    def scheduler(self) -> SchedulerSurface:
        """The local models' state: ``snapshot()`` and ``view(name)``."""
        ...

    @property
    def router(self) -> Router:
        """``models()`` (what ``/v1/models`` lists) and ``resolve(name)`` (a name's targets)."""
        ...

    @property
    def local(self) -> Mapping[str, Backend]:
        """The local models' backends, by name."""
        ...

    @property
    def plugins(self) -> PluginsSurface:
        ...

    @property
    def started_at(self) -> float:
        """When the daemon started (``time.time()``)."""
        ...


@dataclass(slots=True)
class ExchangeRecord:
    """What ``anyad_after_reply`` sees: one whole exchange."""

    request: ChatRequest
    endpoint: str
    request_id: str
    backend: str | None  # the target that answered; None when none did
    reply: dict[str, Any] | None  # the assistant message
    finish_reason: str | None  # stop, length, tool_calls…, or cancelled / error
    usage: Usage | None
    cache: str | None
    conversation_id: str | None
    latency_s: float


@hookspec
def anyad_startup(daemon: "DaemonSurface", config: dict[str, Any]) -> None:
    """The daemon has started. ``config``: this plugin's own table, ``[plugins.<name>]``."""


@hookspec
def anyad_shutdown(daemon: "DaemonSurface") -> None:
    """The daemon is stopping (after the drain, before the database closes)."""


@hookspec
def anyad_register_routes(register: Callable[[str, str, Callable[["web.Request"], Any]], None]) -> None:
    """Add HTTP routes: ``register(method, path, handler)`` with an aiohttp handler.
    The routes sit behind the same API keys, limits and error handling as the rest."""


@hookspec
def anyad_register_backends(register: Callable[[str, type], None]) -> None:
    """Add backend kinds: ``register(kind, cls)`` with an ``anyad.backend.Backend``
    subclass; a model or provider then names it with ``backend = "<kind>"``."""


@hookspec
def anyad_before_request(request: "ChatRequest", endpoint: str, daemon: "DaemonSurface") -> "ChatRequest | None":
    """Before a chat request is routed, once the access layer admitted it (a request the key
    may not make, for its model or its quota, never gets here). Return a changed request (or
    None to keep it; a model changed is held to the key's model patterns too); raise an
    ``AnyadError`` to refuse it. ``endpoint``: the path it came in on."""


@hookspec
def anyad_remote_request(request: "ChatRequest", target: "Target", daemon: "DaemonSurface") -> "ChatRequest | None":
    """Just before a request leaves the machine for a remote provider (each remote target
    of a route, fallbacks included); local models never pass here. Return a changed
    request (or None to keep it: never change the one given, a later local target must
    still see it as it was); raise ``anyad.errors.Unavailable`` to skip this target (the
    route goes on), another ``AnyadError`` to refuse the request."""


@hookspec
def anyad_stream_chunk(chunk: "Chunk", request: "ChatRequest", backend: str) -> "Chunk | None":
    """Each chunk of a reply as it goes to the client (streamed or not). Return a changed
    chunk or None to keep it. Called per token: keep it cheap."""


@hookspec
def anyad_after_reply(exchange: "ExchangeRecord") -> None:
    """A reply is complete (or was cut off): the whole exchange, after it was sent."""
