"""A StarCoder-style byte-level BPE vocabulary trained on the Python standard library.

Test models need a real code vocabulary (merges that fire on source code, StarCoder2's special
tokens) without downloading one. Training is deterministic and cached as JSON.
"""

from __future__ import annotations

import functools
import json
import os
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

CACHE_VERSION = 1
MIN_VOCAB = 300
TOKEN_NORMAL = 1
TOKEN_CONTROL = 3

# StarCoder2's special tokens, in id order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<fim_prefix>",
    "<fim_middle>",
    "<fim_suffix>",
    "<fim_pad>",
    "<repo_name>",
    "<file_sep>",
    "<issue_start>",
    "<issue_comment>",
    "<issue_closed>",
    "<jupyter_start>",
    "<jupyter_text>",
    "<jupyter_code>",
    "<jupyter_output>",
    "<empty_output>",
    "<commit_before>",
    "<commit_msg>",
    "<commit_after>",
    "<reponame>",
)
_SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
}


class CodeVocab(NamedTuple):
    """A trained vocabulary: byte-level token strings (index = id), GGUF token types, merges."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]  # "left right"


def _corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _corpus(n_bytes: int) -> Iterator[str]:
    """Yield stdlib source files in a fixed order until about `n_bytes` were produced."""
    total = 0
    for path in _corpus_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield text
        total += len(text)
        if total >= n_bytes:
            return


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """StarCoder's pre-tokenizer: every digit alone, then the GPT-2 byte-level regex."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )


def _train(vocab_size: int) -> CodeVocab:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=list(SPECIAL_TOKENS),
        show_progress=False,
    )
    # Larger vocabularies need more distinct words to merge.
    tok.train_from_iterator(_corpus(2_000_000 + 250 * vocab_size), trainer=trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    if len(tokens) != vocab_size or "" in tokens:
        raise RuntimeError(f"BPE training produced {len(tokens)} tokens, wanted {vocab_size}")
    if tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
        raise RuntimeError("special tokens did not get ids 0..18")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [TOKEN_CONTROL if i < len(SPECIAL_TOKENS) else TOKEN_NORMAL for i in range(vocab_size)]
    return CodeVocab(tokens, types, merges)


def _cache_path(vocab_size: int) -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llmctl" / "test-tokenizers" / f"vocab-{vocab_size}-v{CACHE_VERSION}.json"


@functools.lru_cache(maxsize=8)
def train_code_vocab(vocab_size: int) -> CodeVocab:
    """Return a code vocabulary of exactly `vocab_size` tokens (trained once, then cached)."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab size must be at least {MIN_VOCAB}, got {vocab_size}")
    path = _cache_path(vocab_size)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        vocab = CodeVocab(data["tokens"], data["token_types"], data["merges"])
        if len(vocab.tokens) == vocab_size == len(vocab.token_types):
            return vocab
    except (OSError, ValueError, KeyError, TypeError):
        pass
    vocab = _train(vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(vocab._asdict(), f, ensure_ascii=False)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return vocab


def hf_tokenizer(vocab: CodeVocab) -> Tokenizer:
    """Build an HF `tokenizers` Tokenizer from a CodeVocab (what llama.cpp should reproduce)."""
    bpe = models.BPE(
        vocab={t: i for i, t in enumerate(vocab.tokens)},
        merges=[(a, b) for a, b in (m.split(" ", 1) for m in vocab.merges)],
    )
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([t for t, ty in zip(vocab.tokens, vocab.token_types, strict=True) if ty == TOKEN_CONTROL])
    return tok
