"""Who may talk to the daemon: API keys and CORS.

``server.api_keys`` (secret references, resolved once at start) makes
``Authorization: Bearer <key>`` required everywhere except ``/health`` and ``/ready``
(what service managers probe) and CORS preflights; a missing or wrong key is a 401 in
OpenAI's error shape. Keys are compared as SHA-256 digests in constant time, and no key
ever reaches a log line. ``server.allowed_origins`` lists the browser origins that may
call the API (none by default; ``"*"`` only when configured).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Awaitable, Callable

from aiohttp import web

from anyad import errors
from anyad.config import ServerSettings
from anyad.keys import ANONYMOUS, Identity, KeyRing

if TYPE_CHECKING:
    from anyad.quotas import Quotas

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health", "/ready"})
# The dashboard's page and files: no data in them, and a browser cannot send a key for them.
DASHBOARD_PATHS = frozenset({"/", "/ui/app.js", "/ui/style.css"})
WHO = web.RequestKey("who", str) if hasattr(web, "RequestKey") else "who"
IDENT = web.RequestKey("identity", Identity) if hasattr(web, "RequestKey") else "identity"
EXPOSED = "X-Request-Id, X-Anyad-Backend, X-Anyad-Cache, X-Anyad-Conversation-Id, X-Anyad-Fallback, Retry-After"


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


# What only admin keys may use: the machine's details and the daemon's controls.
ADMIN_PATHS = ("/api/status", "/metrics", "/api/models/", "/api/reload", "/api/audit")


def auth_middleware(current: Callable[[], KeyRing | None]) -> Callable[[web.Request, Handler],
                                                                       Awaitable[web.StreamResponse]]:
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
        ident = ring.identify(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
        if ident is None:
            raise errors.Unauthorized("this anyad needs an API key: send Authorization: Bearer <key>"
                                      if not auth else "the API key is not valid (unknown, revoked or expired)",
                                      headers={"WWW-Authenticate": "Bearer"})
        request[IDENT] = ident
        request[WHO] = ident.name
        if not ident.admin and path.startswith(ADMIN_PATHS):
            raise errors.Forbidden(f"the key {ident.name!r} has the role {ident.role!r}; {path} needs an admin key")
        return await handler(request)

    return middleware


def identity(request: web.Request) -> Identity:
    """The request's key (``ANONYMOUS`` where no keys are in force)."""
    return request.get(IDENT) or ANONYMOUS


def admit(request: web.Request, model: str, quotas: "Quotas | None" = None) -> Identity:
    """The request's key, if it may use ``model`` (else 403 ``model_not_allowed``) and,
    when ``quotas`` is given (work is about to be done), is within them (else 429)."""
    ident = identity(request)
    if not ident.may_use(model):
        raise errors.ModelNotAllowed(f"the key {ident.name!r} may not use the model {model!r}", param="model")
    if quotas is not None:
        quotas.check(ident)
    return ident


def actor(request: web.Request) -> str:
    """Who made a request, for the audit log: its key's reference, else its address."""
    return request.get(WHO) or "addr:" + (request.remote or "?")


def preflight_middleware(current: Callable[[], list[str]]) -> Callable[[web.Request, Handler],
                                                                       Awaitable[web.StreamResponse]]:
    """Answers CORS preflights: 204 with what may follow, or 403 for an origin not allowed."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
            allowed = current()
            if "*" not in allowed and origin not in allowed:
                raise errors.Forbidden(f"origin {origin[:100]!r} is not in server.allowed_origins")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600"})
        return await handler(request)

    return middleware


def cors_headers(current: Callable[[], list[str]]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An on_response_prepare hook: every reply to an allowed origin (streams and errors
    too, since it runs just before the headers go out) says so."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None:
            return
        allowed = current()
        if "*" in allowed or origin in allowed:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers["Vary"] = "Origin"

    return hook
