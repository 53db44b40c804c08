"""What every ``anyad`` command does around its own work, in one place (the commands'
prologue): exit codes and the one way to say an error, the settings, where the data
lives, and how a command reaches the running daemon.

A command that cannot go on raises ``Exit``; ``anyad.cli.main`` says its message
(``anyad: …`` on standard error) and exits with its code.

Commands that ask the daemon (``anyad status``, ``anyad models list``) find it at the
address from the settings (``--host``/``--port`` override), send the API key from
``--api-key`` or ``$ANYAD_API_KEY`` as ``Authorization: Bearer``, and say a refusal for
what it is: a daemon that answers 401 or 403 is there, it wants a (different) key.

The command modules import this one and the layers below it, never ``anyad.cli`` itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from anyad import __version__
from anyad.errors import ConfigError
from anyad.store import DB_NAME

if TYPE_CHECKING:
    from anyad.config import Settings

# Exit codes, the same for every command.
OK = 0
FAILED = 1  # it could not be done: nothing there, a file or a daemon that refused
USAGE = 2  # a config that cannot be used, arguments that do not fit, a confirmation not given
INTERRUPTED = 130  # stopped with Ctrl-C


class Exit(Exception):
    """Ends a command: ``main`` says ``anyad: MESSAGE`` on stderr (when there is one) and
    exits with ``code``."""

    def __init__(self, code: int, message: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error(message: str) -> None:
    """Say what went wrong, the one way every command does: ``anyad: MESSAGE`` on stderr."""
    print(f"anyad: {message}", file=sys.stderr)


def fail(message: str, code: int = FAILED) -> int:
    """Say what went wrong; the exit code, for ``return fail(...)``."""
    error(message)
    return code


def run(args: argparse.Namespace) -> int:
    """The command the arguments name, its ``Exit`` turned into its message and code."""
    try:
        return args.func(args)
    except Exit as exc:
        if exc.message:
            error(exc.message)
        return exc.code


def add_config(p: argparse.ArgumentParser, help: str = "config file, to find the data directory") -> None:
    p.add_argument("--config", help=help)


def load(config: str | None, **overrides: Any) -> "Settings":
    """The command's settings (``--config`` and ``overrides``); a config that cannot be used
    ends the command with exit 2, saying why."""
    from anyad.config import load_settings

    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        raise Exit(USAGE, str(exc)) from None


def database(settings: "Settings") -> Path:
    """The database file, ``anyad.db`` in the data directory."""
    return settings.resolved_data_dir / DB_NAME


# -- the running daemon ----------------------------------------------------------------------

API_KEY_ENV = "ANYAD_API_KEY"
TIMEOUT_S = 10.0


class DaemonError(Exception):
    """A daemon that cannot be asked; the message says why and what to do."""


class NoDaemon(DaemonError):
    """Nothing answers at the address."""


def add_daemon_arguments(p: argparse.ArgumentParser) -> None:
    """The options every command that talks to the daemon takes."""
    p.add_argument("--host", help="the daemon's address (default from the config, else 127.0.0.1)")
    p.add_argument("--port", type=int, help="the daemon's port (default from the config, else 2692)")
    p.add_argument("--api-key", help=f"the key to send the daemon (default ${API_KEY_ENV}, which other users cannot "
                                     "see in the process list as they can a flag)")


def api_key(args: argparse.Namespace) -> str | None:
    """The flag's key, else the environment's; None when neither is set."""
    return getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None


def base_url(settings: "Settings") -> str:
    host = settings.server.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # a wildcard bind is reachable on loopback
    return f"http://{'[' + host + ']' if ':' in host else host}:{settings.server.port}"


# The daemon is on this machine: never through $http_proxy, which would see the API key.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get_json(settings: "Settings", path: str, key: str | None) -> Any:
    """GET ``path`` from the daemon and decode its JSON; every failure is a DaemonError."""
    base = base_url(settings)
    headers = {"User-Agent": f"anyad/{__version__}", "Accept": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(base + path, headers=headers)
    try:
        with _DIRECT.open(req, timeout=TIMEOUT_S) as r:
            body = r.read()
    except urllib.error.HTTPError as exc:  # before URLError: it is one, but a daemon did answer
        raise _refusal(base, path, exc, key) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise NoDaemon(f"no daemon answers at {base} ({reason}); is `anyad serve` running?") from None
    try:
        return json.loads(body)
    except ValueError:
        raise DaemonError(f"{base}{path} did not answer with JSON; is it an anyad daemon?") from None


def _refusal(base: str, path: str, exc: urllib.error.HTTPError, key: str | None) -> DaemonError:
    with exc:
        message = _error_message(exc.read())
    if exc.code == 401:
        if key:
            return DaemonError(f"the daemon at {base} refused the API key (unknown, revoked or expired): "
                               f"pass another with --api-key or ${API_KEY_ENV}")
        return DaemonError(f"the daemon at {base} needs an API key: pass --api-key or set {API_KEY_ENV}")
    if exc.code == 403:
        return DaemonError(f"the API key lacks the role for {path} at {base}"
                           + (f": {message}" if message else ""))
    return DaemonError(f"the daemon at {base} answered {exc.code} {exc.reason} for {path}"
                       + (f": {message}" if message else ""))


def _error_message(body: bytes) -> str | None:
    """The message of an error in OpenAI's shape, if the body is one."""
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return None
    return message if isinstance(message, str) else None
