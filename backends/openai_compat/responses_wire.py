"""A chat request on a provider that speaks OpenAI's Responses API (``api = "responses"``):
the request as a Responses body, and the reply (whole, or its event stream) as chunks.

Some models answer only there (OpenAI's codex and pro models), and any door can reach
them: the chat, Messages and Responses doors all hand the backend a chat request, and
the conversation is kept by anyad (``store: false`` upstream; nothing is left on the
provider to continue from).
"""

from __future__ import annotations

from typing import Any

from anyad.errors import BackendError, InvalidRequest
from anyad.stream import ChatRequest, Chunk, SamplingParams, Usage, content_text

# Chat fields the Responses API has no place for: a 400 naming them, never a reply that
# ignored them. (temperature, top_p, max_tokens, tools, tool_choice, parallel_tool_calls,
# response_format and reasoning_effort map onto its own.)
UNSUPPORTED = {
    "stop": "stop sequences", "n": "more than one choice", "logprobs": "log probabilities",
    "seed": "a seed", "presence_penalty": "a presence penalty", "frequency_penalty": "a frequency penalty",
    "logit_bias": "logit bias", "top_k": "top_k", "min_p": "min_p", "repeat_penalty": "repeat_penalty",
    "suffix": "fill-in-the-middle",
}
# Chat body fields (not sampling parameters) the Responses API has no place for here: a 400
# naming them too. (``verbosity`` goes as ``text.verbosity``.)
UNSUPPORTED_BODY = {
    "web_search_options": "web search options (its web search is a tool of its own, which anyad does not offer)",
    "audio": "audio output", "modalities": "output modalities but text",
    "prediction": "predicted outputs",
}
# Body fields both APIs share, sent on as the client wrote them.
SHARED = ("user", "metadata", "service_tier", "prompt_cache_key", "safety_identifier")


def _refuse(params: SamplingParams, body: dict[str, Any], provider: str) -> None:
    for name, what in UNSUPPORTED.items():
        value = getattr(params, name)
        if value not in (None, []) and not (name == "n" and value == 1):
            raise InvalidRequest(f"{name}: {provider} is reached through the Responses API, which has no "
                                 f"{what}", param=name)
    for name, what in UNSUPPORTED_BODY.items():
        value = body.get(name)
        if value is None or (name == "modalities" and value == ["text"]):
            continue
        raise InvalidRequest(f"{name}: {provider} is reached through the Responses API, and anyad carries no "
                             f"{what} there", param=name)


def _parts(content: Any) -> str | list[dict[str, Any]]:
    if not isinstance(content, list):
        return content or ""
    out: list[dict[str, Any]] = []
    for p in content:
        if p.get("type") == "text":
            out.append({"type": "input_text", "text": p.get("text") or ""})
        elif p.get("type") == "image_url":
            image = p.get("image_url") or {}
            part = {"type": "input_image", "image_url": image.get("url")}
            if image.get("detail"):
                part["detail"] = image["detail"]
            out.append(part)
        else:
            raise InvalidRequest(f"a {p.get('type')!r} part cannot go to a Responses provider (text and "
                                 "image_url can)", param="messages")
    return out


def input_items(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages → Responses input items, in order."""
    items: list[dict[str, Any]] = []
    for m in messages:
        role = m.get("role")
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": m.get("tool_call_id") or "",
                          "output": content_text(m.get("content"))})
        elif role == "assistant":
            if m.get("content"):
                items.append({"type": "message", "role": "assistant", "content": content_text(m["content"])})
            for call in m.get("tool_calls") or []:
                fn = call.get("function") or {}
                items.append({"type": "function_call", "call_id": call.get("id") or "", "name": fn.get("name"),
                              "arguments": fn.get("arguments") or "{}"})
        else:
            items.append({"type": "message", "role": "developer" if role == "developer" else role,
                          "content": _parts(m.get("content"))})
    return items


def _tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict):
        return {"type": "function", "name": (choice.get("function") or {}).get("name")}
    return choice


def _format(rf: dict[str, Any]) -> dict[str, Any]:
    if rf.get("type") == "json_schema":
        js = rf.get("json_schema") or {}
        fmt = {"type": "json_schema", "name": js.get("name") or "output", "schema": js.get("schema") or {}}
        if js.get("strict") is not None:
            fmt["strict"] = js["strict"]
        return fmt
    return {"type": rf.get("type") or "text"}


def request_body(request: ChatRequest, model: str, provider: str) -> dict[str, Any]:
    """The Responses body for ``request`` (InvalidRequest: a field it cannot carry)."""
    if request.raw:
        raise InvalidRequest(f"{provider} is reached through the Responses API, which continues no raw "
                             "prompt: use /v1/chat/completions or /v1/responses", param="prompt")
    p = request.params
    _refuse(p, request.body, provider)
    body: dict[str, Any] = {"model": model, "input": input_items(request.messages), "store": False,
                            "stream": request.stream}
    for ours, theirs in (("max_tokens", "max_output_tokens"), ("temperature", "temperature"), ("top_p", "top_p"),
                         ("parallel_tool_calls", "parallel_tool_calls")):
        if getattr(p, ours) is not None:
            body[theirs] = getattr(p, ours)
    if p.tools:
        body["tools"] = [{"type": "function", **t.get("function", {})} for t in p.tools]
    if p.tool_choice is not None:
        body["tool_choice"] = _tool_choice(p.tool_choice)
    if p.response_format is not None:
        body["text"] = {"format": _format(p.response_format)}
    if request.body.get("verbosity") is not None:
        body["text"] = {**body.get("text", {}), "verbosity": request.body["verbosity"]}
    if p.reasoning_effort is not None:
        body["reasoning"] = {"effort": p.reasoning_effort, "summary": "auto"}
    for name in SHARED:
        if request.body.get(name) is not None:
            body[name] = request.body[name]
    return body


def _usage(u: Any) -> Usage | None:
    if not isinstance(u, dict):
        return None
    return Usage(int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0))


def _finish(response: dict[str, Any], called: bool) -> str:
    if response.get("status") == "incomplete":
        reason = (response.get("incomplete_details") or {}).get("reason")
        return "content_filter" if reason == "content_filter" else "length"
    return "tool_calls" if called else "stop"


def _failure(provider: str, response: Any) -> BackendError:
    err = (response or {}).get("error") if isinstance(response, dict) else None
    msg = err.get("message") if isinstance(err, dict) else None
    return BackendError(f"{provider}: {msg or 'the response failed'}")


def chunks_from_response(data: Any, provider: str) -> list[Chunk]:
    """A whole Responses reply → one final chunk (ValueError: not a response)."""
    if not isinstance(data, dict) or not isinstance(data.get("output"), list):
        raise ValueError("the reply has no output")
    if data.get("status") == "failed":
        raise _failure(provider, data)
    text, reasoning, refusal = [], [], []
    calls: list[dict[str, Any]] = []
    for item in data["output"]:
        kind = item.get("type")
        if kind == "message":
            for part in item.get("content") or []:
                if part.get("type") == "output_text":
                    text.append(part.get("text") or "")
                elif part.get("type") == "refusal":
                    refusal.append(part.get("refusal") or "")
        elif kind == "function_call":
            calls.append({"index": len(calls), "id": item.get("call_id") or item.get("id"), "type": "function",
                          "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}})
        elif kind == "reasoning":
            for part in (item.get("summary") or []) + (item.get("content") or []):
                reasoning.append(part.get("text") or "")
    extra = {k: "".join(v) for k, v in (("reasoning_content", reasoning), ("refusal", refusal)) if v}
    return [Chunk(text="".join(text), finish_reason=_finish(data, bool(calls)), usage=_usage(data.get("usage")),
                  tool_calls=calls or None, extra=extra or None)]


class EventReader:
    """A Responses event stream → chunks, event by event. Function calls are numbered in
    the order they open (chat's tool-call ``index``); ``done`` once the response ended."""

    def __init__(self, provider: str) -> None:
        self.provider = provider
        self.calls: dict[Any, int] = {}  # output_index → tool-call index
        self.done = False

    def feed(self, ev: dict[str, Any]) -> list[Chunk]:
        kind = ev.get("type")
        if kind == "response.output_text.delta":
            return [Chunk(text=ev.get("delta") or "")]
        if kind in ("response.reasoning_summary_text.delta", "response.reasoning_text.delta"):
            return [Chunk(extra={"reasoning_content": ev.get("delta") or ""})]
        if kind == "response.refusal.delta":
            return [Chunk(extra={"refusal": ev.get("delta") or ""})]
        if kind == "response.output_item.added" and (ev.get("item") or {}).get("type") == "function_call":
            item = ev["item"]
            i = self.calls[ev.get("output_index")] = len(self.calls)
            return [Chunk(tool_calls=[{"index": i, "id": item.get("call_id") or item.get("id"), "type": "function",
                                       "function": {"name": item.get("name"),
                                                    "arguments": item.get("arguments") or ""}}])]
        if kind == "response.function_call_arguments.delta":
            opened = self.calls.get(ev.get("output_index"))
            if opened is None:
                raise ValueError("arguments for a call that never opened")
            return [Chunk(tool_calls=[{"index": opened, "function": {"arguments": ev.get("delta") or ""}}])]
        if kind in ("response.completed", "response.incomplete"):
            self.done = True
            response = ev.get("response") or {}
            return [Chunk(finish_reason=_finish(response, bool(self.calls)), usage=_usage(response.get("usage")))]
        if kind == "response.failed":
            raise _failure(self.provider, ev.get("response"))
        if kind == "error":
            raise BackendError(f"{self.provider}: {ev.get('message') or 'the stream failed'}")
        return []  # created, in_progress, *.added/done beside the deltas: nothing new
