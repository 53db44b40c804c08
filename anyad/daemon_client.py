"""How client commands (``anyad status``, ``anyad models list``) reach the running daemon.

One function asks it: the address from the settings (``--host``/``--port`` override),
the API key from ``--api-key`` or ``$ANYAD_API_KEY`` sent as ``Authorization: Bearer``,
and a refusal said for what it is: a daemon that answers 401 or 403 is there, it wants
a (different) key.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from anyad import __version__

if TYPE_CHECKING:
    from anyad.config import Settings

API_KEY_ENV = "ANYAD_API_KEY"
TIMEOUT_S = 10.0


class DaemonError(Exception):
    """A daemon that cannot be asked; the message says why and what to do."""


class NoDaemon(DaemonError):
    """Nothing answers at the address."""


def add_arguments(p: argparse.ArgumentParser) -> None:
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
