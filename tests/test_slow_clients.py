"""Slow clients and floods against a real ``anyad serve``: connection caps, header and body
timeouts, and /health answering throughout."""

from __future__ import annotations

import asyncio
import json
import resource
import socket
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest
from aiohttp import web

from anyad.listen import connection_cap
from conftest import anyad_cmd, clean_env, free_port, wait_http

# How long the server gets to do what is expected of it: generous, for a busy machine;
# each wait ends as soon as the server acts.
BOUND_S = 60.0
# The flood comes from a loopback address of its own, so that the per-client cap it meets
# is not the one the test's own requests (from 127.0.0.1) count against.
FLOOD_FROM = "127.0.0.2"
PER_CLIENT = 200
FLOOD = 300


def _can_bind(addr: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((addr, 0))
        return True
    except OSError:
        return False


@contextmanager
def serving(tmp_path: Path, server: str, extra: str = "", nofile: tuple[int, int] | None = None) -> Iterator[tuple]:
    """A running ``anyad serve`` (no local models) with ``server`` lines in its [server] table:
    (process, port). ``nofile`` starts it with that (soft, hard) open-file limit."""
    port = free_port()
    config = tmp_path / "config.toml"
    config.write_text(f'data_dir = "{tmp_path / "data"}"\n[server]\nport = {port}\n{server}\n{extra}')

    def lower_limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    log = (tmp_path / "anyad.log").open("w")
    proc = subprocess.Popen(anyad_cmd("serve", "--config", str(config)), env=clean_env(tmp_path), stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=lower_limit)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
        yield proc, port
    finally:
        proc.kill()
        proc.wait(10)
        log.close()
    assert "Traceback" not in (tmp_path / "anyad.log").read_text()


async def open_slow(port: int, head: bytes = b"GET /v1/models HTTP/1.1\r\n", src: str = "127.0.0.1"):
    """A connection that has sent only the start of a request head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    writer.write(head)
    await writer.drain()
    return reader, writer


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sent before it closed the connection (a reset counts as closed)."""
    try:
        return await reader.read()
    except ConnectionResetError:
        return b""


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(until_closed(reader), BOUND_S)


async def first_closed(tasks: list[asyncio.Task], n: int) -> set[asyncio.Task]:
    """Wait until the server has closed ``n`` of the connections that ``tasks`` read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    done: set[asyncio.Task] = set()
    pending = set(tasks)
    while len(done) < n:
        finished, pending = await asyncio.wait(pending, timeout=deadline - loop.time(),
                                               return_when=asyncio.FIRST_COMPLETED)
        assert finished, f"the server closed {len(done)} connections, not {n}"
        done |= finished
    return done


async def request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/health",
                  method: str = "GET", body: bytes = b"") -> tuple[int, bytes]:
    """One request on a kept-alive raw connection: (status, body)."""
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                 + body)
    await writer.drain()
    return await read_response(reader)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), BOUND_S)
    lines = head.decode().split("\r\n")
    length = next(int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length:"))
    return int(lines[0].split()[1]), await asyncio.wait_for(reader.readexactly(length), BOUND_S)


async def health(http: aiohttp.ClientSession, port: int) -> int:
    async with http.get(f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=BOUND_S)) as r:
        return r.status


def open_files(pid: int) -> tuple[int, int]:
    line = next(l for l in Path(f"/proc/{pid}/limits").read_text().splitlines() if l.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    return int(soft), int(hard)


@pytest.mark.skipif(not _can_bind(FLOOD_FROM), reason=f"needs {FLOOD_FROM} on the loopback interface (Linux)")
async def test_health_answers_through_a_flood_of_slow_clients(tmp_path):
    # Started with a soft limit of 256 open files, the old daemon ran out of sockets well
    # before this flood's end; the head timeout is out of the way, so the caps do it all.
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 4 * FLOOD:
        pytest.skip("the hard open-file limit is too low for the flood")
    with serving(tmp_path, f"max_connections_per_client = {PER_CLIENT}\nheader_timeout_s = 3600",
                 nofile=(256, hard)) as (proc, port):
        if Path("/proc").is_dir():
            soft, hard_now = open_files(proc.pid)
            assert soft == hard_now and soft > 256, "the soft open-file limit was not raised"
        conns = [await open_slow(port, src=FLOOD_FROM) for _ in range(FLOOD)]
        reads = [asyncio.create_task(until_closed(r)) for r, _ in conns]
        try:
            refused = await first_closed(reads, FLOOD - PER_CLIENT)
            assert all(t.result() == b"" for t in refused)  # closed without a word
            held = [(c, t) for c, t in zip(conns, reads) if t not in refused]
            async with aiohttp.ClientSession() as http:
                for line in (b"Host: 127.0.0.1\r\n", b"Accept: */*\r\n", b"X-Slow: "):
                    for (_, writer), _ in held:  # the flood goes on, a line at a time
                        writer.write(line)
                        await writer.drain()
                    assert await health(http, port) == 200
                assert not any(t.done() for _, t in held), "the server closed connections under the cap"
                one_more, _ = await open_slow(port, src=FLOOD_FROM)
                assert await closed_by_server(one_more) == b""
                assert await health(http, port) == 200
        finally:
            for task in reads:
                task.cancel()
            for _, writer in conns:
                writer.close()


@pytest.mark.skipif(not _can_bind(FLOOD_FROM), reason=f"needs {FLOOD_FROM} on the loopback interface (Linux)")
async def test_under_a_hard_file_limit_the_flood_meets_the_total_cap_and_the_daemon_recovers(tmp_path):
    files = 400  # a hard limit it cannot raise
    cap = connection_cap(4096, files)
    assert cap < FLOOD
    with serving(tmp_path, "header_timeout_s = 3600", nofile=(files, files)) as (_, port):
        conns = [await open_slow(port, src=FLOOD_FROM) for _ in range(FLOOD)]
        reads = [asyncio.create_task(until_closed(r)) for r, _ in conns]
        try:
            refused = await first_closed(reads, FLOOD - cap)
            assert all(t.result() == b"" for t in refused)
            assert sum(not t.done() for t in reads) == cap  # held: the daemon kept files for itself
        finally:
            for task in reads:
                task.cancel()
            for _, writer in conns:
                writer.close()
        async with aiohttp.ClientSession() as http:
            deadline = asyncio.get_running_loop().time() + BOUND_S
            while True:  # the flood's sockets close on the server's side a little after ours
                try:
                    assert await health(http, port) == 200
                    break
                except aiohttp.ClientConnectionError:
                    assert asyncio.get_running_loop().time() < deadline, "/health did not come back"
                    await asyncio.sleep(0.05)


async def slow_upstream(aiohttp_server, release: asyncio.Event) -> str:
    """An OpenAI-compatible provider whose stream sends one piece, then waits for ``release``."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        base = {"id": "up-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}

        def ev(delta: dict, finish: str | None = None) -> bytes:
            return b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta,
                                                                  "finish_reason": finish}]}).encode() + b"\n\n"

        await resp.write(ev({"role": "assistant", "content": "slow"}))
        await release.wait()
        await resp.write(ev({"content": " but complete"}) + ev({}, "stop") + b"data: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}/v1"


async def test_slow_heads_and_stalled_bodies_are_cut_and_nothing_else(tmp_path, aiohttp_server):
    release = asyncio.Event()
    upstream = await slow_upstream(aiohttp_server, release)
    with serving(tmp_path, "header_timeout_s = 1.0\nbody_timeout_s = 1.0",
                 extra=f'[providers.slow]\nbase_url = "{upstream}"\n') as (_, port):
        url = f"http://127.0.0.1:{port}"
        # A keep-alive client, and a stream that will outlast the head timeout.
        keep_r, keep_w = await asyncio.open_connection("127.0.0.1", port)
        assert (await request(keep_r, keep_w))[0] == 200
        async with aiohttp.ClientSession() as http:
            async with http.post(url + "/v1/chat/completions", timeout=aiohttp.ClientTimeout(total=BOUND_S),
                                 json={"model": "slow/m", "stream": True,
                                       "messages": [{"role": "user", "content": "hi"}]}) as stream:
                assert stream.status == 200
                while b'"slow"' not in (line := await stream.content.readline()):
                    assert line, "the stream ended before its first piece"  # else: the role chunk, blank lines

                # Heads that never complete: the server closes them, without an answer.
                slow = [await open_slow(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                        for _ in range(5)]
                for reader, _ in slow:
                    assert await closed_by_server(reader) == b""
                # The keep-alive connection sat idle all that while and still serves.
                assert (await request(keep_r, keep_w))[0] == 200
                # Its next request trickling in is bounded like a first one.
                keep_w.write(b"GET /health HTTP/1.1\r\n")
                await keep_w.drain()
                assert await closed_by_server(keep_r) == b""

                # A body that stops part way: 408 in OpenAI's shape, then the connection ends.
                body_r, body_w = await asyncio.open_connection("127.0.0.1", port)
                body_w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\": ")
                await body_w.drain()
                status, raw = await read_response(body_r)
                assert status == 408
                assert json.loads(raw)["error"]["code"] == "request_timeout"
                assert await closed_by_server(body_r) == b""

                # The stream outlived every one of those timeouts and completes.
                release.set()
                rest = (await stream.content.read()).decode()
                assert "but complete" in rest and "data: [DONE]" in rest
        for _, w in slow:
            w.close()
        keep_w.close()
        body_w.close()


async def test_an_idle_keep_alive_connection_ends_after_keepalive_timeout(tmp_path):
    with serving(tmp_path, "keepalive_timeout_s = 1.0") as (_, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert (await request(reader, writer))[0] == 200
        assert await closed_by_server(reader) == b""
        writer.close()


async def test_the_ollama_listener_is_guarded_too(make_client, tmp_path):
    from anyad.config import parse_settings
    from anyad.plugins import ollama as ollama_plugin

    c = await make_client(parse_settings({
        "data_dir": str(tmp_path / "data"), "server": {"header_timeout_s": 1.0, "max_connections_per_client": 2},
        "plugins": {"enabled": ["ollama"], "ollama": {"port": 0}}}))
    _, port = ollama_plugin.address(c.daemon)
    held = [await open_slow(port, b"GET /api/tags HTTP/1.1\r\n") for _ in range(2)]
    over, _ = await open_slow(port)
    assert await closed_by_server(over) == b""
    for reader, writer in held:
        assert await closed_by_server(reader) == b""
        writer.close()
