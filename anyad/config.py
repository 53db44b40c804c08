"""The one place that reads configuration: TOML file → validated settings.

Search order: ``--config``, ``$ANYAD_CONFIG``, ``$XDG_CONFIG_HOME/anyad/config.toml``,
``/etc/anyad/config.toml``. ``ANYAD_HOST``, ``ANYAD_PORT`` and ``ANYAD_DATA_DIR``
override the file; command-line flags override both. Every failure becomes a
``ConfigError`` whose message names the file and the key path.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from anyad.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2692
SYSTEM_CONFIG = Path("/etc/anyad/config.toml")


class _Strict(BaseModel):
    # A typo in a key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class ModelDefaults(_Strict):
    max_context: int = Field(8192, ge=16)
    queue_size: int = Field(16, ge=0)
    load_timeout_s: float = Field(120.0, gt=0)
    preload: bool = True


class ModelSettings(_Strict):
    path: Path
    backend: str = "llama_cpp"
    n_ctx: int | None = Field(None, ge=16)
    n_threads: int | None = Field(None, ge=1)
    n_batch: int = Field(512, ge=1)
    queue_size: int | None = Field(None, ge=0)
    preload: bool | None = None


SECRET_REF = re.compile(r"^(env|keyring|cred):.+$")


class ProviderSettings(_Strict):
    """A remote service; its models are addressed as ``<provider>/<model>``."""

    backend: str = "openai"
    base_url: str
    # A reference, never the key itself: "env:VAR", "keyring:NAME" or "cred:NAME".
    api_key: str | None = None
    headers: dict[str, str] = {}
    models: list[str] = []
    connect_timeout_s: float = Field(5.0, gt=0)
    first_byte_timeout_s: float = Field(60.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(1, ge=0, le=10)

    @field_validator("base_url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("must be an http:// or https:// URL")
        return v.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _no_literal_key(cls, v: str | None) -> str | None:
        if v is not None and not SECRET_REF.match(v):
            raise ValueError('a literal key is refused here: keep it out of the config file and refer to it, '
                             'e.g. api_key = "env:OPENAI_API_KEY" or api_key = "keyring:openai" '
                             '(stored with: anyad secrets set openai)')
        return v


class RouterSettings(_Strict):
    backoff_base_s: float = Field(0.25, ge=0)
    backoff_cap_s: float = Field(2.0, ge=0)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    offline_probe_interval_s: float = Field(10.0, gt=0)


class RouteSettings(_Strict):
    name: str = Field(min_length=1)
    targets: list[str] = Field(min_length=1)


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    data_dir: Path | None = None
    defaults: ModelDefaults = ModelDefaults()
    models: dict[str, ModelSettings] = {}
    providers: dict[str, ProviderSettings] = {}
    routes: list[RouteSettings] = []
    router: RouterSettings = RouterSettings()
    # Where the settings came from, for log lines and relative paths; not a TOML key.
    source: Path | None = Field(None, exclude=True)

    @property
    def resolved_data_dir(self) -> Path:
        if self.data_dir is not None:
            return self.data_dir
        base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
        return Path(base) / "anyad"


def find_config(explicit: str | os.PathLike[str] | None = None) -> Path | None:
    """The config file to read, or None when there is none anywhere."""
    if explicit:
        p = Path(explicit)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        return p
    env = os.environ.get("ANYAD_CONFIG")
    if env:
        p = Path(env)
        if not p.is_file():
            raise ConfigError(f"config file {p} (from $ANYAD_CONFIG) does not exist")
        return p
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    for p in (Path(xdg) / "anyad" / "config.toml", SYSTEM_CONFIG):
        if p.is_file():
            return p
    return None


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc)


def parse_settings(data: dict[str, Any], source: Path | None = None) -> Settings:
    where = str(source) if source else "settings"
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "value_error":
                msg = msg.removeprefix("Value error, ")
            elif "input" in err and not isinstance(err["input"], dict):
                msg = f"{msg} (got {err['input']!r})"
            problems.append(f"{_loc(err['loc'])}: {msg}")
        raise ConfigError(f"invalid config {where}: " + "; ".join(problems)) from None
    settings.source = source
    base = source.parent if source else Path.cwd()
    for m in settings.models.values():
        m.path = (base / m.path.expanduser()).resolve() if not m.path.expanduser().is_absolute() else m.path.expanduser()
    return settings


def load_settings(explicit: str | os.PathLike[str] | None = None, *, host: str | None = None,
                  port: int | None = None, model_paths: list[str] | None = None) -> Settings:
    """Read, validate and override the settings; raise ConfigError with one clear message."""
    path = find_config(explicit)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid config {path}: not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None

    server = data.setdefault("server", {}) if isinstance(data.get("server", {}), dict) else data["server"]
    if isinstance(server, dict):
        if os.environ.get("ANYAD_HOST"):
            server["host"] = os.environ["ANYAD_HOST"]
        if os.environ.get("ANYAD_PORT"):
            server["port"] = os.environ["ANYAD_PORT"]
        if host is not None:
            server["host"] = host
        if port is not None:
            server["port"] = port
    if os.environ.get("ANYAD_DATA_DIR"):
        data["data_dir"] = os.environ["ANYAD_DATA_DIR"]

    if model_paths:
        models = data.setdefault("models", {})
        if isinstance(models, dict):
            for mp in model_paths:
                p = Path(mp).expanduser().resolve()
                models.setdefault(p.stem, {"path": str(p)})
    return parse_settings(data, path)
