"""What a request carries on its way through the layers, and what every door reads of it.

The request keys the middlewares and the gateway layer set (the request id, the key that
authenticated it, and what a handler learned for the metrics and the audit log), who a
request is from (``identity``, ``actor``), its body as JSON (``read_json``) and the
paths open to everyone. The lowest of the HTTP modules: access, limits and quotas, the
gateway layer (``ChatFlow``, ``EmbedFlow``, model operations), the doors (``anyad.api``,
plugins) and ``anyad.server`` all import it, and it imports none of them. The daemon an
application serves is ``request.app[anyad.daemon.DAEMON]``, beside the class it holds.
"""

from __future__ import annotations

from aiohttp import web

from anyad import errors
from anyad.jsoncodec import loads
from anyad.keys import ANONYMOUS, Identity

# Typed request keys arrived in aiohttp 3.14; older versions take a plain string.
REQUEST_ID = web.RequestKey("request_id", str) if hasattr(web, "RequestKey") else "request_id"
# The key a request came with (``anyad.access.auth_middleware`` sets both): the identity,
# and the key's reference for the audit log.
IDENT = web.RequestKey("identity", Identity) if hasattr(web, "RequestKey") else "identity"
WHO = web.RequestKey("who", str) if hasattr(web, "RequestKey") else "who"
# What a handler learned, for the metrics and the audit log: the model asked for, the
# target that answered, and (when the audit keeps content) the exchange.
MODEL = web.RequestKey("model", str) if hasattr(web, "RequestKey") else "model"
BACKEND = web.RequestKey("backend", str) if hasattr(web, "RequestKey") else "backend"
CONTENT = web.RequestKey("content", dict) if hasattr(web, "RequestKey") else "content"
# (prompt tokens, completion tokens, cache outcome) of a request that used a model.
USAGE = web.RequestKey("usage", tuple) if hasattr(web, "RequestKey") else "usage"

# What service managers probe: no key, no rate limit.
OPEN_PATHS = frozenset({"/health", "/ready"})


def identity(request: web.Request) -> Identity:
    """The request's key (``ANONYMOUS`` where no keys are in force)."""
    return request.get(IDENT) or ANONYMOUS


def actor(request: web.Request) -> str:
    """Who made a request, for the audit log: its key's reference, else its address."""
    return request.get(WHO) or "addr:" + (request.remote or "?")


async def read_json(request: web.Request) -> object:
    """The request body as JSON; malformed JSON is a 400, an oversized body a 413."""
    raw = await request.read()
    try:
        return loads(raw)
    except ValueError as exc:
        raise errors.InvalidRequest(f"the request body is not valid JSON: {exc}") from None
