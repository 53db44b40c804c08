"""The aiohttp application: middlewares, routes, and the mapping of errors to HTTP.

``error_middleware`` is the one place where any failure becomes a response in
OpenAI's error shape; nothing else writes error bodies, and no traceback or
HTML page ever reaches a client.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from anyad import errors
from anyad.access import BrowserGuard, auth_middleware, cors_headers, guard_middleware
from anyad.api import register_routes, v1_error_bodies
from anyad.config import ServerSettings
from anyad.daemon import DAEMON, Daemon
from anyad.errors import ErrorBody, openai_error_body
from anyad.jsoncodec import dumps
from anyad.limits import rate_limit_headers, rate_limit_middleware
from anyad.request_context import BACKEND, CONTENT, IDENT, MODEL, REQUEST_ID, USAGE, actor, identity
from anyad.store import UsageRow

log = logging.getLogger("anyad.server")

UNACCOUNTED = frozenset({"/health", "/ready", "/metrics"})  # probes and scrapes: counted, not audited


def error_response(exc: errors.AnyadError, request_id: str | None = None,
                   render: ErrorBody = openai_error_body) -> web.Response:
    headers = dict(exc.headers)
    if request_id:
        headers["X-Request-Id"] = request_id
    resp = web.json_response(render(exc), status=exc.status, headers=headers, dumps=dumps)
    if headers.get("Connection") == "close":
        resp.force_close()  # aiohttp keeps the connection alive unless told
    return resp


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


def error_middleware_for(render: ErrorBody, by_path: tuple[tuple[str, ErrorBody], ...] = ()) -> Middleware:
    """The one place where any failure becomes a response, in the door's error shape:
    ``render``'s, or for a path under one of ``by_path``'s prefixes, that door's (one
    listener may hold several doors: Anthropic's Messages beside OpenAI's)."""
    doors = tuple(sorted(by_path, key=lambda door: -len(door[0])))  # the longest prefix wins

    def render_for(path: str) -> ErrorBody:
        return next((door_render for prefix, door_render in doors if path.startswith(prefix)), render)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-Id") or os.urandom(12).hex()
        request[REQUEST_ID] = rid
        try:
            resp = await handler(request)
        except errors.AnyadError as exc:
            if exc.status >= 500:
                log.warning("request %s: %s", rid, exc.message)
            return error_response(exc, rid, render_for(request.path))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return error_response(_from_http(exc, request), rid, render_for(request.path))
        except Exception:
            log.exception("request %s: unhandled error", rid)
            return error_response(errors.AnyadError("internal error; see the daemon's log for request " + rid), rid,
                                  render_for(request.path))
        if not resp.prepared:
            resp.headers["X-Request-Id"] = rid
        return resp

    return middleware


error_middleware = error_middleware_for(openai_error_body)


def accounting_middleware(daemon: Daemon) -> Middleware:
    """Inside ``error_middleware``: refuses new work while draining, keeps the count of
    requests in flight (drain and reload wait on it), and after each reply, streams
    included, updates the metrics and the audit log."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if daemon.draining and request.path not in ("/health", "/metrics"):
            raise errors.Unavailable("anyad is shutting down; retry shortly", retry_after=5)
        t0 = time.monotonic()
        gen = daemon.begin()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except errors.AnyadError as exc:
            status = exc.status
            raise
        except web.HTTPException as exc:
            status = exc.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away first
            raise
        finally:
            daemon.end(gen)
            seconds = time.monotonic() - t0
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else "unmatched"
            model, backend = request.get(MODEL), request.get(BACKEND)
            daemon.metrics.request(endpoint, model, backend, status, seconds)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("request %s: %s %s model=%s backend=%s -> %d in %.1f ms", request[REQUEST_ID],
                          request.method, request.path, model, backend, status, seconds * 1000)
            audit = daemon.audit
            # Audited: what uses a model, and what changes something; not the reads a
            # dashboard or a scraper repeats every few seconds.
            audited = audit is not None and audit.settings.requests and request.path not in UNACCOUNTED \
                and (model is not None or request.method not in ("GET", "HEAD", "OPTIONS"))
            store = daemon.usage
            if store is not None and model is not None and request.method == "POST":
                # One row for the request: its usage, and (audited) its line in the audit log.
                prompt, completion, cache = request.get(USAGE) or (0, 0, None)
                cost = daemon.price(backend, prompt, completion) if backend and cache not in ("hit", "stale") \
                    else None
                who, detail = (actor(request), audit.content(request.get(CONTENT))) if audit is not None and audited \
                    else (None, None)
                store.audit(UsageRow((time.time(), identity(request).name, model, backend, endpoint, status, prompt,
                                      completion, cache, cost, request[REQUEST_ID], who, round(seconds * 1000, 1),
                                      detail, int(audited))))
            elif audit is not None and audited:
                audit.request(actor(request), endpoint, model, backend, status, request[REQUEST_ID], seconds,
                              request.get(CONTENT))

    return middleware


def quota_header(daemon: Daemon) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Every reply to a key with a token quota says how many tokens it has left."""

    async def hook(request: web.Request, response: web.StreamResponse) -> None:
        ident = request.get(IDENT)
        if ident is not None and ident.limited:
            left = daemon.quotas.remaining(ident)
            if left is not None:
                response.headers["X-Anyad-Quota-Remaining"] = str(left)

    return hook


def gateway_app(daemon: Daemon, bind_host: Callable[[], str], render: ErrorBody = openai_error_body,
                by_path: tuple[tuple[str, ErrorBody], ...] = ()) -> web.Application:
    """An application with the layer every door (listener) shares: errors in the door's
    shape, drain and accounting, the browser guard (Host and Origin) and CORS, API keys,
    rate limits and their headers. Its rules are read from the daemon on each request, so
    a reload (SIGHUP) changes them without rebuilding anything."""
    def server() -> "ServerSettings":
        return daemon.settings.server

    middlewares = [error_middleware_for(render, by_path), accounting_middleware(daemon),
                   guard_middleware(BrowserGuard(server, bind_host)),
                   auth_middleware(lambda: daemon.keys), rate_limit_middleware(lambda: daemon.limiter)]
    app = web.Application(middlewares=middlewares, client_max_size=daemon.settings.server.max_body_bytes)
    app.on_response_prepare.append(rate_limit_headers)
    app.on_response_prepare.append(quota_header(daemon))
    app.on_response_prepare.append(cors_headers(server))
    app[DAEMON] = daemon
    return app


def build_app(daemon: Daemon) -> web.Application:
    app = gateway_app(daemon, lambda: daemon.settings.server.host, by_path=v1_error_bodies())

    async def on_startup(app: web.Application) -> None:
        await daemon.start()

    async def on_cleanup(app: web.Application) -> None:
        await daemon.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    register_routes(app)

    def add_route(method: str, path: str, handler: Handler) -> None:
        try:
            app.router.add_route(method, path, handler)
        except (RuntimeError, ValueError) as exc:
            raise errors.ConfigError(f"a plugin's route {method} {path}: {exc}") from None

    daemon.plugins.register("anyad_register_routes", add_route)
    return app
