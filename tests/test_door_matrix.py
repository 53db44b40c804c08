"""One access, quota, usage and browser-guard matrix over every door: a rule implemented
once in the shared gateway layer shows up on each, and a door that bypassed it fails here."""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import pytest

from anyad.config import parse_settings
from anyad.plugins import ollama as ollama_plugin
from conftest import MODEL_ID

ALICE, BOB, ROOT = "alice-key-Door7Lm2", "bob-key-Door3Qx9", "root-key-Door5Wv1"
HI = [{"role": "user", "content": "hi"}]

# door: (listener, path, body for a model)
DOORS = {
    "chat": ("main", "/v1/chat/completions", lambda m: {"model": m, "messages": HI, "max_tokens": 2}),
    "completions": ("main", "/v1/completions", lambda m: {"model": m, "prompt": "hi", "max_tokens": 2}),
    "messages": ("main", "/v1/messages", lambda m: {"model": m, "messages": HI, "max_tokens": 2}),
    "responses": ("main", "/v1/responses", lambda m: {"model": m, "input": "hi", "max_output_tokens": 2}),
    "embeddings": ("main", "/v1/embeddings", lambda m: {"model": m, "input": "hi"}),
    "ollama chat": ("ollama", "/api/chat", lambda m: {"model": m, "messages": HI, "stream": False,
                                                      "options": {"num_predict": 2}}),
    "ollama generate": ("ollama", "/api/generate", lambda m: {"model": m, "prompt": "hi", "stream": False,
                                                              "options": {"num_predict": 2}}),
    "ollama embed": ("ollama", "/api/embed", lambda m: {"model": m, "input": "hi"}),
    # Many tools are set up with the Ollama address and OpenAI's or Anthropic's paths.
    "ollama's /v1 chat": ("ollama", "/v1/chat/completions", lambda m: {"model": m, "messages": HI, "max_tokens": 2}),
    "ollama's /v1 messages": ("ollama", "/v1/messages", lambda m: {"model": m, "messages": HI, "max_tokens": 2}),
}


@pytest.fixture
async def doors(make_client, tiny_model, tmp_path, monkeypatch):
    for name, key in (("ALICE_KEY", ALICE), ("BOB_KEY", BOB), ("ROOT_KEY", ROOT)):
        monkeypatch.setenv(name, key)
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
        "models": {MODEL_ID: {"path": str(tiny_model)}},
        "routes": [{"name": "secret", "targets": [MODEL_ID]}],
        "keys": {"alice": {"key": "env:ALICE_KEY", "models": [MODEL_ID]},
                 "bob": {"key": "env:BOB_KEY", "models": [MODEL_ID], "tokens_per_day": 1},
                 "root": {"key": "env:ROOT_KEY", "role": "admin"}},
        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}}))
    await c.daemon.scheduler.load(MODEL_ID)
    host, port = ollama_plugin.address(c.daemon)
    async with aiohttp.ClientSession() as session:
        bases = {"main": str(c.make_url("")).rstrip("/"), "ollama": f"http://{host}:{port}"}

        async def call(door: str, key: str | None, model: str = MODEL_ID, **headers: str) -> int:
            listener, path, body = DOORS[door]
            if key:
                headers["Authorization"] = f"Bearer {key}"
            async with session.post(bases[listener] + path, json=body(model), headers=headers) as r:
                await r.read()
                return r.status

        c.call = call
        yield c


async def test_every_door_asks_for_a_key_and_keeps_to_its_models(doors):
    wrong = []
    for door in DOORS:
        got = (await doors.call(door, None), await doors.call(door, "not-a-key"),
               await doors.call(door, ALICE, "secret"), await doors.call(door, ALICE),
               await doors.call(door, ROOT, "secret"))
        if got != (401, 401, 403, 200, 200):
            wrong.append((door, got))
    assert wrong == []


async def test_every_door_refuses_a_hostile_page(doors):
    wrong = []
    for door in DOORS:
        got = (await doors.call(door, ALICE, Origin="http://evil.example"),
               await doors.call(door, ALICE, Host="evil.example:2692"))
        if got != (403, 403):
            wrong.append((door, got))
    assert wrong == []


async def test_every_door_counts_usage_and_keeps_to_the_quota(doors):
    for door in DOORS:
        assert await doors.call(door, ALICE) == 200
    await asyncio.to_thread(doors.daemon.store.flush)
    conn = sqlite3.connect(doors.daemon.store.path)
    rows = dict(conn.execute("SELECT endpoint, sum(prompt_tokens) FROM usage WHERE key = 'alice' "
                             "GROUP BY endpoint").fetchall())
    conn.close()
    assert {path for _, path, _ in DOORS.values()} <= set(rows), rows
    assert all(tokens > 0 for tokens in rows.values()), rows
    # Bob's one token a day goes on his first request, whichever door: then every door refuses him.
    assert await doors.call("chat", BOB) == 200
    refused = {door: await doors.call(door, BOB) for door in DOORS}
    assert set(refused.values()) == {429}, refused


async def test_the_ollama_listener_answers_v1_in_the_v1_shapes(doors):
    import openai

    host, port = ollama_plugin.address(doors.daemon)
    sdk = openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key=ALICE, max_retries=0)
    r = await sdk.chat.completions.create(model=MODEL_ID, messages=HI, max_tokens=2)
    assert r.usage.completion_tokens == 2
    assert MODEL_ID in [m.id for m in (await sdk.models.list()).data]
    await sdk.close()
    root = openai.AsyncOpenAI(base_url=f"http://{host}:{port}/v1", api_key=ROOT, max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        await root.chat.completions.create(model="nope", messages=HI, max_tokens=2)
    assert e.value.code == "model_not_found"  # OpenAI's error shape, not Ollama's
    await root.close()
