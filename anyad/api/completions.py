"""``POST /v1/completions``: OpenAI's (legacy) text completions, a raw prompt continued."""

from __future__ import annotations

from aiohttp import web

from anyad.chatflow import ChatFlow
from anyad.daemon import DAEMON
from anyad.encoders import CompletionEncoder
from anyad.errors import InvalidRequest
from anyad.request_context import read_json
from anyad.schemas import parse_completion_request


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    chat = parse_completion_request(body)
    prompts = [m["content"] for m in chat.messages]  # the client's, for echo (plugins may rewrite them)
    flow = ChatFlow(request.app[DAEMON], request, chat)
    opened = await flow.open()
    return await flow.respond(opened, CompletionEncoder(opened.name, prompts, chat.params.n or 1,
                                                        echo=body.get("echo") is True,
                                                        include_usage=flow.chat.include_usage))
