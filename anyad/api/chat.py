"""``POST /v1/chat/completions`` and ``POST /api/chat``: OpenAI chat completions."""

from __future__ import annotations

import logging
from contextlib import aclosing

from aiohttp import web

from anyad.encoders import DONE, OpenAIEncoder, sse_error
from anyad.errors import AnyadError, BackendError
from anyad.schemas import parse_chat_request
from anyad.server import DAEMON, REQUEST_ID, read_json
from anyad.stream import Chunk, Usage

log = logging.getLogger("anyad.chat")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    daemon = request.app[DAEMON]
    chat = parse_chat_request(await read_json(request))
    backend = daemon.router.resolve(chat.model)
    enc = OpenAIEncoder(chat.model, include_usage=chat.include_usage)
    headers = {"X-Anyad-Backend": backend.kind, "X-Request-Id": request[REQUEST_ID]}

    async with aclosing(backend.chat(chat)) as stream:
        # Wait for the first chunk before answering: a queue, context or load
        # error still gets its own HTTP status instead of an in-band error.
        first = await anext(stream, None)
        if first is None:
            raise BackendError(f"model {chat.model!r} ended the reply without a finish reason")

        if not chat.stream:
            parts = [first.text]
            last = first
            while not last.finish_reason:
                nxt = await anext(stream, None)
                if nxt is None:
                    raise BackendError(f"model {chat.model!r} ended the reply without a finish reason")
                parts.append(nxt.text)
                last = nxt
            body = enc.completion("".join(parts), last.finish_reason, last.usage or Usage())
            return web.json_response(body, headers=headers)

        resp = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await resp.prepare(request)
        try:
            await resp.write(enc.role())
            chunk: Chunk | None = first
            while chunk is not None:
                if chunk.text:
                    await resp.write(enc.delta(chunk.text))
                if chunk.finish_reason:
                    await resp.write(enc.finish(chunk.finish_reason))
                    if chat.include_usage:
                        await resp.write(enc.usage(chunk.usage or Usage()))
                    await resp.write(DONE)
                    break
                chunk = await anext(stream, None)
            else:
                raise BackendError(f"model {chat.model!r} ended the reply without a finish reason")
        except AnyadError as exc:
            # Headers are gone already: report in-band, as OpenAI does, and end the stream.
            log.warning("request %s: stream failed: %s", request[REQUEST_ID], exc.message)
            try:
                await resp.write(sse_error(exc.body()))
            except ConnectionError:
                pass
        except ConnectionError:
            # The client went away; closing the stream cancels generation in the worker.
            log.info("request %s: client disconnected mid-stream", request[REQUEST_ID])
        return resp
