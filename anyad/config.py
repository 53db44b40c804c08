"""The one place that reads configuration: TOML file → validated settings.

Search order: ``--config``, ``$ANYAD_CONFIG``, ``$XDG_CONFIG_HOME/anyad/config.toml``,
``/etc/anyad/config.toml``. ``ANYAD_HOST``, ``ANYAD_PORT`` and ``ANYAD_DATA_DIR``
override the file; command-line flags override both. Every failure becomes a
``ConfigError`` whose message names the file and the key path.
"""

from __future__ import annotations

import math
import os
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from yarl import URL

from anyad.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 2692
SYSTEM_CONFIG = Path("/etc/anyad/config.toml")


SECRET_REF = re.compile(r"^(env|keyring|cred):.+$")


def _secret_ref(v: str) -> str:
    if not SECRET_REF.match(v):
        raise ValueError('a literal key is refused here: keep it out of the config file and refer to it: '
                         '"keyring:NAME" (stored with `anyad secrets set NAME`), "env:VAR" or "cred:NAME"')
    return v


# A reference to a secret, never the secret itself.
SecretRef = Annotated[str, AfterValidator(_secret_ref)]


class _Strict(BaseModel):
    # A typo in a key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid")


class ServerSettings(_Strict):
    host: str = DEFAULT_HOST
    port: int = Field(DEFAULT_PORT, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Keys clients must send (Authorization: Bearer …), as references: "keyring:NAME",
    # "env:VAR" or "cred:NAME". Empty: no key needed (then only a loopback host is allowed).
    api_keys: list[SecretRef] = []
    # Browser origins allowed to call the API (CORS), e.g. ["http://localhost:3000"]; "*" for any.
    # A request from any other origin ("null" included) is refused, whatever its method;
    # the dashboard's own origin (this listener's address) is always allowed.
    allowed_origins: list[str] = []
    # Host names (beyond loopback names and addresses) that requests may name in their
    # Host header while listening on a loopback address; anything else is refused, so a
    # web page on a DNS-rebinding domain cannot reach the daemon. E.g. ["anyad.lan"].
    allowed_hosts: list[str] = []
    # Requests per minute per API key (or per client address without keys); 0: no limit.
    rate_limit_per_minute: int = Field(0, ge=0)
    # Caps on one chat request: number of messages and characters of message text.
    max_messages: int = Field(1000, ge=1)
    max_prompt_chars: int = Field(1_000_000, ge=1)
    # On SIGTERM: how long replies in flight may take to finish (new requests get 503
    # meanwhile) before they are cut off. Keep it under systemd's TimeoutStopSec.
    shutdown_grace_s: float = Field(30.0, ge=0)
    # A reload (SIGHUP, POST /api/reload) that would leave no API keys, or no models,
    # providers and routes, is refused as a mistake (an emptied file) unless this is true.
    allow_empty_reload: bool = False
    # Slow clients: a connection must send a complete request head within header_timeout_s
    # (of opening, or of the first byte of its next request), and a request body may pause
    # at most body_timeout_s between reads (then 408); an idle keep-alive connection is
    # closed after keepalive_timeout_s. None of these cut a reply that takes long.
    header_timeout_s: float = Field(10.0, gt=0)
    body_timeout_s: float = Field(30.0, gt=0)
    keepalive_timeout_s: float = Field(75.0, gt=0)
    # Floods: open connections per client address, and in all (never more than the
    # open-file limit allows); beyond them a new connection is closed at once. Every local
    # program shares 127.0.0.1, so the per-client cap is far above what an SDK's pool or a
    # busy IDE holds, and still keeps one runaway client from taking every socket.
    max_connections_per_client: int = Field(256, ge=1)
    max_connections: int = Field(4096, ge=1)


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_keep_alive(value: Any) -> float:
    """Seconds a model stays loaded after its last request; ``inf`` means for ever.

    Ollama's forms: a number of seconds, or a duration string ("5m", "1h30m", "90s");
    a negative value keeps the model loaded, 0 unloads it after each request.
    """
    if isinstance(value, bool) or value is None:
        raise ValueError("keep_alive must be a number of seconds or a duration such as \"5m\"")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = sign * float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"keep_alive {value!r} is not a duration (e.g. \"30s\", \"5m\", \"1h\", -1)") \
                    from None
            seconds = sign * sum(float(n) * _UNIT_S[u] for n, u in parts)
    else:
        raise ValueError("keep_alive must be a number of seconds or a duration such as \"5m\"")
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        raise ValueError("keep_alive must be finite; use -1 to keep a model loaded")
    return math.inf if seconds < 0 else seconds


# Seconds, from Ollama's forms ("5m", 90, -1 → inf).
KeepAlive = Annotated[float, BeforeValidator(parse_keep_alive)]

GpuSetting = Literal["auto", "cpu", "full"] | Annotated[int, Field(ge=0)]


class ModelPolicy(_Strict):
    """How the scheduler treats a model; set in [defaults], overridden per model."""

    # "auto": all layers on the GPU if they fit, else as many as fit, else the CPU.
    gpu: GpuSetting = "auto"
    keep_alive: KeepAlive = 300.0  # inf: never unloaded for idleness
    parallel: int = Field(1, ge=1, le=64)
    max_queue: int = Field(16, ge=0)
    queue_timeout_s: float = Field(300.0, gt=0)
    load_timeout_s: float = Field(120.0, gt=0)
    preload: bool = False


class ModelDefaults(ModelPolicy):
    max_context: int = Field(8192, ge=16)


class ModelSettings(_Strict):
    path: Path
    # A vision projector (an mmproj GGUF) for image parts; unset: found beside the model by
    # discovery, or none (images are a 400).
    mmproj: Path | None = None
    backend: str = "llama_cpp"
    # The file's SHA-256; checked before its first load (the result remembered by path,
    # size and modification time). Unset: not checked.
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")
    n_ctx: int | None = Field(None, ge=16)
    n_threads: int | None = Field(None, ge=1)
    n_batch: int = Field(512, ge=1)
    # llama.cpp's weight repacking for the CPU's matrix units (its --no-repack is "off");
    # "auto": on, except on CPUs with AMX, whose repacked kernels crash this llama.cpp.
    repack: Literal["auto", "on", "off"] = "auto"
    # llama.cpp's flash attention: "auto" (llama-server's default: on where the device
    # supports it for the model), "on" or "off". It reads long prompts faster.
    flash_attention: Literal["auto", "on", "off"] = "auto"
    # The KV cache's element type (llama-server's --cache-type-k/-v): q8_0 halves its
    # memory, q4_0 quarters it, at some cost in quality; a quantized cache needs flash
    # attention (not "off").
    kv_cache_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    # "batched": one llama.cpp context serves all of the model's `parallel` sequences,
    # decoded together, each conversation kept in its slot (a next turn reads only what is
    # new); "slots": one context per slot, decoded apart. "auto": batched, except for a model
    # with a vision projector (images are read into a slot's own context).
    engine: Literal["auto", "batched", "slots"] = "auto"
    # The batched engine's prompt cache: the states of conversations pushed out of their
    # slots, kept in RAM (MiB, counted in the model's memory estimate) and on disk in the
    # data directory's prompt-cache folder (MiB; it survives unloads and restarts). 0: off.
    prompt_cache_mib: int = Field(256, ge=0)
    prompt_cache_disk_mib: int = Field(2048, ge=0)
    # How the model writes tool calls; "auto": recognised from its chat template.
    tool_format: Literal["auto", "hermes", "llama3", "mistral", "generic", "none"] = "auto"
    # Thinking split out of the content as reasoning_content: "auto" where the template has
    # thinking tags, "on" always (<think> tags if the template names none), "off" never (and
    # thinking switched off where the template has a switch for it).
    reasoning: Literal["auto", "on", "off"] = "auto"
    # Unset: the value from [defaults].
    gpu: GpuSetting | None = None
    keep_alive: KeepAlive | None = None
    parallel: int | None = Field(None, ge=1, le=64)
    max_queue: int | None = Field(None, ge=0)
    queue_timeout_s: float | None = Field(None, gt=0)
    load_timeout_s: float | None = Field(None, gt=0)
    preload: bool | None = None

    @model_validator(mode="after")
    def _kv_needs_flash_attention(self) -> "ModelSettings":
        if self.kv_cache_type != "f16" and self.flash_attention == "off":
            raise ValueError(f"kv_cache_type = {self.kv_cache_type!r} needs flash attention: set flash_attention "
                             "to \"auto\" or \"on\", or kv_cache_type to \"f16\"")
        return self

    def policy(self, defaults: ModelDefaults) -> ModelPolicy:
        """This model's scheduling policy: its own values over the defaults."""
        own = {k: getattr(self, k) for k in ModelPolicy.model_fields if getattr(self, k) is not None}
        base = {k: getattr(defaults, k) for k in ModelPolicy.model_fields}
        return ModelPolicy.model_construct(**{**base, **own})


class SchedulerSettings(_Strict):
    # Models loaded at once; an idle one (least recently used first) is unloaded to make room. 0: no limit.
    max_loaded_models: int = Field(3, ge=0)
    # Memory kept free for everything else on the machine.
    gpu_reserve_mib: int = Field(512, ge=0)
    ram_reserve_mib: int = Field(512, ge=0)
    # RAM that local models may hold together, in MiB; 0: whatever the machine has available.
    max_ram_mib: int = Field(0, ge=0)
    # After unloading to make room, how long to wait for the device to report the memory free.
    memory_wait_s: float = Field(15.0, ge=0)


class ModelPrice(_Strict):
    """Price per million tokens, in whatever currency the provider bills."""

    prompt: float = Field(0.0, ge=0)
    completion: float = Field(0.0, ge=0)


def http_url(v: str) -> str:
    if not re.match(r"^https?://[^/\s]+", v):
        raise ValueError("must be an http:// or https:// URL")
    return v.rstrip("/")


class ProviderSettings(_Strict):
    """A remote service; its models are addressed as ``<provider>/<model>``."""

    backend: str = "openai"
    base_url: str
    # Which of an OpenAI-style provider's APIs its models are reached through: chat
    # completions, or the Responses API (for models that answer only there).
    api: Literal["chat", "responses"] = "chat"
    # A reference, never the key itself: "env:VAR", "keyring:NAME" or "cred:NAME".
    api_key: SecretRef | None = None
    headers: dict[str, str] = {}
    models: list[str] = []
    # Also list what the provider's own GET /models lists (a peer anyad, a llama-server, a
    # vLLM), as <provider>/<id>, read at start and every list_models_every_s.
    list_models: bool = False
    list_models_every_s: float = Field(300.0, gt=0)
    connect_timeout_s: float = Field(5.0, gt=0)
    first_byte_timeout_s: float = Field(60.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(1, ge=0, le=10)
    # Prices per million tokens by model name ("*" for any other), for the usage report's cost.
    prices: dict[str, ModelPrice] = {}

    @model_validator(mode="after")
    def _api_is_openai(self) -> "ProviderSettings":
        if self.api != "chat" and self.backend != "openai":
            raise ValueError(f'api = "{self.api}" is for backend "openai" (the provider\'s own API is used)')
        return self

    _url = field_validator("base_url")(classmethod(lambda cls, v: http_url(v)))


class ReplicaSettings(_Strict):
    """One endpoint of a pool."""

    base_url: str
    # What X-Anyad-Backend, the status and the metrics call it (default: host:port).
    name: str | None = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._:-]+$")
    api_key: SecretRef | None = None  # default: the pool's
    headers: dict[str, str] = {}
    # Its capacity next to the others' (a GPU twice as fast: 2).
    weight: float = Field(1.0, gt=0)

    _url = field_validator("base_url")(classmethod(lambda cls, v: http_url(v)))

    @property
    def label(self) -> str:
        u = URL(self.base_url)
        return self.name or f"{u.host}:{u.port}"


class PoolSettings(_Strict):
    """Several OpenAI-compatible endpoints (vLLM, SGLang, llama-server, anyad) serving one
    model, asked for by the pool's name: balanced by outstanding requests, with each
    conversation kept on the replica that holds its prefix."""

    # The replicas' own name for the model (default: the pool's name).
    model: str | None = Field(None, min_length=1)
    # URLs ("http://gpu1:8000/v1"), or tables with a name, a key or a weight of their own.
    replicas: list[ReplicaSettings] = Field(min_length=1)
    backend: str = "openai"
    api_key: SecretRef | None = None
    headers: dict[str, str] = {}
    connect_timeout_s: float = Field(2.0, gt=0)
    first_byte_timeout_s: float = Field(60.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0)
    # "health": GET /health on each replica's origin (vLLM, SGLang, llama-server, anyad);
    # "models": GET its /models; "off": only the breakers judge.
    health_check: Literal["health", "models", "off"] = "health"
    health_interval_s: float = Field(5.0, gt=0)
    health_timeout_s: float = Field(2.0, gt=0)
    # How long a replica that comes back takes to reach its full share.
    slow_start_s: float = Field(30.0, ge=0)
    # Keep each conversation on one replica (its prefix cache) while it is not much busier...
    affinity: bool = True
    # ...than (1 + load_slack) times its share of the requests outstanding.
    load_slack: float = Field(0.5, ge=0)
    prices: dict[str, ModelPrice] = {}

    @field_validator("replicas", mode="before")
    @classmethod
    def _urls(cls, v: Any) -> Any:
        return [{"base_url": r} if isinstance(r, str) else r for r in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _distinct(self) -> "PoolSettings":
        labels = [r.label for r in self.replicas]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"replicas: {', '.join(dup)} appear twice (give each a distinct name)")
        return self


class RouterSettings(_Strict):
    backoff_base_s: float = Field(0.25, ge=0)
    backoff_cap_s: float = Field(2.0, ge=0)
    breaker_failures: int = Field(3, ge=1)
    breaker_cooldown_s: float = Field(30.0, gt=0)
    offline_probe_interval_s: float = Field(10.0, gt=0)


class RouteTarget(_Strict):
    model: str = Field(min_length=1)
    # Share of new assignments this target gets first (canary, A/B); 0: only a fallback.
    weight: float = Field(0.0, ge=0)


class RouteSettings(_Strict):
    name: str = Field(min_length=1)
    # In order: a fallback chain. With weights ({ model = "qwen-v2", weight = 10 }), each
    # client or conversation is assigned one target by weight, which it keeps (sticky);
    # the others stay its fallbacks, in order.
    targets: list[str | RouteTarget] = Field(min_length=1)

    @property
    def target_list(self) -> list[RouteTarget]:
        return [RouteTarget(model=t) if isinstance(t, str) else t for t in self.targets]


class HistorySettings(_Strict):
    # Record every chat exchange in the data directory's anyad.db.
    enabled: bool = True
    # Delete conversations idle for longer than this many days (0: keep them).
    max_age_days: float = Field(90.0, ge=0)
    # Keep at most this many conversations, the most recently updated (0: no limit).
    max_conversations: int = Field(10000, ge=0)


class CacheSettings(_Strict):
    # Reuse answers to repeated requests (kept in anyad.db in the data directory).
    enabled: bool = True
    # "deterministic": only requests with temperature 0 or a seed; "all": every request.
    mode: Literal["deterministic", "all"] = "deterministic"
    ttl_s: float = Field(86400.0, gt=0)
    max_entries: int = Field(10000, ge=1)
    max_bytes: int = Field(256 * 1024 * 1024, ge=1024)


class AuditSettings(_Strict):
    # Record admin actions (secrets changed, models loaded and unloaded, config reloaded)
    # in anyad.db's audit table.
    enabled: bool = True
    # Also one row per API request that uses a model or changes something: who, when,
    # which model, the status.
    requests: bool = True
    # Also the request's messages and the reply, in the request's row.
    include_content: bool = False
    # Delete rows older than this many days (0: keep them).
    max_age_days: float = Field(90.0, ge=0)


class UsageSettings(_Strict):
    # One row per request that used a model (key, model, target, tokens, cost) in anyad.db,
    # for `anyad usage`, /api/usage and key quotas that survive a restart.
    enabled: bool = True


class PluginsSettings(BaseModel):
    # Plugins (found through the anyad.plugins entry points; `anyad plugins` lists them)
    # that run; none by default. Each may have its own table, [plugins.<name>].
    enabled: list[str] = []
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _tables(self) -> "PluginsSettings":
        for name, value in (self.model_extra or {}).items():
            if not isinstance(value, dict):
                raise ValueError(f"plugins.{name} must be a table ([plugins.{name}]) of that plugin's settings")
        return self

    def options(self, name: str) -> dict[str, Any]:
        """``[plugins.<name>]``: one plugin's own settings, which it validates itself."""
        return dict((self.model_extra or {}).get(name, {}))


class KeySettings(_Strict):
    """``[keys.NAME]``: one API key from the config, with its role, models and limits."""

    key: SecretRef
    role: Literal["user", "admin"] = "user"
    # Glob patterns over the model names it may call (ids, provider/model, route aliases); empty: all.
    models: list[str] = []
    tokens_per_day: int | None = Field(None, ge=1)
    tokens_per_month: int | None = Field(None, ge=1)
    requests_per_minute: int | None = Field(None, ge=1)
    expires: datetime | None = None


DISCOVERY_KEYS = ("discover", "directories", "sources")


class DiscoverySettings(_Strict):
    """``[models] discover = true``: serve the GGUF files found in these places too."""

    discover: bool = False
    # Folders searched (recursively) for *.gguf; the model id is the file's stem.
    directories: list[Path] = []
    # Where to look, in order (the first to claim an id keeps it; configured models come first).
    sources: list[Literal["directories", "ollama", "lmstudio", "huggingface"]] = [
        "directories", "ollama", "lmstudio", "huggingface"]


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    data_dir: Path | None = None
    defaults: ModelDefaults = ModelDefaults()
    models: dict[str, ModelSettings] = {}
    providers: dict[str, ProviderSettings] = {}
    routes: list[RouteSettings] = []
    pools: dict[str, PoolSettings] = {}
    router: RouterSettings = RouterSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    history: HistorySettings = HistorySettings()
    cache: CacheSettings = CacheSettings()
    audit: AuditSettings = AuditSettings()
    usage: UsageSettings = UsageSettings()
    plugins: PluginsSettings = PluginsSettings()
    # API keys with roles and limits, by name (more are made with `anyad keys create`).
    keys: dict[str, KeySettings] = {}
    # From the [models] table's own keys (discover, directories, sources), not a TOML table.
    discovery: DiscoverySettings = DiscoverySettings()
    # Where the settings came from, for log lines and relative paths; not a TOML key.
    source: Path | None = Field(None, exclude=True)

    @model_validator(mode="before")
    @classmethod
    def _discovery_keys(cls, data: Any) -> Any:
        # [models] holds model tables, and also the discovery switches beside them.
        models = data.get("models") if isinstance(data, dict) else None
        if isinstance(models, dict) and any(k in models for k in DISCOVERY_KEYS):
            data = {**data, "models": {k: v for k, v in models.items() if k not in DISCOVERY_KEYS},
                    "discovery": {k: models[k] for k in DISCOVERY_KEYS if k in models}}
        return data

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
    if loc and loc[0] == "discovery":  # written in the [models] table
        loc = ("models", *loc[1:])
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
        m.path = _beside(base, m.path)
        if m.mmproj is not None:
            m.mmproj = _beside(base, m.mmproj)
    return settings


def _beside(base: Path, path: Path) -> Path:
    """A path from the config: relative ones are relative to the config file's folder."""
    path = path.expanduser()
    return path if path.is_absolute() else (base / path).resolve()


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
