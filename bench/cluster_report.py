"""cluster.py's section of bench/RESULTS.md, from its results."""

from __future__ import annotations

from typing import Any

HEADING = "## Several instances on one Redis"
#: The section goes before this one, which is appended by hand (CHANGES.md).
TARGETS = {"chat": "POST /chat", "ws": "/ws", "direct": "direct NDJSON"}
STORES = {"memory": "in-process (memory store)", "sqlite": "in-process (SQLite store)",
          "redis": "Redis Stream (Redis store)"}


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def _ttft(cell: dict[str, Any]) -> str:
    text = _fmt(cell["ttft_p50_ms"], 2, " ms")
    if cell["target"] == "ws" and cell["connect_p50_ms"] is not None:
        text += f" (+{cell['connect_p50_ms']:,.2f} connect)"
    return text


def _ratio(value: float, reference: float | None) -> str:
    return "-" if not reference else f"{value / reference:.2f}"


def _find(cells: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((c for c in cells if all(c.get(k) == v for k, v in match.items())), None)


def log_table(results: dict[str, Any]) -> list[str]:
    cells = [c for c in results["cells"] if c["part"] == "log" and c["store"] in STORES]
    rows = []
    for cell in cells:
        sqlite, memory = (_find(cells, upstream=cell["upstream"], target=cell["target"], store=store)
                          for store in ("sqlite", "memory"))
        rows.append(
            f"| {cell['upstream']} | {TARGETS[cell['target']]} | {STORES[cell['store']]} "
            f"| {cell['answers_per_s']:,.0f} | {_ttft(cell)} | {_fmt(cell['ttft_p99_ms'], 2, ' ms')} "
            f"| {_fmt(cell['gap_p99_ms'], 3, ' ms')} | {cell['gateway_cpu_per_1k']:.4f} "
            f"| {cell['redis_cpu_per_1k']:.4f} | **{cell['total_cpu_per_1k']:.4f}** "
            f"| **{_ratio(cell['total_cpu_per_1k'], sqlite and sqlite['total_cpu_per_1k'])}** "
            f"| {_ratio(cell['total_cpu_per_1k'], memory and memory['total_cpu_per_1k'])} "
            f"| {cell['xadd_per_answer']:.1f} | {cell['redis_calls_per_answer']:.1f} "
            f"| {cell['machine_busy_cores']:.2f} | {cell['other_cores']:.2f} | {cell['errors']} |"
        )
    return [
        "| upstream | target | event log | answers/s | TTFT p50 | TTFT p99 | gap p99 | gateway CPU s / 1k tokens "
        "| redis CPU s / 1k tokens | total CPU s / 1k tokens | total vs SQLite | total vs memory "
        "| XADD per answer | Redis commands per answer | machine busy cores | other cores | errors |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        *rows,
    ]


def checkpoint_table(results: dict[str, Any]) -> list[str]:
    cells = [c for c in results["cells"]
             if c["part"] == "log" and c["upstream"] == "paced" and c["store"].startswith("sqlite")]
    rows = []
    for cell in sorted(cells, key=lambda c: (c["target"], c["checkpoint_s"])):
        never = _find(cells, target=cell["target"], store="sqlite-no-checkpoint")
        rows.append(
            f"| {TARGETS[cell['target']]} | {cell['checkpoint_s']:g} s | {cell['answers_per_s']:,.1f} "
            f"| {_ttft(cell)} | {_fmt(cell['gap_p99_ms'], 3, ' ms')} | {cell['gateway_cpu_per_1k']:.4f} "
            f"| **{_ratio(cell['gateway_cpu_per_1k'], never and never['gateway_cpu_per_1k'])}** "
            f"| {cell['gateway_cores'][0]:.2f} | {cell['machine_busy_cores']:.2f} | {cell['other_cores']:.2f} "
            f"| {cell['errors']} |"
        )
    return [
        "| target | `CHATGATE_CHECKPOINT_S` | answers/s | TTFT p50 | gap p99 | gateway CPU s / 1k tokens "
        "| vs never | gateway cores | machine busy cores | other cores | errors |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        *rows,
    ]


def instances_table(results: dict[str, Any]) -> list[str]:
    cells = [c for c in results["cells"] if c["part"] == "instances"]
    rows = []
    for cell in cells:
        one = _find(cells, clients=cell["clients"], target=cell["target"], via="one instance, nginx")
        direct = _find(cells, clients=cell["clients"], target="direct")
        cores = " + ".join(f"{c:.2f}" for c in cell["gateway_cores"]) if cell["target"] != "direct" else "-"
        rows.append(
            f"| {cell['clients']} | {TARGETS[cell['target']]} | {cell['via']} | **{cell['answers_per_s']:,.0f}** "
            f"| **{_ratio(cell['answers_per_s'], one and one['answers_per_s'])}** "
            f"| {_ratio(cell['answers_per_s'], direct and direct['answers_per_s'])} | {_ttft(cell)} "
            f"| {_fmt(cell['ttft_p99_ms'], 2, ' ms')} | {_fmt(cell['gap_p99_ms'], 3, ' ms')} "
            f"| {cores} | {cell['nginx_cores']:.2f} | {cell['redis_cores']:.2f} | {cell['upstream_cores']:.2f} "
            f"| {cell['client_cores']:.2f} | **{cell['machine_busy_cores']:.2f}** | {cell['other_cores']:.2f} "
            f"| {cell['errors']} |"
        )
    return [
        "| clients | target | via | answers/s | vs one instance behind nginx | vs direct | TTFT p50 | TTFT p99 "
        "| gap p99 | gateway cores (instance 1 + 2) | nginx cores | redis cores | fake upstream cores | load cores "
        "| machine busy cores | other cores | errors |",
        "|--:|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        *rows,
    ]


def markdown(results: dict[str, Any]) -> str:
    plan, m = results["plan"], results["machine"]
    dirty = " (src/ had uncommitted changes)" if results["uncommitted_changes"] else ""
    quiet = (f"each cell first waited up to {plan['quiet_wait_s']:g} s for the machine to fall below 0.3 busy cores"
             if plan["quiet_wait_s"] else "no wait for a quiet machine")
    paced_s = plan["paced_tokens"] / plan["paced_tps"]
    return "\n".join([
        HEADING,
        "",
        f"`bench/cluster.py`, {results['date']}; commit `{results['commit']}`{dirty}; {m['cores']} cores, "
        f"{m['cpu_model']}; redis-server {results['redis_version']}, nginx {results['nginx_version']}; "
        f"{results['mode']} run, {results['elapsed_s']:,.0f} s. Every process on loopback, on the same "
        f"**{m['cores']} cores**: the fake upstream, {plan['load_processes']} load processes, redis-server, nginx "
        f"and the gateways (`chatgate serve`, 1 worker each). Closed loop: each client asks again as soon as "
        f"its answer ends; {plan['warmup_s']:g} s warm-up ({plan['paced_warmup_s']:g} s on the paced upstream), "
        f"then {plan['duration_s']:g} s measured per cell; {quiet}. CPU is each process tree's, from /proc, "
        "over the measured window; *per 1k tokens* divides it by the tokens the clients received meanwhile. "
        "*machine busy cores* is every core's non-idle time, *other cores* what processes outside this "
        "benchmark used meanwhile. `/ws` opens a new connection per answer; its TTFT counts from the chat "
        "frame, the handshake shown apart.",
        "",
        f"### The Redis log against the in-process log, {plan['clients']} clients",
        "",
        f"*burst*: the fake answers {plan['burst_tokens']} tokens without delay; *paced*: {plan['paced_tokens']} "
        f"tokens at {plan['paced_tps']:g} tokens/s ({paced_s:g} s an answer). The same gateway, with the "
        "SQLite store (each answer's event log only in the gateway), with a Redis store (conversations "
        "in Redis, and each answer's log mirrored into a Redis Stream), and, as a second reference, with the "
        "memory store (the log in the gateway, nothing written anywhere). *total* is gateway + redis-server; "
        "*total vs SQLite* is the ratio asked of the Redis log, *vs memory* the same against the memory "
        "store. *XADD per answer* is the XADD calls counted by Redis (INFO commandstats) over the answers "
        "completed in the window: one entry per batch of events, so fewer than the tokens where they were "
        "coalesced; *Redis commands per answer* counts every command, those inside the store's scripts too "
        "(cluster.json splits them by command).",
        "",
        *log_table(results),
        "",
        f"### What the checkpoints cost: paced upstream, {plan['clients']} clients, SQLite store",
        "",
        f"The gateway stores the user's message when a turn starts and the answer when it ends, and in "
        f"between rewrites the partial answer at most every `CHATGATE_CHECKPOINT_S` "
        f"(default {plan['default_checkpoint_s']:g} s). At {plan['no_checkpoint_s']:g} s no checkpoint falls "
        f"within a {paced_s:g} s answer: *vs never* divides the gateway's CPU per 1k tokens by that one's.",
        "",
        *checkpoint_table(results),
        "",
        "### One instance against two, behind nginx",
        "",
        f"The fake without delay ({plan['burst_tokens']} tokens); both instances on one Redis store. nginx "
        "(`worker_processes auto`, no access log) proxies to them through one `least_conn` upstream with "
        "keep-alive, for `/chat` and `/ws` alike, as deploy/nginx-instances.conf does. *vs one instance behind nginx* "
        "divides answers/s by that row's at the same clients and target. **The machine has "
        f"{m['cores']} cores** for the fake, the load, nginx, redis-server and the gateways: where *machine "
        "busy cores* is near that, the machine, not the gateway, sets the figure.",
        "",
        *instances_table(results),
        "",
    ])


