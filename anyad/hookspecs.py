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
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import pluggy

if TYPE_CHECKING:
    from aiohttp import web

    from anyad.daemon import Daemon
    from anyad.plugin_manager import ExchangeRecord
    from anyad.router import Target
    from anyad.stream import ChatRequest, Chunk

PROJECT = "anyad"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def anyad_startup(daemon: "Daemon", config: dict[str, Any]) -> None:
    """The daemon has started. ``config``: this plugin's own table, ``[plugins.<name>]``."""


@hookspec
def anyad_shutdown(daemon: "Daemon") -> None:
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
def anyad_before_request(request: "ChatRequest", endpoint: str, daemon: "Daemon") -> "ChatRequest | None":
    """Before a chat request is routed. Return a changed request (or None to keep it);
    raise an ``AnyadError`` to refuse it. ``endpoint``: the path it came in on."""


@hookspec
def anyad_remote_request(request: "ChatRequest", target: "Target", daemon: "Daemon") -> "ChatRequest | None":
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
