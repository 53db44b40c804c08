"""The ``anyad`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any, Callable

from anyad import __version__
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


def settings_or_report(config: str | None, **overrides: Any) -> "Settings | None":
    """The settings for a command, or None after saying on stderr why there are none."""
    from anyad.config import load_settings

    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        print(f"anyad: {exc}", file=sys.stderr)
        return None


def cmd_serve(args: argparse.Namespace) -> int:
    from anyad.config import load_settings
    from anyad.logs import setup_logging

    def load() -> "Settings":
        return load_settings(args.config, host=args.host, port=args.port, model_paths=args.model)

    settings = settings_or_report(args.config, host=args.host, port=args.port, model_paths=args.model)
    if settings is None:
        return 2
    setup_logging(settings.server.log_level)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional outside Linux/macOS
        run = asyncio.run
    try:
        return run(_serve(settings, load))
    except ConfigError as exc:
        print(f"anyad: {exc}", file=sys.stderr)
        return 2


def cmd_status(args: argparse.Namespace) -> int:
    import json

    from anyad.daemon_client import DaemonError, api_key, get_json
    from anyad.status_table import render

    settings = settings_or_report(args.config, host=args.host, port=args.port)
    if settings is None:
        return 2
    try:
        status = get_json(settings, "/api/status", api_key(args))
    except DaemonError as exc:
        print(f"anyad: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(status, indent=2) + "\n" if args.json else render(status))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from anyad.daemon_client import add_arguments as add_daemon_arguments

    p = argparse.ArgumentParser(prog="anyad", description="Local-LLM gateway with an OpenAI-compatible API.")
    p.add_argument("--version", action="version", version=f"anyad {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the daemon")
    s.add_argument("--config", help="config file (default: $ANYAD_CONFIG, $XDG_CONFIG_HOME/anyad/config.toml, "
                                    "/etc/anyad/config.toml)")
    s.add_argument("--host", help="address to bind (default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port to bind (default 2692)")
    s.add_argument("--model", action="append", metavar="PATH.gguf",
                   help="serve this GGUF file (model id = file stem); may be repeated")
    s.set_defaults(func=cmd_serve)
    st = sub.add_parser("status", help="show the running daemon's devices, models and queues")
    st.add_argument("--config", help="config file, to find the daemon's address")
    add_daemon_arguments(st)
    st.add_argument("--json", action="store_true", help="print /api/status as JSON")
    st.set_defaults(func=cmd_status)
    from anyad.history_cli import add_parser as add_history

    add_history(sub)
    from anyad.secrets_cli import add_parser as add_secrets

    add_secrets(sub)
    from anyad.models_cli import add_parser as add_models

    add_models(sub)
    from anyad.audit_cli import add_parser as add_audit

    add_audit(sub)
    from anyad.install_service import add_parser as add_install_service

    add_install_service(sub)
    from anyad.plugins_cli import add_parser as add_plugins

    add_plugins(sub)
    from anyad.pull_cli import add_parser as add_pull

    add_pull(sub)
    from anyad.keys_cli import add_parser as add_keys

    add_keys(sub)
    from anyad.usage_cli import add_parser as add_usage

    add_usage(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
