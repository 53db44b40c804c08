"""OpenAI's Responses API at the edge: its requests as anyad's one ``ChatRequest``, its
reply as a response object (whole, or streamed as its typed events).

A Responses request is translated into a chat-completions body and validated by the
same schema, so every rule about messages, tools and sampling holds in one place; what
has no local equivalent (OpenAI's hosted tools, background runs, server-side
conversations and prompts) is refused here with a 400 naming it.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from pydantic import Field

from anyad.errors import AnyadError, InvalidRequest
from anyad.jsoncodec import dumpb
from anyad.schemas import Open, function_tools, named_tool, parse_chat_request, validate
from anyad.stream import ChatRequest, Chunk, Usage

if TYPE_CHECKING:
    from anyad.encoders import Gathered

REFUSED = {"background": "anyad answers while the client waits; there are no background runs",
           "conversation": "continue a response with previous_response_id instead",
           "prompt": "stored prompt templates are OpenAI's; send the instructions and input"}
# Echoed back on the response object as the client sent them.
ECHOED = ("instructions", "max_output_tokens", "metadata", "parallel_tool_calls", "previous_response_id",
          "temperature", "tool_choice", "tools", "top_p", "reasoning", "text", "truncation", "user",
          "top_logprobs")


class ResponsesRequest(Open):
    """The top level of a Responses request, typed as OpenAI documents it (input items,
    tools and formats are checked where they are translated)."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stream: bool | None = None
    store: bool | None = None
    previous_response_id: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    metadata: dict[str, Any] | None = None


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(12).hex()}"


def _parts(content: Any, where: str) -> str | list[dict[str, Any]]:
    """A message item's content → chat content (text joined where it is all text)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(f"{where} must be a string or a list of parts", param=where)
    parts: list[dict[str, Any]] = []
    for j, p in enumerate(content):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": str(p.get("text") or p.get("refusal") or "")})
        elif kind == "input_image" and isinstance(p.get("image_url"), str):
            parts.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        else:
            raise InvalidRequest(f"{where}[{j}]: a {kind!r} part is not supported (input_text, output_text and "
                                 "input_image with an image_url are)", param=f"{where}[{j}]")
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def input_messages(items: Any) -> list[dict[str, Any]]:
    """The ``input`` (a string, or a list of items) → chat messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise InvalidRequest("input must be a string or a list of items", param="input")
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where} must be an object", param=where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequest(f"{where}.role must be user, assistant, system or developer",
                                     param=f"{where}.role")
            out.append({"role": "system" if role == "developer" else role,
                        "content": _parts(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": str(item.get("call_id") or item.get("id") or f"call_{i}"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments") or "{}"}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and not isinstance(last.get("content"), list):
                last.setdefault("tool_calls", []).append(call)  # calls after the text they came with
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id") or ""),
                        "content": output if isinstance(output, str) else _parts(output, f"{where}.output")})
        elif kind == "reasoning":
            continue  # a model's earlier thinking: chat templates leave it out of the prompt
        else:
            raise InvalidRequest(f"{where}: a {kind!r} item is not supported (message, function_call, "
                                 "function_call_output and reasoning are)", param=where)
    return out


def _tool(i: int, t: Any) -> dict[str, Any]:
    if not isinstance(t, dict) or t.get("type") != "function":
        kind = t.get("type") if isinstance(t, dict) else None
        raise InvalidRequest(f"tools[{i}]: {kind!r} is one of OpenAI's hosted tools; only function tools "
                             "run here", param=f"tools[{i}]")
    return {k: t.get(k) for k in ("name", "description", "parameters", "strict")}


def _tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return named_tool(choice["name"])
    raise InvalidRequest("tool_choice must be auto, none, required or a function by name", param="tool_choice")


def _format(text: Any) -> dict[str, Any] | None:
    fmt = (text or {}).get("format") if isinstance(text, dict) else None
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_object":
        return {"type": "json_object"}
    if fmt.get("type") == "json_schema" and isinstance(fmt.get("schema"), dict):
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name") or "output", "schema": fmt["schema"],
                                                       "strict": fmt.get("strict")}}
    raise InvalidRequest("text.format must be text, json_object or json_schema with a schema", param="text.format")


def to_openai(body: dict[str, Any], prior: list[dict[str, Any]]) -> dict[str, Any]:
    """A Responses request body (after ``prior``, the conversation it continues) → a chat body."""
    for name, why in REFUSED.items():
        if body.get(name):
            raise InvalidRequest(f"{name} is not supported: {why}", param=name)
    if "input" not in body:
        raise InvalidRequest("input: required", param="input")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("instructions must be a string", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += prior + input_messages(body["input"])
    out: dict[str, Any] = {"model": body.get("model"), "messages": messages, "stream": body.get("stream") is True}
    for ours, theirs in (("max_output_tokens", "max_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls"), ("keep_alive", "keep_alive")):
        if body.get(ours) is not None:
            out[theirs] = body[ours]
    if body.get("tools"):
        out["tools"] = function_tools(body["tools"], _tool)
    if body.get("tool_choice") is not None:
        choice = _tool_choice(body["tool_choice"])
        if out.get("tools") or choice == "none":
            out["tool_choice"] = choice
    rf = _format(body.get("text"))
    if rf is not None:
        out["response_format"] = rf
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        out["reasoning_effort"] = reasoning["effort"]
    if body.get("top_logprobs") is not None:
        out["logprobs"] = True
        out["top_logprobs"] = body["top_logprobs"]
    return out


def parse_responses_request(body: dict[str, Any], prior: list[dict[str, Any]]) -> ChatRequest:
    validate(ResponsesRequest, body)
    return parse_chat_request(to_openai(body, prior))


def _usage(usage: Usage | None) -> dict[str, Any]:
    u = usage or Usage()
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens or 0},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


class ResponsesWriter:
    """Internal chunks → a Responses reply: a ChatFlow ReplyWriter for ``/v1/responses``.

    Streamed: ``response.created``, ``response.in_progress``, then per output item
    (reasoning, the message, each function call) ``output_item.added``, its parts and
    deltas, their ``.done`` events and ``output_item.done``; last ``response.completed``
    (or ``response.incomplete`` when ``max_output_tokens`` ran out). ``final`` is the
    response object as answered, for the store.
    """

    stream_headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
                      "X-Accel-Buffering": "no"}

    def __init__(self, model: str, body: dict[str, Any], store: bool) -> None:
        self.id = new_id("resp")
        self.model = model
        self.created = int(time.time())
        self.echo = {k: body.get(k) for k in ECHOED}
        self.echo["tools"] = body.get("tools") or []
        self.echo["tool_choice"] = body.get("tool_choice") or "auto"
        self.echo["parallel_tool_calls"] = body.get("parallel_tool_calls") is not False
        self.echo["truncation"] = body.get("truncation") or "disabled"
        self.echo["text"] = body.get("text") or {"format": {"type": "text"}}
        self.store = store
        self.final: dict[str, Any] | None = None
        self._seq = 0
        self._items: list[dict[str, Any]] = []  # the output so far (open item last)
        self._open: str | None = None  # kind of the open item: "reasoning", "message", "function_call"
        self._calls: dict[int, int] = {}  # tool-call index → output index
        self._finish: str | None = None

    def response(self, status: str, usage: Usage | None = None, output: list[dict[str, Any]] | None = None,
                 finish: str | None = None) -> dict[str, Any]:
        incomplete = {"reason": "max_output_tokens"} if finish == "length" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "model": self.model, "output": output if output is not None else [], "error": None,
                "incomplete_details": incomplete, "usage": _usage(usage) if usage is not None else None,
                "store": self.store, **self.echo}

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        self._seq += 1
        return b"event: " + kind.encode() + b"\ndata: " + dumpb({"type": kind, "sequence_number": self._seq,
                                                                    **data}) + b"\n\n"

    # Items as they open, grow and close.

    def _add(self, item: dict[str, Any]) -> list[bytes]:
        out = self._close()
        self._items.append(item)
        self._open = item["type"]
        out.append(self._event("response.output_item.added", {"output_index": len(self._items) - 1, "item": item}))
        if item["type"] == "message":
            out.append(self._event("response.content_part.added", {
                "item_id": item["id"], "output_index": len(self._items) - 1, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}))
        return out

    def _close(self) -> list[bytes]:
        if self._open is None:
            return []
        item, i = self._items[-1], len(self._items) - 1
        self._open = None
        item["status"] = "completed"
        out = []
        if item["type"] == "message":
            part = item["content"][0]
            out.append(self._event("response.output_text.done", {"item_id": item["id"], "output_index": i,
                                                                 "content_index": 0, "text": part["text"],
                                                                 "logprobs": part["logprobs"]}))
            out.append(self._event("response.content_part.done", {"item_id": item["id"], "output_index": i,
                                                                  "content_index": 0, "part": part}))
        elif item["type"] == "function_call":
            out.append(self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": i, "name": item["name"], "arguments": item["arguments"]}))
        elif item["type"] == "reasoning":
            out.append(self._event("response.reasoning_text.done", {"item_id": item["id"], "output_index": i,
                                                                    "content_index": 0,
                                                                    "text": item["content"][0]["text"]}))
        out.append(self._event("response.output_item.done", {"output_index": i, "item": item}))
        return out

    def head(self) -> bytes:
        skeleton = self.response("in_progress")
        return self._event("response.created", {"response": skeleton}) + \
            self._event("response.in_progress", {"response": skeleton})

    def piece(self, chunk: Chunk) -> bytes:
        out: list[bytes] = []
        thinking = (chunk.extra or {}).get("reasoning_content")
        if thinking:
            if self._open != "reasoning":
                out += self._add({"type": "reasoning", "id": new_id("rs"), "summary": [], "status": "in_progress",
                                  "content": [{"type": "reasoning_text", "text": ""}]})
            self._items[-1]["content"][0]["text"] += thinking
            out.append(self._event("response.reasoning_text.delta", {
                "item_id": self._items[-1]["id"], "output_index": len(self._items) - 1, "content_index": 0,
                "delta": thinking}))
        if chunk.text or chunk.logprobs:
            if self._open != "message":
                out += self._add({"type": "message", "id": new_id("msg"), "status": "in_progress",
                                  "role": "assistant",
                                  "content": [{"type": "output_text", "text": "", "annotations": [], "logprobs": []}]})
            part = self._items[-1]["content"][0]
            entries = (chunk.logprobs or {}).get("content") or []
            part["text"] += chunk.text
            part["logprobs"] += entries
            out.append(self._event("response.output_text.delta", {
                "item_id": self._items[-1]["id"], "output_index": len(self._items) - 1, "content_index": 0,
                "delta": chunk.text, "logprobs": entries}))
        for tc in chunk.tool_calls or ():
            i = tc.get("index", 0)
            fn = tc.get("function") or {}
            if i not in self._calls:
                out += self._add({"type": "function_call", "id": new_id("fc"),
                                  "call_id": tc.get("id") or new_id("call"), "name": fn.get("name") or "",
                                  "arguments": "", "status": "in_progress"})
                self._calls[i] = len(self._items) - 1
            if fn.get("arguments"):
                item = self._items[self._calls[i]]
                item["arguments"] += fn["arguments"]
                out.append(self._event("response.function_call_arguments.delta", {
                    "item_id": item["id"], "output_index": self._calls[i], "delta": fn["arguments"]}))
        if chunk.finish_reason:
            self._finish = chunk.finish_reason
        return b"".join(out)

    def _done(self, flow: "Gathered", output: list[dict[str, Any]]) -> dict[str, Any]:
        finish = flow.reply.finish_reason
        self.final = self.response("incomplete" if finish == "length" else "completed", flow.reply.usage or Usage(),
                                   output, finish)
        return self.final

    def tail(self, flow: "Gathered") -> bytes:
        closing = self._close()
        final = self._done(flow, self._items)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        return b"".join([*closing, self._event(kind, {"response": final})])

    def error(self, exc: AnyadError) -> bytes:
        return self._event("error", {"code": exc.code or exc.type, "message": exc.message, "param": exc.param})

    def whole(self, flow: "Gathered") -> bytes:
        reply = flow.reply
        message = reply.message()
        output: list[dict[str, Any]] = []
        if message.get("reasoning_content"):
            output.append({"type": "reasoning", "id": new_id("rs"), "summary": [], "status": "completed",
                           "content": [{"type": "reasoning_text", "text": message["reasoning_content"]}]})
        if reply.text:
            output.append({"type": "message", "id": new_id("msg"), "status": "completed", "role": "assistant",
                           "content": [{"type": "output_text", "text": reply.text, "annotations": [],
                                        "logprobs": (reply.logprobs or {}).get("content") or []}]})
        for tc in message.get("tool_calls") or ():
            output.append({"type": "function_call", "id": new_id("fc"), "call_id": tc.get("id") or new_id("call"),
                           "name": tc["function"]["name"], "arguments": tc["function"]["arguments"],
                           "status": "completed"})
        return dumpb(self._done(flow, output))


ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}


def stored_items(items: Any, taken: set[str]) -> list[dict[str, Any]]:
    """A request's ``input`` (valid: ``input_messages`` took it) as the items a stored
    response lists, OpenAI's way: each with an id (the one it came with, unless ``taken``
    has it already: ids in ``taken`` and those given out here are unique), a status, and
    a message's text as a content part. ``taken`` grows by the ids given out."""
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": items}]
    out = []
    for item in items:
        kind = item.get("type", "message")
        given = item.get("id")
        fresh = not isinstance(given, str) or not given or given in taken
        iid = new_id(ITEM_PREFIX.get(kind, "item")) if fresh else given
        taken.add(iid)
        entry = {**item, "id": iid, "type": kind, "status": item.get("status") or "completed"}
        if kind == "message" and isinstance(item.get("content"), str):
            entry["content"] = [{"type": "output_text", "text": item["content"], "annotations": []}
                                if item.get("role") == "assistant" else {"type": "input_text", "text": item["content"]}]
        out.append(entry)
    return out


def output_messages(response: dict[str, Any]) -> list[dict[str, Any]]:
    """A response's output as the chat messages a continuation sends back."""
    text, calls = "", []
    for item in response.get("output") or ():
        if item.get("type") == "message":
            text += "".join(p.get("text") or "" for p in item.get("content") or ())
        elif item.get("type") == "function_call":
            calls.append({"id": item["call_id"], "type": "function",
                          "function": {"name": item["name"], "arguments": item["arguments"]}})
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return [message]
