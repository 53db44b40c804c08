"""The one internal representation of a chat request and of its streamed reply.

Handlers turn wire formats into a ``ChatRequest``; every backend answers with an
async iterator of ``Chunk``; encoders turn chunks back into a wire format. No
backend sees HTTP and no handler sees an engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncGenerator


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Of the prompt tokens, those the engine found in its cache and did not read again;
    # None: the engine does not say.
    cached_tokens: int | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                               "total_tokens": self.total_tokens}
        if self.cached_tokens is not None:
            out["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return out


@dataclass(slots=True)
class SamplingParams:
    """Everything that changes the output; ``None`` means the backend's default."""

    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[str, float] | None = None
    # Go on to max_tokens past the end-of-turn token (llama.cpp server's and vLLM's field).
    ignore_eos: bool | None = None
    # Log probabilities of the sampled tokens, each with this many most likely alternatives
    # (OpenAI's ``logprobs: true`` with ``top_logprobs``); None: none asked.
    logprobs: int | None = None
    # Choices from the one prompt (OpenAI's ``n``); None: one.
    n: int | None = None
    # {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}
    response_format: dict[str, Any] | None = None
    # OpenAI's tools ({"type": "function", "function": {"name", "parameters", ...}}) and
    # tool_choice ("none" | "auto" | "required" | {"type": "function", "function": {"name"}}).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # "none" switches a model's thinking off where its template can; any other effort on.
    reasoning_effort: str | None = None
    # llama.cpp server's name: "none" leaves the reasoning inline in the content.
    reasoning_format: str | None = None
    # Fill-in-the-middle: the text after the gap (a completions request's ``suffix``).
    suffix: str | None = None
    # Ollama's generate: the token ids of an earlier prompt and reply that this prompt goes
    # on from (``context``), and whether the reply's last chunk brings the tokens of this
    # prompt and reply back (``Chunk.tokens``); local models only.
    context: list[int] | None = None
    return_tokens: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__ if getattr(self, k) not in (None, [])}


def content_text(content: Any) -> str:
    """A message's text: the string itself, or its text parts joined (other parts skipped)."""
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


@dataclass(slots=True)
class ChatRequest:
    model: str
    # As the client sent them (content parts included); a local backend flattens them.
    messages: list[dict[str, Any]]
    params: SamplingParams = field(default_factory=SamplingParams)
    # The completions door: each message's content is a raw prompt, continued as it is (no
    # chat template); choices are numbered prompt by prompt (prompt i's are i*n … i*n+n-1).
    raw: bool = False
    stream: bool = False
    include_usage: bool = False
    # Seconds the model stays loaded after this request (Ollama's keep_alive); None: its default.
    keep_alive: float | None = None
    # Who the request is from, for a weighted route's sticky assignment (the conversation
    # id, else the API key's digest, else the client's address); None: no stickiness.
    route_key: str | None = None
    # The whole validated request body: relaying backends send it on with the fields
    # anyad does not interpret (tools, tool_choice, logprobs, user, …) unchanged.
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def choices(self) -> int:
        """How many choices the reply has: ``n`` per prompt."""
        return (self.params.n or 1) * (len(self.messages) if self.raw else 1)


@dataclass(slots=True)
class Chunk:
    """One piece of a reply: text and/or tool-call deltas, or (last) the finish reason with the usage."""

    text: str = ""
    # Which of the request's ``n`` choices this piece belongs to; each choice ends with its
    # own finish reason, and the usage (of all of them) comes with the last.
    index: int = 0
    finish_reason: str | None = None
    usage: Usage | None = None
    # OpenAI tool-call deltas ({"index", "id", "type", "function": {"name", "arguments"}}).
    tool_calls: list[dict[str, Any]] | None = None
    # Delta fields anyad does not interpret (reasoning_content, refusal, …), relayed as they came.
    extra: dict[str, Any] | None = None
    logprobs: dict[str, Any] | None = None
    # Why the backend answered otherwise than the model wrote (e.g. a malformed tool call
    # returned as text); for a log line and a response header, never for the client's body.
    note: str | None = None
    # With the last chunk, when ``SamplingParams.return_tokens`` asked: the token ids of the
    # prompt and the reply (what Ollama's generate returns as ``context``).
    tokens: list[int] | None = None


# What a backend's ``chat`` returns (an async generator: callers ``aclose`` what they abandon).
ChunkStream = AsyncGenerator[Chunk, None]
