"""``/v1/responses``: OpenAI's Responses API, stateless or kept (``store``), for every model."""

from __future__ import annotations

import asyncio

from aiohttp import web

from anyad.chatflow import ChatFlow
from anyad.daemon import DAEMON
from anyad.errors import InvalidRequest, NotFound
from anyad.request_context import identity, read_json
from anyad.responses_api import ResponsesWriter, output_messages, parse_responses_request, stored_items
from anyad.store import responses as response_store

MAX_PAGE = 100  # input_items: OpenAI's limit on a page


def _owner(request: web.Request) -> str | None:
    """Whose responses this key may see: its own (an admin key, or no keys at all: every one)."""
    ident = identity(request)
    return None if ident.admin else ident.name


async def _stored(request: web.Request, rid: str, param: str | None = None) -> response_store.StoredResponse:
    """The stored response ``rid`` if the request's key may see it; else a 404, the same for
    one that is another key's as for one that never was. ``param``: the field that named it."""
    history = request.app[DAEMON].history
    found = None if history is None else await asyncio.to_thread(response_store.get, history, rid, _owner(request))
    if found is None:
        if param is not None:
            raise NotFound(f"{param}: no stored response {rid[:100]!r}", param=param, code="response_not_found")
        raise NotFound(f"No response with id {rid[:100]!r} found", code="response_not_found")
    return found


async def create(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    daemon = request.app[DAEMON]
    history = daemon.history
    prior, prior_items, continues = [], [], None
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise InvalidRequest("previous_response_id must be a string", param="previous_response_id")
        found = await _stored(request, previous, "previous_response_id")
        prior, continues = found.messages, found.conversation_id
        prior_items = found.items + (found.body.get("output") or [])
    chat = parse_responses_request(body, prior)
    # Kept only where the history is: a daemon told to keep no chats keeps no responses either.
    store = body.get("store") is not False and history is not None
    writer = ResponsesWriter(chat.model, body, store)
    flow = ChatFlow(daemon, request, chat, continues=continues)
    if store and history is not None:
        conversation = chat.messages[1:] if body.get("instructions") is not None else chat.messages

        def keep(flow: ChatFlow) -> None:
            # Light work here, on the event loop: the writer's thread makes the JSON.
            if writer.final is not None and flow.conversation_id is not None:
                items = prior_items + stored_items(body["input"], {i["id"] for i in prior_items})
                response_store.put(history, response_store.StoredResponse(
                    writer.id, flow.conversation_id, identity(request).name, writer.final,
                    conversation + output_messages(writer.final), items), flow.exchange)

        flow.after.append(keep)
    opened = await flow.open()
    return await flow.respond(opened, writer)


async def get(request: web.Request) -> web.Response:
    found = await _stored(request, request.match_info["id"])
    return web.json_response(found.body)


def _page_size(raw: str | None) -> int:
    if raw is None:
        return 20
    try:
        limit = int(raw)
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}", param="limit")
    return limit


async def input_items(request: web.Request) -> web.Response:
    """The items a stored response was made from (the earlier responses' input and output,
    then its own input), a page at a time: ``limit``, ``order`` (``desc``, the default, or
    ``asc``), ``after`` (an item id: the page starts after it)."""
    q = request.query
    limit = _page_size(q.get("limit"))
    order = q.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order")
    found = await _stored(request, request.match_info["id"])
    items = found.items if order == "asc" else found.items[::-1]
    start = 0
    after = q.get("after")
    if after is not None:
        start = next((i + 1 for i, item in enumerate(items) if item.get("id") == after), -1)
        if start < 0:
            raise InvalidRequest(f"after: no item {after[:100]!r} in this response's input items", param="after")
    page = items[start:start + limit]
    return web.json_response({"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                              "last_id": page[-1]["id"] if page else None, "has_more": start + limit < len(items)})


async def delete(request: web.Request) -> web.Response:
    history = request.app[DAEMON].history
    rid = request.match_info["id"]
    gone = history is not None and await asyncio.wrap_future(response_store.delete(history, rid, _owner(request)))
    if not gone:
        raise NotFound(f"No response with id {rid[:100]!r} found", code="response_not_found")
    return web.json_response({"id": rid, "object": "response", "deleted": True})
