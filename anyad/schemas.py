"""OpenAI wire formats at the edge: request models (pydantic) and their translation.

Unknown fields are kept (``extra="allow"``) rather than rejected: clients send
many vendor-specific fields, and remote backends may relay them.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from anyad.config import KeepAlive
from anyad.errors import InvalidRequest
from anyad.stream import ChatRequest, SamplingParams


M = TypeVar("M", bound=BaseModel)


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None



class StreamOptions(_Open):
    include_usage: bool = False


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @field_validator("json_schema")
    @classmethod
    def _has_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("schema", {}), dict):
            raise ValueError("json_schema.schema must be an object")
        return v


class ChatCompletionRequest(_Open):
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    # Ollama's: how long a local model stays loaded after this request ("5m", 0, -1).
    keep_alive: KeepAlive | None = None

    @field_validator("stop")
    @classmethod
    def _stop_limit(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 16:
            raise ValueError("at most 16 stop sequences")
        return v

    def to_internal(self, body: dict[str, Any]) -> ChatRequest:
        if self.n not in (None, 1):
            raise InvalidRequest("n other than 1 is not supported: ask once per completion", param="n")
        if self.response_format is not None and self.response_format.type == "json_schema" \
                and not self.response_format.json_schema:
            raise InvalidRequest("response_format of type json_schema needs a json_schema object",
                                 param="response_format.json_schema")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        rf = self.response_format
        params = SamplingParams(
            max_tokens=self.max_completion_tokens or self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=[s for s in stop if s],
            logit_bias=self.logit_bias,
            response_format=None if rf is None or rf.type == "text" else rf.model_dump(exclude_none=True),
        )
        if "keep_alive" in body:
            # anyad's own field: a remote provider would refuse it as unknown.
            body = {k: v for k, v in body.items() if k != "keep_alive"}
        return ChatRequest(
            model=self.model,
            keep_alive=self.keep_alive,
            messages=body["messages"],
            params=params,
            stream=self.stream,
            include_usage=bool(self.stream_options and self.stream_options.include_usage),
            body=body,
        )


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none"}


class EmbeddingsRequest(_Open):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        if v == "" or v == [] or (isinstance(v, list) and any(x == "" or x == [] for x in v)):
            raise ValueError("input must not be empty")
        if isinstance(v, list) and len(v) > 2048:
            raise ValueError("at most 2048 inputs per request")
        return v

    def inputs(self) -> list[str] | list[list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if self.input and isinstance(self.input[0], int):
            return [self.input]  # type: ignore[list-item]  # one token array
        return self.input  # type: ignore[return-value]

    def options(self) -> dict[str, Any]:
        return {k: v for k, v in {"dimensions": self.dimensions, "user": self.user}.items() if v is not None}


def param_path(loc: tuple[Any, ...]) -> str:
    """pydantic's location tuple as OpenAI writes a param: ``messages[0].role``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not out:
            out = str(part)
        else:
            out += f".{part}"
    return out


def validate(model: type[M], data: Any) -> M:
    """The body as ``model``, or a 400 whose ``param`` names the first field at fault."""
    if not isinstance(data, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        # A union reports each failed member under its type's name ("str", "list[str]");
        # those are not fields, so they are left out of the path.
        loc = tuple(p for p in err["loc"] if isinstance(p, int) or (p.isidentifier() and p not in _TYPE_NAMES))
        param = param_path(loc)
        msg = err["msg"].removeprefix("Value error, ")
        raise InvalidRequest(f"{param}: {msg}", param=param or None) from None


def parse_chat_request(data: Any) -> ChatRequest:
    return validate(ChatCompletionRequest, data).to_internal(data)
