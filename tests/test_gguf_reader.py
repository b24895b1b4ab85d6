"""The GGUF reader: agrees with gguf-py on real files and names the problem in every broken one."""

from __future__ import annotations

import mmap
import os
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime import Model
from runtime.errors import GGUFError, ModelError, TokenizerError, UnsupportedModelError
from runtime.ggml_types import GGMLType, ValueType
from runtime.gguf import parse, read_gguf
from runtime.testing.make_model import make_model

# The smallest real model make_model can write: its header (300-token vocabulary) is ~7 KB.
FUZZ_DIMS: dict[str, Any] = {
    "vocab": 300,
    "n_embd": 32,
    "n_ff": 64,
    "n_layer": 1,
    "n_ctx": 64,
    "n_head": 2,
    "n_head_kv": 1,
}


@pytest.fixture(scope="module")
def fuzz_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("fuzz") / "fuzz.gguf", **FUZZ_DIMS)


# --- a hand-built GGUF image, so that each corruption lands exactly where intended -------------


def s(text: str | bytes) -> bytes:
    """A GGUF string: u64 length + bytes."""
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32(key: str, v: int) -> bytes:
    return kv(key, ValueType.UINT32, struct.pack("<I", v))


def array(key: str, elem: int, count: int, payload: bytes) -> bytes:
    return kv(key, ValueType.ARRAY, struct.pack("<IQ", elem, count) + payload)


def tinfo(name: str | bytes, ne: list[int], ggml_type: int, offset: int, n_dims: int | None = None) -> bytes:
    n = len(ne) if n_dims is None else n_dims
    return (
        s(name)
        + struct.pack("<I", n)
        + b"".join(struct.pack("<Q", d) for d in ne)
        + struct.pack("<IQ", ggml_type, offset)
    )


def build(
    kvs: list[bytes],
    infos: list[bytes],
    data: bytes,
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    n_tensors: int | None = None,
    n_kv: int | None = None,
    alignment: int = 32,
) -> bytes:
    nt = len(infos) if n_tensors is None else n_tensors
    nk = len(kvs) if n_kv is None else n_kv
    head = magic + struct.pack("<IQQ", version, nt, nk) + b"".join(kvs) + b"".join(infos)
    return head + b"\0" * (-len(head) % alignment) + data


A = np.arange(8, dtype="<f4").reshape(2, 4)  # F32 [2, 4] at 0 (32 bytes)
B = np.linspace(-1, 1, 8).astype("<f2")  # F16 [8] at 32 (16 bytes, padded to 32)
Q = np.arange(2 * 34, dtype=np.uint8).reshape(2, 34)  # Q8_0 [2, 32] at 64 (68 bytes)
DATA = A.tobytes() + B.tobytes() + b"\0" * 16 + Q.tobytes()


def base_kvs() -> list[bytes]:
    return [
        kv("general.architecture", ValueType.STRING, s("starcoder2")),
        kv("general.name", ValueType.STRING, s("héllo wörld")),
        u32("x.u32", 7),
        kv("x.i8", ValueType.INT8, struct.pack("<b", -5)),
        kv("x.u16", ValueType.UINT16, struct.pack("<H", 65535)),
        kv("x.f32", ValueType.FLOAT32, struct.pack("<f", 0.25)),
        kv("x.bool", ValueType.BOOL, b"\x01"),
        kv("x.u64", ValueType.UINT64, struct.pack("<Q", 2**63)),
        kv("x.i64", ValueType.INT64, struct.pack("<q", -(2**40))),
        kv("x.f64", ValueType.FLOAT64, struct.pack("<d", 1e300)),
        array("x.strs", ValueType.STRING, 3, s("a") + s("bc") + s("")),
        array("x.i32s", ValueType.INT32, 3, struct.pack("<3i", -1, 0, 1)),
        array("x.empty", ValueType.UINT8, 0, b""),
    ]


def base_infos() -> list[bytes]:
    return [
        tinfo("a", [4, 2], GGMLType.F32, 0),
        tinfo("b", [8], GGMLType.F16, 32),
        tinfo("q", [32, 2], GGMLType.Q8_0, 64),
    ]


def valid_image(**kw: Any) -> bytes:
    return build(base_kvs(), base_infos(), DATA, **kw)


def write(tmp_path: Path, data: bytes, name: str = "m.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def gguf_error(path: Path) -> str:
    with pytest.raises(GGUFError) as info:
        read_gguf(path).close()
    message = str(info.value)
    assert str(path) in message, message  # every message says which file
    return message


# --- valid files -------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [2, 3])
def test_hand_built_file(tmp_path: Path, version: int) -> None:
    path = write(tmp_path, valid_image(version=version))
    with read_gguf(path) as f:
        assert f.version == version and f.alignment == 32
        md = f.metadata
        assert md["general.name"] == "héllo wörld"
        assert md["x.u32"] == 7 and md["x.i8"] == -5 and md["x.u16"] == 65535
        assert md["x.f32"] == 0.25 and md["x.bool"] is True and md["x.u64"] == 2**63
        assert md["x.i64"] == -(2**40) and md["x.f64"] == 1e300
        assert md["x.strs"] == ["a", "bc", ""]
        assert md["x.i32s"].tolist() == [-1, 0, 1] and md["x.i32s"].dtype == np.int32
        assert md["x.empty"].tolist() == []
        assert f.data_offset % 32 == 0
        assert [(t.name, t.shape, t.ggml_type, t.n_bytes) for t in f.tensors.values()] == [
            ("a", (2, 4), GGMLType.F32, 32),
            ("b", (8,), GGMLType.F16, 16),
            ("q", (2, 32), GGMLType.Q8_0, 68),
        ]
        np.testing.assert_array_equal(f.tensor("a"), A)
        np.testing.assert_array_equal(f.tensor("b"), B)
        np.testing.assert_array_equal(f.tensor("q"), Q)
        assert f.tensors["q"].n_elements == 64
        with pytest.raises(GGUFError, match="no tensor named 'zz'"):
            f.tensor("zz")
    # gguf-py reads the same image
    r = gguf.GGUFReader(path)
    assert r.fields["x.strs"].contents() == ["a", "bc", ""]
    assert [t.name for t in r.tensors] == ["a", "b", "q"]


def test_alignment_key_is_honoured(tmp_path: Path) -> None:
    infos = [tinfo("a", [4, 2], GGMLType.F32, 0), tinfo("b", [8], GGMLType.F16, 64)]
    kvs = [*base_kvs(), u32("general.alignment", 64)]
    data = A.tobytes() + b"\0" * 32 + B.tobytes()
    with read_gguf(write(tmp_path, build(kvs, infos, data, alignment=64))) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        np.testing.assert_array_equal(f.tensor("b"), B)


MODELS = [
    {"arch": "starcoder2", "wtype": "f32"},
    {"arch": "starcoder2", "wtype": "q4_0", "head_type": "q8_0"},
    {"arch": "starcoder", "wtype": "f16"},
    {"arch": "starcoder", "wtype": "q8_0", "head_type": "q6_k", "n_embd": 256, "untied": True},
]


@pytest.mark.parametrize("kw", MODELS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_matches_gguf_py(tmp_path: Path, kw: dict[str, Any]) -> None:
    path = make_model(tmp_path / "m.gguf", **kw)
    r = gguf.GGUFReader(path)
    with read_gguf(path) as f:
        assert f.version == 3
        keys = [k for k in r.fields if not k.startswith("GGUF.")]
        assert list(f.metadata) == keys
        for key in keys:
            ours, theirs = f.metadata[key], r.fields[key].contents()
            if isinstance(ours, np.ndarray):
                ours = ours.tolist()
            assert ours == theirs, key
            assert type(ours) is type(theirs), key
        assert list(f.tensors) == [t.name for t in r.tensors]
        for t in r.tensors:
            info = f.tensors[t.name]
            assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
            assert info.ggml_type.name == t.tensor_type.name, t.name
            assert (info.offset, info.n_bytes, info.n_elements) == (t.data_offset, t.n_bytes, t.n_elements), t.name
            assert f.raw(t.name).tobytes() == t.data.tobytes(), t.name
            if info.ggml_type in (GGMLType.F32, GGMLType.F16):
                np.testing.assert_array_equal(f.tensor(t.name), t.data)


def test_io_errors(tmp_path: Path) -> None:
    assert "no such file" in gguf_error(tmp_path / "missing.gguf")
    assert "file is empty" in gguf_error(write(tmp_path, b""))
    assert "is a directory" in gguf_error(tmp_path)


# --- one specific corruption each --------------------------------------------------------------


def _dup_key() -> bytes:
    kvs = base_kvs()
    return build([*kvs, kv("general.name", ValueType.STRING, s("again"))], base_infos(), DATA)


def _replace_kv(index: int, new: bytes) -> bytes:
    kvs = base_kvs()
    kvs[index] = new
    return build(kvs, base_infos(), DATA)


def _replace_info(index: int, new: bytes) -> bytes:
    infos = base_infos()
    infos[index] = new
    return build(base_kvs(), infos, DATA)


CORRUPTIONS: dict[str, tuple[Callable[[], bytes], str]] = {
    "bad magic": (lambda: valid_image(magic=b"GGML"), r"not a GGUF file \(magic b'GGML'"),
    "text file": (lambda: b"hello, this is text\n" * 3, r"not a GGUF file"),
    "version 1": (lambda: valid_image(version=1), r"GGUF version 1 is not supported"),
    "version 4": (lambda: valid_image(version=4), r"GGUF version 4 is not supported"),
    "version huge": (lambda: valid_image(version=0xFFFFFFFF), r"GGUF version 4294967295 is not supported"),
    "absurd tensor count": (lambda: valid_image(n_tensors=2**62), r"corrupt header: 4611686018427387904 tensors"),
    "absurd key count": (lambda: valid_image(n_kv=2**40), r"corrupt header: .* 1099511627776 keys cannot fit"),
    "more keys than present": (
        lambda: valid_image(n_kv=len(base_kvs()) + 3),
        r"key 1\d is \d+ bytes long|unknown value type|truncated",
    ),
    "misaligned offset": (
        lambda: _replace_info(1, tinfo("b", [8], GGMLType.F16, 40)),
        r"tensor 'b': data offset 40 is not a multiple of the alignment 32",
    ),
    "data past EOF": (
        lambda: _replace_info(2, tinfo("q", [32, 2], GGMLType.Q8_0, 4096)),
        r"tensor 'q' \(68 bytes at offset \d+\) runs past the end of the file",
    ),
    "data cut short": (lambda: valid_image()[:-1], r"tensor 'q' .* runs past the end of the file .* truncated"),
    "duplicate key": (_dup_key, r"duplicate metadata key 'general.name'"),
    "duplicate tensor": (
        lambda: _replace_info(2, tinfo("a", [32, 2], GGMLType.Q8_0, 64)),
        r"duplicate tensor name 'a'",
    ),
    "string longer than file": (
        lambda: _replace_kv(1, s("general.name") + struct.pack("<IQ", ValueType.STRING, 10**9) + b"x"),
        r"value of 'general.name' needs 1000000000 bytes but only \d+ remain",
    ),
    "key longer than limit": (
        lambda: _replace_kv(2, struct.pack("<Q", 2**63) + b"x.u32"),
        r"key 2 is 9223372036854775808 bytes long, more than the limit",
    ),
    "tensor name longer than limit": (
        lambda: _replace_info(0, tinfo("n" * 65, [4, 2], GGMLType.F32, 0)),
        r"name of tensor 0 is 65 bytes long",
    ),
    "key not UTF-8": (
        lambda: _replace_kv(2, kv(b"x.\xff\xfe", ValueType.UINT32, b"\0" * 4)),
        r"key 2 is not valid UTF-8",
    ),
    "absurd string array count": (
        lambda: _replace_kv(10, array("x.strs", ValueType.STRING, 2**62, s("a"))),
        r"4611686018427387904 strings of 'x.strs' needs",
    ),
    "string array element not UTF-8": (
        lambda: _replace_kv(10, array("x.strs", ValueType.STRING, 3, s("a") + s(b"\xff\xfe") + s(""))),
        r"element 1 of 'x.strs' is not valid UTF-8",
    ),
    "string array element past the end": (
        lambda: _replace_kv(10, array("x.strs", ValueType.STRING, 3, s("a") + struct.pack("<Q", 2**40) + b"bc")),
        r"element 1 of 'x.strs' needs 1099511627776 bytes",
    ),
    "absurd number array count": (
        lambda: _replace_kv(11, array("x.i32s", ValueType.INT32, 2**61, b"\0" * 12)),
        r"2305843009213693952 elements of 'x.i32s' needs",
    ),
    "array count past the end": (
        lambda: _replace_kv(11, array("x.i32s", ValueType.INT32, 100_000, b"\0" * 12)),
        r"100000 elements of 'x.i32s' needs 400000 bytes",
    ),
    "unknown value type": (
        lambda: _replace_kv(2, kv("x.u32", 13, b"\0" * 4)),
        r"key 'x.u32' has unknown value type 13",
    ),
    "unknown array element type": (
        lambda: _replace_kv(11, array("x.i32s", 99, 3, b"\0" * 12)),
        r"elements of 'x.i32s' has unknown value type 99",
    ),
    "array of arrays": (
        lambda: _replace_kv(11, array("x.i32s", ValueType.ARRAY, 1, b"\0" * 12)),
        r"'x.i32s' is an array of arrays",
    ),
    "unknown ggml type": (
        lambda: _replace_info(0, tinfo("a", [4, 2], 99, 0)),
        r"tensor 'a' has unknown ggml type 99",
    ),
    "n_dims 0": (lambda: _replace_info(1, tinfo("b", [], GGMLType.F16, 32)), r"tensor 'b' has 0 dimensions \(1 to 4"),
    "n_dims 5": (
        lambda: _replace_info(1, tinfo("b", [8, 1, 1, 1, 1], GGMLType.F16, 32)),
        r"tensor 'b' has 5 dimensions \(1 to 4",
    ),
    "zero dimension": (
        lambda: _replace_info(0, tinfo("a", [4, 0], GGMLType.F32, 0)),
        r"tensor 'a' has an invalid shape",
    ),
    "partial block": (
        lambda: _replace_info(2, tinfo("q", [16, 4], GGMLType.Q8_0, 64)),
        r"tensor 'q': row length 16 is not a multiple of the Q8_0 block size 32",
    ),
    "overlapping tensors": (
        lambda: _replace_info(1, tinfo("b", [8], GGMLType.F16, 0)),
        r"tensors 'a' and 'b' overlap",
    ),
    "alignment not a power of two": (
        lambda: build([*base_kvs(), u32("general.alignment", 48)], base_infos(), DATA),
        r"general.alignment must be a power of two, got 48",
    ),
    "alignment zero": (
        lambda: build([*base_kvs(), u32("general.alignment", 0)], base_infos(), DATA),
        r"general.alignment must be a power of two, got 0",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corruption_is_named(tmp_path: Path, case: str) -> None:
    make, pattern = CORRUPTIONS[case]
    message = gguf_error(write(tmp_path, make()))
    assert re.search(pattern, message), message
    assert "\n" not in message


def _check_cuts(path: Path, image: bytes, cuts: list[int]) -> set[str]:
    """read_gguf on `image` cut at each point (in decreasing order, by truncating one file)."""
    kinds = set()
    path.write_bytes(image[: max(cuts)])
    for cut in sorted(cuts, reverse=True):
        os.truncate(path, cut)
        message = gguf_error(path)
        assert re.search(r"truncated|file is empty|cannot fit in \d+ bytes", message), (cut, message)
        kinds.add(message.split(": ", 1)[1][:20])
    return kinds


def test_truncated_hand_built_file_at_every_byte(tmp_path: Path) -> None:
    image = valid_image()
    kinds = _check_cuts(tmp_path / "cut.gguf", image, list(range(len(image))))
    assert len(kinds) >= 3  # empty, header, tensor data: different messages


def test_truncated_model_header_at_every_byte(tmp_path: Path, fuzz_model: Path) -> None:
    image = fuzz_model.read_bytes()
    with read_gguf(fuzz_model) as f:
        header = f.data_offset
    assert 4000 < header < len(image)
    _check_cuts(tmp_path / "cut.gguf", image, list(range(header + 1)))


def test_truncated_model_data(tmp_path: Path, fuzz_model: Path) -> None:
    image = fuzz_model.read_bytes()
    with read_gguf(fuzz_model) as f:
        header = f.data_offset
        # one byte short of each tensor's end, and a few random cuts in between
        ends = [t.offset + t.n_bytes - 1 for t in f.tensors.values()]
    rng = np.random.default_rng(0)
    cuts = sorted({*ends, *rng.integers(header + 1, len(image), 40).tolist()})
    _check_cuts(tmp_path / "cut.gguf", image, cuts)


# --- fuzzing -----------------------------------------------------------------------------------

INTERESTING_U64 = [0, 1, 2, 7, 8, 31, 32, 33, 64, 255, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]

mutation = st.tuples(
    st.sampled_from(["flip", "byte", "u32", "u64", "insert", "delete", "truncate"]),
    st.booleans(),  # inside the header (most bytes that matter) or anywhere
    st.integers(0, 2**32),  # position, reduced modulo the region
    st.integers(0, 255),
    st.sampled_from(INTERESTING_U64),
    st.binary(min_size=1, max_size=16),
)


def mutate(image: bytes, header: int, ops: list[tuple[str, bool, int, int, int, bytes]]) -> bytes:
    buf = bytearray(image)
    for kind, in_header, pos, byte, big, blob in ops:
        if not buf:
            break
        at = pos % (min(header, len(buf)) if in_header else len(buf))
        if kind == "flip":
            buf[at] ^= 1 << (byte % 8)
        elif kind == "byte":
            buf[at] = byte
        elif kind == "u32":
            buf[at : at + 4] = struct.pack("<I", big & 0xFFFFFFFF)
        elif kind == "u64":
            buf[at : at + 8] = struct.pack("<Q", big)
        elif kind == "insert":
            buf[at:at] = blob
        elif kind == "delete":
            del buf[at : at + 1 + byte % 16]
        else:
            del buf[at:]
    return bytes(buf)


@pytest.fixture(scope="module")
def fuzz_image(fuzz_model: Path) -> tuple[bytes, int]:
    with read_gguf(fuzz_model) as f:
        return fuzz_model.read_bytes(), f.data_offset


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(ops=st.lists(mutation, min_size=1, max_size=6))
def test_fuzz_read_gguf_raises_only_format_errors(
    fuzz_image: tuple[bytes, int], tmp_path_factory: pytest.TempPathFactory, ops: list[Any]
) -> None:
    image, header = fuzz_image
    data = mutate(image, header, ops)
    path = tmp_path_factory.getbasetemp() / "fuzz-read.gguf"
    path.write_bytes(data)
    try:
        f = read_gguf(path)
    except (GGUFError, UnsupportedModelError) as e:  # the latter: a mutated type id names a real ggml type
        assert str(path) in str(e)
        return
    with f:  # whatever parsed must be consistent with the file
        for t in f.tensors.values():
            assert f.data_offset <= t.offset and t.offset + t.n_bytes <= len(data)
            assert f.raw(t.name).nbytes == t.n_bytes
    # and the in-memory parser agrees with the mapped one
    assert parse(data, path)[4] == f.data_offset


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflows in the forward pass of mutated weights
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(ops=st.lists(mutation, min_size=1, max_size=4))
def test_fuzz_model_load_raises_only_model_errors(
    fuzz_image: tuple[bytes, int], tmp_path_factory: pytest.TempPathFactory, ops: list[Any]
) -> None:
    image, header = fuzz_image
    path = tmp_path_factory.getbasetemp() / "fuzz-load.gguf"
    path.write_bytes(mutate(image, header, ops))
    try:
        model = Model.load(path, n_threads=1, n_ctx=32)
    except ModelError:
        return
    with model:  # a file that loads must also run
        model.eval(model.tokenize("x = 1")[:4] or [1])


def test_fuzz_model_is_loadable(fuzz_model: Path, tmp_path: Path) -> None:
    """The fuzzed file itself is valid, so mutations start from something that loads."""
    copy = tmp_path / "copy.gguf"
    shutil.copy(fuzz_model, copy)
    with Model.load(copy, n_threads=1) as m:
        assert m.config.n_vocab == 300 and m.eval(m.tokenize("def f(): pass")).shape[1] == 300


# --- fuzzing the meaning: well-formed files with wrong metadata or tensors ---------------------

SMALL_INTS = st.one_of(
    st.integers(0, 8), st.sampled_from([16, 32, 63, 64, 299, 300, 301, 2**31 - 1]), st.integers(0, 2**32 - 1)
)
VALUES = st.one_of(
    st.tuples(SMALL_INTS, st.just(ValueType.UINT32)),
    st.tuples(st.integers(-(2**63), 2**63 - 1), st.just(ValueType.INT64)),
    st.tuples(st.floats(width=32), st.just(ValueType.FLOAT32)),
    st.tuples(st.text(max_size=12), st.just(ValueType.STRING)),
    st.tuples(st.booleans(), st.just(ValueType.BOOL)),
    st.tuples(st.lists(st.text(max_size=6), max_size=5), st.just(ValueType.STRING)),
    st.tuples(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5), st.just(ValueType.INT32)),
)


class Parts:
    """The fuzz model as (key, value, type) entries and (name, shape, type, bytes) tensors."""

    def __init__(self, path: Path) -> None:
        r = gguf.GGUFReader(path)
        self.kvs = [
            (k, f.contents(), ValueType(int(f.types[-1]))) for k, f in r.fields.items() if not k.startswith("GGUF.")
        ]
        self.tensors = [
            (t.name, tuple(int(d) for d in reversed(t.shape)), GGMLType(int(t.tensor_type)), t.data.tobytes())
            for t in r.tensors
        ]

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "Parts(fuzz model)"


@pytest.fixture(scope="module")
def fuzz_parts(fuzz_model: Path) -> Parts:
    return Parts(fuzz_model)


edit = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 10**6), VALUES),  # replace a key's value (or add a key)
    st.tuples(st.just("del"), st.integers(0, 10**6)),
    st.tuples(st.just("item"), st.integers(0, 10**6), st.integers(0, 10**6), VALUES),  # one list element
    st.tuples(st.just("shorten"), st.integers(0, 10**6), st.integers(0, 400)),
    st.tuples(st.just("drop tensor"), st.integers(0, 10**6)),
    st.tuples(
        st.just("reshape"),
        st.integers(0, 10**6),
        st.lists(st.sampled_from([1, 2, 16, 32, 64, 300]), min_size=1, max_size=3),
    ),
    st.tuples(st.just("retype"), st.integers(0, 10**6), st.sampled_from(list(GGMLType))),
)


def _apply(parts: Parts, edits: list[tuple[Any, ...]], path: Path) -> None:
    kvs = {k: [v, t] for k, v, t in parts.kvs}
    tensors = {n: [shape, t, data] for n, shape, t, data in parts.tensors}
    for e in edits:
        keys, names = list(kvs), list(tensors)
        if e[0] == "set":
            key = keys[e[1] % len(keys)] if e[1] % 5 else f"x.new{e[1]}"
            kvs[key] = list(e[2])
        elif e[0] == "del" and keys:
            del kvs[keys[e[1] % len(keys)]]
        elif e[0] in ("item", "shorten"):
            lists = [k for k in keys if isinstance(kvs[k][0], list) and kvs[k][0]]
            if not lists:
                continue
            entry = kvs[lists[e[1] % len(lists)]]
            if e[0] == "shorten":
                entry[0] = entry[0][: e[2]]
            elif isinstance(e[3][0], type(entry[0][0])) and not isinstance(e[3][0], list) and e[3][1] == entry[1]:
                entry[0] = [*entry[0]]
                entry[0][e[2] % len(entry[0])] = e[3][0]
        elif e[0] == "drop tensor" and names:
            del tensors[names[e[1] % len(names)]]
        elif e[0] == "reshape" and names:
            tensors[names[e[1] % len(names)]][0] = tuple(e[2])
        elif e[0] == "retype" and names:
            tensors[names[e[1] % len(names)]][1] = e[2]
    _write_model(kvs, tensors, path)


def _write_model(kvs: dict[str, list[Any]], tensors: dict[str, list[Any]], path: Path) -> Path:
    """Write metadata {key: [value, type]} and tensors {name: [shape, type, data]}; data is cut or
    zero-padded to the declared size (F32 if the shape is not whole blocks of the type)."""
    from runtime.gguf_writer import GGUFWriter

    w = GGUFWriter(path)
    for key, (value, vtype) in kvs.items():
        w.add_kv(key, value, vtype)
    sized = []
    for name, (shape, t, data) in tensors.items():
        try:
            w.add_tensor_info(name, shape, t)
        except ValueError:
            w.add_tensor_info(name, shape, GGMLType.F32)
        n = w._infos[-1][3]
        sized.append((name, [data[:n] + b"\0" * (n - len(data[:n]))]))
    return w.write(sized)


def _with_metadata(parts: Parts, path: Path, changes: dict[str, tuple[Any, ValueType]]) -> Path:
    kvs = {k: [v, t] for k, v, t in parts.kvs}
    kvs.update({k: list(v) for k, v in changes.items()})
    return _write_model(kvs, {n: [shape, t, data] for n, shape, t, data in parts.tensors}, path)


# Each of these made Model.load raise a TypeError, ValueError, ZeroDivisionError or a Rust panic
# (pyo3 PanicException) before the fuzz test below found them.
WRONG_METADATA: dict[str, tuple[dict[str, tuple[Any, ValueType]], type[ModelError], str]] = {
    "token_type scalar": (
        {"tokenizer.ggml.token_type": (0, ValueType.UINT32)},
        TokenizerError,
        "token_type is not an array",
    ),
    "token_type strings": (
        {"tokenizer.ggml.token_type": (["a"] * 300, ValueType.STRING)},
        TokenizerError,
        "token_type is not an array",
    ),
    "add_bos array": ({"tokenizer.ggml.add_bos_token": ([], ValueType.INT32)}, TokenizerError, "is not a boolean"),
    "model array": ({"tokenizer.ggml.model": ([], ValueType.INT32)}, UnsupportedModelError, "tokenizer model"),
    "pre array": ({"tokenizer.ggml.pre": ([1], ValueType.INT32)}, UnsupportedModelError, "pre-tokenizer"),
    "architecture array": ({"general.architecture": ([], ValueType.INT32)}, GGUFError, "must be a string"),
    "other architecture": (
        {"general.architecture": ("llama", ValueType.STRING)},
        UnsupportedModelError,
        "architecture 'llama' is not supported; llmctl's runtime runs starcoder2 and starcoder models",
    ),
    "float block count": (
        {"starcoder2.block_count": (1.5, ValueType.FLOAT32)},
        GGUFError,
        "must be a positive integer",
    ),
    "float head count 0": (
        {"starcoder2.attention.head_count": (0.0, ValueType.FLOAT32)},
        GGUFError,
        "'starcoder2.attention.head_count' must be a positive integer",
    ),
    "odd head size": (  # 32 heads of the 32-wide embedding: head size 1, and RoPE rotates pairs
        {"starcoder2.attention.head_count": (32, ValueType.UINT32)},
        GGUFError,
        "head size 1 is odd; RoPE rotates pairs of values",
    ),
    "negative epsilon": (
        {"starcoder2.attention.layer_norm_epsilon": (-1.0, ValueType.FLOAT32)},
        GGUFError,
        "must be a non-negative number",
    ),
    "infinite rope base": (
        {"starcoder2.rope.freq_base": (float("inf"), ValueType.FLOAT32)},
        GGUFError,
        "must be a non-negative number",
    ),
    "merge result not in vocabulary": (
        {"tokenizer.ggml.merges": (["a b"], ValueType.STRING)},  # no token "ab"
        TokenizerError,
        r"merge 0 \('a b'\) does not join two tokens",
    ),
    "merge without a space": ({"tokenizer.ggml.merges": (["ab"], ValueType.STRING)}, TokenizerError, "merge 0 .'ab'."),
    "bool token id": ({"tokenizer.ggml.eos_token_id": (True, ValueType.BOOL)}, TokenizerError, "is not a token id"),
}


@pytest.mark.parametrize("case", list(WRONG_METADATA))
def test_wrong_metadata_is_a_model_error(fuzz_parts: Parts, tmp_path: Path, case: str) -> None:
    changes, error, pattern = WRONG_METADATA[case]
    path = _with_metadata(fuzz_parts, tmp_path / "m.gguf", changes)
    with pytest.raises(error, match=pattern) as info:
        Model.load(path, n_threads=1)
    assert str(path) in str(info.value)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflows in the forward pass of broken weights
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(edits=st.lists(edit, min_size=1, max_size=3))
def test_fuzz_model_load_on_wrong_metadata(
    fuzz_parts: Parts, tmp_path_factory: pytest.TempPathFactory, edits: list[Any]
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-meta.gguf"
    _apply(fuzz_parts, edits, path)
    try:
        model = Model.load(path, n_threads=1, n_ctx=32)
    except ModelError:
        return
    with model:  # a file that loads must also run, or fail with a ModelError (NaN weights, ...)
        ids = model.tokenize("def f(x):")[:4] or [0]
        assert model.eval(ids).shape == (len(ids), model.config.n_vocab)
        try:
            model.complete(ids, max_tokens=2, seed=0)
        except ModelError as e:
            assert "non-finite logits" in str(e)


def test_known_but_unsupported_quantization_is_named(tmp_path: Path) -> None:
    """A real ggml type the runtime does not read (Q5_0) is refused by name, with what to use instead."""
    path = tmp_path / "q5_0.gguf"
    path.write_bytes(_replace_info(0, tinfo("a", [32, 2], 6, 0)))
    with pytest.raises(UnsupportedModelError, match=r"tensor 'a' is Q5_0, .* use a Q8_0 or Q4_0 file"):
        read_gguf(path)


def _rss_kib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Rss:"))


@pytest.mark.parametrize("how", ["madvise", "madvise-in-pieces", "page-reads"])
def test_populate_faults_in_the_whole_mapping(
    fuzz_model: Path, tmp_path: Path, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GGUFFile.populate (the server's pre-faulting after the header check) makes every page of a
    parsed file resident, through madvise (POPULATE_CHUNK bytes per call, the last piece shorter)
    or, where the kernel lacks MADV_POPULATE_READ, by reading one byte per page."""
    import runtime.gguf as gguf_module

    if how == "page-reads":
        monkeypatch.setattr(gguf_module, "_madvise", lambda address, n_bytes, advice: False)
    path = tmp_path / "big.gguf"
    shutil.copyfile(fuzz_model, path)
    with open(path, "ab") as f:  # padding after the tensor data: 16 MiB the parse never reads
        f.write(os.urandom(16 << 20))
    if how == "madvise-in-pieces":  # two pieces, the second a third of the file: it cannot go unseen
        piece = (path.stat().st_size * 2 // 3) & ~(mmap.PAGESIZE - 1)
        monkeypatch.setattr(gguf_module, "POPULATE_CHUNK", piece)
    size_kib = path.stat().st_size >> 10
    with read_gguf(path) as f:
        before = _rss_kib()
        f.populate()
        grown = _rss_kib() - before
    assert grown >= 0.9 * size_kib, f"populate made {grown} KiB resident of {size_kib} KiB"


@settings(max_examples=200, deadline=None)
@given(strings=st.lists(st.text(max_size=12), max_size=8), cut=st.integers(min_value=0, max_value=200))
def test_read_strings_reads_whole_strings_and_stops_before_a_cut_one(strings: list[str], cut: int) -> None:
    """The Cython reader of string arrays returns every string of a well-formed run with the
    position after it; cut short anywhere, it returns the strings before the cut one, and the
    position where that one starts, without raising (the checked read then names the error)."""
    from runtime.kernels import _kernels

    image = b"".join(s(t) for t in strings)
    assert _kernels.read_strings(image, 0, len(strings)) == (strings, len(image))
    cut = min(cut, len(image))
    read, pos = _kernels.read_strings(image[:cut], 0, len(strings))
    assert read == strings[: len(read)]
    assert pos == len(b"".join(s(t) for t in read))
    if len(read) < len(strings):
        assert pos + len(s(strings[len(read)])) > cut  # the next string did not fit


def test_read_strings_stops_at_invalid_utf8_and_bad_positions() -> None:
    from runtime.kernels import _kernels

    image = s("ok") + s(b"\xc3") + s("never")
    assert _kernels.read_strings(image, 0, 3) == (["ok"], len(s("ok")))
    assert _kernels.read_strings(image, len(image) + 1, 1) == ([], len(image) + 1)
    assert _kernels.read_strings(image, -1, 1) == ([], -1)
    assert _kernels.read_strings(image, 0, 0) == ([], 0)
