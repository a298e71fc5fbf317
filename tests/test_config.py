"""Settings: the README's variables and the seeds' aliases, the ``.env`` file, flags, and
the one-line error for a wrong value."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices, SecretStr

from chatgate.config import ConfigError, Settings, load_settings
from chatgate.providers import provider_names
from chatgate.providers.base import registered_providers
from chatgate.providers.gemini import GeminiSettings
from chatgate.providers.local import LocalSettings
from chatgate.providers.ollama import OllamaSettings
from chatgate.providers.openai import OpenAISettings

Getter = Callable[[Settings], Any]


def every_variable() -> set[str]:
    """The gateway's variables and every registered provider's."""
    names = {"CHATGATE_DATA_DIR", "OTEL_EXPORTER_OTLP_ENDPOINT"}
    models = [Settings, *(registration.settings for registration in registered_providers().values())]
    for model in models:
        for info in model.model_fields.values():
            if isinstance(info.validation_alias, AliasChoices):
                names.update(str(choice) for choice in info.validation_alias.choices)
    return names


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No variable of the developer's, and no ``.env`` but the test's own."""
    for name in every_variable():
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.chdir(tmp_path)


def secret(value: SecretStr | None) -> str | None:
    return None if value is None else value.get_secret_value()


# Every row of the README's configuration table, main name and seed aliases alike.
VARIABLES: list[tuple[str, str, Getter, Any]] = [
    ("CHATGATE_HOST", "0.0.0.0", lambda s: s.host, "0.0.0.0"),
    ("CHATGATE_PORT", "9001", lambda s: s.port, 9001),
    ("GATEWAY_PORT", "8001", lambda s: s.port, 8001),
    ("CHATGATE_PROVIDER", "openai", lambda s: s.provider, "openai"),
    ("PROVIDER", "ollama", lambda s: s.provider, "ollama"),
    ("OLLAMA_HOST", "http://10.0.0.5:11434", lambda s: s.upstream(OllamaSettings).ollama_host, "http://10.0.0.5:11434"),
    ("OLLAMA_URL", "http://127.0.0.1:8008", lambda s: s.upstream(OllamaSettings).ollama_host, "http://127.0.0.1:8008"),
    ("CHATGATE_MODEL", "qwen2.5:0.5b", lambda s: s.model, "qwen2.5:0.5b"),
    ("OLLAMA_MODEL", "llama3.2:latest", lambda s: s.model, "llama3.2:latest"),
    ("OLLAMA_MODEL_GENERAL", "gpt-oss:20b", lambda s: s.model, "gpt-oss:20b"),
    ("CHATGATE_FALLBACK_MODELS", "a, b,,c", lambda s: s.fallback_model_list, ["a", "b", "c"]),
    ("CHATGATE_OPENAI_BASE_URL", "http://vllm:8000/v1", lambda s: s.upstream(OpenAISettings).openai_base_url,
     "http://vllm:8000/v1"),
    ("CHATGATE_OPENAI_API_KEY", "sk-abc", lambda s: secret(s.upstream(OpenAISettings).openai_api_key), "sk-abc"),
    ("GEMINI_API_KEY", "g-key", lambda s: secret(s.upstream(GeminiSettings).gemini_api_key), "g-key"),
    ("GOOGLE_API_KEY", "goog-key", lambda s: secret(s.upstream(GeminiSettings).gemini_api_key), "goog-key"),
    ("CHATGATE_GEMINI_BASE_URL", "http://gem.lan", lambda s: s.upstream(GeminiSettings).gemini_base_url,
     "http://gem.lan"),
    ("CHATGATE_LOCAL_MODEL_PATH", "/models/x.gguf", lambda s: s.upstream(LocalSettings).local_model_path,
     "/models/x.gguf"),
    ("CHATGATE_STORE", "redis://cache:6379/2", lambda s: s.store_url, "redis://cache:6379/2"),
    ("CHATGATE_ENABLE_MEMORY", "false", lambda s: s.enable_memory, False),
    ("ENABLE_MEMORY", "false", lambda s: s.enable_memory, False),
    ("CHATGATE_MEMORY_MAX_TURNS", "7", lambda s: s.memory_max_turns, 7),
    ("HISTORY_MAX_LENGTH", "8", lambda s: s.memory_max_turns, 8),
    ("MEMORY_MAX_TURNS", "9", lambda s: s.memory_max_turns, 9),
    ("CHATGATE_SESSION_TTL_S", "120", lambda s: s.session_ttl_s, 120.0),
    ("MEMORY_TTL_MIN", "5", lambda s: s.session_ttl_s, 300.0),
    ("CHATGATE_MAX_CONVERSATIONS", "50", lambda s: s.max_conversations, 50),
    ("MEMORY_MAX_CONVERSATIONS", "60", lambda s: s.max_conversations, 60),
    ("CHATGATE_MAX_MESSAGE_BYTES", "2048", lambda s: s.max_message_bytes, 2048),
    ("MAX_MESSAGE_SIZE", "10240", lambda s: s.max_message_bytes, 10240),
    ("CHATGATE_REQUEST_TIMEOUT_S", "45", lambda s: s.request_timeout_s, 45.0),
    ("REQUEST_TIMEOUT", "30.0", lambda s: s.request_timeout_s, 30.0),
    ("CHATGATE_CONNECT_TIMEOUT_S", "2", lambda s: s.connect_timeout_s, 2.0),
    ("CONNECT_TIMEOUT", "7.5", lambda s: s.connect_timeout_s, 7.5),
    (
        "CHATGATE_CORS_ORIGINS",
        "http://a.example",
        lambda s: s.cors_origin_list,
        ["http://a.example"],
    ),
    (
        "CORS_ORIGINS",
        "http://localhost:5173,http://localhost:3000",
        lambda s: s.cors_origin_list,
        ["http://localhost:5173", "http://localhost:3000"],
    ),
    ("CHATGATE_ALLOWED_HOSTS", "Chat.example.com, .lan, [fd00::1]", lambda s: s.allowed_host_list,
     ["chat.example.com", ".lan", "fd00::1"]),
    ("CHATGATE_API_KEYS", "k1, k2", lambda s: s.api_key_set(), frozenset({"k1", "k2"})),
    ("CHATGATE_SECRET", "0123456789abcdef", lambda s: secret(s.secret), "0123456789abcdef"),
    ("CHATGATE_PUBLIC_PATHS", "/metrics, /agents", lambda s: s.public_path_set, frozenset({"/metrics", "/agents"})),
    ("CHATGATE_RATE_LIMIT", "30/minute", lambda s: s.rate, (30, 60.0)),
    ("CHATGATE_MAX_STREAMS_PER_CLIENT", "3", lambda s: s.max_streams_per_client, 3),
    ("CHATGATE_MAX_CONNECTIONS", "500", lambda s: s.max_connections, 500),
    ("CHATGATE_RESUME_GRACE_S", "12.5", lambda s: s.resume_grace_s, 12.5),
    ("CHATGATE_DRAIN_S", "5", lambda s: s.drain_s, 5.0),
    ("CHATGATE_CHECKPOINT_S", "0.5", lambda s: s.checkpoint_s, 0.5),
    ("CHATGATE_MAX_HEADER_BYTES", "16384", lambda s: s.max_header_bytes, 16384),
    ("CHATGATE_MAX_HEADERS", "40", lambda s: s.max_headers, 40),
    ("CHATGATE_HEADER_TIMEOUT_S", "4", lambda s: s.header_timeout_s, 4.0),
    ("CHATGATE_BODY_TIMEOUT_S", "12.5", lambda s: s.body_timeout_s, 12.5),
    ("CHATGATE_KEEPALIVE_TIMEOUT_S", "2", lambda s: s.keepalive_timeout_s, 2.0),
    ("CHATGATE_MAX_CONNECTIONS_PER_ADDRESS", "0", lambda s: s.max_connections_per_address, 0),
    ("CHATGATE_SEND_BUFFER_BYTES", "65536", lambda s: s.send_buffer_bytes, 65536),
    ("CHATGATE_AGENTS_DIR", "/etc/chatgate/agents", lambda s: s.agents_dir, Path("/etc/chatgate/agents")),
    ("CHATGATE_TEMPERATURE", "0.3", lambda s: s.generation_options.temperature, 0.3),
    ("TEMPERATURE", "0.7", lambda s: s.generation_options.temperature, 0.7),
    ("CHATGATE_NUM_CTX", "4096", lambda s: s.generation_options.num_ctx, 4096),
    ("CTX_TOKENS", "2048", lambda s: s.generation_options.num_ctx, 2048),
    ("CHATGATE_MAX_TOKENS", "256", lambda s: s.generation_options.max_tokens, 256),
    ("MAX_TOKENS", "128", lambda s: s.generation_options.max_tokens, 128),
    ("CHATGATE_MAX_ANSWER_TOKENS", "2048", lambda s: s.max_answer_tokens, 2048),
    ("CHATGATE_MAX_ANSWER_S", "120", lambda s: s.max_answer_s, 120.0),
    ("CHATGATE_BREAKER_FAILURES", "3", lambda s: s.breaker_failures, 3),
    ("CHATGATE_BREAKER_COOLDOWN_S", "10", lambda s: s.breaker_cooldown_s, 10.0),
]


@pytest.mark.parametrize(("variable", "value", "get", "expected"), VARIABLES, ids=[v[0] for v in VARIABLES])
def test_variable_sets_its_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, get: Getter, expected: Any
) -> None:
    default = get(load_settings())
    assert default != expected, "the value under test must differ from the default"
    monkeypatch.setenv(variable, value)
    assert get(load_settings()) == expected


def test_defaults_match_the_readme() -> None:
    settings = load_settings()
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.provider == "auto"
    assert settings.upstream(OllamaSettings).ollama_host == "http://127.0.0.1:11434"
    assert settings.model is None and settings.fallback_model_list == []
    assert settings.enable_memory is True
    assert settings.memory_max_turns == 20
    assert settings.session_ttl_s == 3600
    assert settings.max_conversations == 10_000
    assert settings.max_message_bytes == 16_384
    assert (settings.request_timeout_s, settings.connect_timeout_s) == (300, 5)
    assert settings.cors_origin_list == [] and settings.api_key_set() == frozenset()
    assert settings.rate is None
    assert (settings.max_streams_per_client, settings.max_connections) == (0, 10_000)
    assert settings.resume_grace_s == 30 and settings.agents_dir is None
    assert settings.store_url.startswith("sqlite:///") and settings.store_url.endswith(".db")


def test_chatgate_name_wins_over_the_seed_alias(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_PORT", "8001")
    monkeypatch.setenv("CHATGATE_PORT", "9001")
    monkeypatch.setenv("OLLAMA_MODEL", "old")
    monkeypatch.setenv("CHATGATE_MODEL", "new")
    settings = load_settings()
    assert (settings.port, settings.model) == (9001, "new")


def test_session_ttl_in_seconds_wins_over_minutes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEMORY_TTL_MIN", "5")
    monkeypatch.setenv("CHATGATE_SESSION_TTL_S", "42")
    assert load_settings().session_ttl_s == 42


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGATE_PORT", "9001")
    monkeypatch.setenv("GATEWAY_PORT", "8001")
    monkeypatch.setenv("CHATGATE_HOST", "0.0.0.0")
    settings = load_settings(port=9100, host=None)
    assert settings.port == 9100
    assert settings.host == "0.0.0.0", "a flag that was not given does not override"


def test_dotenv_in_the_working_folder_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(
        "# a seed's .env\nGATEWAY_PORT=8001\nOLLAMA_MODEL_GENERAL=phi3:mini\nENABLE_MEMORY=false\n"
        "MEMORY_TTL_MIN=5\nTEMPERATURE=0.2\nUNRELATED=whatever\nCHATGATE_STORE=\n",
        encoding="utf-8",
    )
    settings = load_settings()
    assert settings.port == 8001
    assert settings.model == "phi3:mini"
    assert settings.enable_memory is False
    assert settings.session_ttl_s == 300
    assert settings.temperature == 0.2
    assert settings.store == ""


def test_environment_and_flags_win_over_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("CHATGATE_PORT=8001\nCHATGATE_MODEL=from-file\n", encoding="utf-8")
    monkeypatch.setenv("CHATGATE_MODEL", "from-env")
    assert load_settings().model == "from-env"
    assert load_settings(port=9100).port == 9100


def test_api_keys_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text("k1\nk2, k3\n\n", encoding="utf-8")
    monkeypatch.setenv("CHATGATE_API_KEYS", f"@{keys}")
    assert load_settings().api_key_set() == frozenset({"k1", "k2", "k3"})


def test_missing_api_key_file_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CHATGATE_API_KEYS", f"@{tmp_path / 'nope.txt'}")
    with pytest.raises(ConfigError, match=r"^CHATGATE_API_KEYS: "):
        load_settings()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CHATGATE_PORT", "abc"),
        ("GATEWAY_PORT", "70000"),
        ("PROVIDER", "nonsense"),
        ("CHATGATE_PROVIDER", "nonsense"),
        ("MEMORY_TTL_MIN", "soon"),
        ("HISTORY_MAX_LENGTH", "-1"),
        ("TEMPERATURE", "5"),
        ("ENABLE_MEMORY", "perhaps"),
        ("CHATGATE_RATE_LIMIT", "lots"),
        ("MAX_MESSAGE_SIZE", "big"),
    ],
)
def test_wrong_value_names_its_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_unknown_provider_names_the_known_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHATGATE_PROVIDER", "olama")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    head, _, known = str(caught.value).partition("; known: ")
    assert head == "CHATGATE_PROVIDER: unknown provider 'olama'"
    assert known.split(", ") == provider_names()
    assert {"auto", "gemini", "local", "ollama", "openai"} <= set(provider_names())


def test_an_override_no_settings_have_is_refused() -> None:
    """Overrides go to the settings that have a field of their name; a misspelt one would
    otherwise be dropped without a word."""
    with pytest.raises(TypeError, match="olama_host"):
        load_settings(olama_host="http://gpu-box:11434")


def test_a_wrong_provider_setting_names_its_variable_and_hides_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OLLAMA_URL", "ftp://ollama:21")
    with pytest.raises(ConfigError, match=r"^OLLAMA_URL: .*\(got 'ftp://ollama:21'\)$"):
        load_settings()
    monkeypatch.delenv("OLLAMA_URL")
    with pytest.raises(ConfigError) as caught:
        load_settings(gemini_api_key=["sk-do-not-print-me"])
    assert str(caught.value).startswith("GEMINI_API_KEY: ")
    assert "sk-do-not-print-me" not in str(caught.value)


def serve(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -m chatgate serve`` with only ``env`` set of chatgate's variables. Should
    it start after all, the timeout ends it and the test fails."""
    base = {k: v for k, v in os.environ.items() if k not in every_variable()}
    return subprocess.run(
        [sys.executable, "-m", "chatgate", "serve"],
        env={**base, "CHATGATE_STORE": "memory", "CHATGATE_DATA_DIR": str(cwd), **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CHATGATE_PORT", "abc"), ("PROVIDER", "nonsense"), ("REQUEST_TIMEOUT", "-3"), ("MEMORY_TTL_MIN", "x")],
)
def test_serve_refuses_a_wrong_value_in_one_line(tmp_path: Path, variable: str, value: str) -> None:
    env = {variable: value}
    if variable != "CHATGATE_PORT":
        env["CHATGATE_PORT"] = "0"
    result = serve(env, tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]


def test_serve_error_never_shows_a_secret(tmp_path: Path) -> None:
    secret = "sk-do-not-print-me-1234"
    result = serve(
        {"CHATGATE_OPENAI_API_KEY": secret, "GEMINI_API_KEY": secret, "CHATGATE_API_KEYS": secret,
         "CHATGATE_PORT": "abc"},
        tmp_path,
    )
    assert result.returncode == 2
    assert "CHATGATE_PORT" in result.stderr
    assert secret not in result.stderr + result.stdout


def test_serve_port_flag_wins_over_a_wrong_variable_of_the_same_setting(tmp_path: Path) -> None:
    """The flag replaces CHATGATE_PORT; what remains wrong is then reported instead."""
    result = serve({"CHATGATE_PORT": "abc", "PROVIDER": "nonsense"}, tmp_path)
    assert result.returncode == 2 and "PORT" in result.stderr
    base = {k: v for k, v in os.environ.items() if k not in every_variable()}
    flagged = subprocess.run(
        [sys.executable, "-m", "chatgate", "serve", "--port", "0"],
        env={**base, "CHATGATE_STORE": "memory", "CHATGATE_PORT": "abc", "PROVIDER": "nonsense"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert flagged.returncode == 2
    assert flagged.stderr.count("\n") == 1 and "PROVIDER" in flagged.stderr


def test_settings_repr_hides_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    secret_value = "sk-do-not-print-me-1234"
    for variable in ("CHATGATE_OPENAI_API_KEY", "GEMINI_API_KEY", "CHATGATE_API_KEYS"):
        monkeypatch.setenv(variable, secret_value)
    settings = load_settings()
    assert secret_value not in repr(settings) and secret_value not in str(settings)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("ollama", "http://ollama:11434"),
        ("gpu-box:11435", "http://gpu-box:11435"),
        ("0.0.0.0", "http://127.0.0.1:11434"),
        ("http://:11434", "http://127.0.0.1:11434"),
        ("[::]:8080", "http://[::1]:8080"),
        ("http://ollama.lan", "http://ollama.lan"),
        ("https://ollama.example.com/", "https://ollama.example.com"),
        ("http://proxy.lan/ollama/", "http://proxy.lan/ollama"),
        ("http://user:pw@gpu-box:11434", "http://user:pw@gpu-box:11434"),
        ("  http://10.0.0.5:11434  ", "http://10.0.0.5:11434"),
    ],
)
def test_ollama_host_is_read_as_ollama_reads_it(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", value)
    assert load_settings().upstream(OllamaSettings).ollama_host == expected


@pytest.mark.parametrize(
    "value",
    [
        "not a url::",
        "http://bad host:11434",
        "ftp://ollama:21",
        "http://[not-ipv6]:11434",
        "http://ollama:port",
        "ollama:0",
        "ollama:70000",
        "http://ollama:123456",
        "http://ollama:11434?x=1",
        "::1",
    ],
)
@pytest.mark.parametrize("variable", ["OLLAMA_HOST", "OLLAMA_URL"])
def test_unusable_ollama_address_names_its_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message


def test_unusable_ollama_address_given_as_an_override_is_refused_too() -> None:
    with pytest.raises(ConfigError, match=r"^OLLAMA_HOST: .*http\(s\) URL"):
        load_settings(ollama_host="not a url::")


@pytest.mark.parametrize(
    "configure",
    ["OLLAMA_HOST", "OLLAMA_URL", "ollama_host", "dotenv", "override"],
)
def test_a_configured_ollama_address_is_known_as_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, configure: str
) -> None:
    """``auto`` tells a configured Ollama address from the default: the environment (either
    name, any case), ``.env`` and overrides all configure it."""
    assert not load_settings().upstream(OllamaSettings).configured
    overrides: dict[str, Any] = {}
    if configure == "dotenv":
        (tmp_path / ".env").write_text("OLLAMA_URL=http://127.0.0.1:11434\n", encoding="utf-8")
    elif configure == "override":
        overrides["ollama_host"] = "http://127.0.0.1:11434"
    else:
        monkeypatch.setenv(configure, "http://127.0.0.1:11434")
    ollama = load_settings(**overrides).upstream(OllamaSettings)
    assert ollama.configured
    assert ollama.ollama_host == "http://127.0.0.1:11434"
