"""Tools and thinking on the Ollama listener, through the official `ollama` client: local
models with real families' chat templates, and a provider's tool calls relayed."""

from __future__ import annotations

import ollama
import pytest

from anyad.plugins import ollama as ollama_plugin
from conftest import ASK, FAMILIES, TOOLS, settings_for


@pytest.fixture
async def api_for(make_client, tmp_path, family_models, start_fake):
    """An ollama client on a daemon serving the named family models and a fake provider "up"."""

    async def make(*names: str):
        fake, url = await start_fake()
        c = await make_client(settings_for(tmp_path, {n: family_models[n] for n in names},
                                           providers={"up": {"base_url": url, "models": ["gpt-x"]}},
                                           plugins={"enabled": ["ollama"], "ollama": {"port": 0}}))
        host, port = ollama_plugin.address(c.daemon)
        return ollama.AsyncClient(host=f"http://{host}:{port}")

    return make


OPTS = {"num_predict": 4, "temperature": 0}


async def test_tools_reach_a_local_models_template(api_for):
    api = await api_for("hermes")
    offered = await api.chat(model="hermes", messages=ASK, tools=TOOLS, options=OPTS)
    plain = await api.chat(model="hermes", messages=ASK, options=OPTS)
    assert offered.prompt_eval_count > plain.prompt_eval_count
    assert offered.done_reason == "length" and not offered.message.tool_calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
async def test_a_tool_round_trip_in_ollamas_shape_renders(api_for, family):
    """Ollama's history: the call's arguments an object, the result named by tool_name, no ids."""
    api = await api_for(family)
    history = ASK + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "weather",
                                                                          "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "tool_name": "weather", "content": '{"sky": "clear"}'}]
    r = await api.chat(model=family, messages=history, tools=TOOLS, options=OPTS)
    assert r.done and r.done_reason == "length"
    parts = [p async for p in await api.chat(model=family, messages=history, tools=TOOLS, options=OPTS,
                                              stream=True)]
    assert parts[-1].done and "".join(p.message.content for p in parts) == r.message.content


async def test_a_providers_tool_calls_come_back_with_object_arguments(api_for):
    api = await api_for("hermes")
    whole = await api.chat(model="up/gpt-x", messages=ASK, tools=TOOLS)
    [call] = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Oslo"}
    assert whole.done_reason == "stop"
    parts = [p async for p in await api.chat(model="up/gpt-x", messages=ASK, tools=TOOLS, stream=True)]
    calls = [tc for p in parts for tc in p.message.tool_calls or ()]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("get_weather", {"city": "Oslo"})]


async def test_thinking_comes_apart_and_think_false_switches_it_off(api_for):
    api = await api_for("r1", "qwen3")
    r = await api.chat(model="r1", messages=ASK, think=True, options={"num_predict": 8, "temperature": 0})
    assert r.message.thinking and not r.message.content
    parts = [p async for p in await api.chat(model="r1", messages=ASK, think=True, stream=True,
                                              options={"num_predict": 8, "temperature": 0})]
    assert "".join(p.message.thinking or "" for p in parts) == r.message.thinking
    g = await api.generate(model="r1", prompt="hi", options={"num_predict": 8, "temperature": 0})
    assert g.thinking and not g.response
    # Qwen3's template writes an empty thought into the prompt when thinking is off.
    on = await api.chat(model="qwen3", messages=ASK, think=True, options=OPTS)
    off = await api.chat(model="qwen3", messages=ASK, think=False, options=OPTS)
    assert off.prompt_eval_count > on.prompt_eval_count
