"""Running as a service: systemd units, the notify protocol, SIGTERM drain, SIGHUP reload,
journald-friendly logs; through real `anyad serve` processes."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest

from conftest import MODEL_ID, anyad_cmd, clean_env, free_port, wait_http
from eventually import until as eventually
from fakes import FakeOpenAI

LONG = 1000  # tokens: seconds of work for the tiny model
# Long enough for that work on a busy machine too (its slowest seen: about 30 tokens/s).
GRACE_S = 200
MSGS = [{"role": "user", "content": "hello"}]


def write_config(path: Path, port: int, tiny_model: Path, data: Path, extra: str = "") -> Path:
    path.write_text(f"""data_dir = "{data}"
[server]
port = {port}
shutdown_grace_s = {GRACE_S}
[models.{MODEL_ID}]
path = "{tiny_model}"
preload = true
{extra}""")
    return path


class Serve:
    """An `anyad serve` subprocess with its log in a file."""

    def __init__(self, tmp_path: Path, config: Path, env_extra: dict[str, str] | None = None) -> None:
        self.log_path = tmp_path / "anyad.log"
        self.env = clean_env(tmp_path)
        self.env.update(env_extra or {})
        with self.log_path.open("w") as log:
            # A session of its own: a terminal's Ctrl-C goes to the whole process group.
            self.proc = subprocess.Popen(anyad_cmd("serve", "--config", str(config)), env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)




async def stream_tokens(http: aiohttp.ClientSession, base: str, started: asyncio.Event,
                        max_tokens: int = LONG) -> tuple[int, str]:
    """A long streamed chat: (content chunks received, the raw tail)."""
    n, tail = 0, ""
    async with http.post(base + "/v1/chat/completions",
                         json={"model": MODEL_ID, "messages": MSGS, "max_tokens": max_tokens, "stream": True,
                               "stream_options": {"include_usage": True}, "ignore_eos": True}) as r:
        assert r.status == 200
        async for line in r.content:
            text = line.decode()
            if text.startswith("data: {"):
                event = json.loads(text[6:])
                if event.get("choices") and event["choices"][0]["delta"].get("content"):
                    n += 1
                    if n == 3:
                        started.set()
            if text.strip():
                tail = (tail + text)[-2000:]
    return n, tail


# -- unit files --------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (.ci/run installs it)")
@pytest.mark.parametrize("user", [False, True])
def test_the_units_pass_systemd_analyze_verify(tmp_path, user):
    unit = tmp_path / "anyad.service"
    env = clean_env(tmp_path)
    args = ["install-service", "--output", str(unit)] + (["--user"] if user else [])
    p = subprocess.run(anyad_cmd(*args), env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    text = unit.read_text()
    for line in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID", "KillMode=mixed", "NoNewPrivileges=yes",
                 "WatchdogSec="):
        assert f"\n{line}" in text
    if not user:
        for line in ("DynamicUser=yes", "StateDirectory=anyad", "ProtectSystem=strict", "PrivateTmp=yes",
                     "DeviceAllow=char-nvidia-frontend rw"):
            assert f"\n{line}" in text
        assert "\nProtectHome=" in text
    exe = next(l for l in text.splitlines() if l.startswith("ExecStart=")).split()[0].removeprefix("ExecStart=")
    assert os.access(exe, os.X_OK), exe  # the anyad that wrote it
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    env["XDG_RUNTIME_DIR"] = str(runtime)  # a user manager needs one, even just to verify
    v = subprocess.run(["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)], env=env,
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0 and not v.stdout.strip() and not v.stderr.strip(), v.stdout + v.stderr


def test_install_service_adapts_the_sandbox_and_keeps_an_edited_unit(tmp_path):
    from anyad.cli.install_service import render

    text, notes = render(user=False, exe="/home/ann/venv/bin/anyad")
    assert "\nProtectHome=read-only\n" in text and "ExecStart=/home/ann/venv/bin/anyad serve" in text and notes
    text, notes = render(user=False, exe="/opt/anyad/bin/anyad")
    assert "\nProtectHome=yes\n" in text and not notes
    unit = tmp_path / "u.service"
    unit.write_text("# edited by hand\n")
    env = clean_env(tmp_path)
    p = subprocess.run(anyad_cmd("install-service", "--user", "--output", str(unit)), env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 1 and "--force" in p.stderr and unit.read_text() == "# edited by hand\n"
    p = subprocess.run(anyad_cmd("install-service", "--user", "--output", str(unit), "--force"), env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "Type=notify" in unit.read_text()
    # By default a user unit goes where the user's systemd looks.
    p = subprocess.run(anyad_cmd("install-service", "--user"), env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and (tmp_path / "xdg-config" / "systemd" / "user" / "anyad.service").is_file()
    assert "systemctl --user daemon-reload" in p.stdout


# -- the notify protocol, drain and reload -------------------------------------------------------

async def test_notify_socket_hears_ready_watchdog_reloading_and_stopping(tmp_path, tiny_model):
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    port = free_port()
    cfg = write_config(tmp_path / "anyad.toml", port, tiny_model, tmp_path / "data")
    serve = Serve(tmp_path, cfg, {"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"})
    heard: list[str] = []
    loop = asyncio.get_running_loop()

    async def until(message: str) -> None:
        async def got() -> bool:
            while True:
                try:
                    heard.extend(sock.recv(4096).decode().split("\n"))
                except BlockingIOError:
                    break
            return message in heard
        await eventually(got, what=message)

    try:
        await until("READY=1")
        # Ready means ready: the preloaded model answers at once.
        with_status = [m for m in heard if m.startswith("STATUS=listening")]
        assert with_status and "models ready: 1 of 1" in with_status[0]
        await loop.run_in_executor(None, wait_http, f"http://127.0.0.1:{port}/ready", 1.0)
        heard.clear()
        await until("WATCHDOG=1")
        heard.clear()
        await until("WATCHDOG=1")  # again: it keeps coming while the loop turns
        heard.clear()
        serve.signal(signal.SIGHUP)
        await until("RELOADING=1")
        assert any(m.startswith("MONOTONIC_USEC=") for m in heard)
        await until("READY=1")
        heard.clear()
        serve.signal(signal.SIGTERM)
        await until("STOPPING=1")
        assert await loop.run_in_executor(None, serve.wait) == 0
    finally:
        serve.stop()
        sock.close()
    assert "Traceback" not in serve.log


@pytest.mark.parametrize("how", ["SIGTERM to the daemon", "Ctrl-C to the process group"])
async def test_sigterm_mid_stream_drains_then_exits_0(tmp_path, tiny_model, how):
    port = free_port()
    data = tmp_path / "data"
    cfg = write_config(tmp_path / "anyad.toml", port, tiny_model, data)
    serve = Serve(tmp_path, cfg)
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_http, base + "/ready", 60.0, serve.proc)
        async with aiohttp.ClientSession() as http:
            started = asyncio.Event()
            stream = asyncio.create_task(stream_tokens(http, base, started))
            await asyncio.wait_for(started.wait(), 30)
            if how.startswith("SIGTERM"):
                serve.signal(signal.SIGTERM)
            else:  # the workers get it too, and must leave stopping to the daemon
                os.killpg(serve.proc.pid, signal.SIGINT)

            async def draining() -> bool:
                async with http.get(base + "/health") as r:
                    return (await r.json())["status"] == "draining"

            await eventually(draining, what="the drain to begin")  # /health still answers, and says so
            async with http.post(base + "/v1/chat/completions",
                                 json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2}) as r:
                assert r.status == 503 and r.headers["Retry-After"]
                assert "shutting down" in (await r.json())["error"]["message"]
            assert not stream.done(), "the stream should still be running while the daemon drains"
            n, tail = await asyncio.wait_for(stream, GRACE_S)
        # Every token of the reply (a chunk may carry several: pieces of one UTF-8 character).
        assert n >= LONG // 2 and "[DONE]" in tail and f'"completion_tokens":{LONG}' in tail.replace(" ", "")
        assert await asyncio.to_thread(serve.wait, GRACE_S) == 0
    finally:
        serve.stop()
    log = serve.log
    assert f"draining: waiting up to {GRACE_S} s for 1 request(s) in flight" in log and "Traceback" not in log
    # The history of the drained reply was flushed before the process went.
    conn = sqlite3.connect(data / "anyad.db")
    assert conn.execute("SELECT completion_tokens, finish_reason FROM exchanges").fetchall() == [(LONG, "length")]


async def test_a_second_sigterm_cuts_the_drain_short(tmp_path):
    import dataclasses

    import ggufmaker

    port = free_port()
    # A reply of many seconds even on a fast machine (the tiny model decodes thousands of
    # tokens a second), far beyond the cut-off window: a model with a long context.
    model = ggufmaker.write_model(tmp_path / "long.gguf", dataclasses.replace(ggufmaker.TINY, n_ctx=32768))
    cfg = write_config(tmp_path / "anyad.toml", port, model, tmp_path / "data", "n_ctx = 32768")
    serve = Serve(tmp_path, cfg)
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_http, base + "/ready", 60.0, serve.proc)
        async with aiohttp.ClientSession() as http:
            started = asyncio.Event()
            stream = asyncio.create_task(stream_tokens(http, base, started, 30 * LONG))
            await asyncio.wait_for(started.wait(), 30)
            serve.signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            serve.signal(signal.SIGTERM)
            assert await asyncio.to_thread(serve.wait, 30) == 0
            try:
                n, tail = await asyncio.wait_for(stream, 30)
            except aiohttp.ClientError:
                n, tail = -1, ""
        assert n < 30 * LONG and "[DONE]" not in tail
    finally:
        serve.stop()


async def test_sighup_reloads_providers_routes_and_limits_and_refuses_a_bad_config(tmp_path, tiny_model,
                                                                                  aiohttp_server):
    one, two = FakeOpenAI(), FakeOpenAI()
    s1, s2 = await aiohttp_server(one.app()), await aiohttp_server(two.app())
    port = free_port()
    data = tmp_path / "data"
    cfg = tmp_path / "anyad.toml"
    write_config(cfg, port, tiny_model, data, f"""[providers.one]
base_url = "http://127.0.0.1:{s1.port}/v1"
""")
    serve = Serve(tmp_path, cfg)
    base = f"http://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(wait_http, base + "/ready", 60.0, serve.proc)
        async with aiohttp.ClientSession() as http:
            async def post(model: str) -> aiohttp.ClientResponse:
                async with http.post(base + "/v1/chat/completions",
                                     json={"model": model, "messages": MSGS, "max_tokens": 2}) as r:
                    await r.read()
                    return r

            assert (await post("one/m")).status == 200
            assert (await post("two/m")).status == 404
            started = asyncio.Event()
            stream = asyncio.create_task(stream_tokens(http, base, started))
            await asyncio.wait_for(started.wait(), 30)
            # A good new config: another provider, a route over it, a rate limit.
            write_config(cfg, port, tiny_model, data, f"""[providers.two]
base_url = "http://127.0.0.1:{s2.port}/v1"
[[routes]]
name = "best"
targets = ["two/m", "{MODEL_ID}"]
""").write_text(cfg.read_text().replace(f"shutdown_grace_s = {GRACE_S}",
                                       f"shutdown_grace_s = {GRACE_S}\nrate_limit_per_minute = 1000"))
            serve.signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return "config reloaded" in serve.log

            await eventually(reloaded, what="the reload")
            r = await post("best")
            assert r.status == 200 and r.headers["X-Anyad-Backend"] == "two/m" and two.requests
            assert r.headers["X-RateLimit-Limit"] == "1000"
            assert (await post("one/m")).status == 404  # gone with the old config
            assert not stream.done(), "the reload must not cut the stream in flight"
            # A bad one: refused, and the running config stays.
            cfg.write_text(cfg.read_text() + "\n[server.nonsense]\n")
            serve.signal(signal.SIGHUP)

            async def refused() -> bool:
                return "reload refused; the running configuration stays" in serve.log

            await eventually(refused, what="the refusal")
            assert (await post("best")).status == 200
            n, tail = await asyncio.wait_for(stream, GRACE_S)
            assert n >= LONG // 2 and "[DONE]" in tail and f'"completion_tokens":{LONG}' in tail.replace(" ", "")
        serve.signal(signal.SIGTERM)
        assert await asyncio.to_thread(serve.wait, GRACE_S) == 0
    finally:
        serve.stop()
    assert "server.nonsense" in serve.log and "Traceback" not in serve.log
    conn = sqlite3.connect(data / "anyad.db")
    rows = conn.execute("SELECT actor, action, detail FROM audit WHERE action LIKE 'config.%' ORDER BY id").fetchall()
    assert [(a, b) for a, b, _ in rows] == [("signal:SIGHUP", "config.reload"),
                                            ("signal:SIGHUP", "config.reload_rejected")]
    assert json.loads(rows[0][2])["providers"] == ["two"]


def test_log_lines_suit_journald_when_stderr_is_the_journal(tmp_path, tiny_model):
    port = free_port()
    cfg = write_config(tmp_path / "anyad.toml", port, tiny_model, tmp_path / "data")
    log_path = tmp_path / "journal"
    log_path.touch()
    st = log_path.stat()
    env = clean_env(tmp_path)
    env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    with log_path.open("w") as log:
        proc = subprocess.Popen(anyad_cmd("serve", "--config", str(cfg)), env=env, stdout=log, stderr=log)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 60.0, proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = log_path.read_text().splitlines()
    assert lines and all(l.startswith("<") for l in lines), lines[:5]
    assert any(l.startswith("<6>anyad: anyad ") and "listening on" in l for l in lines)
    assert not any(l[3:7].isdigit() for l in lines)  # no timestamp of our own: journald adds it
