"""bench/soak.py in its quick mode, so that it keeps running: a few seconds of the mixed
load (turns, slow readers, malformed frames, upstream faults, idle and unread HTTP
connections) against a real ``chatgate serve``, which must come out of it alive, with
every malformed frame answered and the stored history equal to what was streamed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "soak.py"


def test_quick_soak_passes_its_checks(tmp_path: Path) -> None:
    record = (REPO / "bench" / "RESULTS.md").read_text()
    finished = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert (REPO / "bench" / "RESULTS.md").read_text() == record, "a quick run replaced the record"
    assert (tmp_path / "soak.md").read_text().startswith("## Soak")
    results = json.loads((tmp_path / "soak.json").read_text())
    assert results["checks"] and all(results["checks"].values()), results["checks"]

    clients = results["clients"]
    assert clients["turns_done"] > 0
    ended = sum(clients.get(f"turns_{how}", 0) for how in ("done", "error", "refused", "interrupted"))
    assert clients["turns_sent"] == ended, clients
    assert clients["malformed_sent"] > 0 and clients["malformed_answered"] == clients["malformed_sent"]
    assert results["history"]["checked"] > 0 and results["history"]["matching"] == results["history"]["checked"]
    assert results["alive"] is True
    assert results["rss_kib"]["after_warmup"] and results["rss_kib"]["end"]
    assert results["held"]["idle_opened"] > 0 and results["held"]["unread_streams_opened"] > 0
