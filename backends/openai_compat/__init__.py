"""Every service that speaks the OpenAI API: OpenAI, OpenRouter, Groq, Together, Mistral,
DeepSeek, vLLM, llama-server, LM Studio, Ollama's /v1.

The request goes on as the client sent it (unknown fields included) with the model
name replaced; a streamed reply is relayed event by event as it arrives.
"""

from __future__ import annotations

from typing import Any

from anyad.backend import Embeddings
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
    return Usage(int(obj.get("prompt_tokens") or 0), int(obj.get("completion_tokens") or 0))


def chunk_from_event(ev: dict[str, Any]) -> Chunk | None:
    """One upstream ``chat.completion.chunk`` → our chunk (None when it carries nothing)."""
    choices = ev.get("choices") or []  # null or [] in usage-only chunks
    usage = _usage(ev.get("usage"))
    if not choices:
        return Chunk(usage=usage) if usage else None
    choice = choices[0]
    delta = choice.get("delta") or {}
    if usage is None and choice.get("finish_reason") is None and choice.get("logprobs") is None \
            and delta.keys() <= _TEXT_DELTA:
        return Chunk(text=delta.get("content") or "")  # the common case: plain text
    extra = {k: v for k, v in delta.items() if k not in _KNOWN_DELTA and v is not None}
    return Chunk(text=delta.get("content") or "", finish_reason=choice.get("finish_reason"), usage=usage,
                 tool_calls=delta.get("tool_calls") or None, extra=extra or None,
                 logprobs=choice.get("logprobs"))


def is_plain(c: Chunk) -> bool:
    return c.finish_reason is None and c.usage is None and c.tool_calls is None and c.extra is None \
        and c.logprobs is None


def chunk_from_completion(data: dict[str, Any]) -> Chunk:
    """A whole upstream ``chat.completion`` → one final chunk."""
    choice = (data.get("choices") or [{}])[0]
    msg = choice.get("message") or {}
    tool_calls = [{"index": i, **tc} for i, tc in enumerate(msg.get("tool_calls") or [])] or None
    extra = {k: v for k, v in msg.items() if k not in _KNOWN_DELTA and v is not None}
    return Chunk(text=msg.get("content") or "", finish_reason=choice.get("finish_reason") or "stop",
                 usage=_usage(data.get("usage")), tool_calls=tool_calls, extra=extra or None,
                 logprobs=choice.get("logprobs"))


class OpenAIBackend(RemoteBackend):
    kind = "openai"

    async def headers(self) -> dict[str, str] | None:
        key = await self.client.api_key()
        return {"Authorization": f"Bearer {key}"} if key else None

    async def chat(self, request: ChatRequest, model: str) -> ChunkStream:  # type: ignore[override]
        body = {**request.body, "model": model, "messages": request.messages}
        resp = await self.client.post("/chat/completions", body, await self.headers())
        async with resp:
            try:
                if not request.stream:
                    data = await self.reply_json(resp)
                    yield chunk_from_completion(data)
                    return
                parser = SSEParser()
                batch: list = []
                async for block in resp.content.iter_any():
                    batch.clear()
                    parser.feed(block, batch)
                    chunks, done = self._chunks(batch)
                    for chunk in chunks:
                        yield chunk
                    if done:
                        return
                batch.clear()
                parser.finish(batch)  # an upstream that ends without a last blank line
                for chunk in self._chunks(batch)[0]:
                    yield chunk
            except AnyadError:
                raise
            except Exception as exc:  # aiohttp payload/connection errors, read timeouts
                raise mid_stream(self.name, exc) from None

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

    def _chunks(self, batch: list) -> tuple[list[Chunk], bool]:
        """The events of one network read as chunks, and whether [DONE] was among them.

        Text deltas that arrived together go on as one chunk: the same text, no later,
        with a fraction of the per-chunk work and writes.
        """
        out: list[Chunk] = []
        for _event, payload in batch:
            if payload.strip() == b"[DONE]":
                return out, True
            try:
                ev = loads(payload)
            except ValueError:
                raise BackendError(f"{self.name}: malformed event in the stream") from None
            if isinstance(ev, dict) and ev.get("error"):
                err = ev["error"]
                msg = err.get("message") if isinstance(err, dict) else str(err)
                raise BackendError(f"{self.name}: {msg}")
            chunk = chunk_from_event(ev)
            if chunk is None:
                continue
            if out and is_plain(out[-1]) and is_plain(chunk):
                out[-1].text += chunk.text
            else:
                out.append(chunk)
        return out, False

