"""Smaller hardening points: one dead provider is not "offline", an emptied config does not
reload, a keyless provider says it is misconfigured, a damaged database stops the start."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import time
import urllib.request

import pytest

from anyad.cli.status import render
from anyad.config import parse_settings
from anyad.store import Store
from conftest import MODEL_ID, anyad_cmd, clean_env, free_port
from fakes import Blackhole

MSGS = [{"role": "user", "content": "hello"}]


async def post(c, model: str, **kw):
    return await c.post("/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 2, **kw})


async def status(c) -> dict:
    return await (await c.get("/api/status")).json()


# -- 1. a refused connection proves the network is up ------------------------------------------

@pytest.mark.parametrize("healthy_too", [True, False])
async def test_one_dead_provider_does_not_take_the_healthy_ones_offline(make_client, tiny_model, start_fake,
                                                                       tmp_path, healthy_too):
    fake, url = await start_fake()
    dead = f"http://127.0.0.1:{free_port()}/v1"  # like a local vLLM that is not running
    providers = {"vllm": {"base_url": dead, "max_retries": 0}}
    if healthy_too:
        providers["up"] = {"base_url": url, "max_retries": 0}
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model)}},
        "providers": providers, "routes": [{"name": "chat", "targets": ["vllm/m", MODEL_ID]}],
        "router": {"breaker_failures": 2, "backoff_base_s": 0.01}}))
    for _ in range(2):
        r = await post(c, "chat")
        assert r.status == 200 and r.headers["X-Anyad-Backend"] == MODEL_ID
        assert "cannot connect" in r.headers["X-Anyad-Fallback"]  # tried each time, never skipped as offline
        assert (await status(c))["offline"]["offline"] is False
    if healthy_too:  # the healthy provider still answers, directly
        r = await post(c, "up/m")
        assert r.status == 200 and r.headers["X-Anyad-Backend"] == "up/m" and fake.requests
    # The dead one is its breaker's business: open, so it is skipped without a connect attempt.
    r = await post(c, "chat")
    assert r.headers["X-Anyad-Fallback"] == "vllm/m: circuit open"
    st = await status(c)
    assert st["offline"]["offline"] is False and st["breakers"]["vllm/m"]["state"] == "open"


async def test_one_unreachable_provider_is_not_offline_while_another_answers(make_client, tiny_model, start_fake,
                                                                            tmp_path):
    _, url = await start_fake()
    hole = Blackhole()
    try:
        c = await make_client(parse_settings({
            "data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model)}},
            "providers": {"far": {"base_url": f"http://127.0.0.1:{hole.port}/v1", "connect_timeout_s": 0.3,
                                  "max_retries": 0},
                          "up": {"base_url": url}},
            "routes": [{"name": "chat", "targets": ["far/m", MODEL_ID]}]}))
        for _ in range(2):  # "up" answers the background knock: far is tried again, not skipped as offline
            r = await post(c, "chat")
            assert r.status == 200 and "connecting timed out" in r.headers["X-Anyad-Fallback"]
        assert (await status(c))["offline"]["offline"] is False
    finally:
        hole.lift()


async def test_offline_once_no_provider_answers(make_client, tiny_model, tmp_path):
    holes = [Blackhole(), Blackhole()]
    try:
        c = await make_client(parse_settings({
            "data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model)}},
            "providers": {name: {"base_url": f"http://127.0.0.1:{h.port}/v1", "connect_timeout_s": 0.3,
                                 "max_retries": 0} for name, h in zip(("far", "farther"), holes)},
            "routes": [{"name": "chat", "targets": ["far/m", MODEL_ID]}],
            "router": {"offline_probe_interval_s": 3600}}))
        r = await post(c, "chat")
        assert r.status == 200 and "connecting timed out" in r.headers["X-Anyad-Fallback"]
        # The other provider, never asked yet, is knocked on in the background: no answer either.
        for _ in range(1200):
            if (await status(c))["offline"]["offline"]:
                break
            await asyncio.sleep(0.05)
        r = await post(c, "chat")
        assert r.status == 200 and r.headers["X-Anyad-Fallback"] == "far/m: offline"
    finally:
        for h in holes:
            h.lift()


# -- 2. an emptied config file does not reload --------------------------------------------------

async def test_a_reload_that_would_remove_every_key_and_model_is_refused_unless_the_file_says_so(
        make_client, tiny_model, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HARD_KEY", "hard-key-1")
    base = {"data_dir": str(tmp_path / "data"), "models": {MODEL_ID: {"path": str(tiny_model)}},
            "server": {"api_keys": ["env:HARD_KEY"]}}
    c = await make_client(parse_settings(base))
    auth = {"Authorization": "Bearer hard-key-1"}
    emptied = {"data_dir": str(tmp_path / "data")}  # what an emptied file (plus the same data_dir) parses to

    assert not await c.daemon.reload_from(lambda: parse_settings(emptied))
    assert "reload refused" in caplog.text and "no API keys and no models" in caplog.text
    assert (await post(c, MODEL_ID)).status == 401  # the key is still required…
    assert (await c.post("/v1/chat/completions", headers=auth,
                         json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 1})).status == 200  # …and works
    # Only the keys gone: refused as well.
    assert not await c.daemon.reload_from(lambda: parse_settings({**base, "server": {}}))
    assert (await post(c, MODEL_ID)).status == 401

    # Said in the file: accepted, and applied.
    assert await c.daemon.reload_from(lambda: parse_settings({**emptied, "server": {"allow_empty_reload": True}}))
    assert (await c.get("/v1/models")).status == 200  # no key needed any more
    await asyncio.to_thread(c.daemon.store.flush)
    rows = sqlite3.connect(c.daemon.store.path).execute(
        "SELECT action, detail FROM audit WHERE action LIKE 'config.%' ORDER BY id").fetchall()
    assert [a for a, _ in rows] == ["config.reload_rejected", "config.reload_rejected", "config.reload"]
    assert "allow_empty_reload" in json.loads(rows[0][1])["error"]


# -- 3. a keyless provider is misconfigured, and says why in full --------------------------------

async def test_a_provider_without_its_key_shows_as_misconfigured_with_the_whole_reason(make_client, tiny_model,
                                                                                      start_fake, monkeypatch,
                                                                                      tmp_path):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake, url = await start_fake()
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"),
        "providers": {"openai": {"base_url": url, "api_key": "env:OPENAI_API_KEY", "max_retries": 0},
                      "up": {"base_url": url}}}))
    await c.daemon.preloaded  # the providers' start, where the key is resolved once
    reason = "secret env:OPENAI_API_KEY: environment variable OPENAI_API_KEY is not set"
    st = await status(c)
    assert st["providers"] == {"openai": {"state": "misconfigured", "problem": reason}, "up": {"state": "ok"}}
    r = await post(c, "openai/gpt-4o")
    assert r.status == 503 and reason in (await r.json())["error"]["message"] and not fake.requests
    text = render(await status(c))
    assert f"openai: misconfigured: {reason}" in text
    row = next(line for line in text.splitlines() if "openai/gpt-4o" in line)
    assert "misconfigured" in row and "closed" not in row


# -- 4. a damaged database stops the start, in one line ------------------------------------------

def test_serve_refuses_a_damaged_database_in_one_line(tmp_path):
    data = tmp_path / "data"
    db_path = data / "anyad.db"
    Store(db_path).close()
    conn = sqlite3.connect(db_path)
    with conn:
        conn.executemany("INSERT INTO conversations (id, created, updated, title) VALUES (?, 1, 1, ?)",
                         [(f"c{i}", "a title long enough to fill pages " * 4) for i in range(2000)])
    page_size = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    pages = db_path.stat().st_size // page_size
    assert pages > 20
    with open(db_path, "r+b") as f:  # a page in the middle, overwritten as a bad disk would
        f.seek(pages // 2 * page_size)
        f.write(bytes(range(256)) * (page_size // 256))
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{data}"\n[server]\nport = {port}\n')
    proc = subprocess.Popen(anyad_cmd("serve", "--config", str(config)), env=clean_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while proc.poll() is None:  # it must stop by itself, never come to serve
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    pytest.fail("anyad served with a damaged database")
            except OSError:
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate()
    assert proc.returncode != 0 and "Traceback" not in stderr, stderr
    said = [line for line in stderr.splitlines() if line.startswith("anyad: ")]
    assert said == [stderr.strip().splitlines()[-1]], stderr  # one line, the last one
    assert str(db_path) in said[0] and "damaged" in said[0]
