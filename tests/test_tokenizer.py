"""The runtime's tokenizer gives the same ids as llama.cpp, round-trips text and streams whole characters."""

from __future__ import annotations

import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.gguf import read_gguf
from runtime.testing.make_model import make_model
from runtime.tokenizer import CodeTokenizer

N_FILES = 320
MAX_CHARS = 2500


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model with the 4099-token code vocabulary (StarCoder2's special tokens at 0..18)."""
    return make_model(tmp_path_factory.mktemp("tok") / "small.gguf", preset="small", n_layer=1)


@pytest.fixture(scope="module")
def tok(model_path: Path) -> CodeTokenizer:
    with read_gguf(model_path) as f:
        return CodeTokenizer.from_gguf(f)


@pytest.fixture(scope="module")
def llama(model_path: Path, llama_oracle: Callable[..., Any]) -> Iterator[Any]:
    """llama.cpp's vocabulary only (see tests/conftest.py for how it is configured)."""
    llm = llama_oracle(model_path, vocab_only=True)
    assert llm.n_vocab() == 4099
    yield llm
    llm.close()


def source_texts() -> list[tuple[str, str]]:
    """The first N_FILES stdlib .py files (sorted by relative path), each cut to MAX_CHARS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            out.append((path.relative_to(root).as_posix(), text[:MAX_CHARS]))
        if len(out) == N_FILES:
            break
    return out


EDGE_CASES = {
    "empty": "",
    "space": " ",
    "cjk": "def 函数(参数):\n    return '你好，世界' + 'こんにちは' + '안녕하세요'",
    "combining marks": "e\u0301 a\u0308 n\u0303 \u1e9b\u0323 Z\u0351\u0334\u0311\u0350a\u0344l\u0352g\u0310o",
    "emoji": "print('😀🚀🐍') # 👍🏽 done",
    "zwj sequences": "family = '👨‍👩‍👧‍👦'; flag = '🏳️‍🌈'; chef = '🧑🏿‍🍳'",
    "flags": "🇫🇷🇩🇪🇯🇵",
    "digit runs": "x = 1234567890123 + 0.000001e-10 - 0x1F2E3D 99999",
    "whitespace runs": "a    b\n\n\n\n        c      \n   \t  \n",
    "tabs and crlf": "if x:\r\n\tprint(x)\r\n\t\treturn\r\n\r\n",
    "trailing spaces": "x = 1   \n   ",
    "mixed scripts": "Ελληνικά русский עברית العربية हिन्दी ไทย",
    "control chars": "a\x00b\x07c\x1bd\x7f",
    "lone specials": "<fim_prefix>",
    "fim prompt": "<fim_prefix>def f(x):\n    <fim_suffix>\n    return y<fim_middle>",
    "specials in text": "a<|endoftext|>b <file_sep> c<repo_name>d\n<fim_pad>",
    "adjacent specials": "<fim_prefix><fim_suffix><fim_middle><|endoftext|><|endoftext|>",
    "almost specials": "<fim_prefix <fim_prefi> <|endoftext| <fim_prefix>>",
    "special with spaces": "  <fim_prefix>  x  <fim_suffix>  ",
    "long token": "a" * 300 + "_" * 100,
    "byte soup": "".join(chr(c) for c in range(0x20, 0x250)),
    "supplementary planes": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛 \U00010000\U0010fffd",
}


@pytest.mark.parametrize("special", [True, False])
@pytest.mark.parametrize("name", list(EDGE_CASES))
def test_edge_cases_match_llama_cpp(tok: CodeTokenizer, llama: Any, name: str, special: bool) -> None:
    text = EDGE_CASES[name]
    ids = tok.encode(text, special=special, add_bos=False)
    assert ids == llama.tokenize(text.encode(), add_bos=False, special=special)
    assert tok.decode(ids) == text
    assert bytes(llama.detokenize(ids, special=True)) == text.encode()


def test_special_tokens_are_parsed_only_when_asked(tok: CodeTokenizer) -> None:
    text = "<fim_prefix>x<fim_suffix>"
    assert tok.encode(text, special=True) == [1, *tok.encode("x"), 3]
    plain = tok.encode(text, special=False)
    assert 1 not in plain and 3 not in plain and len(plain) > 3
    assert tok.encode("", special=True) == tok.encode("", special=False) == []


def test_source_files_match_llama_cpp(tok: CodeTokenizer, llama: Any) -> None:
    texts = source_texts()
    assert len(texts) == N_FILES
    n_tokens = 0
    for name, text in texts:
        for special in (False, True):
            ids = tok.encode(text, special=special, add_bos=False)
            assert ids == llama.tokenize(text.encode(), add_bos=False, special=special), (name, special)
        assert tok.decode(ids) == text, name
        n_tokens += len(ids)
    assert n_tokens > 100_000  # the files were really tokenized, not mostly empty


def test_every_token_stands_for_the_bytes_llama_cpp_gives_it(tok: CodeTokenizer, llama: Any) -> None:
    import ctypes

    import llama_cpp

    buf = ctypes.create_string_buffer(1024)  # llama-cpp-python's own helper cuts pieces at 32 bytes
    for i in range(tok.n_vocab):
        n = llama_cpp.llama_token_to_piece(llama._model.vocab, i, buf, len(buf), 0, True)
        assert 0 <= n <= len(buf) and tok.token_bytes(i) == buf.raw[:n], i


def test_add_bos(tok: CodeTokenizer) -> None:
    assert tok.add_bos is False and tok.bos_id == 0
    assert tok.encode("x", add_bos=True) == [0, *tok.encode("x")]
    assert tok.encode("x")[0] != 0


# --- streaming detokenization ------------------------------------------------------------------

STREAM_TEXTS = [
    "# 你好世界 😀👨‍👩‍👧‍👦🏳️‍🌈 \u00e9\u0301 🇯🇵 x",
    "s = '日本語のテキスト、中文文本、한국어 텍스트' * 3  # 🐍🐍🐍",
    "".join(chr(c) for c in range(0x1F600, 0x1F650)),
    "\U0001d518\U0001d52b\U0001d526 mixed ascii 🧑🏿‍🍳 and 👍🏽👍🏿",
]


def valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def stream(tok: CodeTokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_never_splits_a_character(tok: CodeTokenizer, text: str) -> None:
    ids = tok.encode(text)
    # some tokens hold part of a character, so the test means something
    assert sum(not valid_utf8(tok.token_bytes(i)) for i in ids) >= 2
    pieces = stream(tok, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert sum(1 for p in pieces if p == "") > 0  # some tokens had to wait for the next one


@settings(max_examples=200, deadline=None, database=None)
@given(ids=st.lists(st.integers(0, 4098), max_size=40))
def test_stream_equals_decode_for_any_ids(tok: CodeTokenizer, ids: list[int]) -> None:
    """Even ids that do not form valid UTF-8: the stream replaces exactly what decode replaces."""
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@settings(max_examples=150, deadline=None, database=None)
@given(text=st.text(max_size=60))
def test_roundtrip_any_text(tok: CodeTokenizer, text: str) -> None:
    for special in (True, False):
        ids = tok.encode(text, special=special)
        assert tok.decode(ids) == text
    pieces = stream(tok, tok.encode(text))
    assert "".join(pieces) == text
    if "\ufffd" not in text:
        assert all("\ufffd" not in p for p in pieces)
