"""``POST /v1/chat/completions`` and ``POST /api/chat``: OpenAI chat completions."""

from __future__ import annotations

from aiohttp import web

from anyad.chatflow import ChatFlow
from anyad.daemon import DAEMON
from anyad.encoders import OpenAIEncoder
from anyad.request_context import read_json
from anyad.schemas import parse_chat_request


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = parse_chat_request(await read_json(request))
    flow = ChatFlow(request.app[DAEMON], request, chat)
    opened = await flow.open()
    return await flow.respond(opened, OpenAIEncoder(opened.name, include_usage=flow.chat.include_usage))
