"""Per-client request rate limits: a token bucket per API key (or per client address
when there are no keys), with ``X-RateLimit-*`` on every reply and 429 beyond it.

A bucket holds ``server.rate_limit_per_minute`` requests and refills at that rate, so a
client may burst up to a minute's allowance and then goes at the steady rate.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from typing import Callable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from anyad import errors
from anyad.request_context import OPEN_PATHS

RATE = web.RequestKey("rate_limit", tuple) if hasattr(web, "RequestKey") else "rate_limit"
MAX_CLIENTS = 10000  # buckets kept; the least recently seen go first


class RateLimiter:
    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0
        self.clock = clock
        self.buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client → (tokens, at)

    def take(self, client: str) -> tuple[bool, int, int, int]:
        """(allowed, remaining, seconds until full, seconds until one is available)."""
        now = self.clock()
        tokens, at = self.buckets.pop(client, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self.buckets[client] = (tokens, now)
        if len(self.buckets) > MAX_CLIENTS:
            self.buckets.popitem(last=False)
        reset = math.ceil((self.capacity - tokens) / self.rate) if self.rate else 0
        retry = 0 if allowed else max(1, math.ceil((1.0 - tokens) / self.rate))
        return allowed, int(tokens), reset, retry


def client_of(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth:
        # A digest, not the key: the buckets must never hold a secret.
        return "key:" + hashlib.sha256(auth.encode()).hexdigest()[:32]
    return "addr:" + (request.remote or "?")


def rate_limit_middleware(current: Callable[[], RateLimiter | None]) -> Middleware:
    """``current()``: the limiter in force now (a reload may change it), None for no limit."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        limiter = current()
        if limiter is None or request.path in OPEN_PATHS or request.method == "OPTIONS":
            return await handler(request)
        allowed, remaining, reset, retry = limiter.take(client_of(request))
        request[RATE] = (int(limiter.capacity), remaining, reset)
        if not allowed:
            raise errors.RateLimited(f"too many requests: the limit is {int(limiter.capacity)} per minute; retry in "
                              f"{retry} s", retry_after=retry)
        return await handler(request)

    return middleware


async def rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """An on_response_prepare hook: every limited reply, streams and errors too, says where it stands."""
    state = request.get(RATE)
    if state is not None:
        limit, remaining, reset = state
        response.headers["X-RateLimit-Limit"] = str(limit)
        response.headers["X-RateLimit-Remaining"] = str(remaining)
        response.headers["X-RateLimit-Reset"] = str(reset)
