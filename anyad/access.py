"""Who may talk to the daemon: API keys and CORS.

``server.api_keys`` (secret references, resolved once at start) makes
``Authorization: Bearer <key>`` required everywhere except ``/health`` and ``/ready``
(what service managers probe) and CORS preflights; a missing or wrong key is a 401 in
OpenAI's error shape. Keys are compared as SHA-256 digests in constant time, and no key
ever reaches a log line. ``server.allowed_origins`` lists the browser origins that may
call the API (none by default; ``"*"`` only when configured); ``BrowserGuard`` refuses
every other origin, and foreign Host names on a loopback listener.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import TYPE_CHECKING, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from anyad import errors
from anyad.config import ServerSettings
from anyad.keys import ANONYMOUS, Identity, KeyRing
from anyad.request_context import IDENT, OPEN_PATHS, WHO, identity

if TYPE_CHECKING:
    from anyad.quotas import Quotas

# The dashboard's page and files: no data in them, and a browser cannot send a key for them.
DASHBOARD_PATHS = frozenset({"/", "/ui/app.js", "/ui/style.css"})
EXPOSED = "X-Request-Id, X-Anyad-Backend, X-Anyad-Cache, X-Anyad-Conversation-Id, X-Anyad-Fallback, Retry-After"


@functools.lru_cache(maxsize=256)  # asked twice per request (Host, bind address); parsing is not free
def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(server: ServerSettings, named_keys: bool = False) -> None:
    """Refuse to listen beyond this machine without API keys."""
    if not is_loopback(server.host) and not server.api_keys and not named_keys:
        raise errors.ConfigError(
            f"refusing to listen on {server.host} without API keys: anyone who can reach it could use your "
            "models and providers. Set server.api_keys (e.g. [\"keyring:anyad-client\"], stored with "
            "`anyad secrets set anyad-client`) or listen on 127.0.0.1")


# What only admin keys may use: the machine's details and the daemon's controls (the
# Ollama door's model store among them: pull, delete, copy, create and blob uploads).
ADMIN_PATHS = ("/api/status", "/api/timeline", "/metrics", "/api/models/", "/api/reload", "/api/audit",
               "/api/pull", "/api/delete", "/api/copy", "/api/create", "/api/blobs/")


def auth_middleware(current: Callable[[], KeyRing | None]) -> Middleware:
    """``current()``: the keys in force now (a reload may change them)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if request.method == "OPTIONS" or path in OPEN_PATHS or path in DASHBOARD_PATHS:
            return await handler(request)
        ring = current()
        if ring is not None:
            ring.refresh()
        if ring is None or not ring.has_keys:
            request[IDENT] = ANONYMOUS
            return await handler(request)
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not auth:  # Anthropic's SDKs (and the tools built on them) send their key so
            auth = token = request.headers.get("x-api-key", "").strip()
        ident = ring.identify(token) if token else None
        if ident is None:
            raise errors.Unauthorized("this anyad needs an API key: send Authorization: Bearer <key> (or "
                                      "x-api-key: <key>)" if not auth
                                      else "the API key is not valid (unknown, revoked or expired)",
                                      headers={"WWW-Authenticate": "Bearer"})
        request[IDENT] = ident
        request[WHO] = ident.name
        if not ident.admin and path.startswith(ADMIN_PATHS):
            raise errors.Forbidden(f"the key {ident.name!r} has the role {ident.role!r}; {path} needs an admin key")
        return await handler(request)

    return middleware


def admit(request: web.Request, model: str, quotas: "Quotas | None" = None) -> Identity:
    """The request's key, if it may use ``model`` (else 403 ``model_not_allowed``) and,
    when ``quotas`` is given (work is about to be done), is within them (else 429)."""
    ident = identity(request)
    if not ident.may_use(model):
        raise errors.ModelNotAllowed(f"the key {ident.name!r} may not use the model {model!r}", param="model")
    if quotas is not None:
        quotas.check(ident)
    return ident


def admit_unnamed(request: web.Request, doing: str) -> Identity:
    """The request's key, if it may do what names no model (upload or look up a blob, make a
    model of a file): no model pattern can admit that, so only a key held to none may (else
    403 ``model_not_allowed``). ``doing``: what is refused, for the message."""
    ident = identity(request)
    if ident.models:
        raise errors.ModelNotAllowed(f"the key {ident.name!r} is held to some models; {doing} names no model its "
                                     "patterns could admit, so it needs a key that is held to none")
    return ident


def host_name(host_header: str) -> str:
    """The name in a Host header, without its port or an IPv6 address's brackets."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h[1:]
    name, sep, port = h.rpartition(":")
    if sep and port.isdigit() and ":" not in name:
        h = name
    return h.rstrip(".")


def is_local_name(name: str) -> bool:
    """A name only this machine answers to: loopback addresses, localhost and ``*.localhost``
    (which browsers resolve to loopback themselves, RFC 6761)."""
    return is_loopback(name) or name.endswith(".localhost")


# A refused page's connection is closed at once: a web page opening keep-alive sockets
# from many *.localhost names would otherwise hold the listener's connection caps.
CLOSE = {"Connection": "close"}


class BrowserGuard:
    """What a web page in the user's browser may not do, checked on every request of every
    listener before anything else: name a foreign host (DNS rebinding) or come from a
    foreign origin (cross-site requests, simple ones included, which need no preflight).

    ``settings()``: the server settings in force (a reload changes the lists);
    ``bind_host()``: the address this listener is bound to.
    """

    def __init__(self, settings: Callable[[], ServerSettings], bind_host: Callable[[], str]) -> None:
        self.settings = settings
        self.bind_host = bind_host

    def check(self, request: web.Request) -> None:
        server = self.settings()
        host = request.headers.get("Host")
        if host is not None and is_loopback(self.bind_host()):
            name = host_name(host)
            if not is_local_name(name) and name not in (h.lower() for h in server.allowed_hosts):
                raise errors.Forbidden(f"the Host {host[:100]!r} is not this machine: anyad listens on a loopback "
                                       "address and answers only to loopback names and server.allowed_hosts",
                                       code="host_not_allowed", headers=dict(CLOSE))
        origin = request.headers.get("Origin")
        if origin is None:
            # No Origin: not a script's cross-site request; but a cross-site <img>, <script>
            # or <link> still says where it came from.
            if request.headers.get("Sec-Fetch-Site") == "cross-site" \
                    and request.headers.get("Sec-Fetch-Mode") not in (None, "navigate"):
                raise errors.Forbidden("cross-site requests are refused", code="origin_not_allowed",
                                       headers=dict(CLOSE))
            return
        if not self.origin_allowed(origin, request, server):
            raise errors.Forbidden(f"the origin {origin[:100]!r} is not in server.allowed_origins",
                                   code="origin_not_allowed", headers=dict(CLOSE))

    @staticmethod
    def origin_allowed(origin: str, request: web.Request, server: ServerSettings) -> bool:
        allowed = server.allowed_origins
        if "*" in allowed and origin != "null":
            return True
        if origin in allowed:
            return True
        # The dashboard's own requests: its page came from this very host and port.
        host = request.headers.get("Host")
        return host is not None and origin.lower() in (f"http://{host.lower()}", f"https://{host.lower()}")


def guard_middleware(guard: BrowserGuard) -> Middleware:
    """Refuses what ``guard`` refuses, then answers CORS preflights from allowed origins."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        guard.check(request)
        if request.method == "OPTIONS" and "Origin" in request.headers \
                and "Access-Control-Request-Method" in request.headers:
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600"})
        return await handler(request)

    return middleware


def cors_headers(current: Callable[[], ServerSettings]) -> Callable[[web.Request, web.StreamResponse],
                                                                   Awaitable[None]]:
    """An on_response_prepare hook: every reply to an allowed origin (streams and errors
    too, since it runs just before the headers go out) says so."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None:
            return
        if BrowserGuard.origin_allowed(origin, request, current()):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers["Vary"] = "Origin"

    return hook
