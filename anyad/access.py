"""Who may talk to the daemon: API keys and CORS.

``server.api_keys`` (secret references, resolved once at start) makes
``Authorization: Bearer <key>`` required everywhere except ``/health`` and ``/ready``
(what service managers probe) and CORS preflights; a missing or wrong key is a 401 in
OpenAI's error shape. Keys are compared as SHA-256 digests in constant time, and no key
ever reaches a log line. ``server.allowed_origins`` lists the browser origins that may
call the API (none by default; ``"*"`` only when configured).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Awaitable, Callable

from aiohttp import web

from anyad import errors
from anyad.config import ServerSettings
from anyad.secrets import resolve

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = frozenset({"/health", "/ready"})
EXPOSED = "X-Request-Id, X-Anyad-Backend, X-Anyad-Cache, X-Anyad-Conversation-Id, X-Anyad-Fallback, Retry-After"


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(server: ServerSettings) -> None:
    """Refuse to listen beyond this machine without API keys."""
    if not is_loopback(server.host) and not server.api_keys:
        raise errors.ConfigError(
            f"refusing to listen on {server.host} without API keys: anyone who can reach it could use your "
            "models and providers. Set server.api_keys (e.g. [\"keyring:anyad-client\"], stored with "
            "`anyad secrets set anyad-client`) or listen on 127.0.0.1")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class KeyCheck:
    def __init__(self, refs: list[str]) -> None:
        # Resolved once, kept only as digests.
        self.digests = [_digest(resolve(ref)) for ref in refs]

    def allows(self, request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        got = _digest(token.strip())
        ok = False
        for d in self.digests:  # every one compared: the time says nothing about which
            ok |= hmac.compare_digest(got, d)
        return ok


def auth_middleware(check: KeyCheck) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method != "OPTIONS" and request.path not in OPEN_PATHS and not check.allows(request):
            missing = "Authorization" not in request.headers
            raise errors.Unauthorized("this anyad needs an API key: send Authorization: Bearer <key>" if missing
                               else "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    return middleware


def preflight_middleware(origins: list[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Answers CORS preflights: 204 with what may follow, or 403 for an origin not allowed."""
    allowed = set(origins)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method == "OPTIONS" and origin is not None and "Access-Control-Request-Method" in request.headers:
            if "*" not in allowed and origin not in allowed:
                raise errors.Forbidden(f"origin {origin[:100]!r} is not in server.allowed_origins")
            return web.Response(status=204, headers={
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": request.headers.get("Access-Control-Request-Headers",
                                                                    "Authorization, Content-Type"),
                "Access-Control-Max-Age": "600"})
        return await handler(request)

    return middleware


def cors_headers(origins: list[str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """An on_response_prepare hook: every reply to an allowed origin (streams and errors
    too, since it runs just before the headers go out) says so."""
    allowed = set(origins)

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is not None and ("*" in allowed or origin in allowed):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSED
            response.headers["Vary"] = "Origin"

    return hook
