"""Settings from the environment, a ``.env`` file and CLI flags (flags win).

Every variable has its ``CHATGATE_`` name first and then the names the seed systems used,
so a seed's existing ``.env`` keeps working.
"""

from __future__ import annotations

import os
import re
from functools import cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from chatgate.providers.base import GenerationOptions

ProviderName = Literal["auto", "ollama", "openai", "gemini", "local"]
_HOST_PORT = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::(?P<port>\d+))?")
#: A listen-on-everything address names this machine when used to connect.
_WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}
#: What a URL's authority must be after normalising: a hostname or [IPv6], then :port.
_URL_HOST_PORT = re.compile(
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(?::(?P<port>\d{1,5}))?"
)
_NOT_AN_OLLAMA_URL = "expected an http(s) URL, host or host:port, e.g. http://127.0.0.1:11434"
_RATE_UNITS = {"second": 1.0, "sec": 1.0, "s": 1.0, "minute": 60.0, "min": 60.0, "m": 60.0,
               "hour": 3600.0, "h": 3600.0, "day": 86400.0, "d": 86400.0}


def _check_http_url(url: str) -> None:
    """Raise ValueError unless ``url`` is http(s) with a usable host and port (1-65535)."""
    parts = urlsplit(url)
    match = _URL_HOST_PORT.fullmatch(parts.netloc.rpartition("@")[2])
    if parts.scheme.lower() not in ("http", "https") or match is None or parts.query or parts.fragment:
        raise ValueError(_NOT_AN_OLLAMA_URL)
    if match["port"] is not None and not 0 < int(match["port"]) < 65536:
        raise ValueError(f"port {match['port']} is out of range 1-65535")


def _env(*names: str) -> Any:
    return AliasChoices(*names)


class ConfigError(Exception):
    """A configuration value is wrong; the message is one line naming the variable."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
        env_ignore_empty=True,
        case_sensitive=False,
    )

    host: str = Field("127.0.0.1", validation_alias=_env("CHATGATE_HOST"))
    port: int = Field(8000, ge=0, le=65535, validation_alias=_env("CHATGATE_PORT", "GATEWAY_PORT"))
    workers: int = Field(1, ge=1, le=64, validation_alias=_env("CHATGATE_WORKERS"))

    provider: ProviderName = Field("auto", validation_alias=_env("CHATGATE_PROVIDER", "PROVIDER"))
    ollama_host: str = Field(
        "http://127.0.0.1:11434", validation_alias=_env("OLLAMA_HOST", "OLLAMA_URL")
    )
    model: str | None = Field(
        None, validation_alias=_env("CHATGATE_MODEL", "OLLAMA_MODEL", "OLLAMA_MODEL_GENERAL")
    )
    fallback_models: str = Field("", validation_alias=_env("CHATGATE_FALLBACK_MODELS"))
    openai_base_url: str | None = Field(None, validation_alias=_env("CHATGATE_OPENAI_BASE_URL"))
    openai_api_key: SecretStr | None = Field(None, validation_alias=_env("CHATGATE_OPENAI_API_KEY"))
    gemini_api_key: SecretStr | None = Field(
        None, validation_alias=_env("GEMINI_API_KEY", "GOOGLE_API_KEY")
    )
    gemini_base_url: str = Field(
        "https://generativelanguage.googleapis.com",
        validation_alias=_env("CHATGATE_GEMINI_BASE_URL"),
    )
    local_model_path: str | None = Field(None, validation_alias=_env("CHATGATE_LOCAL_MODEL_PATH"))

    data_dir: Path = Field(
        Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "chatgate",
        validation_alias=_env("CHATGATE_DATA_DIR"),
    )
    store: str = Field("", validation_alias=_env("CHATGATE_STORE"))
    enable_memory: bool = Field(True, validation_alias=_env("CHATGATE_ENABLE_MEMORY", "ENABLE_MEMORY"))
    memory_max_turns: int = Field(
        20,
        ge=0,
        validation_alias=_env("CHATGATE_MEMORY_MAX_TURNS", "HISTORY_MAX_LENGTH", "MEMORY_MAX_TURNS"),
    )
    session_ttl_s: float = Field(3600.0, gt=0, validation_alias=_env("CHATGATE_SESSION_TTL_S"))
    memory_ttl_min: float | None = Field(None, gt=0, validation_alias=_env("MEMORY_TTL_MIN"))
    sequential_session_ttl_s: float = Field(
        300.0, gt=0, validation_alias=_env("CHATGATE_SEQUENTIAL_SESSION_TTL_S")
    )
    max_conversations: int = Field(
        10_000, ge=1, validation_alias=_env("CHATGATE_MAX_CONVERSATIONS", "MEMORY_MAX_CONVERSATIONS")
    )
    max_message_bytes: int = Field(
        16_384, ge=64, validation_alias=_env("CHATGATE_MAX_MESSAGE_BYTES", "MAX_MESSAGE_SIZE")
    )
    request_timeout_s: float = Field(
        300.0, gt=0, validation_alias=_env("CHATGATE_REQUEST_TIMEOUT_S", "REQUEST_TIMEOUT")
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, validation_alias=_env("CHATGATE_CONNECT_TIMEOUT_S", "CONNECT_TIMEOUT")
    )
    cors_origins: str = Field("", validation_alias=_env("CHATGATE_CORS_ORIGINS", "CORS_ORIGINS"))
    api_keys: SecretStr = Field(SecretStr(""), validation_alias=_env("CHATGATE_API_KEYS"))
    rate_limit: str = Field("", validation_alias=_env("CHATGATE_RATE_LIMIT"))
    max_streams_per_client: int = Field(0, ge=0, validation_alias=_env("CHATGATE_MAX_STREAMS_PER_CLIENT"))
    max_connections: int = Field(10_000, ge=0, validation_alias=_env("CHATGATE_MAX_CONNECTIONS"))
    resume_grace_s: float = Field(30.0, ge=0, validation_alias=_env("CHATGATE_RESUME_GRACE_S"))
    agents_dir: Path | None = Field(None, validation_alias=_env("CHATGATE_AGENTS_DIR"))
    temperature: float | None = Field(
        None, ge=0, le=2, validation_alias=_env("CHATGATE_TEMPERATURE", "TEMPERATURE")
    )
    num_ctx: int | None = Field(None, ge=1, validation_alias=_env("CHATGATE_NUM_CTX", "CTX_TOKENS"))
    max_tokens: int | None = Field(None, ge=1, validation_alias=_env("CHATGATE_MAX_TOKENS", "MAX_TOKENS"))
    debug: bool = Field(False, validation_alias=_env("CHATGATE_DEBUG", "OLLAMA_DEBUG"))
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", validation_alias=_env("CHATGATE_LOG_LEVEL")
    )

    @field_validator("ollama_host")
    @classmethod
    def _normalise_ollama_host(cls, value: str) -> str:
        """Read it as Ollama does: ``host``, ``host:port``, ``0.0.0.0`` or a URL. The port
        defaults to 11434 without a scheme and to the scheme's own (80, 443) with one. What
        is not then an http(s) URL with a host and a port in 1-65535 is refused."""
        value = value.strip().rstrip("/")
        scheme, has_scheme, rest = value.partition("://")
        if not has_scheme:
            scheme, rest = "http", value
        hostport, _, path = rest.partition("/")
        match = _HOST_PORT.fullmatch(hostport)
        if match is None:
            url = f"{scheme}://{rest}"
        else:
            host = _WILDCARD_HOSTS.get(match["host"], match["host"])
            port = match["port"] or ("" if has_scheme else "11434")
            url = f"{scheme}://{host}" + (f":{port}" if port else "") + (f"/{path}" if path else "")
        _check_http_url(url)
        return url

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

    @property
    def generation_options(self) -> GenerationOptions:
        return GenerationOptions(
            temperature=self.temperature, max_tokens=self.max_tokens, num_ctx=self.num_ctx
        )

    @property
    def fallback_model_list(self) -> list[str]:
        return [m.strip() for m in self.fallback_models.split(",") if m.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

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


def _parse_rate(value: str) -> tuple[int, float] | None:
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d*)\s*([a-z]+)\s*", value.lower())
    if not match or match.group(3) not in _RATE_UNITS or int(match.group(1)) < 1:
        return None
    per = float(match.group(2) or 1) * _RATE_UNITS[match.group(3)]
    return int(match.group(1)), per


def variable_for(field: str) -> str:
    """The variable the user set for ``field`` (or its main name when unset)."""
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info else None
    names = [str(n) for n in alias.choices] if isinstance(alias, AliasChoices) else [field.upper()]
    for name in names:
        if name in os.environ or name.lower() in os.environ:
            return name
    return names[0]


def load_settings(**overrides: Any) -> Settings:
    """Build settings; a wrong value raises ConfigError with one line naming the variable."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**overrides)
        if settings.api_keys.get_secret_value().startswith("@"):
            settings.api_key_set()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        field = _field_of(field)
        bad = first.get("input")
        shown = "" if "key" in field or isinstance(bad, dict) else f" (got {bad!r})"
        raise ConfigError(f"{variable_for(field)}: {first['msg']}{shown}") from None
    except OSError as exc:
        raise ConfigError(f"CHATGATE_API_KEYS: cannot read key file: {exc.strerror}") from None
    return settings


def _field_of(loc: str) -> str:
    """Map an error location (a field or one of its aliases) back to the field name."""
    if loc in Settings.model_fields:
        return loc
    for name, info in Settings.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices) and loc.lower() in (str(c).lower() for c in alias.choices):
            return name
    return loc


@cache
def get_settings() -> Settings:
    return load_settings()
