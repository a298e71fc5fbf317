"""The provider registry: every adapter registers itself with its own settings, a broken
adapter fails at import, and the embedded one imports without its optional extra and then
says what to install when it is chosen."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from chatgate.providers import provider_names
from chatgate.providers.base import ProviderSettings, register_provider, registered_providers
from chatgate.providers.local import NEEDS_LOCAL_EXTRA

#: Makes ``import llama_cpp`` fail as it does without the ``local`` extra.
WITHOUT_LLAMA_CPP = "import sys\nsys.modules['llama_cpp'] = None\n"


def python(
    code: str, cwd: Path, *args: str, prelude: str = "", **variables: str
) -> subprocess.CompletedProcess[str]:
    """``prelude`` then ``code`` in a fresh interpreter, in ``cwd`` (so no ``.env`` but the
    test's own)."""
    base = {k: v for k, v in os.environ.items() if k.upper() not in ("CHATGATE_PROVIDER", "PROVIDER")}
    env = {**base, "CHATGATE_STORE": "memory", "CHATGATE_DATA_DIR": str(cwd), **variables}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def factory(*_: Any) -> Any:
    raise AssertionError("never built")


def test_every_adapter_is_registered_with_its_own_settings() -> None:
    assert {"auto", "gemini", "local", "ollama", "openai"} <= set(provider_names())
    assert provider_names() == sorted(["auto", *registered_providers()])
    for name, registration in registered_providers().items():
        assert registration.name == name
        assert issubclass(registration.settings, ProviderSettings)


class ReusesOllamaField(ProviderSettings):
    ollama_host: str = "http://elsewhere"


class ReusesGatewayField(ProviderSettings):
    model: str = "mine"


class OwnFields(ProviderSettings):
    brand_new_url: str = "http://new"


@pytest.mark.parametrize(
    ("settings", "owner"),
    [(ReusesOllamaField, "ollama_host (also in OllamaSettings)"), (ReusesGatewayField, "model (also in Settings)")],
)
def test_a_field_declared_elsewhere_is_refused(settings: type[ProviderSettings], owner: str) -> None:
    """Overrides are routed by field name alone, so a name must mean one field."""
    with pytest.raises(ValueError) as caught:
        register_provider("clash", settings=settings)(factory)
    assert str(caught.value) == f"cannot register provider 'clash': {owner}"
    assert "clash" not in registered_providers()


@pytest.mark.parametrize("name", ["auto", "ollama"])
def test_a_taken_name_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="the name is taken"):
        register_provider(name, settings=OwnFields)(factory)
    assert all(registration.settings is not OwnFields for registration in registered_providers().values())


def test_settings_need_the_providers_package_which_config_does_not_import(tmp_path: Path) -> None:
    result = python(
        """
        import sys
        from chatgate.config import load_settings
        assert "chatgate.providers" not in sys.modules
        try:
            load_settings()
        except RuntimeError as exc:
            print(exc)
        import chatgate.providers
        print(load_settings(ollama_host="gpu-box").provider)
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "load_settings() needs chatgate.providers imported: it loads the providers' settings",
        "auto",
    ]


def test_a_broken_adapter_fails_at_import(tmp_path: Path) -> None:
    result = python(
        """
        import sys
        sys.modules['chatgate.providers.gemini'] = None  # as if importing it raised
        import chatgate.providers
        """,
        tmp_path,
    )
    assert result.returncode == 1
    assert "Error: import of chatgate.providers.gemini halted" in result.stderr


def test_the_embedded_adapter_imports_without_its_extra_and_says_what_to_install(tmp_path: Path) -> None:
    result = python(
        """
        import asyncio
        from chatgate.config import ConfigError, load_settings
        from chatgate.providers import build_provider, configuration_problem
        from chatgate.providers.base import ProviderUnavailable
        from chatgate.providers.local import LocalProvider

        settings = load_settings(provider="local")
        print(configuration_problem(settings))
        try:
            asyncio.run(build_provider(settings))
        except ConfigError as exc:
            print(exc)
        try:
            LocalProvider(sys.argv[1])._load()
        except ProviderUnavailable as exc:
            print(exc.message.partition(" (")[0])
        print(configuration_problem(load_settings(provider="ollama")))
        """,
        tmp_path,
        str(tmp_path / "model.gguf"),
        prelude=WITHOUT_LLAMA_CPP,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [NEEDS_LOCAL_EXTRA] * 3 + ["None"]


def test_serve_with_the_embedded_model_but_not_its_extra_is_one_line(tmp_path: Path) -> None:
    result = python(
        """
        from chatgate.cli import main
        sys.exit(main(["serve", "--port", "0"]))
        """,
        tmp_path,
        prelude=WITHOUT_LLAMA_CPP,
        CHATGATE_PROVIDER="local",
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == f"chatgate: configuration error: {NEEDS_LOCAL_EXTRA}\n"
