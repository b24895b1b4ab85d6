"""GGUF v2/v3 reader: one linear, bounds-checked walk over a memory-mapped file.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, the key/value
pairs, the tensor infos, padding to `general.alignment`, then the tensor data. Every length, count
and offset is checked against the file size before it is used, so a truncated or corrupted file
raises `GGUFError` naming the offset, key or tensor, never an out-of-bounds read. Tensor data is
never copied: `GGUFFile.tensor()` returns numpy views into the mapping.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from runtime.errors import GGUFError, UnsupportedModelError
from runtime.ggml_types import BLOCK_SIZE, OTHER_GGML_TYPES, SCALAR_FORMATS, GGMLType, ValueType
from runtime.kernels import _kernels

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
MAX_NAME_BYTES = 64  # ggml's GGML_MAX_NAME
MADV_POPULATE_READ = 22  # Linux 5.14+

_NUMPY_DTYPES: dict[ValueType, str] = {
    ValueType.UINT8: "<u1",
    ValueType.INT8: "<i1",
    ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4",
    ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4",
    ValueType.BOOL: "<u1",
    ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8",
    ValueType.FLOAT64: "<f8",
}


class TensorInfo(NamedTuple):
    """Where one tensor lives in the file. `shape` is numpy order: [rows, cols] = ggml [ne1, ne0]."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLType
    offset: int  # absolute file offset of the first byte
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class GGUFFile:
    """A parsed GGUF file. Keep it open while tensor views are in use; `close()` unmaps it."""

    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]
    data_offset: int
    _mmap: mmap.mmap | None = field(repr=False, default=None)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a zero-copy uint8 view."""
        info = self._info(name)
        assert self._mmap is not None, "file is closed"
        return np.frombuffer(self._mmap, dtype=np.uint8, count=info.n_bytes, offset=info.offset)

    def tensor(self, name: str) -> np.ndarray:
        """A zero-copy view: float arrays for F32/F16, uint8 [rows, row_bytes] for block types."""
        info = self._info(name)
        raw = self.raw(name)
        if info.ggml_type == GGMLType.F32:
            return raw.view("<f4").reshape(info.shape)
        if info.ggml_type == GGMLType.F16:
            return raw.view("<f2").reshape(info.shape)
        rows = info.n_elements // info.shape[-1]
        return raw.reshape(rows, info.n_bytes // rows)

    def populate(self) -> None:
        """Pre-fault the whole mapping (what read_gguf(populate=True) does after parsing):
        madvise(MADV_POPULATE_READ) through ctypes, which lets other threads run meanwhile
        (Python's mmap.madvise holds the GIL); on kernels without it, one read per page."""
        assert self._mmap is not None, "file is closed"
        data = np.frombuffer(self._mmap, dtype=np.uint8)
        if not _madvise(data.ctypes.data, data.nbytes, MADV_POPULATE_READ):
            data[:: mmap.PAGESIZE].max()

    def release(self, name: str) -> None:
        """Drop tensor `name`'s pages from this process (madvise(MADV_DONTNEED) over the whole
        pages inside it): once a copy of it is made (runtime/repack.py), they need not count in
        its RSS. They stay in the page cache, and reading the tensor again faults them back in."""
        if self._mmap is None:  # closed: nothing is mapped
            return
        info = self._info(name)
        data = np.frombuffer(self._mmap, dtype=np.uint8)
        start = data.ctypes.data + info.offset
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = (start + info.n_bytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            _madvise(first, last - first, mmap.MADV_DONTNEED)

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views still alive keep the mapping; it goes with them
            self._mmap = None

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: no tensor named {name!r}") from None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# Bytes pre-faulted per madvise call. The kernel holds the process's mmap lock for reading
# through a call, and every mmap, munmap or brk of another thread waits for it: while the server's
# load pre-faulted a 3 GB file in one call (0.2-1 s), the main thread's imports could stall on
# their first allocation for all of it. In 64 MiB pieces a stall lasts one piece (3-7 ms measured).
POPULATE_CHUNK = 64 << 20


def _madvise(address: int, n_bytes: int, advice: int) -> bool:
    """madvise(advice) over [address, address + n_bytes), POPULATE_CHUNK bytes per call, through
    ctypes, which lets other threads run meanwhile (Python's mmap.madvise holds the GIL); False
    where unsupported."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not Linux
        return False
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    for offset in range(0, n_bytes, POPULATE_CHUNK):
        if madvise(address + offset, min(POPULATE_CHUNK, n_bytes - offset), advice) != 0:
            return False
    return True


class _Cursor:
    """Reads little-endian values from a buffer, checking every read against its end."""

    def __init__(self, buf: memoryview | bytes, path: Path) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.path = path

    def fail(self, what: str, at: int | None = None) -> GGUFError:
        return GGUFError(f"{self.path}: {what} at offset {self.pos if at is None else at}")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(
                f"truncated or corrupt file: {what} needs {n} bytes but only {max(self.size - self.pos, 0)} remain"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return int(self.scalar("<I", what))

    def u64(self, what: str) -> int:
        return int(self.scalar("<Q", what))

    def string(self, what: str, max_len: int | None = None) -> str:
        start = self.pos
        n = self.u64(f"length of {what}")
        if max_len is not None and n > max_len:
            raise self.fail(f"{what} is {n} bytes long, more than the limit of {max_len}", start)
        self.need(n, what)
        data = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not valid UTF-8", start) from None


def _value_type(cur: _Cursor, what: str) -> ValueType:
    at = cur.pos
    raw = cur.u32(f"type of {what}")
    try:
        return ValueType(raw)
    except ValueError:
        raise cur.fail(f"{what} has unknown value type {raw}", at) from None


def _read_value(cur: _Cursor, vtype: ValueType, key: str) -> Any:
    if vtype == ValueType.STRING:
        return cur.string(f"value of {key!r}")
    if vtype != ValueType.ARRAY:
        value = cur.scalar(SCALAR_FORMATS[vtype], f"value of {key!r}")
        return bool(value) if vtype == ValueType.BOOL else value
    elem = _value_type(cur, f"elements of {key!r}")
    count = cur.u64(f"element count of {key!r}")
    if elem == ValueType.ARRAY:
        raise cur.fail(f"{key!r} is an array of arrays, which the runtime does not read")
    if elem == ValueType.STRING:
        # Each string takes at least its 8-byte length: refuse absurd counts before looping.
        cur.need(count * 8, f"{count} strings of {key!r}")
        return _read_strings(cur, count, key)
    dtype = np.dtype(_NUMPY_DTYPES[elem])
    cur.need(count * dtype.itemsize, f"{count} elements of {key!r}")
    arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos).copy()
    cur.pos += count * dtype.itemsize
    return arr.astype(bool) if elem == ValueType.BOOL else arr


def _read_strings(cur: _Cursor, count: int, key: str) -> list[str]:
    """`count` strings, as `cur.string` reads them but in C: a tokenizer's vocabulary and merges
    are ~100k strings, read at every model load (80 ms of the GIL in Python while a server
    starts). On anything unusual (a length past the end, invalid UTF-8) the checked path reads
    that element and raises its error."""
    out, pos = _kernels.read_strings(cur.buf, cur.pos, count)
    cur.pos = pos
    if len(out) < count:
        cur.string(f"element {len(out)} of {key!r}")  # raises the precise error
        raise AssertionError("unreachable: the checked read accepted what the fast read refused")
    return out


def _tensor_nbytes(ggml_type: GGMLType, shape_ne: list[int], name: str, cur: _Cursor) -> int:
    block, block_bytes = BLOCK_SIZE[ggml_type]
    if shape_ne[0] % block:
        raise cur.fail(
            f"tensor {name!r}: row length {shape_ne[0]} is not a multiple of the {ggml_type.name} block size {block}"
        )
    n = 1
    for d in shape_ne:
        n *= d
    return n // block * block_bytes


def parse(buf: memoryview | bytes, path: Path) -> tuple[int, int, dict[str, Any], list[TensorInfo], int]:
    """Parse a whole GGUF image held in `buf`: (version, alignment, metadata, tensors, data offset)."""
    cur = _Cursor(buf, path)
    cur.need(4, "magic")
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFError(
            f"{path}: not a GGUF file (magic {bytes(buf[:4])!r}, expected b'GGUF'); "
            "convert the model with llama.cpp's convert_hf_to_gguf.py"
        )
    cur.pos = 4
    version = cur.u32("version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.u64("tensor count")
    n_kv = cur.u64("metadata count")
    # Every entry takes at least 8 bytes: reject counts the file cannot possibly hold.
    if n_tensors * 8 > cur.size or n_kv * 8 > cur.size:
        raise cur.fail(f"corrupt header: {n_tensors} tensors / {n_kv} keys cannot fit in {cur.size} bytes")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        at = cur.pos
        key = cur.string(f"key {i}", max_len=65535)
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {key!r}", at)
        vtype = _value_type(cur, f"key {key!r}")
        metadata[key] = _read_value(cur, vtype, key)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFError(f"{path}: general.alignment must be a power of two, got {alignment!r}")

    raw_infos: list[tuple[str, list[int], GGMLType, int, int]] = []
    names: set[str] = set()
    for i in range(n_tensors):
        at = cur.pos
        name = cur.string(f"name of tensor {i}", max_len=MAX_NAME_BYTES)
        if name in names:
            raise cur.fail(f"duplicate tensor name {name!r}", at)
        names.add(name)
        n_dims = cur.u32(f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        dims = [cur.u64(f"dimension {d} of tensor {name!r}") for d in range(n_dims)]
        if any(d == 0 or d > 1 << 40 for d in dims):
            raise cur.fail(f"tensor {name!r} has an invalid shape {dims}")
        type_at = cur.pos
        raw_type = cur.u32(f"type of tensor {name!r}")
        try:
            ggml_type = GGMLType(raw_type)
        except ValueError:
            if raw_type in OTHER_GGML_TYPES:
                raise UnsupportedModelError(
                    f"{path}: tensor {name!r} is {OTHER_GGML_TYPES[raw_type]}, a quantization llmctl's runtime "
                    f"does not read yet (it reads {', '.join(t.name for t in GGMLType)}); use a Q8_0 or Q4_0 file"
                ) from None
            raise cur.fail(f"tensor {name!r} has unknown ggml type {raw_type}", type_at) from None
        rel_offset = cur.u64(f"data offset of tensor {name!r}")
        if rel_offset % alignment:
            raise cur.fail(f"tensor {name!r}: data offset {rel_offset} is not a multiple of the alignment {alignment}")
        nbytes = _tensor_nbytes(ggml_type, dims, name, cur)
        raw_infos.append((name, dims, ggml_type, rel_offset, nbytes))

    data_offset = -(-cur.pos // alignment) * alignment
    tensors: list[TensorInfo] = []
    for name, dims, ggml_type, rel_offset, nbytes in raw_infos:
        start = data_offset + rel_offset
        if start + nbytes > cur.size:
            raise GGUFError(
                f"{path}: tensor {name!r} ({nbytes} bytes at offset {start}) runs past the end of the "
                f"file ({cur.size} bytes): the file is truncated; download it again"
            )
        tensors.append(TensorInfo(name, tuple(reversed(dims)), ggml_type, start, nbytes))
    by_offset = sorted(tensors, key=lambda t: t.offset)
    for a, b in zip(by_offset, by_offset[1:], strict=False):
        if a.offset + a.n_bytes > b.offset:
            raise GGUFError(f"{path}: tensors {a.name!r} and {b.name!r} overlap (offsets {a.offset}, {b.offset})")
    return version, alignment, metadata, tensors, data_offset


def read_gguf(path: str | os.PathLike[str], *, populate: bool = False) -> GGUFFile:
    """Map and parse `path`; raises GGUFError for a malformed or unreadable file.

    populate=True pre-faults the whole mapping once it is parsed (`GGUFFile.populate`; llama.cpp
    maps with MAP_POPULATE) so that the first forward pass does not page the weights in one fault
    at a time; reading metadata only should leave it off."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise GGUFError(f"{path}: file is empty")
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except FileNotFoundError:
        raise GGUFError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, expected a .gguf file") from None
    except PermissionError:
        raise GGUFError(f"{path}: permission denied") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        view = memoryview(mm)
        try:
            version, alignment, metadata, tensors, data_offset = parse(view, path)
        finally:
            view.release()
    except BaseException:
        mm.close()
        raise
    gguf = GGUFFile(
        path=path,
        version=version,
        alignment=alignment,
        metadata=metadata,
        tensors={t.name: t for t in tensors},
        data_offset=data_offset,
        _mmap=mm,
    )
    if populate:
        gguf.populate()
    return gguf
