"""A model entry's sha256: checked before the first load, remembered, and `anyad models verify`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess

from anyad.integrity import HASHES_FILE, cache_dir
from conftest import MODEL_ID, anyad_cmd, clean_env, make_settings

MSGS = [{"role": "user", "content": "hi"}]


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_a_matching_file_loads_and_a_mismatch_is_refused_with_both_hashes(make_client, tiny_model, tmp_path):
    model = tmp_path / "m.gguf"
    shutil.copy(tiny_model, model)
    good = sha(model)
    c = await make_client(make_settings(model, tmp_path, sha256=good.upper()))
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2})
    assert r.status == 200
    remembered = json.loads((cache_dir() / HASHES_FILE).read_text())
    assert remembered[str(model.resolve())]["sha256"] == good

    wrong = "0" * 64
    c = await make_client(make_settings(model, tmp_path, sha256=wrong))
    r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "messages": MSGS, "max_tokens": 2})
    assert r.status == 503
    err = (await r.json())["error"]
    assert err["code"] == "model_integrity" and wrong in err["message"] and good in err["message"]
    assert c.daemon.backends[0].worker.pid is None  # nothing was loaded


def test_the_hash_is_remembered_until_the_file_changes(tiny_model, tmp_path):
    from anyad.integrity import file_sha256

    model = tmp_path / "m.gguf"
    shutil.copy(tiny_model, model)
    store = tmp_path / "cache"
    assert file_sha256(model, store) == sha(model)
    # Remembered: the recorded answer is used (planted here to show it is not recomputed).
    data = json.loads((store / HASHES_FILE).read_text())
    data[str(model.resolve())]["sha256"] = "f" * 64
    (store / HASHES_FILE).write_text(json.dumps(data))
    assert file_sha256(model, store) == "f" * 64
    # A changed file (new mtime) is hashed again.
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert file_sha256(model, store) == sha(model)


def test_models_verify_command(tiny_model, tmp_path):
    model = tmp_path / "m.gguf"
    shutil.copy(tiny_model, model)
    cfg = tmp_path / "anyad.toml"
    cfg.write_text(f'[models.good]\npath = "{model}"\nsha256 = "{sha(model)}"\n'
                   f'[models.unchecked]\npath = "{model}"\n')
    p = subprocess.run(anyad_cmd("models", "verify", "--config", str(cfg)), env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "good: OK" in p.stdout and "unchecked: not checked" in p.stdout
    cfg.write_text(f'[models.bad]\npath = "{model}"\nsha256 = "{"a" * 64}"\n')
    p = subprocess.run(anyad_cmd("models", "verify", "--config", str(cfg)), env=clean_env(tmp_path),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1 and "bad: MISMATCH" in p.stdout and sha(model) in p.stdout
