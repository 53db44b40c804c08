"""Keys with roles, model patterns, quotas and usage, through the real HTTP API with the
official openai client, the `anyad keys` and `anyad usage` commands, and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import time

import openai
import pytest

from anyad.config import parse_settings
from anyad.quotas import Quotas
from conftest import MODEL_ID, anyad_cmd, clean_env

ALICE, ROOT = "alice-key-Xq81Lm", "root-key-Pz45Wv"
MSGS = [{"role": "user", "content": "hello"}]


def settings(tiny_model, tmp_path, url, **alice):
    return parse_settings({
        "data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
        "models": {MODEL_ID: {"path": str(tiny_model)}},
        "providers": {"up": {"base_url": url, "models": ["x"], "prices": {"x": {"prompt": 2.0, "completion": 4.0}}}},
        "routes": [{"name": "secret-route", "targets": ["up/x"]}],
        "keys": {"alice": {"key": "env:ALICE_KEY", "models": [MODEL_ID, "up/*"], **alice},
                 "root": {"key": "env:ROOT_KEY", "role": "admin"}}})


@pytest.fixture
def keys_env(monkeypatch):
    monkeypatch.setenv("ALICE_KEY", ALICE)
    monkeypatch.setenv("ROOT_KEY", ROOT)


def client(c, key):
    return openai.AsyncOpenAI(base_url=str(c.make_url("/v1")), api_key=key, max_retries=0)


async def test_roles_and_model_access(make_client, tiny_model, tmp_path, start_fake, keys_env):
    _, url = await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, url))
    alice, root = client(c, ALICE), client(c, ROOT)
    r = await alice.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=2)
    assert r.choices[0].message.content
    assert (await alice.chat.completions.create(model="up/x", messages=MSGS)).choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError) as err:
        await alice.chat.completions.create(model="secret-route", messages=MSGS)
    assert err.value.status_code == 403 and err.value.code == "model_not_allowed"
    with pytest.raises(openai.PermissionDeniedError):
        await alice.embeddings.create(model="secret-route", input="x")
    assert sorted(m.id for m in (await alice.models.list()).data) == [MODEL_ID, "up/x"]
    assert "secret-route" in [m.id for m in (await root.models.list()).data]
    assert (await root.chat.completions.create(model="secret-route", messages=MSGS)).choices[0].message.content
    # The admin surface is the admin's.
    for path in ("/api/status", "/metrics", "/api/models/tiny/unload"):
        method = c.post if path.endswith("unload") else c.get
        r = await method(path, headers={"Authorization": f"Bearer {ALICE}"})
        assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden"
        assert (await method(path, headers={"Authorization": f"Bearer {ROOT}"})).status == 200
    # Each key sees its own conversations; the admin sees all.
    await asyncio.to_thread(c.daemon.store.flush)
    mine = await (await c.get("/api/conversations", headers={"Authorization": f"Bearer {ALICE}"})).json()
    every = await (await c.get("/api/conversations", headers={"Authorization": f"Bearer {ROOT}"})).json()
    assert mine["total"] == 2 and every["total"] == 3 and {x["owner"] for x in mine["data"]} == {"alice"}
    theirs = next(x["id"] for x in every["data"] if x["owner"] == "root")
    r = await c.get(f"/api/conversations/{theirs}", headers={"Authorization": f"Bearer {ALICE}"})
    assert r.status == 404
    r = await c.delete(f"/api/conversations/{theirs}", headers={"Authorization": f"Bearer {ALICE}"})
    assert r.status == 404


async def test_keys_made_with_the_cli_work_at_once_and_revocation_too(make_client, tiny_model, tmp_path,
                                                                      start_fake, keys_env, caplog):
    caplog.set_level(logging.DEBUG)
    _, url = await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, url))
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    env = clean_env(tmp_path)

    def keys(*args):
        return subprocess.run(anyad_cmd("keys", "--config", str(cfg), *args), env=env, capture_output=True,
                              text=True, timeout=60)

    p = keys("create", "bob", "--yes", "--models", "up/*", "--tokens-per-day", "1000")
    assert p.returncode == 0, p.stderr
    bob = p.stdout.strip()
    assert bob.startswith("ak-") and "shown this once" in p.stderr
    assert keys("create", "bob").returncode == 1  # names are unique
    r = await client(c, bob).chat.completions.create(model="up/x", messages=MSGS)
    assert r.choices[0].message.content
    listed = json.loads(keys("list", "--json").stdout)
    row = next(x for x in listed if x["name"] == "bob")
    assert row["role"] == "user" and row["state"] == "active" and row["tokens_per_day"] == 1000
    assert bob not in keys("list").stdout
    assert keys("revoke", "bob").returncode == 0
    with pytest.raises(openai.AuthenticationError):
        await client(c, bob).chat.completions.create(model="up/x", messages=MSGS)
    assert keys("create", "old", "--yes", "--expires", "2020-01-01").returncode == 2  # never usable: refused
    p = keys("create", "old", "--yes", "--expires", "2999-01-01")
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "anyad.db") as db:  # the day comes: it expires
        db.execute("UPDATE api_keys SET expires = 1 WHERE name = 'old'")
    with pytest.raises(openai.AuthenticationError):
        await client(c, p.stdout.strip()).models.list()
    # The key itself is nowhere: not in the database, the logs, nor any reply.
    await asyncio.to_thread(c.daemon.store.flush)
    for f in (tmp_path / "data").iterdir():
        assert bob.encode() not in f.read_bytes(), f
    assert bob not in caplog.text
    audit = subprocess.run(anyad_cmd("audit", "--config", str(cfg), "--json"), env=env, capture_output=True,
                           text=True, timeout=60).stdout
    assert '"key.create"' in audit and '"key.revoke"' in audit and bob not in audit


async def test_token_quota_runs_out_resets_and_survives_a_restart(make_client, tiny_model, tmp_path, start_fake,
                                                                  keys_env):
    _, url = await start_fake()
    now = [time.time()]
    c = await make_client(settings(tiny_model, tmp_path, url, tokens_per_day=30))
    c.daemon.quotas = Quotas(c.daemon.quotas.db_path, clock=lambda: now[0])
    alice = client(c, ALICE)
    raw = await alice.chat.completions.with_raw_response.create(model="up/x", messages=MSGS)
    assert raw.headers["X-Anyad-Quota-Remaining"] == str(30 - 18)  # the fake provider reports 18 tokens
    await alice.chat.completions.create(model="up/x", messages=MSGS)  # 36 of 30: this one started under
    with pytest.raises(openai.RateLimitError) as err:
        await alice.chat.completions.create(model="up/x", messages=MSGS)
    resp = err.value.response
    assert err.value.code == "quota_exceeded" and resp.headers["X-Anyad-Quota-Remaining"] == "0"
    midnight = now[0] - now[0] % 86400 + 86400
    assert abs(int(resp.headers["Retry-After"]) - (midnight - now[0])) <= 2
    # A restart remembers (the counters come from the usage table).
    await asyncio.to_thread(c.daemon.store.flush)
    await c.close()
    c2 = await make_client(settings(tiny_model, tmp_path, url, tokens_per_day=30))
    c2.daemon.quotas = Quotas(c2.daemon.quotas.db_path, clock=lambda: now[0])
    with pytest.raises(openai.RateLimitError):
        await client(c2, ALICE).chat.completions.create(model="up/x", messages=MSGS)
    now[0] = midnight + 1  # the next day (UTC): a fresh quota
    assert (await client(c2, ALICE).chat.completions.create(model="up/x", messages=MSGS)).choices


async def test_concurrent_requests_overrun_by_at_most_those_in_flight(make_client, tiny_model, tmp_path,
                                                                     start_fake, keys_env):
    _, url = await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, url, tokens_per_day=1))
    alice = client(c, ALICE)
    results = await asyncio.gather(*(alice.chat.completions.create(model="up/x", messages=MSGS) for _ in range(4)),
                                   return_exceptions=True)
    ok = sum(not isinstance(r, Exception) for r in results)
    assert ok >= 1 and all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, Exception))
    # Each answered request counted once, and none after the quota ran out.
    counter = c.daemon.quotas.counters["alice"]
    assert counter.day_tokens == 18 * ok
    with pytest.raises(openai.RateLimitError):
        await alice.chat.completions.create(model="up/x", messages=MSGS)
    assert c.daemon.quotas.counters["alice"].day_tokens == 18 * ok


async def test_requests_per_minute_per_key(make_client, tiny_model, tmp_path, start_fake, keys_env):
    _, url = await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, url, requests_per_minute=2))
    alice = client(c, ALICE)
    for _ in range(2):
        await alice.chat.completions.create(model="up/x", messages=MSGS)
    with pytest.raises(openai.RateLimitError) as err:
        await alice.chat.completions.create(model="up/x", messages=MSGS)
    assert err.value.code == "quota_exceeded"
    assert (await client(c, ROOT).chat.completions.create(model="up/x", messages=MSGS)).choices  # others go on


async def test_usage_report_over_http_and_the_cli(make_client, tiny_model, tmp_path, start_fake, keys_env):
    _, url = await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, url))
    alice, root = client(c, ALICE), client(c, ROOT)
    for _ in range(2):
        await alice.chat.completions.create(model="up/x", messages=MSGS)
    await alice.chat.completions.create(model=MODEL_ID, messages=MSGS, max_tokens=3)
    with pytest.raises(openai.PermissionDeniedError):
        await alice.chat.completions.create(model="secret-route", messages=MSGS)
    await root.chat.completions.create(model="up/x", messages=MSGS)

    async def get(path, key):
        r = await c.get(path, headers={"Authorization": f"Bearer {key}"})
        return r.status, await r.json()

    status, by_model = await get("/api/usage?group_by=model&key=alice", ROOT)
    rows = {r["model"]: r for r in by_model["data"]}
    assert status == 200 and rows["up/x"]["requests"] == 2 and rows["up/x"]["prompt_tokens"] == 22
    assert rows["up/x"]["completion_tokens"] == 14 and rows["up/x"]["cost"] == pytest.approx(2 * (11 * 2 + 7 * 4) / 1e6)
    assert rows[MODEL_ID]["completion_tokens"] == 3 and rows[MODEL_ID]["cost"] is None
    assert rows["secret-route"]["errors"] == 1
    status, by_key = await get("/api/usage?group_by=key", ROOT)
    assert {r["key"]: r["requests"] for r in by_key["data"]} == {"alice": 4, "root": 1}
    status, own = await get("/api/usage?group_by=key", ALICE)  # a user sees only itself
    assert [r["key"] for r in own["data"]] == ["alice"]
    assert (await get("/api/usage?key=root", ALICE))[0] == 403
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    env = clean_env(tmp_path)
    out = subprocess.run(anyad_cmd("usage", "--config", str(cfg), "--group-by", "key", "--format", "csv"), env=env,
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert out[0] == "key,requests,prompt_tokens,completion_tokens,errors,cache_hits,cost"
    assert out[1].startswith("alice,4,") and out[2] == "root,1,11,7,0,0,5e-05"
    table = subprocess.run(anyad_cmd("usage", "--config", str(cfg), "--group-by", "model"), env=env,
                           capture_output=True, text=True, timeout=60).stdout
    assert "PROMPT TOKENS" in table and "up/x" in table
