"""/v1/responses: OpenAI's Responses API through the official client, stateless and stored."""

from __future__ import annotations

import asyncio
import json

import openai
import pytest

from conftest import ASK, MODEL_ID, WEATHER, settings_for

TOOL = {"type": "function", **WEATHER["function"]}


@pytest.fixture
async def sdk(make_client, tmp_path, tiny_model, family_models):
    c = await make_client(settings_for(tmp_path, {MODEL_ID: tiny_model, "hermes": family_models["hermes"]}))
    s = openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key="x", max_retries=0)
    s.anyad = c
    yield s
    await s.close()


async def settle(sdk) -> None:
    await asyncio.to_thread(sdk.anyad.daemon.store.flush)  # stored after the reply, off its path


async def test_text_whole_and_streamed(sdk):
    r = await sdk.responses.create(model=MODEL_ID, input="hello", instructions="Be brief.", max_output_tokens=5,
                                   temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text and r.usage.output_tokens == 5 and r.usage.input_tokens > 0
    kinds, text, final = [], "", None
    # A reply cut off by max_output_tokens ends in response.incomplete, as OpenAI's do.
    async for event in await sdk.responses.create(model=MODEL_ID, input="hello", instructions="Be brief.",
                                                  max_output_tokens=5, temperature=0, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.incomplete":
            final = event.response
    assert text == final.output_text == r.output_text
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.incomplete"
    assert kinds.index("response.output_item.added") < kinds.index("response.output_text.done") \
        < kinds.index("response.output_item.done")


async def test_a_function_call_and_the_next_turn_by_previous_response_id(sdk):
    r = await sdk.responses.create(model="hermes", input=ASK[0]["content"], tools=[TOOL], tool_choice="required",
                                   parallel_tool_calls=False, max_output_tokens=200)
    (call,) = [o for o in r.output if o.type == "function_call"]
    assert call.name == "weather" and set(json.loads(call.arguments)) == {"city"}
    await settle(sdk)
    # The next turn sends only the tool's output; the stored response holds the rest.
    nxt = await sdk.responses.create(model="hermes", previous_response_id=r.id, tools=[TOOL], max_output_tokens=4,
                                     input=[{"type": "function_call_output", "call_id": call.call_id,
                                             "output": "12 C"}])
    assert nxt.previous_response_id == r.id and nxt.output
    assert nxt.usage.input_tokens > r.usage.input_tokens  # the first turn is in its prompt
    stored = await sdk.responses.retrieve(r.id)
    assert stored.id == r.id and stored.output[0].type == "function_call"
    # History: both turns in one conversation.
    await settle(sdk)
    convs = (await (await sdk.anyad.get("/api/conversations")).json())["data"]
    assert len(convs) == 1 and convs[0]["exchanges"] == 2


async def test_stream_a_function_call(sdk):
    args = ""
    # The SDK's own stream helper, which checks the events' order as it accumulates them.
    async with sdk.responses.stream(model="hermes", input=ASK[0]["content"], tools=[TOOL],
                                    tool_choice={"type": "function", "name": "weather"},
                                    parallel_tool_calls=False, max_output_tokens=200) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                args += event.delta
        done = await stream.get_final_response()
    assert done.status == "completed" and done.output[-1].type == "function_call"
    assert json.loads(args) == json.loads(done.output[-1].arguments)


async def test_store_false_delete_and_not_found(sdk):
    r = await sdk.responses.create(model=MODEL_ID, input="hi", max_output_tokens=2, store=False)
    await settle(sdk)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as e:
        await sdk.responses.create(model=MODEL_ID, input="hi", max_output_tokens=2, previous_response_id=r.id)
    assert e.value.param == "previous_response_id"
    kept = await sdk.responses.create(model=MODEL_ID, input="hi", max_output_tokens=2)
    await settle(sdk)
    await sdk.responses.delete(kept.id)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.retrieve(kept.id)


@pytest.mark.parametrize("extra, param", [({"tools": [{"type": "web_search"}]}, "tools[0]"),
                                          ({"background": True}, "background"),
                                          ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]")])
async def test_what_cannot_be_honoured_is_a_400_naming_it(sdk, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        await sdk.responses.create(**{"model": MODEL_ID, "input": "hi", "max_output_tokens": 2, **extra})
    assert e.value.param == param


async def test_structured_output(sdk):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    r = await sdk.responses.create(model=MODEL_ID, input="a number", max_output_tokens=60, text={
        "format": {"type": "json_schema", "name": "n", "schema": schema, "strict": True}})
    assert isinstance(json.loads(r.output_text)["n"], int)
