"""Anthropic's Messages API behind the OpenAI chat contract.

Requests are translated to ``POST /v1/messages`` (system prompt, alternating roles,
tool calls and results, ``max_tokens``, stop sequences, tools) and replies back to
OpenAI chunks, usage included, streamed event by event.
"""

from __future__ import annotations

from typing import Any

from anyad.errors import AnyadError, BackendError, InvalidRequest
from anyad.http_client import RemoteBackend, mid_stream
from anyad.jsoncodec import dumps, loads
from anyad.sse import sse_events
from anyad.stream import ChatRequest, Chunk, ChunkStream, Usage, content_text

API_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # Anthropic requires max_tokens; OpenAI clients often leave it out
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
          "pause_turn": "stop", "refusal": "content_filter"}


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    """OpenAI content (string or parts) → Anthropic content blocks."""
    if not isinstance(content, list):
        return [{"type": "text", "text": content}] if content else []
    out = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            out.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = (part.get("image_url") or {}).get("url", "")
            if url.startswith("data:"):
                head, _, data = url.partition(",")
                out.append({"type": "image", "source": {"type": "base64", "data": data,
                                                        "media_type": head[5:].split(";")[0]}})
            else:
                out.append({"type": "image", "source": {"type": "url", "url": url}})
        else:
            raise InvalidRequest(f"content part type {kind!r} cannot be sent to Anthropic",
                                 param=f"{where}.content[{j}].type")
    return out


def to_messages_request(request: ChatRequest, model: str) -> dict[str, Any]:
    body = request.body
    system: list[str] = []
    messages: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        # Anthropic wants strictly alternating roles: merge neighbours of the same role.
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"].extend(blocks)
        else:
            messages.append({"role": role, "content": blocks})

    for i, m in enumerate(request.messages):
        role = m.get("role")
        where = f"messages[{i}]"
        if role in ("system", "developer"):
            system.append(content_text(m.get("content")))
        elif role == "user":
            add("user", _blocks(m.get("content"), where))
        elif role == "assistant":
            blocks = _blocks(m.get("content"), where)
            for tc in m.get("tool_calls") or []:
                fn = tc.get("function") or {}
                try:
                    args = loads(fn.get("arguments") or "{}")
                except ValueError:
                    raise InvalidRequest("tool call arguments are not JSON", param=f"{where}.tool_calls") from None
                blocks.append({"type": "tool_use", "id": tc.get("id"), "name": fn.get("name"), "input": args})
            add("assistant", blocks)
        elif role in ("tool", "function"):
            add("user", [{"type": "tool_result", "tool_use_id": m.get("tool_call_id"),
                          "content": content_text(m.get("content"))}])
    p = request.params
    out: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": p.max_tokens or DEFAULT_MAX_TOKENS}
    if system:
        out["system"] = "\n\n".join(s for s in system if s)
    if p.stop:
        out["stop_sequences"] = p.stop
    if p.temperature is not None:
        out["temperature"] = min(p.temperature, 1.0)  # Anthropic's range is 0..1
    if p.top_p is not None:
        out["top_p"] = p.top_p
    if p.top_k is not None:
        out["top_k"] = p.top_k
    if body.get("tools"):
        out["tools"] = [{"name": t["function"]["name"], "description": t["function"].get("description", ""),
                         "input_schema": t["function"].get("parameters") or {"type": "object", "properties": {}}}
                        for t in body["tools"] if t.get("type") == "function"]
    tc = body.get("tool_choice")
    if isinstance(tc, str):
        out["tool_choice"] = {"auto": {"type": "auto"}, "required": {"type": "any"}, "none": {"type": "none"}}.get(
            tc, {"type": "auto"})
    elif isinstance(tc, dict) and tc.get("function"):
        out["tool_choice"] = {"type": "tool", "name": tc["function"].get("name")}
    if body.get("user"):
        out["metadata"] = {"user_id": str(body["user"])}
    if request.stream:
        out["stream"] = True
    return out


def chunk_from_message(data: Any) -> Chunk:
    """A whole Messages reply → one final chunk (ValueError: not one)."""
    if not isinstance(data, dict) or not isinstance(data.get("content"), list):
        raise ValueError("the reply has no content")
    texts: list[str] = []
    tools: list[dict[str, Any]] = []
    for block in data["content"]:
        if block.get("type") == "text":
            texts.append(block.get("text", ""))
        elif block.get("type") == "tool_use":
            tools.append({"index": len(tools), "id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"), "arguments": dumps(block.get("input", {}))}})
    u = data.get("usage") or {}
    return Chunk(text="".join(texts), finish_reason=FINISH.get(data.get("stop_reason") or "end_turn", "stop"),
                 tool_calls=tools or None, usage=prompt_usage(u, int(u.get("output_tokens") or 0)))


def prompt_usage(u: dict[str, Any], output_tokens: int) -> Usage:
    """Anthropic counts a prompt in three parts (read afresh, read from its cache, written to
    it); OpenAI's usage counts them all as prompt tokens, the cache's share apart."""
    fresh, read, written = (int(u.get(k) or 0) for k in ("input_tokens", "cache_read_input_tokens",
                                                          "cache_creation_input_tokens"))
    return Usage(fresh + read + written, output_tokens, read if "cache_read_input_tokens" in u else None)


class AnthropicBackend(RemoteBackend):
    kind = "anthropic"

    async def headers(self) -> dict[str, str]:
        # A configured anthropic-version (e.g. for a beta) rides on the session's headers.
        h = {} if any(k.lower() == "anthropic-version" for k in self.settings.headers) else \
            {"anthropic-version": API_VERSION}
        key = await self.client.api_key()
        if key:
            h["x-api-key"] = key
        return h

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        full = to_messages_request(request, model)
        body = {k: v for k, v in full.items() if k in ("model", "messages", "system", "tools", "tool_choice",
                                                         "thinking")}
        resp = await self.client.post("/messages/count_tokens", body, await self.headers())
        async with resp:
            data = await self.reply_json(resp)
        tokens = data.get("input_tokens") if isinstance(data, dict) else None
        if not isinstance(tokens, int):
            raise BackendError(f"{self.name}: the token count is not a number")
        return tokens

    async def chat(self, request: ChatRequest, model: str) -> ChunkStream:
        if request.raw:
            raise InvalidRequest(f"{self.name} (Anthropic's Messages API) has no text completions: send messages "
                                 "to /v1/chat/completions", param="prompt")
        if request.params.n:
            raise InvalidRequest(f"n: {self.name} (Anthropic's Messages API) gives one reply per request; "
                                 "ask once per choice", param="n")
        resp = await self.client.post("/messages", to_messages_request(request, model), await self.headers())
        async with resp:
            try:
                if not request.stream:
                    data = await self.reply_json(resp)
                    try:
                        chunk = chunk_from_message(data)
                    except (ValueError, TypeError, AttributeError) as exc:
                        raise BackendError(f"{self.name}: the reply is not a message ({exc})") from None
                    yield chunk
                    return
                opened: dict[str, Any] = {}  # message_start's usage: the prompt's count
                tool_index: dict[int, int] = {}  # Anthropic block index → OpenAI tool-call index
                async for event, payload in sse_events(resp.content):
                    try:
                        ev = loads(payload)
                    except ValueError:
                        raise BackendError(f"{self.name}: malformed event in the stream") from None
                    kind = ev.get("type") or event
                    if kind == "message_start":
                        opened = dict((ev.get("message") or {}).get("usage") or {})
                    elif kind == "content_block_start":
                        block = ev.get("content_block") or {}
                        if block.get("type") == "tool_use":
                            i = tool_index[ev.get("index", 0)] = len(tool_index)
                            yield Chunk(tool_calls=[{"index": i, "id": block.get("id"), "type": "function",
                                                     "function": {"name": block.get("name"), "arguments": ""}}])
                        elif block.get("text"):
                            yield Chunk(text=block["text"])
                    elif kind == "content_block_delta":
                        delta = ev.get("delta") or {}
                        if delta.get("type") == "text_delta" and delta.get("text"):
                            yield Chunk(text=delta["text"])
                        elif delta.get("type") == "input_json_delta":
                            i = tool_index.get(ev.get("index", 0), 0)
                            yield Chunk(tool_calls=[{"index": i, "function": {"arguments":
                                                                              delta.get("partial_json", "")}}])
                    elif kind == "message_delta":
                        reason = (ev.get("delta") or {}).get("stop_reason")
                        out_tokens = int((ev.get("usage") or {}).get("output_tokens") or 0)
                        yield Chunk(finish_reason=FINISH.get(reason or "end_turn", "stop"),
                                    usage=prompt_usage(opened, out_tokens))
                    elif kind == "message_stop":
                        return
                    elif kind == "error":
                        err = ev.get("error") or {}
                        raise BackendError(f"{self.name}: {err.get('message', 'stream error')}")
            except AnyadError:
                raise
            except Exception as exc:
                raise mid_stream(self.name, exc) from None

