"""Q8_0 weights on the CPU: on CPUs with AMX, this llama.cpp's repacked AMX kernels crash
the process, so ``repack = "auto"`` keeps the weights as the file has them there."""

from __future__ import annotations

import dataclasses

import ggufmaker
from anyad.backends.llama_cpp.cpu_features import advertises_amx
from conftest import MODEL_ID, make_settings


async def test_a_q8_0_model_answers_on_this_cpu(make_client, tmp_path):
    model = ggufmaker.write_model(tmp_path / "tiny-q8_0.gguf", dataclasses.replace(ggufmaker.TINY, quant="Q8_0"))
    c = await make_client(make_settings(model, tmp_path))
    for _ in range(2):  # the worker lived through the first
        r = await c.post("/v1/chat/completions", json={"model": MODEL_ID, "max_tokens": 4, "messages": [
            {"role": "user", "content": "hello"}]})
        assert r.status == 200, await r.text()
        assert (await r.json())["usage"]["completion_tokens"] >= 1
    status = await (await c.get("/api/status")).json()
    [entry] = [m for m in status["models"] if m["id"] == MODEL_ID] if isinstance(status["models"], list) \
        else [status["models"][MODEL_ID]]
    assert entry["repacked"] is (not advertises_amx())
