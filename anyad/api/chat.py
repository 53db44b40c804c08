"""``POST /v1/chat/completions`` and ``POST /api/chat``: OpenAI chat completions."""

from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from anyad.encoders import DONE, OpenAIEncoder, Reply, sse_error
from anyad.errors import AnyadError, BackendError
from anyad.router import fallback_header
from anyad.schemas import parse_chat_request
from anyad.server import DAEMON, REQUEST_ID, read_json
from anyad.stream import Usage

log = logging.getLogger("anyad.chat")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    chat = parse_chat_request(await read_json(request))
    # The router waits for a target's first chunk before we answer: until then a
    # failure can still fall back, or get its own HTTP status.
    opened = await daemon.router.open(chat)
    headers = {"X-Anyad-Backend": opened.target.name, "X-Request-Id": request[REQUEST_ID]}
    if opened.skipped:
        headers["X-Anyad-Fallback"] = fallback_header(opened.skipped)
    enc = OpenAIEncoder(opened.target.name, include_usage=chat.include_usage)

    async with aclosing(opened.rest) as rest:
        if not chat.stream:
            reply = Reply()
            reply.add(opened.first)
            async for chunk in rest:
                reply.add(chunk)
            if reply.finish_reason is None:
                raise BackendError(f"{opened.target.name} ended the reply without a finish reason")
            return web.json_response(enc.completion(reply), headers=headers)

        resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await resp.prepare(request)
        usage: Usage | None = None
        finished = False
        try:
            await resp.write(enc.role())
            chunk = opened.first
            while chunk is not None:
                if chunk.text or chunk.tool_calls or chunk.extra:
                    await resp.write(enc.chunk(chunk))
                if chunk.finish_reason and not finished:
                    finished = True
                    await resp.write(enc.finish(chunk.finish_reason))
                if chunk.usage is not None:
                    usage = chunk.usage
                chunk = await anext(rest, None)
            if not finished:
                raise BackendError(f"{opened.target.name} ended the reply without a finish reason")
            if chat.include_usage:
                await resp.write(enc.usage(usage or Usage()))
            await resp.write(DONE)
        except AnyadError as exc:
            # Headers are gone already: report in-band, as OpenAI does, and end without [DONE].
            log.warning("request %s: stream failed: %s", request[REQUEST_ID], exc.message)
            try:
                await resp.write(sse_error(exc.body()))
            except ConnectionError:
                pass
        except ConnectionError:
            # The client went away; closing the stream cancels generation.
            log.info("request %s: client disconnected mid-stream", request[REQUEST_ID])
        return resp
