"""Discovery of GGUF files in Ollama's store, LM Studio's folder, the Hugging Face hub cache
and configured directories; `anyad models list`; discovered models served."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess

import pytest

import mmprojmaker
from anyad.config import parse_settings
from conftest import anyad_cmd, clean_env


def clip_gguf(path):
    """A real GGUF that is not a language model (a vision projector's architecture)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "clip")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture
def machine(tmp_path, tiny_model, monkeypatch):
    """A home folder holding models the way each tool stores them."""
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    for var in ("OLLAMA_MODELS", "HF_HOME", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    # Ollama: manifests name blobs by digest.
    ollama = home / ".ollama" / "models"
    (ollama / "blobs").mkdir(parents=True)
    shutil.copy(tiny_model, ollama / "blobs" / "sha256-aaaa")

    def manifest(rel: str, digest: str) -> None:
        p = ollama / "manifests" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"schemaVersion": 2, "layers": [
            {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:tttt"},
            {"mediaType": "application/vnd.ollama.image.model", "digest": digest}]}))

    manifest("registry.ollama.ai/library/llama3.2/3b", "sha256:aaaa")
    manifest("registry.ollama.ai/someone/coder/latest", "sha256:aaaa")
    manifest("registry.ollama.ai/library/gone/1b", "sha256:missing")
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "junk").mkdir(parents=True)
    (ollama / "manifests" / "registry.ollama.ai" / "library" / "junk" / "x").write_text("not json")
    # LM Studio: publisher/repo/file.gguf, and a projector beside the model.
    lms = home / ".lmstudio" / "models" / "lmstudio-community" / "Tiny-GGUF"
    lms.mkdir(parents=True)
    shutil.copy(tiny_model, lms / "tiny-lm-Q8_0.gguf")
    mmprojmaker.make_mmproj(lms / "mmproj-tiny-f16.gguf")
    # Ollama keeps a vision model's projector as a layer of its manifest.
    mmprojmaker.make_mmproj(ollama / "blobs" / "sha256-pppp")
    p = ollama / "manifests" / "registry.ollama.ai" / "library" / "seer" / "latest"
    p.parent.mkdir(parents=True)
    p.write_text(json.dumps({"schemaVersion": 2, "layers": [
        {"mediaType": "application/vnd.ollama.image.model", "digest": "sha256:aaaa"},
        {"mediaType": "application/vnd.ollama.image.projector", "digest": "sha256:pppp"}]}))
    # The Hugging Face hub cache: snapshots of a repo; a split model; a file that only says .gguf.
    snap = home / ".cache" / "huggingface" / "hub" / "models--org--tiny-GGUF" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    shutil.copy(tiny_model, snap / "tiny-hf-00001-of-00002.gguf")
    shutil.copy(tiny_model, snap / "tiny-hf-00002-of-00002.gguf")
    (snap / "broken.gguf").write_bytes(b"not a gguf at all")
    (snap / "README.md").write_text("# tiny")
    # A configured directory.
    d = tmp_path / "mine"
    (d / "sub").mkdir(parents=True)
    shutil.copy(tiny_model, d / "sub" / "dir-model.gguf")
    (d / "notes.txt").write_text("hello")
    return tmp_path


def test_models_list_shows_what_each_tool_keeps(machine, tiny_model):
    cfg = machine / "anyad.toml"
    cfg.write_text(f'[models]\ndirectories = ["{machine / "mine"}"]\n[models.configured]\npath = "{tiny_model}"\n')
    env = clean_env(machine)
    env["HOME"] = str(machine / "home")
    p = subprocess.run(anyad_cmd("models", "list", "--local", "--config", str(cfg), "--json"), env=env, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    rows = {r["id"]: r for r in json.loads(p.stdout)}
    assert {k: rows[k]["source"] for k in rows} == {
        "configured": "config", "dir-model": "directory", "llama3.2:3b": "ollama", "someone/coder:latest": "ollama",
        "seer:latest": "ollama", "tiny-lm-Q8_0": "lmstudio", "tiny-hf": "huggingface"}
    for r in rows.values():
        assert r["architecture"] == "llama" and r["context_length"] > 0 and r["quantization"] in ("F16", "Q8_0")
        assert r["size_bytes"] == tiny_model.stat().st_size
    assert rows["llama3.2:3b"]["path"].endswith("blobs/sha256-aaaa")
    table = subprocess.run(anyad_cmd("models", "list", "--local", "--config", str(cfg), "-v"), env=env, capture_output=True,
                           text=True, timeout=60)
    out = table.stdout + table.stderr
    assert "ID" in out and "QUANT" in out and "llama3.2:3b" in out
    # Skipped, each with its reason.
    assert "mmproj-tiny-f16.gguf: a clip file, not a language model" in out
    assert "broken.gguf" in out and "not a GGUF file" in out
    assert "sha256-missing" in out and "does not exist" in out
    assert "not a model manifest" in out
    assert "discover = true serves them too" in out


async def test_discovered_models_are_served_when_asked(machine, make_client, caplog):
    caplog.set_level(logging.INFO)
    s = parse_settings({"data_dir": str(machine / "data"),
                        "models": {"discover": True, "directories": [str(machine / "mine")],
                                   "sources": ["ollama", "directories"]}})
    c = await make_client(s)
    models = {m["id"]: m for m in (await (await c.get("/v1/models")).json())["data"]}
    assert set(models) == {"llama3.2:3b", "someone/coder:latest", "seer:latest", "dir-model"}
    assert models["seer:latest"]["vision"] is True and "vision" not in models["llama3.2:3b"]
    assert models["llama3.2:3b"]["source"] == "ollama" and models["dir-model"]["source"] == "directory"
    r = await c.post("/v1/chat/completions", json={"model": "llama3.2:3b", "max_tokens": 3,
                                                   "messages": [{"role": "user", "content": "hi"}]})
    assert r.status == 200 and r.headers["X-Anyad-Backend"] == "llama3.2:3b"
    assert "discovered 4 model(s)" in caplog.text


async def test_without_discover_only_configured_models_are_served(machine, make_client, tiny_model):
    s = parse_settings({"data_dir": str(machine / "data"), "models": {"mine": {"path": str(tiny_model)}}})
    c = await make_client(s)
    assert [m["id"] for m in (await (await c.get("/v1/models")).json())["data"]] == ["mine"]


def test_a_bad_discovery_key_names_the_models_table(tmp_path):
    from anyad.errors import ConfigError

    with pytest.raises(ConfigError, match=r"models\.sources\.0"):
        parse_settings({"models": {"sources": ["nowhere"]}})


def test_projectors_are_paired_with_their_models_not_served_alone(machine, monkeypatch):
    from anyad.discovery import discover

    found = {f.id: f for f in discover(parse_settings({"models": {"sources": ["ollama", "lmstudio"]}}).discovery)}
    assert found["tiny-lm-Q8_0"].mmproj.name == "mmproj-tiny-f16.gguf"
    assert found["seer:latest"].mmproj.name == "sha256-pppp"
    assert found["llama3.2:3b"].mmproj is None
    assert not any("mmproj" in i for i in found)


async def test_a_discovered_projector_reads_images(machine, make_client):
    import base64

    from mmprojmaker import RED

    c = await make_client(parse_settings({"data_dir": str(machine / "data"),
                                          "models": {"discover": True, "sources": ["lmstudio"]}}))
    r = await c.post("/v1/chat/completions", json={"model": "tiny-lm-Q8_0", "max_tokens": 1, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(RED).decode()}}]}]})
    assert r.status == 200, await r.text()
