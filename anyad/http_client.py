"""What every remote backend shares: one pooled HTTP session, and failures mapped to our errors."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

import aiohttp
from yarl import URL

from anyad import __version__, secrets
from anyad.backend import Backend, ModelInfo
from anyad.config import ProviderSettings
from anyad.errors import (
    AnyadError,
    BackendError,
    ConfigError,
    ConnectionRefused,
    NetworkError,
    Timeout,
    Unavailable,
    UpstreamError,
)
from anyad.jsoncodec import dumpb, loads
from anyad.offline import refused

log = logging.getLogger("anyad.remote")
JSON_HEADERS = {"Content-Type": "application/json"}
SECRET_TTL_S = 60.0


class ProviderClient:
    """One keep-alive connection pool per provider, created in the running loop on first use."""

    def __init__(self, name: str, settings: ProviderSettings) -> None:
        self.name = name
        self.settings = settings
        self.base_url = settings.base_url
        self._session: aiohttp.ClientSession | None = None
        self._key: str | None = None
        self._key_at = 0.0
        self.key_problem: str | None = None  # why the key reference cannot be resolved, when it cannot

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            s = self.settings
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=60, ttl_dns_cache=300),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout_s,
                                              sock_read=s.read_timeout_s),
                # Static headers live on the session, so a request merges only what varies.
                headers={"User-Agent": f"anyad/{__version__}", **s.headers},
            )
        return self._session

    async def api_key(self) -> str | None:
        """The provider's key, resolved off the event loop (a keyring lookup is a D-Bus round
        trip) and kept for ``SECRET_TTL_S``, so that a key changed with ``anyad secrets set``
        is picked up within that time (at once on reload) without a lookup per request."""
        ref = self.settings.api_key
        if ref is None:
            return None
        now = time.monotonic()
        if self._key is not None and now - self._key_at < SECRET_TTL_S:
            return self._key
        try:
            key = await asyncio.to_thread(secrets.resolve, ref)
        except ConfigError as exc:
            self.key_problem = str(exc)
            # The provider is unusable, not the request: another target may answer.
            raise Unavailable(f"{self.name}: {exc}") from None
        self._key, self._key_at, self.key_problem = key, now, None
        return key

    def probe_address(self) -> tuple[str, int] | None:
        url = URL(self.base_url)
        return (url.host, url.port) if url.host and url.port else None

    async def post(self, path: str, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        """POST and return the response once its headers are in; every failure is an AnyadError."""
        try:
            # Bytes straight from orjson: aiohttp's json= would take a str and encode it again.
            resp = await self.session().post(self.base_url + path, data=dumpb(body),
                                             headers={**JSON_HEADERS, **headers} if headers else JSON_HEADERS)
        except aiohttp.ConnectionTimeoutError:
            raise NetworkError(f"{self.name}: connecting timed out after {self.settings.connect_timeout_s:g} s") \
                from None
        except aiohttp.ClientConnectorError as exc:
            reason = exc.os_error.strerror if exc.os_error and exc.os_error.strerror else str(exc.os_error or exc)
            cls = ConnectionRefused if refused(exc.os_error) else NetworkError
            raise cls(f"{self.name}: cannot connect to {exc.host}:{exc.port}: {reason}") from None
        except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
            raise Timeout(f"{self.name}: no answer within {self.settings.read_timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise BackendError(f"{self.name}: request failed: {type(exc).__name__}: {exc}") from None
        if resp.status >= 400:
            async with resp:
                err = await upstream_error(self.name, resp)
            raise self.redact(err)
        return resp

    async def get(self, url: str, timeout_s: float, headers: dict[str, str] | None) -> tuple[int, bytes]:
        """A GET (a health check, a model list): its status, and its body when that is 200.
        Raises what aiohttp raises."""
        async with self.session().get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            return resp.status, await resp.read() if resp.status == 200 else b""

    async def model_ids(self, timeout_s: float, headers: dict[str, str] | None) -> list[str]:
        """What the service's ``GET /models`` lists (OpenAI's shape, as vLLM, SGLang,
        llama-server, Anthropic and anyad answer it)."""
        status, body = await self.get(self.base_url + "/models", timeout_s, headers)
        if status != 200:
            raise ValueError(f"/models answered {status}")
        data = loads(body) if body else None
        rows = data.get("data") if isinstance(data, dict) else None
        if not isinstance(rows, list):
            raise ValueError("/models did not answer a list of models")
        return sorted({str(m["id"]) for m in rows if isinstance(m, dict) and m.get("id")})

    def redact(self, err: AnyadError) -> AnyadError:
        """``err`` with the provider's key taken out of its message: some providers quote the
        key they were sent (in an error status, or in-band in a reply that began with 200); it
        must not reach a client or a log."""
        if self._key and self._key in err.message:
            err.message = err.message.replace(self._key, "[redacted]")
        return err

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def mid_stream(name: str, exc: BaseException) -> AnyadError:
    """A failure after the reply started."""
    if isinstance(exc, AnyadError):
        return exc
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return Timeout(f"{name}: the reply stalled mid-stream")
    return BackendError(f"{name}: connection lost mid-reply ({type(exc).__name__})")


async def upstream_error(name: str, resp: aiohttp.ClientResponse) -> UpstreamError:
    """The provider's error as ours: its status and message, in OpenAI's shape, never its HTML."""
    retry_after = None
    ra = resp.headers.get("Retry-After")
    if ra:
        try:
            retry_after = float(ra)
        except ValueError:
            retry_after = None
    try:
        text = (await resp.text(errors="replace"))[:4000]
    except (aiohttp.ClientError, asyncio.TimeoutError):
        text = ""
    message, type_, code, param = None, None, None, None
    try:
        err = loads(text).get("error")
        if isinstance(err, dict):
            message, type_, code, param = err.get("message"), err.get("type"), err.get("code"), err.get("param")
        elif isinstance(err, str):
            message = err
    except (ValueError, AttributeError):
        pass
    if not message:
        plain = re.sub(r"<[^>]+>", " ", text)
        plain = re.sub(r"\s+", " ", plain).strip()[:200]
        message = f"{resp.status} {resp.reason or ''}".strip() + (f": {plain}" if plain else "")
    return UpstreamError(resp.status, f"{name}: {message}", type_=type_ if isinstance(type_, str) else None,
                         code=str(code) if code is not None else None,
                         param=param if isinstance(param, str) else None, retry_after=retry_after)


class RemoteBackend(Backend):
    """What every remote provider's backend shares: its pooled client, its listed models,
    its timeouts and retries, and where the offline probe should knock."""

    remote = True

    def __init__(self, name: str, settings: ProviderSettings) -> None:
        self.name = name
        self.settings = settings
        self.client = ProviderClient(name, settings)
        self.first_byte_timeout_s = settings.first_byte_timeout_s
        self.max_retries = settings.max_retries
        self.listed: list[str] = []  # list_models: what its /models last said
        self.list_error: str | None = None
        self._lister: asyncio.Task[None] | None = None

    @classmethod
    def from_provider(cls, name: str, settings: ProviderSettings) -> "RemoteBackend":
        return cls(name, settings)

    def models(self) -> list[ModelInfo]:
        return [ModelInfo(id=f"{self.name}/{m}", owned_by=self.name, created=0)
                for m in dict.fromkeys([*self.settings.models, *self.listed])]

    def probe_address(self) -> tuple[str, int] | None:
        return self.client.probe_address()

    async def headers(self) -> dict[str, str] | None:
        """How a request shows its key (a bearer token, as OpenAI-style services take it)."""
        key = await self.client.api_key()
        return {"Authorization": f"Bearer {key}"} if key else None

    async def start(self) -> None:
        # Resolve the key once now, so that a missing one shows in the status before a request fails on it.
        try:
            await self.client.api_key()
        except Unavailable as exc:
            log.warning("provider %s is misconfigured: %s", self.name, self.client.key_problem or exc.message)
        if self.settings.list_models and self._lister is None:
            # In the background: start-up does not wait on a peer that is slow or gone.
            self._lister = asyncio.create_task(self._list_models(), name=f"{self.name}-models")

    async def _list_models(self) -> None:
        while True:
            try:
                await self.refresh_models()
            except Exception:  # a surprise must not end the listing for good
                log.exception("provider %s: listing its models failed unexpectedly", self.name)
            await asyncio.sleep(self.settings.list_models_every_s)

    async def refresh_models(self) -> None:
        """Read a peer's models (another anyad, a llama-server, a vLLM) now; the last list
        stays while the peer cannot be asked, and the status says why."""
        try:
            listed = await self.client.model_ids(self.settings.connect_timeout_s + 10, await self.headers())
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError, AnyadError) as exc:
            why = exc.message if isinstance(exc, AnyadError) else f"{type(exc).__name__}: {exc}"[:200]
            if self.list_error is None:
                log.warning("provider %s: cannot list its models: %s", self.name, why)
            self.list_error = why
            return
        if listed != self.listed:
            log.info("provider %s lists %d models", self.name, len(listed))
        self.listed, self.list_error = listed, None

    def status(self) -> dict[str, Any]:
        problem = self.client.key_problem
        out: dict[str, Any] = {"state": "misconfigured", "problem": problem} if problem else {"state": "ok"}
        if self.settings.list_models:
            out["listed_models"] = len(self.listed)
            if self.list_error:
                out["list_error"] = self.list_error
        return out

    def identity(self, model: str) -> str:
        return f"{self.kind}:{self.settings.base_url}:{model}"

    async def reply_json(self, resp: aiohttp.ClientResponse) -> Any:
        """A whole (non-streamed) reply body as JSON."""
        try:
            return loads(await resp.read())
        except ValueError:
            raise BackendError(f"{self.name}: the reply is not JSON") from None

    async def close(self) -> None:
        if self._lister is not None:
            self._lister.cancel()
            await asyncio.gather(self._lister, return_exceptions=True)
            self._lister = None
        await self.client.close()
