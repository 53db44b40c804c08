"""GET /metrics (Prometheus text through prometheus-client) and the audit log."""

from __future__ import annotations

import asyncio
import json
import sqlite3

from prometheus_client.parser import text_string_to_metric_families

from anyad import audit as audit_log
from anyad.config import parse_settings
from conftest import MODEL_ID

MSGS = [{"role": "user", "content": "hello"}]
LONG = 1500  # tokens: long enough that a scrape is answered before the reply ends


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: dict, name: str, **labels) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def scrape(c) -> dict:
    r = await c.get("/metrics")
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    return samples(await r.text())


async def test_metrics_count_requests_tokens_loads_cache_and_fallbacks(make_client, tiny_model, tmp_path,
                                                                      start_fake):
    fake, url = await start_fake("500")
    s = parse_settings({"data_dir": str(tmp_path / "data"),
                        "models": {MODEL_ID: {"path": str(tiny_model)}},
                        "providers": {"up": {"base_url": url, "max_retries": 0}},
                        "routes": [{"name": "smart", "targets": ["up/gpt", MODEL_ID]}],
                        "router": {"backoff_base_s": 0.01}})
    c = await make_client(s)
    before = await scrape(c)
    assert value(before, "anyad_loaded_models") == 0
    assert value(before, "anyad_ram_total_bytes") > 0  # the machine's own numbers, read by psutil
    body = {"model": "smart", "messages": MSGS, "max_tokens": 3, "temperature": 0}
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status == 200 and r.headers["X-Anyad-Backend"] == MODEL_ID
    usage = (await r.json())["usage"]
    await asyncio.to_thread(c.daemon.store.flush)
    r = await c.post("/v1/chat/completions", json=body)  # the same deterministic request: a cache hit
    assert r.status == 200 and r.headers["X-Anyad-Cache"] == "hit"
    r = await c.post("/v1/chat/completions", json={**body, "model": "nope"})
    assert r.status == 404
    m = await scrape(c)
    ep = "/v1/chat/completions"
    assert value(m, "anyad_requests_total", endpoint=ep, model="smart", backend=MODEL_ID, status="200") == 2
    assert value(m, "anyad_requests_total", endpoint=ep, model="nope", backend="", status="404") == 1
    assert value(m, "anyad_request_duration_seconds_count", endpoint=ep) == 3
    assert value(m, "anyad_time_to_first_token_seconds_count", backend=MODEL_ID) == 2
    # Tokens count what engines did, not what the cache replayed.
    assert value(m, "anyad_tokens_total", kind="prompt") == usage["prompt_tokens"]
    assert value(m, "anyad_tokens_total", kind="completion") == 3
    assert value(m, "anyad_model_loads_total", model=MODEL_ID, result="ok") == 1
    assert value(m, "anyad_model_load_seconds_count", model=MODEL_ID) == 1
    assert value(m, "anyad_loaded_models") == 1
    assert value(m, "anyad_queue_depth", model=MODEL_ID) == 0
    assert value(m, "anyad_model_memory_bytes", model=MODEL_ID, kind="ram") > 0
    assert value(m, "anyad_cache_requests_total", result="miss") == 1
    assert value(m, "anyad_cache_requests_total", result="hit") == 1
    assert value(m, "anyad_fallbacks_total", **{"from": "up/gpt", "reason": "error"}) == 1
    assert value(m, "anyad_breaker_open", target="up/gpt") == 0
    # The breaker opens after three failures in a row, and the gauge says so.
    for i in range(3):
        r = await c.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": str(i)}]})
        assert r.status == 200
    m = await scrape(c)
    assert value(m, "anyad_breaker_open", target="up/gpt") == 1
    assert value(m, "anyad_fallbacks_total", **{"from": "up/gpt", "reason": "circuit_open"}) == 1
    # Unloading shows too.
    assert await c.daemon.scheduler.unload(MODEL_ID)
    m = await scrape(c)
    assert value(m, "anyad_loaded_models") == 0
    assert value(m, "anyad_model_unloads_total", model=MODEL_ID, reason="asked") == 1


async def test_metrics_answer_while_a_model_generates(make_client, tiny_model, tmp_path):
    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "models": {MODEL_ID: {"path": str(tiny_model)}}}))
    await c.daemon.scheduler.load(MODEL_ID)
    gen = asyncio.create_task(c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS,
                                                                    "max_tokens": LONG}))
    while not c.daemon.scheduler.models[MODEL_ID].active:
        await asyncio.sleep(0.01)
    m = await scrape(c)
    assert not gen.done(), "the generation finished before the scrape was answered"
    # The generating request and the scrape itself.
    assert value(m, "anyad_in_flight_requests") == 2 and value(m, "anyad_active_requests", model=MODEL_ID) == 1
    r = await gen
    assert (await r.json())["usage"]["completion_tokens"] == LONG


async def test_model_labels_from_clients_are_capped(make_client, tiny_model, tmp_path):
    from anyad import metrics

    c = await make_client(parse_settings({"data_dir": str(tmp_path / "data"),
                                          "models": {MODEL_ID: {"path": str(tiny_model)}}}))
    c.daemon.metrics._model.limit = 5
    for i in range(12):
        r = await c.post("/v1/chat/completions", json={"model": f"made-up-{i}", "messages": MSGS})
        assert r.status == 404
    m = await scrape(c)
    models = {dict(labels).get("model") for (name, labels) in m if name == "anyad_requests_total"}
    assert len(models - {None}) == 6 and "other" in models
    assert metrics.MAX_LABEL_VALUES >= 100


async def test_audit_log_records_requests_and_admin_actions(make_client, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("ANYAD_TEST_KEY", "audit-key-Zq81")
    s = parse_settings({"data_dir": str(tmp_path / "data"), "server": {"api_keys": ["env:ANYAD_TEST_KEY"]},
                        "models": {MODEL_ID: {"path": str(tiny_model)}}})
    c = await make_client(s)
    auth = {"Authorization": "Bearer audit-key-Zq81"}
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2},
                     headers=auth)
    assert r.status == 200
    rid = r.headers["X-Request-Id"]
    assert (await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS})).status == 401
    await c.get("/health")  # probes are not audited
    assert await c.daemon.scheduler.unload(MODEL_ID)
    await asyncio.to_thread(c.daemon.store.flush)
    db = tmp_path / "data" / "anyad.db"
    rows = list(reversed(list(audit_log.read(db))))  # oldest first
    requests = [r for r in rows if r["action"] == "request"]
    assert [(r["actor"], r["target"], r["status"]) for r in requests] == [
        ("env:ANYAD_TEST_KEY", MODEL_ID, 200), ("addr:127.0.0.1", None, 401)]  # refused before it was read
    assert requests[0]["request_id"] == rid
    detail = json.loads(requests[0]["detail"])
    assert detail["endpoint"] == "/v1/chat/completions" and detail["backend"] == MODEL_ID
    assert "content" not in detail  # only when include_content
    actions = [(r["action"], r["target"]) for r in rows if r["action"] != "request"]
    assert ("model.load", MODEL_ID) in actions and ("model.unload", MODEL_ID) in actions
    load = next(json.loads(r["detail"]) for r in rows if r["action"] == "model.load")
    assert load["placement"] == "cpu" and load["seconds"] > 0
    # One row for the request that used the model: its usage row, which the log shows.
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*) FROM audit WHERE request_id = ?", (rid,)).fetchone()[0] == 0
    assert conn.execute("SELECT actor, audited, completion_tokens FROM usage WHERE request_id = ?",
                        (rid,)).fetchall() == [("env:ANYAD_TEST_KEY", 1, 2)]
    conn.close()
    # The key itself is nowhere in the database.
    assert b"audit-key-Zq81" not in (tmp_path / "data" / "anyad.db").read_bytes()


async def test_audit_keeps_content_only_when_asked(make_client, tiny_model, tmp_path):
    s = parse_settings({"data_dir": str(tmp_path / "data"), "audit": {"include_content": True},
                        "history": {"enabled": False}, "models": {MODEL_ID: {"path": str(tiny_model)}}})
    c = await make_client(s)
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2})
    reply = (await r.json())["choices"][0]["message"]["content"]
    await asyncio.to_thread(c.daemon.store.flush)
    db = tmp_path / "data" / "anyad.db"
    [row] = [r for r in audit_log.read(db) if r["action"] == "request"]
    content = json.loads(row["detail"])["content"]
    assert content["messages"] == MSGS and content["reply"]["content"] == reply
    # The audit's retention takes the content and who sent it; the usage stays counted.
    c.daemon.audit.settings.max_age_days = -1  # everything is older than "in a day's time"
    await asyncio.wrap_future(c.daemon.audit.apply_retention())
    assert not [r for r in audit_log.read(db) if r["action"] == "request"]
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*), max(detail), max(actor) FROM usage").fetchone() == (1, None, None)
    conn.close()
