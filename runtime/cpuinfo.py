"""The CPU as /proc/cpuinfo describes it: the fields of its first processor entry.

The C kernels pick their SIMD set and prefetch level from CPUID themselves; this is for the
Python side that reports or checks those choices (the benchmarks' machine line, the tests'
oracle for the prefetch level)."""

from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def cpuinfo_fields(path: Path = CPUINFO) -> dict[str, str]:
    """`key: value` fields of the first processor listed (vendor_id, cpu family, model, model
    name, flags...); empty where the file is missing or unreadable (not Linux)."""
    fields: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields
