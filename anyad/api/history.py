"""The chat history: ``GET /api/conversations`` (paged, newest first, ``?q=`` full-text),
``GET /api/conversations/{id}`` and ``DELETE /api/conversations/{id}``."""

from __future__ import annotations

import asyncio

from aiohttp import web

from anyad.daemon import DAEMON
from anyad.errors import InvalidRequest, NotFound
from anyad.request_context import identity
from anyad.store import CONVERSATION_ID, MAX_QUERY_CHARS, Store

MAX_PAGE = 200


def _store(request: web.Request) -> Store:
    store = request.app[DAEMON].history
    if store is None:
        raise NotFound("the history is disabled (history.enabled = false)")
    return store


def _int(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got {raw[:40]!r}", param=name) from None
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be between {lo} and {hi}", param=name)
    return value


def _owner(request: web.Request) -> str | None:
    """Whose conversations a request may see: its own key's, or (admin) everyone's."""
    ident = identity(request)
    return None if ident.admin else ident.name


def _id(request: web.Request) -> str:
    cid = request.match_info["id"]
    if not CONVERSATION_ID.match(cid):
        raise NotFound(f"no conversation {cid[:130]!r}")
    return cid


async def list_conversations(request: web.Request) -> web.Response:
    store = _store(request)
    limit = _int(request, "limit", 20, 1, MAX_PAGE)
    offset = _int(request, "offset", 0, 0, 2 ** 31)
    q = request.query.get("q")
    if q is not None and len(q) > MAX_QUERY_CHARS:
        raise InvalidRequest(f"q is longer than {MAX_QUERY_CHARS} characters", param="q")
    page = await asyncio.to_thread(store.conversations, limit=limit, offset=offset, q=q, owner=_owner(request))
    return web.json_response({"object": "list", **page})


async def get_conversation(request: web.Request) -> web.Response:
    cid = _id(request)
    conv = await asyncio.to_thread(_store(request).conversation, cid, _owner(request))
    if conv is None:
        raise NotFound(f"no conversation {cid!r}")
    return web.json_response(conv)


async def delete_conversation(request: web.Request) -> web.Response:
    cid = _id(request)
    if not await asyncio.wrap_future(_store(request).delete(cid, _owner(request))):
        raise NotFound(f"no conversation {cid!r}")
    return web.Response(status=204)
