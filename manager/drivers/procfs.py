"""Small process and file helpers shared by the process driver and its supervisor (Linux /proc).

A pid alone does not name a process: once it exits its number is reused. Every pid llmctl records
goes with the process's start time (field 22 of /proc/PID/stat, clock ticks since boot), and a pid
counts as ours only while both match.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and parentheses),
    so that index 0 is field 3 (state); None if there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks after boot; None if it does not exist."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22


def alive(pid: int | None, started: int | None) -> bool:
    """True if `pid` is the process that started at `started` and has not exited (a zombie,
    exited but not yet reaped by its parent, counts as exited)."""
    if not pid or started is None:
        return False
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X") and int(fields[19]) == started


def utc_now() -> str:
    """Now, ISO 8601 in UTC to the second: 2024-05-01T12:00:00Z."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace `path` with `data`: readers see the old file or the new one, never a part."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`; None if the file is missing or is not a JSON object."""
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def tail_lines(path: Path, n: int, *, block: int = 64 << 10) -> str:
    """The last `n` lines of a text file ("" if it does not exist), reading only the end of it."""
    if n <= 0:
        return ""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return ""
    with f:
        end = f.seek(0, os.SEEK_END)
        data = b""
        pos = end
        while pos > 0 and data.count(b"\n") <= n:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.decode("utf-8", errors="replace").splitlines(keepends=True)
    return "".join(lines[-n:])
