"""One set of rules for every door: keys' roles and model patterns, rate limits, quotas,
usage, keep_alive and conversation ownership hold the same way on the OpenAI listener
and on the Ollama listener, because both call the same gateway layer (access, modelops,
embedflow, chatflow). Each test runs its matrix against both."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from anyad.cli import main as anyad_main
from anyad.config import parse_settings
from anyad.plugins import ollama as ollama_plugin
from conftest import MODEL_ID
from eventually import until

KEYS = {"ROOT_KEY": "root-key-Pz45Wv", "ALICE_KEY": "alice-key-Xq81Lm", "BOB_KEY": "bob-key-Kd02Ns",
        "CAROL_KEY": "carol-key-Wn37Ue"}
ROOT, ALICE, BOB, CAROL = KEYS.values()
MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture
def keys_env(monkeypatch):
    for name, value in KEYS.items():
        monkeypatch.setenv(name, value)


def settings(tiny_model, tmp_path, url, **server):
    return parse_settings({
        "data_dir": str(tmp_path / "data"), "cache": {"enabled": False}, "server": server,
        "models": {MODEL_ID: {"path": str(tiny_model), "keep_alive": "5m"}},
        "providers": {"up": {"base_url": url, "models": ["x"]}},
        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}},
        "keys": {"root": {"key": "env:ROOT_KEY", "role": "admin"},
                 # alice may use the remote models only; bob and carol the local one.
                 "alice": {"key": "env:ALICE_KEY", "models": ["up/*"]},
                 "bob": {"key": "env:BOB_KEY", "models": [MODEL_ID, "up/*"], "tokens_per_day": 60},
                 "carol": {"key": "env:CAROL_KEY", "models": [MODEL_ID]}}})


@dataclass
class Door:
    """One listener, spoken to in its own wire format."""

    name: str
    base: str
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, key: str | None = None, **kw) -> tuple[int, object]:
        headers = {**kw.pop("headers", {}), **({"Authorization": f"Bearer {key}"} if key else {})}
        async with self.http.request(method, self.base + path, headers=headers, **kw) as r:
            body = await r.json(content_type=None)
            return r.status, body

    async def chat(self, key: str, model: str = MODEL_ID, headers: dict[str, str] | None = None,
                   **extra) -> tuple[int, object]:
        if self.name == "openai":
            return await self.call("POST", "/v1/chat/completions", key, headers=headers or {},
                                   json={"model": model, "messages": MSGS, "max_tokens": 2, **extra})
        return await self.call("POST", "/api/chat", key, headers=headers or {},
                               json={"model": model, "messages": MSGS, "stream": False,
                                     "options": {"num_predict": 2}, **extra})

    async def embed(self, key: str, model: str = MODEL_ID) -> tuple[int, object]:
        if self.name == "openai":
            return await self.call("POST", "/v1/embeddings", key, json={"model": model, "input": "hello there"})
        return await self.call("POST", "/api/embed", key, json={"model": model, "input": "hello there"})

    async def load(self, key: str, model: str = MODEL_ID) -> int:
        if self.name == "openai":
            return (await self.call("POST", f"/api/models/{model}/load", key))[0]
        return (await self.call("POST", "/api/generate", key, json={"model": model}))[0]

    async def unload(self, key: str, model: str = MODEL_ID) -> int:
        if self.name == "openai":
            return (await self.call("POST", f"/api/models/{model}/unload", key))[0]
        return (await self.call("POST", "/api/generate", key, json={"model": model, "keep_alive": 0}))[0]


@pytest.fixture
async def daemon(make_client, tiny_model, tmp_path, start_fake, keys_env):
    """A daemon with keys and both listeners; ``daemon.doors``: {name: Door}."""

    async def start(**server):
        _, url = await start_fake()
        c = await make_client(settings(tiny_model, tmp_path, url, **server))
        host, port = ollama_plugin.address(c.daemon)
        http = aiohttp.ClientSession()
        c.doors = {"openai": Door("openai", str(c.make_url("")).rstrip("/"), http),
                   "ollama": Door("ollama", f"http://{host}:{port}", http)}
        sessions.append(http)
        return c

    sessions: list[aiohttp.ClientSession] = []
    yield start
    for s in sessions:
        await s.close()


def state(c) -> str:
    return c.daemon.scheduler.models[MODEL_ID].state


@pytest.mark.parametrize("door", ["openai", "ollama"])
async def test_a_key_limited_to_other_models_cannot_load_unload_list_or_use_them(daemon, door):
    c = await daemon()
    d = c.doors[door]
    assert await d.load(ALICE) == 403
    assert state(c) == "unloaded"
    assert await d.load(ROOT) == 200 and state(c) == "loaded"
    assert await d.unload(ALICE) == 403
    assert state(c) == "loaded"
    assert (await d.chat(ALICE))[0] == 403 and (await d.embed(ALICE))[0] == 403
    assert (await d.chat(ALICE, "up/x"))[0] == 200
    # A key that may use the model may load it through Ollama's convention; the admin API
    # stays the admin's.
    assert await d.unload(BOB) == (200 if door == "ollama" else 403)
    assert await d.unload(ROOT) == 200 and state(c) == "unloaded"


async def test_what_is_loaded_is_listed_only_to_keys_that_may_use_it(daemon):
    c = await daemon()
    ollama = c.doors["ollama"]
    await c.daemon.scheduler.load(MODEL_ID)
    for key, seen in ((ALICE, []), (BOB, [MODEL_ID]), (ROOT, [MODEL_ID])):
        status, body = await ollama.call("GET", "/api/ps", key)
        assert status == 200 and [m["name"] for m in body["models"]] == seen
        status, body = await ollama.call("GET", "/api/tags", key)
        assert (MODEL_ID in [m["name"] for m in body["models"]]) == bool(seen)


async def test_one_rate_limit_for_both_listeners(daemon):
    c = await daemon(rate_limit_per_minute=5)
    now = [1000.0]
    c.daemon.limiter.clock = lambda: now[0]  # time stands still: no token comes back during the test
    openai, ollama = c.doors["openai"], c.doors["ollama"]
    for d in (openai, ollama, openai, ollama, openai):
        assert (await d.call("GET", "/v1/models" if d is openai else "/api/tags", CAROL))[0] == 200
    for d in (openai, ollama):
        status, body = await d.call("GET", "/v1/models" if d is openai else "/api/tags", CAROL)
        assert status == 429
    assert (await ollama.chat(CAROL))[0] == 429
    # Another key has its own bucket; a minute later carol has hers back.
    assert (await ollama.call("GET", "/api/tags", BOB))[0] == 200
    now[0] += 60
    assert (await ollama.chat(CAROL))[0] == 200


async def test_embeddings_count_usage_metrics_and_quotas_on_both_listeners(daemon):
    c = await daemon()
    openai, ollama = c.doors["openai"], c.doors["ollama"]
    assert (await ollama.embed(BOB))[0] == 200
    assert (await openai.embed(BOB))[0] == 200
    await asyncio.to_thread(c.daemon.store.flush)
    status, body = await openai.call("GET", "/api/usage?group_by=model", BOB)
    assert status == 200 and body["data"][0]["requests"] == 2 and body["data"][0]["prompt_tokens"] > 0
    status, text = 0, ""
    async with openai.http.get(openai.base + "/metrics", headers={"Authorization": f"Bearer {ROOT}"}) as r:
        text = await r.text()
    endpoints = {s.labels["endpoint"] for f in text_string_to_metric_families(text) if f.name == "anyad_requests"
                 for s in f.samples if s.labels.get("model") == MODEL_ID and s.labels.get("status") == "200"}
    assert {"/api/embed", "/v1/embeddings"} <= endpoints
    # bob's 60 tokens a day run out on embeddings through either door, then both refuse.
    for _ in range(40):
        if (await ollama.embed(BOB))[0] == 429:
            break
    assert (await ollama.embed(BOB))[0] == 429 and (await openai.embed(BOB))[0] == 429
    assert (await openai.chat(BOB))[0] == 429 and (await ollama.chat(BOB))[0] == 429


@pytest.mark.parametrize("door", ["openai", "ollama"])
async def test_only_admin_keys_keep_a_model_loaded_longer_than_configured(daemon, door):
    c = await daemon()
    d = c.doors[door]
    for ka in (-1, "1h", 3600):
        status, body = await d.chat(CAROL, keep_alive=ka)
        assert status == 403, body
        if door == "openai":
            assert body["error"]["param"] == "keep_alive" and body["error"]["code"] == "keep_alive_not_allowed"
    assert (await d.chat(CAROL, keep_alive="1m"))[0] == 200  # shorter than the model's 5 minutes
    assert c.daemon.scheduler.models[MODEL_ID].keep_alive == 60
    assert (await d.chat(ROOT, keep_alive=-1))[0] == 200
    assert c.daemon.scheduler.models[MODEL_ID].keep_alive == float("inf")
    if door == "ollama":  # Ollama's load-only request obeys it too
        status, _ = await d.call("POST", "/api/generate", CAROL, json={"model": MODEL_ID, "keep_alive": -1})
        assert status == 403


@pytest.mark.parametrize("door", ["openai", "ollama"])
async def test_a_key_cannot_write_into_another_keys_conversation(daemon, door):
    c = await daemon()
    d = c.doors[door]
    status, _ = await c.doors["openai"].call("POST", "/v1/chat/completions", BOB,
                                             json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2})
    await asyncio.to_thread(c.daemon.store.flush)
    _, page = await c.doors["openai"].call("GET", "/api/conversations", BOB)
    theirs = page["data"][0]["id"]
    status, body = await d.chat(CAROL, headers={"X-Anyad-Conversation-Id": theirs})
    assert status == 403, body
    # Her own id (new or continued) works; the admin may continue anyone's.
    assert (await d.chat(CAROL, headers={"X-Anyad-Conversation-Id": "carol-1"}))[0] == 200
    assert (await d.chat(CAROL, headers={"X-Anyad-Conversation-Id": "carol-1"}))[0] == 200
    assert (await d.chat(ROOT, headers={"X-Anyad-Conversation-Id": theirs}))[0] == 200
    await asyncio.to_thread(c.daemon.store.flush)
    _, conv = await c.doors["openai"].call("GET", f"/api/conversations/{theirs}", BOB)
    assert conv["exchanges"] and len(conv["exchanges"]) == 2  # bob's and the admin's; none of carol's
    _, mine = await c.doors["openai"].call("GET", "/api/conversations/carol-1", CAROL)
    assert mine["owner"] == "carol" and len(mine["exchanges"]) == 2


async def test_revoking_the_last_key_keeps_the_daemon_locked_until_unlocked(make_client, tiny_model, tmp_path,
                                                                            capsys):
    data = tmp_path / "data"
    config = tmp_path / "anyad.toml"
    config.write_text(f'data_dir = "{data}"\n')
    c = await make_client(parse_settings({"data_dir": str(data), "models": {MODEL_ID: {"path": str(tiny_model)}}}))
    assert (await c.get("/v1/models")).status == 200
    assert anyad_main(["keys", "--config", str(config), "create", "owner", "--role", "admin"]) == 0
    key = capsys.readouterr().out.strip()
    auth = {"Authorization": f"Bearer {key}"}
    assert (await c.get("/v1/models")).status == 401
    assert (await c.get("/v1/models", headers=auth)).status == 200
    assert anyad_main(["keys", "--config", str(config), "revoke", "owner"]) == 0
    for headers in ({}, auth):
        assert (await c.get("/v1/models", headers=headers)).status == 401
        assert (await c.get("/api/conversations", headers=headers)).status == 401
    # Unlocking is said on purpose.
    assert anyad_main(["keys", "--config", str(config), "unlock"]) == 2
    assert "--yes" in capsys.readouterr().err
    assert (await c.get("/v1/models")).status == 401
    assert anyad_main(["keys", "--config", str(config), "unlock", "--yes"]) == 0
    assert (await c.get("/v1/models")).status == 200


async def test_unloading_a_busy_model_says_what_will_happen(daemon):
    c = await daemon()
    openai = c.doors["openai"]
    await c.daemon.scheduler.load(MODEL_ID)
    started, release = asyncio.Event(), asyncio.Event()
    body = {"model": MODEL_ID, "messages": MSGS, "max_tokens": 64, "stream": True}

    async def stream() -> int:
        n = 0
        async with openai.http.post(openai.base + "/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {ROOT}"}) as r:
            async for _ in r.content:
                n += 1
                started.set()
                await release.wait()  # keep the model busy until the unload has been asked
        return n

    task = asyncio.create_task(stream())
    await started.wait()
    status, answer = await openai.call("POST", f"/api/models/{MODEL_ID}/unload", ROOT)
    assert status == 202 and answer["state"] == "unloading" and answer["pending_requests"] == 1
    assert "after 1 request" in answer["message"]
    assert state(c) == "loaded"
    release.set()
    assert await task > 2  # the reply ran to its end
    # the unload follows the reply's end, on the daemon's own schedule
    await until(lambda: state(c) == "unloaded", what="the unload")
    status, answer = await openai.call("POST", f"/api/models/{MODEL_ID}/unload", ROOT)
    assert status == 200 and answer["state"] == "not_loaded"


async def test_a_conversation_id_is_held_by_its_first_key_while_its_reply_is_still_running(daemon):
    c = await daemon()
    openai = c.doors["openai"]
    started, release = asyncio.Event(), asyncio.Event()
    body = {"model": MODEL_ID, "messages": [{"role": "user", "content": "BOB SECRET"}], "max_tokens": 32,
            "stream": True}

    async def bob() -> None:
        async with openai.http.post(openai.base + "/v1/chat/completions", json=body,
                                    headers={"Authorization": f"Bearer {BOB}",
                                             "X-Anyad-Conversation-Id": "shared-1"}) as r:
            async for _ in r.content:
                started.set()
                await release.wait()

    task = asyncio.create_task(bob())
    await started.wait()  # bob's exchange is not written yet
    status, _ = await openai.chat(CAROL, headers={"X-Anyad-Conversation-Id": "shared-1"})
    assert status == 403
    release.set()
    await task
    await asyncio.to_thread(c.daemon.store.flush)
    _, conv = await openai.call("GET", "/api/conversations/shared-1", BOB)
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]


async def test_the_writer_keeps_a_foreign_exchange_out_of_another_keys_conversation(tmp_path):
    from anyad.store import Exchange, Store

    store = Store(tmp_path / "anyad.db")

    def ex(owner: str, text: str, admin: bool = False) -> Exchange:
        return Exchange("conv-9", f"r-{text}", MODEL_ID, MODEL_ID, False, None, [{"role": "user", "content": text}],
                        {"role": "assistant", "content": "ok"}, "stop", 1, 1, 0.0, 1.0, 1.0, owner,
                        any_conversation=admin)

    try:
        for e in (ex("bob", "mine"), ex("carol", "intruder"), ex("root", "admin's", admin=True)):
            store.record(e)
        store.flush()
        conv = store.conversation("conv-9")
        assert conv["owner"] == "bob"
        assert [m["content"] for m in conv["messages"] if m["role"] == "user"] == ["mine", "admin's"]
        others = [x for x in store.conversations(owner="carol")["data"]]
        assert len(others) == 1 and others[0]["id"].startswith("conv-9.")
    finally:
        store.close()


async def test_a_keep_alive_of_centuries_does_not_break_the_listing(daemon):
    c = await daemon()
    ollama = c.doors["ollama"]
    assert (await ollama.chat(ROOT, keep_alive="1e12"))[0] == 200
    status, body = await ollama.call("GET", "/api/ps", ROOT)
    assert status == 200 and body["models"][0]["expires_at"].startswith("2318")
