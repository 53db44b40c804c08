"""Fake remote providers (real aiohttp servers on 127.0.0.1 that behave well or badly), and a
recorded NVML for the GPU this machine lacks."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from types import SimpleNamespace

from aiohttp import web

REPLY = "Hello from the fake provider."


class FakeOpenAI:
    """An OpenAI-compatible upstream. ``mode`` picks the behaviour and may change mid-test:
    ok | 500 | 429 | 400 | hang | reset (mid-stream) | html502."""

    def __init__(self, mode: str = "ok", retry_after: int = 7) -> None:
        self.mode = mode
        self.retry_after = retry_after
        self.requests: list[dict] = []
        self.headers: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/v1/responses", self.responses)
        return app

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """The Responses API: REPLY as output text, or (tools offered) one get_weather call;
        mode ``500`` fails before the reply, ``failed`` streams a response.failed after text;
        ``leak`` fails as ``failed`` does (whole: a failed response, status 200) with a message
        quoting the Authorization header it was sent, as some providers do."""
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if self.mode == "500":
            return web.json_response({"error": {"message": "upstream exploded", "type": "server_error"}}, status=500)
        tools = bool(body.get("tools")) and body.get("tool_choice") != "none"
        usage = {"input_tokens": 13, "output_tokens": 5, "total_tokens": 18}
        call = {"type": "function_call", "id": "fc_1", "call_id": "call_r1", "name": "get_weather",
                "arguments": '{"city": "Oslo"}', "status": "completed"}
        message = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                   "content": [{"type": "output_text", "text": REPLY, "annotations": []}]}
        reasoning = {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "Thinking."}]}
        output = [reasoning, call] if tools else [reasoning, message]
        whole = {"id": "resp_up", "object": "response", "status": "completed", "model": body["model"],
                 "output": output, "usage": usage}
        failure = {"code": "server_error", "message": "it broke"}
        if self.mode == "leak":
            failure["message"] = f"the key {request.headers.get('Authorization', '')!r} is not valid"
        if not body.get("stream"):
            if self.mode == "leak":
                return web.json_response({**whole, "status": "failed", "error": failure})
            return web.json_response(whole)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def ev(kind: str, **data: object) -> None:
            await resp.write(f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, **data}).encode()
                             + b"\n\n")

        await ev("response.created", response={**whole, "status": "in_progress", "output": []})
        await ev("response.output_item.added", output_index=0, item={**reasoning, "summary": []})
        await ev("response.reasoning_summary_text.delta", output_index=0, delta="Thinking.")
        if tools:
            await ev("response.output_item.added", output_index=1, item={**call, "arguments": ""})
            for piece in ('{"city": ', '"Oslo"}'):
                await ev("response.function_call_arguments.delta", output_index=1, item_id="fc_1", delta=piece)
        else:
            await ev("response.output_item.added", output_index=1, item={**message, "content": []})
            for i, w in enumerate(REPLY.split(" ")):
                await ev("response.output_text.delta", output_index=1, content_index=0,
                         delta=w if i == 0 else " " + w)
                if self.mode in ("failed", "leak") and i == 1:
                    await ev("response.failed", response={**whole, "status": "failed", "error": failure})
                    return resp
        await ev("response.completed", response=whole)
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """Legacy completions: every choice says REPLY, choice i of a prompt list is prompt i // n's."""
        body = await request.json()
        self.requests.append(body)
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        count = len(prompts) * int(body.get("n") or 1)
        words = REPLY.split(" ")
        lp = body.get("logprobs")

        def logprobs(toks: list[str]) -> dict | None:
            return None if lp is None else {"tokens": toks, "token_logprobs": [-0.5] * len(toks),
                                            "top_logprobs": [{t: -0.5} for t in toks], "text_offset": [0] * len(toks)}

        base = {"id": "up-c", "object": "text_completion", "created": 0, "model": body["model"]}
        usage = {"prompt_tokens": 3 * len(prompts), "completion_tokens": 7 * count, "total_tokens": 0}
        if not body.get("stream"):
            toks = [w if i == 0 else " " + w for i, w in enumerate(words)]
            return web.json_response({**base, "usage": usage, "choices": [
                {"index": i, "text": REPLY, "logprobs": logprobs(toks), "finish_reason": "stop"}
                for i in range(count)]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for j, w in enumerate(words):
            text = w if j == 0 else " " + w
            for i in range(count):
                await resp.write(b"data: " + json.dumps({**base, "choices": [
                    {"index": i, "text": text, "logprobs": logprobs([text]), "finish_reason": None}]}).encode()
                    + b"\n\n")
        for i in range(count):
            await resp.write(b"data: " + json.dumps({**base, "choices": [
                {"index": i, "text": "", "logprobs": None, "finish_reason": "stop"}]}).encode() + b"\n\n")
        await resp.write(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(body)
        if self.mode != "ok":
            return web.json_response({"error": {"message": "embeddings down"}}, status=503)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = [{"object": "embedding", "index": i, "embedding": [float(len(str(x))), 0.5, -1.0]}
                for i, x in enumerate(inputs)]
        return web.json_response({"object": "list", "data": list(reversed(data)), "model": body["model"],
                                  "usage": {"prompt_tokens": 5 * len(inputs), "total_tokens": 5 * len(inputs)}})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        mode = self.mode
        if mode == "500":
            return web.json_response({"error": {"message": "upstream exploded", "type": "server_error"}}, status=500)
        if mode == "html502":
            return web.Response(text="<html><body><h1>502 Bad Gateway</h1></body></html>", status=502,
                                content_type="text/html")
        if mode == "429":
            return web.json_response({"error": {"message": "slow down", "type": "rate_limit_error"}}, status=429,
                                     headers={"Retry-After": str(self.retry_after)})
        if mode == "400":
            return web.json_response({"error": {"message": "messages[0].content is too spicy", "type":
                                                "invalid_request_error", "param": "messages", "code": "spicy"}},
                                     status=400)
        if mode == "hang":
            await asyncio.sleep(3600)
        tools = bool(body.get("tools"))
        n = int(body.get("n") or 1)  # choice i > 0 says REPLY and its number, interleaved when streamed
        if not body.get("stream"):
            msg: dict = {"role": "assistant", "content": None if tools else REPLY}
            if tools:
                msg["tool_calls"] = [{"id": "call_1", "type": "function",
                                      "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]
            return web.json_response({
                "id": "up-1", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
                "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls" if tools else "stop"}] + [
                    {"index": i, "message": {"role": "assistant", "content": f"{REPLY} {i}"}, "finish_reason": "stop"}
                    for i in range(1, n)],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        def ev(obj: dict, space: bool = True) -> bytes:
            # CRLF line ends, and "data:" sometimes without its space: both seen in the wild.
            return (b"data: " if space else b"data:") + json.dumps(obj).encode() + b"\r\n\r\n"

        base = {"id": "up-1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        await resp.write(b": ping\r\n\r\n")
        if tools:
            parts = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                                "arguments": ""}},
                     {"index": 0, "function": {"arguments": '{"city": '}},
                     {"index": 0, "function": {"arguments": '"Oslo"}'}}]
            for i, tc in enumerate(parts):
                delta = {"tool_calls": [tc]}
                if i == 0:
                    delta["role"] = "assistant"
                await resp.write(ev({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}))
            finish = "tool_calls"
        else:
            words = REPLY.split(" ")
            for i, w in enumerate(words):
                text = w if i == 0 else " " + w
                # No role in the first delta, as some servers do.
                await resp.write(ev({**base, "choices": [{"index": 0, "delta": {"content": text},
                                                          "finish_reason": None}]}, space=i % 2 == 0))
                for c in range(1, n):
                    await resp.write(ev({**base, "choices": [{"index": c, "delta": {"content": text},
                                                              "finish_reason": None}]}))
                if mode == "reset" and i == 1:
                    request.transport.close()  # drop the connection mid-stream
                    return resp
            for c in range(1, n):
                await resp.write(ev({**base, "choices": [{"index": c, "delta": {"content": f" {c}"},
                                                          "finish_reason": "stop"}]}))
            finish = "stop"
        await resp.write(ev({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
        if (body.get("stream_options") or {}).get("include_usage"):
            await resp.write(ev({**base, "choices": None,
                                 "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}))
        await resp.write(b"data: [DONE]\r\n\r\n")
        return resp


class FakeReplica(FakeOpenAI):
    """One replica of a pool: FakeOpenAI with ``GET /health`` and ``GET /v1/models``.
    ``healthy = False``: its health check fails (503); ``listed``: the models it lists;
    ``listed_status``: what its /v1/models answers;
    ``hold``: while set to an unset Event, chat requests wait on it (a busy replica); mode
    ``drop``: the connection closes before any reply."""

    def __init__(self, mode: str = "ok", listed: tuple[str, ...] = ("m",)) -> None:
        super().__init__(mode)
        self.healthy = True
        self.listed = list(listed)
        self.hold: asyncio.Event | None = None
        self.waiting = 0
        self.listed_status = 200

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if self.healthy else "loading"}, status=200 if self.healthy else 503)

    async def models(self, request: web.Request) -> web.Response:
        if self.listed_status != 200:
            return web.json_response({"error": {"message": "not now"}}, status=self.listed_status)
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.listed]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        if self.hold is not None:
            self.waiting += 1
            try:
                await self.hold.wait()
            finally:
                self.waiting -= 1
        if self.mode == "drop":  # dies before the reply: the connection just ends
            await request.read()
            request.transport.close()
            return web.Response()
        return await super().chat(request)


class Blackhole:
    """A loopback port where connecting hangs (a listener whose backlog is full), like a dead
    network; ``lift()`` ends that: nothing listens there then, so connecting is refused."""

    def __init__(self) -> None:
        self.srv = socket.socket()
        self.srv.bind(("127.0.0.1", 0))
        self.srv.listen(0)
        self.port = self.srv.getsockname()[1]
        self.fillers: list[socket.socket] = []
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", self.port))
            except BlockingIOError:
                pass
            self.fillers.append(s)

    def lift(self) -> None:
        for s in self.fillers:
            s.close()
        self.srv.close()


class FakeAnthropic:
    """An Anthropic Messages API upstream: text replies, or a tool_use when tools are offered."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.headers: list[dict] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/messages", self.messages)
        app.router.add_post("/v1/messages/count_tokens", self.count_tokens)
        return app

    async def count_tokens(self, request: web.Request) -> web.Response:
        """A count of one token per four characters of the body, as a stand-in for a tokenizer."""
        body = await request.json()
        self.requests.append(body)
        return web.json_response({"input_tokens": len(json.dumps(body)) // 4})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        if body.get("max_tokens", 0) > 100000:
            return web.json_response({"type": "error", "error": {"type": "invalid_request_error",
                                                                 "message": "max_tokens: too large"}}, status=400)
        tools = bool(body.get("tools"))
        if not body.get("stream"):
            content = ([{"type": "text", "text": "Let me check."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]
                       if tools else [{"type": "text", "text": REPLY}])
            return web.json_response({"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
                                      "content": content, "stop_reason": "tool_use" if tools else "end_turn",
                                      "usage": {"input_tokens": 21, "output_tokens": 9}})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def ev(name: str, obj: dict) -> None:
            await resp.write(f"event: {name}\ndata: {json.dumps({'type': name, **obj})}\n\n".encode())

        await ev("message_start", {"message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
                                               "usage": {"input_tokens": 21, "output_tokens": 1}}})
        await ev("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
        await ev("ping", {})
        for w in (["Let me check."] if tools else [REPLY[:5], REPLY[5:]]):
            await ev("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": w}})
        await ev("content_block_stop", {"index": 0})
        if tools:
            await ev("content_block_start", {"index": 1, "content_block": {"type": "tool_use", "id": "toolu_1",
                                                                           "name": "get_weather", "input": {}}})
            for part in ('{"city":', ' "Oslo"}'):
                await ev("content_block_delta", {"index": 1, "delta": {"type": "input_json_delta",
                                                                       "partial_json": part}})
            await ev("content_block_stop", {"index": 1})
        await ev("message_delta", {"delta": {"stop_reason": "tool_use" if tools else "end_turn"},
                                   "usage": {"output_tokens": 9}})
        await ev("message_stop", {})
        return resp


class RecordedNVML:
    """Answers as pynvml does, from a recorded machine: the stand-in for a GPU this machine lacks,
    injected at the device probe's boundary only."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus=None, fail_init=False):
        self.gpus = gpus or []
        self.fail_init = fail_init

    def nvmlInit(self):
        if self.fail_init:
            raise self.NVMLError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, h):
        return h["name"].encode()

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"])

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=h["util"])


class FakeOllamaRegistry:
    """An Ollama-style registry (the protocol ``ollama pull`` speaks): manifests at
    ``/v2/{namespace}/{model}/manifests/{tag}``, blobs by digest at ``.../blobs/{digest}``
    (with ranges). ``publish`` puts a model up from its GGUF bytes; ``corrupt`` makes a
    blob's bytes differ from its digest; ``cut`` drops the connection halfway through a
    blob, once; ``redirect`` sends a blob's request elsewhere (digest → URL: another server,
    or ``/storage/<digest>`` on this one); ``requests`` records each path asked for,
    ``ranges`` each blob's Range header. Hostile manifests (sizes that lie, one digest
    twice) are put in ``manifests`` by hand, or by ``publish(config=..., pad=...)``."""

    MODEL = "application/vnd.ollama.image.model"
    CONFIG = "application/vnd.docker.container.image.v1+json"

    def __init__(self) -> None:
        self.manifests: dict[tuple[str, str, str], bytes] = {}
        self.blobs: dict[str, bytes] = {}
        self.corrupt: set[str] = set()
        self.cut: set[str] = set()
        self.redirect: dict[str, str] = {}
        self.requests: list[str] = []
        self.ranges: list[tuple[str, str | None]] = []

    def blob(self, data: bytes, media_type: str) -> dict:
        import hashlib

        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        self.blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    def publish(self, model: str, gguf: bytes, tag: str = "latest", namespace: str = "library",
                config: dict | None = None, pad: int = 0, **texts: str) -> dict:
        """A model of ``gguf`` with text layers (``template=``, ``system=``, ``license=``,
        ``params=`` as JSON text); ``config``: its config blob's JSON; ``pad``: that many
        more bytes in the manifest (an annotation); returns its manifest."""
        layers = [self.blob(gguf, self.MODEL)]
        for kind, text in texts.items():
            layers.append(self.blob(text.encode(), f"application/vnd.ollama.image.{kind}"))
        cfg = self.blob(json.dumps(config or {"model_format": "gguf", "model_family": "llama"}).encode(), self.CONFIG)
        manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                    "config": cfg, "layers": layers}
        if pad:
            manifest["annotations"] = {"pad": "x" * pad}
        self.manifests[(namespace, model, tag)] = json.dumps(manifest).encode()
        return manifest

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2/{namespace}/{model}/manifests/{tag}", self.manifest)
        app.router.add_get("/v2/{namespace}/{model}/blobs/{digest}", self.get_blob)
        app.router.add_get("/storage/{digest}", self.get_blob)
        return app

    async def manifest(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        m = request.match_info
        raw = self.manifests.get((m["namespace"], m["model"], m["tag"]))
        if raw is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "manifest unknown"}]},
                                     status=404)
        return web.Response(body=raw, content_type="application/vnd.docker.distribution.manifest.v2+json")

    async def get_blob(self, request: web.Request) -> web.Response:
        self.requests.append(request.path)
        digest = request.match_info["digest"]
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if digest in self.redirect and not request.path.startswith("/storage/"):
            raise web.HTTPFound(self.redirect[digest])
        if digest in self.corrupt:  # the same length, other bytes
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        rng = request.headers.get("Range", "")
        self.ranges.append((digest, rng or None))
        if digest in self.cut:
            self.cut.discard(digest)
            resp = web.StreamResponse(headers={"Content-Length": str(len(data)),
                                               "Content-Type": "application/octet-stream"})
            await resp.prepare(request)
            await resp.write(data[: len(data) // 2])
            request.transport.close()
            return resp
        start = 0
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
            if start >= len(data):
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            return web.Response(body=data[start:], status=206, content_type="application/octet-stream",
                                headers={"Content-Range": f"bytes {start}-{len(data) - 1}/{len(data)}"})
        return web.Response(body=data, content_type="application/octet-stream")
