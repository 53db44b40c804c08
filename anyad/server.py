"""The aiohttp application: middlewares, routes, and the mapping of errors to HTTP.

``error_middleware`` is the one place where any failure becomes a response in
OpenAI's error shape; nothing else writes error bodies, and no traceback or
HTML page ever reaches a client.
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable

from aiohttp import web

from anyad import errors
from anyad.daemon import Daemon
from anyad.jsoncodec import dumps, loads

log = logging.getLogger("anyad.server")

DAEMON: web.AppKey[Daemon] = web.AppKey("daemon", Daemon)
# Typed request keys arrived in aiohttp 3.14; older versions take a plain string.
REQUEST_ID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_response(exc: errors.AnyadError, request_id: str | None = None) -> web.Response:
    headers = dict(exc.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.json_response(exc.body(), status=exc.status, headers=headers, dumps=dumps)


def _from_http(exc: web.HTTPException, request: web.Request) -> errors.AnyadError:
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = request.app[DAEMON].settings.server.max_body_bytes
        return errors.PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return errors.MethodNotAllowed(f"method {request.method} is not allowed on {request.path} "
                                       f"(allowed: {', '.join(sorted(exc.allowed_methods))})",
                                       headers={"Allow": ",".join(sorted(exc.allowed_methods))})
    if isinstance(exc, web.HTTPNotFound):
        return errors.NotFound(f"no such endpoint: {request.method} {request.path}")
    err = errors.AnyadError(exc.reason or "error")
    err.status = exc.status
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    return err


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    rid = request.headers.get("X-Request-Id") or os.urandom(12).hex()
    request[REQUEST_ID] = rid
    try:
        resp = await handler(request)
    except errors.AnyadError as exc:
        if exc.status >= 500:
            log.warning("request %s: %s", rid, exc.message)
        return error_response(exc, rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_from_http(exc, request), rid)
    except Exception:
        log.exception("request %s: unhandled error", rid)
        return error_response(errors.AnyadError("internal error; see the daemon's log for request " + rid), rid)
    if not resp.prepared:
        resp.headers["X-Request-Id"] = rid
    return resp


async def read_json(request: web.Request) -> object:
    """The request body as JSON; malformed JSON is a 400, an oversized body a 413."""
    raw = await request.read()
    try:
        return loads(raw)
    except ValueError as exc:
        raise errors.InvalidRequest(f"the request body is not valid JSON: {exc}") from None


def build_app(daemon: Daemon) -> web.Application:
    from anyad.api import register_routes

    from anyad.access import KeyCheck, auth_middleware, cors_headers, preflight_middleware

    server = daemon.settings.server
    middlewares = [error_middleware, preflight_middleware(server.allowed_origins)]
    if server.api_keys:
        middlewares.append(auth_middleware(KeyCheck(server.api_keys)))
    if server.rate_limit_per_minute:
        from anyad.limits import RateLimiter, rate_limit_headers, rate_limit_middleware

        middlewares.append(rate_limit_middleware(RateLimiter(server.rate_limit_per_minute)))
    app = web.Application(middlewares=middlewares, client_max_size=server.max_body_bytes)
    if server.rate_limit_per_minute:
        app.on_response_prepare.append(rate_limit_headers)
    if server.allowed_origins:
        app.on_response_prepare.append(cors_headers(server.allowed_origins))
    app[DAEMON] = daemon

    async def on_startup(app: web.Application) -> None:
        await daemon.start()

    async def on_cleanup(app: web.Application) -> None:
        await daemon.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    register_routes(app)
    return app
