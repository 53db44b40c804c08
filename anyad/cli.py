"""The ``anyad`` command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from anyad import __version__
from anyad.errors import ConfigError

log = logging.getLogger("anyad")

SHUTDOWN_GRACE_S = 5.0


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


async def _serve(settings) -> int:
    from aiohttp import web

    from anyad.daemon import Daemon
    from anyad.server import build_app

    daemon = Daemon(settings)
    app = build_app(daemon)
    # handler_cancellation: a client that hangs up cancels its request, which
    # stops generation in the worker instead of finishing a reply nobody reads.
    # shutdown_timeout: on SIGTERM, replies in flight get a few seconds, then are cancelled
    # (which stops their generation), well inside systemd's stop timeout.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S)
    await runner.setup()
    host, port = settings.server.host, settings.server.port
    site = web.TCPSite(runner, host, port, backlog=1024)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    bound = site._server.sockets[0].getsockname()[:2] if site._server and site._server.sockets else (host, port)
    models = ", ".join(info.id for info in daemon.router.models()) or "none"
    log.info("anyad %s listening on http://%s:%s serving models: %s", __version__, bound[0], bound[1], models)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    log.info("stopped")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from anyad.config import load_settings

    try:
        settings = load_settings(args.config, host=args.host, port=args.port, model_paths=args.model)
    except ConfigError as exc:
        print(f"anyad: {exc}", file=sys.stderr)
        return 2
    _setup_logging(settings.server.log_level)
    try:
        import uvloop

        run = uvloop.run
    except ImportError:  # pragma: no cover - uvloop is optional outside Linux/macOS
        run = asyncio.run
    try:
        return run(_serve(settings))
    except ConfigError as exc:
        print(f"anyad: {exc}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
