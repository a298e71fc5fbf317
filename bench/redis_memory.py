"""Conversations in Redis memory: what chatgate's Redis store costs per message, and that
its limits bound it.

    .venv/bin/python bench/redis_memory.py            # 1,000 conversations x 30 turns; its section in RESULTS.md
    .venv/bin/python bench/redis_memory.py --quick    # 20 x 5, to bench/out/quick/ only

Starts its own redis-server on a free loopback port and writes through the store itself
(``RedisStore``), one ``append`` of a user message and its answer per turn, as the gateway
writes a turn, conversation after conversation. Each phase starts from an empty database
and reads Redis's ``used_memory`` (INFO memory) before and after:

- no limit but the TTL: the cost per message;
- ``max_conversations`` at half the conversations written: the oldest are evicted;
- ``max_messages`` below the messages written, for the turns and for twice as many: a
  conversation keeps its last messages, whatever it was sent;
- the clock (injected) moved past ``ttl_s`` and ``purge_expired()`` called: back to empty.

Also timed, one client, one call at a time: a turn's write (one script, one round trip)
and a windowed read of 20 messages (one pipelined round trip), as the gateway reads a
conversation before each turn. Writes bench/out/redis-memory.json and .md (quick: under
bench/out/quick/); a full run also puts its section into bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from report import put_section
from run import git, machine
from servers import wait_for_quiet
from stats import percentile

from chatgate.config import Settings
from chatgate.store.base import MAX_STORED_MESSAGES, StoredMessage, StoreLimits
from chatgate.store.redis import PREFIX, RedisStore
from chatgate.testing.servers import start_redis

BENCH = Path(__file__).resolve().parent
HEADING = "## Conversations in Redis memory"
#: The section goes before this one, which is appended by hand (CHANGES.md).
#: A conversation reads this many messages before each turn (the gateway's max_turns).
WINDOW = 20
TTL_S = 3600.0
#: Far above anything written: the unbounded phase.
NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class Plan:
    conversations: int
    turns: int
    user_bytes: int
    assistant_bytes: int
    #: The per-conversation message cap of the capped phases, below 2 x turns.
    capped_messages: int
    reads: int


FULL = Plan(conversations=1000, turns=30, user_bytes=200, assistant_bytes=800, capped_messages=20, reads=2000)
QUICK = Plan(conversations=20, turns=5, user_bytes=200, assistant_bytes=800, capped_messages=4, reads=100)


class ManualClock:
    """The store's clock: moved by hand, a millisecond per write so that every write is
    more recent than the last (eviction follows it), and past the TTL at the end."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def filler(size: int, seed: int) -> str:
    """``size`` bytes of ASCII text, different for each ``seed``."""
    words = f"turn {seed} " + "the quick brown fox jumps over the lazy dog " * (size // 44 + 1)
    return words[:size]


async def used_memory(client: aioredis.Redis) -> int:
    return int((await client.info("memory"))["used_memory"])


async def kept(client: aioredis.Redis) -> tuple[int, int]:
    """(conversations, messages) in the store."""
    ids = await client.zrange(PREFIX + "recent", 0, -1)
    async with client.pipeline(transaction=False) as pipe:
        for conversation_id in ids:
            pipe.llen(PREFIX + "m:" + conversation_id.decode())
        lengths = await pipe.execute()
    return len(ids), sum(lengths)


def summary(seconds: list[float]) -> dict[str, float]:
    """Mean, p50 and p99 in microseconds."""
    return {
        "mean_us": round(sum(seconds) / len(seconds) * 1e6, 1),
        "p50_us": round((percentile(seconds, 50) or 0) * 1e6, 1),
        "p99_us": round((percentile(seconds, 99) or 0) * 1e6, 1),
    }


class Phase:
    """One store over an empty database: write, measure, and leave the store open for reads."""

    def __init__(self, url: str, plan: Plan, limits: StoreLimits, clock: ManualClock) -> None:
        self.plan = plan
        self.limits = limits
        self.clock = clock
        self.store = RedisStore(url, limits, clock)
        self.client: aioredis.Redis = aioredis.from_url(url)

    async def __aenter__(self) -> Phase:
        await self.client.execute_command("FLUSHDB", "SYNC")
        await self.store.open()
        # Every call once, on a conversation deleted again: the store's scripts are in
        # Redis's script cache from here on, so the baseline holds them.
        await self.store.append("warm-up", [StoredMessage("user", "hi")])
        await self.store.window("warm-up", WINDOW)
        await self.store.delete("warm-up")
        await self.store.purge_expired()
        self.baseline = await used_memory(self.client)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.store.close()
        await self.client.aclose()

    async def write(self, turns: int) -> list[float]:
        """Every conversation's turns, conversation after conversation: each write's time."""
        plan, timings = self.plan, []
        for conversation in range(plan.conversations):
            conversation_id = f"bench-{conversation:05d}"
            for turn in range(turns):
                self.clock.advance(0.001)
                now = self.clock()
                messages = [
                    StoredMessage("user", filler(plan.user_bytes, turn), created_at=now),
                    StoredMessage("assistant", filler(plan.assistant_bytes, turn), created_at=now),
                ]
                started = time.perf_counter()
                await self.store.append(conversation_id, messages)
                timings.append(time.perf_counter() - started)
        return timings

    async def measure(self, name: str, turns: int) -> dict[str, Any]:
        conversations, messages = await kept(self.client)
        memory = await used_memory(self.client) - self.baseline
        return {
            "phase": name,
            "turns_written": turns,
            "limits": {"ttl_s": self.limits.ttl_s, "max_conversations": self.limits.max_conversations,
                       "max_messages": self.limits.max_messages},
            "baseline_bytes": self.baseline,
            "memory_bytes": memory,
            "conversations_kept": conversations,
            "messages_kept": messages,
            "bytes_per_message": round(memory / messages) if messages else None,
        }

    async def time_windows(self) -> list[float]:
        rng = random.Random(7)
        timings = []
        for _ in range(self.plan.reads):
            conversation_id = f"bench-{rng.randrange(self.plan.conversations):05d}"
            started = time.perf_counter()
            window = await self.store.window(conversation_id, WINDOW)
            timings.append(time.perf_counter() - started)
            assert len(window) == min(WINDOW, 2 * self.plan.turns), len(window)
        return timings


async def run(url: str, plan: Plan) -> dict[str, Any]:
    clock = ManualClock()
    phases: list[dict[str, Any]] = []
    unbounded = StoreLimits(ttl_s=TTL_S, max_conversations=NO_LIMIT, max_messages=NO_LIMIT)
    async with Phase(url, plan, unbounded, clock) as phase:
        writes = await phase.write(plan.turns)
        phases.append(await phase.measure("unbounded", plan.turns))
        reads = await phase.time_windows()
        clock.advance(TTL_S + 1)
        started = time.perf_counter()
        purged = await phase.store.purge_expired()
        purge_s = time.perf_counter() - started
        after_ttl = await phase.measure("after the TTL", plan.turns)
        after_ttl["purged"] = purged
        after_ttl["purge_ms"] = round(purge_s * 1000, 1)
    half = StoreLimits(ttl_s=TTL_S, max_conversations=plan.conversations // 2, max_messages=NO_LIMIT)
    async with Phase(url, plan, half, clock) as phase:
        await phase.write(plan.turns)
        phases.append(await phase.measure("max_conversations", plan.turns))
    capped = StoreLimits(ttl_s=TTL_S, max_conversations=NO_LIMIT, max_messages=plan.capped_messages)
    for turns in (plan.turns, 2 * plan.turns):
        async with Phase(url, plan, capped, clock) as phase:
            await phase.write(turns)
            phases.append(await phase.measure("max_messages", turns))
    phases.append(after_ttl)
    return {"writes": summary(writes), "windowed_reads": summary(reads), "phases": phases}


def redis_version(url: str) -> str:
    async def ask() -> str:
        client = aioredis.from_url(url)
        try:
            return str((await client.info("server"))["redis_version"])
        finally:
            await client.aclose()

    return asyncio.run(ask())


def size(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if abs(value) >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value / 2**10:,.1f} KiB"


def limits_label(phase: dict[str, Any]) -> str:
    limits = phase["limits"]
    if phase["phase"] == "max_conversations":
        return f"`max_conversations` {limits['max_conversations']:,}"
    if phase["phase"] == "max_messages":
        return f"`max_messages` {limits['max_messages']:,}, {phase['turns_written']} turns written"
    if phase["phase"] == "after the TTL":
        return "after the TTL: clock past `ttl_s`, `purge_expired()`"
    return f"none but the TTL ({limits['ttl_s']:,.0f} s)"


def markdown(results: dict[str, Any]) -> str:
    plan, m = results["plan"], results["machine"]
    dirty = " (src/ had uncommitted changes)" if results["uncommitted_changes"] else ""
    unbounded = results["phases"][0]
    writes, reads = results["writes"], results["windowed_reads"]
    after_ttl = results["phases"][-1]
    # What the gateway's store may hold at its defaults, at this cost per message.
    default_conversations = Settings.model_fields["max_conversations"].default
    at_defaults = default_conversations * MAX_STORED_MESSAGES * unbounded["bytes_per_message"]
    busy = results["busy_cores_before"]
    before = "" if busy is None else f"; the machine was {busy:.2f} cores busy with other work when it began"
    rows = [
        f"| {limits_label(p)} | {p['conversations_kept']:,} | {p['messages_kept']:,} | {size(p['memory_bytes'])} "
        f"| {p['bytes_per_message'] or '-'} | {p['memory_bytes'] / unbounded['memory_bytes']:.2f} |"
        for p in results["phases"]
    ]
    return "\n".join([
        HEADING,
        "",
        f"`bench/redis_memory.py`, {results['date']}; commit `{results['commit']}`{dirty}; {m['cores']} cores, "
        f"{m['cpu_model']}; redis-server {results['redis_version']} on loopback, its own. "
        f"{plan['conversations']:,} conversations of {plan['turns']} turns each through `RedisStore`, one `append` "
        f"per turn of a {plan['user_bytes']}-byte user message and its {plan['assistant_bytes']}-byte answer, "
        "conversation after conversation. *memory* is Redis's `used_memory` (INFO memory) above the empty "
        f"store's ({size(unbounded['baseline_bytes'])}: connected, scripts cached); *vs unbounded* divides "
        "it by the first row's.",
        "",
        "| store limits | conversations kept | messages kept | memory | bytes per message | vs unbounded |",
        "|---|--:|--:|--:|--:|--:|",
        *rows,
        "",
        f"`purge_expired()` dropped {after_ttl['purged']:,} conversations in {after_ttl['purge_ms']:,} ms, "
        "in one script: Redis answers no one else meanwhile. Without a purge, each conversation's keys "
        "carry a Redis `EXPIRE` of the TTL plus 60 s.",
        "",
        f"At the gateway's defaults (`CHATGATE_MAX_CONVERSATIONS` {default_conversations:,}, "
        f"{MAX_STORED_MESSAGES:,} messages kept per conversation) messages like these could take "
        f"{size(at_defaults)} of Redis before a limit bites: it is `CHATGATE_MAX_CONVERSATIONS` (and the "
        "TTL) that bound Redis's memory.",
        "",
        f"Timed with one client, one call at a time, on loopback{before}:",
        "",
        "| call | mean | p50 | p99 |",
        "|---|--:|--:|--:|",
        f"| turn write (`append`, one script) | {writes['mean_us']:,} µs | {writes['p50_us']:,} µs "
        f"| {writes['p99_us']:,} µs |",
        f"| windowed read of {WINDOW} messages (`window`, one pipeline) | {reads['mean_us']:,} µs "
        f"| {reads['p50_us']:,} µs | {reads['p99_us']:,} µs |",
        "",
    ])




def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 conversations x 5 turns; RESULTS.md untouched")
    parser.add_argument("--conversations", type=int, help="conversations written (default 1,000, quick 20)")
    parser.add_argument("--turns", type=int, help="turns per conversation (default 30, quick 5)")
    parser.add_argument("--capped-messages", type=int,
                        help="max_messages of the capped phases, below 2 x turns (default 20, quick 4)")
    parser.add_argument("--quiet-wait", type=float, help="seconds to wait, before the timed writes, for the "
                        "machine to fall below 0.3 busy cores (default 10, quick 0)")
    parser.add_argument("--out", type=Path, help="results (default bench/out, quick: bench/out/quick)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else FULL
    plan = Plan(
        conversations=args.conversations or base.conversations,
        turns=args.turns or base.turns,
        user_bytes=base.user_bytes,
        assistant_bytes=base.assistant_bytes,
        capped_messages=args.capped_messages or base.capped_messages,
        reads=base.reads,
    )
    if not 0 < plan.capped_messages < 2 * plan.turns:
        print("redis_memory: --capped-messages must be below the messages written (2 x turns)", file=sys.stderr)
        return 2
    out = args.out or BENCH / "out" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    server = start_redis()
    try:
        quiet_wait = args.quiet_wait if args.quiet_wait is not None else (0 if args.quick else 10)
        busy = wait_for_quiet(quiet_wait, below_cores=0.3) if quiet_wait > 0 else None
        results = asyncio.run(run(server.url, plan))
        version = redis_version(server.url)
    finally:
        server.stop()
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d"),
        "commit": git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--", "src")),
        "machine": machine(),
        "redis_version": version,
        "busy_cores_before": None if busy is None else round(busy, 2),
        "plan": asdict(plan),
        **results,
    }
    section = markdown(results)
    (out / "redis-memory.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "redis-memory.md").write_text(section)
    print(section)
    if not args.quick and args.out is None:
        put_section(BENCH / "RESULTS.md", HEADING, section)
        print(f"wrote its section into {BENCH / 'RESULTS.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
