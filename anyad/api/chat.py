"""``POST /v1/chat/completions`` and ``POST /api/chat``: OpenAI chat completions."""

from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from anyad.chatflow import ChatFlow
from anyad.encoders import DONE, OpenAIEncoder, sse_error
from anyad.errors import AnyadError
from anyad.jsoncodec import dumpb
from anyad.schemas import parse_chat_request
from anyad.server import DAEMON, REQUEST_ID, read_json
from anyad.stream import Usage

log = logging.getLogger("anyad.chat")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    chat = parse_chat_request(await read_json(request))
    flow = ChatFlow(request.app[DAEMON], request, chat)
    opened = await flow.open()
    chat = flow.chat  # as the plugins left it
    headers = flow.headers
    enc = OpenAIEncoder(opened.name, include_usage=chat.include_usage)
    reply = flow.reply
    take = flow.take
    try:
        async with aclosing(opened.rest) as rest:
            if not chat.stream:
                await flow.collect(rest)
                return web.Response(body=dumpb(enc.completion(flow.choices)), headers=headers,
                                    content_type="application/json")

            resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
            await resp.prepare(request)
            finishes: dict[int, bytes] = {}
            try:
                out = [enc.role()]  # the role goes out with the first piece, in one write
                chunk = opened.first
                while chunk is not None:
                    chunk = take(chunk)
                    if chunk.text or chunk.tool_calls or chunk.extra or chunk.logprobs:
                        out.append(enc.chunk(chunk))
                    if chunk.finish_reason and chunk.index not in finishes:
                        # Held back until the stream ends (the usage chunk and [DONE] follow at
                        # once), so the tail of the reply is one write.
                        finishes[chunk.index] = enc.finish(chunk.finish_reason, chunk.index)
                    if out:
                        await resp.write(b"".join(out))
                        out = []
                    chunk = await anext(rest, None)
                flow.check_finished()
                tail = [finishes[i] for i in sorted(finishes)]
                if chat.include_usage:
                    tail.append(enc.usage(reply.usage or Usage()))
                tail.append(DONE)
                await resp.write(b"".join(tail))
                flow.ended()
            except AnyadError as exc:
                flow.failed(exc)
                # Headers are gone already: report in-band, as OpenAI does, and end without [DONE].
                try:
                    await resp.write(sse_error(exc.body()))
                except ConnectionError:
                    pass
            except ConnectionError:
                # The client went away; closing the stream cancels generation.
                log.info("request %s: client disconnected mid-stream", request[REQUEST_ID])
            return resp
    finally:
        flow.finish()
