"""Pools: several endpoints serving one model (vLLM, SGLang, llama-server, other anyad
daemons), as one target.

A pool orders its replicas for each request and the router walks that order as it walks
a route, so per-replica breakers, retries on the next replica (a non-streamed request
whose replica dies is answered by another) and fallback past the pool all come from the
router. What the pool owns is the order:

- **Affinity.** A request's key (its conversation, else the prompt's
  leading messages hashed) has a home replica, where its prefix sits in the KV cache. A
  new key's home is its first choice in rendezvous (HRW) hashing whose share of homes is
  within ``1 + HOME_SLACK`` of its capacity's share (consistent hashing with bounded
  loads, applied to homes, so conversations spread evenly however the hash falls).
- **Bounded load.** A request goes to its home unless the home is unhealthy or has more
  outstanding requests than ``(1 + load_slack)`` times its share of all outstanding ones;
  then it goes to the least loaded replica for now, and comes back home once that holds
  again (the home is not moved).
- **Health.** An active check (``/health`` on the replica's origin, or its ``/models``)
  every ``health_interval_s``; its ``/models`` also says which models it serves, and a
  replica that stops listing the pool's model gets no traffic. A replica that comes back
  (its check passes again, its breaker closes) takes its share in ``slow_start_s``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
from yarl import URL

from anyad.backend import Backend, Embeddings, ModelInfo
from anyad.breaker import Breaker
from anyad.config import PoolSettings, ProviderSettings, RouterSettings
from anyad.errors import AnyadError
from anyad.http_client import RemoteBackend
from anyad.stream import ChatRequest, ChunkStream, content_text

log = logging.getLogger("anyad.pool")

HOME_SLACK = 0.05  # how far a replica's share of homes may go past its capacity's share
MAX_HOMES = 100_000  # keys remembered per pool (least recently used forgotten first)
MODELS_EVERY = 12  # health checks between two reads of a replica's /models
RAMP_FLOOR = 0.1  # a replica just back takes this fraction of its share at first
PROMPT_KEY_CHARS = 4096


def prompt_key(messages: list[dict[str, Any]]) -> str:
    """A conversation's key when it names none: its messages up to the first user message
    (the system prompt and the opening question stay the same on every later turn)."""
    h = hashlib.blake2b(digest_size=16)
    size = 0
    for m in messages:
        text = f"{m.get('role')}\0{content_text(m.get('content'))}\0"
        h.update(text[:PROMPT_KEY_CHARS - size].encode())
        size += len(text)
        if m.get("role") == "user" or size >= PROMPT_KEY_CHARS:
            break
    return "prompt:" + h.hexdigest()


def _score(key: str, label: str, weight: float) -> float:
    """Weighted rendezvous hashing: the replica with the highest score is the key's first choice."""
    digest = hashlib.blake2b(f"{key}\0{label}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2 ** 64 + 2)  # in (0, 1)
    return -weight / math.log(u)


class Replica(Backend):
    """One endpoint of a pool: the provider backend that talks to it, with its load counted."""

    kind = "replica"
    remote = True

    def __init__(self, pool: str, label: str, inner: Backend, weight: float, identity: str,
                 breaker: Breaker) -> None:
        self.pool = pool
        self.label = label
        self.name = f"{pool}@{label}"
        self.inner = inner
        self.weight = weight
        self._identity = identity
        self.first_byte_timeout_s = inner.first_byte_timeout_s
        self.max_retries = 0  # the next replica is the retry
        self.outstanding = 0
        self.served = 0
        self.failed = 0
        self.healthy = True
        self.health_error: str | None = None
        self.has_model: bool | None = None  # None: its /models did not say
        self.listed: list[str] = []  # the models its /models lists
        self.back_at: float | None = None  # when it last came back; None: in service since the start
        self.breaker = breaker
        self.ejected = False  # its breaker was not closed when last looked at

    def models(self) -> list[ModelInfo]:
        return []

    async def chat(self, request: ChatRequest, model: str) -> ChunkStream:
        self.outstanding += 1
        self.served += 1
        try:
            async for chunk in self.inner.chat(request, model):
                yield chunk
        except Exception:
            self.failed += 1
            raise
        finally:
            self.outstanding -= 1

    async def embed(self, inputs: list[str] | list[list[int]], model: str,
                    options: dict[str, Any] | None = None) -> Embeddings:
        self.outstanding += 1
        self.served += 1
        try:
            return await self.inner.embed(inputs, model, options)
        except Exception:
            self.failed += 1
            raise
        finally:
            self.outstanding -= 1

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        return await self.inner.count_tokens(request, model)

    def identity(self, model: str) -> str:
        # Every replica serves the same model: the cache keys on the pool, not on who answered.
        return self._identity

    def probe_address(self) -> tuple[str, int] | None:
        return None

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Pool:
    name: str
    settings: PoolSettings
    replicas: list[Replica]
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    homes: OrderedDict[str, str] = field(default_factory=OrderedDict, repr=False)
    home_counts: dict[str, int] = field(default_factory=dict)
    _turn: int = 0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)
    _checks: int = 0

    @property
    def model(self) -> str:
        return self.settings.model or self.name

    # -- the order --------------------------------------------------------------------------

    def usable(self, r: Replica) -> bool:
        return r.healthy and r.has_model is not False and not r.breaker.blocked()

    def _capacity(self, r: Replica, now: float) -> float:
        """Its weight, ramped up while it comes back."""
        if r.back_at is None or self.settings.slow_start_s <= 0:
            return r.weight
        ramp = (now - r.back_at) / self.settings.slow_start_s
        if ramp >= 1:
            r.back_at = None
            return r.weight
        return r.weight * max(RAMP_FLOOR, ramp)

    def _notice_breakers(self, now: float) -> None:
        """A replica whose breaker was open and has closed came back: it starts slowly."""
        for r in self.replicas:
            ejected = r.breaker.state != "closed"
            if r.ejected and not ejected:
                r.back_at = now
            r.ejected = ejected

    def order(self, key: str | None) -> list[Replica]:
        """The replicas to try for a request with ``key``, best first; those out of service
        last (the router's breakers skip the ejected ones at once). A replica that does not
        list the model is not tried at all: it would answer 404, which ends a walk."""
        now = self.clock()
        self._notice_breakers(now)
        serving = [r for r in self.replicas if r.has_model is not False]
        usable = [r for r in serving if self.usable(r)]
        if not usable:
            return sorted(serving, key=lambda r: r.outstanding)
        caps = {r.label: self._capacity(r, now) for r in usable}
        total_cap = sum(caps.values())
        total_load = sum(r.outstanding for r in usable)

        def load(r: Replica) -> float:
            return (r.outstanding + 1) / caps[r.label]

        self._turn += 1
        turn = self._turn
        by_load = sorted(usable, key=lambda r: (load(r), (self.replicas.index(r) - turn) % len(self.replicas)))
        first = by_load[0]
        if key is not None and self.settings.affinity:
            home = self._home(key, usable, caps, total_cap)
            bound = math.ceil((1 + self.settings.load_slack) * (total_load + 1) * caps[home.label] / total_cap)
            if home.outstanding + 1 <= bound:
                first = home
        rest = [r for r in by_load if r is not first]
        out = [r for r in serving if r not in usable]
        return [first, *rest, *out]

    def _home(self, key: str, usable: list[Replica], caps: dict[str, float], total_cap: float) -> Replica:
        label = self.homes.get(key)
        if label is not None:
            self.homes.move_to_end(key)
            for r in usable:
                if r.label == label:
                    return r
            # Its home is out of service: a stand-in for now, by the same rule as a new key,
            # without moving the home (it comes back when its home does).
        ranked = sorted(usable, key=lambda r: _score(key, r.label, r.weight), reverse=True)
        homes = sum(self.home_counts.get(r.label, 0) for r in usable) + 1
        chosen = ranked[0]
        for r in ranked:
            if self.home_counts.get(r.label, 0) + 1 <= math.ceil((1 + HOME_SLACK) * homes * caps[r.label] / total_cap):
                chosen = r
                break
        if label is None:
            self.homes[key] = chosen.label
            self.home_counts[chosen.label] = self.home_counts.get(chosen.label, 0) + 1
            if len(self.homes) > MAX_HOMES:
                _, gone = self.homes.popitem(last=False)
                self.home_counts[gone] -= 1
        return chosen

    # -- health -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self.settings.health_check != "off" and self._task is None:
            self._task = asyncio.create_task(self._watch(), name=f"pool-{self.name}-health")

    async def stop_watching(self) -> None:
        """No more health checks (a reload replaced it; its requests in flight finish)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _watch(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a check must never end the watch
                log.exception("pool %s: health check failed unexpectedly", self.name)
            await asyncio.sleep(self.settings.health_interval_s)

    async def check(self) -> None:
        """Check every replica once, now (the watch calls it; so may a test)."""
        models_too = self._checks % MODELS_EVERY == 0
        self._checks += 1
        await asyncio.gather(*(self._check(r, models_too) for r in self.replicas))

    async def _check(self, r: Replica, models_too: bool) -> None:
        inner = r.inner
        if not isinstance(inner, RemoteBackend):
            return
        s, client = self.settings, inner.client
        ok, why = True, None
        try:
            headers = await inner.headers()
            if s.health_check == "health":
                status, _ = await client.get(str(URL(client.base_url).origin() / "health"), s.health_timeout_s,
                                             headers)
                ok, why = status == 200, f"/health answered {status}"
            if ok and (models_too or s.health_check == "models" or not r.healthy):
                try:
                    self._read_models(r, await client.model_ids(s.health_timeout_s, headers))
                except ValueError as exc:
                    if s.health_check == "models":
                        raise
                    log.debug("pool %s: %s: %s", self.name, r.label, exc)
        except AnyadError as exc:  # its key cannot be read
            ok, why = False, exc.message
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as exc:
            ok, why = False, f"{type(exc).__name__}: {exc}"[:200]
        if ok and not r.healthy:
            log.info("pool %s: %s is healthy again", self.name, r.label)
            r.back_at = self.clock()
        elif not ok and r.healthy:
            log.warning("pool %s: %s failed its health check: %s", self.name, r.label, why)
        r.healthy, r.health_error = ok, None if ok else why

    def _read_models(self, r: Replica, listed: list[str]) -> None:
        r.listed = listed
        had = r.has_model
        r.has_model = self.model in r.listed
        if had is not False and r.has_model is False:
            log.warning("pool %s: %s does not list %r (it lists %s); it gets no requests", self.name, r.label,
                        self.model, ", ".join(r.listed[:10]) or "nothing")

    # -- what it shows ----------------------------------------------------------------------

    def info(self) -> ModelInfo:
        return ModelInfo(id=self.name, owned_by="anyad-pool", created=0,
                         meta={"replicas": [r.label for r in self.replicas]})

    def status(self) -> dict[str, Any]:
        now = self.clock()
        served = sum(r.served for r in self.replicas) or 1
        return {"model": self.model, "replicas": {r.label: {
            "state": "up" if self.usable(r) else "down", "healthy": r.healthy, "health_error": r.health_error,
            "serves_model": r.has_model, "outstanding": r.outstanding, "served": r.served, "failed": r.failed,
            "share": round(r.served / served, 4), "weight": r.weight,
            "capacity": round(self._capacity(r, now), 3),
            "breaker": r.breaker.state} for r in self.replicas},
            "conversations": len(self.homes)}

    async def close(self) -> None:
        await self.stop_watching()
        await asyncio.gather(*(r.close() for r in self.replicas), return_exceptions=True)


def build(name: str, settings: PoolSettings, router: RouterSettings,
          backend_class: Callable[[str], type[Backend]]) -> Pool:
    """A pool and its replicas (one provider backend each, behind a breaker of its own), not
    started; the router that serves it sets its clock."""
    replicas: list[Replica] = []
    identity = f"pool:{name}:{settings.model or name}"
    for i, rs in enumerate(settings.replicas):
        label = rs.label
        ps = ProviderSettings(backend=settings.backend, base_url=rs.base_url,
                              api_key=rs.api_key if rs.api_key is not None else settings.api_key,
                              headers={**settings.headers, **rs.headers}, connect_timeout_s=settings.connect_timeout_s,
                              first_byte_timeout_s=settings.first_byte_timeout_s,
                              read_timeout_s=settings.read_timeout_s, max_retries=0, prices=settings.prices)
        inner = backend_class(settings.backend).from_provider(f"{name}@{label}", ps)
        breaker = Breaker(router.breaker_failures, router.breaker_cooldown_s)
        replicas.append(Replica(name, label, inner, rs.weight, identity, breaker))
    pool = Pool(name, settings, replicas)
    for r in replicas:  # the pool's clock, whichever it is by then (a router sets its own)
        r.breaker.clock = lambda: pool.clock()
    return pool

