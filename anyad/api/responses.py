"""``/v1/responses``: OpenAI's Responses API, stateless or kept (``store``), for every model."""

from __future__ import annotations

import asyncio

from aiohttp import web

from anyad.chatflow import ChatFlow
from anyad.daemon import DAEMON
from anyad.errors import InvalidRequest, NotFound
from anyad.request_context import identity, read_json
from anyad.responses_api import ResponsesWriter, output_messages, parse_responses_request
from anyad.store import responses as response_store


def _owner(request: web.Request) -> str | None:
    """Whose responses this key may see: its own (an admin key, or no keys at all: every one)."""
    ident = identity(request)
    return None if ident.admin else ident.name


async def create(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    daemon = request.app[DAEMON]
    history = daemon.history
    prior, continues = [], None
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise InvalidRequest("previous_response_id must be a string", param="previous_response_id")
        found = None if history is None else await asyncio.to_thread(response_store.get, history, previous,
                                                                      _owner(request))
        if found is None:
            raise NotFound(f"previous_response_id: no stored response {previous[:100]!r}", param="previous_response_id",
                           code="response_not_found")
        prior, continues = found.messages, found.conversation_id
    chat = parse_responses_request(body, prior)
    # Kept only where the history is: a daemon told to keep no chats keeps no responses either.
    store = body.get("store") is not False and history is not None
    writer = ResponsesWriter(chat.model, body, store)
    flow = ChatFlow(daemon, request, chat, continues=continues)
    if store and history is not None:
        conversation = chat.messages[1:] if body.get("instructions") is not None else chat.messages

        def keep(flow: ChatFlow) -> None:
            if writer.final is not None and flow.conversation_id is not None:
                response_store.put(history, response_store.StoredResponse(
                    writer.id, flow.conversation_id, identity(request).name, writer.final,
                    conversation + output_messages(writer.final)))

        flow.after.append(keep)
    opened = await flow.open()
    return await flow.respond(opened, writer)


async def get(request: web.Request) -> web.Response:
    history = request.app[DAEMON].history
    rid = request.match_info["id"]
    found = None if history is None else await asyncio.to_thread(response_store.get, history, rid, _owner(request))
    if found is None:
        raise NotFound(f"No response with id {rid[:100]!r} found", code="response_not_found")
    return web.json_response(found.body)


async def delete(request: web.Request) -> web.Response:
    history = request.app[DAEMON].history
    rid = request.match_info["id"]
    gone = history is not None and await asyncio.wrap_future(response_store.delete(history, rid, _owner(request)))
    if not gone:
        raise NotFound(f"No response with id {rid[:100]!r} found", code="response_not_found")
    return web.json_response({"id": rid, "object": "response", "deleted": True})
