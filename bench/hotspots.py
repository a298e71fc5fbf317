"""Where a py-spy profile's time goes, as text: the top frames by self time, by inclusive
time, and self time per source file. Input is ``py-spy record -f raw`` (collapsed stacks).

    .venv/bin/python bench/hotspots.py bench/out/profile-chat-50.txt
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

FRAME = re.compile(r"^(?P<function>.*?) \((?P<file>[^:()]+)(?::\d+)?\)$")
TOP = 25


def _file_of(frame: str) -> str:
    match = FRAME.match(frame)
    if not match:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "src/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _function_of(frame: str) -> str:
    """``name (file:line)`` without the line, so a function's samples add up."""
    match = FRAME.match(frame)
    return f"{match.group('function')} ({_file_of(frame)})" if match else frame


def parse(text: str) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[tuple(stack.split(";"))] += int(count)
    return stacks


def summarise(path: Path) -> str:
    if not path.exists():
        return f"no profile at {path}\n"
    stacks = parse(path.read_text(errors="replace"))
    total = sum(stacks.values()) or 1
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for stack, count in stacks.items():
        functions = [_function_of(frame) for frame in stack if not frame.startswith("process ")
                     and not frame.startswith("thread ")]
        if not functions:
            continue
        own[functions[-1]] += count
        files[_file_of(stack[-1])] += count
        for function in set(functions):
            inclusive[function] += count

    def block(title: str, counter: Counter[str]) -> list[str]:
        rows = [f"{count / total:6.1%}  {name}" for name, count in counter.most_common(TOP)]
        return [title, *rows, ""]

    lines = [f"{path.name}: {total} samples", ""]
    lines += block("self time by function", own)
    lines += block("self time by file", files)
    lines += block("inclusive time by function", inclusive)
    return "\n".join(lines)


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        print(summarise(Path(argument)))
