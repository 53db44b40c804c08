"""``POST /v1/messages``: Anthropic's Messages API, for every model anyad serves."""

from __future__ import annotations

from aiohttp import web

from anyad.access import admit
from anyad.chatflow import ChatFlow
from anyad.daemon import DAEMON
from anyad.messages_api import MessagesWriter, parse_messages_request
from anyad.request_context import read_json


async def messages(request: web.Request) -> web.StreamResponse:
    chat = parse_messages_request(await read_json(request))
    flow = ChatFlow(request.app[DAEMON], request, chat)
    opened = await flow.open()
    return await flow.respond(opened, MessagesWriter(chat.model))


async def count_tokens(request: web.Request) -> web.Response:
    """``POST /v1/messages/count_tokens``: what a Messages request's prompt would cost."""
    chat = parse_messages_request(await read_json(request), count=True)
    daemon = request.app[DAEMON]
    admit(request, chat.model)  # who may use the model may count for it; no tokens are spent
    _, tokens = await daemon.router.count_tokens(chat)
    return web.json_response({"input_tokens": tokens})
