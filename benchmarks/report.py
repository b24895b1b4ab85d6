"""Where the benchmarks record their results: a section of docs/benchmarks.md between markers."""

from __future__ import annotations

from pathlib import Path


def write_section(out: Path, name: str, text: str, heading: str | None = None) -> None:
    """Replace what lies between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in `out` with `text`;
    without the markers, append them (under `## heading` when given). Written atomically."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = out.read_text(encoding="utf-8") if out.exists() else "# Benchmarks\n"
    block = f"{begin}\n{text.rstrip()}\n{end}"
    if begin in old and end in old and old.index(begin) < old.index(end):
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end) :]
    else:
        title = f"## {heading}\n\n" if heading else ""
        new = old.rstrip("\n") + "\n\n" + title + block + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(new, encoding="utf-8")
    tmp.replace(out)
