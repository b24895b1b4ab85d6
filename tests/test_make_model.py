"""GGUF writer, code vocabulary and random-model generator, checked with gguf-py and llama.cpp."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
import pytest

from runtime.ggml_types import BLOCK_SIZE, GGMLType, ValueType, row_bytes
from runtime.gguf_writer import GGUFWriter
from runtime.testing import code_tokenizer
from runtime.testing.code_tokenizer import (
    SPECIAL_TOKENS,
    hf_tokenizer,
    train_code_vocab,
)
from runtime.testing.make_model import make_model

ROOT = Path(__file__).resolve().parents[1]
CODE = b"def f(x):\n    return 42"
MORE_CODE = [
    b"import os\n\n\nclass Foo(Bar):\n    def __init__(self, n=12345):  # caf\xc3\xa9 \xe2\x86\x92 \xf0\x9f\x98\x80\n",
    b"for i in range(10):\n\tprint(f'{i:>3}', end='')\r\n    \n\n  x=[1,2 ,3]",
    b"if a<=b and c!=d: return {'k': v**2 for k, v in d.items()}  \n",
]


def _field(r: gguf.GGUFReader, key: str) -> Any:
    return r.fields[key].contents()


def _tensors(r: gguf.GGUFReader) -> dict[str, tuple[str, list[int]]]:
    """name -> (type name, numpy-order shape)."""
    return {t.name: (t.tensor_type.name, [int(d) for d in t.shape][::-1]) for t in r.tensors}


# --- ggml_types and the writer -----------------------------------------------------------------


def test_row_bytes() -> None:
    assert row_bytes(GGMLType.F32, 7) == 28
    assert row_bytes(GGMLType.F16, 7) == 14
    assert row_bytes(GGMLType.Q8_0, 64) == 68
    assert row_bytes(GGMLType.Q4_0, 64) == 36
    assert row_bytes(GGMLType.Q6_K, 512) == 420
    for t in GGMLType:
        assert gguf.GGMLQuantizationType(int(t)).name == t.name
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(t))] == BLOCK_SIZE[t]
    for v in ValueType:
        assert gguf.GGUFValueType(int(v)).name == v.name
    with pytest.raises(ValueError, match="multiple of 32"):
        row_bytes(GGMLType.Q8_0, 48)


def test_writer_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "w.gguf"
    w = GGUFWriter(path, alignment=64)
    w.add_kv("a.str", "héllo")
    w.add_kv("a.bool", True)
    w.add_kv("a.u32", 7)
    w.add_kv("a.f32", 0.5)
    w.add_kv("a.i64", -(2**40), ValueType.INT64)
    w.add_kv("a.u8", 255, ValueType.UINT8)
    w.add_kv("a.f64", 1e300, ValueType.FLOAT64)
    w.add_kv("a.strs", ["x", "y z", ""])
    w.add_kv("a.i32s", [-1, 2, 3], ValueType.INT32)
    w.add_kv("a.f32s", np.array([1.5, -2.0], np.float32))
    w.add_kv("a.empty", [], ValueType.UINT32)
    f32 = np.arange(3 * 5, dtype=np.float32).reshape(3, 5)
    f16 = np.linspace(-1, 1, 7).astype(np.float16)
    q8 = gguf.quants.quantize(
        np.linspace(-3, 3, 2 * 64, dtype=np.float32).reshape(2, 64),
        gguf.GGMLQuantizationType.Q8_0,
    )
    w.add_tensor_info("t.f32", (3, 5), GGMLType.F32)
    w.add_tensor_info("t.f16", (7,), GGMLType.F16)
    w.add_tensor_info("t.q8", (2, 64), GGMLType.Q8_0)
    w.write(
        [
            ("t.f32", [f32[:1], f32[1:].tobytes()]),
            ("t.f16", iter([f16])),
            ("t.q8", (q8[i] for i in range(2))),
        ]
    )
    assert not (tmp_path / "w.gguf.tmp").exists()
    r = gguf.GGUFReader(path)
    assert _field(r, "general.alignment") == 64
    assert _field(r, "a.str") == "héllo"
    assert _field(r, "a.bool") is True
    assert _field(r, "a.u32") == 7
    assert r.fields["a.u32"].types == [gguf.GGUFValueType.UINT32]
    assert _field(r, "a.f32") == 0.5
    assert _field(r, "a.i64") == -(2**40)
    assert _field(r, "a.u8") == 255
    assert _field(r, "a.f64") == 1e300
    assert _field(r, "a.strs") == ["x", "y z", ""]
    assert _field(r, "a.i32s") == [-1, 2, 3]
    assert r.fields["a.i32s"].types == [
        gguf.GGUFValueType.ARRAY,
        gguf.GGUFValueType.INT32,
    ]
    assert _field(r, "a.f32s") == [1.5, -2.0]
    assert _field(r, "a.empty") == []
    assert _tensors(r) == {
        "t.f32": ("F32", [3, 5]),
        "t.f16": ("F16", [7]),
        "t.q8": ("Q8_0", [2, 64]),
    }
    ts = {t.name: t for t in r.tensors}
    np.testing.assert_array_equal(ts["t.f32"].data, f32)
    np.testing.assert_array_equal(ts["t.f16"].data, f16)
    assert ts["t.q8"].data.tobytes() == q8.tobytes()
    assert all(t.data_offset % 64 == 0 for t in r.tensors)


@pytest.mark.parametrize(
    "data, match",
    [
        ([("t", [b"\0" * 12])], "got 12 bytes, expected 16"),
        ([("t", [b"\0" * 12, b"\0" * 8])], "more than the expected 16"),
        ([("u", [b"\0" * 16])], "expected data for tensor 't'"),
        ([], "no data given"),
        ([("t", [b"\0" * 16]), ("u", [])], "more tensor data"),
    ],
)
def test_writer_failure_leaves_no_file(tmp_path: Path, data: list[Any], match: str) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"old")
    w = GGUFWriter(path)
    w.add_tensor_info("t", (2, 2), GGMLType.F32)
    with pytest.raises(ValueError, match=match):
        w.write(data)
    assert path.read_bytes() == b"old"
    assert list(tmp_path.iterdir()) == [path]


def test_writer_rejects_bad_input(tmp_path: Path) -> None:
    w = GGUFWriter(tmp_path / "x.gguf")
    w.add_kv("k", 1)
    with pytest.raises(ValueError, match="duplicate key"):
        w.add_kv("k", 2)
    with pytest.raises(ValueError, match="UINT32"):
        w.add_kv("neg", -1)
    with pytest.raises(ValueError, match="out of range"):
        w.add_kv("arr", [300], ValueType.UINT8)
    with pytest.raises(TypeError):
        w.add_kv("obj", object())
    with pytest.raises(ValueError, match="name longer"):
        w.add_tensor_info("n" * 64, (1,), GGMLType.F32)
    with pytest.raises(ValueError, match="multiple of 32"):
        w.add_tensor_info("q", (4, 48), GGMLType.Q8_0)


# --- code vocabulary ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1000, 4099])
def test_code_vocab(size: int) -> None:
    v = train_code_vocab(size)
    assert len(v.tokens) == len(v.token_types) == size
    assert len(set(v.tokens)) == size
    assert tuple(v.tokens[:19]) == SPECIAL_TOKENS
    assert v.tokens[0] == "<|endoftext|>" and v.tokens[1] == "<fim_prefix>" and v.tokens[6] == "<file_sep>"
    assert v.token_types == [3] * 19 + [1] * (size - 19)
    assert all(len(m.split(" ")) == 2 for m in v.merges)
    # every merge result is a token, so HF can rebuild the model from the GGUF data
    vocab = set(v.tokens)
    assert all(m.replace(" ", "") in vocab for m in v.merges)


def test_code_vocab_cache_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    fresh = code_tokenizer.train_code_vocab.__wrapped__(301)
    cached = tmp_path / "llmctl" / "test-tokenizers" / "vocab-301-v1.json"
    assert cached.is_file()
    assert code_tokenizer.train_code_vocab.__wrapped__(301) == fresh
    assert train_code_vocab(301) == fresh  # the user's cache, trained in the same way
    with pytest.raises(ValueError, match="at least"):
        train_code_vocab(299)


# --- generated models --------------------------------------------------------------------------


def _expected_tensors(arch: str, E: int, F: int, L: int, kv: int, hd: int, V: int, ctx: int) -> dict[str, list[int]]:
    out = {
        "token_embd.weight": [V, E],
        "output_norm.weight": [E],
        "output_norm.bias": [E],
    }
    if arch == "starcoder":
        out["position_embd.weight"] = [ctx, E]
    for i in range(L):
        b = f"blk.{i}."
        proj = {"attn_qkv": E + 2 * hd} if arch == "starcoder" else {"attn_q": E, "attn_k": kv * hd, "attn_v": kv * hd}
        proj |= {"attn_output": E, "ffn_up": F}
        for name, n_out in proj.items():
            out[b + name + ".weight"] = [n_out, E]
            out[b + name + ".bias"] = [n_out]
        out[b + "ffn_down.weight"] = [E, F]
        out[b + "ffn_down.bias"] = [E]
        for n in ("attn_norm", "ffn_norm"):
            out[b + n + ".weight"] = [E]
            out[b + n + ".bias"] = [E]
    return out


@pytest.mark.parametrize("arch", ["starcoder2", "starcoder"])
@pytest.mark.parametrize("wtype", ["f32", "f16", "q8_0", "q4_0"])
def test_gguf_layout(tmp_path: Path, arch: str, wtype: str) -> None:
    path = make_model(tmp_path / "m.gguf", arch=arch, wtype=wtype)
    r = gguf.GGUFReader(path)
    kv = 1 if arch == "starcoder" else 2
    expect = _expected_tensors(arch, 64, 256, 2, kv, 16, 1000, 512)
    got = _tensors(r)
    assert {k: v[1] for k, v in got.items()} == expect
    for name, (tname, shape) in got.items():
        matrix = len(shape) == 2 and name != "position_embd.weight"
        assert tname == (wtype.upper() if matrix else "F32"), name
    a = arch
    assert _field(r, "general.architecture") == arch
    assert _field(r, "general.file_type") == {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7}[wtype]
    assert _field(r, f"{a}.context_length") == 512
    assert _field(r, f"{a}.embedding_length") == 64
    assert _field(r, f"{a}.block_count") == 2
    assert _field(r, f"{a}.feed_forward_length") == 256
    assert _field(r, f"{a}.attention.head_count") == 4
    assert _field(r, f"{a}.attention.head_count_kv") == kv
    assert _field(r, f"{a}.attention.layer_norm_epsilon") == pytest.approx(1e-5)
    assert (f"{a}.rope.freq_base" in r.fields) == (arch == "starcoder2")
    K = gguf.Keys.Tokenizer
    assert _field(r, K.MODEL) == "gpt2"
    assert _field(r, K.PRE) == "starcoder"
    vocab = train_code_vocab(1000)
    assert _field(r, K.LIST) == vocab.tokens
    assert _field(r, K.TOKEN_TYPE) == vocab.token_types
    assert r.fields[K.TOKEN_TYPE].types == [
        gguf.GGUFValueType.ARRAY,
        gguf.GGUFValueType.INT32,
    ]
    assert _field(r, K.MERGES) == vocab.merges
    assert _field(r, K.BOS_ID) == 0 and _field(r, K.EOS_ID) == 0
    assert _field(r, K.ADD_BOS) is False
    assert K.PAD_ID not in r.fields
    fim = {
        K.FIM_PRE_ID: 1,
        K.FIM_MID_ID: 2,
        K.FIM_SUF_ID: 3,
        K.FIM_PAD_ID: 4,
        K.FIM_REP_ID: 5,
        K.FIM_SEP_ID: 6,
    }
    assert {k: _field(r, k) for k in fim} == fim


def test_presets_overrides_and_head_type(tmp_path: Path) -> None:
    path = make_model(
        tmp_path / "m.gguf",
        preset="small",
        wtype="q4_0",
        head_type="q6_k",
        untied=True,
        n_layer=1,
        vocab=333,
        rope_theta=5e5,
    )
    r = gguf.GGUFReader(path)
    got = _tensors(r)
    assert got["token_embd.weight"] == ("Q4_0", [333, 256])
    assert got["output.weight"] == ("Q6_K", [333, 256])
    assert got["blk.0.attn_k.weight"] == ("Q4_0", [64, 256])
    assert "blk.1.attn_q.weight" not in got
    assert _field(r, "starcoder2.rope.freq_base") == 5e5
    assert _field(r, "general.file_type") == 2
    tied = gguf.GGUFReader(make_model(tmp_path / "t.gguf", wtype="q4_0", head_type="q6_k", n_embd=256))
    assert _tensors(tied)["token_embd.weight"] == ("Q6_K", [1000, 256])
    assert "output.weight" not in _tensors(tied)


def test_random_blocks_have_target_scale(tmp_path: Path) -> None:
    """Dequantized with gguf-py, generated blocks have the intended element std."""
    stds = {}
    for wtype, head in (("q8_0", "q6_k"), ("q4_0", "q8_0"), ("f16", "q4_0")):
        r = gguf.GGUFReader(make_model(tmp_path / f"{wtype}.gguf", preset="small", wtype=wtype, head_type=head))
        for t in r.tensors:
            if t.name in (
                "token_embd.weight",
                "blk.0.ffn_up.weight",
                "blk.0.ffn_down.weight",
            ):
                x = gguf.quants.dequantize(t.data, t.tensor_type)
                stds[(t.tensor_type.name, t.name)] = float(x.std()) * (x.shape[-1] ** 0.5 if "blk" in t.name else 1)
                assert abs(float(x.mean())) < 0.05 * float(x.std())
    assert len(stds) == 9
    for key, std in stds.items():
        assert std == pytest.approx(1.0, rel=0.05), key


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    kw: dict[str, Any] = {
        "arch": "starcoder",
        "wtype": "q4_0",
        "head_type": "q8_0",
        "n_ctx": 64,
    }
    a = make_model(tmp_path / "a.gguf", seed=3, **kw).read_bytes()
    b = make_model(tmp_path / "b.gguf", seed=3, **kw).read_bytes()
    c = make_model(tmp_path / "c.gguf", seed=4, **kw).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--type", "q8_0", "--n-embd", "40", "--n-head", "4"],
            "--n-embd 40 is not a multiple of 32",
        ),
        (["--type", "q4_0", "--head-type", "q6_k"], "required by head type q6_k"),
        (["--n-embd", "60", "--n-head", "8"], "not a multiple of --n-head"),
        (["--arch", "starcoder", "--n-head-kv", "2"], "needs --n-head-kv 1"),
        (["--n-head-kv", "3"], "not a multiple of --n-head-kv"),
        (["--vocab", "100"], "at least 300"),
        (["--n-layer", "0"], "--n-layer must be a positive integer"),
        (["--rope-theta", "-1"], "--rope-theta must be positive"),
        (["--seed", "-1"], "--seed must be a non-negative"),
        (["--preset", "huge"], "invalid choice"),
        (["--type", "q5_0"], "invalid choice"),
        (["-o", "/nonexistent-dir/x.gguf"], "cannot write"),
    ],
)
def test_cli_errors(args: list[str], message: str) -> None:
    p = subprocess.run(
        [sys.executable, "-m", "runtime.testing.make_model", *args],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2
    assert message in p.stderr
    assert "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("python -m runtime.testing.make_model: error:")


def test_cli_writes_file(tmp_path: Path) -> None:
    out = tmp_path / "cli.gguf"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "runtime.testing.make_model",
            "--arch",
            "starcoder",
            "--type",
            "q8_0",
            "--seed",
            "5",
            "-o",
            str(out),
        ],
        cwd=ROOT,
        check=False,
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert "wrote" in p.stderr
    assert out.read_bytes() == make_model(tmp_path / "api.gguf", arch="starcoder", wtype="q8_0", seed=5).read_bytes()


# --- llama.cpp ---------------------------------------------------------------------------------


@pytest.fixture
def load_llama(llama_oracle: Callable[..., Any]) -> Callable[[Path], Any]:
    """llama.cpp on a file (see tests/conftest.py for how it is configured)."""
    return lambda path: llama_oracle(path, n_ctx=256)


LLAMA_CASES = [
    ("f32", None, {}),
    ("f16", None, {}),
    ("q8_0", None, {}),
    ("q4_0", None, {}),
    ("q4_0", "q6_k", {"n_embd": 256}),
    ("q8_0", "q6_k", {"n_embd": 256, "untied": True}),
]


@pytest.mark.parametrize("arch", ["starcoder2", "starcoder"])
@pytest.mark.parametrize("wtype, head, extra", LLAMA_CASES)
def test_llama_cpp_runs(
    tmp_path: Path,
    load_llama: Callable[[Path], Any],
    arch: str,
    wtype: str,
    head: str | None,
    extra: dict[str, Any],
) -> None:
    llm = load_llama(make_model(tmp_path / "m.gguf", arch=arch, wtype=wtype, head_type=head, **extra))
    assert llm.n_vocab() == 1000
    tokens = llm.tokenize(CODE, add_bos=False, special=False)
    assert tokens == hf_tokenizer(train_code_vocab(1000)).encode(CODE.decode(), add_special_tokens=False).ids
    llm.eval(tokens)
    logits = np.array(llm.scores[: llm.n_tokens])
    assert logits.shape == (len(tokens), 1000)
    assert np.isfinite(logits).all()
    assert 2.5 < float(logits.std(axis=1).mean()) < 6  # LM head scaled for logit std ~4
    # a random model must not just predict its own input token
    assert (logits.argmax(axis=1) == np.array(tokens)).mean() < 0.5


def test_llama_cpp_tokenizer_matches_hf(tmp_path: Path, load_llama: Callable[[Path], Any]) -> None:
    llm = load_llama(make_model(tmp_path / "m.gguf", preset="small", n_layer=1))
    hf = hf_tokenizer(train_code_vocab(4099))
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]
    texts = [CODE, *MORE_CODE, *(f.read_bytes()[:3000] for f in files)]
    for text in texts:
        s = text.decode("utf-8", errors="ignore")
        assert llm.tokenize(s.encode(), add_bos=False, special=False) == hf.encode(s, add_special_tokens=False).ids
    fim = "<fim_prefix>def f():\n<fim_suffix>\n<fim_middle>"
    assert llm.tokenize(fim.encode(), add_bos=False, special=True)[:1] == [1]
    assert hf.encode(fim, add_special_tokens=False).ids == llm.tokenize(fim.encode(), add_bos=False, special=True)
