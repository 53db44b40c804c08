"""Pools: replicas of one model balanced by outstanding requests, conversations kept on the
replica that holds their prefix, health checks, ejection and slow return, a pool as a route's
target with a local fallback, and what the status and the metrics show of it."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict

import pytest
from prometheus_client.parser import text_string_to_metric_families

from anyad.config import parse_settings
from anyad.errors import ConfigError
from conftest import MODEL_ID
from eventually import until
from test_serve import serving


def pool_settings(tmp_path, urls, tiny_model=None, **pool):
    data = {"data_dir": str(tmp_path / "data"), "history": {"enabled": False}, "cache": {"enabled": False},
            "audit": {"enabled": False},
            "pools": {"fleet": {"model": "m", "replicas": [{"base_url": u, "name": f"r{i}"}
                                                           for i, u in enumerate(urls)], **pool}}}
    if tiny_model is not None:
        data["models"] = {MODEL_ID: {"path": str(tiny_model)}}
        data["routes"] = [{"name": "smart", "targets": ["fleet", MODEL_ID]}]
    return parse_settings(data)


def ask(i: int, turn: int) -> list[dict]:
    """Conversation ``i`` at ``turn``: the same opening, then a growing history."""
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": f"conversation {i}"}]
    for t in range(turn):
        msgs += [{"role": "assistant", "content": f"answer {t}"}, {"role": "user", "content": f"more {t}"}]
    return msgs


async def send(c, i: int, turn: int, named: bool = True, model: str = "fleet", stream: bool = False):
    headers = {"X-Anyad-Conversation-Id": f"conv-{i}"} if named else {}
    r = await c.post("/v1/chat/completions", json={"model": model, "messages": ask(i, turn), "max_tokens": 4,
                                                   "stream": stream}, headers=headers)
    body = await r.read()
    assert r.status == 200, body
    return r.headers["X-Anyad-Backend"], r.headers.get("X-Anyad-Fallback")


async def test_balanced_and_sticky(make_client, tmp_path, start_replicas):
    """Uniform load from 160 conversations (half named by a header, half only by how they
    begin), three turns each, eight at a time: every replica gets its quarter within 10 %,
    and each conversation's turns stay on one replica."""
    reps = await start_replicas(4)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], health_check="off"))
    where: dict[int, list[str]] = defaultdict(list)
    sem = asyncio.Semaphore(8)

    async def conversation(i: int) -> None:
        async with sem:
            for turn in range(3):
                backend, _ = await send(c, i, turn, named=i % 2 == 0)
                where[i].append(backend)

    await asyncio.gather(*(conversation(i) for i in range(160)))
    got = Counter(b for seq in where.values() for b in seq)
    assert set(got) == {f"fleet@r{i}" for i in range(4)}
    mean = sum(got.values()) / 4
    assert all(abs(n - mean) <= 0.1 * mean for n in got.values()), got
    turns = sum(len(seq) for seq in where.values())
    at_home = sum(sum(1 for b in seq if b == seq[0]) for seq in where.values())
    assert at_home / turns >= 0.95, at_home / turns
    # The upstream saw the pool's model name, and each request once.
    assert sum(len(f.requests) for f, _ in reps) == turns
    assert {r["model"] for f, _ in reps for r in f.requests} == {"m"}


async def test_a_busy_home_spills_and_the_conversation_comes_back(make_client, tmp_path, start_replicas):
    reps = await start_replicas(4)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], health_check="off"))
    home, _ = await send(c, 1, 0)
    fake = reps[int(home[-1])][0]
    fake.hold = asyncio.Event()
    # While its home is busy with one of its requests and the rest are idle, more of them go
    # elsewhere instead of queueing there.
    first = asyncio.ensure_future(send(c, 1, 1))
    while fake.waiting < 1:
        await asyncio.sleep(0.01)
    others = [await send(c, 1, 1) for _ in range(3)]
    assert all(b != home for b, _ in others), others
    fake.hold.set()
    assert (await first)[0] == home
    # Not busy any more: back home.
    assert (await send(c, 1, 2))[0] == home


async def test_an_unhealthy_replica_loses_its_conversations_and_gets_them_back(make_client, tmp_path,
                                                                               start_replicas):
    reps = await start_replicas(4)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], slow_start_s=30))
    now = [1000.0]
    c.daemon.router.clock = lambda: now[0]
    pool = c.daemon.pools["fleet"]
    await pool.check()
    homes = {i: (await send(c, i, 0))[0] for i in range(40)}
    sick = "fleet@r2"
    assert sick in homes.values()
    reps[2][0].healthy = False
    await pool.check()
    status = await (await c.get("/api/status")).json()
    assert status["pools"]["fleet"]["replicas"]["r2"]["state"] == "down"
    assert "503" in status["pools"]["fleet"]["replicas"]["r2"]["health_error"]
    before = len(reps[2][0].requests)
    moved = {i: (await send(c, i, 1))[0] for i in homes}
    assert len(reps[2][0].requests) == before  # nothing sent to the sick one
    for i, h in homes.items():
        if h != sick:
            assert moved[i] == h  # the others stay put
        else:
            assert moved[i] != sick
    # It recovers: slow start first (a tenth of its share), then all of its own come back.
    reps[2][0].healthy = True
    await pool.check()
    status = await (await c.get("/api/status")).json()
    assert status["pools"]["fleet"]["replicas"]["r2"]["capacity"] == pytest.approx(0.1)
    now[0] += 31
    back = {i: (await send(c, i, 2))[0] for i in homes}
    assert back == homes


async def test_failing_replica_is_ejected_and_no_request_is_lost(make_client, tmp_path, start_replicas):
    """A replica that fails its requests (while its health check passes) costs no request:
    each is answered by the next replica, and its breaker takes it out."""
    reps = await start_replicas(4)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], health_check="off"))
    reps[1][0].mode = "500"
    results = [await send(c, i, 0, stream=i % 2 == 1) for i in range(40)]
    assert all(b != "fleet@r1" for b, _ in results)
    skipped = [f for _, f in results if f]
    assert skipped and all("fleet@r1" in f for f in skipped)
    assert 1 <= len(reps[1][0].requests) <= 3  # the breaker opened after three failures
    status = await (await c.get("/api/status")).json()
    assert status["breakers"]["fleet@r1"]["state"] == "open"
    assert status["pools"]["fleet"]["replicas"]["r1"]["state"] == "down"


async def test_replica_dropping_the_connection_mid_reply(make_client, tmp_path, start_replicas):
    """Non-streamed: retried on another replica, the client never knows. Streamed: once it
    began, the reply ends in-band with an error, as any target's does."""
    reps = await start_replicas(2)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], health_check="off"))
    reps[0][0].mode = "reset"
    reps[1][0].mode = "reset"
    r = await c.post("/v1/chat/completions", json={"model": "fleet", "messages": ask(0, 0), "stream": True})
    text = await r.text()
    assert r.status == 200 and '"error"' in text and "[DONE]" not in text
    # A non-streamed request whose replica drops the connection is answered by the other one.
    reps[0][0].mode, reps[1][0].mode = "drop", "ok"
    results = [await send(c, i, 0) for i in range(12)]
    assert {b for b, _ in results} == {"fleet@r1"}
    assert any(f and "fleet@r0" in f for _, f in results)


async def test_a_pool_is_a_target_with_a_local_fallback(make_client, tmp_path, tiny_model, start_replicas):
    reps = await start_replicas(2)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], tiny_model=tiny_model))
    pool = c.daemon.pools["fleet"]
    await pool.check()
    assert (await send(c, 1, 0, model="smart"))[0].startswith("fleet@")
    for f, _ in reps:
        f.healthy = False
        f.mode = "500"
    await pool.check()
    backend, skipped = await send(c, 1, 1, model="smart")
    assert backend == MODEL_ID and "fleet@" in skipped
    models = {m["id"]: m for m in (await (await c.get("/v1/models")).json())["data"]}
    assert models["fleet"]["owned_by"] == "anyad-pool" and models["fleet"]["replicas"] == ["r0", "r1"]


async def test_a_replica_without_the_model_gets_nothing(make_client, tmp_path, start_replicas):
    reps = await start_replicas(2)
    reps[1][0].listed = ["something-else"]
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps]))
    await c.daemon.pools["fleet"].check()
    assert {(await send(c, i, 0))[0] for i in range(12)} == {"fleet@r0"}
    status = await (await c.get("/api/status")).json()
    assert status["pools"]["fleet"]["replicas"]["r1"]["serves_model"] is False


async def test_a_pool_where_no_replica_has_the_model_falls_back(make_client, tmp_path, tiny_model, start_replicas):
    """Not tried at all (it would answer 404, which ends a walk): the route's next target answers."""
    reps = await start_replicas(2, listed=("something-else",))
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], tiny_model=tiny_model))
    await c.daemon.pools["fleet"].check()
    backend, _ = await send(c, 1, 0, model="smart")
    assert backend == MODEL_ID and not any(f.requests for f, _ in reps)


async def test_metrics_show_each_replica(make_client, tmp_path, start_replicas):
    reps = await start_replicas(2)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], health_check="off"))
    got = Counter([(await send(c, i, 0))[0] for i in range(10)])
    text = await (await c.get("/metrics")).text()
    samples = {(s.name, s.labels.get("replica")): s.value for fam in text_string_to_metric_families(text)
               for s in fam.samples if s.labels.get("pool") == "fleet"}
    for i in range(2):
        assert samples[("anyad_pool_requests_total", f"r{i}")] == got[f"fleet@r{i}"]
        assert samples[("anyad_pool_replica_up", f"r{i}")] == 1
        assert samples[("anyad_pool_outstanding_requests", f"r{i}")] == 0


async def test_pool_config_errors(tmp_path, make_client):
    with pytest.raises(ConfigError, match="appear twice"):
        parse_settings({"pools": {"p": {"replicas": ["http://127.0.0.1:1/v1", "http://127.0.0.1:1/v1"]}}})
    with pytest.raises(ConfigError, match="http"):
        parse_settings({"pools": {"p": {"replicas": ["ftp://x"]}}})
    with pytest.raises(ConfigError, match="replicas"):
        parse_settings({"pools": {"p": {"replicas": []}}})
    for bad in ("openai/gpt-4o", "a@b"):
        with pytest.raises(ConfigError, match="no '/'"):
            await make_client(parse_settings({"data_dir": str(tmp_path / bad.replace("/", "_")),
                                              "pools": {bad: {"replicas": ["http://127.0.0.1:1/v1"]}}}))
    s = parse_settings({"data_dir": str(tmp_path), "pools": {"up": {"replicas": ["http://127.0.0.1:1/v1"]}},
                        "providers": {"up": {"base_url": "http://127.0.0.1:1/v1"}}})
    with pytest.raises(ConfigError, match="pools.up"):
        await make_client(s)


async def test_a_peer_lists_its_models_under_its_prefix(make_client, tmp_path, start_replicas):
    """``list_models``: what a peer's /v1/models says is listed as <provider>/<id> and served;
    when the peer cannot be asked, the last list stays and the status says why."""
    [(peer, url)] = await start_replicas(1, listed=("qwen-7b", "llama-3b"))
    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "cache": {"enabled": False},
        "providers": {"box": {"base_url": url, "list_models": True, "list_models_every_s": 3600}}}))
    provider = c.daemon.router.providers["box"]
    await until(lambda: provider.listed, what="the peer's models")
    ids = {m["id"] for m in (await (await c.get("/v1/models")).json())["data"]}
    assert {"box/llama-3b", "box/qwen-7b"} <= ids
    r = await c.post("/v1/chat/completions", json={"model": "box/qwen-7b", "messages": ask(0, 0), "max_tokens": 4})
    assert r.status == 200 and peer.requests[-1]["model"] == "qwen-7b"
    peer.listed = ["qwen-7b", "llama-3b", "phi-4"]
    await provider.refresh_models()
    assert "box/phi-4" in {m["id"] for m in (await (await c.get("/v1/models")).json())["data"]}
    peer.listed_status = 500
    await provider.refresh_models()
    status = await (await c.get("/api/status")).json()
    assert "500" in status["providers"]["box"]["list_error"] and status["providers"]["box"]["listed_models"] == 3


async def test_two_real_daemons_as_replicas_and_one_is_killed_mid_load(make_client, tmp_path, tiny_model):
    """Two ``anyad serve`` processes serving the tiny model, pooled by a third: both take
    work, and when one is killed (-9) mid-load every non-streamed request is still answered,
    those it held by the other."""
    with serving(tmp_path / "a", "--model", str(tiny_model)) as (a, port_a, _), \
            serving(tmp_path / "b", "--model", str(tiny_model)) as (_, port_b, _):
        urls = [f"http://127.0.0.1:{p}/v1" for p in (port_a, port_b)]
        c = await make_client(pool_settings(tmp_path, urls, model=MODEL_ID, health_interval_s=3600))
        await c.daemon.pools["fleet"].check()
        done: list[tuple[int, str, str | None]] = []
        at_kill: list[int] = []
        sem = asyncio.Semaphore(6)

        async def one(i: int) -> None:
            async with sem:
                r = await c.post("/v1/chat/completions", json={
                    "model": "fleet", "messages": [{"role": "user", "content": f"question {i}"}], "max_tokens": 8})
                body = await r.json()
                done.append((r.status, r.headers.get("X-Anyad-Backend"), r.headers.get("X-Anyad-Fallback")))
                assert r.status == 200 and body["usage"]["completion_tokens"] >= 1, body
                if len(done) == 8:
                    a.kill()  # r0 dies with requests in flight and more on their way
                    at_kill.extend(r.served for r in c.daemon.pools["fleet"].replicas)

        await asyncio.gather(*(one(i) for i in range(30)))
    assert [s for s, _, _ in done] == [200] * 30
    assert all(at_kill), at_kill  # both had taken work (which finished first is the machine's business)
    assert {b for _, b, _ in done[14:]} == {"fleet@r1"}  # past what was in flight at the kill
    assert any(f and "fleet@r0" in f for _, _, f in done[8:])


async def test_usage_and_cost_count_on_the_pool(make_client, tmp_path, start_replicas):
    reps = await start_replicas(2)
    c = await make_client(pool_settings(tmp_path, [u for _, u in reps], health_check="off",
                                        prices={"m": {"prompt": 2.0, "completion": 4.0}}))
    for i in range(3):
        await send(c, i, 0)
    rows = {r["model"]: r for r in (await (await c.get("/api/usage?group_by=model")).json())["data"]}
    assert rows["fleet"]["requests"] == 3
    assert rows["fleet"]["cost"] == pytest.approx(3 * (11 * 2 + 7 * 4) / 1e6)


async def test_a_reload_keeps_an_unchanged_pool_and_rebuilds_a_changed_one(make_client, tmp_path, start_replicas):
    reps = await start_replicas(3)
    urls = [u for _, u in reps]
    c = await make_client(pool_settings(tmp_path, urls[:2], health_check="off"))
    homes = {i: (await send(c, i, 0))[0] for i in range(8)}
    pool = c.daemon.pools["fleet"]
    c.daemon.reload(pool_settings(tmp_path, urls[:2], health_check="off"))
    assert c.daemon.pools["fleet"] is pool  # its conversations, load and breakers stay
    assert {i: (await send(c, i, 1))[0] for i in homes} == homes
    c.daemon.reload(pool_settings(tmp_path, urls, health_check="off"))
    assert c.daemon.pools["fleet"] is not pool
    got = {(await send(c, i, 0))[0] for i in range(30)}
    assert got == {"fleet@r0", "fleet@r1", "fleet@r2"}  # the new replica takes work at once


async def test_a_weighted_route_over_two_pools(make_client, tmp_path, start_replicas):
    """A canary between two fleets: each conversation is assigned a pool by weight and keeps
    it, and within that pool its replica."""
    reps = await start_replicas(4)
    urls = [u for _, u in reps]
    s = parse_settings({
        "data_dir": str(tmp_path / "data"), "cache": {"enabled": False}, "history": {"enabled": False},
        "pools": {"old": {"model": "m", "replicas": urls[:2], "health_check": "off"},
                  "new": {"model": "m", "replicas": urls[2:], "health_check": "off"}},
        "routes": [{"name": "m", "targets": [{"model": "new", "weight": 30}, {"model": "old", "weight": 70}]}]})
    c = await make_client(s)
    first = {i: (await send(c, i, 0, model="m"))[0] for i in range(60)}
    again = {i: (await send(c, i, 1, model="m"))[0] for i in range(60)}
    assert again == first
    to_new = sum(1 for b in first.values() if b.startswith("new@"))
    assert 8 <= to_new <= 30, to_new
    assert {b.split("@")[0] for b in first.values()} == {"new", "old"}
