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
from typing import Any, ClassVar

from anyad.config import ModelDefaults, ModelSettings
from anyad.errors import ConfigError
from anyad.stream import ChatRequest, ChunkStream

ENTRY_POINT_GROUP = "anyad.backends"


@dataclass(slots=True)
class ModelInfo:
    id: str
    owned_by: str
    created: int
    meta: dict[str, Any] = field(default_factory=dict)


class Backend(abc.ABC):
    kind: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_settings(cls, model_id: str, settings: ModelSettings, defaults: ModelDefaults) -> "Backend":
        """Build from config; raise ConfigError for a setting or file that cannot work."""

    @abc.abstractmethod
    def models(self) -> list[ModelInfo]:
        """The model ids this backend answers for."""

    @abc.abstractmethod
    def chat(self, request: ChatRequest) -> ChunkStream:
        """Stream the reply; the last chunk carries ``finish_reason`` and ``usage``."""

    async def start(self) -> None:
        """Prepare at daemon start (e.g. preload a model); must not block the loop."""

    def ready(self) -> bool:
        """True when a request would be served without a load failure."""
        return True

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
