"""Settings from the environment, a ``.env`` file and CLI flags (flags win).

Every variable has its ``CHATGATE_`` name first and then the names the seed systems used,
so a seed's existing ``.env`` keeps working.

:class:`Settings` holds what the gateway itself needs. Each provider adapter declares its
own settings (an :class:`EnvironmentSettings` read from the same sources) and registers
them with itself. :mod:`chatgate.providers`, which imports this module, installs the
loader of those settings here (:func:`load_upstreams_with`), so this module names no
provider and imports none.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeAlias, TypeVar, get_args

from pydantic import (
    AliasChoices,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatgate.vocabulary import GenerationOptions

#: A listen-on-everything address names this machine when used to connect.
WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}
_RATE_UNITS = {"second": 1.0, "sec": 1.0, "s": 1.0, "minute": 60.0, "min": 60.0, "m": 60.0,
               "hour": 3600.0, "h": 3600.0, "day": 86400.0, "d": 86400.0}


def _env(*names: str) -> Any:
    return AliasChoices(*names)


class ConfigError(Exception):
    """A configuration value is wrong; the message is one line naming the variable."""


class EnvironmentSettings(BaseSettings):
    """Where every setting comes from: the environment (any case), then ``.env``; an empty
    value counts as unset. Fields are set by name or by any of their variables' names."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
        case_sensitive=False,
    )


AnySettings = TypeVar("AnySettings", bound=EnvironmentSettings)


class Settings(EnvironmentSettings):
    _upstreams: dict[type[EnvironmentSettings], EnvironmentSettings] = PrivateAttr(
        default_factory=dict
    )

    host: str = Field(
        "127.0.0.1", validation_alias=_env("CHATGATE_HOST"),
        description="Address to listen on; a wildcard (0.0.0.0, ::) listens beyond this machine.",
    )
    port: int = Field(
        8000, ge=0, le=65535, validation_alias=_env("CHATGATE_PORT", "GATEWAY_PORT"),
        description="Port to listen on.",
    )
    workers: int = Field(
        1, ge=1, le=64, validation_alias=_env("CHATGATE_WORKERS"),
        description="Worker processes; they share conversations through the SQLite or Redis store (the memory store is refused).",
    )

    #: ``auto`` or a registered provider's name, checked by :func:`load_settings`.
    provider: str = Field(
        "auto", validation_alias=_env("CHATGATE_PROVIDER", "PROVIDER"),
        description="The upstream: auto or a registered provider's name (ollama, openai, gemini, local).",
    )
    model: str | None = Field(
        None, validation_alias=_env("CHATGATE_MODEL", "OLLAMA_MODEL", "OLLAMA_MODEL_GENERAL"),
        description="Default model; unset: the provider's own default.",
    )
    fallback_models: str = Field(
        "", validation_alias=_env("CHATGATE_FALLBACK_MODELS"),
        description="Comma list of models tried in order when the model fails before its first token.",
    )

    data_dir: Path = Field(
        Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chatgate",
        validation_alias=_env("CHATGATE_DATA_DIR"),
        description="Where the default SQLite file lives.",
    )
    store: str = Field(
        "", validation_alias=_env("CHATGATE_STORE"),
        description="memory, sqlite:///path.db, or redis://host:port/db (also rediss://, unix:///path.sock); empty: sqlite in the data directory.",
    )
    enable_memory: bool = Field(
        True, validation_alias=_env("CHATGATE_ENABLE_MEMORY", "ENABLE_MEMORY"),
        description="Send the conversation's history to the model.",
    )
    memory_max_turns: int = Field(
        20,
        ge=0,
        validation_alias=_env("CHATGATE_MEMORY_MAX_TURNS", "HISTORY_MAX_LENGTH", "MEMORY_MAX_TURNS"),
        description="Messages of history sent to the model.",
    )
    session_ttl_s: float = Field(
        3600.0, gt=0, validation_alias=_env("CHATGATE_SESSION_TTL_S"),
        description="Seconds after which an idle conversation expires.",
    )
    memory_ttl_min: float | None = Field(
        None, gt=0, validation_alias=_env("MEMORY_TTL_MIN"),
        description="The idle expiry in minutes, as the Pi Agent server set it; used when CHATGATE_SESSION_TTL_S is not given.",
    )
    sequential_session_ttl_s: float = Field(
        300.0, gt=0, validation_alias=_env("CHATGATE_SEQUENTIAL_SESSION_TTL_S"),
        description="Idle seconds after which a sequential WebSocket session starts afresh.",
    )
    max_conversations: int = Field(
        10_000, ge=1, validation_alias=_env("CHATGATE_MAX_CONVERSATIONS", "MEMORY_MAX_CONVERSATIONS"),
        description="Most conversations kept; the least recently used is evicted.",
    )
    max_message_bytes: int = Field(
        16_384, ge=64, validation_alias=_env("CHATGATE_MAX_MESSAGE_BYTES", "MAX_MESSAGE_SIZE"),
        description="Largest client message in bytes; frames and bodies carrying the client's history may be larger.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, validation_alias=_env("CHATGATE_REQUEST_TIMEOUT_S", "REQUEST_TIMEOUT"),
        description="Longest gap in seconds between two reads from the upstream.",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, validation_alias=_env("CHATGATE_CONNECT_TIMEOUT_S", "CONNECT_TIMEOUT"),
        description="Seconds allowed to connect to the upstream.",
    )
    cors_origins: str = Field(
        "", validation_alias=_env("CHATGATE_CORS_ORIGINS", "CORS_ORIGINS"),
        description="Browser origins allowed for HTTP and WebSocket, a comma list (* for any); empty: same origin only.",
    )
    #: Host header names served besides the loopback names and the address served on
    #: (:mod:`chatgate.api.browsers`): the DNS-rebinding guard.
    allowed_hosts: str = Field(
        "", validation_alias=_env("CHATGATE_ALLOWED_HOSTS"),
        description="Host names served besides loopback names, IP addresses and the address served on (the DNS-rebinding guard): a comma list, .example.com for a domain and its subdomains, * to turn the check off.",
    )
    api_keys: SecretStr = Field(
        SecretStr(""), validation_alias=_env("CHATGATE_API_KEYS"),
        description="Accepted API keys, a comma list, or @file with one per line (sha256:HEX lines allowed); empty: no auth.",
    )
    #: Signs WebSocket tickets and browsers' anonymous identity cookies (chatgate.api.auth).
    secret: SecretStr = Field(
        SecretStr(""), validation_alias=_env("CHATGATE_SECRET"),
        description="At least 16 characters signing WebSocket tickets and browsers' identity cookies; empty: random per start.",
    )
    #: Paths that answer without a key when keys are on, besides those always open.
    public_paths: str = Field(
        "", validation_alias=_env("CHATGATE_PUBLIC_PATHS"),
        description="Comma list of paths that answer without a key when keys are on, e.g. /metrics.",
    )
    rate_limit: str = Field(
        "", validation_alias=_env("CHATGATE_RATE_LIMIT"),
        description="Requests per key (per client address when anonymous), e.g. 30/minute; empty: off.",
    )
    max_streams_per_client: int = Field(
        0, ge=0, validation_alias=_env("CHATGATE_MAX_STREAMS_PER_CLIENT"),
        description="Concurrent replies per client; 0: no cap.",
    )
    max_connections: int = Field(
        10_000, ge=0, validation_alias=_env("CHATGATE_MAX_CONNECTIONS"),
        description="Open WebSockets; 0: no cap.",
    )
    resume_grace_s: float = Field(
        30.0, ge=0, validation_alias=_env("CHATGATE_RESUME_GRACE_S"),
        description="Seconds a generation outlives its dropped WebSocket, waiting for a resume.",
    )
    checkpoint_s: float = Field(
        1.0, gt=0, validation_alias=_env("CHATGATE_CHECKPOINT_S"),
        description="How often, in seconds, the answer so far is written to the store while it streams.",
    )
    #: On SIGTERM, how long running answers may go on before they are cut (0: at once).
    drain_s: float = Field(
        30.0, ge=0, validation_alias=_env("CHATGATE_DRAIN_S"),
        description="On SIGTERM, seconds running answers may go on before they are cut; 0: at once.",
    )
    #: Connection limits held by the server's protocols (chatgate.guard), before auth.
    max_header_bytes: int = Field(
        65_536, ge=1024, validation_alias=_env("CHATGATE_MAX_HEADER_BYTES"),
        description="Largest request head (request line and headers) in bytes: 431 beyond it.",
    )
    max_headers: int = Field(
        100, ge=1, validation_alias=_env("CHATGATE_MAX_HEADERS"),
        description="Most header lines in a request: 431 beyond it.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, validation_alias=_env("CHATGATE_HEADER_TIMEOUT_S"),
        description="Seconds for a request head to arrive after its first byte: 408 beyond it.",
    )
    body_timeout_s: float = Field(
        30.0, gt=0, validation_alias=_env("CHATGATE_BODY_TIMEOUT_S"),
        description="Seconds for a request body to arrive after its head: 408 beyond it.",
    )
    keepalive_timeout_s: float = Field(
        5.0, gt=0, validation_alias=_env("CHATGATE_KEEPALIVE_TIMEOUT_S"),
        description="Seconds a connection may send nothing, new or between requests, before it is closed.",
    )
    max_connections_per_address: int = Field(
        256, ge=0, validation_alias=_env("CHATGATE_MAX_CONNECTIONS_PER_ADDRESS"),
        description="Open connections from one client address (proxies in FORWARDED_ALLOW_IPS exempt); 0: no cap.",
    )
    send_buffer_bytes: int = Field(
        131_072, ge=0, validation_alias=_env("CHATGATE_SEND_BUFFER_BYTES"),
        description="Kernel send buffer (SO_SNDBUF) of each client connection; 0: the kernel's own.",
    )
    agents_dir: Path | None = Field(
        None, validation_alias=_env("CHATGATE_AGENTS_DIR"),
        description="Folder of agent files (NAME.toml or NAME.json); unset: the built-in general agent only.",
    )
    temperature: float | None = Field(
        None, ge=0, le=2, validation_alias=_env("CHATGATE_TEMPERATURE", "TEMPERATURE"),
        description="Default sampling temperature, 0 to 2; unset: the model's.",
    )
    num_ctx: int | None = Field(
        None, ge=1, validation_alias=_env("CHATGATE_NUM_CTX", "CTX_TOKENS"),
        description="Default context window in tokens; unset: the model's.",
    )
    max_tokens: int | None = Field(
        None, ge=1, validation_alias=_env("CHATGATE_MAX_TOKENS", "MAX_TOKENS"),
        description="Default most tokens per answer; unset: the model's.",
    )
    #: Every answer ends (``length``) at this many tokens / after this many seconds; 0: no cap.
    max_answer_tokens: int = Field(
        0, ge=0, validation_alias=_env("CHATGATE_MAX_ANSWER_TOKENS"),
        description="Every answer stops (finish_reason length) at this many tokens; 0: no cap.",
    )
    max_answer_s: float = Field(
        600.0, ge=0, validation_alias=_env("CHATGATE_MAX_ANSWER_S"),
        description="Every answer stops (finish_reason length) after this many seconds; 0: no cap.",
    )
    #: The upstream's circuit breaker: opens after this many failed turns in a row (0: never),
    #: for this long before one probe turn is let through.
    breaker_failures: int = Field(
        5, ge=0, validation_alias=_env("CHATGATE_BREAKER_FAILURES"),
        description="Failed turns in a row after which the upstream's circuit breaker opens; 0: never.",
    )
    breaker_cooldown_s: float = Field(
        30.0, gt=0, validation_alias=_env("CHATGATE_BREAKER_COOLDOWN_S"),
        description="Seconds the circuit breaker stays open before one probe turn is let through.",
    )
    debug: bool = Field(
        False, validation_alias=_env("CHATGATE_DEBUG", "OLLAMA_DEBUG"),
        description="Debug logging: sets the log level to debug unless it is given.",
    )
    #: Put prompt and answer text in trace spans (``gen_ai.input.messages`` / ``output.messages``).
    trace_content: bool = Field(
        False, validation_alias=_env("CHATGATE_TRACE_CONTENT"),
        description="Put prompt and answer text in trace spans (gen_ai.input.messages, gen_ai.output.messages).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias=_env("CHATGATE_LOG_LEVEL"),
        description="Log level: debug, info, warning or error.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str) -> str:
        if value and _parse_rate(value) is None:
            raise ValueError("expected COUNT/UNIT, e.g. 30/minute")
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _check_hosts(cls, value: str) -> str:
        for entry in _host_entries(value):
            if not _HOST_ENTRY.fullmatch(entry):
                raise ValueError(
                    f"{entry!r} is not a host name or address: list names without scheme or port, "
                    "e.g. chat.example.com, .example.com (and its subdomains), 192.168.1.5, or *"
                )
        return value

    @field_validator("secret")
    @classmethod
    def _check_secret(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and len(value.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return value

    @field_validator("public_paths")
    @classmethod
    def _check_paths(cls, value: str) -> str:
        if any(not path.startswith("/") for path in _comma_list(value)):
            raise ValueError("expected a comma list of paths, each starting with /")
        return value

    @model_validator(mode="after")
    def _minutes_alias(self) -> Settings:
        if self.memory_ttl_min is not None and "session_ttl_s" not in self.model_fields_set:
            self.session_ttl_s = self.memory_ttl_min * 60
        return self

    @model_validator(mode="after")
    def _debug_logs(self) -> Settings:
        """``OLLAMA_DEBUG=1`` (CS_Agent) meant debug logging: so does ``CHATGATE_DEBUG``."""
        if self.debug and "log_level" not in self.model_fields_set:
            self.log_level = "debug"
        return self

    def upstream(self, kind: type[AnySettings]) -> AnySettings:
        """One provider's settings, by its settings class, as :func:`load_settings` loaded them."""
        try:
            return self._upstreams[kind]  # type: ignore[return-value]
        except KeyError:
            raise LookupError(f"no {kind.__name__} here: settings come from load_settings()") from None

    @property
    def generation_options(self) -> GenerationOptions:
        """The default options, ``max_tokens`` no higher than the answer cap."""
        max_tokens = self.max_tokens
        if self.max_answer_tokens and max_tokens is not None:
            max_tokens = min(max_tokens, self.max_answer_tokens)
        return GenerationOptions(
            temperature=self.temperature, max_tokens=max_tokens, num_ctx=self.num_ctx
        )

    @property
    def fallback_model_list(self) -> list[str]:
        return [m.strip() for m in self.fallback_models.split(",") if m.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def public_path_set(self) -> frozenset[str]:
        return frozenset(_comma_list(self.public_paths))

    @property
    def allowed_host_list(self) -> list[str]:
        """Lower case, IPv6 addresses without brackets, no trailing dot."""
        return _host_entries(self.allowed_hosts)

    @property
    def store_url(self) -> str:
        return self.store or f"sqlite:///{self.data_dir / 'chatgate.db'}"

    @property
    def rate(self) -> tuple[int, float] | None:
        """(requests, per seconds) or None when unlimited."""
        return _parse_rate(self.rate_limit) if self.rate_limit else None

    def api_key_set(self) -> frozenset[str]:
        raw = self.api_keys.get_secret_value().strip()
        if raw.startswith("@"):
            raw = Path(raw[1:]).read_text(encoding="utf-8")
        return frozenset(k.strip() for k in re.split(r"[,\s]+", raw) if k.strip())


#: ``*``, a name (``.name`` or ``*.name``: with its subdomains), or an IP address.
_HOST_ENTRY = re.compile(r"\*|(\*?\.)?[a-z0-9_-]+(\.[a-z0-9_-]+)*|[0-9a-f:.]*:[0-9a-f:.%a-z]*")


def _host_entries(value: str) -> list[str]:
    entries = (e.strip().lower() for e in value.split(","))
    return [e.removeprefix("[").removesuffix("]").removesuffix(".") for e in entries if e.strip()]


def _comma_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


#: A keys file may hold a key's SHA-256 digest instead of the key (``chatgate hash-key``).
_HASHED_KEY = re.compile(r"sha256:[0-9a-fA-F]{64}")


def _parse_rate(value: str) -> tuple[int, float] | None:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", value.lower())
    if not match or match.group(3) not in _RATE_UNITS or int(match.group(1)) < 1:
        return None
    per = float(match.group(2) or 1) * _RATE_UNITS[match.group(3)]
    return int(match.group(1)), per


def variable_for(field: str, model: type[EnvironmentSettings] = Settings) -> str:
    """The variable the user set for ``model``'s ``field`` (or its main name when unset)."""
    info = model.model_fields.get(field)
    alias = info.validation_alias if info else None
    names = [str(n) for n in alias.choices] if isinstance(alias, AliasChoices) else [field.upper()]
    for name in names:
        if name in os.environ or name.lower() in os.environ:
            return name
    return names[0]


def config_error(exc: ValidationError, model: type[EnvironmentSettings]) -> ConfigError:
    """The one line for ``model``'s first wrong value: the variable, what is wrong, and the
    value unless it is a secret."""
    first = exc.errors()[0]
    field = _field_of(str(first["loc"][0]) if first["loc"] else "", model)
    bad = first.get("input")
    shown = "" if _is_secret(field, model) or isinstance(bad, dict) else f" (got {bad!r})"
    return ConfigError(f"{variable_for(field, model)}: {first['msg']}{shown}")


#: Loads every provider's settings, given the gateway's and the overrides that are not
#: fields of :class:`Settings`; a wrong value raises ConfigError, an override no provider
#: takes TypeError.
UpstreamLoader: TypeAlias = Callable[[Settings, Mapping[str, Any]], Iterable[EnvironmentSettings]]
_upstream_loaders: list[UpstreamLoader] = []


def load_upstreams_with(loader: UpstreamLoader) -> UpstreamLoader:
    """Make ``loader`` the one :func:`load_settings` calls (:mod:`chatgate.providers` does
    when imported)."""
    _upstream_loaders[:] = [loader]
    return loader


def load_settings(**overrides: Any) -> Settings:
    """Build the gateway's settings and every provider's; a wrong value raises ConfigError
    with one line naming the variable. An override sets the field of its name, in whichever
    settings declare it (``None`` means not given); a name none declares is a TypeError."""
    if not _upstream_loaders:
        raise RuntimeError("load_settings() needs chatgate.providers imported: it loads the providers' settings")
    given = {k: v for k, v in overrides.items() if v is not None}
    own = {k: v for k, v in given.items() if k in Settings.model_fields}
    try:
        settings = Settings(**own)
        if any(k.startswith("sha256:") and not _HASHED_KEY.fullmatch(k) for k in settings.api_key_set()):
            raise ConfigError("CHATGATE_API_KEYS: a sha256: entry must be 64 hex digits, "
                              "as `chatgate hash-key` prints them")
    except ValidationError as exc:
        raise config_error(exc, Settings) from None
    except OSError as exc:
        raise ConfigError(f"CHATGATE_API_KEYS: cannot read key file: {exc.strerror}") from None
    upstreams = _upstream_loaders[0](settings, {k: v for k, v in given.items() if k not in own})
    settings._upstreams = {type(upstream): upstream for upstream in upstreams}
    return settings


def _field_of(loc: str, model: type[EnvironmentSettings]) -> str:
    """Map an error location (a field or one of its aliases) back to the field name."""
    if loc in model.model_fields:
        return loc
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and loc.lower() in (str(c).lower() for c in alias.choices):
            return name
    return loc


def _is_secret(field: str, model: type[EnvironmentSettings]) -> bool:
    info = model.model_fields.get(field)
    kinds = (info.annotation, *get_args(info.annotation)) if info else ()
    return "key" in field or SecretStr in kinds
