"""Nothing silent: every request field in anyad/fields.py's tables, sent through the real
daemon (the tiny model, a fake provider, the Ollama listener), does what the table says:
refused fields are a 400 naming them, ignored and honoured ones are answered, and the
README's section is the tables."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from anyad import fields
from conftest import MODEL_ID

TOOL = {"type": "function", "function": {"name": "lookup", "description": "Look a word up",
                                         "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}

# For each field, a value that asks for what the field does.
OPENAI_ASKS: dict[str, Any] = {
    "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": {"name": "lookup"},
    "functions": [TOOL["function"]], "logit_bias": {"1": 1}, "logprobs": True, "top_logprobs": 2,
    "max_tokens": 2, "max_completion_tokens": 2, "metadata": {"team": "a"}, "modalities": ["text", "audio"],
    "moderation": {"model": "omni-moderation-latest"}, "n": 2, "parallel_tool_calls": False,
    "prediction": {"type": "content", "content": "hello"}, "presence_penalty": 0.5, "prompt_cache_key": "k1",
    "prompt_cache_options": {"mode": "implicit"}, "prompt_cache_retention": "24h", "reasoning_effort": "low",
    "response_format": {"type": "json_object"}, "safety_identifier": "user-1", "seed": 1, "service_tier": "flex",
    "stop": ["\n"], "store": True, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.5,
    "tool_choice": "none", "tools": [TOOL], "top_p": 0.9, "user": "user-1", "verbosity": "low",
    "web_search_options": {}, "top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1, "ignore_eos": True, "keep_alive": "1m",
    "reasoning_format": "none", "grammar": 'root ::= "a"', "json_schema": {"type": "object"},
}
# For each refused field, a value that asks for nothing: it must pass.
OPENAI_INERT: dict[str, Any] = {
    "audio": None, "function_call": "auto", "functions": [], "grammar": "", "json_schema": None,
    "modalities": ["text"], "moderation": None, "web_search_options": None,
}
PNG = base64.b64encode(bytes.fromhex("89504e470d0a1a0a")).decode()
OLLAMA_ASKS: dict[str, Any] = {
    "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "system": "Be brief.",
    "images": [PNG], "stream": True, "format": "json", "options": {"num_predict": 2}, "keep_alive": "1m",
    "tools": [TOOL], "think": False, "suffix": "The end.", "template": "{{ .Prompt }}", "context": [1, 2, 3],
    "raw": True, "truncate": True, "shift": False, "_debug_render_only": True, "logprobs": True, "top_logprobs": 2,
}
OLLAMA_INERT: dict[str, Any] = {"template": "", "_debug_render_only": False}
OPTION_ASKS: dict[str, Any] = {
    "num_predict": 2, "temperature": 0.5, "top_p": 0.9, "seed": 1, "stop": ["\n"], "presence_penalty": 0.5,
    "frequency_penalty": 0.5, "top_k": 5, "min_p": 0.1, "repeat_penalty": 1.1, "num_ctx": 4096, "num_batch": 64,
    "num_gpu": 0, "main_gpu": 0, "num_thread": 1, "use_mmap": False, "use_mlock": True, "numa": True,
    "low_vram": True, "f16_kv": False, "vocab_only": False, "logits_all": True, "embedding_only": False,
    "num_keep": 5, "draft_num_predict": 4, "penalize_newline": False, "mirostat_tau": 4.0, "mirostat_eta": 0.2,
    "mirostat": 2, "typical_p": 0.5, "tfs_z": 0.5, "repeat_last_n": 16,
}
OPTION_INERT: dict[str, Any] = {"mirostat": 0, "typical_p": 1.0, "tfs_z": 1.0, "repeat_last_n": 64}

# What a field needs beside it to mean anything (alone it is a 400 saying so).
COMPANIONS: dict[str, dict[str, Any]] = {"top_logprobs": {"logprobs": True}}

# Honoured, and refused by a text-only model such as the tiny one: a 400, not silence.
NEEDS_VISION = {"images"}
# Honoured, and refused by a model without fill-in-the-middle tokens such as the tiny one.
NEEDS_FIM = {"suffix"}


def names(table: tuple[fields.Field, ...], local: str | None = None) -> set[str]:
    return {f.name for f in table if local is None or f.local == local}


def test_the_samples_cover_every_field_of_the_tables():
    # A field added to a table without a sample here would go untested.
    assert set(OPENAI_ASKS) == names(fields.OPENAI)
    assert set(OPENAI_INERT) == names(fields.OPENAI, "refused")
    assert set(OLLAMA_ASKS) == names(fields.OLLAMA)
    assert set(OLLAMA_INERT) == names(fields.OLLAMA, "refused")
    assert set(OPTION_ASKS) == names(fields.OLLAMA_OPTIONS)
    assert set(OPTION_INERT) == names(fields.OLLAMA_OPTIONS, "refused")


BASE = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def post_openai(client, body: dict[str, Any]) -> tuple[int, Any]:
    r = await client.post("/v1/chat/completions", json=body)
    if r.content_type == "application/json":
        return r.status, await r.json()
    return r.status, await r.text()


async def test_each_refused_field_is_a_400_naming_it_on_a_local_model(gateway):
    wrong = []
    for name in sorted(names(fields.OPENAI, "refused")):
        status, body = await post_openai(gateway, {**BASE, name: OPENAI_ASKS[name]})
        err = body.get("error", {}) if isinstance(body, dict) else {}
        if status != 400 or err.get("param") != name or name not in err.get("message", ""):
            wrong.append((name, status, body))
    assert wrong == []


async def test_refused_fields_at_their_defaults_pass(gateway):
    wrong = []
    for name, value in sorted(OPENAI_INERT.items()):
        status, body = await post_openai(gateway, {**BASE, name: value})
        if status != 200:
            wrong.append((name, status, body))
    assert wrong == []


async def test_ignored_honoured_and_unknown_fields_are_answered(gateway):
    wrong = []
    accepted = sorted(names(fields.OPENAI) - names(fields.OPENAI, "refused"))
    for name in accepted + ["x_vendor_extra"]:
        status, body = await post_openai(gateway, {**BASE, **COMPANIONS.get(name, {}),
                                                   name: OPENAI_ASKS.get(name, {"any": "thing"})})
        if status != 200:
            wrong.append((name, status, body))
    assert wrong == []


async def test_a_remote_provider_gets_every_field_a_local_model_refuses(gateway):
    for name in sorted(names(fields.OPENAI, "refused")):
        status, body = await post_openai(gateway, {**BASE, "model": "up/gpt-x", name: OPENAI_ASKS[name]})
        assert status == 200, (name, body)
        assert gateway.fake.requests[-1][name] == OPENAI_ASKS[name]


async def post_ollama(gateway, endpoint: str, extra: dict[str, Any], model: str = MODEL_ID) -> tuple[int, Any]:
    base: dict[str, Any] = {"model": model, "stream": False, "options": {"num_predict": 2}}
    base.update({"messages": [{"role": "user", "content": "hi"}]} if endpoint == "chat" else {"prompt": "hi"})
    async with gateway.ollama.post(f"/api/{endpoint}", json={**base, **extra}) as r:
        return r.status, await r.text()


@pytest.mark.parametrize("endpoint", ["chat", "generate"])
async def test_ollama_fields_are_honoured_ignored_or_refused_by_name(gateway, endpoint):
    wrong = []
    for f in fields.OLLAMA:
        if endpoint not in f.endpoints:
            continue
        status, text = await post_ollama(gateway, endpoint, {**COMPANIONS.get(f.name, {}), f.name: OLLAMA_ASKS[f.name]})
        if f.local == "refused" or f.name in NEEDS_VISION | NEEDS_FIM:
            ok = status == 400 and (f.name in text or f.name in NEEDS_VISION)
        else:
            ok = status == 200
        if f.local == "refused":
            inert_status, _ = await post_ollama(gateway, endpoint, {f.name: OLLAMA_INERT[f.name]})
            ok = ok and inert_status == 200
        if not ok:
            wrong.append((f.name, status, text))
    assert wrong == []


async def test_ollama_options_are_honoured_ignored_or_refused_by_name(gateway):
    wrong = []
    for f in fields.OLLAMA_OPTIONS:
        status, text = await post_ollama(gateway, "chat", {"options": {"num_predict": 2, f.name: OPTION_ASKS[f.name]}})
        ok = (status == 400 and f"options.{f.name}" in text) if f.local == "refused" else status == 200
        if f.local == "refused":
            inert_status, _ = await post_ollama(gateway, "chat",
                                                {"options": {"num_predict": 2, f.name: OPTION_INERT[f.name]}})
            ok = ok and inert_status == 200
        if not ok:
            wrong.append((f.name, status, text))
    status, _ = await post_ollama(gateway, "chat", {"options": {"num_predict": 2, "some_future_option": 1}})
    assert wrong == [] and status == 200


async def test_the_ollama_door_refuses_its_untranslatable_fields_for_remote_models_too(gateway):
    before = len(gateway.fake.requests)
    status, text = await post_ollama(gateway, "generate", {"template": "{{ .Prompt }}"}, model="up/gpt-x")
    assert status == 400 and "template" in text
    assert len(gateway.fake.requests) == before
    status, _ = await post_ollama(gateway, "generate", {"template": ""}, model="up/gpt-x")
    assert status == 200


def test_the_readme_section_is_the_tables():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    m = re.search(r"<!-- fields:begin[^>]*-->\n(.*?)<!-- fields:end -->", readme, re.S)
    assert m, "README.md lost its fields:begin/fields:end markers"
    assert m.group(1) == fields.markdown(), "README.md's request fields differ: paste `python -m anyad.fields`"
