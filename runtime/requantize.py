"""Requantize a StarCoder / StarCoder2 GGUF (Q8_0, F16 or F32) to Q4_0, as llama-quantize does.

    python -m runtime.requantize starcoder2-7b_Q8_0.gguf starcoder2-7b_Q4_0.gguf

does what `llama-quantize --allow-requantize SRC DST Q4_0` does, with the same tensor bytes:

- 2-D weights become Q4_0 (ggml's quantize_row_q4_0_ref, reproduced bit for bit in
  `runtime.quants.quantize_q4_0`);
- the LM head (`output.weight`, or `token_embd.weight` when there is none and the embedding is
  tied to the head) becomes Q6_K (quantize_row_q6_K_ref), or Q8_0 when its rows are not a
  multiple of 256, as llama.cpp's llama_tensor_get_type decides for Q4_0; an untied
  `token_embd.weight` is Q4_0 like the other weights;
- 1-D tensors (norms, biases), `*_norm.weight` and `position_embd.weight` are copied unchanged.

Like llama-quantize, it refuses NaN or infinite source values and blocks whose fp16 scale would
overflow (ggml_validate_row_data), and sources whose weights are already quantized to another
type (only Q8_0, F16 and F32 are read). Tensor data is byte-identical to llama-quantize's output
(tests/test_requantize.py compares them); the files differ only in the header: the source's
tensor and key order are kept, and the provenance keys below are added.

Sources are read through a memory map and dequantized one chunk of rows at a time (ggml's own
dequantization), so memory stays at a few tens of MB whatever the model size; chunks are
quantized on all CPUs. The metadata (tokenizer included) is copied with its value types and
order; `general.file_type` becomes MOSTLY_Q4_0 and `general.quantization_version` 2, and the
provenance is recorded as `general.quantized_by = "llmctl"` and
`llmctl.requantized_from.sha256 = <sha256 of the source file>`. The output has no timestamp and
keeps the source's tensor order, so the same source always gives the same bytes (the digest a
chart can pin). It is written next to DST under a temporary name and renamed into place only
when complete.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import secrets
import struct
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime import quants
from runtime.config import SUPPORTED_ARCHITECTURES
from runtime.errors import GGUFError, ModelError, UnsupportedModelError
from runtime.ggml_types import BLOCK_SIZE, FileType, GGMLType, ValueType, row_bytes
from runtime.gguf import GGUFFile, _Cursor, _read_value, _value_type, read_gguf
from runtime.gguf_writer import GGUFWriter

__all__ = ["PROVENANCE_KEY", "RequantizeResult", "TARGETS", "TensorPlan", "main", "plan", "requantize"]

# target name -> (type of the 2-D weights, general.file_type)
TARGETS: dict[str, tuple[GGMLType, FileType]] = {"Q4_0": (GGMLType.Q4_0, FileType.MOSTLY_Q4_0)}
SOURCE_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.Q8_0)
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION, written by llama-quantize
QUANTIZED_BY = "llmctl"
PROVENANCE_KEY = "llmctl.requantized_from.sha256"

_QUANTIZERS: dict[GGMLType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.Q4_0: quants.quantize_q4_0,
    GGMLType.Q6_K: quants.quantize_q6_k,
    GGMLType.Q8_0: quants.quantize_q8_0,
}
# floats dequantized at a time (Q6_K's search over 18 trial scales needs ~10 temporaries per float)
_CHUNK_FLOATS = {GGMLType.Q4_0: 1 << 21, GGMLType.Q6_K: 1 << 18, GGMLType.Q8_0: 1 << 21}
_COPY_CHUNK = 16 << 20
# byte offset of each block's fp16 scale d
_SCALE_AT = {GGMLType.Q4_0: 0, GGMLType.Q8_0: 0, GGMLType.Q6_K: 208}


@dataclass(frozen=True)
class RequantizeResult:
    """What `requantize` wrote: the file, its sha256, the source's sha256 (also recorded in the
    file under `llmctl.requantized_from.sha256`), the number of tensors and the file size."""

    path: Path
    sha256: str
    source_sha256: str
    tensors: int
    bytes: int


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the output: numpy-order shape, source type and output type (equal: copied)."""

    name: str
    shape: tuple[int, ...]
    src_type: GGMLType
    dst_type: GGMLType

    @property
    def copied(self) -> bool:
        return self.src_type == self.dst_type


def _n_dims(shape: tuple[int, ...]) -> int:
    """ggml_n_dims: trailing (ggml order) dimensions of size 1 do not count."""
    ne = list(reversed(shape))
    while len(ne) > 1 and ne[-1] == 1:
        ne.pop()
    return len(ne)


def _quantized(name: str, shape: tuple[int, ...]) -> bool:
    """Whether llama-quantize quantizes this tensor (llama_model_quantize_impl's filter)."""
    return (
        name.endswith("weight")
        and _n_dims(shape) >= 2
        and "_norm.weight" not in name
        and name not in ("position_embd.weight", "token_types.weight")
    )


def plan(gf: GGUFFile, target: str = "Q4_0") -> list[TensorPlan]:
    """The output type of every tensor of `gf`, in file order; ModelError if it cannot be done."""
    weight_t = _target(target)[0]
    head = "output.weight" if "output.weight" in gf.tensors else "token_embd.weight"
    out: list[TensorPlan] = []
    for info in gf.tensors.values():
        t = info.ggml_type
        if not _quantized(info.name, info.shape):
            out.append(TensorPlan(info.name, info.shape, t, t))
            continue
        new_t = weight_t
        if info.name == head:  # llama_tensor_get_type: the output tensor gets Q6_K, else Q8_0
            new_t = GGMLType.Q6_K if info.shape[-1] % BLOCK_SIZE[GGMLType.Q6_K][0] == 0 else GGMLType.Q8_0
        if t not in SOURCE_TYPES:
            raise UnsupportedModelError(
                f"{gf.path}: tensor {info.name!r} is {t.name}; requantize from a Q8_0, F16 or F32 file "
                f"(llmctl does not requantize already {t.name}-quantized weights)"
            )
        if info.shape[-1] % BLOCK_SIZE[new_t][0]:
            raise UnsupportedModelError(
                f"{gf.path}: tensor {info.name!r} has rows of {info.shape[-1]} elements, "
                f"not a multiple of the {new_t.name} block size {BLOCK_SIZE[new_t][0]}"
            )
        out.append(TensorPlan(info.name, info.shape, t, new_t))
    return out


def _target(target: str) -> tuple[GGMLType, FileType]:
    key = str(target).upper()
    if key not in TARGETS:
        raise UnsupportedModelError(f"cannot requantize to {target!r}: supported targets are {', '.join(TARGETS)}")
    return TARGETS[key]


def _metadata(path: Path, data_offset: int) -> list[tuple[str, ValueType, Any]]:
    """Every key of the file in order as (key, value type, value); for arrays the type is the
    element type, so that GGUFWriter.add_kv writes the value back byte for byte."""
    with open(path, "rb") as f:
        head = f.read(data_offset)
    cur = _Cursor(head, path)
    cur.pos = 16  # magic, version, tensor count
    n_kv = cur.u64("metadata count")
    out: list[tuple[str, ValueType, Any]] = []
    for i in range(n_kv):
        key = cur.string(f"key {i}")
        vtype = _value_type(cur, f"key {key!r}")
        if vtype == ValueType.ARRAY:
            elem = ValueType(struct.unpack_from("<I", head, cur.pos)[0])
            out.append((key, elem, _read_value(cur, vtype, key)))
        else:
            out.append((key, vtype, _read_value(cur, vtype, key)))
    return out


def _sha256_file(path: Path, *, sync: bool = False) -> str:
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
    return digest


def _check_paths(src: Path, dst: Path) -> None:
    if not dst.parent.is_dir():
        raise ModelError(f"{dst}: directory {dst.parent} does not exist")
    if dst.is_dir():
        raise ModelError(f"{dst}: is a directory, expected the output .gguf file")
    if dst.exists() and src.exists() and os.path.samefile(src, dst):
        raise ModelError(f"{dst}: the output would replace its own source; choose another file")


def _chunks(
    gf: GGUFFile, t: TensorPlan, pool: ThreadPoolExecutor, threads: int, report: Callable[[int], None]
) -> Iterator[np.ndarray]:
    """The output bytes of tensor `t`, in chunks of whole rows. Chunks are checked, dequantized and
    quantized (or just checked, when copied) on `pool`'s threads (numpy releases the GIL) and
    yielded in order, with at most two chunks per thread in flight."""
    raw = gf.raw(t.name)
    cols = t.shape[-1]
    rows = math.prod(t.shape[:-1])
    src_row = row_bytes(t.src_type, cols)
    if t.copied:
        per = max(1, _COPY_CHUNK // src_row)
    else:
        per = max(1, _CHUNK_FLOATS[t.dst_type] // cols)
        quantize = _QUANTIZERS[t.dst_type]

    def job(r0: int, r1: int) -> np.ndarray:
        piece = raw[r0 * src_row : r1 * src_row]
        _check_source(gf, t, r0, piece)
        if t.copied:
            return piece
        out = quantize(quants.dequantize(piece, t.src_type, cols).reshape(-1))
        _check_scales(gf, t, r0, out)
        return out

    window = 2 * threads
    pending: deque[tuple[Future[np.ndarray], int]] = deque()
    try:
        for r0 in range(0, rows, per):
            r1 = min(rows, r0 + per)
            pending.append((pool.submit(job, r0, r1), (r1 - r0) * src_row))
            if len(pending) >= window:
                yield _result(pending, report)
        while pending:
            yield _result(pending, report)
    finally:
        for fut, _ in pending:
            fut.cancel()


def _check_source(gf: GGUFFile, t: TensorPlan, r0: int, piece: np.ndarray) -> None:
    """Refuse NaN or infinite source values (Q8_0: scales), as llama-quantize's ggml_validate_row_data."""
    if t.src_type == GGMLType.F32:
        values, per_value = piece.view("<f4"), 1
    elif t.src_type == GGMLType.F16:
        values, per_value = piece.view("<f2"), 1
    elif t.src_type == GGMLType.Q8_0:
        values, per_value = np.ascontiguousarray(piece.reshape(-1, 34)[:, :2]).view("<f2"), 32
    else:
        return
    if np.isfinite(values).all():
        return
    row = r0 + int(np.flatnonzero(~np.isfinite(values.reshape(-1)))[0]) * per_value // t.shape[-1]
    raise GGUFError(
        f"{gf.path}: tensor {t.name!r} row {row} holds NaN or infinite values (the file is corrupt); "
        "llama-quantize refuses it too"
    )


def _check_scales(gf: GGUFFile, t: TensorPlan, r0: int, out: np.ndarray) -> None:
    """Refuse blocks whose fp16 scale overflowed (values beyond about 5e5 for Q4_0), as
    llama-quantize's ggml_validate_row_data does."""
    at = _SCALE_AT[t.dst_type]
    elems, size = BLOCK_SIZE[t.dst_type]
    d = np.ascontiguousarray(out.reshape(-1, size)[:, at : at + 2]).view("<f2").reshape(-1)
    bad = np.flatnonzero(~np.isfinite(d))
    if bad.size:
        row = r0 + int(bad[0]) * elems // t.shape[-1]
        raise UnsupportedModelError(
            f"{gf.path}: tensor {t.name!r} row {row} cannot be stored as {t.dst_type.name}: its block scale "
            "overflows fp16 (weights too large); llama-quantize refuses it too"
        )


def _result(pending: deque[tuple[Future[np.ndarray], int]], report: Callable[[int], None]) -> np.ndarray:
    fut, n = pending.popleft()
    out = fut.result()
    report(n)
    return out


def requantize(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    target: str = "Q4_0",
    *,
    progress: Callable[[int, int], None] | None = None,
    threads: int | None = None,
    expect_source_sha256: str | None = None,
) -> RequantizeResult:
    """Write the `target` (Q4_0) version of the GGUF model `src` to `dst` (replaced if it exists).

    `progress(done, total)` is called as the source's tensor bytes are processed; `threads`
    (default: all CPUs) quantize chunks of rows in parallel, with the same output. With
    `expect_source_sha256` (the digest a chart pins), a source with another digest is refused
    before anything is written. Raises
    ModelError (GGUFError: not a GGUF file or corrupt; UnsupportedModelError: another
    architecture, already-quantized weights, unknown target) and leaves nothing at `dst`."""
    src, dst = Path(src), Path(dst)
    _, file_type = _target(target)
    _check_paths(src, dst)
    with read_gguf(src) as gf:
        arch = gf.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{src}: architecture {arch!r} is not supported; llmctl requantizes "
                f"{' and '.join(SUPPORTED_ARCHITECTURES)} models"
            )
        tensors = plan(gf, target)
        metadata = _metadata(src, gf.data_offset)
        source_sha256 = _sha256_file(src)
        if expect_source_sha256 is not None and source_sha256 != expect_source_sha256.lower():
            raise ModelError(
                f"{src}: sha256 is {source_sha256}, expected {expect_source_sha256}: not the pinned source weights"
            )
        part = dst.with_name(f".{dst.name}.{secrets.token_hex(4)}.part")
        writer = _writer(part, gf.alignment, metadata, file_type, source_sha256, tensors)

        total = sum(gf.tensors[t.name].n_bytes for t in tensors)
        done = 0

        def report(n: int) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, total)

        n_threads = max(1, threads or os.cpu_count() or 1)
        try:
            with ThreadPoolExecutor(n_threads, thread_name_prefix="requantize") as pool:
                writer.write((t.name, _chunks(gf, t, pool, n_threads, report)) for t in tensors)
            sha256 = _sha256_file(part, sync=True)
            size = part.stat().st_size
            os.replace(part, dst)
        except OSError as e:
            raise ModelError(f"{dst}: cannot write: {e.strerror or e}") from None
        finally:
            part.unlink(missing_ok=True)
    return RequantizeResult(dst, sha256, source_sha256, len(tensors), size)


def _writer(
    path: Path,
    alignment: int,
    metadata: list[tuple[str, ValueType, Any]],
    file_type: FileType,
    source_sha256: str,
    tensors: list[TensorPlan],
) -> GGUFWriter:
    """The output's header: the source's keys in order (a few replaced), then the new ones."""
    replace: dict[str, tuple[ValueType, Any]] = {
        "general.quantization_version": (ValueType.UINT32, QUANTIZATION_VERSION),
        "general.file_type": (ValueType.UINT32, int(file_type)),
        "general.quantized_by": (ValueType.STRING, QUANTIZED_BY),
        PROVENANCE_KEY: (ValueType.STRING, source_sha256),
    }
    w = GGUFWriter(path, alignment=alignment)  # writes general.alignment itself unless it is 32
    try:
        for key, vtype, value in metadata:
            if key == "general.alignment" and alignment != 32:
                continue
            vtype, value = replace.pop(key, (vtype, value))
            w.add_kv(key, value, vtype)
        for key, (vtype, value) in replace.items():
            w.add_kv(key, value, vtype)
        for t in tensors:
            w.add_tensor_info(t.name, t.shape, t.dst_type)
    except (ValueError, TypeError) as e:
        raise UnsupportedModelError(f"cannot write this model's header: {e}") from None
    return w


# --- CLI ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m runtime.requantize SRC DST [--type Q4_0]`: prints the output's sha256."""
    p = argparse.ArgumentParser(
        prog="python -m runtime.requantize",
        description="Requantize a Q8_0/F16/F32 StarCoder GGUF to Q4_0 as llama-quantize does (deterministic).",
    )
    p.add_argument("src", metavar="SRC", help="source GGUF (Q8_0, F16 or F32)")
    p.add_argument("dst", metavar="DST", help="output GGUF (replaced if it exists)")
    p.add_argument("--type", dest="target", default="Q4_0", type=str.upper, choices=tuple(TARGETS))
    p.add_argument("--source-sha256", metavar="HEX", help="refuse a source with another sha256")
    p.add_argument("--threads", type=int, help="quantizing threads (default: all CPUs)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)
    start = last = time.monotonic()

    def show(done: int, total: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= 2 or done == total:
            last = now
            print(f"{args.src}: {done / 1e9:.2f}/{total / 1e9:.2f} GB ({now - start:.0f} s)", file=sys.stderr)

    try:
        res = requantize(
            args.src,
            args.dst,
            args.target,
            progress=None if args.quiet else show,
            threads=args.threads,
            expect_source_sha256=args.source_sha256,
        )
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(
            f"wrote {res.path} ({res.bytes / 1e6:.1f} MB, {res.tensors} tensors) in {time.monotonic() - start:.1f} s",
            file=sys.stderr,
        )
    print(res.sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
