"""Weighted routes: a canary's share of assignments, stickiness per conversation and per API
key, the variant in X-Anyad-Backend and the metrics, and new weights on reload."""

from __future__ import annotations

from collections import Counter

import pytest
from prometheus_client.parser import text_string_to_metric_families

from anyad.config import parse_settings
from anyad.errors import ConfigError
from conftest import MODEL_ID

MSGS = [{"role": "user", "content": "hi"}]


def settings(tiny_model, tmp_path, url_a, url_b, weights=(10, 90), **server):
    return parse_settings({
        "data_dir": str(tmp_path / "data"), "history": {"enabled": False}, "cache": {"enabled": False},
        "audit": {"enabled": False}, "server": server,
        "models": {MODEL_ID: {"path": str(tiny_model)}},
        "providers": {"a": {"base_url": url_a}, "b": {"base_url": url_b}},
        "routes": [{"name": "qwen", "targets": [{"model": "a/qwen-v2", "weight": weights[0]},
                                                {"model": "b/qwen-v1", "weight": weights[1]}, MODEL_ID]}]})


async def backend(c, **headers) -> str:
    r = await c.post("/v1/chat/completions", json={"model": "qwen", "messages": MSGS}, headers=headers)
    assert r.status == 200
    await r.read()
    return r.headers["X-Anyad-Backend"]


async def test_the_split_follows_the_weights_and_sticks(make_client, tiny_model, tmp_path, start_fake):
    (fa, ua), (fb, ub) = await start_fake(), await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, ua, ub))
    n = 600
    got = Counter([await backend(c, **{"X-Anyad-Conversation-Id": f"conv-{i}"}) for i in range(n)])
    assert set(got) == {"a/qwen-v2", "b/qwen-v1"}
    share = got["a/qwen-v2"] / n
    assert 0.06 < share < 0.14, got  # 10 % ± about three standard deviations
    # The upstream saw each variant's own model name.
    assert {r["model"] for r in fa.requests} == {"qwen-v2"} and {r["model"] for r in fb.requests} == {"qwen-v1"}
    # Sticky: one conversation never flips between versions.
    for i in range(20):
        first = await backend(c, **{"X-Anyad-Conversation-Id": f"conv-{i}"})
        assert {await backend(c, **{"X-Anyad-Conversation-Id": f"conv-{i}"}) for _ in range(5)} == {first}
    # The variant is in the metrics' labels.
    text = await (await c.get("/metrics")).text()
    by_backend = Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "anyad_requests_total" and s.labels.get("model") == "qwen":
                by_backend[s.labels["backend"]] += s.value
    assert by_backend["a/qwen-v2"] >= got["a/qwen-v2"] and by_backend["b/qwen-v1"] >= got["b/qwen-v1"]


async def test_sticky_per_api_key_and_new_weights_on_reload(make_client, tiny_model, tmp_path, start_fake,
                                                           monkeypatch):
    (_, ua), (_, ub) = await start_fake(), await start_fake()
    keys = [f"key-{i}" for i in range(40)]
    monkeypatch.setenv("K", keys[0])
    for i, k in enumerate(keys):
        monkeypatch.setenv(f"K{i}", k)
    refs = [f"env:K{i}" for i in range(len(keys))]
    c = await make_client(settings(tiny_model, tmp_path, ua, ub, weights=(50, 50), api_keys=refs))
    assigned = {}
    for k in keys:
        seen = {await backend(c, Authorization=f"Bearer {k}") for _ in range(3)}
        assert len(seen) == 1  # a key keeps its variant
        assigned[k] = seen.pop()
    assert set(assigned.values()) == {"a/qwen-v2", "b/qwen-v1"}  # 40 keys at 50/50 land on both
    # All traffic to the new version: a reload moves everyone, no restart.
    c.daemon.reload(settings(tiny_model, tmp_path, ua, ub, weights=(100, 0), api_keys=refs))
    assert {await backend(c, Authorization=f"Bearer {k}") for k in keys} == {"a/qwen-v2"}
    models = {m["id"]: m for m in (await (await c.get("/v1/models", headers={"Authorization": f"Bearer {keys[0]}"}))
                                   .json())["data"]}
    assert models["qwen"]["targets"][0] == {"model": "a/qwen-v2", "weight": 100.0}


async def test_a_weighted_variant_that_fails_falls_back(make_client, tiny_model, tmp_path, start_fake):
    (fa, ua), (_, ub) = await start_fake("500"), await start_fake()
    c = await make_client(settings(tiny_model, tmp_path, ua, ub, weights=(100, 0)))
    r = await c.post("/v1/chat/completions", json={"model": "qwen", "messages": MSGS})
    assert r.status == 200 and r.headers["X-Anyad-Backend"] == "b/qwen-v1"
    assert "a/qwen-v2" in r.headers["X-Anyad-Fallback"]


def test_negative_weights_are_refused(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="weight"):
        settings(tiny_model, tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2", weights=(-1, 5))
