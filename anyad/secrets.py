"""Secret references → values, at the moment of use; never logged, never returned.

``env:VAR`` reads the environment, ``keyring:NAME`` the OS keyring (service
``anyad``), ``cred:NAME`` a systemd credential in ``$CREDENTIALS_DIRECTORY``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from anyad.errors import ConfigError

KEYRING_SERVICE = "anyad"
# The keyring cannot list what it holds, so the names (never the values) are kept in
# one more entry of the same service.
NAMES_ENTRY = "__anyad_secret_names__"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NO_BACKEND_HELP = ("no usable keyring backend here. On a desktop, unlock your keyring (Secret Service: "
                   "GNOME Keyring, KWallet). On a headless machine either run a Secret Service (apt-get install "
                   "gnome-keyring dbus, then inside dbus-run-session: gnome-keyring-daemon --unlock "
                   "--components=secrets) or install a file backend (pip install keyrings.alt) and choose it with "
                   "PYTHON_KEYRING_BACKEND=keyrings.alt.file.PlaintextKeyring; for the system service use "
                   'api_key = "cred:NAME" with systemd credentials instead')


def _keyring() -> Any:
    """The keyring module with a usable backend, or a ConfigError saying how to get one."""
    try:
        import keyring
        from keyring.backends import fail
    except ImportError:
        raise ConfigError("the keyring package is not installed") from None
    if isinstance(keyring.get_keyring(), fail.Keyring):
        raise ConfigError(NO_BACKEND_HELP)
    return keyring


def _names(kr: Any) -> list[str]:
    raw = kr.get_password(KEYRING_SERVICE, NAMES_ENTRY)
    try:
        return sorted(set(json.loads(raw))) if raw else []
    except ValueError:
        return []


def set_secret(name: str, value: str) -> None:
    if not NAME.match(name):
        raise ConfigError(f"secret name {name!r}: use 1-64 letters, digits, '_', '-' or '.'")
    if not value:
        raise ConfigError("the secret is empty; nothing was stored")
    kr = _keyring()
    try:
        kr.set_password(KEYRING_SERVICE, name, value)
        kr.set_password(KEYRING_SERVICE, NAMES_ENTRY, json.dumps(sorted({*_names(kr), name})))
    except Exception as exc:  # a locked or refusing backend: its message, never the value
        raise ConfigError(f"the keyring refused to store {name!r} ({type(exc).__name__})") from None


def delete_secret(name: str) -> bool:
    kr = _keyring()
    from keyring.errors import PasswordDeleteError

    names = _names(kr)
    try:
        kr.delete_password(KEYRING_SERVICE, name)
        found = True
    except PasswordDeleteError:
        found = False
    if name in names:
        kr.set_password(KEYRING_SERVICE, NAMES_ENTRY, json.dumps([n for n in names if n != name]))
        found = True
    return found


def list_secrets() -> list[str]:
    """The names of the stored secrets (never their values)."""
    return _names(_keyring())


def resolve(ref: str) -> str:
    scheme, _, name = ref.partition(":")
    if scheme == "env":
        value = os.environ.get(name)
        if not value:
            raise ConfigError(f"secret {ref}: environment variable {name} is not set")
        return value
    if scheme == "cred":
        base = os.environ.get("CREDENTIALS_DIRECTORY")
        if not base:
            raise ConfigError(f"secret {ref}: $CREDENTIALS_DIRECTORY is not set (is anyad running under systemd "
                              "with LoadCredential=?)")
        try:
            return (Path(base) / name).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"secret {ref}: cannot read credential {name}: {exc.strerror}") from None
    if scheme == "keyring":
        try:
            kr = _keyring()
        except ConfigError as exc:
            raise ConfigError(f"secret {ref}: {exc}") from None
        try:
            value = kr.get_password(KEYRING_SERVICE, name)
        except Exception as exc:  # a locked backend, D-Bus gone…: never a traceback, never the value
            raise ConfigError(f"secret {ref}: the keyring could not be read ({type(exc).__name__})") from None
        if value is None:
            raise ConfigError(f"secret {ref}: no such secret in the keyring (set it with: anyad secrets set {name})")
        return value
    raise ConfigError(f"secret reference {ref!r}: expected env:, keyring: or cred:")
