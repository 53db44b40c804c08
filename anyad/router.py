"""Model name → the backend that answers it.

Today a name maps to one configured model; fallback chains across backends
hang off this same lookup.
"""

from __future__ import annotations

from anyad.backend import Backend, ModelInfo
from anyad.errors import ModelNotFound


class Router:
    def __init__(self, backends: list[Backend]) -> None:
        self._by_model: dict[str, Backend] = {}
        self._infos: list[ModelInfo] = []
        for b in backends:
            for info in b.models():
                self._by_model[info.id] = b
                self._infos.append(info)

    def resolve(self, model: str) -> Backend:
        try:
            return self._by_model[model]
        except KeyError:
            known = ", ".join(sorted(self._by_model)) or "none"
            raise ModelNotFound(f"The model '{model}' does not exist (served here: {known})",
                                param="model") from None

    def models(self) -> list[ModelInfo]:
        return list(self._infos)
