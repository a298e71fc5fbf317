"""chatgate as a cluster on one Redis: what mirroring each answer's log into Redis costs
against the in-process log, what the turn checkpoints cost, and what a second instance
behind nginx buys. Every figure is a ratio against a reference measured in the same run.

    .venv/bin/python bench/cluster.py            # about 10 minutes; its section in bench/RESULTS.md
    .venv/bin/python bench/cluster.py --quick    # short cells, to bench/out/quick/ only

1. The log: one gateway (1 worker) with the SQLite store (the in-process log) against one
   with a Redis store (the log mirrored into a Redis Stream, conversations in Redis),
   ``POST /chat`` and ``/ws`` at 50 clients, over a fake upstream without delay (40 tokens)
   and one paced at 100 tokens/s (200 tokens), where batching matters. CPU of the gateway
   and of redis-server per 1,000 tokens, and XADD entries per answer (INFO commandstats).
   The memory store (in-process log, nothing written anywhere) is measured beside them.
2. The checkpoints: on the paced upstream, the SQLite gateway at the default
   ``CHATGATE_CHECKPOINT_S`` against one at 1000 s (never, within an answer).
3. The instances: one instance behind nginx against two (on one Redis), and one without
   nginx, at 50 and 200 clients, ``POST /chat`` and ``/ws``; the fake upstream directly as
   the reference.

Closed loop (each client asks again as soon as its answer ends), load from 2 ``load.py``
processes. Starts its own redis-server, nginx (a minimal configuration of its own: both
instances in one ``least_conn`` upstream, WebSocket upgrade, no buffering, keep-alive),
fake upstreams and gateways on free loopback ports, each in its own process group, and
stops them all in a ``finally``. Writes bench/out/cluster.json and .md (quick: under
bench/out/quick/); a full run also puts its section into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import cluster_report
import redis
from report import put_section
from run import git, machine
from scenarios import LoadGroup, _merged, split
from servers import (
    HOST,
    REPO,
    ProcessTree,
    Service,
    StartError,
    free_port,
    machine_busy_s,
    raise_nofile_limit,
    spawn,
    start_fake,
    start_gateway,
    wait_for_http,
    wait_for_log,
    wait_for_quiet,
)

from chatgate.config import Settings

BENCH = REPO / "bench"
LOAD_PROCESSES = 2
ANSWER_TIMEOUT_S = 30.0
QUIET_BELOW_CORES = 0.3
#: The CPU window starts and ends this long before the load's counting window.
READ_EARLY_S = 0.05
#: "Never" within an answer: the paced answers last 2 s.
NO_CHECKPOINT_S = 1000.0
DEFAULT_CHECKPOINT_S = float(Settings.model_fields["checkpoint_s"].default)
PROTOCOLS = {"chat": "text", "ws": "ws", "direct": "ollama"}

NGINX_CONF = """\
worker_processes auto;
pid nginx.pid;
error_log error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path client_body_temp;
    proxy_temp_path proxy_temp;
    fastcgi_temp_path fastcgi_temp;
    uwsgi_temp_path uwsgi_temp;
    scgi_temp_path scgi_temp;
    map $http_upgrade $connection_upgrade { default upgrade; '' ''; }
    upstream chatgate {
        least_conn;
@SERVERS@
        keepalive 64;
        keepalive_timeout 4s;
    }
    server {
        listen @LISTEN@;
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $http_host;
        proxy_buffering off;
        proxy_request_buffering off;
        location / { proxy_pass http://chatgate; }
    }
}
"""


@dataclass(frozen=True)
class Plan:
    warmup_s: float
    duration_s: float
    #: Clients of the log and checkpoint cells.
    clients: int
    #: Clients of the instance cells.
    levels: tuple[int, ...]
    burst_tokens: int
    paced_tokens: int
    paced_tps: float
    #: The instance cells also run one instance without nginx.
    without_nginx: bool
    quiet_wait_s: float
    repeat: int

    @property
    def paced_warmup_s(self) -> float:
        """Long enough for every client to be past its first answer."""
        return max(self.warmup_s, 1.5 * self.paced_tokens / self.paced_tps)


FULL = Plan(warmup_s=2.0, duration_s=10.0, clients=50, levels=(50, 200), burst_tokens=40, paced_tokens=200,
            paced_tps=100.0, without_nginx=True, quiet_wait_s=10.0, repeat=1)
QUICK = Plan(warmup_s=0.2, duration_s=0.6, clients=10, levels=(20,), burst_tokens=40, paced_tokens=20,
             paced_tps=100.0, without_nginx=False, quiet_wait_s=0.0, repeat=1)


class RedisServer:
    """Our own redis-server: its process for CPU, a client for INFO and FLUSHALL."""

    def __init__(self, service: Service, port: int) -> None:
        self.service = service
        self.tree = ProcessTree(service.pid)
        self.client = redis.Redis(host=HOST, port=port)
        self.store_url = f"redis://{HOST}:{port}/0"

    def commands(self) -> dict[str, int]:
        """Calls of each command since it started (INFO commandstats), INFO's own left out."""
        stats = self.client.info("commandstats")
        calls = {name.removeprefix("cmdstat_"): int(stat["calls"]) for name, stat in stats.items()}
        calls.pop("info", None)
        return calls

    def version(self) -> str:
        return str(self.client.info("server")["redis_version"])


def start_redis_server(stack: ExitStack, log_dir: Path) -> RedisServer:
    binary = shutil.which("redis-server")
    if binary is None:
        raise StartError("redis-server is not installed (Debian: apt-get install redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
            "--protected-mode", "yes"]
    process, log_path = spawn("redis", argv, dict(os.environ), log_dir)
    service = started(stack, Service("redis", process, f"redis://{HOST}:{port}", log_path))
    # Printed only once it listens: a port taken meanwhile ends this process instead.
    wait_for_log("redis", process, log_path, r"Ready to accept connections", 15)
    server = RedisServer(service, port)
    stack.callback(server.client.close)
    return server


def nginx_binary() -> str:
    found = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                           if Path(p).is_file()), None)
    if found is None:
        raise StartError("nginx is not installed (Debian: apt-get install nginx)")
    return found


def nginx_version() -> str:
    try:
        result = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError, StartError):
        return "?"
    return result.stderr.strip().rpartition("/")[2]


def start_nginx(stack: ExitStack, log_dir: Path, name: str, backends: list[Service]) -> Service:
    """nginx in the foreground on a free port, everything it writes under its own prefix."""
    port = free_port()
    prefix = log_dir / name
    prefix.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(f"        server {b.url.removeprefix('http://')};" for b in backends)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.replace("@SERVERS@", servers).replace("@LISTEN@", f"{HOST}:{port}"))
    argv = [nginx_binary(), "-p", str(prefix), "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
    process, log_path = spawn(name, argv, dict(os.environ), log_dir)
    service = started(stack, Service(name, process, f"http://{HOST}:{port}", log_path))
    wait_for_http(name, process, log_path, f"{service.url}/health/live", 20)
    return service


def started(stack: ExitStack, service: Service) -> Service:
    stack.callback(service.stop)
    return service


def sqlite_url(out: Path, name: str) -> str:
    path = out / f"cluster-{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


@dataclass
class Rig:
    """The servers a cell's figures are read from, besides its load."""

    upstream: Service
    redis: RedisServer
    gateways: list[Service] = field(default_factory=list)
    nginx: Service | None = None

    def read(self) -> dict[str, float]:
        """Cumulative counters; Redis's calls of each command as ``cmd:NAME``."""
        reading = {
            "machine": machine_busy_s(),
            "upstream": ProcessTree(self.upstream.pid).cpu_s(),
            "redis": self.redis.tree.cpu_s(),
            "nginx": ProcessTree(self.nginx.pid).cpu_s() if self.nginx else 0.0,
        }
        reading.update((f"cmd:{name}", float(calls)) for name, calls in self.redis.commands().items())
        for index, gateway in enumerate(self.gateways):
            reading[f"gateway{index}"] = ProcessTree(gateway.pid).cpu_s()
        return reading


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def measure(rig: Rig, target: str, url: str, clients: int, tokens: int, warmup_s: float,
            plan: Plan) -> dict[str, Any]:
    """One closed-loop cell; CPU and Redis's counts over its measured window only."""
    job = {"mode": "answers", "protocol": PROTOCOLS[target], "url": url, "tokens": tokens, "warmup_s": warmup_s,
           "duration_s": plan.duration_s, "answer_timeout_s": ANSWER_TIMEOUT_S}
    background = wait_for_quiet(plan.quiet_wait_s, QUIET_BELOW_CORES) if plan.quiet_wait_s > 0 else None
    group = LoadGroup([{**job, "concurrency": share} for share in split(clients, LOAD_PROCESSES)])
    try:
        # Read a moment early: a load process may exit as soon as its window ends.
        start = group.go() + warmup_s - READ_EARLY_S
        _sleep_until(start)
        before = {**rig.read(), "clients": group.cpu_s()}
        _sleep_until(start + plan.duration_s)
        after = {**rig.read(), "clients": group.cpu_s()}
        results = [m["result"] for m in group.expect("result", ANSWER_TIMEOUT_S + 20)]
    finally:
        group.close()
    cell = _merged(results)
    used = {key: after[key] - before.get(key, 0.0) for key in after}
    seconds, thousands = plan.duration_s, max(cell["tokens"], 1) / 1000
    answers = max(cell["completed"], 1)
    by_instance = [used[f"gateway{i}"] for i in range(len(rig.gateways))]
    serving = sum(by_instance) + used["redis"] + used["nginx"]
    calls = {key.removeprefix("cmd:"): round(n / answers, 2) for key, n in sorted(used.items())
             if key.startswith("cmd:") and n > 0}
    known = serving + used["upstream"] + used["clients"]
    return {
        **{k: cell[k] for k in ("completed", "errors", "error_samples", "tokens", "ttft_p50_ms", "ttft_p99_ms",
                                "connect_p50_ms", "gap_p50_ms", "gap_p99_ms")},
        "target": target,
        "clients": clients,
        "answers_per_s": cell["completed"] / seconds,
        "gateway_cpu_per_1k": sum(by_instance) / thousands,
        "redis_cpu_per_1k": used["redis"] / thousands,
        "nginx_cpu_per_1k": used["nginx"] / thousands,
        "total_cpu_per_1k": serving / thousands,
        "xadd_per_answer": calls.get("xadd", 0.0),
        "redis_calls_per_answer": sum(calls.values()),
        "redis_calls_by_command": calls,
        "gateway_cores": [round(s / seconds, 3) for s in by_instance],
        "redis_cores": used["redis"] / seconds,
        "nginx_cores": used["nginx"] / seconds,
        "upstream_cores": used["upstream"] / seconds,
        "client_cores": used["clients"] / seconds,
        "machine_busy_cores": used["machine"] / seconds,
        "other_cores": (used["machine"] - known) / seconds,
        "background_cores_before": background,
    }


def best_of(plan: Plan, run_once: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Others share this machine: keep the attempt they disturbed least."""
    attempts = [run_once() for _ in range(plan.repeat)]
    cell = min(attempts, key=lambda c: c["other_cores"])
    cell["attempts"] = [{k: a[k] for k in ("answers_per_s", "total_cpu_per_1k", "other_cores")} for a in attempts]
    return cell


def log_and_checkpoints(plan: Plan, redis_server: RedisServer, out: Path) -> list[dict[str, Any]]:
    """Parts 1 and 2: one gateway per store over each upstream, cells interleaved so that
    drift on the machine touches every store alike."""
    logs, cells = out / "logs", []
    cases = (("burst", plan.burst_tokens, 0.0, plan.warmup_s),
             ("paced", plan.paced_tokens, plan.paced_tps, plan.paced_warmup_s))
    for upstream, tokens, tps, warmup_s in cases:
        with ExitStack() as stack:
            fake = started(stack, start_fake(logs, f"fake-{upstream}", tokens, tps))
            redis_server.client.flushall()
            stores = {
                "memory": started(stack, start_gateway(logs, f"memory-{upstream}", fake.url, "memory")),
                "sqlite": started(stack, start_gateway(logs, f"sqlite-{upstream}", fake.url,
                                                       sqlite_url(out, upstream))),
                "redis": started(stack, start_gateway(logs, f"redis-{upstream}", fake.url, redis_server.store_url)),
            }
            if tps:
                stores["sqlite-no-checkpoint"] = started(stack, start_gateway(
                    logs, f"sqlite-no-checkpoint-{upstream}", fake.url, sqlite_url(out, f"{upstream}-nc"),
                    extra_env={"CHATGATE_CHECKPOINT_S": str(NO_CHECKPOINT_S)}))
            for target in ("chat", "ws"):
                for store, gateway in stores.items():
                    url = gateway.url + "/chat" if target == "chat" else gateway.url.replace("http", "ws", 1) + "/ws"
                    rig = Rig(fake, redis_server, [gateway])
                    cell = best_of(plan, partial(measure, rig, target, url, plan.clients, tokens, warmup_s, plan))
                    cell.update(part="log", upstream=upstream, store=store,
                                checkpoint_s=NO_CHECKPOINT_S if store.endswith("no-checkpoint")
                                else DEFAULT_CHECKPOINT_S)
                    cells.append(cell)
                    report(cell, f"{upstream} {store}")
    return cells


def instances(plan: Plan, redis_server: RedisServer, out: Path) -> list[dict[str, Any]]:
    """Part 3: one and two instances on one Redis, behind nginx, and the upstream itself."""
    logs, cells = out / "logs", []
    with ExitStack() as stack:
        fake = started(stack, start_fake(logs, "fake-instances", plan.burst_tokens))
        redis_server.client.flushall()
        first = started(stack, start_gateway(logs, "instance-1", fake.url, redis_server.store_url))
        second = started(stack, start_gateway(logs, "instance-2", fake.url, redis_server.store_url))
        one = start_nginx(stack, logs, "nginx-1", [first])
        two = start_nginx(stack, logs, "nginx-2", [first, second])
        vias: list[tuple[str, Service, Service | None]] = [("one instance, nginx", one, one),
                                                           ("two instances, nginx", two, two)]
        if plan.without_nginx:
            vias.insert(0, ("one instance, no nginx", first, None))
        for clients in plan.levels:
            runs = [("direct", "direct upstream", f"{fake.url}/api/chat", None)]
            for target in ("chat", "ws"):
                for via, front, proxy in vias:
                    url = front.url + "/chat" if target == "chat" else front.url.replace("http", "ws", 1) + "/ws"
                    runs.append((target, via, url, proxy))
            for target, via, url, proxy in runs:
                rig = Rig(fake, redis_server, [first, second], proxy)
                cell = best_of(plan, partial(measure, rig, target, url, clients, plan.burst_tokens, plan.warmup_s,
                                             plan))
                cell.update(part="instances", upstream="burst", via=via)
                cells.append(cell)
                report(cell, via)
    return cells


def report(cell: dict[str, Any], label: str) -> None:
    print(f"  {cell['target']:>6} x{cell['clients']:<4} {label:<24} {cell['answers_per_s']:8.1f} answers/s  "
          f"total CPU {cell['total_cpu_per_1k']:.4f} s/1k tokens  XADD/answer {cell['xadd_per_answer']:.1f}  "
          f"machine {cell['machine_busy_cores']:.2f} cores  errors {cell['errors']}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="0.6 s cells, 10 and 20 clients; RESULTS.md untouched")
    parser.add_argument("--duration", type=float, help="measured seconds per cell (default 10, quick 0.6)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per cell (default 2, quick 0.2; "
                        "the paced cells take at least 1.5 answers' time)")
    parser.add_argument("--repeat", type=int, help="attempts per cell, keeping the least disturbed (default 1)")
    parser.add_argument("--quiet-wait", type=float, help="seconds to wait, before each cell, for the machine to "
                        "fall below 0.3 busy cores (default 10, quick 0)")
    parser.add_argument("--out", type=Path, help="results (default bench/out, quick: bench/out/quick)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(**{
        **asdict(base),
        **{k: v for k, v in (("duration_s", args.duration), ("warmup_s", args.warmup), ("repeat", args.repeat),
                             ("quiet_wait_s", args.quiet_wait)) if v is not None},
    })
    out = (args.out or BENCH / "out" / ("quick" if args.quick else "")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raise_nofile_limit()
    # Stopped from outside, still stop every process this run started (the finally clauses).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    began = time.monotonic()
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
        "machine": machine(),
        "nginx_version": nginx_version(),
        "plan": {**asdict(plan), "paced_warmup_s": plan.paced_warmup_s, "load_processes": LOAD_PROCESSES,
                 "default_checkpoint_s": DEFAULT_CHECKPOINT_S, "no_checkpoint_s": NO_CHECKPOINT_S},
        "cells": [],
    }
    with ExitStack() as stack:
        redis_server = start_redis_server(stack, out / "logs")
        results["redis_version"] = redis_server.version()
        print(f"the log and the checkpoints, {plan.clients} clients", flush=True)
        results["cells"] += log_and_checkpoints(plan, redis_server, out)
        print(f"one and two instances, {', '.join(map(str, plan.levels))} clients", flush=True)
        results["cells"] += instances(plan, redis_server, out)
    results["elapsed_s"] = round(time.monotonic() - began, 1)
    section = cluster_report.markdown(results)
    (out / "cluster.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "cluster.md").write_text(section)
    print(section)
    if not args.quick and args.out is None:
        put_section(BENCH / "RESULTS.md", cluster_report.HEADING, section)
        print(f"wrote its section into {BENCH / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
