"""bench/redis_memory.py in its quick mode, so that it keeps running: its own redis-server,
the store's limits holding, and the record (bench/RESULTS.md) left alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "redis_memory.py"
# The quick plan, with enough conversations that the memory compared is hundreds of KiB:
# with the quick run's 20, Redis's own allocations (client buffers) moved it as much.
CONVERSATIONS, TURNS, CAP = 200, 5, 4


def test_quick_run_shows_memory_bounded_by_the_limits(tmp_path: Path) -> None:
    record = (REPO / "bench" / "RESULTS.md").read_text()
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--conversations", str(CONVERSATIONS), "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert (REPO / "bench" / "RESULTS.md").read_text() == record, "a quick run replaced the record"
    results = json.loads((tmp_path / "redis-memory.json").read_text())
    assert (tmp_path / "redis-memory.md").read_text().startswith("## Conversations in Redis memory")
    unbounded, lru, capped, capped_twice, after_ttl = results["phases"]

    assert (unbounded["conversations_kept"], unbounded["messages_kept"]) == (CONVERSATIONS, CONVERSATIONS * TURNS * 2)
    # Each message costs at least its text: 200 and 800 bytes a turn.
    assert unbounded["bytes_per_message"] >= 500, unbounded

    assert (lru["conversations_kept"], lru["messages_kept"]) == (CONVERSATIONS // 2, CONVERSATIONS // 2 * TURNS * 2)
    assert lru["memory_bytes"] < unbounded["memory_bytes"]

    for phase in (capped, capped_twice):
        assert phase["limits"]["max_messages"] == CAP
        assert (phase["conversations_kept"], phase["messages_kept"]) == (CONVERSATIONS, CONVERSATIONS * CAP)
        assert phase["memory_bytes"] < unbounded["memory_bytes"]
    assert (capped["turns_written"], capped_twice["turns_written"]) == (TURNS, 2 * TURNS)
    # Twice the turns written, the same memory: the cap decides it.
    assert abs(capped_twice["memory_bytes"] - capped["memory_bytes"]) < 0.25 * capped["memory_bytes"]

    assert (after_ttl["purged"], after_ttl["conversations_kept"], after_ttl["messages_kept"]) == (CONVERSATIONS, 0, 0)
    assert after_ttl["memory_bytes"] < unbounded["memory_bytes"] / 2

    for timing in (results["writes"], results["windowed_reads"]):
        assert 0 < timing["p50_us"] <= timing["p99_us"], timing
