"""The response cache, through the real HTTP API, with the real tiny model and a real
provider on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import time

import pytest

from anyad.config import parse_settings
from anyad.store import Store
from anyad.store.migrations import MIGRATIONS
from conftest import MODEL_ID
from fakes import FakeOpenAI

MSGS = [{"role": "user", "content": "Say something."}]


def settings(model_path, tmp_path, cache=None, **extra):
    return parse_settings({"data_dir": str(tmp_path / "data"), "cache": cache or {},
                           "models": {MODEL_ID: {"path": str(model_path)}}, **extra})


async def ask(c, headers=None, model=MODEL_ID, **fields):
    body = {"model": model, "messages": MSGS, "max_tokens": 8, "temperature": 0, **fields}
    r = await c.post("/v1/chat/completions", json=body, headers=headers or {})
    if fields.get("stream"):
        raw = (await r.read()).decode()
        events = [l[6:] for l in raw.split("\n") if l.startswith("data: ")]
        return r, events
    return r, await r.json()


async def settle(c):
    await asyncio.to_thread(c.daemon.store.flush)


async def generated(c) -> int:
    return (await c.daemon.backends[0].worker.stats())["tokens_generated"]


async def test_a_repeated_deterministic_request_is_answered_from_the_cache(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path))
    r1, b1 = await ask(c)
    assert r1.status == 200 and r1.headers["X-Anyad-Cache"] == "miss"
    await settle(c)
    before = await generated(c)
    r2, b2 = await ask(c)
    assert r2.headers["X-Anyad-Cache"] == "hit" and r2.headers["X-Anyad-Backend"] == MODEL_ID
    assert b2["choices"][0] == b1["choices"][0] and b2["usage"] == b1["usage"]
    assert b2["id"] != b1["id"]
    # The same request streamed: the hit comes back as SSE chunks, ending in [DONE].
    r3, events = await ask(c, stream=True, stream_options={"include_usage": True})
    assert r3.headers["X-Anyad-Cache"] == "hit" and r3.headers["Content-Type"].startswith("text/event-stream")
    chunks = [json.loads(e) for e in events[:-1]]
    assert events[-1] == "[DONE]" and chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert text == b1["choices"][0]["message"]["content"]
    assert [ch["choices"][0]["finish_reason"] for ch in chunks if ch["choices"]][-1] == "length"
    assert chunks[-1]["usage"] == b1["usage"]
    assert await generated(c) == before  # the model did not run for either hit
    # The history says where each answer came from.
    await settle(c)
    conn = sqlite3.connect(c.daemon.store.path)
    assert [r[0] for r in conn.execute("SELECT cache FROM exchanges ORDER BY id")] == ["miss", "hit", "hit"]


async def test_only_deterministic_requests_by_default(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path))
    for _ in range(2):
        r, _ = await ask(c, temperature=0.8)
        assert r.headers["X-Anyad-Cache"] == "bypass"
        await settle(c)
    assert (await ask(c, temperature=0.8, seed=7))[0].headers["X-Anyad-Cache"] == "miss"
    await settle(c)
    assert (await ask(c, temperature=0.8, seed=7))[0].headers["X-Anyad-Cache"] == "hit"
    assert (await ask(c, temperature=0.8, seed=8))[0].headers["X-Anyad-Cache"] == "miss"  # the seed is in the key
    assert (await ask(c, max_tokens=9))[0].headers["X-Anyad-Cache"] == "miss"  # so is every other parameter

    c2 = await make_client(settings(tiny_model, tmp_path / "all", {"mode": "all"}))
    await ask(c2, temperature=0.8)
    await settle(c2)
    assert (await ask(c2, temperature=0.8))[0].headers["X-Anyad-Cache"] == "hit"


async def test_cache_control_no_cache_and_no_store(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path))
    r, _ = await ask(c, headers={"Cache-Control": "no-store"})
    assert r.headers["X-Anyad-Cache"] == "miss"
    await settle(c)
    assert (await ask(c))[0].headers["X-Anyad-Cache"] == "miss"  # no-store kept nothing; this one is kept
    await settle(c)
    before = await generated(c)
    r, _ = await ask(c, headers={"Cache-Control": "no-cache"})
    assert r.headers["X-Anyad-Cache"] == "bypass" and await generated(c) > before  # asked the model again
    assert (await ask(c))[0].headers["X-Anyad-Cache"] == "hit"


async def test_a_changed_model_file_invalidates_its_entries(make_client, tiny_model, tmp_path):
    model = tmp_path / "m.gguf"
    shutil.copy(tiny_model, model)
    c = await make_client(settings(model, tmp_path))
    await ask(c)
    await settle(c)
    assert (await ask(c))[0].headers["X-Anyad-Cache"] == "hit"
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))  # a new file in its place
    assert (await ask(c))[0].headers["X-Anyad-Cache"] == "miss"


def frozen_clock(c) -> list[float]:
    """The cache's clock, stopped: time moves only when the test moves it (now[0] += s)."""
    now = [1_700_000_000.0]
    c.daemon.cache.clock = lambda: now[0]
    return now


async def test_ttl_and_least_recently_used_eviction(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"max_entries": 2, "ttl_s": 60.0}))
    now = frozen_clock(c)
    for n in (5, 6):
        await ask(c, max_tokens=n)
        await settle(c)
        now[0] += 1
    assert (await ask(c, max_tokens=5))[0].headers["X-Anyad-Cache"] == "hit"  # 5 is now the most recent
    await settle(c)
    now[0] += 1
    await ask(c, max_tokens=7)  # a third entry: 6, the least recently used, goes
    await settle(c)
    now[0] += 1
    assert (await ask(c, max_tokens=6))[0].headers["X-Anyad-Cache"] == "miss"
    await settle(c)
    conn = sqlite3.connect(c.daemon.store.path)
    assert conn.execute("SELECT count(*) FROM cache").fetchone()[0] == 2
    assert (await ask(c, max_tokens=6))[0].headers["X-Anyad-Cache"] == "hit"  # 6 is back, and fresh
    now[0] += 60.5
    assert (await ask(c, max_tokens=6))[0].headers["X-Anyad-Cache"] == "miss"  # expired


async def test_an_expired_answer_is_served_when_every_target_fails(make_client, tiny_model, tmp_path, aiohttp_server):
    fake = FakeOpenAI("ok")
    server = await aiohttp_server(fake.app())
    s = parse_settings({
        "data_dir": str(tmp_path / "data"), "cache": {"ttl_s": 60.0},
        "providers": {"up": {"base_url": f"http://127.0.0.1:{server.port}/v1", "max_retries": 0}},
        "routes": [{"name": "chat", "targets": ["up/m1"]}], "router": {"backoff_base_s": 0.01}})
    c = await make_client(s)
    now = frozen_clock(c)
    r, fresh = await ask(c, model="chat")
    assert r.status == 200 and r.headers["X-Anyad-Cache"] == "miss"
    await settle(c)
    now[0] += 61
    assert (await ask(c, model="chat"))[0].headers["X-Anyad-Cache"] == "miss"  # expired: not served while up
    await settle(c)
    now[0] += 61
    fake.mode = "500"
    r, stale = await ask(c, model="chat")
    assert r.status == 200 and r.headers["X-Anyad-Cache"] == "stale" and r.headers["X-Anyad-Backend"] == "up/m1"
    assert stale["choices"][0]["message"] == fresh["choices"][0]["message"]
    # Nothing cached for this one: the failure reaches the client.
    r, err = await ask(c, model="chat", max_tokens=3)
    assert r.status == 500 and "error" in err  # the provider's own status
    # A client mistake is not papered over with an old answer.
    fake.mode = "400"
    r, _ = await ask(c, model="chat")
    assert r.status == 400


def test_an_older_database_is_migrated_forward(tmp_path):
    from sqlite_utils import Database

    path = tmp_path / "anyad.db"
    db = Database(sqlite3.connect(path))
    db["_migrations"].create({"name": str, "applied": float}, pk="name")
    MIGRATIONS[0](db)  # the schema as the first release left it
    db["_migrations"].insert({"name": MIGRATIONS[0].__name__, "applied": time.time()})
    db.execute("INSERT INTO conversations (id, created, updated, messages, exchanges) VALUES ('old', 1, 1, 0, 1)")
    db.execute("INSERT INTO exchanges (conversation_id, model) VALUES ('old', 'm')")
    db.conn.commit()
    db.conn.close()
    store = Store(path)
    store.close()
    conn = sqlite3.connect(path)
    assert [r[0] for r in conn.execute("SELECT name FROM _migrations ORDER BY applied")] == \
        [m.__name__ for m in MIGRATIONS]
    assert conn.execute("SELECT model, cache FROM exchanges").fetchall() == [("m", None)]  # kept, new column
    assert conn.execute("SELECT count(*) FROM cache").fetchone()[0] == 0
