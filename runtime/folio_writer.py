"""Writing model files so that the page cache holds them in 2 MiB pieces.

Linux (ext4 and others with large folios) sizes a file's page-cache folios by the writes that
fill it: a 2 MiB write at a 2 MiB-aligned offset makes one 2 MiB folio, which a memory mapping
then maps with one huge-page entry. Weights written in small pieces stay in 4 KiB pages, and
decoding, which streams every weight once per token, then reads them measurably slower (a 3B Q4_0
model's LM head 40% slower on one thread; the whole file's read bandwidth 34 against 38 GB/s with
two threads on the machine of docs/benchmarks.md). FolioWriter passes writes on in whole,
aligned 2 MiB pieces.
"""

from __future__ import annotations

from typing import BinaryIO

FOLIO_BYTES = 2 << 20


class FolioWriter:
    """Buffers writes to `f` and passes them on as whole FOLIO_BYTES pieces at FOLIO_BYTES-aligned
    file offsets (starting from f's position); `flush` writes what is left."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self._offset = f.tell()  # file offset of the buffer's first byte
        self._buf = bytearray()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._buf += data
        edge = (self._offset + len(self._buf)) // FOLIO_BYTES * FOLIO_BYTES
        if edge > self._offset:
            n = edge - self._offset
            with memoryview(self._buf) as view:
                self._f.write(view[:n])
            del self._buf[:n]
            self._offset = edge
        return len(data)

    def flush(self) -> None:
        if self._buf:
            self._f.write(self._buf)
            self._offset += len(self._buf)
            self._buf.clear()
        self._f.flush()
