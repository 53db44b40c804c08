"""What every backend is, and how the core finds them.

A backend talks to one kind of engine or provider and answers a ``ChatRequest``
with a stream of ``Chunk``. It knows nothing of HTTP, history or the cache.
Backends are found through the entry-point group ``anyad.backends`` (name →
class), so a third-party package adds one exactly as the first-party ones do.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from anyad.config import ModelDefaults, ModelSettings, ProviderSettings
from anyad.errors import ConfigError, InvalidRequest
from anyad.stream import ChatRequest, ChunkStream

if TYPE_CHECKING:
    from anyad.scheduler import Scheduler

ENTRY_POINT_GROUP = "anyad.backends"


@dataclass(slots=True)
class ModelInfo:
    id: str
    owned_by: str
    created: int
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Embeddings:
    vectors: list[list[float]]
    prompt_tokens: int


class Backend(abc.ABC):
    kind: ClassVar[str]
    # Remote backends get circuit breakers, first-byte timeouts and offline detection.
    remote: ClassVar[bool] = False
    first_byte_timeout_s: float | None = None

    @classmethod
    def from_model(cls, model_id: str, settings: ModelSettings, defaults: ModelDefaults,
                   scheduler: "Scheduler", *, data_dir: Path | None = None) -> "Backend":
        """Build for one local model file; raise ConfigError for a setting or file that cannot work.
        ``data_dir``: the daemon's data directory, where a backend may keep files of its own
        (each in a folder named for the backend).

        A backend that holds memory registers its model with ``scheduler`` and asks it
        (``scheduler.use``) before each request, so that loading, unloading and queueing
        are decided in one place.
        """
        raise ConfigError(f"backend {cls.kind!r} does not run local model files")

    @classmethod
    def from_provider(cls, name: str, settings: ProviderSettings) -> "Backend":
        """Build for one remote provider, serving the models addressed as ``name/<model>``."""
        raise ConfigError(f"backend {cls.kind!r} is not a remote provider")

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """The model ids this backend lists in /v1/models."""

    @abc.abstractmethod
    def chat(self, request: ChatRequest, model: str) -> ChunkStream:
        """Stream the reply of ``model`` (the backend's own name for it).

        The last chunk with ``finish_reason`` may be followed by one carrying the usage.
        Errors before the first chunk are ``AnyadError``s the router may fall back on.
        """

    async def embed(self, inputs: list[str] | list[list[int]], model: str,
                    options: dict[str, Any] | None = None) -> "Embeddings":
        """One vector per input, in order. ``options``: further request fields (dimensions, user)."""
        raise InvalidRequest(f"{self.kind} models do not make embeddings", param="model")

    async def count_tokens(self, request: ChatRequest, model: str) -> int:
        """The prompt tokens ``request`` would cost, its tools included, without running it."""
        raise InvalidRequest(f"{self.kind} models cannot count tokens without answering", param="model")

    async def start(self) -> None:
        """Prepare at daemon start (e.g. preload a model); must not block the loop."""

    def ready(self) -> bool:
        """True when a request would be served without a load failure."""
        return True

    def identity(self, model: str) -> str:
        """What answers for ``model``, precisely enough that a change means other answers
        (the response cache keys on it)."""
        return f"{self.kind}:{getattr(self, 'name', '')}:{model}"

    def probe_address(self) -> tuple[str, int] | None:
        """Where a remote backend's network is, for the offline probe."""
        return None

    def status(self) -> dict[str, Any]:
        return {}

    async def close(self) -> None:
        """Release everything: processes, sessions."""


def backend_class(kind: str) -> type[Backend]:
    eps = entry_points(group=ENTRY_POINT_GROUP)
    for ep in eps:
        if ep.name == kind:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Backend)):
                raise ConfigError(f"entry point {ep.value} for backend {kind!r} is not an anyad Backend")
            return cls
    known = ", ".join(sorted(ep.name for ep in eps)) or "none installed"
    raise ConfigError(f"unknown backend {kind!r} (installed: {known})")
