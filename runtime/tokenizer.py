"""The model's own tokenizer, built from the GGUF vocabulary (gpt2 byte-level BPE, "starcoder"
pre-tokenizer) with the HF `tokenizers` library, plus streaming-safe detokenization."""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from functools import lru_cache
from itertools import repeat

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from runtime.errors import TokenizerError, UnsupportedModelError
from runtime.gguf import GGUFFile

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# Pre-tokenizers that split like StarCoder's (every digit alone, then GPT-2's regex).
STARCODER_PRE = ("starcoder", "refact", None)

# GGUF keys of the fill-in-the-middle tokens, with the token text to fall back on.
FIM_KEYS = {
    "prefix": ("tokenizer.ggml.fim_pre_token_id", "<fim_prefix>"),
    "suffix": ("tokenizer.ggml.fim_suf_token_id", "<fim_suffix>"),
    "middle": ("tokenizer.ggml.fim_mid_token_id", "<fim_middle>"),
    "pad": ("tokenizer.ggml.fim_pad_token_id", "<fim_pad>"),
    "repo": ("tokenizer.ggml.fim_rep_token_id", "<repo_name>"),
    "sep": ("tokenizer.ggml.fim_sep_token_id", "<file_sep>"),
}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-unicode map, inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


@lru_cache(maxsize=1)
def _byte_translation() -> tuple[dict[int, int], re.Pattern[str]]:
    """(`str.translate` table from GPT-2's printable characters to the code points of the bytes they
    stand for, a pattern finding a character outside that alphabet)."""
    decoder = _byte_decoder()
    alphabet = "".join(re.escape(c) for c in decoder)
    return {ord(c): b for c, b in decoder.items()}, re.compile(f"[^{alphabet}]")


def _bad_merge(merges: list[str], vocab: dict[str, int]) -> str | None:
    """What is wrong with the first merge that does not join two tokens of the vocabulary into a
    third, or None."""
    for i, merge in enumerate(merges):
        a, space, b = merge.partition(" ")
        if not (space and a in vocab and b in vocab and a + b in vocab):
            return f"merge {i} ({merge!r}) does not join two tokens of the vocabulary into a third"
    return None


class CodeTokenizer:
    """Text <-> token ids exactly as llama.cpp does for StarCoder-family GGUFs."""

    def __init__(
        self,
        tokens: list[str],
        token_types: list[int],
        merges: list[str],
        *,
        bos_id: int | None,
        eos_id: int | None,
        add_bos: bool = False,
        fim_ids: dict[str, int] | None = None,
        source: str = "<memory>",
    ) -> None:
        if len(token_types) != len(tokens):
            raise TokenizerError(f"{source}: {len(tokens)} tokens but {len(token_types)} token types")
        self.tokens = tokens
        self.token_types = token_types
        self.n_vocab = len(tokens)
        self.bos_id, self.eos_id, self.add_bos = bos_id, eos_id, add_bos
        self.fim_ids = fim_ids or {}
        # a string listed twice keeps its first id, as llama.cpp's vocabulary does
        vocab = dict(zip(reversed(tokens), range(len(tokens) - 1, -1, -1), strict=True))
        pairs = [(a, b) for a, _, b in map(str.partition, merges, repeat(" "))]
        kinds = np.asarray(token_types)
        control = np.flatnonzero(kinds == TOKEN_CONTROL).tolist()
        user = np.flatnonzero(kinds == TOKEN_USER_DEFINED).tolist()
        try:
            # Control tokens are recognised in text only when asked (llama.cpp's parse_special);
            # user-defined tokens always are. Both tokenizers share one BPE model (read-only).
            # The library checks that every merge joins two tokens into a third; the check is
            # repeated here only to name the merge at fault once it has refused one (repeating it
            # up front took 60 ms of the GIL while a server started).
            bpe = models.BPE(vocab=vocab, merges=pairs, fuse_unk=False)
            self._special = self._build(bpe, control + user)
            self._plain = self._build(bpe, user)
        except BaseException as e:  # plain Exceptions, or pyo3's PanicException (a BaseException)
            if not isinstance(e, Exception) and type(e).__name__ != "PanicException":
                raise
            problem = _bad_merge(merges, vocab) or f"vocabulary/merges are inconsistent: {e}"
            raise TokenizerError(f"{source}: {problem}") from None
        # The bytes each token stands for, filled in as tokens are first decoded: working them all
        # out took ~80 ms of the GIL while a server started, for a vocabulary of 49k of which a
        # session decodes a few thousand.
        self._bytes: list[bytes | None] = [None] * len(tokens)
        self.eog_ids = frozenset(
            i
            for i in (eos_id, self.fim_ids.get("pad"), self.fim_ids.get("repo"), self.fim_ids.get("sep"))
            if i is not None
        )

    def _build(self, bpe: models.BPE, added: list[int]) -> Tokenizer:
        tk = Tokenizer(bpe)
        tk.pre_tokenizer = pre_tokenizers.Sequence(  # type: ignore[assignment]
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tk.decoder = decoders.ByteLevel()  # type: ignore[assignment]
        if added:
            tk.add_special_tokens([AddedToken(self.tokens[i], special=True, normalized=False) for i in added])
        return tk

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> CodeTokenizer:
        model = f.get("tokenizer.ggml.model")
        if not isinstance(model, str) or model != "gpt2":
            raise UnsupportedModelError(
                f"{f.path}: tokenizer model {model!r} is not supported; StarCoder models use 'gpt2' (byte-level BPE)"
            )
        pre = f.get("tokenizer.ggml.pre")
        if not isinstance(pre, str | None) or pre not in STARCODER_PRE:
            raise UnsupportedModelError(f"{f.path}: pre-tokenizer {pre!r} is not supported (expected 'starcoder')")
        tokens = f.get("tokenizer.ggml.tokens")
        merges = f.get("tokenizer.ggml.merges")
        if not isinstance(tokens, list) or not tokens:
            raise TokenizerError(f"{f.path}: tokenizer.ggml.tokens is missing or not a list of strings")
        if not isinstance(merges, list):
            raise TokenizerError(f"{f.path}: tokenizer.ggml.merges is missing or not a list of strings")
        types = f.get("tokenizer.ggml.token_type")
        if types is None:
            token_types = [TOKEN_NORMAL] * len(tokens)
        elif isinstance(types, np.ndarray) and types.dtype.kind in "iu":
            token_types = types.tolist()
        else:
            raise TokenizerError(f"{f.path}: tokenizer.ggml.token_type is not an array of integers")
        add_bos = f.get("tokenizer.ggml.add_bos_token", False)
        if not isinstance(add_bos, (bool, int)):
            raise TokenizerError(f"{f.path}: tokenizer.ggml.add_bos_token = {add_bos!r} is not a boolean")

        def token_id(key: str) -> int | None:
            v = f.get(key)
            if v is None:
                return None
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < len(tokens):
                raise TokenizerError(f"{f.path}: {key} = {v!r} is not a token id (vocabulary has {len(tokens)})")
            return v

        fim: dict[str, int] = {}
        for role, (key, text) in FIM_KEYS.items():
            tid = token_id(key)
            if tid is None and text in tokens:
                tid = tokens.index(text)
            if tid is not None:
                fim[role] = tid
        return cls(
            tokens,
            token_types,
            merges,
            bos_id=token_id("tokenizer.ggml.bos_token_id"),
            eos_id=token_id("tokenizer.ggml.eos_token_id"),
            add_bos=bool(add_bos),
            fim_ids=fim,
            source=str(f.path),
        )

    def encode(self, text: str, *, special: bool = True, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`. special=True recognises control tokens such as <fim_prefix>."""
        ids = (self._special if special else self._plain).encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        b = self._bytes[token_id]
        if b is None:
            b = self._bytes[token_id] = self._token_bytes(self.tokens[token_id], self.token_types[token_id])
        return b

    @staticmethod
    def _token_bytes(text: str, kind: int) -> bytes:
        """Byte-level tokens through GPT-2's map (str.translate to latin-1 code points, then
        encode), control and user-defined tokens and any outside that alphabet as their UTF-8."""
        to_latin1, not_byte_level = _byte_translation()
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED) or not_byte_level.search(text):
            return text.encode("utf-8")
        return text.translate(to_latin1).encode("latin-1")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; bytes that do not form valid UTF-8 become U+FFFD."""
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)


class StreamDecoder:
    """Turns token ids into text pieces one at a time without ever splitting a UTF-8 character:
    bytes of an incomplete character are held back until the next token completes it."""

    def __init__(self, tokenizer: CodeTokenizer) -> None:
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
