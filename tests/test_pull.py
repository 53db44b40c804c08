"""`anyad pull` against a local aiohttp file server: resume after an interruption, hashes
(given and published by the hub), a 404, a disk too small, and the CLI's progress."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from aiohttp import web

from anyad.download import DownloadError, pull
from conftest import anyad_cmd, clean_env


@pytest.fixture
async def server(aiohttp_server, tiny_model):
    data = tiny_model.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    state = {"ranges": [], "cut": False, "published": sha}

    async def whole(request: web.Request) -> web.StreamResponse:
        state["ranges"].append(request.headers.get("Range"))
        if state["cut"]:  # send half, then drop the connection
            resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            request.transport.close()
            return resp
        return web.FileResponse(tiny_model)  # answers Range requests with 206

    async def hub(request: web.Request) -> web.Response:
        # As the hub does: a redirect to the storage, carrying the LFS file's hash.
        raise web.HTTPFound("/blobs/tiny", headers={"X-Linked-Etag": f'"{state["published"]}"',
                                                      "X-Linked-Size": str(len(data))})

    async def huge(request: web.Request) -> web.Response:
        return web.Response(body=b"", headers={"Content-Length": str(1 << 60)})

    app = web.Application()
    app.router.add_get("/files/tiny.gguf", whole)
    app.router.add_get("/blobs/tiny", whole)
    app.router.add_get("/org/repo/resolve/main/tiny.gguf", hub)
    app.router.add_get("/files/huge.gguf", huge)
    srv = await aiohttp_server(app)
    state["base"] = f"http://127.0.0.1:{srv.port}"
    state["sha"] = sha
    state["data"] = data
    return state


async def test_an_interrupted_download_resumes_with_a_range_request(server, tmp_path):
    url = server["base"] + "/files/tiny.gguf"
    server["cut"] = True
    with pytest.raises(DownloadError, match="interrupted .* run the same command again to resume"):
        await pull(url, tmp_path, sha256=server["sha"])
    part = tmp_path / ".tiny.gguf.part"
    kept = part.stat().st_size
    assert 0 < kept < len(server["data"]) and not (tmp_path / "tiny.gguf").exists()
    server["cut"] = False
    path = await pull(url, tmp_path, sha256=server["sha"])
    assert server["ranges"][-1] == f"bytes={kept}-"
    assert path.read_bytes() == server["data"] and not part.exists()


async def test_a_wrong_hash_keeps_nothing(server, tmp_path):
    with pytest.raises(DownloadError) as err:
        await pull(server["base"] + "/files/tiny.gguf", tmp_path, sha256="0" * 64)
    assert "0" * 64 in str(err.value) and server["sha"] in str(err.value)  # both hashes
    assert list(tmp_path.iterdir()) == []


async def test_hf_sources_use_the_hubs_published_hash(server, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", server["base"])
    path = await pull("hf:org/repo/tiny.gguf", tmp_path)
    assert path.name == "tiny.gguf" and hashlib.sha256(path.read_bytes()).hexdigest() == server["sha"]
    path.unlink()
    server["published"] = "f" * 64  # the hub says otherwise: refused
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        await pull("hf:org/repo/tiny.gguf", tmp_path)
    assert list(tmp_path.iterdir()) == []


async def test_clear_errors_for_404_and_a_full_disk(server, tmp_path):
    with pytest.raises(DownloadError, match=r"not found \(404\)"):
        await pull(server["base"] + "/files/nope.gguf", tmp_path)
    with pytest.raises(DownloadError, match="not enough disk space .* needs .* more"):
        await pull(server["base"] + "/files/huge.gguf", tmp_path)
    with pytest.raises(DownloadError, match="hf:ORG/REPO/FILE.gguf"):
        await pull("hf:just-org", tmp_path)


async def test_the_cli_shows_progress_and_says_where_it_saved(server, tmp_path):
    env = clean_env(tmp_path)
    proc = await asyncio.create_subprocess_exec(
        *anyad_cmd("pull", server["base"] + "/files/tiny.gguf", "--sha256", server["sha"], "--dir", str(tmp_path / "m")),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert "100.0 %" in err.decode() and "/s" in err.decode()
    assert f"saved {tmp_path / 'm' / 'tiny.gguf'}" in out.decode()
    proc = await asyncio.create_subprocess_exec(*anyad_cmd("pull", server["base"] + "/files/nope.gguf",
                                                           "--dir", str(tmp_path / "m")),
                                                env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1 and "not found (404)" in err.decode() and "Traceback" not in err.decode()
    assert os.listdir(tmp_path / "m") == ["tiny.gguf"]
