"""``anyad serve`` as a real process: it listens, says so, serves, and stops cleanly."""

from __future__ import annotations

import json
import signal
from contextlib import contextmanager
import subprocess
import urllib.request

import psutil
import pytest

from anyad.resources import DeviceProbe
from conftest import MODEL_ID, anyad_cmd, clean_env, free_port, wait_http


@contextmanager
def serving(tmp_path, *args, env_extra=None):
    """A running ``anyad serve`` with the tiny model loaded: (process, port, its child processes:
    the model's worker and the store's writer).
    Whatever the test does, the daemon is killed if it is still there at the end."""
    port = free_port()
    proc = start(tmp_path, *args, "--port", str(port), env_extra=env_extra)
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", proc=proc)
        chat(port, max_tokens=1)  # models load on their first request
        yield proc, port, psutil.Process(proc.pid).children(recursive=True)
    finally:
        if proc.poll() is None:
            proc.kill()


def chat(port: int, **fields) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", method="POST",
                                 data=json.dumps({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}],
                                                  **fields}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.load(r)


def start(tmp_path, *args, env_extra=None):
    env = clean_env(tmp_path)
    env.update(env_extra or {})
    return subprocess.Popen(anyad_cmd("serve", *args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_model_flag_reaches_health_and_stops_on_signal(tiny_model, tmp_path, sig):
    port = free_port()
    proc = start(tmp_path, "--model", str(tiny_model), "--port", str(port))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/health", proc=proc)
        wait_http(base + "/ready", proc=proc)
        assert chat(port, max_tokens=3)["usage"]["completion_tokens"] == 3
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "the model should run in a child process"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    listening = [l for l in err.splitlines() if "listening on" in l]
    assert len(listening) == 1
    assert f"http://127.0.0.1:{port}" in listening[0] and MODEL_ID in listening[0]
    for w in workers:
        assert not w.is_running() or w.status() == psutil.STATUS_ZOMBIE, "worker outlived the daemon"


def test_env_port_and_default_host(tiny_model, tmp_path):
    port = free_port()
    proc = start(tmp_path, "--model", str(tiny_model), env_extra={"ANYAD_PORT": str(port)})
    try:
        wait_http(f"http://127.0.0.1:{port}/health", proc=proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
    assert proc.returncode == 0


def test_worker_exits_when_the_daemon_is_killed(tiny_model, tmp_path):
    with serving(tmp_path, "--model", str(tiny_model)) as (proc, _, workers):
        assert workers
        proc.kill()  # no chance to clean up
        proc.communicate(timeout=10)
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, "a worker outlived a killed daemon"


def test_port_in_use_is_a_clear_error(tiny_model, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        p = subprocess.run(anyad_cmd("serve", "--model", str(tiny_model), "--port", str(port)),
                           env=clean_env(tmp_path), capture_output=True, text=True, timeout=30)
    assert p.returncode == 2
    assert "cannot listen on" in p.stderr and "Traceback" not in p.stderr


def test_sigterm_during_a_stream_stops_promptly(tiny_model, tmp_path):
    import http.client

    # A grace period far shorter than the reply: the daemon must cut it off and stop, on a
    # machine of any speed (the reply alone could outlast the wait below on a busy one).
    cfg = tmp_path / "grace.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[server]\nshutdown_grace_s = 1.0\n')
    with serving(tmp_path, "--model", str(tiny_model), env_extra={"ANYAD_CONFIG": str(cfg)}) as (proc, port,
                                                                                                  workers):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", body=json.dumps({
            "model": MODEL_ID, "stream": True, "max_tokens": 1900,
            "messages": [{"role": "user", "content": "go on"}]}), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        assert resp.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
        try:
            resp.read()  # drained within the grace period, or cut: either way it ends, never hangs
        except http.client.IncompleteRead:
            pass
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive


def test_status_command_shows_devices_models_and_queues(tiny_model, tmp_path):
    with serving(tmp_path, "--model", str(tiny_model)) as (proc, port, workers):
        p = subprocess.run(anyad_cmd("status", "--port", str(port)), env=clean_env(tmp_path), capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert lines[0] == "DEVICES" and "CPU" in lines[1] and "RAM" in lines[1]
        header = next(l for l in lines if l.strip().startswith("MODEL "))
        for col in ("STATE", "PLACEMENT", "GPU LAYERS", "EST RAM", "RSS", "EXPIRES", "WAITING"):
            assert col in header
        row = next(l for l in lines if l.strip().startswith(MODEL_ID + " ")).split()
        on_gpu = bool(DeviceProbe().snapshot().usable_gpus)
        assert row[1:4] == ["loaded", "gpu", "3/3"] if on_gpu else ["loaded", "cpu", "0/3"]
        j = subprocess.run(anyad_cmd("status", "--port", str(port), "--json"), env=clean_env(tmp_path),
                           capture_output=True, text=True, timeout=30)
        # The model's worker (beside it, the store's writer: anyad.store.writer).
        [worker] = [w for w in workers if "anyad.store.writer" not in " ".join(w.cmdline())]
        assert json.loads(j.stdout)["models"][MODEL_ID]["pid"] == worker.pid
    p = subprocess.run(anyad_cmd("status", "--port", str(port)), env=clean_env(tmp_path), capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 1 and "no daemon answers" in p.stderr and "Traceback" not in p.stderr
