"""What seeing the gateway costs: the same answers cells with telemetry as shipped (the turn
log line and Prometheus metrics, always on), with OpenTelemetry traces on as well, and
with the commit before telemetry existed, in one run.

    .venv/bin/python bench/telemetry_cost.py --base REV     # its section in RESULTS.md
    .venv/bin/python bench/telemetry_cost.py --base REV --quick

Each configuration is one ``bench/run.py`` run (fake upstream and gateway started afresh,
SQLite store, ``--repeat`` attempts per cell, the least disturbed kept). ``--base REV`` is
checked out into a temporary git worktree and served from there (its ``src`` first on
``PYTHONPATH``). With traces on, the gateway exports to an OTLP/HTTP receiver in this
process (``chatgate.testing.otlp``), which keeps what arrives, as a collector would.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from report import put_section
from run import git, machine

from chatgate.testing.otlp import otlp_receiver

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
HEADING = "## What seeing it costs"
TARGETS = "chat,ws,openai"


def run_config(name: str, out: Path, args: argparse.Namespace, env: dict[str, str]) -> dict[str, Any]:
    command = [
        sys.executable, str(BENCH / "run.py"), "--quick", "--store", "sqlite",
        "--skip", "idle,streams,relay,granian", "--levels", args.levels, "--targets", TARGETS,
        "--repeat", str(args.repeat), "--duration", str(args.duration), "--out", str(out / name),
        *(f"--gateway-env={key}={value}" for key, value in env.items()),
    ]  # fmt: skip
    print(f"== {name}", flush=True)
    subprocess.run(command, check=True)
    results: dict[str, Any] = json.loads((out / name / "results.json").read_text())
    return results


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Per cell: answers/s, TTFT p50 and the gateway's CPU per 1,000 tokens, each configuration
    side by side."""
    names = list(runs)
    columns = [("answers/s", "answers_per_s", "{:,.0f}"), ("TTFT p50 ms", "ttft_p50_ms", "{}"),
               ("CPU ms / 1k tokens", "server_cpu_s_per_1k_tokens", "{:.0f}")]
    head = " | ".join(f"{label}: {name}" for label, _, _ in columns for name in names)
    lines = [f"| target | clients | {head} |", "|---|---:|" + "---:|" * (len(columns) * len(names))]
    cells = {name: {(c["target"], c["concurrency"]): c for c in run["cells"]} for name, run in runs.items()}
    keys = sorted({key for per in cells.values() for key in per}, key=lambda k: (k[1], k[0]))
    for target, level in keys:
        values = []
        for _, field, form in columns:
            for name in names:
                value = cells[name].get((target, level), {}).get(field)
                if value is not None and field == "server_cpu_s_per_1k_tokens":
                    value *= 1000
                values.append("—" if value is None else form.format(value))
        lines.append(f"| {target} | {level} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit before telemetry (git revision)")
    parser.add_argument("--quick", action="store_true", help="to bench/out/quick only, not RESULTS.md")
    parser.add_argument("--levels", default="1,50")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    out = BENCH / "out" / ("quick" if args.quick else "") / "telemetry-cost"
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="chatgate-base-") as base:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", base, args.base], check=True)
        try:
            runs["before telemetry"] = run_config("before", out, args, {"PYTHONPATH": f"{base}/src"})
            runs["as shipped"] = run_config("shipped", out, args, {})
            with otlp_receiver() as receiver:
                env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "chatgate-bench"}
                runs["traces on"] = run_config("traces", out, args, env)
                exported = len(receiver.raw())
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", base], check=False)
    section = "\n".join([
        HEADING,
        "",
        f"{datetime.now(UTC):%Y-%m-%d}, commit {git('rev-parse', '--short', 'HEAD')} against {args.base} "
        f"(before the turn log, the metrics families and tracing), {machine()['cores']} cores, "
        f"SQLite store, {args.duration:g} s cells, best of {args.repeat}; `bench/telemetry_cost.py`. "
        "*As shipped* is the default: the turn log line and Prometheus metrics. *Traces on* "
        f"adds OpenTelemetry export to a loopback OTLP receiver ({exported / 1e6:.1f} MB of spans received).",
        "",
        table(runs),
    ])
    (out / "section.md").write_text(section + "\n")
    print(section)
    if not args.quick:
        put_section(BENCH / "RESULTS.md", HEADING, section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
