"""Model name → an ordered list of targets, and the walk along it (fallback).

A name is a route alias (``[[routes]]``), a local model id, or ``provider/model``.
``Router.open`` tries the targets in order until one produces its first chunk:
a target that fails in a way that is not the client's fault (down, refusing,
overloaded, timing out, crashed) is retried with exponential backoff and jitter,
then skipped for the next. Remote targets sit behind circuit breakers, and all
of them are skipped at once while the machine is offline (no provider's host
answers: ``anyad.offline``). Once the first chunk
exists, the reply belongs to that target: a later failure is the client's to
see, never a silent switch.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import re
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, TypeVar

from anyad.backend import Backend, Embeddings, ModelInfo
from anyad.breaker import Breaker
from anyad.config import RouterSettings, RouteSettings, RouteTarget
from anyad.errors import (
    AnyadError,
    BackendError,
    ConfigError,
    ConnectionRefused,
    ModelNotFound,
    NetworkError,
    QueueFull,
    Timeout,
    Unavailable,
    UpstreamError,
)
from anyad.offline import Connectivity
from anyad.pool import Pool
from anyad.stream import ChatRequest, Chunk, ChunkStream

_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+
log = logging.getLogger("anyad.router")
T = TypeVar("T")


@dataclass(slots=True)
class Target:
    name: str  # what clients ask for, and what X-Anyad-Backend reports
    backend: Backend
    model: str  # the backend's own name for it
    # A pool's replica: on the LAN, so not part of offline detection.
    pooled: bool = False


@dataclass(slots=True)
class Opened:
    target: Target
    first: Chunk
    rest: ChunkStream
    skipped: list[str]
    breaker: Breaker | None = None

    @property
    def name(self) -> str:
        return self.target.name

    def failed(self, exc: AnyadError) -> None:
        """The reply broke after it began: it counts against the target's breaker."""
        if self.breaker is not None:
            self.breaker.failure(exc.message)



def assign(route: str, key: str | None, targets: list[RouteTarget], total: float) -> str:
    """A weighted route's target for ``key``: the key's hash picks a point in [0, total),
    the targets' weights cover that range in config order. Without a key, a random point."""
    if key is None:
        point = random.random() * total
    else:
        digest = hashlib.sha256(f"{route}\0{key}".encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2 ** 64 * total
    for t in targets:
        if point < t.weight:
            return t.model
        point -= t.weight
    return next(t.model for t in reversed(targets) if t.weight > 0)  # rounding at the very top


def _reason(exc: AnyadError) -> str:
    """One word for why a target failed, for the metrics' labels."""
    if isinstance(exc, Timeout):
        return "timeout"
    if isinstance(exc, NetworkError):
        return "network"
    if isinstance(exc, QueueFull):
        return "busy"
    if isinstance(exc, Unavailable):
        return "unavailable"
    return "error"


def _provider(target: Target) -> str:
    """A remote target's provider: its name is always ``provider/model``."""
    return target.name.partition("/")[0]


def fallback_header(skipped: list[str]) -> str:
    """X-Anyad-Fallback: the targets skipped and why, as a safe header value."""
    return re.sub(r"[^\x20-\x7e]", " ", "; ".join(skipped))[:300]


class Router:
    def __init__(self, local: dict[str, Backend], providers: dict[str, Backend],
                 routes: list[RouteSettings] | None = None, settings: RouterSettings | None = None,
                 pools: dict[str, Pool] | None = None) -> None:
        self.local = local
        self.providers = providers
        self.pools = pools or {}
        self.settings = settings or RouterSettings()
        self.routes: dict[str, list[RouteTarget]] = {}
        for name in self.pools:
            if name in local or name in providers:
                raise ConfigError(f"pools.{name}: the name is already a model id or a provider's name")
            if "/" in name or "@" in name:
                raise ConfigError(f"pools.{name}: a pool's name has no '/' (that is <provider>/<model>) and no '@' "
                                  "(that is <pool>@<replica>)")
        for i, r in enumerate(routes or []):
            if r.name in local or r.name in self.routes or r.name in self.pools:
                raise ConfigError(f"routes[{i}].name: {r.name!r} is already a model, pool or route name")
            targets = r.target_list
            for j, t in enumerate(targets):
                if t.model in self.pools:
                    continue
                try:
                    self._direct(t.model)
                except ModelNotFound:
                    raise ConfigError(f"routes[{i}].targets[{j}]: {t.model!r} is neither a configured model, a "
                                      "pool, nor <provider>/<model> of a configured provider") from None
            self.routes[r.name] = targets
        # Whether a request needs its route key: a route assigns by weight, or a pool by affinity.
        self.keyed = bool(self.pools) or any(t.weight > 0 for targets in self.routes.values() for t in targets)
        # The names whose targets include a pool: only their requests need a pool key.
        self.pooled = set(self.pools) | {name for name, targets in self.routes.items()
                                         if any(t.model in self.pools for t in targets)}
        self.connectivity = Connectivity({name: b.probe_address() for name, b in providers.items()},
                                         self.settings.offline_probe_interval_s)
        self.breakers: dict[str, Breaker] = {}
        # The breakers' clock (seconds, monotonic); tests set their own to pass cooldowns
        # (the pools' breakers and slow starts read it too).
        self.clock: Callable[[], float] = time.monotonic
        for pool in self.pools.values():
            pool.clock = lambda: self.clock()
            for replica in pool.replicas:
                self.breakers[replica.name] = replica.breaker
        # Called as on_skip(target, reason) for each target passed over (the metrics listen);
        # reason is one word: offline, circuit_open, timeout, network, busy, unavailable, error.
        self.on_skip: Callable[[str, str], None] | None = None
        # What a request becomes before it leaves the machine (the plugins' anyad_remote_request).
        self.outbound: Callable[[ChatRequest, Target], Awaitable[ChatRequest]] | None = None

    def _skip(self, skipped: list[str], target: Target, reason: str, text: str) -> None:
        skipped.append(f"{target.name}: {text}")
        if self.on_skip is not None:
            self.on_skip(target.name, reason)

    def _direct(self, name: str) -> Target:
        """The target ``name`` names (not a pool: ``_expand`` takes those)."""
        if name in self.local:
            return Target(name, self.local[name], name)
        provider, sep, model = name.partition("/")
        if sep and model and provider in self.providers:
            return Target(name, self.providers[provider], model)
        known = sorted([*self.local, *self.routes, *self.pools,
                        *(m.id for b in self.providers.values() for m in b.models())])
        raise ModelNotFound(f"The model '{name}' does not exist (served here: {', '.join(known) or 'none'}; "
                            f"remote providers take <provider>/<model>: {', '.join(self.providers) or 'none'})",
                            param="model")

    def _expand(self, name: str, pool_key: str | None) -> list[Target]:
        pool = self.pools.get(name)
        if pool is None:
            return [self._direct(name)]
        return [Target(r.name, r, pool.model, pooled=True) for r in pool.order(pool_key)]

    def resolve(self, name: str, route_key: str | None = None, pool_key: str | None = None) -> list[Target]:
        """The targets to try, in order. On a weighted route the first is the one assigned
        to ``route_key`` (the same key, the same target, while the weights stay); a pool
        becomes its replicas, in the order it gives for ``pool_key`` (else ``route_key``)."""
        targets = self.routes.get(name)
        pool_key = pool_key or route_key
        if targets is None:
            return self._expand(name, pool_key)
        order = [t.model for t in targets]
        total = sum(t.weight for t in targets)
        if total > 0:
            chosen = assign(name, route_key, targets, total)
            order.remove(chosen)
            order.insert(0, chosen)
        return [t for m in order for t in self._expand(m, pool_key)]

    def models(self) -> list[ModelInfo]:
        infos = [m for b in self.local.values() for m in b.models()]
        infos += [m for b in self.providers.values() for m in b.models()]
        infos += [ModelInfo(id=name, owned_by="anyad-route", created=0,
                            meta={"targets": [t.model if not t.weight else {"model": t.model, "weight": t.weight}
                                              for t in targets]})
                  for name, targets in self.routes.items()]
        infos += [pool.info() for pool in self.pools.values()]
        return infos

    def breaker(self, target: Target) -> Breaker:
        b = self.breakers.get(target.name)
        if b is None:
            b = self.breakers[target.name] = Breaker(self.settings.breaker_failures, self.settings.breaker_cooldown_s,
                                                     clock=lambda: self.clock())
        return b

    def _backoff(self, attempt: int, exc: AnyadError) -> float | None:
        """Seconds to wait before retrying the same target, or None to move on instead."""
        cap = self.settings.backoff_cap_s
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return float(retry_after) if retry_after <= cap else None
        return min(cap, self.settings.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)

    async def _attempt(self, target: Target, call: Callable[[Target], Awaitable[T]]) -> T:
        timeout = target.backend.first_byte_timeout_s
        if timeout is None:
            return await call(target)
        try:
            if _timeout is not None:  # no extra task per request, unlike wait_for
                async with _timeout(timeout):
                    return await call(target)
            return await asyncio.wait_for(call(target), timeout)
        except asyncio.TimeoutError:
            raise Timeout(f"{target.name} sent nothing within {timeout:g} s") from None

    async def _walk(self, name: str, call: Callable[[Target], Awaitable[T]], route_key: str | None = None,
                    targets: list[Target] | None = None) -> tuple[Target, T, list[str], Breaker | None]:
        """Try the targets of ``name`` (resolved here unless given) in order; the first success
        wins, client errors end the walk."""
        if targets is None:
            targets = self.resolve(name, route_key)
        skipped: list[str] = []
        last: AnyadError | None = None
        for target in targets:
            remote = target.backend.remote
            if remote and not target.pooled and self.connectivity.offline:
                self._skip(skipped, target, "offline", "offline")
                continue
            breaker = self.breaker(target) if remote else None
            if breaker is not None and not breaker.allow():
                self._skip(skipped, target, "circuit_open", "circuit open")
                continue
            attempts = 1 + (getattr(target.backend, "max_retries", 0) if remote else 0)
            for attempt in range(attempts):
                try:
                    result = await self._attempt(target, call)
                except AnyadError as exc:
                    if not exc.retryable:
                        if breaker is not None:
                            breaker.release()
                        self._annotate(exc, skipped)
                        raise
                    last = exc
                    if breaker is not None:
                        breaker.failure(exc.message)
                    retry = attempt + 1 < attempts and (breaker is None or breaker.state == "closed")
                    delay = self._backoff(attempt, exc) if retry else None
                    if delay is not None:
                        log.info("%s failed (%s); retrying in %.2f s", target.name, exc.message, delay)
                        await asyncio.sleep(delay)
                        continue
                    if remote and not target.pooled:
                        self._network_outcome(target, exc)
                    self._skip(skipped, target, _reason(exc), f"{exc.status} {exc.message}")
                    break
                except BaseException:
                    if breaker is not None:
                        breaker.release()
                    raise
                if breaker is not None:
                    breaker.success()
                if remote and not target.pooled:
                    self.connectivity.reached(_provider(target))
                if skipped:
                    log.info("request for %s answered by %s after: %s", name, target.name, "; ".join(skipped))
                return target, result, skipped, breaker
        if last is None:
            last = Unavailable(f"no target can answer {name!r} now: {'; '.join(skipped)}")
        self._annotate(last, skipped)
        raise last

    async def open(self, request: ChatRequest, targets: list[Target] | None = None) -> Opened:
        """Start the reply: returns once a target has produced its first chunk. ``targets``: the
        route as the caller resolved it already (``resolve``), so both see the same one."""

        async def start(target: Target) -> tuple[Chunk, ChunkStream]:
            outgoing = request
            if self.outbound is not None and target.backend.remote:
                outgoing = await self.outbound(request, target)
            stream = target.backend.chat(outgoing, target.model)
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                raise BackendError(f"{target.name} ended its reply before it began") from None
            except BaseException:
                await stream.aclose()
                raise
            return first, stream

        target, (first, stream), skipped, breaker = await self._walk(request.model, start, request.route_key,
                                                                     targets)
        return Opened(target, first, stream, skipped, breaker)

    async def count_tokens(self, request: ChatRequest) -> tuple[Target, int]:
        """The prompt's size as the route's first target that answers counts it."""
        target, result, _, _ = await self._walk(request.model, lambda t: t.backend.count_tokens(request, t.model),
                                                request.route_key)
        return target, result

    async def embed(self, model: str, inputs: list[str] | list[list[int]],
                    options: dict | None = None) -> tuple[Target, Embeddings, list[str]]:
        target, result, skipped, _ = await self._walk(model, lambda t: t.backend.embed(inputs, t.model, options))
        return target, result, skipped

    def _network_outcome(self, target: Target, exc: AnyadError) -> None:
        """What a remote target's failure says about the network, for offline detection."""
        if isinstance(exc, (ConnectionRefused, UpstreamError)):
            self.connectivity.reached(_provider(target))  # its host answered
        elif isinstance(exc, NetworkError):
            self.connectivity.not_reached(_provider(target), exc.message)
        # Anything else (a missing key, a first-byte timeout) says nothing either way.

    @staticmethod
    def _annotate(exc: AnyadError, skipped: list[str]) -> None:
        if skipped:
            exc.headers["X-Anyad-Fallback"] = fallback_header(skipped)

    def status(self) -> dict:
        return {"offline": self.connectivity.snapshot(),
                "breakers": {name: b.snapshot() for name, b in sorted(self.breakers.items())},
                "providers": {name: b.status() for name, b in sorted(self.providers.items())},
                "pools": {name: pool.status() for name, pool in sorted(self.pools.items())}}

    async def close(self) -> None:
        await self.connectivity.close()
