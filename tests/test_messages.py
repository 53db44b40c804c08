"""POST /v1/messages: Anthropic's Messages API through the official anthropic SDK."""

from __future__ import annotations

import anthropic
import pytest

from conftest import ASK, MODEL_ID, WEATHER, anthropic_sdk, settings_for

TOOL = {"name": "weather", "description": WEATHER["function"]["description"],
        "input_schema": WEATHER["function"]["parameters"]}


@pytest.fixture
def claude_for(sdk_on, tiny_model, family_models):
    """An anthropic client on a daemon serving the tiny model and the hermes family model."""
    return lambda **extra: sdk_on({MODEL_ID: tiny_model, "hermes": family_models["hermes"]}, anthropic_sdk, **extra)


async def test_text_whole_and_streamed(claude_for):
    claude = await claude_for()
    # Older SDKs' sampling fields, which the current one sends only as extras.
    kw = dict(model=MODEL_ID, max_tokens=5, system="Be brief.", extra_body={"temperature": 0},
              messages=[{"role": "user", "content": "hello"}])
    m = await claude.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert [b.type for b in m.content] == ["text"] and m.content[0].text
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 5 and m.usage.input_tokens > 0

    kinds = []
    async with claude.messages.stream(**kw) as stream:
        async for event in stream:
            kinds.append(event.type)
        final = await stream.get_final_message()
    assert final.content[0].text == m.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 5
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.index("content_block_start") < kinds.index("content_block_stop") < kinds.index("message_delta")


@pytest.mark.parametrize("stream", [False, True])
async def test_a_forced_tool_use_and_its_result(claude_for, stream):
    claude = await claude_for()
    kw = dict(model="hermes", max_tokens=200, tools=[TOOL], tool_choice={"type": "tool", "name": "weather",
                                                                           "disable_parallel_tool_use": True},
              messages=ASK)
    if stream:
        async with claude.messages.stream(**kw) as s:
            m = await s.get_final_message()
    else:
        m = await claude.messages.create(**kw)
    uses = [b for b in m.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "weather" and m.stop_reason == "tool_use"
    city = uses[0].input["city"]
    assert set(uses[0].input) == {"city"} and isinstance(city, str) and len(city) <= 8
    # The round trip: the result goes back in a user turn and the model answers.
    answer = await claude.messages.create(model="hermes", max_tokens=6, tools=[TOOL], messages=[
        *ASK, {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "12 C"}]}])
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")


async def test_errors_come_in_anthropics_shape(claude_for):
    claude = await claude_for()
    with pytest.raises(anthropic.NotFoundError) as e:
        await claude.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "not_found_error"
    for bad, named in (({"extra_body": {"mcp_servers": [{"type": "url", "url": "http://127.0.0.1:9", "name": "x"}]}},
                        "mcp_servers"),
                       ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0]"),
                       ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
                        "messages[0].content[0]")):
        with pytest.raises(anthropic.BadRequestError) as e:
            await claude.messages.create(**{"model": MODEL_ID, "max_tokens": 5,
                                            "messages": [{"role": "user", "content": "hi"}], **bad})
        assert e.value.body["error"]["type"] == "invalid_request_error"
        assert e.value.body["error"]["message"].startswith(named), e.value.body
    r = await claude.anyad.post("/v1/messages", json={"model": MODEL_ID, "messages": []})
    assert r.status == 400 and (await r.json())["error"]["type"] == "invalid_request_error"


async def test_the_billing_line_does_not_reach_the_model(claude_for):
    claude = await claude_for()
    counts = set()
    for nonce in ("aaaaa", "bbbbb", None):
        line = f"x-anthropic-billing-header: cc_version=2.1.0.abc; cc_entrypoint=cli; cch={nonce};\n" if nonce else ""
        m = await claude.messages.create(model=MODEL_ID, max_tokens=1, system=line + "You are a helper.",
                                         messages=[{"role": "user", "content": "hi"}])
        counts.add(m.usage.input_tokens + (m.usage.cache_read_input_tokens or 0))
    assert len(counts) == 1  # the same prompt, with the line or without


async def test_structured_output(claude_for):
    import json

    claude = await claude_for()
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    m = await claude.messages.create(model=MODEL_ID, max_tokens=60, messages=[{"role": "user", "content": "a number"}],
                                     output_config={"format": {"type": "json_schema", "schema": schema}})
    assert isinstance(json.loads(m.content[0].text)["n"], int)


async def test_x_api_key_is_the_key_and_a_wrong_one_is_anthropics_401(make_client, tiny_model, tmp_path,
                                                                     monkeypatch):
    from anyad.config import parse_settings

    monkeypatch.setenv("ANYAD_TEST_KEY", "anyad-client-key-9Zt4Wq1LmN6p")
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "server": {"api_keys": ["env:ANYAD_TEST_KEY"]},
                                          "models": {MODEL_ID: {"path": str(tiny_model)}}}))
    ask = dict(model=MODEL_ID, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    good = anthropic.AsyncAnthropic(base_url=str(c.make_url("")), api_key="anyad-client-key-9Zt4Wq1LmN6p",
                                    max_retries=0)
    assert (await good.messages.create(**ask)).usage.output_tokens == 2
    bad = anthropic.AsyncAnthropic(base_url=str(c.make_url("")), api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as e:
        await bad.messages.create(**ask)
    assert e.value.body["error"]["type"] == "authentication_error"
    await good.close()
    await bad.close()


async def test_count_tokens_is_what_the_reply_costs(claude_for):
    claude = await claude_for()
    ask = dict(model="hermes", messages=ASK, tools=[TOOL])
    counted = await claude.messages.count_tokens(**ask)
    m = await claude.messages.create(**ask, max_tokens=1)
    assert counted.input_tokens == m.usage.input_tokens
    bare = await claude.messages.count_tokens(model="hermes", messages=ASK)
    assert bare.input_tokens < counted.input_tokens  # the tools are part of the prompt
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.count_tokens(model="nope", messages=ASK)


async def test_an_anthropic_provider_behind_the_door(make_client, aiohttp_server, tmp_path, monkeypatch):
    from anyad.config import parse_settings
    from fakes import REPLY, FakeAnthropic

    monkeypatch.setenv("ANTHROPIC_TEST_KEY", "sk-ant-test-secret")
    fake = FakeAnthropic()
    server = await aiohttp_server(fake.app())
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"), "providers": {"claude": {
        "backend": "anthropic", "base_url": f"http://127.0.0.1:{server.port}/v1",
        "api_key": "env:ANTHROPIC_TEST_KEY", "models": ["sonnet"]}}}))
    claude = anthropic.AsyncAnthropic(base_url=str(c.make_url("")), api_key="x", max_retries=0)
    ask = dict(model="claude/sonnet", messages=[{"role": "user", "content": "hi"}])
    m = await claude.messages.create(**ask, max_tokens=50, system="Be brief.")
    assert m.content[0].text == REPLY and fake.requests[-1]["system"] == "Be brief."
    async with claude.messages.stream(**ask, max_tokens=50) as s:
        assert "".join([t async for t in s.text_stream]) == REPLY
    counted = await claude.messages.count_tokens(**ask)
    # Relayed to the provider's own counter, with no field a count does not take.
    assert fake.requests[-1]["model"] == "sonnet" and set(fake.requests[-1]) <= {"model", "messages", "system"}
    assert counted.input_tokens > 0
    await claude.close()
