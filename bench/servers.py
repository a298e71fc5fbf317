"""The processes under test: start them on free loopback ports, wait (bounded) until they
answer, read their CPU time and memory from /proc, and stop their whole process group."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
CHATGATE = Path(sys.executable).with_name("chatgate")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
POLL_S = 0.1
STOP_S = 5.0
MAX_TREE = 256
TASKSET = "/usr/bin/taskset"


class StartError(RuntimeError):
    pass


def raise_nofile_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: thousands of sockets need thousands of fds."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


@dataclass
class Service:
    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGTERM to the service's own process group, SIGKILL after STOP_S."""
        if self.process.poll() is not None:
            return
        for signum in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signum)
            try:
                self.process.wait(timeout=STOP_S)
                return
            except subprocess.TimeoutExpired:
                continue


def spawn(name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log_dir,  # not the repo: a developer's .env there must not change the bench
            start_new_session=True,
            preexec_fn=raise_nofile_limit,
        )
    return process, log_path


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    """``argv`` confined to the cores ``cpus`` (a taskset list, e.g. "0" or "1,2"), or as it
    is when None. taskset execs the program, so the pid stays the program's."""
    return [TASKSET, "-c", cpus, *argv] if cpus else argv


def _check_alive(name: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    if process.poll() is not None:
        tail = log_path.read_text(errors="replace")[-800:]
        raise StartError(f"{name} exited with {process.returncode}:\n{tail}")


def wait_for_log(name: str, process: subprocess.Popen[bytes], log_path: Path, pattern: str, timeout_s: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(name, process, log_path)
        match = re.search(pattern, log_path.read_text(errors="replace"))
        if match:
            return match
        time.sleep(POLL_S)
    raise StartError(f"{name} did not print {pattern!r} within {timeout_s:.0f} s (see {log_path})")


def http_status(url: str, body: bytes | None = None, timeout_s: float = 5.0) -> int:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def wait_for_http(name: str, process: subprocess.Popen[bytes], log_path: Path, url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _check_alive(name, process, log_path)
        with contextlib.suppress(OSError):
            if http_status(url, timeout_s=1.0) == 200:
                return
        time.sleep(POLL_S)
    raise StartError(f"{name} did not answer {url} within {timeout_s:.0f} s (see {log_path})")


def _base_env() -> dict[str, str]:
    """The caller's environment without chatgate's own settings, so only ours apply."""
    prefixes = ("CHATGATE_", "OLLAMA_", "GEMINI_", "GOOGLE_API", "OTEL_", "LITELLM_")
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def start_fake(log_dir: Path, name: str, tokens: int, tps: float = 0.0, cpus: str | None = None) -> Service:
    argv = [str(CHATGATE), "fake-llm", "--host", HOST, "--port", "0", "--tokens", str(tokens), "--tps", str(tps)]
    process, log_path = spawn(name, pinned(argv, cpus), _base_env(), log_dir)
    try:
        match = wait_for_log(name, process, log_path, r"fake-llm listening on (http://\S+)", 20)
    except BaseException:
        Service(name, process, "", log_path).stop()
        raise
    return Service(name, process, match.group(1), log_path)


def start_bare_relay(log_dir: Path, upstream: str) -> Service:
    """bench/bare_relay.py over ``upstream``: the floor a Python relay sets on this machine."""
    argv = [sys.executable, str(REPO / "bench" / "bare_relay.py"), "--upstream", upstream, "--host", HOST]
    process, log_path = spawn("bare-relay", argv, _base_env(), log_dir)
    try:
        match = wait_for_log("bare-relay", process, log_path, r"bare relay listening on (http://\S+)", 20)
    except BaseException:
        Service("bare-relay", process, "", log_path).stop()
        raise
    return Service("bare-relay", process, match.group(1), log_path)


def start_gateway(log_dir: Path, name: str, upstream: str, store: str, workers: int = 1,
                  extra_env: dict[str, str] | None = None, server: str = "uvicorn",
                  cpus: str | None = None) -> Service:
    """``chatgate serve`` (uvicorn); ``server="granian"`` runs the same app under granian
    instead, for the comparison in RESULTS.md. ``cpus`` pins it (and its workers) to those cores."""
    port = free_port()
    env = {
        **_base_env(),
        "CHATGATE_PROVIDER": "ollama",
        "OLLAMA_HOST": upstream,
        "CHATGATE_MODEL": "fake-model",
        "CHATGATE_STORE": store,
        "CHATGATE_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    argv = [str(CHATGATE), "serve", "--host", HOST, "--port", str(port), "--workers", str(workers)]
    if server == "granian":
        argv = [str(CHATGATE.with_name("granian")), "--interface", "asgi", "--factory", "--loop", "uvloop",
                "--host", HOST, "--port", str(port), "--workers", str(workers), "--log-level", "warning",
                "--backlog", "4096", "chatgate.app:app_from_environment"]
    process, log_path = spawn(name, pinned(argv, cpus), env, log_dir)
    service = Service(name, process, f"http://{HOST}:{port}", log_path)
    try:
        wait_for_http(name, process, log_path, f"{service.url}/health/live", 60)
    except BaseException:
        service.stop()
        raise
    return service


def litellm_binary(venv: Path | None) -> Path | None:
    candidate = (venv or REPO / "bench" / ".litellm-venv") / "bin" / "litellm"
    return candidate if candidate.exists() else None


def start_litellm(log_dir: Path, binary: Path, upstream: str) -> Service:
    port = free_port()
    env = {
        **_base_env(),
        # Loopback only and no keys anywhere in the bench, as chatgate runs without auth here.
        "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
    }
    argv = [str(binary), "--model", "ollama_chat/fake-model", "--api_base", upstream,
            "--host", HOST, "--port", str(port), "--num_workers", "1"]
    process, log_path = spawn("litellm", argv, env, log_dir)
    service = Service("litellm", process, f"http://{HOST}:{port}", log_path)
    try:
        wait_for_http("litellm", process, log_path, f"{service.url}/health/liveliness", 120)
    except BaseException:
        service.stop()
        raise
    return service


# --- /proc -------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()  # fields from "state" on (field 3)


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                children.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(int(entry.name))
    return children


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def machine_busy_s() -> float:
    """CPU seconds all cores spent not idle since boot (to see whether the machine is full)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def wait_for_quiet(max_wait_s: float, below_cores: float, window_s: float = 0.5) -> float:
    """Wait, at most ``max_wait_s``, until the machine (our servers idle between cells, so
    that is everybody else) is using fewer than ``below_cores``; returns the last reading."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = machine_busy_s()
        time.sleep(window_s)
        busy = (machine_busy_s() - before) / window_s
        if busy < below_cores or time.monotonic() >= deadline:
            return busy


class ProcessTree:
    """A process and its descendants (uvicorn's workers when --workers > 1)."""

    def __init__(self, root: int) -> None:
        self.root = root

    def pids(self) -> list[int]:
        children = _children()
        found: list[int] = []
        todo = [self.root]
        while todo and len(found) < MAX_TREE:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def cpu_s(self) -> float:
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = _stat_fields(pid)
                total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        return total / CLOCK_TICKS

    def rss_kib(self) -> int:
        return sum(_status_kib(pid, "VmRSS") for pid in self.pids())

    def peak_kib(self) -> int:
        """Sum of VmHWM: each process's peak since start or since reset_peak()."""
        return sum(_status_kib(pid, "VmHWM") for pid in self.pids())

    def reset_peak(self) -> bool:
        """Writing 5 to clear_refs resets VmHWM (Linux >= 4.0); False when not allowed."""
        try:
            for pid in self.pids():
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            return False
        return True
