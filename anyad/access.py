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
# The dashboard's page and files: no data in them, and a browser cannot send a key for them.
DASHBOARD_PATHS = frozenset({"/", "/ui/app.js", "/ui/style.css"})
WHO = web.RequestKey("who", str) if hasattr(web, "RequestKey") else "who"
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
        # Resolved once, kept only as digests beside their references (which name the
        # key in the audit log without revealing it).
        self.keys = [(_digest(resolve(ref)), ref) for ref in refs]

    def who(self, request: web.Request) -> str | None:
        """The reference of the key the request carries, or None when it carries none of them."""
        auth = request.headers.get("Authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        got = _digest(token.strip())
        found = None
        for d, ref in self.keys:  # every one compared: the time says nothing about which
            if hmac.compare_digest(got, d):
                found = ref
        return found


def auth_middleware(current: Callable[[], KeyCheck | None]) -> Callable[[web.Request, Handler],
                                                                        Awaitable[web.StreamResponse]]:
    """``current()``: the keys in force now (a reload may change them), None for none."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        check = current()
        if check is not None and request.method != "OPTIONS" and request.path not in OPEN_PATHS \
                and request.path not in DASHBOARD_PATHS:
            who = check.who(request)
            if who is None:
                missing = "Authorization" not in request.headers
                raise errors.Unauthorized("this anyad needs an API key: send Authorization: Bearer <key>" if missing
                                          else "the API key is not valid", headers={"WWW-Authenticate": "Bearer"})
            request[WHO] = who
        return await handler(request)

    return middleware


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
