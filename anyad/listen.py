"""Every listener's socket: ``listen()`` starts an aiohttp app on host:port behind a guard
against slow clients and floods.

aiohttp bounds neither the time a client may take to send a request head nor a body that
stops arriving, and accepts connections until the process runs out of file descriptors; a
few hundred clients trickling one header line every few seconds then hold every socket and
``/health`` goes dark. The guard wraps aiohttp's own protocol (one per connection): it
admits a connection only under the per-client and total caps, closes one whose request head
is not complete in time, and fails a body that stalls with 408. Idle keep-alive connections
stay aiohttp's business (its keepalive_timeout, from server.keepalive_timeout_s).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import aiohttp
from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from anyad import errors
from anyad.config import ServerSettings

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no rlimits
    resource = None  # type: ignore[assignment]  # the module or None: callers test it first

log = logging.getLogger("anyad.listen")

# File descriptors kept free of client connections: model files, the database, worker
# pipes, connections to providers, log files.
FD_RESERVE = 256
# Where the hard limit is "unlimited" (macOS), the most the kernel takes for the soft one.
_UNLIMITED_FALLBACK = 10240


def raise_open_file_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; the soft limit now in force.

    Distributions start services with a soft limit of 1024 while allowing far more: every
    client connection is a file descriptor, so the default would cap the daemon at about
    a thousand clients whatever its other limits say.
    """
    if resource is None:  # pragma: no cover
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (hard, _UNLIMITED_FALLBACK):
        if target == resource.RLIM_INFINITY or (soft != resource.RLIM_INFINITY and target <= soft):
            continue
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue
        log.debug("open-file limit raised from %s to %s", soft, target)
        return target
    return soft


def open_file_limit() -> int | None:
    """The soft RLIMIT_NOFILE in force; None where there is none."""
    if resource is None:  # pragma: no cover
        return None
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(wanted: int, open_files: int | None) -> int:
    """``wanted`` open connections, or fewer where ``open_files`` (the file limit) would
    not leave room for the daemon's own files beside them."""
    if open_files is None:
        return wanted
    return max(1, min(wanted, max(open_files // 2, open_files - FD_RESERVE)))


class Census:
    """Open client connections per address. One for the whole process, since the file
    descriptors they hold are the process's whichever listener accepted them."""

    def __init__(self) -> None:
        self.by_client: Counter[str] = Counter()
        self.total = 0

    def admit(self, client: str, per_client: int, total: int) -> bool:
        if self.total >= total or self.by_client[client] >= per_client:
            return False
        self.by_client[client] += 1
        self.total += 1
        return True

    def leave(self, client: str) -> None:
        self.total -= 1
        self.by_client[client] -= 1
        if self.by_client[client] <= 0:
            del self.by_client[client]


CENSUS = Census()


@dataclass(frozen=True)
class Limits:
    header_timeout_s: float
    body_timeout_s: float
    per_client: int
    total: int
    census: Census = CENSUS

    @classmethod
    def of(cls, server: ServerSettings) -> "Limits":
        return cls(server.header_timeout_s, server.body_timeout_s, server.max_connections_per_client,
                   connection_cap(server.max_connections, open_file_limit()))


class GuardedConnection(asyncio.Protocol):
    """One client connection: aiohttp's protocol inside, deadlines around it.

    The head deadline runs from the connection's opening, and again from the first byte of
    each later request's head, until aiohttp has parsed a complete head. The body deadline
    restarts with every piece of a body that arrives. It reads a few of aiohttp's
    RequestHandler attributes (the count of parsed heads, its wait for the next request, the
    request in progress), since aiohttp offers no hook for them.
    """

    def __init__(self, make: Callable[[], RequestHandler], limits: Limits) -> None:
        self._make = make
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._inner: RequestHandler | None = None
        self._client = ""
        self._head_timer: asyncio.TimerHandle | None = None
        self._heads_at_arm = 0
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._last_data = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        limits = self._limits
        if not limits.census.admit(self._client, limits.per_client, limits.total):
            log.debug("refused a connection from %s: over the connection caps", self._client or "a local socket")
            transport.close()
            return
        self._inner = inner = self._make()
        inner.connection_made(transport)
        self._arm_head(inner)

    def connection_lost(self, exc: BaseException | None) -> None:
        inner, self._inner = self._inner, None
        if inner is None:  # refused at the door: never counted
            return
        self._limits.census.leave(self._client)
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._body = None
        inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        inner = self._inner
        if inner is None:
            return
        heads = inner._request_count
        inner.data_received(data)
        self._last_data = self._loop.time()
        if inner._request_count != heads:
            self._disarm_head()
            self._watch_body(inner)
        elif data and self._head_timer is None and (self._body is None or self._body.is_eof()):
            self._arm_head(inner)  # no body is arriving: these are the first bytes of the next head

    def eof_received(self) -> None:
        # aiohttp's handler returns None (not True): the transport closes once the client's half does.
        if self._inner is not None:
            self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def _arm_head(self, inner: RequestHandler) -> None:
        self._heads_at_arm = inner._request_count
        self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_due)

    def _disarm_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_due(self) -> None:
        self._head_timer = None
        inner = self._inner
        # aiohttp may also parse a buffered head on its own (after a pause in reading).
        if inner is None or inner._request_count != self._heads_at_arm:
            return
        if not _waiting_for_request(inner):
            # A head sent ahead while the previous reply is still going: never cut that
            # reply; look again a period later.
            self._head_timer = self._loop.call_later(self._limits.header_timeout_s, self._head_due)
            return
        log.debug("closed a connection from %s: no complete request head within %ss",
                  self._client, self._limits.header_timeout_s)
        inner.force_close()

    def _watch_body(self, inner: RequestHandler) -> None:
        # The newest head's body is the one still arriving; those before it are complete.
        payload = inner._messages[-1][1] if inner._messages else None
        if payload is None or payload.is_eof():
            return
        self._body = payload
        if self._body_timer is None:
            self._body_timer = self._loop.call_later(self._limits.body_timeout_s, self._body_due)

    def _body_due(self) -> None:
        self._body_timer = None
        inner, body = self._inner, self._body
        if inner is None or body is None or body.is_eof():
            self._body = None
            return
        now = self._loop.time()
        if getattr(inner, "_reading_paused", False):
            # Not the client's stall: the handler has not read what came, so aiohttp stopped reading.
            self._last_data = now
        due = self._last_data + self._limits.body_timeout_s
        if now < due:
            self._body_timer = self._loop.call_at(due, self._body_due)
            return
        self._body = None
        log.debug("request body from %s stalled for %ss", self._client, self._limits.body_timeout_s)
        if inner._current_request is None:  # answered already; aiohttp was only draining the rest
            inner.force_close()
            return
        # The handler's read fails with 408 in the door's error shape; the connection ends
        # after that reply, since the rest of the body may still come.
        body.set_exception(errors.RequestTimeout(
            f"the request body stopped arriving: nothing for {self._limits.body_timeout_s:g} s"))
        body.feed_eof()
        inner.close()


# What GuardedConnection reads of aiohttp's RequestHandler. Should an aiohttp release drop
# one, the daemon serves without the guard (and says so) rather than fail every connection.
_HANDLER_PARTS = ("_request_count", "_waiter", "_messages", "_current_request", "force_close", "close")
GUARD_SUPPORTED = all(hasattr(RequestHandler, a) for a in _HANDLER_PARTS)


def _waiting_for_request(inner: RequestHandler) -> bool:
    waiter = inner._waiter
    return waiter is not None and not waiter.done()


class _GuardedSite(web.BaseSite):
    """A TCP site whose connections are each a GuardedConnection around aiohttp's protocol."""

    __slots__ = ("_host", "_port", "_limits")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, limits: Limits, backlog: int) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._limits = host, port, limits

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        limits = self._limits
        self._server = await asyncio.get_running_loop().create_server(
            lambda: GuardedConnection(server, limits), self._host or None, self._port, backlog=self._backlog)



async def listen(app: web.Application, host: str, port: int, server: ServerSettings, *, label: str = "",
                 shutdown_timeout: float = 1.0, backlog: int = 1024) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` on host:port under ``server``'s connection limits: its runner (whose
    ``cleanup()`` stops it) and the address it is bound to (the real port when ``port`` is 0).

    A socket that cannot be bound is a ConfigError naming host:port, after ``label``
    (e.g. "plugins.ollama: ").
    """
    # handler_cancellation: a client that hangs up cancels its request, which stops
    # generation in the worker instead of finishing a reply nobody reads.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout,
                           keepalive_timeout=server.keepalive_timeout_s)
    await runner.setup()
    site: web.BaseSite
    if GUARD_SUPPORTED:
        site = _GuardedSite(runner, host, port, Limits.of(server), backlog)
    else:  # pragma: no cover - an aiohttp whose internals moved
        log.warning("this aiohttp (%s) lacks what the slow-client guard reads: no header/body timeouts or "
                    "connection caps on %s:%s", getattr(aiohttp, "__version__", "?"), host, port)
        site = web.TCPSite(runner, host, port, backlog=backlog)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise errors.ConfigError(f"{label}cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return runner, _bound(site, host, port)


def _bound(site: web.BaseSite, host: str, port: int) -> tuple[str, int]:
    server = getattr(site, "_server", None)  # aiohttp keeps the bound sockets here
    socks = server.sockets if server is not None else ()
    return tuple(socks[0].getsockname()[:2]) if socks else (host, port)

