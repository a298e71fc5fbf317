"""The benchmark's scenarios, each driving load.py processes against one target:
answers at a concurrency level, idle WebSockets, and a ramp of 20-tokens/s streams."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from servers import ProcessTree, machine_busy_s, pinned, wait_for_quiet
from stats import Histogram, percentile

LOAD_SCRIPT = Path(__file__).with_name("load.py")
READY_S = 20.0
GO_DELAY_S = 0.3
NOMINAL_GAP_MS = 50.0  # 20 tokens/s
GAP_BUDGET_MS = 50.0
TOKENS_PER_S = 20
#: The reference lanes climb at least this far, whatever the gateway reached.
GOAL_STREAMS = 2000
MIN_COMPLETED = 0.99
STEADY_SETTLE_S = 1.0
#: A step passes only if every stream was open together for this long: a server so slow to
#: accept that its last streams start as the first end has not held them.
MIN_HELD_S = 5.0
#: While a step's streams are held, a new WebSocket is opened (handshake only) this often.
CONNECT_PROBE_EVERY_S = 0.05


@dataclass
class Target:
    key: str
    label: str
    protocol: str
    url: str
    server: ProcessTree | None = None
    model: str = "fake-model"
    status: str = "ok"


@dataclass
class Settings:
    warmup_s: float = 2.0
    duration_s: float = 10.0
    load_processes: int = 2
    answer_timeout_s: float = 30.0
    tokens: int = 40
    #: Before each cell, wait up to this long for other work on the machine to calm down.
    quiet_wait_s: float = 0.0
    quiet_below_cores: float = 0.3


class LoadGroup:
    """load.py processes sharing one job; a thread per process turns stdout into a queue.
    ``cpus`` pins them to those cores (see servers.pinned)."""

    def __init__(self, jobs: list[dict[str, Any]], cpus: str | None = None) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.lines: list[queue.Queue[dict[str, Any]]] = []
        for job in jobs:
            process = subprocess.Popen(
                pinned([sys.executable, str(LOAD_SCRIPT)], cpus), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True,
            )
            assert process.stdin is not None and process.stdout is not None
            process.stdin.write(json.dumps(job) + "\n")
            process.stdin.flush()
            lines: queue.Queue[dict[str, Any]] = queue.Queue()
            threading.Thread(target=self._pump, args=(process, lines), daemon=True).start()
            self.processes.append(process)
            self.lines.append(lines)

    @staticmethod
    def _pump(process: subprocess.Popen[str], lines: queue.Queue[dict[str, Any]]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            try:
                lines.put(json.loads(line))
            except json.JSONDecodeError:
                lines.put({"unreadable": line[:200]})
        lines.put({"exited": process.wait()})

    def expect(self, key: str, timeout_s: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        found = []
        for lines in self.lines:
            try:
                message = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"load process gave no {key!r} within {timeout_s:.0f} s") from None
            if key not in message:
                raise RuntimeError(f"load process: expected {key!r}, got {message}")
            found.append(message)
        return found

    def tell(self, line: str) -> None:
        for process in self.processes:
            if process.stdin is not None and process.poll() is None:
                process.stdin.write(line + "\n")
                process.stdin.flush()

    def go(self) -> float:
        self.expect("ready", READY_S)
        t0 = time.monotonic() + GO_DELAY_S
        self.tell(f"go {t0}")
        return t0

    def cpu_s(self) -> float:
        return sum(ProcessTree(p.pid).cpu_s() for p in self.processes)

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=5)


def split(total: int, parts: int) -> list[int]:
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _sleep_until(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()))


def _merged(results: list[dict[str, Any]]) -> dict[str, Any]:
    gaps = Histogram()
    errors: dict[str, int] = {}
    for result in results:
        gaps.merge(Histogram.from_json(result["gaps"]))
        for message, count in result["error_samples"].items():
            errors[message] = errors.get(message, 0) + count
    ttft = [v for r in results for v in r["ttft_ms"]]
    connect = [v for r in results for v in r["connect_ms"]]
    return {
        "completed": sum(r["completed"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_samples": errors,
        "tokens": sum(r["tokens"] for r in results),
        "ttft_p50_ms": percentile(ttft, 50),
        "ttft_p90_ms": percentile(ttft, 90),
        "ttft_p99_ms": percentile(ttft, 99),
        "connect_p50_ms": percentile(connect, 50),
        "connect_p99_ms": percentile(connect, 99),
        "gap_p50_ms": gaps.percentile_ms(50),
        "gap_p99_ms": gaps.percentile_ms(99),
        "gap_max_ms": gaps.percentile_ms(100),
        "gap_histogram_us": gaps.to_json(),
        "client_cpu_s": sum(r["client_cpu_s"] for r in results),
    }


def answers_cell(target: Target, concurrency: int, settings: Settings, upstream: ProcessTree,
                 on_go: Callable[[], object] | None = None, cpus: str | None = None) -> dict[str, Any]:
    """Closed loop: ``concurrency`` clients, each asking again as soon as an answer ends.
    ``on_go`` runs just before the load starts (run.py attaches py-spy there); ``cpus`` pins
    the load processes to those cores."""
    base = {"mode": "answers", "protocol": target.protocol, "url": target.url, "model": target.model,
            "tokens": settings.tokens, "warmup_s": settings.warmup_s, "duration_s": settings.duration_s,
            "answer_timeout_s": settings.answer_timeout_s}
    shares = split(concurrency, 1 if concurrency == 1 else settings.load_processes)
    background = wait_for_quiet(settings.quiet_wait_s, settings.quiet_below_cores)
    group = LoadGroup([{**base, "concurrency": share} for share in shares], cpus)
    server = target.server
    try:
        if on_go is not None:
            on_go()
        t0 = group.go()
        if server is not None:
            server.reset_peak()
        start = t0 + settings.warmup_s
        _sleep_until(start)
        before = (server.cpu_s() if server else 0.0, upstream.cpu_s(), group.cpu_s(), machine_busy_s())
        _sleep_until(start + settings.duration_s)
        after = (server.cpu_s() if server else 0.0, upstream.cpu_s(), group.cpu_s(), machine_busy_s())
        rss = server.rss_kib() if server else 0
        peak = server.peak_kib() if server else 0
        results = [m["result"] for m in group.expect("result", settings.answer_timeout_s + 20)]
    finally:
        group.close()
    cell = _merged(results)
    tokens = max(cell["tokens"], 1)
    cell.update(
        target=target.key,
        concurrency=concurrency,
        load_processes=len(shares),
        answers_per_s=cell["completed"] / settings.duration_s,
        server_cpu_s=after[0] - before[0],
        server_cpu_s_per_1k_tokens=(after[0] - before[0]) / tokens * 1000,
        upstream_cpu_s=after[1] - before[1],
        server_cpu_share=(after[0] - before[0]) / settings.duration_s,
        client_cpu_share=(after[2] - before[2]) / settings.duration_s,
        machine_busy_cores=(after[3] - before[3]) / settings.duration_s,
        background_cores_before=background,
        other_cores=((after[3] - before[3]) - (after[2] - before[2]) - (after[0] - before[0])
                     - (0 if server and server.root == upstream.root else after[1] - before[1])) / settings.duration_s,
        rss_kib=rss,
        peak_rss_kib=peak,
    )
    return cell


def idle_websockets(url: str, server: ProcessTree, connections: int, processes: int) -> dict[str, Any]:
    """RSS the gateway adds per idle ``/ws`` connection, on a gateway that has only been
    warmed up by a few connections (a busy one would hide sockets in freed heap)."""
    warm = LoadGroup([{"mode": "idle", "protocol": "ws", "url": url, "connections": 50}])
    try:
        warm.go()
        warm.expect("opened", 30)
        warm.tell("release")
        warm.expect("result", 30)
    finally:
        warm.close()
    time.sleep(1.0)
    before = server.rss_kib()
    shares = split(connections, processes)
    group = LoadGroup([{"mode": "idle", "protocol": "ws", "url": url, "connections": share, "hold_s": 120}
                       for share in shares])
    try:
        group.go()
        opened = group.expect("opened", 180)
        time.sleep(2.0)
        held = server.rss_kib()
        group.tell("release")
        results = [m["result"] for m in group.expect("result", 60)]
    finally:
        group.close()
    time.sleep(1.0)
    total = sum(m["opened"] for m in opened)
    return {
        "requested": connections,
        "opened": total,
        "still_open_at_release": sum(r["still_open"] for r in results),
        "failed": sum(r["failed"] for r in results),
        "error_samples": {k: v for r in results for k, v in r["error_samples"].items()},
        "open_s": max(m["open_s"] for m in opened),
        "rss_before_kib": before,
        "rss_held_kib": held,
        "rss_after_close_kib": server.rss_kib(),
        "kib_per_connection": (held - before) / total if total else None,
    }


@dataclass
class StreamStep:
    streams: int
    via: str
    completed: int
    errors: int
    gap_p50_ms: float | None
    gap_p99_ms: float | None
    gap_max_ms: float | None
    added_gap_p99_ms: float | None
    whole_run_gap_p99_ms: float | None
    steady_gaps: int
    held_from_s: float | None
    held_to_s: float | None
    ttft_p50_ms: float | None
    connect_p99_ms: float | None
    server_cpu_share: float
    client_cpu_share: float
    machine_busy_cores: float
    background_cores_before: float
    error_samples: dict[str, int]
    #: While every stream was held: the server's cores, its CPU per token relayed, and the
    #: cores the whole machine was busy (near the core count, the machine is the limit).
    #: New WebSockets opened one at a time while every stream was held: their handshakes.
    held_connect_p50_ms: float | None = None
    held_connect_p99_ms: float | None = None
    held_connects: int = 0
    held_connect_errors: int = 0
    held_server_cores: float | None = None
    held_server_us_per_token: float | None = None
    held_machine_busy_cores: float | None = None

    @property
    def passed(self) -> bool:
        return (
            self.added_gap_p99_ms is not None
            and self.added_gap_p99_ms <= GAP_BUDGET_MS
            and self.completed >= MIN_COMPLETED * self.streams
            and self.held_from_s is not None
            and self.held_to_s is not None
            and self.held_to_s - self.held_from_s >= MIN_HELD_S
        )


class CpuTrace:
    """Samples a process tree's CPU seconds and the machine's busy seconds every
    ``interval_s`` on a thread, so the share of any window can be read afterwards."""

    def __init__(self, server: ProcessTree | None, interval_s: float = 0.25) -> None:
        self.server = server
        self.interval_s = interval_s
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CpuTrace:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while True:
            self.samples.append((time.monotonic(), self.server.cpu_s() if self.server else 0.0, machine_busy_s()))
            if self._stop.wait(self.interval_s):
                return

    def cores(self, start: float, end: float) -> tuple[float, float] | None:
        """(server, machine) cores busy between the samples nearest inside ``start``..``end``."""
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 4 * self.interval_s:
            return None
        (t0, server0, busy0), (t1, server1, busy1) = inside[0], inside[-1]
        return (server1 - server0) / (t1 - t0), (busy1 - busy0) / (t1 - t0)


def held_gaps(results: list[dict[str, Any]]) -> tuple[Histogram, float | None, float | None]:
    """The gaps while every stream was open: from ``STEADY_SETTLE_S`` after the last stream's
    first token (a gateway that is slow to accept starts some streams late) until half that
    before the first stream's last token; with the window's bounds, in seconds after t0."""
    firsts = [r["last_first_token_s"] for r in results]
    lasts = [r["first_last_token_s"] for r in results]
    held = Histogram()
    if None in firsts or None in lasts:
        return held, None, None
    start, end = max(firsts) + STEADY_SETTLE_S, min(lasts) - STEADY_SETTLE_S / 2
    for result in results:
        slot_s = result["slot_s"]
        for slot, counts in result["gap_slots"].items():
            if int(slot) * slot_s >= start and (int(slot) + 1) * slot_s <= end:
                held.merge(Histogram.from_json(counts))
    return held, round(start, 2), round(end, 2)


def stream_step(target: Target, streams: int, settings: Settings, answer_s: float,
                hook: Callable[[int, float], None] | None = None) -> StreamStep:
    stagger_s = max(1.0, streams / 1000)
    base = {"mode": "streams", "protocol": target.protocol, "url": target.url, "model": target.model,
            "tokens": settings.tokens, "stagger_s": stagger_s, "answer_timeout_s": answer_s + 30}
    background = wait_for_quiet(settings.quiet_wait_s, settings.quiet_below_cores)
    # The first load process also opens new connections one at a time while all are held.
    probes = {"probe_every_s": CONNECT_PROBE_EVERY_S, "probe_from_s": stagger_s + STEADY_SETTLE_S,
              "probe_until_s": answer_s - STEADY_SETTLE_S}
    group = LoadGroup([{**base, "streams": share, **(probes if index == 0 else {})}
                       for index, share in enumerate(split(streams, settings.load_processes))])
    server = target.server
    try:
        t0 = group.go()
        with CpuTrace(server) as trace:
            server_cpu = server.cpu_s() if server else 0.0
            busy = machine_busy_s()
            if hook is not None:
                hook(streams, stagger_s + answer_s)
            results = [m["result"] for m in group.expect("result", stagger_s + answer_s + 60)]
            wall = time.monotonic() - t0
            server_cpu = (server.cpu_s() if server else 0.0) - server_cpu
            busy = machine_busy_s() - busy
    finally:
        group.close()
    merged = _merged(results)
    held_connects = [v for r in results for v in r.get("held_connect_ms", [])]
    steady, held_from, held_to = held_gaps(results)
    p99 = steady.percentile_ms(99)
    held = None
    if held_from is not None and held_to is not None and held_to > held_from:
        held = trace.cores(t0 + held_from, t0 + held_to)
    return StreamStep(
        streams=streams,
        via=target.key,
        completed=merged["completed"],
        errors=merged["errors"],
        gap_p50_ms=steady.percentile_ms(50),
        gap_p99_ms=p99,
        gap_max_ms=steady.percentile_ms(100),
        added_gap_p99_ms=None if p99 is None else p99 - NOMINAL_GAP_MS,
        whole_run_gap_p99_ms=merged["gap_p99_ms"],
        steady_gaps=steady.total,
        held_from_s=held_from,
        held_to_s=held_to,
        ttft_p50_ms=merged["ttft_p50_ms"],
        connect_p99_ms=merged["connect_p99_ms"],
        held_connect_p50_ms=percentile(held_connects, 50),
        held_connect_p99_ms=percentile(held_connects, 99),
        held_connects=len(held_connects),
        held_connect_errors=sum(r.get("held_connect_errors", 0) for r in results),
        server_cpu_share=server_cpu / wall,
        client_cpu_share=merged["client_cpu_s"] / wall,
        machine_busy_cores=busy / wall,
        background_cores_before=background,
        error_samples=merged["error_samples"],
        held_server_cores=None if held is None else round(held[0], 3),
        held_server_us_per_token=None if held is None else round(held[0] / (streams * TOKENS_PER_S) * 1e6, 1),
        held_machine_busy_cores=None if held is None else round(held[1], 3),
    )


@dataclass
class Lane:
    """One server under the stream ramp. A gateway lane climbs until its first count over
    budget, but not before ``at_least`` (so it can be compared with the bare relay there);
    a reference lane (the direct upstream, the bare relay) also climbs past that, up to
    ``GOAL_STREAMS`` and one count more, so the report can say what this machine allows
    whatever the gateway reached. ``best`` is the largest count within budget."""

    target: Target
    reference: bool = False
    from_count: int = 0
    at_least: int = 0
    best: int = 0
    stopped: bool = False


def stream_ramp(lanes: list[Lane], counts: list[int], settings: Settings, answer_s: float,
                attempts: int = 1, hook: Callable[[str, int, float], None] | None = None) -> dict[str, Any]:
    """Raise the number of concurrent streams lane by lane until each is over budget (and
    past its ``at_least``).
    Gaps count while every stream is held: from 1 s after the last one started until the first
    one is due to end (the whole run's p99, connection storm included, is kept beside it).
    A gateway step over budget is tried up to ``attempts`` times and keeps its best try.
    ``hook(key, count, seconds)`` is called as each step begins (the profiler attaches there)."""
    steps: list[StreamStep] = []
    failures: list[str] = []
    cap = min((c for c in counts if c > GOAL_STREAMS), default=max(counts))
    for count in counts:
        gateways_running = any(not lane.stopped for lane in lanes if not lane.reference)
        for lane in lanes:
            if lane.stopped or count < lane.from_count:
                continue
            if lane.reference and not gateways_running and count > cap:
                lane.stopped = True
                continue
            step = _best_step(lane, count, settings, answer_s, 1 if lane.reference else attempts, hook, failures)
            if step is None:
                lane.stopped = True
                continue
            steps.append(step)
            print(f"  streams {count:>5} via {lane.target.label}: held p99 gap {step.gap_p99_ms} ms, "
                  f"{step.completed} ok, {step.held_server_cores} cores held "
                  f"({step.held_server_us_per_token} us/token), machine {step.held_machine_busy_cores}", flush=True)
            if step.passed:
                lane.best = count
            elif count >= lane.at_least:
                lane.stopped = True
        if all(lane.stopped for lane in lanes):
            break
    return {"goal_streams": GOAL_STREAMS, "budget_ms": GAP_BUDGET_MS, "nominal_gap_ms": NOMINAL_GAP_MS,
            "answer_s": answer_s, "failures": failures,
            "lanes": [{"via": lane.target.key, "label": lane.target.label, "reference": lane.reference,
                       "at_least": lane.at_least, "max_streams_within_budget": lane.best} for lane in lanes],
            "steps": [asdict(s) | {"passed": s.passed} for s in steps]}


def _best_step(lane: Lane, count: int, settings: Settings, answer_s: float, attempts: int,
               hook: Callable[[str, int, float], None] | None, failures: list[str]) -> StreamStep | None:
    """A step (the best of ``attempts`` tries when over budget), or None if a load process failed."""
    best: StreamStep | None = None
    for attempt in range(attempts):
        try:
            step = stream_step(lane.target, count, settings, answer_s,
                               None if hook is None or attempt else lambda n, s: hook(lane.target.key, n, s))
        except RuntimeError as exc:  # a load process that never reported: say so, keep what we have
            failures.append(f"{count} streams via {lane.target.label}: {exc}")
            return best
        if best is None or (step.added_gap_p99_ms or 1e9) < (best.added_gap_p99_ms or 1e9):
            best = step
        if best.passed:
            break
    return best
