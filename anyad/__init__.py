"""anyad: a local-LLM gateway daemon with an OpenAI-compatible API."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # ``anyad.hookimpl`` for plugins, imported only when asked for: model workers import
    # this package too, and start faster without pluggy.
    if name == "hookimpl":
        from anyad.hookspecs import hookimpl

        return hookimpl
    raise AttributeError(f"module 'anyad' has no attribute {name!r}")
