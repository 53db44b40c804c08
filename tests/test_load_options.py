"""What a load sets beyond llama_cpp.Llama's arguments: on CPUs with AMX, this llama.cpp's
repacked AMX kernels crash the process, so ``repack = "auto"`` keeps Q8_0 weights as the
file has them there; flash attention's "auto" reaches the context."""

from __future__ import annotations

import dataclasses

import ggufmaker
from anyad.backends.llama_cpp.load_options import advertises_amx
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
    assert entry["repacked"] is (not advertises_amx()) and entry["flash_attention"] == "auto"


def test_flash_attention_auto_reaches_the_context(tiny_model):
    """llama_cpp.Llama knows only on and off; the load leaves "auto" to llama.cpp."""
    import llama_cpp
    import llama_cpp.llama_cpp as lc

    from anyad.backends.llama_cpp.load_options import flash_attention_auto

    with flash_attention_auto(lc):
        llm = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=64, verbose=False)
    assert llm.context_params.flash_attn_type == lc.LLAMA_FLASH_ATTN_TYPE_AUTO
    assert lc.LLAMA_FLASH_ATTN_TYPE_DISABLED == 0  # put back
    off = llama_cpp.Llama(model_path=str(tiny_model), n_ctx=64, verbose=False)
    assert off.context_params.flash_attn_type == lc.LLAMA_FLASH_ATTN_TYPE_DISABLED
    assert llm.create_completion("hi", max_tokens=2)["choices"][0]["text"] is not None
