"""FolioWriter: the bytes written are exactly the bytes given, in order, from any starting offset
and in any chunking; and it writes whole aligned 2 MiB pieces, so that Linux can keep the file
in the page cache as 2 MiB folios (see runtime/folio_writer.py)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from runtime.folio_writer import FOLIO_BYTES, FolioWriter


class Recorder(io.BytesIO):
    """A file that remembers the offset and size of every write it gets."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[int, int]] = []

    def write(self, b: object) -> int:  # type: ignore[override]
        n = len(memoryview(b).cast("B"))  # type: ignore[arg-type]
        self.writes.append((self.tell(), n))
        return super().write(b)  # type: ignore[arg-type]


@pytest.mark.parametrize("start", [0, 5, FOLIO_BYTES - 1, FOLIO_BYTES + 3])
@pytest.mark.parametrize("chunk", [1000, 64 << 10, FOLIO_BYTES, 3 * FOLIO_BYTES + 17])
def test_writes_every_byte_in_aligned_folios(start: int, chunk: int) -> None:
    data = os.urandom(5 * FOLIO_BYTES + 12345)
    f = Recorder()
    f.write(b"x" * start)
    f.writes.clear()
    w = FolioWriter(f)
    for i in range(0, len(data), chunk):
        w.write(data[i : i + chunk])
    w.flush()
    assert f.getvalue() == b"x" * start + data
    *pieces, last = f.writes
    for offset, size in pieces[1:]:  # after the first, which reaches the first boundary
        assert offset % FOLIO_BYTES == 0 and size % FOLIO_BYTES == 0, (offset, size)
    assert (pieces[0][0] + pieces[0][1]) % FOLIO_BYTES == 0
    assert last[0] % FOLIO_BYTES == 0 and last[1] < FOLIO_BYTES


def test_a_real_file_gets_the_same_bytes(tmp_path: Path) -> None:
    data = os.urandom(3 * FOLIO_BYTES + 99)
    path = tmp_path / "m.gguf"
    with open(path, "wb") as raw:
        w = FolioWriter(raw)
        for i in range(0, len(data), 40000):
            w.write(data[i : i + 40000])
        w.flush()
    assert path.read_bytes() == data
