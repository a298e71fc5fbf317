"""bench/RESULTS.md and bench/chart.png from run.py's results.json.

    .venv/bin/python bench/report.py [bench/out/results.json] [RESULTS.md] [chart.png]
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHATGATE_TARGETS = ("chat", "ws", "openai", "ollama")
API_LABELS = {"chat": "POST /chat", "ws": "/ws", "openai": "/v1/chat/completions", "ollama": "/api/chat"}
#: The stream count at which the gateway's connect p99 and CPU per token are judged against
#: the bare relay's (run.py makes the 1-worker gateway lane run it whatever came before).
STREAMS_COMPARED_AT = 1000


@dataclass
class Verdict:
    target: str
    measured: str
    passed: bool | None  # None: not measured

    @property
    def mark(self) -> str:
        return {True: "pass", False: "**FAIL**", None: "not measured"}[self.passed]


def _cell(results: dict[str, Any], target: str, level: int, cells: str = "cells") -> dict[str, Any] | None:
    """A cell of the main run, or with ``cells="sqlite_cells"`` of the SQLite-store gateway."""
    return next((c for c in results.get(cells) or [] if c["target"] == target and c["concurrency"] == level), None)


def added_ttft(results: dict[str, Any], cell: dict[str, Any]) -> float | None:
    """The cell's TTFT p50 minus the direct upstream's at its level (from the main run, for
    the SQLite-store cells too: the same fake served both)."""
    direct = _cell(results, "direct", cell["concurrency"])
    if direct is None or cell["target"] == "direct" or None in (cell["ttft_p50_ms"], direct["ttft_p50_ms"]):
        return None
    return float(cell["ttft_p50_ms"] - direct["ttft_p50_ms"])


def _ratio(results: dict[str, Any], cell: dict[str, Any]) -> float | None:
    direct = _cell(results, "direct", cell["concurrency"])
    if direct is None or not direct["answers_per_s"]:
        return None
    return float(cell["answers_per_s"] / direct["answers_per_s"])


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def verdicts(results: dict[str, Any]) -> list[Verdict]:
    """The Targets table: the answers targets on both stores, then the tail, streams and idle ones."""
    stores = (("cells", f"{results['settings']['store']} store"), ("sqlite_cells", "SQLite store"))
    found: list[Verdict] = []
    for cells, store in stores:
        for key in CHATGATE_TARGETS:
            cell = _cell(results, key, 1, cells)
            added = added_ttft(results, cell) if cell else None
            found.append(Verdict(f"added TTFT p50 at 1 client ≤ 1 ms ({API_LABELS[key]}, {store})",
                                 _fmt(added, 3, " ms"), None if added is None else added <= 1.0))
    for key, floor, label in (("chat", 1000, "HTTP streaming (POST /chat)"),
                              ("ws", 800, "WebSocket, new connection per answer (/ws)")):
        for cells, store in stores:
            cell = _cell(results, key, 50, cells)
            rate = cell["answers_per_s"] if cell else None
            found.append(Verdict(f"≥ {floor:,} answers/s at 50 clients, {label}, {store}",
                                 _fmt(rate, 0, " answers/s"), None if rate is None else rate >= floor))
    found += [_tail(results, key) for key in ("openai", "ollama")]
    found += _stream_verdicts(results)
    idle = results.get("idle_ws")
    per = idle["kib_per_connection"] if idle else None
    opened = f" ({idle['opened']:,} open)" if idle else ""
    found.append(Verdict("≤ 20 KiB RSS per idle WebSocket connection (5,000 open)", _fmt(per, 1, " KiB") + opened,
                         None if per is None else per <= 20))
    return found


def _tail(results: dict[str, Any], key: str) -> Verdict:
    """TTFT p99 at 200 clients on ``key`` against POST /chat's: a compatible API must not add a tail."""
    target = f"TTFT p99 at 200 clients on {API_LABELS[key]} ≤ 1.5x POST /chat's"
    theirs, ours = (_cell(results, k, 200) for k in (key, "chat"))
    p99, reference = (c["ttft_p99_ms"] if c else None for c in (theirs, ours))
    if p99 is None or not reference:
        return Verdict(target, f"{_fmt(p99)} ms vs {_fmt(reference)} ms", None)
    return Verdict(target, f"{p99:,.2f} ms vs {reference:,.2f} ms ({p99 / reference:.2f}x)", p99 <= 1.5 * reference)


def _stream_verdicts(results: dict[str, Any]) -> list[Verdict]:
    """The gateway's 1-worker lane against the bare relay's: connect p99 and CPU per token at
    STREAMS_COMPARED_AT, and the counts each held. Not measured when the ramp did not run; a
    side missing from a ramp that ran is a FAIL."""
    at = STREAMS_COMPARED_AT
    targets = (f"connect p99 of a new WebSocket while {at:,} streams are held ≤ 100 ms and ≤ 10x the bare relay's",
               "streams held within budget ≥ 90 % of the bare relay's count",
               f"gateway CPU per token with {at:,} streams held ≤ 1.5x the bare relay's")
    streams = results.get("streams")
    if not streams or "steps" not in streams:
        return [Verdict(target, "-", None) for target in targets]
    connect = _against_relay(targets[0], streams, "held_connect_p99_ms", " ms",
                             lambda ours, ratio: ours <= 100 and ratio is not None and ratio <= 10)
    storm = _against_relay("", streams, "connect_p99_ms", " ms", lambda _ours, _ratio: True)
    connect.measured += f"; the step's own {at:,} connections, opened over 1 s: {storm.measured}"
    return [
        connect,
        _held(targets[1], streams),
        _against_relay(targets[2], streams, "held_server_us_per_token", " µs",
                       lambda _ours, ratio: ratio is not None and ratio <= 1.5),
    ]


def _against_relay(target: str, streams: dict[str, Any], key: str, unit: str,
                   judge: Callable[[float, float | None], bool]) -> Verdict:
    """``key`` of the gateway's step at STREAMS_COMPARED_AT against the bare relay's;
    ``judge(gateway's, ratio)`` decides."""
    sides = []
    for via, name, missing in (("ws", "gateway", "not reached"), ("relay", "bare relay", "not run")):
        step = next((s for s in streams["steps"] if s["via"] == via and s["streams"] == STREAMS_COMPARED_AT), None)
        value = None if step is None else step.get(key)
        shown = _fmt(value, 1, unit) if value is not None else (missing if step is None else "no figure")
        sides.append((value, f"{name} {shown}"))
    (ours, ours_shown), (relay, relay_shown) = sides
    if ours is None or relay is None:
        return Verdict(target, f"{ours_shown}, {relay_shown}", False)
    ratio = ours / relay if relay else None
    return Verdict(target, f"{ours_shown}, {relay_shown} ({_fmt(ratio)}x)", judge(ours, ratio))


def _held(target: str, streams: dict[str, Any]) -> Verdict:
    lanes = {lane["via"]: lane["max_streams_within_budget"] for lane in streams["lanes"]}
    ours, relay = lanes.get("ws"), lanes.get("relay")
    if ours is None or relay is None:
        return Verdict(target, f"gateway {_fmt(ours, 0)}, bare relay {'not run' if relay is None else relay}", False)
    if not relay:  # the floor itself held no count: nothing to compare with, not a pass
        return Verdict(target, f"gateway {ours:,}, bare relay 0 (no count within budget)", False)
    return Verdict(target, f"gateway {ours:,}, bare relay {relay:,} ({ours / relay * 100:.0f} %)", ours >= 0.9 * relay)


def _table(results: dict[str, Any]) -> list[str]:
    labels = {t["key"]: t["label"] for t in results.get("targets", [])}
    lines = [
        "| target | clients | answers/s | vs direct | TTFT p50 | TTFT p99 | added TTFT p50 | gap p99 "
        "| server CPU s / 1k tokens | server cores | answers/s per server core | peak RSS | RSS after "
        "| client cores | other cores | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in sorted(results["cells"], key=lambda c: (c["concurrency"], list(labels).index(c["target"]))):
        ttft = f"{_fmt(cell['ttft_p50_ms'])} ms"
        if cell.get("connect_p50_ms") is not None:
            ttft += f" (+{_fmt(cell['connect_p50_ms'])} connect)"
        cores = cell["server_cpu_share"]
        lines.append(
            f"| {labels.get(cell['target'], cell['target'])} | {cell['concurrency']} "
            f"| {cell['answers_per_s']:,.0f} | {_fmt(_ratio(results, cell))} | {ttft} "
            f"| {_fmt(cell['ttft_p99_ms'])} ms | {_fmt(added_ttft(results, cell), 3, ' ms')} "
            f"| {_fmt(cell['gap_p99_ms'], 3)} ms | {_fmt(cell['server_cpu_s_per_1k_tokens'], 3)} "
            f"| {cores:.2f} | {_fmt(cell['answers_per_s'] / cores if cores else None, 0)} "
            f"| {cell['peak_rss_kib'] / 1024:,.0f} MiB | {cell['rss_kib'] / 1024:,.0f} MiB "
            f"| {cell['client_cpu_share']:.2f} | {cell['other_cores']:.2f} | {cell['errors']} |"
        )
    return lines


def _sqlite(results: dict[str, Any]) -> list[str]:
    """The SQLite-store gateway's cells, which the Targets table judges beside the main ones."""
    cells = results.get("sqlite_cells")
    if cells is None:
        return ["Not run."]
    lines = [
        "chatgate's four APIs again, on a second gateway with the SQLite store (a fresh database), "
        "in the same run and over the same fake; *added TTFT* is against the direct upstream's cell above.",
        "",
        "| API | clients | answers/s | TTFT p50 | TTFT p99 | added TTFT p50 | gap p99 | server CPU s / 1k tokens "
        "| peak RSS | other cores | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for cell in sorted(cells, key=lambda c: (c["concurrency"], CHATGATE_TARGETS.index(c["target"]))):
        ttft = f"{_fmt(cell['ttft_p50_ms'])} ms"
        if cell.get("connect_p50_ms") is not None:
            ttft += f" (+{_fmt(cell['connect_p50_ms'])} connect)"
        lines.append(
            f"| {API_LABELS[cell['target']]} | {cell['concurrency']} | {cell['answers_per_s']:,.0f} | {ttft} "
            f"| {_fmt(cell['ttft_p99_ms'])} ms | {_fmt(added_ttft(results, cell), 3, ' ms')} "
            f"| {_fmt(cell['gap_p99_ms'], 3)} ms | {_fmt(cell['server_cpu_s_per_1k_tokens'], 3)} "
            f"| {cell['peak_rss_kib'] / 1024:,.0f} MiB | {cell['other_cores']:.2f} | {cell['errors']} |"
        )
    return lines if cells else [*lines, "", "No cell completed (see Failures)."]


def _scaling(results: dict[str, Any]) -> list[str]:
    """``--workers`` 1 and 2, each pinned to cores of its own: a figure, not a target."""
    scaling = results.get("scaling")
    if not scaling:
        return ["Not run."]
    runs = [run for run in scaling["runs"] if run["status"] == "ok"]
    stores = sorted({run["store"].replace("sqlite", "SQLite") for run in runs})
    lines = [
        f"`chatgate serve --workers N` pinned with `taskset -c` to the first N of the machine's "
        f"{scaling['cores']} cores, its fake upstream and the load processes to the others; `/chat` and "
        f"`/ws` at {scaling['level']} clients, closed loop as above. Several workers cannot share the memory "
        f"store, so every count ran on the {', '.join(stores) or '-'} store (a fresh database each). "
        "A figure, not a target.",
        "",
        "| workers | gateway cores | fake + load cores | POST /chat answers/s | /ws answers/s |",
        "|--:|---|---|--:|--:|",
    ]
    rates: dict[int, dict[str, float]] = {}
    for run in scaling["runs"]:
        if run["status"] != "ok":
            lines.append(f"| {run['workers']} | {run['status']} | | | |")
            continue
        rates[run["workers"]] = {c["target"]: c["answers_per_s"] for c in run["cells"]}
        shared = " (shared with the gateway)" if run["shared"] else ""
        lines.append(f"| {run['workers']} | {run['gateway_cpus']} | {run['other_cpus']}{shared} "
                     f"| {_fmt(rates[run['workers']].get('chat'), 0)} | {_fmt(rates[run['workers']].get('ws'), 0)} |")
    one, two = rates.get(1, {}), rates.get(2, {})
    ratios = ", ".join(f"{API_LABELS[key]} {_fmt(two[key] / one[key] if one.get(key) and key in two else None)}x"
                       for key in ("chat", "ws"))
    lines += ["", f"2 workers / 1 worker: {ratios}."]
    if any(run["shared"] for run in runs):
        lines.append(f"With {scaling['cores']} cores no core was left for the fake and the load beside a gateway "
                     "that took all of them, so they shared its cores and the ratio shows little of what a "
                     "second worker buys.")
    return lines


def _streams(results: dict[str, Any]) -> list[str]:
    streams = results.get("streams")
    if not streams or "lanes" not in streams:
        return ["Not run."]
    labels = {lane["via"]: lane["label"] for lane in streams["lanes"]}
    floors = "".join(f" ({lane['label']} not before {lane['at_least']:,}, where the targets compare it with "
                     "the bare relay)" for lane in streams["lanes"] if lane.get("at_least"))
    best = ", ".join(f"{lane['label']} **{lane['max_streams_within_budget']:,}**" for lane in streams["lanes"])
    lines = [
        f"Each stream is a new WebSocket asking for {streams['answer_s']:.0f} s of tokens at 20 tokens/s; "
        "streams start evenly over max(1 s, count/1000 s). *Held* gaps are those while every stream is "
        "open: from 1 s after the last stream's first token (a gateway slow to accept starts some late) "
        "until 0.5 s before the first stream's last token; *held window* gives those bounds in seconds "
        "after the first start. A count passes when the held p99 gap minus the nominal "
        f"{streams['nominal_gap_ms']:.0f} ms is ≤ {streams['budget_ms']:.0f} ms, ≥ 99 % of streams "
        "complete, and the held window is at least 5 s long. "
        f"Each lane climbs until its first count over budget{floors}; the references (the direct "
        f"upstream and the bare relay) climb at least to {streams['goal_streams']:,} and one count more. "
        "*Connect p99, ramp* is over the step's own streams, opened together (a connection storm); "
        "*connect p99, held* is over new WebSockets opened one at a time, every 0.05 s, while every "
        "stream is held (their number in brackets): a user opening the page on the busy server.",
        "",
        "The **bare relay** (`bench/bare_relay.py`) is not a gateway: raw asyncio protocols on uvloop that "
        "relay each upstream token as one frame, with no framework, HTTP client library, event log, auth, "
        "storage or limits. Its cost per token is a floor for any Python gateway on this machine. The "
        "fake upstream and the load processes run on the same two cores, so *machine busy cores* near 2 "
        "means the machine, not the server under test, is the limit.",
        "",
        f"Largest count within budget: {best}.",
        "",
        "| streams | via | completed | held gap p50 | held gap p99 | added p99 | held gap max "
        "| whole-run gap p99 | held window | TTFT p50 | connect p99, ramp | connect p99, held "
        "| server cores, held | server CPU per token, held | machine busy cores, held |",
        "|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for step in streams["steps"]:
        lines.append(
            f"| {step['streams']:,} | {labels.get(step['via'], step['via'])} "
            f"| {step['completed']:,} | {_fmt(step['gap_p50_ms'])} ms | {_fmt(step['gap_p99_ms'])} ms "
            f"| {_fmt(step['added_gap_p99_ms'])} ms | {_fmt(step['gap_max_ms'])} ms "
            f"| {_fmt(step['whole_run_gap_p99_ms'])} ms "
            f"| {_fmt(step.get('held_from_s'), 1)} to {_fmt(step.get('held_to_s'), 1)} s "
            f"| {_fmt(step['ttft_p50_ms'])} ms "
            f"| {_fmt(step.get('connect_p99_ms'))} ms "
            f"| {_fmt(step.get('held_connect_p99_ms'))} ms ({step.get('held_connects', 0)}) "
            f"| {_fmt(step.get('held_server_cores'))} | {_fmt(step.get('held_server_us_per_token'), 1)} µs "
            f"| {_fmt(step.get('held_machine_busy_cores'))} |"
        )
    return lines


def _idle(results: dict[str, Any]) -> str:
    idle = results.get("idle_ws")
    if not idle:
        return "Not run."
    return (
        f"{idle['opened']:,} of {idle['requested']:,} idle `/ws` connections opened in {idle['open_s']:.1f} s "
        f"({idle['failed']} failed, {idle['still_open_at_release']:,} still open when released): gateway RSS "
        f"{idle['rss_before_kib'] / 1024:,.1f} → {idle['rss_held_kib'] / 1024:,.1f} MiB, "
        f"**{_fmt(idle['kib_per_connection'], 1)} KiB per connection** "
        f"({idle['rss_after_close_kib'] / 1024:,.1f} MiB after they closed)."
    )


def _granian(results: dict[str, Any]) -> list[str]:
    """uvicorn (what ``chatgate serve`` runs) against granian, same app, same run."""
    granian = results.get("granian") or {}
    if granian.get("status") != "ok":
        return [f"granian: {granian.get('status', 'not run')}."]
    rows = ["| server | target | clients | answers/s | TTFT p50 | server CPU s / 1k tokens |",
            "|---|---|--:|--:|--:|--:|"]
    for cell in granian["cells"]:
        ours = _cell(results, cell["target"], cell["concurrency"])
        for name, c in (("uvicorn", ours), (f"granian {granian['version']}", cell)):
            if c is not None:
                rows.append(f"| {name} | {cell['target']} | {c['concurrency']} | {c['answers_per_s']:,.0f} | "
                            f"{_fmt(c['ttft_p50_ms'])} ms | {_fmt(c['server_cpu_s_per_1k_tokens'], 3)} |")
    idle = results.get("idle_ws") or {}
    theirs = granian["idle_ws"]
    rows += ["", f"Idle WebSockets: uvicorn {_fmt(idle.get('kib_per_connection'), 1)} KiB per connection "
             f"({idle.get('opened', 0):,} open), granian {_fmt(theirs.get('kib_per_connection'), 1)} KiB "
             f"({theirs.get('opened', 0):,} open)."]
    return rows


#: The sections this report writes; any other section of RESULTS.md belongs to another
#: benchmark script (redis_memory.py, cluster.py) and is kept as it is.
OWN_SECTIONS = (
    "## Targets", "## Answers", "## Answers with the SQLite store", "## Workers, pinned", "## Idle WebSockets",
    "## Concurrent 20-tokens/s streams", "## ASGI server", "## What was changed", "## Failures",
)


#: Sections of other scripts go before this one (the changes, by hand, close the page).
CHANGES_HEADING = "## What was changed"


def put_section(results_md: Path, heading: str, section: str) -> None:
    """Put ``section`` (which starts with ``heading``) into RESULTS.md: in place of the
    previous one, else before the changes, else at the end. For the bench scripts that
    each own one section of the page."""
    text = results_md.read_text()
    section = section.rstrip("\n") + "\n"
    if heading + "\n" in text:
        start = text.index(heading + "\n")
        end = text.find("\n## ", start + len(heading))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    elif CHANGES_HEADING in text:
        at = text.index(CHANGES_HEADING)
        text = text[:at] + section + "\n" + text[at:]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_md.write_text(text)


def other_sections(previous: str) -> list[str]:
    """The sections of a previous RESULTS.md that other scripts wrote, in their order."""
    parts = previous.split("\n## ")[1:]
    return [f"## {part.rstrip()}" for part in parts if not f"## {part}".startswith(OWN_SECTIONS)]


def markdown(results: dict[str, Any], chart_name: str, kept: list[str] | None = None) -> str:
    m = results["machine"]
    s = results["settings"]
    failures = [*results.get("failures", []), *(results.get("streams") or {}).get("failures", [])]
    dirty = " (src/ had uncommitted changes)" if results.get("uncommitted_changes") else ""
    lines = [
        "# chatgate benchmark results",
        "",
        f"- date: {results['date']}; commit `{results['commit']}`{dirty}; mode: {results['mode']} "
        f"(`bench/run.py`, {results.get('elapsed_s', '?')} s)",
        f"- machine: {m['cores']} cores, {m['cpu_model']}, {m['memory_gib']} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; load average at start {m['load_average_at_start']} "
        "(other work shares this machine, so figures are noisy)",
        f"- every process on loopback: fake upstream ({s['tokens']} tokens, no delay), chatgate "
        f"({s['workers']} worker, {s['store']} store), {s['load_processes']} load processes "
        f"(aiohttp + uvloop); {s['warmup_s']:.0f} s warm-up, then {s['duration_s']:.0f} s measured per cell; "
        f"each cell run {s.get('repeat', 1)} time(s) after waiting up to {s.get('quiet_wait_s', 0):.0f} s for the "
        "machine to calm down, keeping the attempt other processes disturbed least (all attempts are in "
        "results.json)",
        *([f"- extra gateway settings: {s['gateway_env']}"] if s.get("gateway_env") else []),
        f"- LiteLLM: {results.get('litellm_version', '')} "
        + next((t["status"] for t in results.get("targets", []) if t["key"] == "litellm"), "not selected"),
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|--:|---|",
        *[f"| {v.target} | {v.measured} | {v.mark} |" for v in verdicts(results)],
        "",
        "## Answers",
        "",
        "Closed loop: each client asks again as soon as its answer ends. TTFT counts from the request "
        "(for `/ws`, from the chat frame; the handshake is shown apart). *added TTFT* is the target's "
        "p50 minus the direct upstream's at the same concurrency. *gap* is the time between two "
        "tokens reaching the client. *server CPU* is the process serving that target (for direct, the "
        "fake itself); *peak RSS* is VmHWM since the cell began; *client CPU* is cores used by the "
        "load processes; *other cores* is what everything else on the machine used meanwhile.",
        "",
        *_table(results),
        "",
        *[f"- {t['label']}: {t['status']}" for t in results.get("targets", []) if t["status"] != "ok"],
        "",
        f"![answers/s and added TTFT]({chart_name})",
        "",
        "## Answers with the SQLite store",
        "",
        *_sqlite(results),
        "",
        "## Workers, pinned",
        "",
        *_scaling(results),
        "",
        "## Idle WebSockets",
        "",
        _idle(results),
        "",
        "## Concurrent 20-tokens/s streams",
        "",
        *_streams(results),
        "",
        "## ASGI server: uvicorn against granian",
        "",
        *_granian(results),
        "",
        *[line for section in kept or [] for line in (section, "")],
        *_changes(),
        *(["## Failures", "", *[f"- {f}" for f in failures], ""] if failures else []),
        "Raw figures: `bench/out/results.json`.",
        "",
    ]
    return "\n".join(lines)


def chart(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {t["key"]: t["label"] for t in results.get("targets", [])}
    keys = [k for k in labels if any(c["target"] == k for c in results["cells"])]
    colours = {key: f"C{index}" for index, key in enumerate(labels)}
    levels = sorted({c["concurrency"] for c in results["cells"]})
    figure, (rate_axes, added_axes) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / max(1, len(keys))
    for index, key in enumerate(keys):
        xs = [i + index * width for i in range(len(levels))]
        cells = [_cell(results, key, level) for level in levels]
        rate_axes.bar(xs, [c["answers_per_s"] if c else 0 for c in cells], width, label=labels[key],
                      color=colours[key])
        if key != "direct":
            added = [(added_ttft(results, c) or 0) if c else 0 for c in cells]
            added_axes.bar(xs, added, width, label=labels[key], color=colours[key])
    for axes, title, unit in ((rate_axes, "answers per second", "answers/s"),
                              (added_axes, "added TTFT p50 vs direct", "ms (symlog)")):
        axes.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(levels))])
        axes.set_xticklabels([f"{level} client{'s' if level > 1 else ''}" for level in levels])
        axes.set_title(title)
        axes.set_ylabel(unit)
        axes.grid(axis="y", alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    added_axes.set_yscale("symlog", linthresh=1.0)
    figure.suptitle(f"chatgate bench {results['date']} ({results['commit']})")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def _changes() -> list[str]:
    """What was changed for speed and what each change gained: bench/CHANGES.md, by hand,
    since each figure there compares two runs (before and after one change)."""
    path = Path(__file__).with_name("CHANGES.md")
    return [path.read_text().rstrip(), ""] if path.exists() else []


def write(results: dict[str, Any], markdown_path: Path, chart_path: Path) -> None:
    drawn = chart(results, chart_path)
    previous = markdown_path.read_text() if markdown_path.exists() else ""
    text = markdown(results, chart_path.name, other_sections(previous))
    if not drawn:
        text = text.replace(f"![answers/s and added TTFT]({chart_path.name})", "(no chart: matplotlib is not installed)")
    markdown_path.write_text(text)


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("out") / "results.json"
    here = Path(__file__).parent
    write(json.loads(source.read_text()),
          Path(sys.argv[2]) if len(sys.argv) > 2 else here / "RESULTS.md",
          Path(sys.argv[3]) if len(sys.argv) > 3 else here / "chart.png")
