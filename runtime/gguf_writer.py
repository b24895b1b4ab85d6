"""Streaming GGUF v3 writer (numpy only).

Metadata and tensor infos are collected first; `write` then streams each tensor's bytes in
chunks to `path + ".tmp"` and renames it to `path` when everything was written.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Sequence
from math import prod
from pathlib import Path
from typing import Any

import numpy as np

from runtime.folio_writer import FolioWriter
from runtime.ggml_types import SCALAR_FORMATS, GGMLType, ValueType, row_bytes

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
GGUF_VERSION = 3
MAX_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
MAX_DIMS = 4

_NP_DTYPE: dict[ValueType, str] = {
    ValueType.UINT8: "<u1",
    ValueType.INT8: "<i1",
    ValueType.UINT16: "<u2",
    ValueType.INT16: "<i2",
    ValueType.UINT32: "<u4",
    ValueType.INT32: "<i4",
    ValueType.FLOAT32: "<f4",
    ValueType.BOOL: "?",
    ValueType.UINT64: "<u8",
    ValueType.INT64: "<i8",
    ValueType.FLOAT64: "<f8",
}
_FROM_NP = {f"{np.dtype(v).kind}{np.dtype(v).itemsize}": k for k, v in _NP_DTYPE.items()}

Chunk = bytes | bytearray | memoryview | np.ndarray


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _scalar(value: Any, vtype: ValueType) -> bytes:
    if vtype == ValueType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"STRING value must be str, got {type(value).__name__}")
        return _string(value)
    try:
        return struct.pack(SCALAR_FORMATS[vtype], value)
    except (struct.error, KeyError) as e:
        raise ValueError(f"cannot encode {value!r} as {vtype.name}: {e}") from None


def _infer_scalar(value: Any) -> ValueType:
    if isinstance(value, bool | np.bool_):
        return ValueType.BOOL
    if isinstance(value, str):
        return ValueType.STRING
    if isinstance(value, int | np.integer):
        return ValueType.UINT32
    if isinstance(value, float | np.floating):
        return ValueType.FLOAT32
    raise TypeError(f"cannot infer a GGUF type for {type(value).__name__}; pass vtype")


def _array(value: Sequence[Any] | np.ndarray, elem: ValueType | None) -> bytes:
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise ValueError("GGUF arrays must be 1-D")
        if elem is None:
            key = f"{value.dtype.kind}{value.dtype.itemsize}"
            if key not in _FROM_NP:
                raise TypeError(f"no GGUF type for numpy dtype {value.dtype}; pass vtype")
            elem = _FROM_NP[key]
    elif elem is None:
        elem = _infer_scalar(value[0]) if len(value) else ValueType.UINT32
    out = [struct.pack("<IQ", elem, len(value))]
    if elem == ValueType.STRING:
        out.extend(_string(s) for s in value)
    elif elem == ValueType.ARRAY:
        raise ValueError("nested arrays are not supported")
    else:
        arr = np.asarray(value)
        if arr.dtype.kind in "iu" and np.dtype(_NP_DTYPE[elem]).kind in "iu":
            info = np.iinfo(np.dtype(_NP_DTYPE[elem]))
            if arr.size and (arr.min() < info.min or arr.max() > info.max):
                raise ValueError(f"array values out of range for {elem.name}")
        out.append(np.ascontiguousarray(arr, dtype=_NP_DTYPE[elem]).tobytes())
    return b"".join(out)


class GGUFWriter:
    """Collect metadata and tensor infos, then stream tensor data to a GGUF v3 file."""

    def __init__(self, path: str | os.PathLike[str], alignment: int = 32) -> None:
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two, got {alignment}")
        self.path = Path(path)
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        # (name, numpy shape, type, data bytes)
        self._infos: list[tuple[str, tuple[int, ...], GGMLType, int]] = []
        if alignment != 32:
            self.add_kv("general.alignment", alignment, ValueType.UINT32)

    def add_kv(self, key: str, value: Any, vtype: ValueType | None = None) -> None:
        """Add one metadata entry. For lists and arrays, `vtype` is the element type."""
        if key in self._kv:
            raise ValueError(f"duplicate key {key!r}")
        if isinstance(value, list | tuple | np.ndarray):
            body = struct.pack("<I", ValueType.ARRAY) + _array(value, vtype)
        else:
            vtype = _infer_scalar(value) if vtype is None else ValueType(vtype)
            body = struct.pack("<I", vtype) + _scalar(value, vtype)
        self._kv[key] = _string(key) + body

    def add_tensor_info(self, name: str, shape: tuple[int, ...], ggml_type: int) -> None:
        """Declare a tensor; `shape` is numpy order (rows, cols), stored reversed as ggml ne."""
        if len(name.encode("utf-8")) > MAX_NAME_BYTES:
            raise ValueError(f"tensor name longer than {MAX_NAME_BYTES} bytes: {name!r}")
        if any(n == name for n, *_ in self._infos):
            raise ValueError(f"duplicate tensor {name!r}")
        if not 1 <= len(shape) <= MAX_DIMS or any(d <= 0 for d in shape):
            raise ValueError(f"bad shape {shape} for {name!r}")
        t = GGMLType(ggml_type)
        nbytes = row_bytes(t, shape[-1]) * prod(shape[:-1])
        self._infos.append((name, tuple(int(d) for d in shape), t, nbytes))

    def _pad(self, n: int) -> int:
        return -n % self.alignment

    def _header(self) -> bytes:
        parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self._infos), len(self._kv))]
        parts.extend(self._kv.values())
        offset = 0
        for name, shape, t, nbytes in self._infos:
            dims = shape[::-1]
            parts.append(_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t, offset))
            offset += nbytes + self._pad(nbytes)
        head = b"".join(parts)
        return head + b"\0" * self._pad(len(head))

    def write(self, tensor_data: Iterable[tuple[str, Iterable[Chunk]]]) -> Path:
        """Write the file; `tensor_data` yields (name, chunks) in tensor-info order.

        Chunks are bytes-like or numpy arrays (written raw, C order); each tensor's total must equal
        its declared size. The file appears at `path` only on success.
        """
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as raw:
                f = FolioWriter(raw)
                f.write(self._header())
                it = iter(tensor_data)
                for name, _shape, _t, nbytes in self._infos:
                    try:
                        got_name, chunks = next(it)
                    except StopIteration:
                        raise ValueError(f"no data given for tensor {name!r}") from None
                    if got_name != name:
                        raise ValueError(f"expected data for tensor {name!r}, got {got_name!r}")
                    self._write_tensor(f, name, chunks, nbytes)
                if next(it, None) is not None:
                    raise ValueError("more tensor data than tensor infos")
                f.flush()
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return self.path

    def _write_tensor(self, f: FolioWriter, name: str, chunks: Iterable[Chunk], nbytes: int) -> None:
        done = 0
        for chunk in chunks:
            if isinstance(chunk, np.ndarray):
                chunk = np.ascontiguousarray(chunk).data.cast("B")
            else:
                chunk = memoryview(chunk).cast("B")
            done += chunk.nbytes
            if done > nbytes:
                raise ValueError(f"tensor {name!r}: more than the expected {nbytes} bytes")
            f.write(chunk)
        if done != nbytes:
            raise ValueError(f"tensor {name!r}: got {done} bytes, expected {nbytes}")
        f.write(b"\0" * self._pad(nbytes))
