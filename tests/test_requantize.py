"""runtime.requantize: Q8_0/F16/F32 -> Q4_0 as llama-quantize does it.

- the block quantizers are bit-identical to gguf-py's reference (Q4_0, Q8_0) and, through whole
  files, to llama.cpp's own quantizer (llama_model_quantize, as `llama-quantize --allow-requantize`):
  same tensor types, same bytes, edge cases included;
- requantized files load in the runtime and in llama.cpp and give the same logits;
- output is deterministic, and failures leave nothing behind.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime import Model, quants
from runtime.errors import GGUFError, ModelError, UnsupportedModelError
from runtime.ggml_types import FileType, GGMLType
from runtime.gguf import read_gguf
from runtime.gguf_writer import GGUFWriter
from runtime.requantize import PROVENANCE_KEY, RequantizeResult, _metadata, main, requantize
from runtime.testing.make_model import make_model

TOLERANCE = 0.01  # tests/test_parity.py's bar for Q6_K heads, of the std of llama.cpp's logits


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- block quantizers against gguf-py ----------------------------------------------------------


def _edge_blocks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    ties = rng.integers(-16, 17, 64).astype(np.float32) / 2  # x*id + 8.5 lands on integers
    ties[0] = -8.0
    ties[32] = 8.0
    return {
        "random": rng.standard_normal(32 * 4096).astype(np.float32),
        "random-scaled": (rng.standard_normal(32 * 512) * np.repeat(10.0 ** rng.uniform(-6, 4, 512), 32)).astype(
            np.float32
        ),
        "zeros": np.zeros(64, np.float32),
        "all-equal": np.full(64, 0.37, np.float32),
        "all-equal-negative": np.full(32, -2.5, np.float32),
        "one-huge": np.r_[rng.standard_normal(31) * 0.01, 1e4].astype(np.float32),
        "negative-max": np.r_[np.linspace(-1, 0.5, 31), -3.0].astype(np.float32),
        "tied-magnitudes": np.r_[0.1, 2.0, -2.0, rng.uniform(-1, 1, 29)].astype(np.float32),
        "half-ties": ties,
        "overflowing-d": np.r_[rng.standard_normal(31), 7e5].astype(np.float32),  # fp16(d) = inf, as ggml
    }


@pytest.mark.parametrize("kind", list(_edge_blocks()))
@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_block_quantizers_match_gguf_reference(kind: str, qtype: str) -> None:
    gq = pytest.importorskip("gguf.quants", reason="gguf-py is installed with llama-cpp-python")
    from gguf import GGMLQuantizationType

    x = _edge_blocks()[kind]
    ours = {"Q4_0": quants.quantize_q4_0, "Q8_0": quants.quantize_q8_0}[qtype](x)
    with np.errstate(over="ignore"):
        ref = gq.quantize(x.reshape(-1, 32), GGMLQuantizationType[qtype]).reshape(-1)
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, ref)


def test_q6_k_round_trip_and_zero_blocks() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(256 * 64).astype(np.float32)
    x[:256] = 0  # a whole zero super-block: all bytes zero
    x[256 : 256 + 16] = 0  # a zero sub-block
    raw = quants.quantize_q6_k(x)
    assert raw.shape == (64 * 210,)
    assert not raw[:210].any()
    back = quants.dequantize(raw, GGMLType.Q6_K, 256).reshape(-1)
    assert not back[: 256 + 16].any()
    err = np.abs(back - x).max(axis=None)
    assert err < 0.05 * np.abs(x).max()


# --- whole files against llama.cpp's quantizer ---------------------------------------------------


def _llama_quantize(src: Path, dst: Path) -> Path:
    """llama.cpp's own quantizer: `llama-quantize --allow-requantize src dst Q4_0`."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/bootstrap.sh")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(FileType.MOSTLY_Q4_0)
    p.allow_requantize = True
    p.nthread = 2
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p)) == 0
    return dst


def _assert_same_tensors(ours: Path, ref: Path) -> dict[str, GGMLType]:
    """Every tensor has the same type, shape and bytes in both files; returns the types."""
    with read_gguf(ours) as a, read_gguf(ref) as b:
        assert sorted(a.tensors) == sorted(b.tensors)
        for name, ta in a.tensors.items():
            tb = b.tensors[name]
            assert (ta.ggml_type, ta.shape) == (tb.ggml_type, tb.shape), name
            assert np.array_equal(a.raw(name), b.raw(name)), f"{name} ({ta.ggml_type.name}) differs"
        return {name: t.ggml_type for name, t in a.tensors.items()}


def _rewrite(src: Path, dst: Path, replace: dict[str, np.ndarray]) -> Path:
    """A copy of the GGUF `src` with some tensors' data replaced."""
    with read_gguf(src) as gf:
        w = GGUFWriter(dst)
        for key, vtype, value in _metadata(src, gf.data_offset):
            w.add_kv(key, value, vtype)
        for info in gf.tensors.values():
            w.add_tensor_info(info.name, info.shape, info.ggml_type)
        w.write((name, [replace.get(name, gf.raw(name))]) for name in gf.tensors)
    return dst


FILE_CASES: list[Any] = [
    # (id, make_model arguments, expected type of the head, of an untied token_embd)
    pytest.param(dict(arch="starcoder2", wtype="q8_0"), GGMLType.Q8_0, None, id="sc2-q8_0-tied-head64"),
    pytest.param(dict(arch="starcoder2", wtype="q8_0", n_embd=256, n_ff=512), GGMLType.Q6_K, None, id="sc2-q8_0-tied"),
    pytest.param(
        dict(arch="starcoder2", wtype="q8_0", n_embd=256, n_ff=512, untied=True),
        GGMLType.Q6_K,
        GGMLType.Q4_0,
        id="sc2-q8_0-untied",
    ),
    pytest.param(
        dict(arch="starcoder", wtype="q8_0", n_embd=256, n_head=8, n_ff=512), GGMLType.Q6_K, None, id="sc-q8_0-tied"
    ),
    pytest.param(
        dict(arch="starcoder", wtype="q8_0", untied=True), GGMLType.Q8_0, GGMLType.Q4_0, id="sc-q8_0-untied-head64"
    ),
    pytest.param(dict(arch="starcoder2", wtype="f16", n_embd=256, n_ff=512), GGMLType.Q6_K, None, id="sc2-f16"),
    pytest.param(dict(arch="starcoder2", wtype="f32", untied=True), GGMLType.Q8_0, GGMLType.Q4_0, id="sc2-f32"),
]


@pytest.mark.parametrize("kwargs,head_type,embd_type", FILE_CASES)
def test_same_tensors_as_llama_quantize(
    kwargs: dict[str, Any], head_type: GGMLType, embd_type: GGMLType | None, tmp_path: Path
) -> None:
    src = make_model(tmp_path / "src.gguf", preset="tiny", seed=3, **kwargs)
    ref = _llama_quantize(src, tmp_path / "ref.gguf")
    res = requantize(src, tmp_path / "ours.gguf")
    types = _assert_same_tensors(res.path, ref)
    head = "output.weight" if kwargs.get("untied") else "token_embd.weight"
    assert types[head] == head_type
    if embd_type is not None:
        assert types["token_embd.weight"] == embd_type
    for name, t in types.items():
        if name.endswith(".bias") or "_norm." in name or name == "position_embd.weight":
            assert t == GGMLType.F32, name
        elif name not in (head, "token_embd.weight"):
            assert t == GGMLType.Q4_0, name


def test_edge_values_match_llama_quantize(tmp_path: Path) -> None:
    """Zero super-blocks and sub-blocks, sub-block scales that round to 0, values below ggml's
    GROUP_MAX_EPS, ties, huge values and subnormals, through both Q6_K and Q4_0."""
    src = make_model(tmp_path / "f32.gguf", preset="tiny", wtype="f32", n_embd=256, n_ff=512, seed=4)
    rng = np.random.default_rng(9)
    with read_gguf(src) as gf:
        embd = np.array(gf.tensor("token_embd.weight"))
        up = np.array(gf.tensor("blk.0.ffn_up.weight"))
    embd[0] = 0
    embd[1, :16] = 0
    embd[2] = 0.37
    embd[3, 7] = 1e4  # the other sub-blocks' scales round to 0: their L stay make_qx_quants'
    embd[4, :128] = rng.standard_normal(128) * 1e-20  # below GROUP_MAX_EPS
    embd[5] = rng.integers(-64, 64, 256) / 4
    embd[6] = -np.abs(embd[6])
    embd[6, 100] = -50
    embd[7] = rng.standard_normal(256) * 1e-30
    up[0] = 0
    up[1, :32] = 0.25
    up[2] = rng.integers(-16, 17, 256) / 2
    up[3, 5] = 5e5  # fp16(d) = 62500, near the top of the range
    up[4, :32] = rng.standard_normal(32) * 1e-39  # subnormal: 1/d overflows
    up[5, :32] = 1e-44
    up[6] = -np.abs(up[6])
    edge = _rewrite(src, tmp_path / "edge.gguf", {"token_embd.weight": embd, "blk.0.ffn_up.weight": up})
    ref = _llama_quantize(edge, tmp_path / "ref.gguf")
    res = requantize(edge, tmp_path / "ours.gguf")
    types = _assert_same_tensors(res.path, ref)
    assert types["token_embd.weight"] == GGMLType.Q6_K and types["blk.0.ffn_up.weight"] == GGMLType.Q4_0


@pytest.mark.parametrize(
    "tensor,bad,error,message",
    [
        (
            "blk.1.ffn_up.weight",
            7e5,
            UnsupportedModelError,
            "row 3 cannot be stored as Q4_0",
        ),
        ("blk.1.ffn_up.weight", np.inf, GGUFError, "row 3 holds NaN or infinite values"),
        ("blk.1.ffn_up.weight", np.nan, GGUFError, "row 3 holds NaN or infinite values"),
        ("token_embd.weight", np.nan, GGUFError, "row 3 holds NaN or infinite values"),
        ("blk.0.attn_norm.weight", np.nan, GGUFError, "row 0 holds NaN or infinite values"),
    ],
)
def test_invalid_weights_are_refused_like_llama_quantize(
    tensor: str, bad: float, error: type[Exception], message: str, tmp_path: Path
) -> None:
    """Weights whose fp16 block scale would overflow, NaN or infinite values (in quantized or copied
    tensors): llama-quantize's ggml_validate_row_data refuses them, and so does requantize."""
    src = make_model(tmp_path / "f32.gguf", preset="tiny", wtype="f32", seed=4)
    with read_gguf(src) as gf:
        data = np.array(gf.tensor(tensor))
    data.reshape(-1, data.shape[-1])[min(3, data.reshape(-1, data.shape[-1]).shape[0] - 1), 40] = bad
    bad_src = _rewrite(src, tmp_path / "bad.gguf", {tensor: data})
    llama_cpp = pytest.importorskip("llama_cpp")
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = int(FileType.MOSTLY_Q4_0)
    assert llama_cpp.llama_model_quantize(str(bad_src).encode(), str(tmp_path / "ref.gguf").encode(), ctypes.byref(p))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error, match=f"'{tensor}' {message}"):
        requantize(bad_src, tmp_path / "out.gguf")
    assert sorted(os.listdir(tmp_path)) == before


# --- the requantized files in the runtime and in llama.cpp --------------------------------------


def _source_text(n_chars: int) -> str:
    parts: list[str] = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        if sum(map(len, parts)) >= n_chars:
            break
    return "".join(parts)[:n_chars]


PARITY_CASES: list[Any] = [
    pytest.param(dict(arch="starcoder2"), False, id="sc2-tiny"),
    pytest.param(dict(arch="starcoder2", n_embd=256, n_ff=512), True, id="sc2-q6k-head"),
    pytest.param(dict(arch="starcoder"), False, id="sc-tiny"),
    pytest.param(dict(arch="starcoder", n_embd=256, n_head=8, n_ff=512, untied=True), True, id="sc-untied-q6k-head"),
]


@pytest.mark.parametrize("kwargs,q6k_head", PARITY_CASES)
def test_requantized_model_matches_llama_cpp(
    kwargs: dict[str, Any], q6k_head: bool, tmp_path: Path, llama_oracle: Callable[..., Any]
) -> None:
    src = make_model(tmp_path / "q8_0.gguf", preset="tiny", wtype="q8_0", seed=7, **kwargs)
    res = requantize(src, tmp_path / "q4_0.gguf")
    assert res.source_sha256 == _sha256(src)
    with read_gguf(res.path) as gf:
        assert gf.get("general.file_type") == FileType.MOSTLY_Q4_0
        assert gf.get("general.quantization_version") == 2
        assert gf.get("general.quantized_by") == "llmctl"
        assert gf.get(PROVENANCE_KEY) == res.source_sha256
        with read_gguf(src) as orig:
            for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "general.architecture"):
                assert gf.get(key) == orig.get(key)
            np.testing.assert_array_equal(gf.get("tokenizer.ggml.token_type"), orig.get("tokenizer.ggml.token_type"))
    text = _source_text(4000)
    with Model.load(res.path, n_ctx=512) as model:
        ids = model.tokenize(text, special=False)[:200]
        llm = llama_oracle(res.path, n_ctx=512)
        assert llm.tokenize(text.encode(), add_bos=False, special=False)[:200] == ids
        llm.reset()
        llm.eval(ids)
        ref = np.array(llm.scores[: len(ids)], dtype=np.float32)
        ours = model.eval(ids)
    assert ours.shape == ref.shape
    if q6k_head:  # the Q6_K head sums in another order than ggml (docs/runtime.md)
        err = float(np.abs(ours - ref).max() / ref.std())
        assert err <= TOLERANCE, f"logits differ by {err:.2%} of their std"
    else:
        np.testing.assert_array_equal(ours, ref)


# --- determinism, progress, the result -----------------------------------------------------------


def test_deterministic_and_result(tmp_path: Path) -> None:
    src = make_model(tmp_path / "src.gguf", preset="tiny", wtype="q8_0", n_embd=256, n_ff=512, seed=1)
    calls: list[tuple[int, int]] = []
    a = requantize(src, tmp_path / "a.gguf", progress=lambda d, t: calls.append((d, t)), threads=1)
    b = requantize(src, tmp_path / "b.gguf", "q4_0", threads=2)
    assert isinstance(a, RequantizeResult)
    assert a.sha256 == b.sha256 == _sha256(a.path) == _sha256(b.path)
    assert a.source_sha256 == _sha256(src)
    assert a.path == tmp_path / "a.gguf"
    assert a.bytes == a.path.stat().st_size
    with read_gguf(src) as gf:
        assert a.tensors == len(gf.tensors)
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == calls[-1][1]
    # overwriting an existing output gives the same bytes, and no temporary file is left
    c = requantize(src, tmp_path / "a.gguf")
    assert c.sha256 == a.sha256
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "b.gguf", "src.gguf"]


# --- refusals -----------------------------------------------------------------------------------


def _other_arch(path: Path) -> Path:
    w = GGUFWriter(path)
    w.add_kv("general.architecture", "llama")
    w.add_tensor_info("token_embd.weight", (4, 32), GGMLType.F32)
    w.write([("token_embd.weight", [np.zeros((4, 32), np.float32)])])
    return path


@pytest.mark.parametrize(
    "case,error,message",
    [
        ("not-gguf", GGUFError, "not a GGUF file"),
        ("empty", GGUFError, "empty"),
        ("missing", GGUFError, "no such file"),
        ("llama", UnsupportedModelError, "architecture 'llama'"),
        ("already-q4_0", UnsupportedModelError, "is Q4_0; requantize from a Q8_0"),
        ("target", UnsupportedModelError, "cannot requantize to 'Q5_K'"),
        ("missing-dir", ModelError, "does not exist"),
        ("dst-is-dir", ModelError, "is a directory"),
        ("dst-is-src", ModelError, "replace its own source"),
        ("wrong-digest", ModelError, "expected " + "0" * 64 + ": not the pinned source weights"),
    ],
)
def test_refuses(case: str, error: type[Exception], message: str, tmp_path: Path) -> None:
    src = tmp_path / "src.gguf"
    dst = tmp_path / "out.gguf"
    target = "Q4_0"
    if case == "not-gguf":
        src.write_text("def main():\n    pass\n" * 10)
    elif case == "empty":
        src.touch()
    elif case == "llama":
        _other_arch(src)
    elif case == "already-q4_0":
        make_model(src, preset="tiny", wtype="q4_0")
    elif case != "missing":
        make_model(src, preset="tiny", wtype="q8_0")
    if case == "target":
        target = "Q5_K"
    elif case == "missing-dir":
        dst = tmp_path / "no" / "such" / "out.gguf"
    elif case == "dst-is-dir":
        dst.mkdir()
    elif case == "dst-is-src":
        dst = src
    expect = "0" * 64 if case == "wrong-digest" else None
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(error) as exc:
        requantize(src, dst, target, expect_source_sha256=expect)
    assert message in str(exc.value)
    assert "\n" not in str(exc.value)
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, no temporary file left


def test_failure_midway_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runtime.requantize as rq

    src = make_model(tmp_path / "src.gguf", preset="tiny", wtype="q8_0")
    calls = 0

    def boom(x: np.ndarray) -> np.ndarray:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise MemoryError("simulated")
        return quants.quantize_q4_0(x)

    monkeypatch.setitem(rq._QUANTIZERS, GGMLType.Q4_0, boom)
    with pytest.raises(MemoryError):
        requantize(src, tmp_path / "out.gguf")
    assert sorted(os.listdir(tmp_path)) == ["src.gguf"]


# --- CLI ----------------------------------------------------------------------------------------


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = make_model(tmp_path / "src.gguf", preset="tiny", wtype="q8_0")
    dst = tmp_path / "out.gguf"
    assert main([str(src), str(dst), "--type", "q4_0", "--source-sha256", _sha256(src).upper()]) == 0
    out, err = capsys.readouterr()
    assert out == _sha256(dst) + "\n"
    assert "wrote" in err
    assert main([str(tmp_path / "nope.gguf"), str(tmp_path / "x.gguf"), "-q"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        main([str(src), str(dst), "--type", "Q5_K"])
    assert exc.value.code == 2
