"""The client commands and keys, against a real `anyad serve`: `anyad keys create` will not
lock everyone out by accident, `anyad status` and `anyad models list` send the key
(`--api-key`, else $ANYAD_API_KEY) and say what a refusal means, and `anyad models list`
lists what the daemon serves."""

from __future__ import annotations

import json

import pytest

from anyad.cli import main
from conftest import MODEL_ID, free_port, wait_http
from test_service import Serve, write_config

NEEDS_KEY = "needs an API key: pass --api-key or set ANYAD_API_KEY"


@pytest.fixture
def cli(monkeypatch, capsys):
    """Run ``anyad ARGS`` in this process: (exit code, stdout, stderr). ``env_key`` is $ANYAD_API_KEY."""
    for name in ("ANYAD_API_KEY", "ANYAD_CONFIG", "ANYAD_HOST", "ANYAD_PORT", "ANYAD_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)

    def run(*args: str, env_key: str | None = None) -> tuple[int, str, str]:
        with monkeypatch.context() as m:
            if env_key is not None:
                m.setenv("ANYAD_API_KEY", env_key)
            rc = main(list(args))
        out, err = capsys.readouterr()
        assert "Traceback" not in err
        return rc, out, err

    return run


def test_keys_status_and_models_list_against_a_running_daemon(cli, tmp_path, tiny_model):
    port = free_port()
    cfg = str(write_config(tmp_path / "anyad.toml", port, tiny_model, tmp_path / "data"))
    serve = Serve(tmp_path, tmp_path / "anyad.toml")
    try:
        wait_http(f"http://127.0.0.1:{port}/ready", 60.0, serve.proc)
        assert cli("status", "--config", cfg)[0] == 0
        rc, out, _ = cli("models", "list", "--config", cfg, "--json")
        assert rc == 0 and [(m["id"], m["source"]) for m in json.loads(out)] == [(MODEL_ID, "daemon")]

        # The first key, a user's: refused, and nobody is locked out.
        rc, out, err = cli("keys", "--config", cfg, "create", "alice")
        assert rc == 2 and out == ""
        assert "turns on API keys for every client" in err and "--role admin" in err and "--yes" in err
        assert cli("status", "--config", cfg)[0] == 0
        rc, out, err = cli("keys", "--config", cfg, "create", "root", "--role", "admin")
        assert rc == 0 and "every client needs a key" in err
        root = out.strip()

        rc, _, err = cli("status", "--config", cfg)
        assert rc == 1 and f"the daemon at http://127.0.0.1:{port} {NEEDS_KEY}" in err
        assert "no daemon answers" not in err
        rc, _, err = cli("status", "--config", cfg, "--api-key", "ak-wrong")
        assert rc == 1 and "refused the API key" in err
        rc, out, _ = cli("status", "--config", cfg, env_key=root)
        assert rc == 0 and out.startswith("DEVICES")
        assert cli("status", "--config", cfg, "--api-key", root, env_key="ak-wrong")[0] == 0  # the flag wins

        # Keys are on now: a user key needs no --yes, and cannot see the admin endpoints.
        rc, out, err = cli("keys", "--config", cfg, "create", "alice")
        assert rc == 0 and "every client needs a key" not in err
        alice = out.strip()
        rc, _, err = cli("status", "--config", cfg, "--api-key", alice)
        assert rc == 1 and "lacks the role" in err and "admin" in err
        rc, out, _ = cli("models", "list", "--config", cfg, env_key=alice)
        assert rc == 0
        row = next(line for line in out.splitlines() if line.startswith(MODEL_ID + " "))
        assert row.split()[-1] == "daemon" and f"http://127.0.0.1:{port}" in out
        rc, out, err = cli("models", "list", "--config", cfg)
        assert rc == 1 and NEEDS_KEY in err and out == ""
    finally:
        serve.stop()

    # No daemon: the config and the files found here, and it says so.
    rc, out, err = cli("models", "list", "--config", cfg, "--json")
    assert rc == 0 and "no daemon answers" in err
    assert [(m["id"], m["source"]) for m in json.loads(out)] == [(MODEL_ID, "config")]
    rc, _, err = cli("status", "--config", cfg, "--api-key", root)
    assert rc == 1 and "no daemon answers" in err


def test_the_first_key_needs_admin_or_yes_and_says_what_changes(cli, tmp_path):
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    rc, out, err = cli("keys", "--config", str(cfg), "create", "bob", "--yes")
    assert rc == 0 and out.startswith("ak-")
    assert "every client needs a key" in err and "no admin key exists" in err
    rc, out, err = cli("keys", "--config", str(cfg), "create", "carol")  # keys are on already
    assert rc == 0 and "every client needs a key" not in err and "no admin key exists" in err
    # An admin key in the config counts: keys are on, and someone can still run the daemon.
    cfg.write_text(f'data_dir = "{tmp_path / "other"}"\n[server]\napi_keys = ["env:ROOT_KEY"]\n')
    rc, out, err = cli("keys", "--config", str(cfg), "create", "dave")
    assert rc == 0 and "every client needs a key" not in err and "no admin key" not in err
    # A revoked admin key keeps keys on (the daemon stays locked), but answers for nobody.
    cfg.write_text(f'data_dir = "{tmp_path / "third"}"\n')
    assert cli("keys", "--config", str(cfg), "create", "root", "--role", "admin")[0] == 0
    assert cli("keys", "--config", str(cfg), "revoke", "root")[0] == 0
    rc, out, err = cli("keys", "--config", str(cfg), "create", "erin")
    assert rc == 0 and "every client needs a key" not in err and "no admin key exists" in err


def test_a_revoked_name_can_be_used_again_and_a_past_expiry_is_refused(cli, tmp_path):
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n')
    assert cli("keys", "--config", str(cfg), "create", "u1", "--role", "admin")[0] == 0
    assert cli("keys", "--config", str(cfg), "create", "u1")[0] == 1  # still active
    assert cli("keys", "--config", str(cfg), "revoke", "u1")[0] == 0
    rc, out, _ = cli("keys", "--config", str(cfg), "create", "u1", "--role", "admin")
    assert rc == 0 and out.startswith("ak-")
    rows = json.loads(cli("keys", "--config", str(cfg), "list", "--json")[1])
    assert [(r["name"], r["state"]) for r in rows] == [("u1", "active")]
    rc, _, err = cli("keys", "--config", str(cfg), "create", "old", "--expires", "2020-01-01")
    assert rc == 2 and "in the past" in err


def test_client_commands_never_send_the_key_through_a_proxy(cli, tmp_path, monkeypatch):
    import socket
    import threading

    # A "proxy" that records what it is sent; the daemon's address has nothing listening.
    proxy = socket.socket()
    proxy.bind(("127.0.0.1", 0))
    proxy.listen(4)
    proxy.settimeout(5)
    seen: list[bytes] = []

    def accept() -> None:
        try:
            conn, _ = proxy.accept()
            seen.append(conn.recv(4096))
            conn.close()
        except OSError:
            pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.getsockname()[1]}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{proxy.getsockname()[1]}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\n[server]\nport = {free_port()}\n')
    rc, _, err = cli("status", "--config", str(cfg), "--api-key", "secret-key-123")
    proxy.close()
    t.join()
    assert rc != 0 and "no daemon answers" in err
    assert not seen
