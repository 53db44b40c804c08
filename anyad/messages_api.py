"""Anthropic's Messages API at the edge: its requests as anyad's one ``ChatRequest``, its
replies (whole, or streamed as its events in its order) and its error shape.

A Messages request is translated into an OpenAI chat-completions body and validated by
the same schema, so every rule about messages, tools and sampling holds in one place;
what has no equivalent is refused here with a 400 naming it.
"""

from __future__ import annotations

import base64
import os
import re
from typing import TYPE_CHECKING, Any

from pydantic import Field

from anyad.errors import AnyadError, InvalidRequest
from anyad.jsoncodec import dumpb, dumps, loads
from anyad.schemas import Open, function_tools, named_tool, parse_chat_request, validate
from anyad.stream import ChatRequest, Chunk, Usage

if TYPE_CHECKING:
    from anyad.encoders import Gathered

# Claude Code puts a line that changes on every request at the top of its system prompt;
# left in, no two prompts share a prefix, and the engine reads each one from the start.
BILLING_LINE = re.compile(r"^x-anthropic-billing-header:[^\n]*(\n|$)")

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 408: "timeout_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 529: "overloaded_error"}
# Top-level fields with no local equivalent: asked for, they are a 400 naming them.
REFUSED = {"mcp_servers": "anyad runs no MCP servers for a request: give the client the tools",
           "container": "anyad runs no code-execution containers"}
# Top-level fields that change nothing here, on purpose.
IGNORED = ("metadata", "service_tier", "context_management", "cache_control", "diagnostics", "inference_geo",
           "speed", "user_profile_id", "workspace_id")


class MessagesRequest(Open):
    """The top level of a Messages request, typed as Anthropic documents it (the blocks
    inside are checked where they are translated, with the path of the one at fault)."""

    model: str
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stream: bool | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0, le=1)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class CountTokensRequest(MessagesRequest):
    max_tokens: int = Field(1, ge=1)  # a count writes nothing


def anthropic_error_body(exc: AnyadError) -> dict[str, Any]:
    """Anthropic's error shape; the status picks the type as Anthropic's do."""
    kind = ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    message = exc.message if exc.param is None or exc.param in exc.message else f"{exc.param}: {exc.message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def _text_of(blocks: Any, where: str) -> str:
    """A system prompt or a tool result: a string, or text blocks (joined)."""
    if blocks is None or isinstance(blocks, str):
        return blocks or ""
    if not isinstance(blocks, list):
        raise InvalidRequest(f"{where} must be a string or a list of text blocks", param=where)
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            kind = b.get("type") if isinstance(b, dict) else type(b).__name__
            raise InvalidRequest(f"{where}[{i}]: a {kind!r} block is not supported here; only text blocks are",
                                 param=f"{where}[{i}]")
        out.append(b["text"])
    return "\n".join(out)


def _image_part(block: dict[str, Any], where: str) -> dict[str, Any]:
    src = block.get("source") or {}
    if src.get("type") == "base64" and isinstance(src.get("data"), str):
        media = src.get("media_type") or "image/png"
        try:
            base64.b64decode(src["data"], validate=True)
        except ValueError:
            raise InvalidRequest(f"{where}.source.data is not base64", param=f"{where}.source.data") from None
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{src['data']}"}}
    if src.get("type") == "url" and isinstance(src.get("url"), str):
        return {"type": "image_url", "image_url": {"url": src["url"]}}
    raise InvalidRequest(f"{where}.source must be base64 data or a url", param=f"{where}.source")


def _user(m: dict[str, Any], i: int) -> list[dict[str, Any]]:
    """A user turn → OpenAI messages: its tool results first (each its own ``tool`` message,
    answering the assistant turn before), then the rest as one user message."""
    content = m.get("content")
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise InvalidRequest(f"messages[{i}].content must be a string or a list of blocks",
                             param=f"messages[{i}].content")
    tools, parts = [], []
    for j, b in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            parts.append({"type": "text", "text": b["text"]})
        elif kind == "image":
            parts.append(_image_part(b, where))
        elif kind == "tool_result":
            text = _text_of(b.get("content"), f"{where}.content")
            # OpenAI's tool messages have no error flag: the model reads it in the text.
            tools.append({"role": "tool", "tool_call_id": str(b.get("tool_use_id") or ""),
                          "content": f"Error: {text}" if b.get("is_error") else text})
        else:
            raise InvalidRequest(f"{where}: a {kind!r} block is not supported in a user turn (text, image and "
                                 "tool_result are)", param=where)
    if not parts:
        return tools
    only_text = all(p["type"] == "text" for p in parts)
    return tools + [{"role": "user", "content": "".join(p["text"] for p in parts) if only_text else parts}]


def _assistant(m: dict[str, Any], i: int) -> dict[str, Any]:
    content = m.get("content")
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(f"messages[{i}].content must be a string or a list of blocks",
                             param=f"messages[{i}].content")
    text, thinking, calls = [], [], []
    for j, b in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        kind = b.get("type") if isinstance(b, dict) else None
        if kind == "text" and isinstance(b.get("text"), str):
            text.append(b["text"])
        elif kind == "thinking":
            thinking.append(str(b.get("thinking") or ""))
        elif kind == "redacted_thinking":
            continue  # encrypted for Anthropic's models; nothing another model can read
        elif kind == "tool_use" and isinstance(b.get("name"), str):
            calls.append({"id": str(b.get("id") or f"toolu_{j}"), "type": "function",
                          "function": {"name": b["name"], "arguments": dumps(b.get("input") or {})}})
        else:
            raise InvalidRequest(f"{where}: a {kind!r} block is not supported in an assistant turn", param=where)
    out: dict[str, Any] = {"role": "assistant", "content": "".join(text) or (None if calls else "")}
    if thinking:
        out["reasoning_content"] = "".join(thinking)
    if calls:
        out["tool_calls"] = calls
    return out


def _tool(i: int, t: Any) -> dict[str, Any]:
    if not isinstance(t, dict) or t.get("type") not in (None, "custom") or "input_schema" not in t:
        kind = t.get("type") if isinstance(t, dict) else None
        raise InvalidRequest(f"tools[{i}]: {kind!r} is one of Anthropic's own tools, run by Anthropic; give a "
                             "custom tool (name, description, input_schema) instead", param=f"tools[{i}]")
    return {"name": t.get("name"), "description": t.get("description"), "parameters": t["input_schema"]}


def _tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """Anthropic's tool_choice → OpenAI's, and whether parallel calls are allowed."""
    if not isinstance(choice, dict):
        raise InvalidRequest("tool_choice must be an object", param="tool_choice")
    kind = choice.get("type")
    parallel = False if choice.get("disable_parallel_tool_use") else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return named_tool(choice["name"]), parallel
    raise InvalidRequest("tool_choice.type must be auto, any, tool (with a name) or none", param="tool_choice.type")


def to_openai(body: dict[str, Any]) -> dict[str, Any]:
    """A Messages request body → an OpenAI chat-completions body."""
    for name, why in REFUSED.items():
        if body.get(name):
            raise InvalidRequest(f"{name} is not supported: {why}", param=name)
    if not isinstance(body.get("max_tokens"), int) or isinstance(body.get("max_tokens"), bool):
        raise InvalidRequest("max_tokens: a number of tokens is required", param="max_tokens")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    out: dict[str, Any] = {"model": body.get("model"), "max_tokens": body["max_tokens"],
                           "stream": body.get("stream") is True}
    chat: list[dict[str, Any]] = []
    system = BILLING_LINE.sub("", _text_of(body.get("system"), "system"))
    if system:
        chat.append({"role": "system", "content": system})
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role == "user":
            chat += _user(m, i)
        elif role == "assistant":
            chat.append(_assistant(m, i))
        else:
            raise InvalidRequest(f"messages[{i}].role must be user or assistant", param=f"messages[{i}].role")
    out["messages"] = chat
    for ours, theirs in (("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("stop_sequences", "stop"), ("keep_alive", "keep_alive")):
        if body.get(ours) is not None:
            out[theirs] = body[ours]
    if body.get("tools"):
        out["tools"] = function_tools(body["tools"], _tool)
    if body.get("tool_choice") is not None:
        choice, parallel = _tool_choice(body["tool_choice"])
        if out.get("tools") or choice == "none":
            out["tool_choice"] = choice
        if parallel is not None:
            out["parallel_tool_calls"] = parallel
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("type") in ("enabled", "adaptive", "between_tools"):
        out["reasoning_effort"] = "medium"
    elif isinstance(thinking, dict) and thinking.get("type") == "disabled":
        out["reasoning_effort"] = "none"
    elif thinking is not None:
        raise InvalidRequest("thinking.type must be enabled, adaptive, between_tools or disabled", param="thinking")
    config = body.get("output_config")
    if config is not None:
        if not isinstance(config, dict):
            raise InvalidRequest("output_config must be an object", param="output_config")
        fmt = config.get("format")
        if fmt is not None:
            if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
                raise InvalidRequest("output_config.format must be {type: json_schema, schema: {...}}",
                                     param="output_config.format")
            out["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}
        if config.get("effort") is not None:
            effort = config["effort"]
            out["reasoning_effort"] = {"max": "xhigh"}.get(effort, effort)
    return out


def parse_messages_request(body: Any, count: bool = False) -> ChatRequest:
    """A Messages request (``count``: a count_tokens one, which has no max_tokens) as a chat."""
    typed = validate(CountTokensRequest if count else MessagesRequest, body)
    return parse_chat_request(to_openai({**body, "max_tokens": typed.max_tokens}))


def _input(arguments: str) -> Any:
    """A tool call's arguments as Anthropic's ``input`` object (what could not be parsed: {})."""
    try:
        value = loads(arguments) if arguments else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def anthropic_usage(usage: Usage) -> dict[str, int]:
    """Usage as Anthropic counts it: ``input_tokens`` are those read afresh, the cache's apart."""
    cached = min(usage.cached_tokens or 0, usage.prompt_tokens)
    out = {"input_tokens": usage.prompt_tokens - cached, "output_tokens": usage.completion_tokens}
    if usage.cached_tokens is not None:
        out["cache_read_input_tokens"] = cached
    return out


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + dumpb({"type": kind, **data}) + b"\n\n"


class MessagesWriter:
    """Internal chunks → Anthropic's Messages reply: a ChatFlow ReplyWriter for ``/v1/messages``.

    Streamed, the events come in Anthropic's order: ``message_start``, then per content
    block (thinking, text, each tool use) ``content_block_start``, its deltas and
    ``content_block_stop``, then ``message_delta`` (stop reason, usage) and ``message_stop``.
    """

    stream_headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no"}

    def __init__(self, model: str) -> None:
        self.id = "msg_" + os.urandom(12).hex()
        self.model = model
        self._block = -1  # index of the open content block, -1: none yet
        self._open: str | None = None  # its kind: "thinking", "text" or "tool_use"
        self._tool_blocks: dict[int, int] = {}  # tool-call index → its block index
        self._finish: str | None = None

    def _start(self, kind: str, block: dict[str, Any]) -> list[bytes]:
        out = self._stop()
        self._block += 1
        self._open = kind
        out.append(_event("content_block_start", {"index": self._block, "content_block": block}))
        return out

    def _stop(self) -> list[bytes]:
        if self._open is None:
            return []
        self._open = None
        return [_event("content_block_stop", {"index": self._block})]

    def head(self) -> bytes:
        return _event("message_start", {"message": {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def piece(self, chunk: Chunk) -> bytes:
        out: list[bytes] = []
        thinking = (chunk.extra or {}).get("reasoning_content")
        if thinking:
            if self._open != "thinking":
                out += self._start("thinking", {"type": "thinking", "thinking": "", "signature": ""})
            out.append(_event("content_block_delta", {"index": self._block,
                                                      "delta": {"type": "thinking_delta", "thinking": thinking}}))
        if chunk.text:
            if self._open != "text":
                out += self._start("text", {"type": "text", "text": ""})
            out.append(_event("content_block_delta", {"index": self._block,
                                                      "delta": {"type": "text_delta", "text": chunk.text}}))
        for tc in chunk.tool_calls or ():
            i = tc.get("index", 0)
            fn = tc.get("function") or {}
            if i not in self._tool_blocks:
                out += self._start("tool_use", {"type": "tool_use", "id": tc.get("id") or f"toolu_{i}",
                                                "name": fn.get("name") or "", "input": {}})
                self._tool_blocks[i] = self._block
            if fn.get("arguments"):
                out.append(_event("content_block_delta", {"index": self._tool_blocks[i], "delta": {
                    "type": "input_json_delta", "partial_json": fn["arguments"]}}))
        if chunk.finish_reason:
            self._finish = chunk.finish_reason
        return b"".join(out)

    def tail(self, flow: "Gathered") -> bytes:
        usage = flow.reply.usage or Usage()
        return b"".join([*self._stop(), _event("message_delta", {
            "delta": {"stop_reason": STOP_REASONS.get(self._finish or "stop", "end_turn"), "stop_sequence": None},
            "usage": anthropic_usage(usage)}), _event("message_stop", {})])

    def error(self, exc: AnyadError) -> bytes:
        return b"event: error\ndata: " + dumpb(anthropic_error_body(exc)) + b"\n\n"

    def whole(self, flow: "Gathered") -> bytes:
        reply = flow.reply
        message = reply.message()
        content: list[dict[str, Any]] = []
        if message.get("reasoning_content"):
            content.append({"type": "thinking", "thinking": message["reasoning_content"], "signature": ""})
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        for tc in message.get("tool_calls") or ():
            content.append({"type": "tool_use", "id": tc.get("id") or "", "name": tc["function"]["name"],
                            "input": _input(tc["function"]["arguments"])})
        usage = reply.usage or Usage()
        return dumpb({"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                      "content": content,
                      "stop_reason": STOP_REASONS.get(reply.finish_reason or "stop", "end_turn"),
                      "stop_sequence": None,
                      "usage": anthropic_usage(usage)})
