"""``GET /metrics``: the daemon's numbers in Prometheus text, through prometheus-client.

Counters and histograms are updated as things happen (a few microseconds per request);
gauges (loaded models, queues, breakers, devices) are set when Prometheus scrapes, from
what the scrape hands in (the scheduler's snapshot, the devices, the breakers), so
nothing polls in between. Each daemon has its own registry,
so two in one process (the tests) never mix their numbers.

Label values that come from clients (model names) are capped: after ``MAX_LABEL_VALUES``
distinct ones the rest count as ``other``, so a client inventing names cannot grow the
daemon's memory for weeks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from anyad.timeline import Timeline

if TYPE_CHECKING:
    from anyad.pool import Pool
    from anyad.resources import Snapshot
    from anyad.scheduler import ModelView

MAX_LABEL_VALUES = 200
CONTENT_TYPE = CONTENT_TYPE_LATEST
# Chat replies take from milliseconds (cache hits) to minutes (long local generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, float("inf"))
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, float("inf"))
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf"))


class _Bounded:
    """Client-chosen label values, at most ``limit`` distinct ones."""

    def __init__(self, limit: int = MAX_LABEL_VALUES) -> None:
        self.seen: set[str] = set()
        self.limit = limit

    def __call__(self, value: str | None) -> str:
        if not value:
            return ""
        if value in self.seen:
            return value
        if len(self.seen) >= self.limit:
            return "other"
        self.seen.add(value)
        return value


class PoolCollector(Collector):
    """Each pool's replicas as they are at the scrape: their load, health and requests (the
    counts live on the replicas, which the balancer reads anyway)."""

    def __init__(self) -> None:
        self.pools: Callable[[], Mapping[str, "Pool"]] = dict

    def collect(self) -> Iterable[Any]:
        labels = ["pool", "replica"]
        outstanding = GaugeMetricFamily("anyad_pool_outstanding_requests", "Requests a replica is answering now",
                                        labels=labels)
        up = GaugeMetricFamily("anyad_pool_replica_up", "1 while a replica takes requests (healthy, listing "
                               "the model, breaker not open)", labels=labels)
        capacity = GaugeMetricFamily("anyad_pool_replica_capacity", "A replica's weight, ramped while it comes "
                                     "back (slow start)", labels=labels)
        served = CounterMetricFamily("anyad_pool_requests", "Requests sent to a replica", labels=labels)
        failed = CounterMetricFamily("anyad_pool_failures", "Requests a replica failed", labels=labels)
        for name, pool in self.pools().items():
            status = pool.status()["replicas"]
            for label, r in status.items():
                values = [name, label]
                outstanding.add_metric(values, r["outstanding"])
                up.add_metric(values, 1 if r["state"] == "up" else 0)
                capacity.add_metric(values, r["capacity"])
                served.add_metric(values, r["served"])
                failed.add_metric(values, r["failed"])
        return [outstanding, up, capacity, served, failed]


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=False)
        # The daemon points it at its pools (they change on reload).
        self.pool_collector = PoolCollector()
        r.register(self.pool_collector)
        self._model = _Bounded()
        self._backend = _Bounded()
        self.requests = Counter("anyad_requests", "HTTP requests answered",
                                ["endpoint", "model", "backend", "status"], registry=r)
        self.duration = Histogram("anyad_request_duration_seconds", "Time from request to the end of the reply",
                                  ["endpoint"], buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("anyad_time_to_first_token_seconds", "Time from request to the reply's first chunk",
                              ["backend"], buckets=TTFT_BUCKETS, registry=r)
        self.tokens = Counter("anyad_tokens", "Tokens processed, as the backends report them", ["kind"], registry=r)
        self.loads = Counter("anyad_model_loads", "Local model loads", ["model", "result"], registry=r)
        self.load_seconds = Histogram("anyad_model_load_seconds", "Time to load a local model", ["model"],
                                      buckets=LOAD_BUCKETS, registry=r)
        self.unloads = Counter("anyad_model_unloads", "Local model unloads", ["model", "reason"], registry=r)
        self.cache = Counter("anyad_cache_requests", "Chat requests by what the response cache did",
                             ["result"], registry=r)
        self.fallbacks = Counter("anyad_fallbacks", "Targets skipped on the way to an answer",
                                 ["from", "reason"], registry=r)
        self.loaded = Gauge("anyad_loaded_models", "Local models loaded now", registry=r)
        self.queue = Gauge("anyad_queue_depth", "Requests waiting for a model's slot", ["model"], registry=r)
        self.active = Gauge("anyad_active_requests", "Requests holding a model's slot", ["model"], registry=r)
        self.in_flight = Gauge("anyad_in_flight_requests", "HTTP requests being answered", registry=r)
        self.breaker = Gauge("anyad_breaker_open", "1 while a remote target's circuit breaker is open",
                             ["target"], registry=r)
        self.offline = Gauge("anyad_offline", "1 while the machine is believed offline", registry=r)
        self.ram_total = Gauge("anyad_ram_total_bytes", "RAM of the machine", registry=r)
        self.ram_available = Gauge("anyad_ram_available_bytes", "RAM available to new allocations", registry=r)
        self.gpu_total = Gauge("anyad_gpu_memory_total_bytes", "GPU memory", ["gpu", "name"], registry=r)
        self.gpu_used = Gauge("anyad_gpu_memory_used_bytes", "GPU memory in use (all processes)", ["gpu", "name"],
                              registry=r)
        self.gpu_util = Gauge("anyad_gpu_utilization_ratio", "GPU busy fraction over the last sample",
                              ["gpu", "name"], registry=r)
        # The dashboard's last hour, fed by the same calls.
        self.timeline = Timeline()
        self.model_memory = Gauge("anyad_model_memory_bytes", "Memory a loaded model holds (measured where the "
                                  "device says, else estimated)", ["model", "kind"], registry=r)

    # -- as things happen ---------------------------------------------------------------------

    def request(self, endpoint: str, model: str | None, backend: str | None, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, self._model(model), self._backend(backend), str(status)).inc()
        self.duration.labels(endpoint).observe(seconds)
        if model is not None:  # what used a model, not the probes and the dashboard's own reads
            self.timeline.request(status)

    def first_chunk(self, backend: str, seconds: float) -> None:
        self.ttft.labels(self._backend(backend)).observe(seconds)
        self.timeline.first_token(seconds)

    def usage(self, prompt_tokens: int | None, completion_tokens: int | None, model: str | None = None) -> None:
        if prompt_tokens:
            self.tokens.labels("prompt").inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels("completion").inc(completion_tokens)
            self.timeline.tokens(model, completion_tokens)

    def cache_result(self, result: str) -> None:
        self.cache.labels(result).inc()
        self.timeline.cache_result(result)

    def fallback(self, target: str, reason: str) -> None:
        self.fallbacks.labels(self._backend(target), reason).inc()
        self.timeline.mark("fallback", f"{target}: {reason}")

    def model_event(self, event: str, model: str, detail: dict[str, Any]) -> None:
        """A scheduler event (``anyad.scheduler.Scheduler.listeners``)."""
        if event in ("model.load", "model.unload", "model.load_failed"):
            self.timeline.mark(event, model)
        if event == "model.load":
            self.loads.labels(model, "ok").inc()
            self.load_seconds.labels(model).observe(detail["seconds"])
        elif event == "model.load_failed":
            self.loads.labels(model, "failed").inc()
        elif event == "model.unload":
            self.unloads.labels(model, detail.get("reason", "asked")).inc()

    # -- at scrape time -----------------------------------------------------------------------

    def render(self, models: Mapping[str, "ModelView"], devices: "Snapshot | None", breakers: Mapping[str, bool],
               offline: bool, in_flight: int) -> bytes:
        """The text exposition, with the gauges set from what is handed in: the local models
        (``Scheduler.snapshot(measure=True)``), the devices now, each remote target's breaker
        (True: open), whether the machine is offline, and the requests in flight."""
        snap = devices
        self.in_flight.set(in_flight)
        self.loaded.set(sum(1 for v in models.values() if v.loaded))
        for gauge in (self.queue, self.active, self.model_memory, self.breaker, self.gpu_total, self.gpu_used,
                      self.gpu_util):
            gauge.clear()  # labels of models or targets that are gone must go too
        for name, v in models.items():
            self.queue.labels(name).set(v.waiting)
            self.active.labels(name).set(v.active)
            if v.placement is not None and v.loaded:
                m = v.measured
                self.model_memory.labels(name, "ram").set((m and m.rss_bytes) or v.placement.ram_bytes)
                self.model_memory.labels(name, "vram").set((m and m.vram_bytes) or v.placement.vram_bytes)
        for target, is_open in breakers.items():
            self.breaker.labels(target).set(1 if is_open else 0)
        self.offline.set(1 if offline else 0)
        if snap is not None:
            self.ram_total.set(snap.ram_total_bytes)
            self.ram_available.set(snap.ram_available_bytes)
            for g in snap.gpus:
                labels = (str(g.index), g.name)
                self.gpu_total.labels(*labels).set(g.total_bytes)
                self.gpu_used.labels(*labels).set(g.used_bytes)
                if g.utilization_pct is not None:
                    self.gpu_util.labels(*labels).set(g.utilization_pct / 100.0)
        return generate_latest(self.registry)
