"""OpenAI wire formats at the edge: request models (pydantic) and their translation.

Unknown fields are kept (``extra="allow"``) rather than rejected: clients send
many vendor-specific fields, and remote backends may relay them. Known fields are
strict, as OpenAI's are: ``"stream": "yes"`` or ``"max_tokens": "5"`` is a 400
naming the field, not a guess at what the client meant.
"""

from __future__ import annotations

from typing import Any, Callable, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from anyad.config import KeepAlive
from anyad.errors import InvalidRequest
from anyad.stream import ChatRequest, SamplingParams

M = TypeVar("M", bound=BaseModel)


class Open(BaseModel):
    """A request body: strict about the fields it names, keeping those it does not."""

    model_config = ConfigDict(extra="allow", strict=True)


class ContentPart(Open):
    type: str
    text: str | None = None


class FunctionCall(Open):
    name: str
    arguments: str


class ToolCall(Open):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(Open):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # Before content: its check reads them.
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    content: str | list[ContentPart] | None = Field(None, validate_default=True)
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _content_needed(cls, v: Any, info: ValidationInfo) -> Any:
        # OpenAI's rule: only an assistant message that calls a tool (and the legacy
        # function role) may go without content.
        role = info.data.get("role")
        if v is None and role not in (None, "function") and not (
                role == "assistant" and (info.data.get("tool_calls") or info.data.get("function_call"))):
            raise ValueError(f"a {role} message needs content" if role != "assistant" else
                             "an assistant message needs content or tool_calls")
        if isinstance(v, list) and not v:
            raise ValueError("content must not be an empty list")
        return v



class FunctionDefinition(Open):
    # OpenAI's rule for a function name; it also keeps names safe inside a template and a grammar.
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # A JSON schema of the arguments; none: the function takes no arguments.
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(Open):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(Open):
    name: str


class NamedToolChoice(Open):
    type: Literal["function"]
    function: FunctionName


class StreamOptions(Open):
    include_usage: bool = False


class ResponseFormat(Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @field_validator("json_schema")
    @classmethod
    def _has_schema(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and not isinstance(v.get("schema", {}), dict):
            raise ValueError("json_schema.schema must be an object")
        return v


MAX_CHOICES = 16  # a bound on one request's decoding time, as max_tokens is on each choice's


def token_biases(v: dict[str, float] | None) -> dict[str, float] | None:
    # Checked here, not by the engine: llama-cpp-python applies the bias in a callback
    # that only logs a bad key, once per generated token. Ids past the vocabulary
    # are the worker's check, where the vocabulary is known.
    for key, bias in (v or {}).items():
        if not (key.isascii() and key.isdigit()):
            raise ValueError(f"keys must be token ids (integers as strings), got {key[:40]!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"the bias of token {key} must be between -100 and 100")
    return v


def stop_limit(v: str | list[str] | None) -> str | list[str] | None:
    if isinstance(v, list) and len(v) > 16:
        raise ValueError("at most 16 stop sequences")
    return v


class _Sampling(Open):
    """The fields both OpenAI generation requests (chat and completions) share."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repeat_penalty: float | None = Field(None, ge=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # what llama.cpp (and OpenAI) take
    stop: str | list[str] | None = None
    n: int | None = Field(None, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    # llama.cpp server's and vLLM's: generate to max_tokens, past the model's end-of-turn token.
    ignore_eos: bool | None = None
    # Ollama's: how long a local model stays loaded after this request ("5m", 0, -1).
    keep_alive: KeepAlive | None = None

    _biases = field_validator("logit_bias")(lambda cls, v: token_biases(v))
    _stops = field_validator("stop")(lambda cls, v: stop_limit(v))

    def sampling(self, **more: Any) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repeat_penalty=self.repeat_penalty, presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty, seed=self.seed, stop=[s for s in stop if s],
            logit_bias=self.logit_bias, n=self.n if self.n and self.n > 1 else None,
            ignore_eos=self.ignore_eos or None, **more)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    # llama.cpp server's field: "none" keeps the reasoning inline in the content,
    # "auto"/"deepseek" give it apart as reasoning_content (the default).
    reasoning_format: Literal["auto", "deepseek", "none"] | None = None

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> "ChatCompletionRequest":
        choice = self.tool_choice
        names = [t.function.name for t in self.tools or ()]
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(f"tool_choice: names the function {choice.function.name!r}, which is not one of "
                                 f"the tools ({', '.join(map(repr, names)) or 'none were given'})",
                                 param="tool_choice")
        if choice == "required" and not names:
            raise InvalidRequest("tool_choice: 'required' needs tools", param="tool_choice")
        return self

    def _logprobs(self) -> int | None:
        """How many alternatives each token's log probability comes with; None: none asked."""
        if not self.logprobs:
            if self.top_logprobs:
                raise InvalidRequest("top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        return self.top_logprobs or 0

    def to_internal(self, body: dict[str, Any]) -> ChatRequest:
        if self.response_format is not None and self.response_format.type == "json_schema" \
                and not self.response_format.json_schema:
            raise InvalidRequest("response_format of type json_schema needs a json_schema object",
                                 param="response_format.json_schema")
        rf = self.response_format
        params = self.sampling(
            max_tokens=self.max_completion_tokens or self.max_tokens, logprobs=self._logprobs(),
            response_format=None if rf is None or rf.type == "text" else rf.model_dump(exclude_none=True),
            tools=[t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None,
            tool_choice=self.tool_choice.model_dump(exclude_none=True)
            if isinstance(self.tool_choice, NamedToolChoice) else self.tool_choice,
            parallel_tool_calls=self.parallel_tool_calls, reasoning_effort=self.reasoning_effort,
            reasoning_format=self.reasoning_format,
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
MAX_INPUTS = 2048


def as_inputs(value: str | list[Any]) -> list[Any]:
    """An embeddings ``input`` as the list of inputs it stands for."""
    if isinstance(value, str):
        return [value]
    if value and isinstance(value[0], int):
        return [value]  # one token array
    return value


def input_problem(inputs: list[Any], name: str = "input") -> str | None:
    """What is wrong with a request's embedding inputs, or None: the one rule of every
    embeddings door. An empty input must not reach llama.cpp: its decode fails, and the
    worker's context is left damaged (it aborts on unload)."""
    if not inputs:
        return f"{name} must not be empty"
    if len(inputs) > MAX_INPUTS:
        return f"at most {MAX_INPUTS} inputs per request"
    for i, x in enumerate(inputs):
        if len(x) == 0:
            return f"{name} must not be empty" if len(inputs) == 1 else f"{name}[{i}] is empty"
    return None


def check_inputs(inputs: list[Any], param: str = "input") -> None:
    """``input_problem`` as a 400 naming ``param``, for doors that do not validate with pydantic."""
    problem = input_problem(inputs, param)
    if problem:
        raise InvalidRequest(problem, param=param)


class EmbeddingsRequest(Open):
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None

    @field_validator("input")
    @classmethod
    def _not_empty(cls, v: Any) -> Any:
        problem = input_problem(as_inputs(v))
        if problem:
            raise ValueError(problem)
        return v

    def inputs(self) -> list[str] | list[list[int]]:
        return as_inputs(self.input)

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


def function_tools(tools: Any, convert: Callable[[int, Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Another door's tool list as chat's function tools. ``convert`` turns entry ``i`` into
    a function object (name, parameters, description, ...) or refuses it with a 400; unset
    keys are left out, so a door need not know which ones chat treats as optional."""
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be a list", param="tools")
    return [{"type": "function", "function": {k: v for k, v in convert(i, t).items() if v is not None}}
            for i, t in enumerate(tools)]


def named_tool(name: str) -> dict[str, Any]:
    """chat's ``tool_choice`` forcing one function."""
    return {"type": "function", "function": {"name": name}}


def parse_chat_request(data: Any) -> ChatRequest:
    return validate(ChatCompletionRequest, data).to_internal(data)


MAX_PROMPTS = 16


class CompletionRequest(_Sampling):
    """OpenAI's (legacy) completions: a raw prompt continued, no chat template."""

    prompt: str | list[str]
    suffix: str | None = None
    # OpenAI's default: a completion without max_tokens is 16 tokens, not the whole context.
    max_tokens: int | None = Field(16, ge=1)
    best_of: int | None = Field(None, ge=1, le=MAX_CHOICES)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not 1 <= len(v) <= MAX_PROMPTS:
            raise ValueError(f"send 1 to {MAX_PROMPTS} prompts")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def to_internal(self, body: dict[str, Any]) -> ChatRequest:
        n = self.n or 1
        if self.best_of not in (None, 1, n):
            # best_of ranks candidates by their total log probability: anyad returns every
            # choice it generates instead, so ask for n.
            raise InvalidRequest("best_of other than n is not supported: ask for n choices and pick", param="best_of")
        if self.echo and self.logprobs is not None:
            raise InvalidRequest("echo with logprobs needs the prompt's log probabilities, which anyad does not "
                                 "compute; ask for one or the other", param="echo")
        prompts = self.prompts()
        if self.suffix is not None and len(prompts) > 1:
            raise InvalidRequest("suffix goes with one prompt", param="suffix")
        params = self.sampling(max_tokens=self.max_tokens, logprobs=self.logprobs, suffix=self.suffix)
        if "keep_alive" in body:
            body = {k: v for k, v in body.items() if k != "keep_alive"}
        return ChatRequest(model=self.model, keep_alive=self.keep_alive, raw=True,
                           messages=[{"role": "user", "content": p} for p in prompts], params=params,
                           stream=self.stream,
                           include_usage=bool(self.stream_options and self.stream_options.include_usage), body=body)


def parse_completion_request(data: Any) -> ChatRequest:
    return validate(CompletionRequest, data).to_internal(data)
