"""What anyad does with every request field, as data, and the checks that hold it to that.

For each field of OpenAI's chat completions and of Ollama's ``/api/chat`` and
``/api/generate`` (and their ``options``), a local model either honours it, ignores it
on purpose (for the reason given), or refuses it with a 400 naming the field, so that no
field a client relies on is dropped without a word. Remote providers get the body as the
client sent it: the OpenAI check runs in the local backend, only for the local model.

A refused field is refused only when it asks for something: sent at its default
(``n: 1``, ``raw: false``, ``typical_p: 1``) it asks for nothing and passes.
Fields not in a table are ignored, as OpenAI's vendor extras and Ollama's unknown
options are elsewhere: refusing them would break clients that send their own.

The README's "Request fields" section is ``markdown()``'s output; a test holds them equal
(``python -m anyad.fields`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal

from anyad.errors import InvalidRequest

Treatment = Literal["honoured", "ignored", "refused"]


def unset(value: Any) -> bool:
    """Absent, null, off or empty: the value of a field that asks for nothing."""
    return value is None or value is False or value in ("", [], {})


def absent(value: Any) -> bool:
    """Only null asks for nothing (an empty ``web_search_options`` still turns search on)."""
    return value is None


def default(*values: Any) -> Callable[[Any], bool]:
    """Inert at null and at these values: the engine's defaults, or a choice it makes anyway."""
    return lambda value: value is None or value in values


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    local: Treatment
    # honoured: what it does; ignored: why that is right; refused: why, in the 400's message.
    why: str
    inert: Callable[[Any], bool] = unset
    # Ollama's: the endpoints that have the field ("chat", "generate").
    endpoints: tuple[str, ...] = ()


def _fields(local: Treatment, why: str, names: Iterable[str], **kw: Any) -> list[Field]:
    return [Field(name, local, why, **kw) for name in names]


LOGPROBS = ("the sampled tokens' log probabilities from the model's raw logits (before temperature, "
            "penalties and grammar), stream and non-stream")
TOP_LOGPROBS = "up to 20 most likely alternatives per token, from the same logits"
ONE_TIER = "a local model has one service tier: its queue (`queue_timeout_s`) decides who waits"

OPENAI: tuple[Field, ...] = (
    Field("model", "honoured", "a local model, `provider/model` or a route"),
    Field("messages", "honoured", "rendered with the model's chat template; image parts (`data:` URLs, never "
                                  "fetched) on a model with a vision projector (`mmproj`), a 400 on one "
                                  "without; other parts a 400"),
    Field("audio", "refused", "local models do not speak: they answer in text only"),
    Field("frequency_penalty", "honoured", "llama.cpp's frequency penalty"),
    Field("function_call", "refused", "the deprecated functions API is not supported: use `tool_choice`",
          inert=default("none", "auto")),
    Field("functions", "refused", "the deprecated functions API is not supported: use `tools`"),
    Field("logit_bias", "honoured", "token ids of the model's own vocabulary"),
    Field("logprobs", "honoured", LOGPROBS),
    Field("top_logprobs", "honoured", TOP_LOGPROBS),
    Field("max_tokens", "honoured", "capped at the end of the context (`finish_reason: \"length\"`)"),
    Field("max_completion_tokens", "honoured", "as `max_tokens`, which it takes precedence over"),
    Field("metadata", "ignored", "tags for OpenAI's dashboard; anyad's history has its own conversation ids"),
    Field("modalities", "refused", "local models answer in text only", inert=default(["text"])),
    Field("moderation", "refused", "anyad runs no moderation model, so it can neither score nor block",
          inert=absent),
    Field("n", "honoured", "up to 16 choices from one reading of the prompt (each further choice reuses it "
                           "in the context; with a `seed`, choice i samples with seed + i); streamed one "
                           "choice after another; the history keeps the first"),
    Field("parallel_tool_calls", "honoured", "whether one reply may call several tools"),
    Field("prediction", "ignored", "predicted output only makes OpenAI's reply faster, never different"),
    Field("presence_penalty", "honoured", "llama.cpp's presence penalty"),
    Field("prompt_cache_key", "ignored", "a routing hint for OpenAI's prompt cache; llama.cpp reuses the "
                                         "longest common prompt prefix by itself"),
    Field("prompt_cache_options", "ignored", "OpenAI's prompt cache settings; llama.cpp keeps its own"),
    Field("prompt_cache_retention", "ignored", "OpenAI's prompt cache settings; llama.cpp keeps its own"),
    Field("reasoning_effort", "honoured", "through the template's thinking switch, where it has one"),
    Field("response_format", "honoured", "`json_object` and `json_schema`, enforced by a llama.cpp grammar"),
    Field("safety_identifier", "ignored", "an end-user id for OpenAI's abuse monitoring; anyad knows clients "
                                          "by their API key"),
    Field("seed", "honoured", "the sampler's seed"),
    Field("service_tier", "ignored", ONE_TIER),
    Field("stop", "honoured", "up to 16 stop sequences"),
    Field("store", "ignored", "storing for OpenAI's evals; anyad's history is the daemon's setting "
                              "(`history.enabled`)"),
    Field("stream", "honoured", "server-sent events"),
    Field("stream_options", "honoured", "`include_usage`"),
    Field("temperature", "honoured", "0 to 2"),
    Field("tool_choice", "honoured", "`none`, `auto`, `required` or a named function (a grammar enforces the "
                                     "last two)"),
    Field("tools", "honoured", "passed to the model's chat template; its output parsed into `tool_calls`"),
    Field("top_p", "honoured", "nucleus sampling"),
    Field("user", "ignored", "an end-user id for OpenAI's abuse monitoring; anyad knows clients by their "
                             "API key"),
    Field("verbosity", "ignored", "a length hint for OpenAI's GPT-5 models; local models have no such switch "
                                  "(bound the reply with `max_tokens`)"),
    Field("web_search_options", "refused", "local models cannot search the web", inert=absent),
    # anyad's and llama.cpp's own.
    Field("top_k", "honoured", "llama.cpp's top-k sampling"),
    Field("min_p", "honoured", "llama.cpp's min-p sampling"),
    Field("repeat_penalty", "honoured", "llama.cpp's repetition penalty"),
    Field("ignore_eos", "honoured", "generate up to `max_tokens`, past the end-of-turn token (llama.cpp "
                                    "server's and vLLM's field)"),
    Field("keep_alive", "honoured", "how long the model stays loaded after the request (Ollama's); anyad's "
                                    "own, never sent to a provider"),
    Field("reasoning_format", "honoured", "where the reasoning goes: apart in `reasoning_content`, or inline "
                                          "(llama.cpp server's field)"),
    Field("grammar", "refused", "llama.cpp server's raw GBNF is not accepted: use `response_format`"),
    Field("json_schema", "refused", "llama.cpp server's top-level schema is not accepted: use "
                                    "`response_format` of type `json_schema`"),
)

BOTH = ("chat", "generate")
CHAT = ("chat",)
GENERATE = ("generate",)

OLLAMA: tuple[Field, ...] = (
    Field("model", "honoured", "a local model, `provider/model` or a route", endpoints=BOTH),
    Field("messages", "honoured", "with their `images`, `tool_calls` and `tool_name`", endpoints=CHAT),
    Field("prompt", "honoured", "the user message; an empty one loads the model", endpoints=GENERATE),
    Field("system", "honoured", "a system message before the prompt", endpoints=GENERATE),
    Field("images", "honoured", "image parts, on a model with a vision projector (else a 400)",
          endpoints=GENERATE),
    Field("stream", "honoured", "NDJSON, on unless `false`", endpoints=BOTH),
    Field("format", "honoured", "`\"json\"` or a JSON schema, enforced by a grammar", endpoints=BOTH),
    Field("options", "honoured", "see the options table", endpoints=BOTH),
    Field("keep_alive", "honoured", "how long the model stays loaded; `0` with no prompt unloads it",
          endpoints=BOTH),
    Field("tools", "honoured", "as OpenAI's `tools`", endpoints=CHAT),
    Field("think", "honoured", "as OpenAI's `reasoning_effort`", endpoints=BOTH),
    Field("suffix", "honoured", "fill-in-the-middle, the prompt before the gap (no template), on a model whose "
                                "vocabulary has FIM tokens (a code model's; a 400 on others)", endpoints=GENERATE),
    Field("template", "refused", "anyad renders the model's own chat template (or the TEMPLATE it was created "
                                 "with) and takes no per-request one", endpoints=GENERATE),
    Field("context", "honoured", "the token ids a local model's reply returned as `context` (prompt and reply): "
                                 "this prompt continues from them; ignored with `raw`, as Ollama does",
          endpoints=GENERATE),
    Field("raw", "honoured", "the prompt goes to the model as it is, with no template (`system` ignored and no "
                             "`context` returned, as Ollama does)", endpoints=GENERATE),
    Field("truncate", "ignored", "a prompt longer than the context is always a 400, never cut", endpoints=BOTH),
    Field("shift", "ignored", "the context is never shifted: a reply stops at its end (`done_reason: "
                              "\"length\"`)", endpoints=BOTH),
    Field("_debug_render_only", "refused", "anyad does not return the rendered prompt", endpoints=BOTH),
    Field("logprobs", "honoured", LOGPROBS, endpoints=BOTH),
    Field("top_logprobs", "honoured", TOP_LOGPROBS, endpoints=BOTH),
)

LOAD_TIME = ("the model's context, placement and threads are its config's (`models.<id>`: `n_ctx`, "
             "`n_batch`, `n_threads`) and the scheduler's: one request does not reload a model others share")
SAMPLER = "not in anyad's sampler; sent at its default it passes"

OLLAMA_OPTIONS: tuple[Field, ...] = (
    Field("num_predict", "honoured", "`max_tokens`; -1 and -2 mean up to the end of the context"),
    *(Field(name, "honoured", f"as OpenAI's `{name}`") for name in
      ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")),
    *(Field(name, "honoured", f"llama.cpp's `{name}`") for name in ("top_k", "min_p", "repeat_penalty")),
    *_fields("ignored", LOAD_TIME, ("num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "use_mmap",
                                    "use_mlock", "numa", "low_vram", "f16_kv", "vocab_only", "logits_all",
                                    "embedding_only")),
    Field("num_keep", "ignored", "tokens kept when the context shifts, which anyad never does"),
    Field("draft_num_predict", "ignored", "anyad runs no draft model"),
    Field("penalize_newline", "ignored", "gone from llama.cpp (and from Ollama); it does nothing there either"),
    Field("mirostat_tau", "ignored", "only read by mirostat, which is refused"),
    Field("mirostat_eta", "ignored", "only read by mirostat, which is refused"),
    Field("mirostat", "refused", SAMPLER, inert=default(0)),
    Field("typical_p", "refused", SAMPLER, inert=default(1)),
    Field("tfs_z", "refused", SAMPLER, inert=default(1)),
    Field("repeat_last_n", "refused", "the penalty window is llama-cpp-python's fixed 64 tokens",
          inert=default(64)),
)

_REFUSED_OPENAI = tuple(f for f in OPENAI if f.local == "refused")
_REFUSED_OLLAMA = {kind: tuple(f for f in OLLAMA if f.local == "refused" and kind in f.endpoints)
                   for kind in BOTH}
_REFUSED_OPTIONS = tuple(f for f in OLLAMA_OPTIONS if f.local == "refused")


def _first_refused(body: dict[str, Any], refused: tuple[Field, ...]) -> Field | None:
    for f in refused:
        if f.name in body and not f.inert(body[f.name]):
            return f
    return None


def check_local(body: dict[str, Any]) -> None:
    """A 400 naming the first field of this chat completions body that a local model refuses."""
    f = _first_refused(body, _REFUSED_OPENAI)
    if f is not None:
        raise InvalidRequest(f"{f.name} is not supported by local models: {f.why}", param=f.name)


def check_ollama(body: dict[str, Any], endpoint: str) -> None:
    """A 400 naming the first field (or ``options`` key) of an Ollama request that anyad refuses.

    Checked at the door, whatever the target: these fields have no OpenAI equivalent to
    carry them to a provider either."""
    f = _first_refused(body, _REFUSED_OLLAMA.get(endpoint, ()))
    param = f.name if f else None
    options = body.get("options")
    if f is None and isinstance(options, dict):
        f = _first_refused(options, _REFUSED_OPTIONS)
        param = f"options.{f.name}" if f else None
    if f is not None:
        raise InvalidRequest(f"{param} is not supported: {f.why}", param=param)


def _table(fields: Iterable[Field], with_endpoints: bool = False) -> list[str]:
    head = "| field | endpoints | local models | what, or why |" if with_endpoints else \
        "| field | local models | what, or why |"
    rows = [head, "|---|---|---|---|" if with_endpoints else "|---|---|---|"]
    for f in sorted(fields, key=lambda f: (f.local, f.name)):
        where = f" {', '.join(f.endpoints)} |" if with_endpoints else ""
        rows.append(f"| `{f.name}` |{where} {f.local} | {f.why} |")
    return rows


def markdown() -> str:
    """The README's tables of request fields, made from these tables."""
    return "\n".join([
        "OpenAI chat completions (`POST /v1/chat/completions`):", "", *_table(OPENAI), "",
        "Ollama's `/api/chat` and `/api/generate`:", "", *_table(OLLAMA, with_endpoints=True), "",
        "Ollama's `options`:", "", *_table(OLLAMA_OPTIONS),
    ]) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")
