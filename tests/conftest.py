from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anyad.config import parse_settings
from anyad.daemon import Daemon
from anyad.server import build_app

sys.path.insert(0, str(Path(__file__).parent))
import ggufmaker  # noqa: E402

MODEL_ID = "tiny"


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path, monkeypatch):
    """Settings without a data_dir would use ~/.local/share/anyad: keep every test's in its tmp_path."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real GGUF (random weights, byte-level BPE, ChatML template), made once per session."""
    return ggufmaker.write_model(tmp_path_factory.mktemp("models") / f"{MODEL_ID}.gguf")


def make_settings(model: Path, tmp_path: Path, **model_opts):
    return parse_settings({"data_dir": str(tmp_path / "data"),
                           "models": {MODEL_ID: {"path": str(model), **model_opts}}})


@pytest.fixture
def settings(tiny_model: Path, tmp_path: Path):
    return make_settings(tiny_model, tmp_path)


@pytest.fixture
async def make_client(aiohttp_client):
    """Start the real app (real worker processes) on a loopback port; returns the test client."""

    async def make(settings, probe=None):
        daemon = Daemon(settings, probe)
        client = await aiohttp_client(build_app(daemon), server_kwargs={"handler_cancellation": True})
        client.daemon = daemon
        return client

    return make


@pytest.fixture
def start_fake(aiohttp_server):
    """Start a fake OpenAI-compatible provider on loopback: (fake, its base URL)."""
    from fakes import FakeOpenAI

    async def start(mode: str = "ok", **kw):
        fake = FakeOpenAI(mode, **kw)
        server = await aiohttp_server(fake.app())
        return fake, f"http://127.0.0.1:{server.port}/v1"

    return start


@pytest.fixture
async def client(make_client, settings):
    c = await make_client(settings)
    await c.daemon.scheduler.load(MODEL_ID)
    return c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def anyad_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "anyad", *args]


def clean_env(tmp_path: Path) -> dict[str, str]:
    """An environment where no user or system config is found by accident."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANYAD_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path / "xdg-config")
    env["XDG_DATA_HOME"] = str(tmp_path / "xdg-data")
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg-cache")
    return env


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"anyad exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer within {timeout}s")
