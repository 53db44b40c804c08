"""Model lifecycle and queues with real worker processes on tiny GGUF models: loading on
demand, keep-alive, the loaded-model limit, memory-driven eviction, busy models, queues."""

from __future__ import annotations

import asyncio
import json
import logging
import math

import psutil
import pytest

from anyad.config import parse_settings
from anyad.resources import DeviceProbe, engine_gpu_offload
from eventually import until
from fakes import RecordedNVML

GIB = 2 ** 30
MIB = 2 ** 20
MSGS = [{"role": "user", "content": "Tell me a story."}]
LONG = 1900  # tokens: a stream that is still running while the test looks around


def settings(tiny_model, tmp_path, models, scheduler=None, defaults=None):
    return parse_settings({"data_dir": str(tmp_path / "data"), "defaults": defaults or {},
                           "scheduler": scheduler or {},
                           "models": {name: {"path": str(tiny_model), **opts} for name, opts in models.items()}})


async def chat(c, model, **fields):
    r = await c.post("/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 2, **fields})
    return r.status, await r.json()


def entry(c, name):
    return c.daemon.scheduler.models[name]


def workers_of(c):
    """Live worker processes of this test's daemon."""
    pids = {b.worker.pid for b in c.daemon.backends} - {None}
    return [p for p in psutil.Process().children(recursive=True) if p.pid in pids]


async def start_stream(c, model, max_tokens=LONG):
    """A long stream that has begun: (response, task reading it to the end)."""
    r = await c.post("/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": max_tokens,
                                                  "stream": True, "temperature": 0})
    assert r.status == 200
    assert (await r.content.readline()).startswith(b"data: ")

    async def drain():
        finish = None
        async for line in r.content:
            if line.startswith(b"data: {"):
                ch = json.loads(line[6:])["choices"]
                if ch and ch[0].get("finish_reason"):
                    finish = ch[0]["finish_reason"]
        return finish

    return r, asyncio.create_task(drain())


async def test_models_load_on_first_request(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}}))
    assert entry(c, "a").state == "unloaded" and not workers_of(c)
    assert (await c.get("/ready")).status == 200  # a lazily loaded model is usable
    status, _ = await chat(c, "a")
    assert status == 200 and entry(c, "a").state == "loaded" and len(workers_of(c)) == 1


async def test_keep_alive_expiry_unloads_and_frees_the_memory(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {"keep_alive": "1s"}}))
    assert (await chat(c, "a"))[0] == 200
    (worker,) = workers_of(c)
    rss = worker.memory_info().rss
    assert rss > 20 * MIB  # the engine and the model are really in there
    st = (await (await c.get("/api/status")).json())["models"]["a"]
    assert st["state"] == "loaded" and 0 < st["expires_in_s"] <= 1 and st["keep_alive_s"] == 1
    await until(lambda: entry(c, "a").state == "unloaded", what="keep-alive expiry")
    gone, alive = psutil.wait_procs([worker], timeout=5)
    assert not alive and not workers_of(c)  # the process, and every byte it held, is gone
    st = (await (await c.get("/api/status")).json())["models"]["a"]
    assert st["loaded"] is False and st["expires_in_s"] is None and "rss_bytes" not in st["memory"]
    # The next request loads it again.
    assert (await chat(c, "a"))[0] == 200 and len(workers_of(c)) == 1


async def test_keep_alive_per_request(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}}))
    assert (await chat(c, "a", keep_alive=0))[0] == 200
    await until(lambda: entry(c, "a").state == "unloaded", what="unload after a keep_alive 0 request")
    assert (await chat(c, "a", keep_alive="-1"))[0] == 200
    st = (await (await c.get("/api/status")).json())["models"]["a"]
    assert st["state"] == "loaded" and st["keep_alive_s"] is None and st["expires_in_s"] is None
    assert (await chat(c, "a", keep_alive="10m"))[0] == 200
    assert 590 < (await (await c.get("/api/status")).json())["models"]["a"]["expires_in_s"] <= 600
    assert (await chat(c, "a"))[0] == 200  # a request without one: the model's own again
    assert 290 < (await (await c.get("/api/status")).json())["models"]["a"]["expires_in_s"] <= 300
    status, body = await chat(c, "a", keep_alive="soon")
    assert status == 400 and body["error"]["param"] == "keep_alive" and "duration" in body["error"]["message"]


async def test_max_loaded_models_one_alternates(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}, "b": {}}, {"max_loaded_models": 1}))
    seen = []
    for model in ("a", "b", "a", "b"):
        assert (await chat(c, model))[0] == 200
        (w,) = workers_of(c)  # never two at once
        seen.append(w.pid)
        assert entry(c, model).state == "loaded"
        assert entry(c, "b" if model == "a" else "a").state == "unloaded"
    assert len(set(seen)) == 4  # each switch really unloaded one and loaded the other


async def test_least_recently_used_idle_model_is_the_one_unloaded(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}, "b": {}, "c": {}}, {"max_loaded_models": 2}))
    for model in ("a", "b", "a", "c"):
        assert (await chat(c, model))[0] == 200
    assert {n: entry(c, n).state for n in "abc"} == {"a": "loaded", "b": "unloaded", "c": "loaded"}


async def test_a_busy_model_is_never_evicted(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}, "b": {}}, {"max_loaded_models": 1}))
    _, stream = await start_stream(c, "a")
    pid = entry(c, "a").unit.pid
    other = asyncio.create_task(chat(c, "b"))
    await asyncio.sleep(0.5)
    # b waits for a to finish instead of cutting its reply.
    assert not other.done() and entry(c, "a").state == "loaded" and entry(c, "a").unit.pid == pid
    assert await stream == "length"  # a's reply ran to its end
    assert (await other)[0] == 200 and entry(c, "b").state == "loaded" and entry(c, "a").state == "unloaded"


async def test_a_load_blocked_by_busy_models_gives_up_with_503(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}, "b": {"queue_timeout_s": 0.3}},
                                   {"max_loaded_models": 1}))
    r, stream = await start_stream(c, "a")
    resp = await c.post("/v1/chat/completions", json={"model": "b", "messages": MSGS, "max_tokens": 2})
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    err = (await resp.json())["error"]
    assert "busy" in err["message"] and "max_loaded_models" in err["message"]
    assert await stream == "length" and entry(c, "a").state == "loaded"


async def test_memory_limit_unloads_the_idle_model_and_refuses_what_cannot_fit(make_client, tiny_model, tmp_path,
                                                                             caplog):
    caplog.set_level(logging.INFO, "anyad.scheduler")
    cpu = {"gpu": "cpu"}  # RAM is what this test is about, also where there is a GPU
    need = estimated_ram(settings(tiny_model, tmp_path, {"a": cpu}))
    # Room for one model's estimate, not two; no count limit.
    s = settings(tiny_model, tmp_path, {"a": cpu, "b": cpu},
                 {"max_loaded_models": 0, "ram_reserve_mib": 0, "max_ram_mib": math.ceil(need * 1.5 / MIB)})
    c = await make_client(s)
    assert (await chat(c, "a"))[0] == 200
    assert (await chat(c, "b"))[0] == 200
    assert entry(c, "a").state == "unloaded" and entry(c, "b").state == "loaded"
    assert "unloading model a: to free memory for b" in caplog.text

    small = settings(tiny_model, tmp_path, {"a": cpu}, {"ram_reserve_mib": 0, "max_ram_mib": 1})
    c2 = await make_client(small)
    status, body = await chat(c2, "a")
    assert status == 503 and body["error"]["code"] == "insufficient_memory"
    assert "needs" in body["error"]["message"] and "available" in body["error"]["message"]


def estimated_ram(s) -> int:
    from anyad.daemon import Daemon

    d = Daemon(s)
    return d.backends[0].estimate(1).ram_bytes(0)


async def test_queue_wait_timeout_is_503(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {"queue_timeout_s": 0.3}}))
    _, stream = await start_stream(c, "a")
    status, body = await chat(c, "a")
    assert status == 503 and "queue_timeout_s" in body["error"]["message"]
    assert entry(c, "a").waiting == 0
    assert await stream == "length"


async def test_a_client_that_hangs_up_while_queued_leaves_the_queue(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}}))
    _, stream = await start_stream(c, "a")
    queued = asyncio.create_task(chat(c, "a"))
    await until(lambda: entry(c, "a").waiting == 1, what="the request to queue")
    queued.cancel()  # the client goes away: its connection closes
    await until(lambda: entry(c, "a").waiting == 0, timeout=5, what="the waiter to leave")
    st = (await (await c.get("/api/status")).json())["models"]["a"]
    assert st["queue"]["waiting"] == 0 and st["queue"]["active"] == 1
    assert await stream == "length"


async def test_two_models_generate_at_the_same_time(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}, "b": {}}))
    await c.daemon.scheduler.load("b")
    _, stream = await start_stream(c, "a")
    wa = entry(c, "a").unit.worker
    status, body = await chat(c, "b", max_tokens=5)
    assert status == 200 and body["usage"]["completion_tokens"] == 5
    assert (await wa.stats())["busy"]  # a was generating all along
    assert await stream == "length"


async def test_parallel_slots_run_requests_of_one_model_together(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {"parallel": 2}}))
    _, s1 = await start_stream(c, "a")
    _, s2 = await start_stream(c, "a")
    stats = await entry(c, "a").unit.worker.stats()
    assert stats["active"] == 2  # both generate in the one worker, each on its own context
    assert entry(c, "a").active == 2 and entry(c, "a").waiting == 0
    assert [await s1, await s2] == ["length", "length"]
    st = (await (await c.get("/api/status")).json())["models"]["a"]
    assert st["queue"]["parallel"] == 2
    layers = st["placement"]["gpu_layers"]
    assert st["memory"]["estimated_ram_bytes"] == entry(c, "a").unit.estimate(2).ram_bytes(layers)
    assert st["memory"]["estimated_ram_bytes"] > entry(c, "a").unit.estimate(1).ram_bytes(layers)


async def test_preload_warms_up_before_ready(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {"preload": True}, "b": {}}))
    await until(lambda: entry(c, "a").state == "loaded", what="the preload")
    r = await c.get("/ready")
    assert r.status == 200 and (await r.json())["models"] == {"a": True, "b": True}
    # The warm-up generated a token before any request came.
    assert (await entry(c, "a").unit.worker.stats())["tokens_generated"] == 1
    assert entry(c, "b").state == "unloaded"


@pytest.mark.skipif(engine_gpu_offload(), reason="this engine can offload, so a GPU load does not fail here")
async def test_gpu_load_failure_falls_back_to_fewer_layers_then_the_cpu(make_client, tiny_model, tmp_path, caplog):
    """The device says there is a roomy GPU, but the engine cannot use it (this build has no
    GPU support): the load is retried with half the layers, then on the CPU, and says why."""
    caplog.set_level(logging.WARNING, "anyad.scheduler")
    nvml = RecordedNVML([{"name": "NVIDIA RTX 4090", "total": 24 * GIB, "free": 20 * GIB, "util": 0}])
    c = await make_client(settings(tiny_model, tmp_path, {"a": {}}), probe=DeviceProbe(nvml, gpu_offload=True))
    assert (await chat(c, "a"))[0] == 200
    st = (await (await c.get("/api/status")).json())["models"]["a"]
    assert st["placement"]["kind"] == "cpu" and "after loading on the GPU failed" in st["placement"]["reason"]
    assert "loading with 3 GPU layers failed" in caplog.text and "loading with 1 GPU layers failed" in caplog.text
    assert "cannot offload" in caplog.text
    assert st["memory"]["estimated_vram_bytes"] == 0


async def test_status_shows_the_context_cap(make_client, tiny_model, tmp_path):
    c = await make_client(settings(tiny_model, tmp_path, {"a": {"n_ctx": 8192}}))
    st = (await (await c.get("/api/status")).json())["models"]["a"]
    assert st["n_ctx"] == 2048 and any("capped at 2048" in n for n in st["notes"])


@pytest.mark.parametrize("value,seconds", [("5m", 300), ("1h30m", 5400), (90, 90), ("250ms", 0.25), (-1, math.inf),
                                           ("-1m", math.inf), (0, 0)])
def test_keep_alive_forms(value, seconds):
    from anyad.config import parse_keep_alive

    assert parse_keep_alive(value) == seconds


def test_unusable_settings_are_config_errors(tiny_model, tmp_path):
    from anyad.errors import ConfigError

    for bad in ({"keep_alive": "forever"}, {"gpu": "most"}, {"parallel": 0}, {"gpu": -2}):
        with pytest.raises(ConfigError):
            settings(tiny_model, tmp_path, {"a": bad})
