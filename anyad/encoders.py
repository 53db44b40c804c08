"""Internal chunks → OpenAI chat-completions JSON and SSE, at the edge.

Stream chunks are built from byte templates fixed per reply, with only the
JSON-encoded text spliced in: the per-token cost stays a few microseconds.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Protocol

from anyad.jsoncodec import dumpb
from anyad.stream import Chunk, Usage

if TYPE_CHECKING:
    from anyad.errors import AnyadError

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


class Gathered(Protocol):
    """What a door's writer reads of the flow at a reply's end (``anyad.chatflow.ChatFlow``):
    the reply gathered from the chunks, and one per choice (the first is ``reply``)."""

    reply: Reply
    choices: list[Reply]


class OpenAIEncoder:
    def __init__(self, model: str, *, include_usage: bool = False) -> None:
        self.id = "chatcmpl-" + os.urandom(12).hex()
        self.model = model
        self.created = int(time.time())
        self.include_usage = include_usage
        self._head = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": model,
                      "system_fingerprint": None}
        self._delta_head = b""
        self._delta_tail = b""
        self._finishes: dict[int, bytes] = {}

    def _templates(self) -> None:
        # Built on the first streamed delta only: a non-streamed reply never needs them.
        head_json = dumpb(self._head).decode()[:-1]
        usage_tail = ',"usage":null' if self.include_usage else ""
        self._delta_head = (f'data: {head_json},"choices":[{{"index":0,"delta":{{"content":').encode()
        self._delta_tail = (f'}},"logprobs":null,"finish_reason":null}}]{usage_tail}}}\n\n').encode()

    def _event(self, choices: list[dict[str, Any]], usage: Usage | None = None, with_usage: bool = False) -> bytes:
        obj = {**self._head, "choices": choices}
        if self.include_usage or with_usage:
            obj["usage"] = usage.as_dict() if usage else None
        return b"data: " + dumpb(obj) + b"\n\n"

    def role(self) -> bytes:
        return self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}])

    def delta(self, text: str) -> bytes:
        if not self._delta_head:
            self._templates()
        return self._delta_head + dumpb(text) + self._delta_tail

    def chunk(self, chunk: Chunk) -> bytes:
        """Any chunk with content for the client; plain text takes the fast path."""
        if chunk.tool_calls is None and chunk.extra is None and chunk.logprobs is None and not chunk.index:
            return self.delta(chunk.text)
        delta: dict[str, Any] = dict(chunk.extra or {})
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.tool_calls is not None:
            delta["tool_calls"] = chunk.tool_calls
        return self._event([{"index": chunk.index, "delta": delta, "logprobs": chunk.logprobs,
                             "finish_reason": None}])

    def finish(self, reason: str, index: int = 0) -> bytes:
        return self._event([{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def usage(self, usage: Usage) -> bytes:
        """OpenAI's extra last chunk for ``stream_options.include_usage``: no choices, the usage."""
        return self._event([], usage, with_usage=True)

    # As a ReplyWriter (anyad.chatflow) for /v1/chat/completions.

    stream_headers = SSE_HEADERS

    def head(self) -> bytes:
        return self.role()

    def piece(self, chunk: Chunk) -> bytes:
        if chunk.finish_reason and chunk.index not in self._finishes:
            # Held back until the stream ends (the usage chunk and [DONE] follow at once),
            # so the tail of the reply is one write.
            self._finishes[chunk.index] = self.finish(chunk.finish_reason, chunk.index)
        if chunk.text or chunk.tool_calls or chunk.extra or chunk.logprobs:
            return self.chunk(chunk)
        return b""

    def tail(self, flow: "Gathered") -> bytes:
        out = [self._finishes[i] for i in sorted(self._finishes)]
        if self.include_usage:
            out.append(self.usage(flow.reply.usage or Usage()))
        out.append(DONE)
        return b"".join(out)

    def error(self, exc: "AnyadError") -> bytes:
        # As OpenAI does: an error event, and no [DONE].
        return sse_error(exc.body())

    def whole(self, flow: "Gathered") -> bytes:
        return dumpb(self.completion(flow.choices))

    def completion(self, replies: "list[Reply]") -> dict[str, Any]:
        """The whole answer: one choice per reply (the first carries the usage of all)."""
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "system_fingerprint": None,
            "choices": [{"index": i, "message": {"role": "assistant", "refusal": None, **r.message()},
                         "logprobs": r.logprobs, "finish_reason": r.finish_reason} for i, r in enumerate(replies)],
            "usage": (replies[0].usage or Usage()).as_dict(),
        }


class Reply:
    """A whole reply gathered from chunks (for non-streaming answers and the history): tool-call
    deltas are merged by index (arguments concatenated), as OpenAI's SDKs do."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.note: str | None = None  # the backend's, for a response header (Chunk.note)
        self.tokens: list[int] | None = None  # the prompt's and reply's token ids, when asked (Chunk.tokens)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def message(self) -> dict[str, Any]:
        """The assistant message as OpenAI writes it (also what the history records)."""
        message: dict[str, Any] = {"role": "assistant", **self.extra,
                                   "content": self.text if self.text or not self.tool_calls else None}
        if self.tool_calls:
            message["tool_calls"] = [self.tool_calls[i] for i in sorted(self.tool_calls)]
        return message

    def add(self, chunk: Chunk) -> None:
        if chunk.text:
            self.parts.append(chunk.text)
        for tc in chunk.tool_calls or ():
            i = tc.get("index", len(self.tool_calls))
            cur = self.tool_calls.get(i)
            if cur is None:
                cur = self.tool_calls[i] = {"id": tc.get("id"), "type": tc.get("type", "function"),
                                            "function": {"name": "", "arguments": ""}}
            if tc.get("id"):
                cur["id"] = tc["id"]
            fn = tc.get("function") or {}
            cur["function"]["name"] += fn.get("name") or ""
            cur["function"]["arguments"] += fn.get("arguments") or ""
        for k, v in (chunk.extra or {}).items():
            before = self.extra.get(k, "")
            self.extra[k] = before + v if isinstance(v, str) and isinstance(before, str) else v
        if chunk.logprobs:
            if self.logprobs is None:
                self.logprobs = {"content": [], "refusal": None}
            self.logprobs["content"].extend(chunk.logprobs.get("content") or [])
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
        if chunk.note:
            self.note = chunk.note
        if chunk.tokens is not None:
            self.tokens = chunk.tokens
        if chunk.usage is not None:
            self.usage = chunk.usage


def sse_error(body: dict[str, Any]) -> bytes:
    return b"data: " + dumpb(body) + b"\n\n"


class CompletionEncoder:
    """Internal chunks → OpenAI's (legacy) ``text_completion`` JSON and SSE: a ReplyWriter for
    ``/v1/completions``. ``prompts`` are the client's, for ``echo``; choice i answers prompt
    i // n."""

    stream_headers = SSE_HEADERS

    def __init__(self, model: str, prompts: list[str], n: int, *, echo: bool = False,
                 include_usage: bool = False) -> None:
        self.id = "cmpl-" + os.urandom(12).hex()
        self.model = model
        self.created = int(time.time())
        self.prompts, self.n, self.echo, self.include_usage = prompts, n, echo, include_usage
        self._echoed: set[int] = set()
        self._offsets: dict[int, int] = {}
        self._finishes: dict[int, str] = {}

    def _prefix(self, index: int) -> str:
        """The prompt once, before a choice's first text, when echoing."""
        if not self.echo or index in self._echoed:
            return ""
        self._echoed.add(index)
        return self.prompts[index // self.n] if index // self.n < len(self.prompts) else ""

    def _legacy(self, index: int, logprobs: dict[str, Any] | None) -> dict[str, Any] | None:
        """Chat's logprobs entries as completions' parallel lists, with each token's offset
        in the choice's text."""
        if not logprobs:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        offset = self._offsets.get(index, 0)
        for e in logprobs.get("content") or []:
            out["tokens"].append(e["token"])
            out["token_logprobs"].append(e["logprob"])
            out["top_logprobs"].append({a["token"]: a["logprob"] for a in e.get("top_logprobs") or []})
            out["text_offset"].append(offset)
            offset += len(e["token"])
        self._offsets[index] = offset
        return out

    def _event(self, choices: list[dict[str, Any]], usage: Usage | None = None, with_usage: bool = False) -> bytes:
        obj: dict[str, Any] = {"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage or with_usage:
            obj["usage"] = usage.as_dict() if usage else None
        return b"data: " + dumpb(obj) + b"\n\n"

    def head(self) -> bytes:
        return b""

    def piece(self, chunk: Chunk) -> bytes:
        i = chunk.index
        if chunk.finish_reason:
            self._finishes.setdefault(i, chunk.finish_reason)
        if not (chunk.text or chunk.logprobs):
            return b""
        prefix = self._prefix(i)
        if prefix and i not in self._offsets:
            self._offsets[i] = len(prefix)
        return self._event([{"text": prefix + chunk.text, "index": i, "logprobs": self._legacy(i, chunk.logprobs),
                             "finish_reason": None}])

    def tail(self, flow: "Gathered") -> bytes:
        out = [self._event([{"text": self._prefix(i), "index": i, "logprobs": None, "finish_reason": reason}])
               for i, reason in sorted(self._finishes.items())]
        if self.include_usage:
            out.append(self._event([], flow.reply.usage or Usage(), with_usage=True))
        out.append(DONE)
        return b"".join(out)

    def error(self, exc: "AnyadError") -> bytes:
        return sse_error(exc.body())

    def whole(self, flow: "Gathered") -> bytes:
        choices = []
        for i, r in enumerate(flow.choices):
            prefix = self._prefix(i)
            self._offsets[i] = len(prefix)
            choices.append({"text": prefix + r.text, "index": i, "logprobs": self._legacy(i, r.logprobs),
                            "finish_reason": r.finish_reason})
        return dumpb({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                      "system_fingerprint": None, "choices": choices,
                      "usage": (flow.reply.usage or Usage()).as_dict()})
