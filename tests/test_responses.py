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


async def test_input_items_list_what_a_stored_response_was_made_from(sdk):
    first = await sdk.responses.create(model=MODEL_ID, input="hello", instructions="Be brief.", max_output_tokens=3)
    # Listed at once (until the writer commits its row, from the memory copy), by the SDK's own pages.
    (item,) = [i async for i in sdk.responses.input_items.list(first.id)]
    assert (item.type, item.role, item.content[0].type, item.content[0].text) == ("message", "user", "input_text",
                                                                                  "hello")
    assert item.id.startswith("msg_")  # the instructions are no item: they are not carried on
    await settle(sdk)
    nxt = await sdk.responses.create(model=MODEL_ID, previous_response_id=first.id, max_output_tokens=2, input=[
        {"role": "user", "content": "one"}, {"role": "user", "content": [{"type": "input_text", "text": "two"}]}])
    await settle(sdk)
    asc = await sdk.responses.input_items.list(nxt.id, order="asc")
    # The earlier response's input and output, then its own input: each with its id.
    assert [i.id for i in asc.data][:1 + len(first.output)] == [item.id, *[o.id for o in first.output]]
    assert [i.content[0].text for i in asc.data[-2:]] == ["one", "two"]
    assert not asc.has_more and asc.first_id == asc.data[0].id and asc.last_id == asc.data[-1].id
    assert len({i.id for i in asc.data}) == len(asc.data)
    # Newest first by default; a page of one, and the SDK walking the pages with `after`.
    desc = await sdk.responses.input_items.list(nxt.id, limit=1)
    assert desc.has_more and desc.data[0].content[0].text == "two" and desc.first_id == desc.last_id
    assert [i.id async for i in sdk.responses.input_items.list(nxt.id, limit=1)] == [i.id for i in asc.data[::-1]]
    rest = await sdk.responses.input_items.list(nxt.id, order="asc", after=asc.data[0].id, limit=100)
    assert [i.id for i in rest.data] == [i.id for i in asc.data[1:]]
    for bad, param in (({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"after": "msg_nope"}, "after")):
        with pytest.raises(openai.BadRequestError) as e:
            await sdk.responses.input_items.list(nxt.id, **bad)
        assert e.value.param == param
    r = await sdk.anyad.get(f"/v1/responses/{nxt.id}/input_items?order=sideways")
    assert r.status == 400 and (await r.json())["error"]["param"] == "order"
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.input_items.list("resp_nope")
    gone = await sdk.responses.create(model=MODEL_ID, input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        await sdk.responses.input_items.list(gone.id)


async def test_a_keys_responses_and_their_items_are_its_own(make_client, tmp_path, tiny_model, monkeypatch):
    for name, key in (("ALICE_KEY", "alice-key-Resp4Qm1"), ("BOB_KEY", "bob-key-Resp8Zt2"),
                      ("ROOT_KEY", "root-key-Resp2Kd7")):
        monkeypatch.setenv(name, key)
    c = await make_client(settings_for(tmp_path, {MODEL_ID: tiny_model}, keys={
        "alice": {"key": "env:ALICE_KEY"}, "bob": {"key": "env:BOB_KEY"},
        "root": {"key": "env:ROOT_KEY", "role": "admin"}}))

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=key, max_retries=0)

    alice, bob, root = client("alice-key-Resp4Qm1"), client("bob-key-Resp8Zt2"), client("root-key-Resp2Kd7")
    try:
        r = await alice.responses.create(model=MODEL_ID, input="mine", max_output_tokens=2)
        await asyncio.to_thread(c.daemon.store.flush)
        assert [i.content[0].text async for i in alice.responses.input_items.list(r.id)] == ["mine"]
        # Another key's response is not there for bob (as GET says), whatever he asks of it.
        for call in (lambda: bob.responses.input_items.list(r.id), lambda: bob.responses.retrieve(r.id)):
            with pytest.raises(openai.NotFoundError) as e:
                await call()
            assert e.value.code == "response_not_found"
        assert (await root.responses.input_items.list(r.id)).data[0].content[0].text == "mine"  # an admin's: any
        nokey = await c.get(f"/v1/responses/{r.id}/input_items")
        assert nokey.status == 401
    finally:
        for s in (alice, bob, root):
            await s.close()


def test_the_writer_keeps_responses_in_their_exchanges_batch(tmp_path):
    """A stored response goes with its exchange's batch (after it: its conversation exists),
    into the conversation the writer gave the exchange; a delete queued after it takes it."""
    import sqlite3

    from anyad.store import Exchange, Store
    from anyad.store import responses as response_store

    store = Store(tmp_path / "anyad.db", batch_interval_s=0.5)  # everything below in one batch

    def ex(owner: str, text: str) -> Exchange:
        return Exchange("conv-7", f"r-{text}", MODEL_ID, MODEL_ID, False, None, [{"role": "user", "content": text}],
                        {"role": "assistant", "content": "ok"}, "stop", 1, 1, 0.0, 1.0, 1.0, owner,
                        any_conversation=False)

    def kept(rid: str, owner: str, exchange: Exchange) -> None:
        body = {"id": rid, "object": "response", "output": []}
        response_store.put(store, response_store.StoredResponse(
            rid, "conv-7", owner, body, exchange.messages, [{"id": f"msg_{rid}", "type": "message"}]), exchange)

    try:
        mine, intruder = ex("bob", "mine"), ex("carol", "intruder")
        for rid, e in (("resp_1", mine), ("resp_2", intruder), ("resp_3", ex("bob", "gone"))):
            store.record(e)
            kept(rid, e.owner, e)
        assert response_store.get(store, "resp_1").items == [{"id": "msg_resp_1", "type": "message"}]  # in memory
        assert response_store.delete(store, "resp_3", "bob").result(10) is True  # queued after its INSERT
        store.flush()
        conn = sqlite3.connect(store.path)
        rows = dict(conn.execute("SELECT id, conversation_id FROM responses").fetchall())
        conn.close()
        # Carol's exchange went into a conversation of her own, and her response with it.
        assert set(rows) == {"resp_1", "resp_2"} and rows["resp_1"] == "conv-7"
        assert rows["resp_2"].startswith("conv-7.")
        assert store.owner(rows["resp_2"]) == (True, "carol")
        got = response_store.get(store, "resp_2", "carol")
        assert got.conversation_id == rows["resp_2"] and got.items[0]["id"] == "msg_resp_2"
        assert response_store.get(store, "resp_2", "bob") is None
    finally:
        store.close()
