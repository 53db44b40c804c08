"""``anyad serve``: run the daemon until SIGTERM/SIGINT, then drain; SIGHUP re-reads the config."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from typing import TYPE_CHECKING, Any, Callable, Coroutine

from anyad import __version__
from anyad.cli.common import USAGE, fail, load
from anyad.errors import ConfigError

if TYPE_CHECKING:
    from anyad.config import Settings

log = logging.getLogger("anyad")

# After the drain's grace period, how long aiohttp gives what is left before cancelling it.
CUT_OFF_S = 1.0


async def _serve(settings: "Settings", load: Callable[[], "Settings"]) -> int:
    """Listen until SIGTERM/SIGINT, then drain; SIGHUP re-reads the config with ``load``."""
    from anyad.access import check_bind
    from anyad.daemon import Daemon
    from anyad.listen import listen, raise_open_file_limit
    from anyad.sdnotify import Notifier
    from anyad.server import build_app

    check_bind(settings.server, bool(settings.keys))
    raise_open_file_limit()  # before any listener starts (plugins' too): their caps follow from it
    notifier = Notifier()
    daemon = Daemon(settings)
    daemon.load_settings = load
    runner, bound = await listen(build_app(daemon), settings.server.host, settings.server.port, settings.server,
                                 shutdown_timeout=CUT_OFF_S)

    loop = asyncio.get_running_loop()
    stop, now = asyncio.Event(), asyncio.Event()

    def on_stop() -> None:
        if stop.is_set():  # a second signal: no more waiting
            log.info("stopping now")
            now.set()
        stop.set()

    background: set[asyncio.Task[Any]] = set()

    def spawn(coro: Any) -> None:
        task = loop.create_task(coro)
        background.add(task)
        task.add_done_callback(background.discard)

    async def reload() -> None:
        notifier.reloading()
        ok = await daemon.reload_from(load, actor="signal:SIGHUP")
        notifier.ready(_status(daemon, "reloaded" if ok else "reload refused (see the log)"))

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: spawn(reload()))
    models = ", ".join(info.id for info in daemon.router.models()) or "none"
    log.info("anyad %s listening on http://%s:%s serving models: %s", __version__, bound[0], bound[1], models)

    async def announce() -> None:
        if daemon.preloaded is not None:
            await asyncio.shield(daemon.preloaded)
        notifier.ready(_status(daemon, f"listening on {bound[0]}:{bound[1]}"))

    spawn(announce())
    spawn(notifier.watchdog())
    await stop.wait()
    daemon.draining = True  # from this moment on: no request is admitted that the drain would not wait for
    notifier.stopping()
    log.info("shutting down")
    drain = loop.create_task(daemon.drain(daemon.settings.server.shutdown_grace_s if not now.is_set() else 0))
    cut = loop.create_task(now.wait())
    await asyncio.wait([drain, cut], return_when=asyncio.FIRST_COMPLETED)
    cut.cancel()
    for task in list(background):
        task.cancel()
    await runner.cleanup()  # cancels what is left, closes the daemon: workers stopped, database flushed
    notifier.close()
    log.info("stopped")
    return 0


def _status(daemon: Any, what: str) -> str:
    ok, models = daemon.ready()
    return f"{what}; models ready: {sum(models.values())} of {len(models)}"


def cmd_serve(args: argparse.Namespace) -> int:
    from anyad.config import load_settings
    from anyad.logs import setup_logging

    def reload() -> "Settings":
        return load_settings(args.config, host=args.host, port=args.port, model_paths=args.model)

    settings = load(args.config, host=args.host, port=args.port, model_paths=args.model)
    setup_logging(settings.server.log_level)
    run: Callable[[Coroutine[Any, Any, int]], int]
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional outside Linux/macOS
        run = asyncio.run
    try:
        return run(_serve(settings, reload))
    except ConfigError as exc:
        return fail(str(exc), USAGE)


def add_parser(sub: Any) -> None:
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="config file (default: $ANYAD_CONFIG, $XDG_CONFIG_HOME/anyad/config.toml, "
                                    "/etc/anyad/config.toml)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to bind (default 2692)")
    s.add_argument("--model", action="append", metavar="PATH.gguf",
                   help="serve this GGUF file (model id = file stem); may be repeated")
    s.set_defaults(func=cmd_serve)
