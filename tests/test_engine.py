"""The batched engine through the daemon: sequences decoded together change nothing but
speed, and a conversation's next turn reads only what is new."""

from __future__ import annotations

import asyncio
import json

import dataclasses

import ggufmaker
from anyad.config import parse_settings
from conftest import MODEL_ID, anthropic_sdk, make_settings, openai_sdk

PROMPTS = ["Tell me about the sea.", "Count to twenty.", "What is a cat?", "Write a poem about rain."]


async def reply(sdk, content: str, max_tokens: int = 24) -> str:
    r = await sdk.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": content}],
                                          max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == max_tokens
    return r.choices[0].message.content


async def test_streams_decoded_together_give_what_each_gives_alone(make_client, tiny_model, tmp_path):
    # The response cache off: every request generates.
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
                                          "models": {MODEL_ID: {"path": str(tiny_model), "parallel": 4}}}))
    sdk = openai_sdk(c)
    worker = c.daemon.backends[0].worker
    alone = [await reply(sdk, p) for p in PROMPTS]
    assert len(set(alone)) == len(PROMPTS)  # four different answers: a mix-up between them would show
    before = await worker.stats()
    for group in (PROMPTS[:2], PROMPTS):
        together = await asyncio.gather(*(reply(sdk, p) for p in group))
        assert together == alone[:len(group)]
    after = await worker.stats()
    # Decoded together: fewer decode steps than tokens generated (one step per token apart).
    generated = after["tokens_generated"] - before["tokens_generated"]
    assert generated == 6 * 24 and after["steps"] - before["steps"] < generated
    await sdk.close()


async def test_a_second_turn_reads_only_what_is_new(make_client, tiny_model, tmp_path):
    c = await make_client(make_settings(tiny_model, tmp_path))
    sdk = openai_sdk(c)
    worker = c.daemon.backends[0].worker
    talk = [{"role": "user", "content": "Hello there, tell me a story about a lighthouse keeper."}]
    first = await sdk.chat.completions.create(model=MODEL_ID, messages=talk, max_tokens=16, temperature=0)
    talk += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And then?"}]
    before = (await worker.stats())["prompt_tokens_read"]
    second = await sdk.chat.completions.create(model=MODEL_ID, messages=talk, max_tokens=4, temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # The whole first prompt was found in the slot, and only the rest was read.
    assert cached >= first.usage.prompt_tokens
    read = (await worker.stats())["prompt_tokens_read"] - before
    assert read == second.usage.prompt_tokens - cached
    # The Anthropic door says it in Anthropic's terms: input_tokens are those read afresh.
    claude = anthropic_sdk(c)
    again = await claude.messages.create(model=MODEL_ID, max_tokens=4, messages=talk)
    assert again.usage.cache_read_input_tokens >= first.usage.prompt_tokens
    assert again.usage.input_tokens + again.usage.cache_read_input_tokens == second.usage.prompt_tokens
    await sdk.close()
    await claude.close()


async def test_grammars_hold_per_sequence_while_decoded_together(make_client, tiny_model, tmp_path):
    c = await make_client(make_settings(tiny_model, tmp_path, parallel=3))
    sdk = openai_sdk(c)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}

    async def shaped() -> dict:
        r = await sdk.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "A number?"}], max_tokens=40, temperature=0.7,
            seed=7, response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
        return json.loads(r.choices[0].message.content)

    plain, a, b = await asyncio.gather(reply(sdk, PROMPTS[0]), shaped(), shaped())
    assert set(a) == {"n"} and isinstance(a["n"], int) and a == b
    with_json = False
    try:
        json.loads(plain)
        with_json = True
    except ValueError:
        pass
    assert not with_json  # the grammar of the others did not reach the free-text one
    await sdk.close()


async def test_a_quantized_kv_cache_loads_and_status_shows_the_engine(make_client, tmp_path):
    # Heads 32 wide: what a quantized cache's blocks need (the tiny model's are 16).
    model = ggufmaker.write_model(tmp_path / "wide.gguf", dataclasses.replace(ggufmaker.TINY, n_head=2, n_head_kv=1))
    c = await make_client(make_settings(model, tmp_path, kv_cache_type="q8_0"))
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200, await r.text()
    status = await (await c.get("/api/status")).json()
    model_status = status["models"][MODEL_ID]
    assert model_status["engine"] == "batched" and model_status["kv_cache_type"] == "q8_0"


async def test_a_quantized_kv_cache_the_heads_cannot_take_says_why(make_client, tiny_model, tmp_path):
    c = await make_client(make_settings(tiny_model, tmp_path, kv_cache_type="q8_0"))
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 2,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 503
    assert "kv_cache_type 'q8_0' needs attention heads a multiple of 32 wide" in (await r.json())["error"]["message"]


async def test_a_conversation_survives_an_unload_and_a_restart(make_client, tiny_model, tmp_path):
    settings = make_settings(tiny_model, tmp_path)
    c = await make_client(settings)
    sdk = openai_sdk(c)
    talk = [{"role": "user", "content": "Hello there, tell me a story about a lighthouse keeper. " * 3}]
    first = await sdk.chat.completions.create(model=MODEL_ID, messages=talk, max_tokens=8, temperature=0)
    talk += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And then?"}]
    assert await c.daemon.scheduler.unload(MODEL_ID)  # the worker saves its slot to disk as it goes
    assert list((settings.resolved_data_dir / "prompt-cache").rglob("*.kv"))
    again = await sdk.chat.completions.create(model=MODEL_ID, messages=talk, max_tokens=4, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    await sdk.close()
    await c.close()

    # A new daemon on the same data directory: the conversation is still not read again.
    c2 = await make_client(settings)
    sdk2 = openai_sdk(c2)
    talk[-1] = {"role": "user", "content": "What happened next?"}
    later = await sdk2.chat.completions.create(model=MODEL_ID, messages=talk, max_tokens=4, temperature=0)
    assert later.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    await sdk2.close()
