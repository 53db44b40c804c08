"""A provider reached through OpenAI's Responses API (``api = "responses"``), from every
door: the official openai SDK (chat and Responses) and the anthropic SDK, against a fake
Responses upstream on 127.0.0.1."""

from __future__ import annotations

import anthropic
import openai
import pytest

from anyad.config import parse_settings
from anyad.errors import ConfigError
from fakes import REPLY, FakeOpenAI

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                            "parameters": {"type": "object", "properties": {
                                                "city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
async def codex(make_client, aiohttp_server, tmp_path):
    """A daemon with provider ``up`` (api = "responses") serving ``codex``; the client
    carries ``fake`` and ``sdk`` (the openai client on the daemon)."""
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"), "providers": {"up": {
        "base_url": f"http://127.0.0.1:{server.port}/v1", "api": "responses", "models": ["codex"],
        "max_retries": 0}}}))
    c.fake = fake
    c.sdk = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    yield c
    await c.sdk.close()


async def test_chat_goes_out_as_a_response_and_comes_back_as_chat(codex):
    r = await codex.sdk.chat.completions.create(
        model="up/codex", max_tokens=20, temperature=0.2, user="u1",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert r.choices[0].message.content == REPLY and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.model_extra["reasoning_content"] == "Thinking."
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (13, 5)
    sent = codex.fake.requests[-1]
    assert sent["model"] == "codex" and sent["store"] is False and sent["max_output_tokens"] == 20
    assert sent["temperature"] == 0.2 and sent["user"] == "u1" and "messages" not in sent
    assert sent["input"] == [{"type": "message", "role": "system", "content": "Be brief."},
                             {"type": "message", "role": "user", "content": "hi"}]
    text = ""
    async for chunk in await codex.sdk.chat.completions.create(
            model="up/codex", max_tokens=20, stream=True, messages=[{"role": "user", "content": "hi"}]):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or None
    assert text == REPLY and finish == "stop"


async def test_tool_calls_round_trip_through_the_responses_wire(codex):
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    calls: dict[int, dict] = {}
    async for chunk in await codex.sdk.chat.completions.create(model="up/codex", messages=ask, tools=[WEATHER],
                                                               tool_choice={"type": "function", "function": {
                                                                   "name": "get_weather"}}, stream=True):
        if not chunk.choices:
            continue
        for tc in chunk.choices[0].delta.tool_calls or []:
            got = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            got["id"] = got["id"] or tc.id
            got["name"] = got["name"] or (tc.function.name if tc.function else None)
            got["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish = chunk.choices[0].finish_reason or None
    assert calls == {0: {"id": "call_r1", "name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    assert finish == "tool_calls"
    sent = codex.fake.requests[-1]
    assert sent["tools"] == [{"type": "function", **WEATHER["function"]}]
    assert sent["tool_choice"] == {"type": "function", "name": "get_weather"}
    # The result goes back as the function call and its output, in order.
    r = await codex.sdk.chat.completions.create(model="up/codex", tools=[WEATHER], tool_choice="none", messages=[
        *ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_r1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_r1", "content": "sunny"}])
    assert r.choices[0].message.content == REPLY
    assert codex.fake.requests[-1]["input"][1:] == [
        {"type": "function_call", "call_id": "call_r1", "name": "get_weather", "arguments": '{"city":"Oslo"}'},
        {"type": "function_call_output", "call_id": "call_r1", "output": "sunny"}]


async def test_the_responses_door_and_the_messages_door_reach_it(codex):
    first = await codex.sdk.responses.create(model="up/codex", input="hi", max_output_tokens=20)
    assert first.output_text == REPLY
    second = await codex.sdk.responses.create(model="up/codex", input="and again?", previous_response_id=first.id,
                                              max_output_tokens=20)
    assert second.output_text == REPLY
    # anyad keeps the conversation; the provider gets all of it, and keeps nothing.
    sent = codex.fake.requests[-1]
    assert [i.get("content") for i in sent["input"]] == ["hi", REPLY, "and again?"] and sent["store"] is False
    claude = anthropic.AsyncAnthropic(base_url=str(codex.make_url("")), api_key="x", max_retries=0)
    m = await claude.messages.create(model="up/codex", max_tokens=20, messages=[{"role": "user", "content": "hi"}],
                                     system="Be brief.")
    assert m.content[-1].text == REPLY and m.usage.input_tokens == 13
    await claude.close()


@pytest.mark.parametrize("field, value", [("stop", ["\n"]), ("n", 2), ("logprobs", True), ("seed", 7)])
async def test_a_field_the_responses_api_lacks_is_a_400_naming_it(codex, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        await codex.sdk.chat.completions.create(model="up/codex", max_tokens=5,
                                                messages=[{"role": "user", "content": "hi"}], **{field: value})
    assert e.value.param == field and "Responses API" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        await codex.sdk.completions.create(model="up/codex", prompt="def f(", max_tokens=5)
    assert e.value.param == "prompt"


async def test_a_failed_response_is_an_error_not_an_answer(codex):
    codex.fake.mode = "500"
    with pytest.raises(openai.APIStatusError) as e:
        await codex.sdk.chat.completions.create(model="up/codex", max_tokens=5,
                                                messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code >= 500
    codex.fake.mode = "failed"  # text first, then response.failed: the stream ends with an in-band error
    r = await codex.post("/v1/chat/completions", json={"model": "up/codex", "stream": True, "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "hi"}]})
    raw = await r.text()
    assert r.status == 200 and '"error"' in raw and "it broke" in raw and '"finish_reason":"stop"' not in raw


def test_api_responses_is_for_openai_style_providers():
    with pytest.raises(ConfigError):
        parse_settings({"providers": {"c": {"backend": "anthropic", "base_url": "http://127.0.0.1:9", "api":
                                            "responses"}}})


@pytest.mark.parametrize("field, value", [("web_search_options", {}), ("audio", {"voice": "alloy", "format": "wav"}),
                                          ("modalities", ["text", "audio"]),
                                          ("prediction", {"type": "content", "content": "x"})])
async def test_a_chat_field_the_responses_wire_drops_is_a_400_naming_it(codex, field, value):
    r = await codex.post("/v1/chat/completions", json={"model": "up/codex", "messages": [{"role": "user", "content":
                                                                                          "hi"}], field: value})
    err = (await r.json())["error"]
    assert r.status == 400 and err["param"] == field and "Responses API" in err["message"]
    assert codex.fake.requests == []  # nothing went out


async def test_verbosity_goes_as_the_responses_text_verbosity(codex):
    r = await codex.post("/v1/chat/completions", json={"model": "up/codex", "verbosity": "low", "modalities": ["text"],
                                                       "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200
    assert codex.fake.requests[-1]["text"] == {"verbosity": "low"} and "modalities" not in codex.fake.requests[-1]


async def test_a_providers_words_in_a_reply_that_began_with_200_never_carry_its_key(make_client, aiohttp_server,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("UP_KEY", "sk-up-secret-0123456789")
    fake = FakeOpenAI("leak")
    server = await aiohttp_server(fake.app())
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"), "providers": {"up": {
        "base_url": f"http://127.0.0.1:{server.port}/v1", "api": "responses", "models": ["codex"],
        "api_key": "env:UP_KEY", "max_retries": 0}}}))
    for stream in (False, True):
        r = await c.post("/v1/chat/completions", json={"model": "up/codex", "stream": stream, "max_tokens": 5,
                                                       "messages": [{"role": "user", "content": "hi"}]})
        text = await r.text()
        assert "is not valid" in text and "[redacted]" in text and "sk-up-secret" not in text, (stream, text)
    assert fake.headers[-1]["Authorization"] == "Bearer sk-up-secret-0123456789"
