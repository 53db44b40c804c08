"""Configuration: search order, overrides, clear errors, and the example file."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from anyad.config import (AuditSettings, DiscoverySettings, ModelDefaults, ModelSettings, ProviderSettings, RouterSettings, RouteSettings,
                          CacheSettings, HistorySettings, SchedulerSettings, ServerSettings, Settings, find_config,
                          load_settings, PoolSettings, ReplicaSettings)
from anyad.errors import ConfigError
from conftest import anyad_cmd, clean_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "config.example.toml"


@pytest.fixture
def env(monkeypatch, tmp_path):
    for k in ("ANYAD_CONFIG", "ANYAD_HOST", "ANYAD_PORT", "ANYAD_DATA_DIR"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    return monkeypatch


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_example_loads_as_it_stands_and_documents_every_key(env):
    s = load_settings(EXAMPLE)
    assert s.server.port == 2692 and s.server.host == "127.0.0.1"
    assert "qwen2.5-0.5b-instruct" in s.models
    text = EXAMPLE.read_text()
    keys = set(Settings.model_fields) - {"source", "discovery"}
    for model in (ServerSettings, ModelDefaults, ModelSettings, ProviderSettings, RouterSettings, RouteSettings,
                  SchedulerSettings, HistorySettings, CacheSettings, AuditSettings, DiscoverySettings, PoolSettings,
                  ReplicaSettings):
        keys |= set(model.model_fields)
    undocumented = [k for k in sorted(keys) if not re.search(rf"^#?\s*(\[+)?{k}\b", text, re.M)]
    assert not undocumented, f"config.example.toml does not document {undocumented}"


def test_search_order(env, tmp_path):
    assert find_config() is None
    xdg = write(tmp_path / "xdg" / "anyad" / "config.toml", "[server]\nport = 1111\n")
    assert find_config() == xdg
    via_env = write(tmp_path / "env.toml", "[server]\nport = 2222\n")
    env.setenv("ANYAD_CONFIG", str(via_env))
    assert find_config() == via_env
    explicit = write(tmp_path / "explicit.toml", "[server]\nport = 3333\n")
    assert load_settings(explicit).server.port == 3333
    assert load_settings().server.port == 2222


def test_env_and_flag_overrides(env, tmp_path):
    cfg = write(tmp_path / "c.toml", '[server]\nhost = "127.0.0.2"\nport = 1111\n')
    env.setenv("ANYAD_HOST", "127.0.0.3")
    env.setenv("ANYAD_PORT", "4444")
    env.setenv("ANYAD_DATA_DIR", str(tmp_path / "d"))
    s = load_settings(cfg)
    assert (s.server.host, s.server.port, s.resolved_data_dir) == ("127.0.0.3", 4444, tmp_path / "d")
    s = load_settings(cfg, host="127.0.0.4", port=5555)
    assert (s.server.host, s.server.port) == ("127.0.0.4", 5555)


def test_default_data_dir_follows_xdg(env, tmp_path):
    assert load_settings().resolved_data_dir == tmp_path / "data-home" / "anyad"


def test_model_flag_without_config(env, tmp_path):
    s = load_settings(model_paths=[str(tmp_path / "My-Model.Q8_0.gguf")])
    assert list(s.models) == ["My-Model.Q8_0"]
    assert s.models["My-Model.Q8_0"].path == tmp_path / "My-Model.Q8_0.gguf"


def test_relative_model_path_is_relative_to_the_config_file(env, tmp_path):
    cfg = write(tmp_path / "etc" / "c.toml", '[models.m]\npath = "models/m.gguf"\n')
    assert load_settings(cfg).models["m"].path == tmp_path / "etc" / "models" / "m.gguf"


@pytest.mark.parametrize("text, needle", [
    ("[server]\nport = \"high\"\n", "server.port"),
    ("[server]\nprot = 80\n", "server.prot: unknown key"),
    ("[models.m]\nn_ctx = 4096\n", "models.m.path: Field required"),
    ("[models.m]\npath = \"x.gguf\"\nn_ctx = 2\n", "models.m.n_ctx"),
    ("[server\nport = 1\n", "not valid TOML"),
    ('[providers.p]\nbase_url = "http://x"\napi_key = "sk-live-abc"\n', "providers.p.api_key: a literal key is refused"),
    ('[providers.p]\nbase_url = "ftp://x"\n', "providers.p.base_url: must be an http"),
    ('[[routes]]\nname = "r"\ntargets = []\n', "routes.0.targets"),
])
def test_invalid_config_names_the_key(env, tmp_path, text, needle):
    cfg = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as e:
        load_settings(cfg)
    assert needle in str(e.value) and str(cfg) in str(e.value)
    assert "sk-live-abc" not in str(e.value)  # a refused key is never echoed


def run_serve(tmp_path, *args, timeout=30):
    return subprocess.run(anyad_cmd("serve", *args), env=clean_env(tmp_path), capture_output=True, text=True,
                          timeout=timeout)


def test_invalid_config_stops_the_daemon_with_one_message(tmp_path):
    cfg = write(tmp_path / "bad.toml", "[server]\nport = 99999\n")
    p = run_serve(tmp_path, "--config", str(cfg))
    assert p.returncode == 2
    assert "Traceback" not in p.stderr
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, p.stderr
    assert "server.port" in lines[0] and "65535" in lines[0]


def test_missing_config_file(tmp_path):
    p = run_serve(tmp_path, "--config", str(tmp_path / "nope.toml"))
    assert p.returncode == 2 and "does not exist" in p.stderr and "Traceback" not in p.stderr


def test_missing_or_non_gguf_model_stops_start_up(tmp_path):
    p = run_serve(tmp_path, "--model", str(tmp_path / "absent.gguf"), "--port", "0")
    assert p.returncode == 2 and "absent.gguf does not exist" in p.stderr and "Traceback" not in p.stderr
    junk = write(tmp_path / "junk.gguf", "this is not a model\n" * 10)
    p = run_serve(tmp_path, "--model", str(junk), "--port", "0")
    assert p.returncode == 2 and "not a GGUF file" in p.stderr and "Traceback" not in p.stderr
