"""Each model in its own worker process: disconnects, crashes, concurrency, liveness."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import psutil

from conftest import MODEL_ID, make_settings

MSGS = [{"role": "user", "content": "Tell me a long story."}]
LONG = 1800  # tokens: seconds of work for the tiny model, so "stopped early" is unmistakable


async def read_content_chunks(resp, n: int) -> list[dict]:
    got = []
    async for line in resp.content:
        line = line.decode().strip()
        if line.startswith("data: {"):
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["delta"].get("content"):
                got.append(ev)
                if len(got) == n:
                    return got
    raise AssertionError(f"stream ended after {len(got)} chunks")


async def wait_idle(worker, timeout: float = 10.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        stats = await worker.stats()
        if not stats["busy"]:
            return stats
        assert asyncio.get_running_loop().time() < deadline, "worker still generating"
        await asyncio.sleep(0.02)


async def test_client_disconnect_stops_generation_and_frees_the_model(client):
    worker = client.daemon.backends[0].worker
    before = (await worker.stats())["tokens_generated"]
    url = client.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as s:
        resp = await s.post(url, json={"model": MODEL_ID, "messages": MSGS, "stream": True, "max_tokens": LONG,
                                       "temperature": 0})
        await read_content_chunks(resp, 3)
        resp.close()  # hang up mid-stream
    stats = await wait_idle(worker)
    spent = stats["tokens_generated"] - before
    # What was generated includes tokens already in flight in pipes and socket buffers
    # when the client hung up (~30 here, each ~1 ms with this tiny model); far from LONG.
    assert 3 <= spent < 200, f"worker generated {spent} tokens for a client that left"
    # The model is free: the next request is served normally, by the same worker.
    pid = worker.pid
    r = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 4})
    assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 4
    assert worker.pid == pid


async def test_non_stream_client_disconnect_also_cancels(client):
    worker = client.daemon.backends[0].worker
    before = (await worker.stats())["tokens_generated"]
    url = client.make_url("/v1/chat/completions")
    async with aiohttp.ClientSession() as s:
        task = asyncio.create_task(s.post(url, json={"model": MODEL_ID, "messages": MSGS, "max_tokens": LONG}))
        while not (await worker.stats())["busy"]:
            await asyncio.sleep(0.01)
        task.cancel()
    stats = await wait_idle(worker)
    assert stats["tokens_generated"] - before < LONG // 2


async def test_health_answers_while_the_model_generates(client):
    worker = client.daemon.backends[0].worker
    gen = asyncio.create_task(client.post("/v1/chat/completions",
                                          json={"model": MODEL_ID, "messages": MSGS, "max_tokens": LONG}))
    while not (await worker.stats())["busy"]:
        await asyncio.sleep(0.01)
    # The worker stopped mid-generation: however fast or slow this machine, the reply
    # cannot end while the probes are answered, and nothing they need may wait on it.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        for path in ("/health", "/ready", "/v1/models", "/metrics"):
            r = await client.get(path)
            assert r.status == 200, path
            assert not gen.done()
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    r = await gen
    assert (await r.json())["usage"]["completion_tokens"] == LONG


async def test_kill_9_mid_stream_gives_a_clean_error_then_recovers(client):
    worker = client.daemon.backends[0].worker
    old_pid = worker.pid
    r = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "stream": True,
                                                        "max_tokens": LONG})
    assert r.status == 200
    await read_content_chunks(r, 2)
    os.kill(old_pid, signal.SIGKILL)
    rest = (await r.content.read()).decode()
    assert "[DONE]" not in rest
    errors = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith('data: {"error"')]
    assert len(errors) == 1, rest[-500:]
    err = errors[0]["error"]
    assert err["code"] == "backend_error" and "SIGKILL" in err["message"]
    assert "Traceback" not in rest
    # The next request gets a fresh worker and a normal answer.
    r = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 3})
    assert r.status == 200, await r.text()
    assert worker.pid not in (None, old_pid)


async def test_worker_dead_before_a_request_is_replaced(client):
    worker = client.daemon.backends[0].worker
    old = worker.pid
    os.kill(old, signal.SIGKILL)
    await asyncio.sleep(0.2)
    r = await client.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 3})
    assert r.status == 200
    assert worker.pid != old


async def test_full_queue_is_429_with_retry_after(make_client, tiny_model, tmp_path):
    c = await make_client(make_settings(tiny_model, tmp_path, max_queue=1))
    worker = c.daemon.backends[0].worker
    await c.daemon.scheduler.load(MODEL_ID)
    body = {"model": MODEL_ID, "messages": MSGS, "max_tokens": 600, "temperature": 0}
    running = asyncio.create_task(c.post("/v1/chat/completions", json=body))
    while not (await worker.stats())["busy"]:
        await asyncio.sleep(0.01)
    queued = asyncio.create_task(c.post("/v1/chat/completions", json={**body, "max_tokens": 2}))
    while c.daemon.scheduler.models[MODEL_ID].waiting < 1:
        await asyncio.sleep(0.01)
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status == 429
    assert int(r.headers["Retry-After"]) >= 1
    err = (await r.json())["error"]
    assert err["type"] == "rate_limit_error" and "queue" in err["message"]
    # The queued request is served in turn, not dropped.
    assert (await running).status == 200
    q = await queued
    assert q.status == 200 and (await q.json())["usage"]["completion_tokens"] == 2


async def test_one_process_per_model_and_none_left_after_close(make_client, tiny_model, tmp_path):
    from anyad.config import parse_settings

    s = parse_settings({"models": {"a": {"path": str(tiny_model)}, "b": {"path": str(tiny_model)}}})
    c = await make_client(s)
    workers = [b.worker for b in c.daemon.backends]
    for b in c.daemon.backends:
        await c.daemon.scheduler.load(b.model_id)
    pids = {w.pid for w in workers}
    assert len(pids) == 2 and os.getpid() not in pids
    me = psutil.Process()
    assert pids <= {p.pid for p in me.children(recursive=True)}
    for model in ("a", "b"):
        r = await c.post("/v1/chat/completions", json={"model": model, "messages": MSGS, "max_tokens": 2})
        assert r.status == 200
    await c.daemon.close()
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
