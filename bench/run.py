"""chatgate benchmark: every target side by side in one run, on loopback.

    .venv/bin/python bench/run.py [--quick] [--duration S] [--litellm-venv PATH] [--store sqlite]
                                  [--skip idle,streams,relay,granian,sqlite,scaling]
    ./bench/run.sh [same options]     # bootstraps .venv first

Targets: the fake upstream directly (Ollama NDJSON), chatgate over ``POST /chat`` streaming,
its native ``/ws`` (a new connection per answer), ``/v1/chat/completions`` (SSE) and the
Ollama-compatible ``/api/chat`` (NDJSON), and the LiteLLM proxy when bench/.litellm-venv (see
install-litellm.sh) or --litellm-venv has it. Then, unless skipped: chatgate's four APIs again
on a gateway with the SQLite store at 1 and 50 clients (``sqlite``), so both stores are judged
from one run; granian against uvicorn (``granian``); 1 and 2 workers pinned with taskset to
their own cores, the fake and the load on the others (``scaling``); idle WebSockets
(``idle``) and the 20-tokens/s stream ramp (``streams``, with the bare relay: ``relay``).
Writes bench/out/results.json and logs, then bench/RESULTS.md and bench/chart.png; with
--quick all of it goes to bench/out/quick/ (or --out), so a quick check never replaces the record.
--profile TARGET:LEVEL attaches py-spy to the server during that cell; --gateway-env tries a
setting (e.g. CHATGATE_RESUME_GRACE_S=0) on every gateway the run starts.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hotspots
import report
from scenarios import (
    TOKENS_PER_S,
    Lane,
    Settings,
    Target,
    answers_cell,
    idle_websockets,
    stream_ramp,
)
from servers import (
    CHATGATE,
    REPO,
    ProcessTree,
    Service,
    StartError,
    http_status,
    litellm_binary,
    raise_nofile_limit,
    start_bare_relay,
    start_fake,
    start_gateway,
    start_litellm,
)

BENCH = REPO / "bench"
ALL_TARGETS = ("direct", "chat", "ws", "openai", "ollama", "litellm")
#: The SQLite-store gateway's levels (its targets are chatgate's four APIs): enough to judge
#: the added TTFT and the answers/s targets on that store too.
SQLITE_LEVELS = (1, 50)
#: The pinned scaling figure: these worker counts, /chat and /ws at this many clients.
SCALING_WORKERS = (1, 2)
SCALING_LEVEL = 50
STREAM_COUNTS = (250, 500, 750, 1000, 1250, 1500, 1750, 2000, 2500, 3000, 4000, 5000, 6000)
#: The extra-worker gateways and the bare relay start their ramps here; below it all hold.
REFERENCE_FROM = 1000
QUICK_STREAM_COUNTS = (250, 1000, 2000)
ATTEMPT_KEYS = ("answers_per_s", "ttft_p50_ms", "gap_p99_ms", "server_cpu_share", "other_cores")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short cells (3 s) and a short stream ramp")
    parser.add_argument("--duration", type=float, help="measured seconds per cell (default 10, quick 3)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per cell (default 2, quick 1)")
    parser.add_argument("--litellm-venv", type=Path, help="virtualenv holding bin/litellm")
    parser.add_argument("--store", choices=("memory", "sqlite"), default="memory")
    parser.add_argument("--workers", type=int, default=1, help="gateway worker processes")
    parser.add_argument("--server", choices=("uvicorn", "granian"), default="uvicorn",
                        help="serve the gateway app with this ASGI server (chatgate serve uses uvicorn)")
    parser.add_argument("--levels", default="1,50,200", help="concurrency levels, comma separated")
    parser.add_argument("--targets", default=",".join(ALL_TARGETS), help="subset of " + ",".join(ALL_TARGETS))
    parser.add_argument("--skip", default="", help="comma list of: idle, streams, relay, granian, sqlite, scaling")
    parser.add_argument("--stream-workers", help="comma list of gateway worker counts for the stream ramp, "
                        "each its own lane (default 1,2; quick 1)")
    parser.add_argument("--idle-connections", type=int, help="idle WebSockets (default 5000, quick 1000)")
    parser.add_argument("--stream-counts", help="comma list of concurrent stream counts to try")
    parser.add_argument("--profile", help="TARGET:LEVEL, e.g. chat:50, or streams:COUNT - py-spy the server "
                        "during that cell or stream step")
    parser.add_argument("--native-profile", action="store_true", help="with --profile: C frames too "
                        "(uvloop, libc); it pauses the server per sample, so figures from that cell are lower")
    parser.add_argument("--repeat", type=int, default=1, help="run each answers cell N times, keep the "
                        "one other processes disturbed least")
    parser.add_argument("--quiet-wait", type=float, help="seconds to wait before each cell for the "
                        "machine to fall below 0.3 busy cores (default 10, quick 0)")
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra setting for the gateways, e.g. CHATGATE_RESUME_GRACE_S=0 (repeatable)")
    parser.add_argument("--out", type=Path, help="raw results and logs (default bench/out, quick: bench/out/quick)")
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "?")
    meminfo = Path("/proc/meminfo").read_text().split()
    return {
        "cores": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return result.stdout.strip()


def probe(target: Target) -> str:
    """One request read to its end: a route that is not there yet is reported, not fatal."""
    if target.protocol not in ("sse", "ollama"):
        return "ok"
    body = json.dumps({"model": target.model, "messages": [{"role": "user", "content": "hi"}]}).encode()
    try:
        status = http_status(target.url, body, timeout_s=30)
    except OSError as exc:
        return f"unreachable: {exc}"
    return "ok" if status == 200 else f"missing: {target.url.split('/', 3)[-1]} answered {status}"


def start_profilers(service: Service, seconds: float, out: Path, name: str,
                    native: bool = False) -> list[subprocess.Popen[bytes]]:
    """py-spy on the server for the cell: a flamegraph SVG and raw stacks for hotspots.summarise.
    ``native`` adds C frames (uvloop, libc calls), pausing the server for each sample."""
    py_spy = Path(sys.executable).with_name("py-spy")
    if not py_spy.exists():
        print("  (py-spy is not installed in the venv: no profile)", flush=True)
        return []
    common = [str(py_spy), "record", "--native" if native else "--nonblocking", "--pid", str(service.pid),
              "-d", str(int(seconds))]
    return [
        subprocess.Popen([*common, "-o", str(out / f"profile-{name}.svg")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([*common, "-f", "raw", "-o", str(out / f"profile-{name}.txt")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]


def attach_profilers(profilers: list[subprocess.Popen[bytes]], service: Service, seconds: float, out: Path,
                     name: str, native: bool) -> None:
    """Profile the first attempt of a cell only."""
    if not profilers:
        profilers.extend(start_profilers(service, seconds, out, name, native))


def gateway_targets(gateway: Service, name: str = "chatgate") -> list[Target]:
    """The gateway's four APIs as answers targets: /chat, /ws, /v1/chat/completions, /api/chat."""
    server = ProcessTree(gateway.pid)
    ws_url = gateway.url.replace("http://", "ws://") + "/ws"
    return [
        Target("chat", f"{name} POST /chat", "text", f"{gateway.url}/chat", server),
        Target("ws", f"{name} /ws (new conn/answer)", "ws", ws_url, server),
        Target("openai", f"{name} /v1/chat/completions", "sse", f"{gateway.url}/v1/chat/completions", server),
        Target("ollama", f"{name} /api/chat", "ollama", f"{gateway.url}/api/chat", server),
    ]


def build_targets(args: argparse.Namespace, fake: Service, gateway: Service, litellm: Service | None,
                  litellm_status: str) -> list[Target]:
    targets = [
        Target("direct", "direct (fake Ollama NDJSON)", "ollama", f"{fake.url}/api/chat", ProcessTree(fake.pid)),
        *gateway_targets(gateway),
        Target("litellm", "LiteLLM /v1/chat/completions", "sse", "", None, "ollama_chat/fake-model", litellm_status),
    ]
    if litellm is not None:
        targets[-1].url = f"{litellm.url}/v1/chat/completions"
        targets[-1].server = ProcessTree(litellm.pid)
    wanted = set(args.targets.split(","))
    chosen = [t for t in targets if t.key in wanted]
    for target in chosen:
        if target.status == "ok":
            target.status = probe(target)
    return chosen


def measure(args: argparse.Namespace, settings: Settings, target: Target, level: int, upstream: ProcessTree,
            failures: list[str], profiled: Service | None = None, tag: str = "",
            cpus: str | None = None) -> dict[str, Any] | None:
    """One answers cell, run --repeat times; None when every attempt failed. --profile attaches
    py-spy to ``profiled`` (the main run's server only, so no other cell overwrites its files);
    ``cpus`` pins the load processes."""
    profilers: list[subprocess.Popen[bytes]] = []
    name = f"{target.key}-{level}"
    hook = None
    if args.profile == f"{target.key}:{level}" and profiled is not None:
        seconds = settings.warmup_s + settings.duration_s
        hook = functools.partial(attach_profilers, profilers, profiled, seconds, args.out, name, args.native_profile)
    attempts = []
    for _ in range(args.repeat):
        try:
            attempts.append(answers_cell(target, level, settings, upstream, hook, cpus))
        except RuntimeError as exc:  # a load process that never reported
            failures.append(f"{tag}{target.key} x{level}: {exc}")
    for profiler in profilers:
        profiler.wait(timeout=60)
    if profilers:
        (args.out / f"profile-{name}-top.txt").write_text(hotspots.summarise(args.out / f"profile-{name}.txt"))
    if not attempts:
        return None
    # Others share this machine: keep the attempt they disturbed least, show the rest.
    cell = min(attempts, key=lambda c: c["other_cores"])
    cell["attempts"] = [{k: a[k] for k in ATTEMPT_KEYS} for a in attempts]
    print(f"  {tag}{target.key:>7} x{level:<4} {cell['answers_per_s']:8.1f} answers/s  ttft p50 "
          f"{cell['ttft_p50_ms']} ms  errors {cell['errors']}", flush=True)
    return cell


def levels(args: argparse.Namespace) -> list[int]:
    return [int(x) for x in args.levels.split(",")]


def run_answers(args: argparse.Namespace, settings: Settings, fake: Service, gateway: Service,
                litellm: Service | None, litellm_status: str, results: dict[str, Any]) -> None:
    targets = build_targets(args, fake, gateway, litellm, litellm_status)
    results["targets"] = [{"key": t.key, "label": t.label, "url": t.url, "status": t.status} for t in targets]
    upstream = ProcessTree(fake.pid)
    for level in levels(args):
        for target in targets:
            if target.status != "ok":
                continue
            service = litellm if target.key == "litellm" else gateway
            cell = measure(args, settings, target, level, upstream, results["failures"], service)
            if cell is not None:
                results["cells"].append(cell)


def run_sqlite(args: argparse.Namespace, settings: Settings, fake: Service, services: list[Service],
               results: dict[str, Any]) -> None:
    """chatgate's four APIs again on a gateway with the SQLite store (a fresh database), at 1
    and 50 clients, so RESULTS.md judges the targets on both stores from one run. --targets
    and --levels narrow it as they narrow the main cells; its cells stay apart (sqlite_cells)."""
    gateway = start_gateway(args.out / "logs", "chatgate-sqlite", fake.url, sqlite_url(args, "answers-sqlite"),
                            args.workers, gateway_env(args), args.server)
    services.append(gateway)
    wanted = set(args.targets.split(","))
    targets = [t for t in gateway_targets(gateway, "chatgate (SQLite)") if t.key in wanted and probe(t) == "ok"]
    results["sqlite_cells"] = []
    for level in (level for level in levels(args) if level in SQLITE_LEVELS):
        for target in targets:
            cell = measure(args, settings, target, level, ProcessTree(fake.pid), results["failures"], tag="sqlite ")
            if cell is not None:
                results["sqlite_cells"].append(cell)
    gateway.stop()
    services.remove(gateway)


def cpu_list(cores: list[int]) -> str:
    return ",".join(str(core) for core in cores)


def run_scaling(args: argparse.Namespace, settings: Settings, services: list[Service],
                results: dict[str, Any]) -> None:
    """What a second worker buys when it has a core of its own: for each of SCALING_WORKERS,
    a gateway pinned to the first N cores, its fake upstream and the load processes pinned to
    the others (to all of them when none is left), /chat and /ws at SCALING_LEVEL clients.
    Several workers cannot share the memory store, so every count gets the store they can
    share (shared_store_url: a fresh SQLite database when the run asked for memory) and the
    ratio compares like with like."""
    cores = sorted(os.sched_getaffinity(0))
    runs = []
    for workers in SCALING_WORKERS:
        if workers > len(cores):
            runs.append({"workers": workers, "status": f"only {len(cores)} cores", "cells": []})
            continue
        rest = cores[workers:]
        mine, theirs = cpu_list(cores[:workers]), cpu_list(rest) if rest else None
        fake = start_fake(args.out / "logs", f"fake-llm-scaling-{workers}w", settings.tokens, cpus=theirs)
        services.append(fake)
        store = shared_store_url(args, f"scaling-{workers}w")
        gateway = start_gateway(args.out / "logs", f"chatgate-scaling-{workers}w", fake.url, store, workers,
                                gateway_env(args), args.server, mine)
        services.append(gateway)
        cells = [measure(args, settings, target, SCALING_LEVEL, ProcessTree(fake.pid), results["failures"],
                         tag=f"{workers}w pinned ", cpus=theirs)
                 for target in gateway_targets(gateway)[:2]]
        runs.append({"workers": workers, "status": "ok", "store": store.split(":", 1)[0],
                     "gateway_cpus": mine, "other_cpus": theirs or cpu_list(cores), "shared": not rest,
                     "cells": [cell for cell in cells if cell is not None]})
        for service in (gateway, fake):
            service.stop()
            services.remove(service)
    results["scaling"] = {"cores": len(cores), "level": SCALING_LEVEL, "runs": runs}


def compare_granian(args: argparse.Namespace, settings: Settings, fake: Service, services: list[Service],
                    results: dict[str, Any]) -> None:
    """The same app under granian instead of uvicorn: /chat and /ws at 1 and 50 clients, and
    the memory of 1,000 idle sockets (the choice of server in RESULTS.md rests on these)."""
    if not CHATGATE.with_name("granian").exists():
        results["granian"] = {"status": "not installed (pip install granian)"}
        return
    gateway = start_gateway(args.out / "logs", "chatgate-granian", fake.url, store_url(args), args.workers,
                            gateway_env(args), "granian")
    services.append(gateway)
    cells = []
    for level in (1, 50):
        for target in gateway_targets(gateway, "granian")[:2]:
            cell = answers_cell(target, level, settings, ProcessTree(fake.pid))
            cells.append(cell)
            print(f"  granian {target.key:>4} x{level:<4} {cell['answers_per_s']:8.1f} answers/s  ttft p50 "
                  f"{cell['ttft_p50_ms']} ms", flush=True)
    gateway.stop()
    services.remove(gateway)
    fresh = start_gateway(args.out / "logs", "chatgate-granian-idle", fake.url, store_url(args), args.workers,
                          gateway_env(args), "granian")
    services.append(fresh)
    idle = idle_websockets(fresh.url.replace("http://", "ws://") + "/ws", ProcessTree(fresh.pid), 1000,
                           settings.load_processes)
    print(f"  granian idle: {idle['kib_per_connection']} KiB per connection", flush=True)
    results["granian"] = {"status": "ok", "version": package_version("granian"), "cells": cells, "idle_ws": idle}
    fresh.stop()
    services.remove(fresh)


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


def run_special(args: argparse.Namespace, settings: Settings, services: list[Service], results: dict[str, Any]) -> None:
    """Idle sockets and the 20-tokens/s stream ramp, on a fresh gateway over a paced fake."""
    skip = set(args.skip.split(","))
    if {"idle", "streams"} <= skip:
        return
    answer_s = 6.0 if args.quick else 20.0
    stream_settings = Settings(load_processes=settings.load_processes, tokens=int(answer_s * TOKENS_PER_S),
                               quiet_wait_s=settings.quiet_wait_s)
    slow = start_fake(args.out / "logs", "fake-20tps", stream_settings.tokens, tps=TOKENS_PER_S)
    services.append(slow)
    gateway = start_gateway(args.out / "logs", "chatgate-streams", slow.url, store_url(args), 1,
                            gateway_env(args), args.server)
    services.append(gateway)
    ws_url = gateway.url.replace("http://", "ws://") + "/ws"
    if "idle" not in skip:
        count = args.idle_connections or (1000 if args.quick else 5000)
        print(f"idle WebSockets: {count}", flush=True)
        results["idle_ws"] = idle_websockets(ws_url, ProcessTree(gateway.pid), count, settings.load_processes)
        print(f"  {results['idle_ws']['kib_per_connection']} KiB per connection", flush=True)
    if "streams" in skip:
        return
    counts = [int(x) for x in args.stream_counts.split(",")] if args.stream_counts else list(
        QUICK_STREAM_COUNTS if args.quick else STREAM_COUNTS)
    print(f"20 tokens/s streams, {answer_s:.0f} s each: {counts}", flush=True)
    # The gateway runs the count where the report compares it with the bare relay, whatever came before.
    lanes = [Lane(Target("ws", "chatgate /ws, 1 worker", "ws", ws_url, ProcessTree(gateway.pid)),
                  at_least=report.STREAMS_COMPARED_AT)]
    for workers in (int(x) for x in args.stream_workers.split(",") if x and int(x) > 1):
        more = start_gateway(args.out / "logs", f"chatgate-streams-{workers}w", slow.url,
                             shared_store_url(args, f"streams-{workers}w"), workers, gateway_env(args), args.server)
        services.append(more)
        url = more.url.replace("http://", "ws://") + "/ws"
        lanes.append(Lane(Target(f"ws-{workers}w", f"chatgate /ws, {workers} workers", "ws", url,
                                 ProcessTree(more.pid)), from_count=REFERENCE_FROM))
    lanes.append(Lane(Target("direct", "direct NDJSON", "ollama", f"{slow.url}/api/chat", ProcessTree(slow.pid)),
                      reference=True))
    if "relay" not in skip:
        relay = start_bare_relay(args.out / "logs", slow.url)
        services.append(relay)
        lanes.append(Lane(Target("relay", "bare relay /ws", "ws", relay.url.replace("http://", "ws://") + "/ws",
                                 ProcessTree(relay.pid)), reference=True, from_count=REFERENCE_FROM))
    profilers: list[subprocess.Popen[bytes]] = []

    def profile_step(key: str, count: int, seconds: float) -> None:
        if key == "ws" and args.profile == f"streams:{count}" and not profilers:
            profilers.extend(start_profilers(gateway, seconds, args.out, f"streams-{count}", args.native_profile))

    results["streams"] = stream_ramp(lanes, counts, stream_settings, answer_s, args.repeat, profile_step)
    for profiler in profilers:
        profiler.wait(timeout=60)
    if profilers:
        name = args.profile.replace(":", "-")
        (args.out / f"profile-{name}-top.txt").write_text(hotspots.summarise(args.out / f"profile-{name}.txt"))


def gateway_env(args: argparse.Namespace) -> dict[str, str]:
    pairs = [item.partition("=") for item in args.gateway_env]
    bad = [name for name, sep, _ in pairs if not sep or not name]
    if bad:
        raise SystemExit(f"--gateway-env wants NAME=VALUE, got {bad}")
    return {name: value for name, _, value in pairs}


def sqlite_url(args: argparse.Namespace, name: str) -> str:
    """A fresh SQLite database under the run's out directory (any previous one is removed)."""
    path = args.out / f"{name}.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def shared_store_url(args: argparse.Namespace, name: str) -> str:
    """The store for a gateway of several workers, which cannot share the memory store: the
    SQLite store (a database of its own) when the run asked for memory."""
    return store_url(args) if args.store != "memory" else sqlite_url(args, name)


def store_url(args: argparse.Namespace) -> str:
    return "memory" if args.store == "memory" else sqlite_url(args, "bench")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = (args.out or BENCH / "out" / ("quick" if args.quick else "")).resolve()
    args.stream_workers = args.stream_workers or ("1" if args.quick else "1,2")
    args.out.mkdir(parents=True, exist_ok=True)
    raise_nofile_limit()
    settings = Settings(
        warmup_s=args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0),
        duration_s=args.duration if args.duration is not None else (3.0 if args.quick else 10.0),
        quiet_wait_s=args.quiet_wait if args.quiet_wait is not None else (0.0 if args.quick else 10.0),
    )
    results: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
        "machine": machine(),
        "settings": {"warmup_s": settings.warmup_s, "duration_s": settings.duration_s, "store": args.store,
                     "workers": args.workers, "stream_workers": args.stream_workers, "server": args.server, "tokens": settings.tokens, "load_processes": settings.load_processes,
                     "repeat": args.repeat, "quiet_wait_s": settings.quiet_wait_s,
                     "gateway_env": gateway_env(args)},
        "cells": [],
        "failures": [],
    }
    started = time.monotonic()
    services: list[Service] = []
    try:
        fake = start_fake(args.out / "logs", "fake-llm", settings.tokens)
        services.append(fake)
        gateway = start_gateway(args.out / "logs", "chatgate", fake.url, store_url(args), args.workers,
                                gateway_env(args), args.server)
        services.append(gateway)
        litellm, litellm_status = None, "not installed (bench/install-litellm.sh)"
        binary = litellm_binary(args.litellm_venv)
        if "litellm" not in args.targets.split(","):
            litellm_status = "not selected"
        elif binary is not None:
            try:
                litellm = start_litellm(args.out / "logs", binary, fake.url)
                services.append(litellm)
                litellm_status = "ok"
                results["litellm_version"] = litellm_version(binary)
            except StartError as exc:
                litellm_status = f"failed to start: {str(exc).splitlines()[0]}"
        print(f"fake {fake.url}, chatgate {gateway.url} (pid {gateway.pid}), litellm: {litellm_status}", flush=True)
        run_answers(args, settings, fake, gateway, litellm, litellm_status, results)
        skip = set(args.skip.split(","))
        if "granian" not in skip and args.server == "uvicorn":
            compare_granian(args, settings, fake, services, results)
        if "sqlite" not in skip:
            run_sqlite(args, settings, fake, services, results)
        for service in reversed(services):
            service.stop()
        services.clear()
        if "scaling" not in skip:
            run_scaling(args, settings, services, results)
        run_special(args, settings, services, results)
    finally:
        for service in reversed(services):
            service.stop()
        results["elapsed_s"] = round(time.monotonic() - started, 1)
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    target_dir = args.out if args.quick else BENCH
    report.write(results, target_dir / "RESULTS.md", target_dir / "chart.png")
    print(f"wrote {target_dir / 'RESULTS.md'} and {target_dir / 'chart.png'} in {results['elapsed_s']} s")
    return 0


def litellm_version(binary: Path) -> str:
    python = binary.with_name("python")
    try:
        result = subprocess.run([str(python), "-c", "from importlib.metadata import version; print(version('litellm'))"],
                                capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return result.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
