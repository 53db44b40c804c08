"""Finding, enabling and calling plugins (the hooks are in ``anyad.hookspecs``).

Plugins come from the entry-point group ``anyad.plugins`` (name → module or object),
first-party ones included, and run only when named in ``[plugins] enabled``: installing
a package never changes what the daemon does by itself. pluggy registers them and
checks their hook signatures; the calls are made here, one implementation at a time,
so that one plugin's failure is contained (see ``anyad.hookspecs`` for what a failure
means per hook) and so that a request passes through the guards in turn.
"""

from __future__ import annotations

import inspect
import logging
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Callable

import pluggy

from anyad import hookspecs
from anyad.config import PluginsSettings
from anyad.errors import AnyadError, ConfigError, PluginError
from anyad.hookspecs import ExchangeRecord as ExchangeRecord  # it moved to the hooks' module; importable here too
from anyad.stream import ChatRequest, Chunk

log = logging.getLogger("anyad.plugins")

ENTRY_POINT_GROUP = "anyad.plugins"


def installed() -> list[EntryPoint]:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def describe(ep: EntryPoint) -> str:
    """The first line of the plugin's docstring (importing it), or why it cannot be imported."""
    try:
        obj = ep.load()
    except Exception as exc:
        return f"cannot be imported: {type(exc).__name__}: {exc}"
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


class Plugins:
    def __init__(self, settings: PluginsSettings) -> None:
        self.settings = settings
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        available = {ep.name: ep for ep in installed()}
        for name in settings.enabled:
            ep = available.get(name)
            if ep is None:
                raise ConfigError(f"plugins.enabled: no plugin {name!r} is installed (installed: "
                                  f"{', '.join(available) or 'none'}; see `anyad plugins`)")
            try:
                obj = ep.load()
                self.pm.register(obj, name=name)
                self.pm.check_pending()  # a hook with a misspelt name is an error, not silence
            except pluggy.PluginValidationError as exc:
                raise ConfigError(f"plugin {name!r} ({ep.value}) has a hook anyad does not know: {exc}") from None
            except Exception as exc:
                raise ConfigError(f"plugin {name!r} ({ep.value}) cannot be loaded: {type(exc).__name__}: {exc}") \
                    from None
        self._by_hook = {name: list(reversed(getattr(self.pm.hook, name).get_hookimpls()))
                         for name in dir(hookspecs) if name.startswith("anyad_")}
        # Whether anything implements the hooks called per request or per chunk: when
        # nothing does, the hot path pays one attribute read.
        self.before_request = bool(self._impls("anyad_before_request"))
        self.remote_request = bool(self._impls("anyad_remote_request"))
        self.stream_chunk = bool(self._impls("anyad_stream_chunk"))
        self.after_reply = bool(self._impls("anyad_after_reply"))

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    def options(self, name: str) -> dict[str, Any]:
        return self.settings.options(name)

    def _impls(self, hook: str) -> list[Any]:
        # pluggy's own order: the plugin registered last is called first.
        return self._by_hook[hook]

    @staticmethod
    def _call(impl: Any, kwargs: dict[str, Any]) -> Any:
        return impl.function(*[kwargs[a] for a in impl.argnames])

    # -- calling ------------------------------------------------------------------------------

    async def notify(self, hook: str, per_plugin: Callable[[str], dict[str, Any]] | None = None,
                     **kwargs: Any) -> None:
        """Call every implementation; a failure is logged and the rest still run."""
        for impl in self._impls(hook):
            try:
                args = {**kwargs, **per_plugin(impl.plugin_name)} if per_plugin else kwargs
                result = self._call(impl, args)
                if inspect.isawaitable(result):
                    await result
            except ConfigError:  # a plugin that cannot start as configured stops the start
                raise
            except Exception:
                log.exception("plugin %s failed in %s; going on without it", impl.plugin_name, hook)

    def register(self, hook: str, register: Callable[..., None]) -> None:
        """A registration hook (routes, backends), called once at start."""
        for impl in self._impls(hook):
            try:
                self._call(impl, {"register": register})
            except Exception as exc:
                raise ConfigError(f"plugin {impl.plugin_name!r} failed in {hook}: {type(exc).__name__}: {exc}") \
                    from None

    async def guard(self, hook: str, value: Any, name: str, **kwargs: Any) -> Any:
        """Pass ``value`` (under the argument ``name``) through each implementation in turn;
        each may return a replacement. An ``AnyadError`` is a refusal and goes to the
        client; any other failure fails the request with a 500 (a guard must not fail open)."""
        for impl in self._impls(hook):
            try:
                result = self._call(impl, {**kwargs, name: value})
                if inspect.isawaitable(result):
                    result = await result
            except AnyadError:
                raise
            except Exception as exc:
                log.exception("plugin %s failed in %s; the request is refused", impl.plugin_name, hook)
                raise PluginError(f"plugin {impl.plugin_name!r} failed while checking this request "
                                  f"({type(exc).__name__}); see the daemon's log") from None
            if result is not None:
                value = result
        return value

    def chunk(self, chunk: Chunk, request: ChatRequest, backend: str) -> Chunk:
        """``anyad_stream_chunk``, synchronous: it runs per token."""
        for impl in self._impls("anyad_stream_chunk"):
            try:
                result = self._call(impl, {"chunk": chunk, "request": request, "backend": backend})
            except Exception:
                log.exception("plugin %s failed in anyad_stream_chunk; the chunk goes on unchanged",
                              impl.plugin_name)
                continue
            if isinstance(result, Chunk):
                chunk = result
        return chunk
