"""bench/cluster.py in its quick mode, so that it keeps running: its own redis-server, nginx,
fake upstreams and gateways; the Redis log's entries counted; nginx spreading answers over
two instances; and the record (bench/RESULTS.md) left alone."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "cluster.py"
LIMIT_S = 60
BURST_TOKENS = 40  # the quick plan's upstream without delay


def run_quick(out: Path) -> tuple[int, str, float]:
    began = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(out)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = process.communicate(timeout=LIMIT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM lets the script stop the servers it started before it exits.
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
        raise AssertionError(f"bench/cluster.py --quick took over {LIMIT_S} s:\n{output}") from None
    return process.returncode, output, time.monotonic() - began


def test_quick_run_measures_the_log_the_checkpoints_and_two_instances(tmp_path: Path) -> None:
    record = (REPO / "bench" / "RESULTS.md").read_text()
    returncode, output, elapsed = run_quick(tmp_path)
    assert returncode == 0, output
    assert elapsed < LIMIT_S
    assert (REPO / "bench" / "RESULTS.md").read_text() == record, "a quick run replaced the record"
    assert (tmp_path / "cluster.md").read_text().startswith("## Several instances on one Redis")
    cells = json.loads((tmp_path / "cluster.json").read_text())["cells"]
    for cell in cells:
        assert cell["completed"] > 0 and cell["errors"] == 0, cell

    log = {(c["upstream"], c["target"], c["store"]): c for c in cells if c["part"] == "log"}
    assert set(log) == {
        *((upstream, target, store) for upstream in ("burst", "paced") for target in ("chat", "ws")
          for store in ("memory", "sqlite", "redis")),
        ("paced", "chat", "sqlite-no-checkpoint"), ("paced", "ws", "sqlite-no-checkpoint"),
    }
    for (upstream, target, store), cell in log.items():
        if store == "redis":
            assert cell["xadd_per_answer"] >= 1, cell  # one entry may hold start, deltas and done
            assert cell["redis_cpu_per_1k"] > 0, cell
        else:
            assert cell["xadd_per_answer"] == 0, cell
        assert cell["total_cpu_per_1k"] >= cell["gateway_cpu_per_1k"] > 0, cell
        if upstream == "burst" and store == "redis":
            # Events logged while a batch is on its way to Redis join one entry.
            assert cell["xadd_per_answer"] < BURST_TOKENS / 2, cell
            assert log[("paced", target, "redis")]["xadd_per_answer"] > cell["xadd_per_answer"]

    instances = {(c["target"], c["via"]): c for c in cells if c["part"] == "instances"}
    assert set(instances) == {("direct", "direct upstream"), *((target, via) for target in ("chat", "ws")
                              for via in ("one instance, nginx", "two instances, nginx"))}
    for target in ("chat", "ws"):
        first, second = instances[(target, "one instance, nginx")]["gateway_cores"]
        assert second < first / 5, (target, first, second)
        first, second = instances[(target, "two instances, nginx")]["gateway_cores"]
        assert first > 0 and second > 0, (target, first, second)
        assert instances[(target, "two instances, nginx")]["nginx_cores"] > 0
