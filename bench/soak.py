"""A bounded soak: chatgate under a steady, mixed and partly hostile load for a while, then
whether it is still alive, how its memory moved, and whether what it stored is what its
clients were streamed.

    .venv/bin/python bench/soak.py             # 2 minutes; its section in bench/RESULTS.md
    .venv/bin/python bench/soak.py --quick     # a few seconds, a small load, to bench/out/quick/ only

Starts on free loopback ports, each in its own process group and stopped in a ``finally``:
the fake upstream (40 tokens, no delay) and ``chatgate serve`` (1 worker, SQLite store in a
temporary directory, ``CHATGATE_REQUEST_TIMEOUT_S=10`` so that a hung upstream costs a turn
10 s rather than 300). Then, for the duration:

- WebSocket clients in a closed loop (500; 2 load processes, this script with ``--worker``),
  each on one native ``/ws`` socket with ids of its own, a new conversation every 10 turns;
  50 of them slow readers, taking one frame every 100 ms. About 5 % of what they send is a
  malformed frame instead of a turn, which must be answered with an ``error``. Before 2 % of
  their turns a client queues a fault at the fake (an upstream 500, a stream dropped or
  ended by an error line after some tokens, or a hang), taken by whichever request comes next.
- 200 idle HTTP connections, opened and never used, and 20 ``POST /chat`` streams whose
  answers are never read, reopened when the server drops them (both held by this process:
  the TCP state from ``TCP_INFO`` says whether the server closed a socket, without reading).

Reported: the gateway's RSS after the warm-up (40 s: finished answers are kept 30 s for a
late resume, so memory fills until then) and at the end (growth must stay under 10 % in a
full run), turns sent, done and failed, malformed frames answered, slow readers and
unread streams dropped by the server, idle connections still open at the end, whether it is
alive (``/health/live``), and a history check: for a sample of conversations (50), the
stored messages (``GET /conversations/{id}``) equal what their client was streamed, text and
``partial`` flags. The load average goes with the figures: other work shares the machine.
Writes bench/out/soak.json and .md (``--quick`` or ``--out``: there only; a full run also
puts its section into bench/RESULTS.md). Exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from load import bounded_session, describe
from report import put_section
from run import git, machine
from servers import (
    REPO,
    ProcessTree,
    Service,
    http_status,
    machine_busy_s,
    raise_nofile_limit,
    start_fake,
    start_gateway,
)
from stats import percentile

BENCH = REPO / "bench"
HEADING = "## Soak"
#: The section goes before this one, which is appended by hand (CHANGES.md).
ANSWER_TIMEOUT_S = 30.0
SLOW_READ_S = 0.1
POLL_S = 1.0
MAX_RSS_GROWTH = 0.10
REQUEST_TIMEOUT_S = 10
#: TCP_INFO's first byte, on Linux.
TCP_ESTABLISHED = 1
MALFORMED = (
    "not json",
    "[1, 2]",
    '{"type": "dance"}',
    '{"type": "chat", "message": ""}',
    '{"type": "chat", "message": 5, "id": "malformed"}',
    '{"type": "resume", "id": "x", "after": -1}',
    '{"type": "chat", "message": "' + "x" * 17_000 + '"}',  # over the 16 KiB message limit
)
FAULTS = (("http_500", 0), ("drop", 5), ("drop", 20), ("error_line", 10), ("hang", 15))


@dataclass(frozen=True)
class Plan:
    duration_s: float = 120.0
    #: A finished answer is kept for CHATGATE_RESUME_GRACE_S (30 s) for a late resume, so
    #: memory fills for the first 30 s of a steady load: the reference reading comes after.
    warmup_s: float = 40.0
    clients: int = 500
    slow_clients: int = 50
    idle_connections: int = 200
    unread_streams: int = 20
    malformed_share: float = 0.05
    fault_share: float = 0.02
    turns_per_conversation: int = 10
    load_processes: int = 2
    history_sample: int = 50


QUICK = Plan(duration_s=6.0, warmup_s=2.0, clients=40, slow_clients=4, idle_connections=20, unread_streams=4,
             history_sample=20)


# --- the load processes (soak.py --worker) -----------------------------------------------


@dataclass
class Conversation:
    id: str
    #: What the store should hold: (role, content, partial) per message.
    expected: list[tuple[str, str, bool]] = field(default_factory=list)
    complete: bool = True


@dataclass
class Worker:
    job: dict[str, Any]
    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    answer_s: list[float] = field(default_factory=list)
    conversations: list[Conversation] = field(default_factory=list)

    async def client(self, session: aiohttp.ClientSession, index: int, slow: bool, stop_at: float) -> None:
        name = f"{self.job['index']}-{index}"
        turns = 0
        conversation = self._new_conversation(name, 0)
        while time.monotonic() < stop_at:
            try:
                async with session.ws_connect(self.job["ws_url"], autoping=True, compress=0) as ws:
                    while time.monotonic() < stop_at:
                        if turns and turns % self.job["turns_per_conversation"] == 0:
                            conversation = self._new_conversation(name, turns)
                        if random.random() < self.job["malformed_share"]:
                            await self._malformed(ws, slow)
                            continue
                        turns += 1
                        try:
                            await self._turn(session, ws, conversation, f"{name}-{turns}", slow)
                        except BaseException:
                            self.counts["turns_interrupted"] += 1  # its socket broke off
                            raise
                return
            except _Dropped as exc:
                self.counts["slow_dropped" if slow and exc.code == 1013 else "dropped"] += 1
                self.errors[f"socket closed by the server ({exc.code})"] += 1
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self.counts["socket_failures"] += 1
                self.errors[describe(exc)] += 1
                await asyncio.sleep(0.5)
            # What was under way is the gateway's now (a resume would get it back): this
            # conversation's history is no longer known here; go on with a new one.
            conversation.complete = False
            conversation = self._new_conversation(name, turns)

    def _new_conversation(self, name: str, turns: int) -> Conversation:
        conversation = Conversation(f"soak-{self.job['run']}-{name}-{turns}")
        self.conversations.append(conversation)
        return conversation

    async def _malformed(self, ws: aiohttp.ClientWebSocketResponse, slow: bool) -> None:
        await ws.send_str(random.choice(MALFORMED))
        self.counts["malformed_sent"] += 1
        frame = await _receive(ws, slow)
        if frame.get("type") == "error" and frame.get("code") in ("bad_request", "too_large"):
            self.counts["malformed_answered"] += 1
        else:
            self.errors[f"malformed frame answered with {str(frame)[:80]}"] += 1

    async def _turn(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                    conversation: Conversation, turn_id: str, slow: bool) -> None:
        if random.random() < self.job["fault_share"]:
            kind, after = random.choice(FAULTS)
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with session.post(self.job["fake_url"] + "/_fake/faults",
                                        json={"faults": [{"kind": kind, "after": after}]}) as response:
                    self.counts["faults_queued"] += response.status == 200
        message = f"turn {turn_id} · é ✓"
        started = time.monotonic()
        await ws.send_str(orjson.dumps({"type": "chat", "id": turn_id, "conversation_id": conversation.id,
                                        "message": message}).decode())
        self.counts["turns_sent"] += 1
        text: list[str] = []
        seq, started_seen = 0, False
        while True:
            frame = await _receive(ws, slow)
            if frame.get("id") != turn_id:
                self.errors[f"a frame of another answer: {str(frame)[:80]}"] += 1
                continue
            kind = frame["type"]
            if kind == "start":
                started_seen = True
            elif kind == "delta":
                self.counts["seq_gaps"] += frame["seq"] != seq + 1
                seq = frame["seq"]
                text.append(frame["text"])
            elif kind == "done":
                self.counts["turns_done"] += 1
                self.answer_s.append(time.monotonic() - started)
                conversation.expected += [("user", message, False), ("assistant", "".join(text), False)]
                return
            elif kind == "error":
                self.errors[f"turn error {frame.get('code')}"] += 1
                if not started_seen:  # refused: nothing stored
                    self.counts["turns_refused"] += 1
                    return
                self.counts["turns_error"] += 1
                if text:  # the answer so far is stored, partial; with none the turn is taken back
                    conversation.expected += [("user", message, False), ("assistant", "".join(text), True)]
                return

    def result(self) -> dict[str, Any]:
        complete = [c for c in self.conversations if c.complete and c.expected]
        with_partial = [c for c in complete if any(partial for _, _, partial in c.expected)]
        share = self.job["history_sample"]
        sample = random.sample(with_partial, min(len(with_partial), share // 2))
        rest = [c for c in complete if c not in sample]
        sample += random.sample(rest, min(len(rest), share - len(sample)))
        return {
            "counts": dict(self.counts),
            "error_samples": dict(self.errors.most_common(8)),
            "answer_s": sorted(self.answer_s)[:: max(1, len(self.answer_s) // 2000)],
            "history_sample": [{"id": c.id, "expected": c.expected} for c in sample],
        }


class _Dropped(Exception):
    def __init__(self, code: int | None) -> None:
        super().__init__(f"closed by the server ({code})")
        self.code = code


async def _receive(ws: aiohttp.ClientWebSocketResponse, slow: bool) -> dict[str, Any]:
    message = await ws.receive(timeout=ANSWER_TIMEOUT_S)
    if slow:
        await asyncio.sleep(SLOW_READ_S)
    if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        raise _Dropped(ws.close_code)
    if message.type != aiohttp.WSMsgType.TEXT:
        raise aiohttp.ClientError(f"unexpected {message.type.name} message")
    frame: dict[str, Any] = orjson.loads(message.data)
    return frame


async def run_worker(job: dict[str, Any], t0: float) -> dict[str, Any]:
    worker = Worker(job)
    stop_at = t0 + job["duration_s"]
    async with bounded_session() as session:
        await asyncio.sleep(max(0.0, t0 - time.monotonic()))
        cpu = time.process_time()
        clients = [
            asyncio.create_task(worker.client(session, i, i < job["slow_clients"], stop_at))
            for i in range(job["clients"])
        ]
        # Each client ends its turn under way (bounded) before it stops.
        _, late = await asyncio.wait(clients, timeout=job["duration_s"] + ANSWER_TIMEOUT_S + 5)
        for task in late:
            task.cancel()
        client_cpu_s = time.process_time() - cpu
    return {**worker.result(), "client_cpu_s": round(client_cpu_s, 2), "late_clients": len(late)}


def worker_main() -> int:
    raise_nofile_limit()
    job = json.loads(sys.stdin.readline())
    print(json.dumps({"ready": True}), flush=True)
    command = sys.stdin.readline().split()
    if len(command) != 2 or command[0] != "go":
        return 2

    async def work() -> None:
        print(json.dumps({"result": await run_worker(job, float(command[1]))}), flush=True)
        os._exit(0)  # the loop's shutdown would wait for sockets still closing

    try:
        import uvloop
    except ImportError:
        asyncio.run(work())
    else:
        uvloop.run(work())
    return 1


# --- the orchestrator ---------------------------------------------------------------------


class HeldSockets:
    """Idle HTTP connections and unread ``POST /chat`` streams, in this process: plain
    sockets, polled for whether the server closed them (TCP state), never read."""

    def __init__(self, url: str, idle: int, streams: int) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.idle = [self._open() for _ in range(idle)]
        self.streams = [self._stream() for _ in range(streams)]
        self.idle_dropped = 0
        self.streams_dropped = 0
        self.streams_opened = streams

    def _open(self) -> socket.socket:
        return socket.create_connection(self.address, timeout=5)

    def _stream(self) -> socket.socket:
        body = orjson.dumps({"message": "a stream nobody reads", "stream": True})
        sock = self._open()
        sock.sendall(b"POST /chat HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (self.address[0].encode(), self.address[1], len(body), body))
        return sock

    @staticmethod
    def _open_still(sock: socket.socket) -> bool:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] == TCP_ESTABLISHED

    def poll(self) -> None:
        """Count what the server closed; reopen the streams it dropped."""
        for i, sock in enumerate(self.streams):
            if not self._open_still(sock):
                self.streams_dropped += 1
                sock.close()
                with contextlib.suppress(OSError):
                    self.streams[i] = self._stream()
                    self.streams_opened += 1
        self.idle_dropped = sum(not self._open_still(sock) for sock in self.idle)

    def close(self) -> None:
        for sock in self.idle + self.streams:
            sock.close()


class LoadProcesses:
    """``soak.py --worker`` processes, each in its own process group; JSON lines both ways."""

    def __init__(self, jobs: list[dict[str, Any]]) -> None:
        self.processes: list[subprocess.Popen[str]] = []
        self.lines: list[queue.Queue[dict[str, Any]]] = []
        for job in jobs:
            process = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, text=True, start_new_session=True)
            self.processes.append(process)
            assert process.stdin is not None
            process.stdin.write(json.dumps(job) + "\n")
            process.stdin.flush()
            lines: queue.Queue[dict[str, Any]] = queue.Queue()
            threading.Thread(target=self._pump, args=(process, lines), daemon=True).start()
            self.lines.append(lines)

    @staticmethod
    def _pump(process: subprocess.Popen[str], lines: queue.Queue[dict[str, Any]]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                lines.put(json.loads(line))
        lines.put({"exited": process.wait()})

    def expect(self, key: str, timeout_s: float) -> list[Any]:
        deadline = time.monotonic() + timeout_s
        found = []
        for lines in self.lines:
            try:
                message = lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"a load process gave no {key!r} within {timeout_s:.0f} s") from None
            if key not in message:
                raise RuntimeError(f"a load process: expected {key!r}, got {message}")
            found.append(message[key])
        return found

    def go(self) -> float:
        self.expect("ready", 30)
        t0 = time.monotonic() + 0.5
        for process in self.processes:
            assert process.stdin is not None
            process.stdin.write(f"go {t0}\n")
            process.stdin.flush()
        return t0

    def cpu_s(self) -> float:
        return sum(ProcessTree(p.pid).cpu_s() for p in self.processes)

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=5)


def split(total: int, parts: int) -> list[int]:
    return [total // parts + (i < total % parts) for i in range(parts)]


def check_history(url: str, sample: list[dict[str, Any]]) -> dict[str, Any]:
    """Each sampled conversation as stored against what its client was streamed."""
    mismatches = []
    for conversation in sample:
        try:
            with urllib.request.urlopen(f"{url}/conversations/{conversation['id']}", timeout=10) as response:
                stored = json.loads(response.read())["messages"]
        except OSError as exc:
            mismatches.append({"id": conversation["id"], "problem": describe(exc)})
            continue
        seen = [(m["role"], m["content"], m["partial"]) for m in stored]
        expected = [tuple(m) for m in conversation["expected"]]
        if seen != expected:
            mismatches.append({"id": conversation["id"], "stored": seen[:6], "expected": expected[:6]})
    partial = sum(any(m[2] for m in c["expected"]) for c in sample)
    return {"checked": len(sample), "with_partial_answers": partial, "matching": len(sample) - len(mismatches),
            "mismatches": mismatches[:5]}


def soak(plan: Plan, out: Path) -> dict[str, Any]:
    raise_nofile_limit()
    results: dict[str, Any] = {"plan": asdict(plan), "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}
    services: list[Service] = []
    held: HeldSockets | None = None
    load: LoadProcesses | None = None
    with tempfile.TemporaryDirectory(prefix="chatgate-soak-") as data:
        try:
            fake = start_fake(out / "logs", "soak-fake", tokens=40)
            services.append(fake)
            gateway = start_gateway(out / "logs", "soak-gateway", fake.url, f"sqlite:///{data}/chatgate.db",
                                    extra_env={"CHATGATE_REQUEST_TIMEOUT_S": str(REQUEST_TIMEOUT_S)})
            services.append(gateway)
            tree = ProcessTree(gateway.pid)
            held = HeldSockets(gateway.url, plan.idle_connections, plan.unread_streams)
            run = datetime.now(UTC).strftime("%H%M%S")
            jobs = [
                {"index": i, "run": run, "ws_url": gateway.url.replace("http://", "ws://") + "/ws",
                 "fake_url": fake.url, "duration_s": plan.duration_s, "clients": clients, "slow_clients": slow,
                 "malformed_share": plan.malformed_share, "fault_share": plan.fault_share,
                 "turns_per_conversation": plan.turns_per_conversation, "history_sample": sample}
                for i, (clients, slow, sample) in enumerate(zip(
                    split(plan.clients, plan.load_processes), split(plan.slow_clients, plan.load_processes),
                    split(plan.history_sample, plan.load_processes), strict=True))
            ]
            load = LoadProcesses(jobs)
            t0 = load.go()
            busy_before, gateway_cpu_before = machine_busy_s(), tree.cpu_s()
            rss: list[tuple[float, int]] = []
            warm_kib = None
            while time.monotonic() < t0 + plan.duration_s:
                time.sleep(POLL_S)
                held.poll()
                now = time.monotonic() - t0
                rss.append((round(now, 1), tree.rss_kib()))
                if warm_kib is None and now >= plan.warmup_s:
                    warm_kib = rss[-1][1]
            elapsed = time.monotonic() - t0
            results["machine_busy_cores"] = round((machine_busy_s() - busy_before) / elapsed, 2)
            results["gateway_cores"] = round((tree.cpu_s() - gateway_cpu_before) / elapsed, 2)
            results["load_cores"] = round(load.cpu_s() / elapsed, 2)
            held.poll()
            end_kib = tree.rss_kib()
            workers = load.expect("result", ANSWER_TIMEOUT_S + 30)
            results["rss_kib"] = {"after_warmup": warm_kib, "end": end_kib, "peak_sampled": max(k for _, k in rss),
                                  "growth": round(end_kib / warm_kib - 1, 4) if warm_kib else None,
                                  "series": rss[:: max(1, len(rss) // 60)]}
            counts: Counter[str] = Counter()
            errors: Counter[str] = Counter()
            answers: list[float] = []
            for worker in workers:
                counts.update(worker["counts"])
                errors.update(worker["error_samples"])
                answers += worker["answer_s"]
            answers.sort()
            results["clients"] = {**dict(counts), "late_clients": sum(w["late_clients"] for w in workers),
                                  "answer_p50_ms": _ms(percentile(answers, 50)),
                                  "answer_p99_ms": _ms(percentile(answers, 99)),
                                  "error_samples": dict(errors.most_common(10))}
            results["held"] = {"idle_opened": plan.idle_connections, "idle_open_at_end": len(held.idle) - held.idle_dropped,
                               "unread_streams_opened": held.streams_opened,
                               "unread_streams_dropped_by_server": held.streams_dropped}
            results["history"] = check_history(gateway.url, [c for w in workers for c in w["history_sample"]])
            results["alive"] = gateway.process.poll() is None and http_status(f"{gateway.url}/health/live") == 200
        finally:
            if held is not None:
                held.close()
            if load is not None:
                load.stop()
            for service in reversed(services):
                service.stop()
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def verdicts(results: dict[str, Any], max_growth: float | None) -> list[tuple[str, bool]]:
    clients, history = results["clients"], results["history"]
    growth = results["rss_kib"]["growth"]
    found = [
        ("gateway alive at the end, /health/live 200", results["alive"]),
        ("turns answered", clients.get("turns_done", 0) > 0),
        ("deltas' seq without gaps", clients.get("seq_gaps", 0) == 0),
        ("every malformed frame answered with an error",
         clients.get("malformed_answered", 0) == clients.get("malformed_sent", 0)),
        ("stored history equals what was streamed", history["checked"] > 0 and not history["mismatches"]),
    ]
    if max_growth is not None:
        found.append((f"RSS growth after the warm-up under {max_growth:.0%}", growth is not None and growth < max_growth))
    return found


def _mib(kib: int | None) -> str:
    return f"{kib / 1024:.1f} MiB" if kib else "-"


def markdown(results: dict[str, Any], checks: list[tuple[str, bool]]) -> str:
    plan, clients, held, history = results["plan"], results["clients"], results["held"], results["history"]
    rss = results["rss_kib"]
    growth = f"{rss['growth']:+.1%}" if rss["growth"] is not None else "-"
    dirty = " (src/ had uncommitted changes)" if results.get("uncommitted_changes") else ""
    return "\n".join([
        HEADING,
        "",
        f"`bench/soak.py`, {results['date']}, commit `{results['commit']}`{dirty}: {plan['duration_s']:.0f} s against "
        f"`chatgate serve` (1 worker, SQLite store) over the fake upstream (40 tokens, no delay; "
        f"{plan['fault_share']:.0%} of turns queue a fault). {plan['clients']} `/ws` clients in a closed loop from "
        f"{plan['load_processes']} load processes ({plan['slow_clients']} slow readers, one frame per 100 ms; "
        f"{plan['malformed_share']:.0%} malformed frames), {plan['idle_connections']} idle HTTP connections and "
        f"{plan['unread_streams']} `POST /chat` streams never read. Load average {results['load_average_at_start']} "
        f"at the start, {results['load_average_at_end']} at the end; the machine's busy cores during the run "
        f"{results['machine_busy_cores']} of {results['machine']['cores']} (gateway {results['gateway_cores']}, "
        f"load {results['load_cores']}): other work shares this machine.",
        "",
        "| figure | value |",
        "|---|--:|",
        f"| gateway RSS after {plan['warmup_s']:.0f} s / at the end (growth) | {_mib(rss['after_warmup'])} / "
        f"{_mib(rss['end'])} ({growth}); peak sampled {_mib(rss['peak_sampled'])} |",
        f"| turns sent / done / error / refused / cut off with their socket | {clients.get('turns_sent', 0):,} / "
        f"{clients.get('turns_done', 0):,} / {clients.get('turns_error', 0):,} / {clients.get('turns_refused', 0):,} / "
        f"{clients.get('turns_interrupted', 0):,} |",
        f"| answer time p50 / p99 | {clients['answer_p50_ms']} ms / {clients['answer_p99_ms']} ms |",
        f"| faults queued at the fake | {clients.get('faults_queued', 0):,} |",
        f"| malformed frames sent / answered with an error | {clients.get('malformed_sent', 0):,} / "
        f"{clients.get('malformed_answered', 0):,} |",
        f"| slow readers dropped by the server (1013) / other sockets closed by it / socket failures | "
        f"{clients.get('slow_dropped', 0)} / {clients.get('dropped', 0)} / {clients.get('socket_failures', 0)} |",
        f"| unread streams opened / dropped by the server | {held['unread_streams_opened']} / "
        f"{held['unread_streams_dropped_by_server']} |",
        f"| idle connections still open at the end | {held['idle_open_at_end']} of {held['idle_opened']} |",
        f"| history: conversations checked / matching (with a partial answer) | {history['checked']} / "
        f"{history['matching']} ({history['with_partial_answers']}) |",
        f"| deltas' seq gaps | {clients.get('seq_gaps', 0)} |",
        "",
        "Checks: " + "; ".join(f"{name}: {'pass' if ok else '**FAIL**'}" for name, ok in checks) + ".",
        "",
    ])




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="6 s, 40 clients; RESULTS.md untouched")
    parser.add_argument("--duration", type=float, help="seconds of load (default 120, quick 6)")
    parser.add_argument("--warmup", type=float, help="seconds before the reference RSS reading (default 40, quick 2)")
    parser.add_argument("--clients", type=int, help="WebSocket clients (default 500, quick 40)")
    parser.add_argument("--out", type=Path, help="results and logs (default bench/out, quick: bench/out/quick)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main()
    base = QUICK if args.quick else Plan()
    plan = Plan(**{**asdict(base), **{k: v for k, v in (("duration_s", args.duration), ("warmup_s", args.warmup),
                                                          ("clients", args.clients)) if v is not None}})
    plan = Plan(**{**asdict(plan), "slow_clients": min(plan.slow_clients, plan.clients)})
    out = (args.out or BENCH / "out" / ("quick" if args.quick else "")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    # A SIGTERM ends the run through the finally blocks, which stop every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
        "machine": machine(),
        **soak(plan, out),
    }
    checks = verdicts(results, None if args.quick else MAX_RSS_GROWTH)
    results["checks"] = {name: ok for name, ok in checks}
    section = markdown(results, checks)
    (out / "soak.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "soak.md").write_text(section)
    print(section)
    if not args.quick and args.out is None:
        put_section(BENCH / "RESULTS.md", HEADING, section)
        print(f"wrote its section into {BENCH / 'RESULTS.md'}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
