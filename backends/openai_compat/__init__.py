"""Every service that speaks the OpenAI API: OpenAI, OpenRouter, Groq, Together, Mistral,
DeepSeek, vLLM, llama-server, LM Studio, Ollama's /v1.

The request goes on as the client sent it (unknown fields included) with the model
name replaced; a streamed reply is relayed event by event as it arrives.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

from anyad.backend import Embeddings
from anyad.backends.openai_compat import responses_wire
from anyad.errors import AnyadError, BackendError
from anyad.http_client import RemoteBackend, mid_stream
from anyad.jsoncodec import loads
from anyad.sse import SSEParser
from anyad.stream import ChatRequest, Chunk, ChunkStream, Usage

_KNOWN_DELTA = {"role", "content", "tool_calls"}
_TEXT_DELTA = {"role", "content"}


def _usage(obj: dict[str, Any] | None) -> Usage | None:
    if not isinstance(obj, dict):
        return None
    details = obj.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    return Usage(int(obj.get("prompt_tokens") or 0), int(obj.get("completion_tokens") or 0),
                 int(cached) if isinstance(cached, int) else None)


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError("content is not a string")
    return value


def _index(choice: dict[str, Any]) -> int:
    i = choice.get("index") or 0
    if not isinstance(i, int) or isinstance(i, bool) or i < 0:
        raise ValueError("a choice's index is not a number")
    return i


def chunks_from_event(ev: dict[str, Any]) -> list[Chunk]:
    """One upstream ``chat.completion.chunk`` → our chunks, one per choice it carries (usage last)."""
    choices = ev.get("choices") or []  # null or [] in usage-only chunks
    usage = _usage(ev.get("usage"))
    out = []
    for choice in choices:
        delta = choice.get("delta") or {}
        if choice.get("finish_reason") is None and choice.get("logprobs") is None and delta.keys() <= _TEXT_DELTA:
            out.append(Chunk(text=_text(delta.get("content")), index=_index(choice)))  # the common case
            continue
        extra = {k: v for k, v in delta.items() if k not in _KNOWN_DELTA and v is not None}
        out.append(Chunk(text=_text(delta.get("content")), index=_index(choice),
                         finish_reason=choice.get("finish_reason"), tool_calls=delta.get("tool_calls") or None,
                         extra=extra or None, logprobs=choice.get("logprobs")))
    if usage is not None:
        if out:
            out[-1].usage = usage
        else:
            out.append(Chunk(usage=usage))
    return out


def chat_logprobs(lp: Any) -> dict[str, Any] | None:
    """Completions' legacy logprobs (parallel lists) → chat's ``{"content": [entries]}``."""
    if not isinstance(lp, dict):
        return None
    tokens, values, tops = lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    content = []
    for i, (token, value) in enumerate(zip(tokens, values)):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        content.append({"token": token, "logprob": value, "bytes": list(str(token).encode()),
                        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(str(t).encode())}
                                         for t, v in top.items()]})
    return {"content": content, "refusal": None}


def as_chat(data: Any, stream: bool) -> Any:
    """A completions reply (``choices[].text``) in chat's shape, for the same parsers."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        return data
    key = "delta" if stream else "message"
    choices = [{"index": c.get("index", 0), key: {"content": c.get("text")}, "finish_reason": c.get("finish_reason"),
                "logprobs": chat_logprobs(c.get("logprobs"))} for c in data["choices"] if isinstance(c, dict)]
    return {**data, "choices": choices}


def is_plain(c: Chunk) -> bool:
    return c.finish_reason is None and c.usage is None and c.tool_calls is None and c.extra is None \
        and c.logprobs is None


def chunks_from_completion(data: Any) -> list[Chunk]:
    """A whole upstream ``chat.completion`` → one final chunk per choice (ValueError: not one)."""
    choices = data.get("choices") if isinstance(data, dict) else None
    if not choices or not isinstance(choices, list):
        raise ValueError("the reply has no choices")
    out = []
    for choice in choices:
        msg = choice.get("message") or {}
        tool_calls = [{"index": i, **tc} for i, tc in enumerate(msg.get("tool_calls") or [])] or None
        extra = {k: v for k, v in msg.items() if k not in _KNOWN_DELTA and v is not None}
        out.append(Chunk(text=_text(msg.get("content")), index=_index(choice),
                         finish_reason=choice.get("finish_reason") or "stop", tool_calls=tool_calls,
                         extra=extra or None, logprobs=choice.get("logprobs")))
    out[-1].usage = _usage(data.get("usage"))
    return out


# What a reply in the wrong shape raises on its way through the functions above.
_SHAPE_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError)


class OpenAIBackend(RemoteBackend):
    kind = "openai"

    async def chat(self, request: ChatRequest, model: str) -> ChunkStream:
        if self.settings.api == "responses":
            async for chunk in self._responses(request, model):
                yield chunk
            return
        if request.raw:  # the completions door: relayed as one, the prompts as the plugins left them
            prompts = [m.get("content") for m in request.messages]
            prompt = prompts[0] if len(prompts) == 1 and isinstance(request.body.get("prompt"), str) else prompts
            body = {**request.body, "model": model, "prompt": prompt}
            resp = await self.client.post("/completions", body, await self.headers())
        else:
            body = {**request.body, "model": model, "messages": request.messages}
            resp = await self.client.post("/chat/completions", body, await self.headers())
        raw = request.raw
        async with resp:
            try:
                if not request.stream:
                    data = await self.reply_json(resp)
                    try:
                        whole = chunks_from_completion(as_chat(data, False) if raw else data)
                    except _SHAPE_ERRORS as exc:
                        raise BackendError(f"{self.name}: the reply is not a chat completion ({exc})") from None
                    for chunk in whole:
                        yield chunk
                    return
                # Chunks before the first choice (usage alone) are held back: a stream
                # with no choice at all is then a failure before the reply began, and
                # the router can still try the next target.
                held: list[Chunk] = []
                began = False
                async for chunks, saw_choice in self._reads(resp, raw):
                    began = began or saw_choice
                    if not began:
                        held += chunks
                        continue
                    for chunk in (*held, *chunks):
                        yield chunk
                    held = []
                if not began:
                    raise BackendError(f"{self.name}: the stream ended without a choice")
            except AnyadError as exc:  # the provider's own words among them: without its key
                raise self.client.redact(exc)
            except Exception as exc:  # aiohttp payload/connection errors, read timeouts
                raise mid_stream(self.name, exc) from None

    async def _responses(self, request: ChatRequest, model: str) -> ChunkStream:
        """The request through the provider's Responses API."""
        body = responses_wire.request_body(request, model, self.name)
        resp = await self.client.post("/responses", body, await self.headers())
        async with resp:
            try:
                if not request.stream:
                    data = await self.reply_json(resp)
                    try:
                        whole = responses_wire.chunks_from_response(data, self.name)
                    except _SHAPE_ERRORS as exc:
                        raise BackendError(f"{self.name}: the reply is not a response ({exc})") from None
                    for chunk in whole:
                        yield chunk
                    return
                reader = responses_wire.EventReader(self.name)
                parser = SSEParser()
                batch: list = []
                async for block in resp.content.iter_any():
                    batch.clear()
                    parser.feed(block, batch)
                    for _event, payload in batch:
                        try:
                            chunks = reader.feed(loads(payload))
                        except _SHAPE_ERRORS:
                            raise BackendError(f"{self.name}: an event in the stream is not a Responses "
                                               "event") from None
                        for chunk in chunks:
                            yield chunk
                    if reader.done:
                        return
                raise BackendError(f"{self.name}: the stream ended before the response did")
            except AnyadError as exc:  # the provider's own words among them: without its key
                raise self.client.redact(exc)
            except Exception as exc:  # aiohttp payload/connection errors, read timeouts
                raise mid_stream(self.name, exc) from None

    async def _reads(self, resp: Any, raw: bool = False) -> AsyncIterator[tuple[list[Chunk], bool]]:
        """Per network read: its chunks, and whether an event among them had a choice; up to [DONE]."""
        parser = SSEParser()
        batch: list = []
        async for block in resp.content.iter_any():
            batch.clear()
            parser.feed(block, batch)
            chunks, done, saw_choice = self._chunks(batch, raw)
            yield chunks, saw_choice
            if done:
                return
        batch.clear()
        parser.finish(batch)  # an upstream that ends without a last blank line
        chunks, _, saw_choice = self._chunks(batch, raw)
        yield chunks, saw_choice

    async def embed(self, inputs: list[str] | list[list[int]], model: str,
                    options: dict[str, Any] | None = None) -> Embeddings:
        # Floats from upstream whatever the client asked: the edge encodes for the client.
        body = {**(options or {}), "model": model, "input": inputs, "encoding_format": "float"}
        resp = await self.client.post("/embeddings", body, await self.headers())
        async with resp:
            try:
                data = await self.reply_json(resp)
                rows = sorted(data["data"], key=lambda d: d.get("index", 0))
                vectors = [r["embedding"] for r in rows]
            except (ValueError, KeyError, TypeError):
                raise BackendError(f"{self.name}: the embeddings reply is not in OpenAI's shape") from None
            except Exception as exc:
                raise mid_stream(self.name, exc) from None
        if len(vectors) != len(inputs):
            raise BackendError(f"{self.name}: sent {len(inputs)} inputs, got {len(vectors)} embeddings")
        return Embeddings(vectors, int((data.get("usage") or {}).get("prompt_tokens") or 0))

    def _chunks(self, batch: list, raw: bool = False) -> tuple[list[Chunk], bool, bool]:
        """The events of one network read as chunks, whether [DONE] was among them, and
        whether any carried a choice.

        Text deltas that arrived together go on as one chunk: the same text, no later,
        with a fraction of the per-chunk work and writes.
        """
        out: list[Chunk] = []
        saw_choice = False
        for _event, payload in batch:
            if payload.strip() == b"[DONE]":
                return out, True, saw_choice
            try:
                ev = loads(payload)
            except ValueError:
                raise BackendError(f"{self.name}: malformed event in the stream") from None
            if isinstance(ev, dict) and ev.get("error"):
                err = ev["error"]
                msg = err.get("message") if isinstance(err, dict) else str(err)
                raise BackendError(f"{self.name}: {msg}")
            try:
                chunks = chunks_from_event(as_chat(ev, True) if raw else ev)
            except _SHAPE_ERRORS:
                raise BackendError(f"{self.name}: an event in the stream is not a chat completion chunk") from None
            saw_choice = saw_choice or bool(ev.get("choices"))
            for chunk in chunks:
                if out and is_plain(out[-1]) and is_plain(chunk) and out[-1].index == chunk.index:
                    out[-1].text += chunk.text
                else:
                    out.append(chunk)
        return out, False, saw_choice
