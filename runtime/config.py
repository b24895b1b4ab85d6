"""ModelConfig: the hyperparameters of a StarCoder / StarCoder2 GGUF, read and checked once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from runtime.errors import GGUFError, UnsupportedModelError
from runtime.gguf import GGUFFile

SUPPORTED_ARCHITECTURES = ("starcoder2", "starcoder")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "starcoder2" (GQA, RoPE) or "starcoder" (gpt_bigcode: multi-query, learned positions)
    name: str  # general.name, for humans
    n_vocab: int  # rows of token_embd.weight
    n_ctx_train: int  # {arch}.context_length: longest context the model was trained for
    n_embd: int  # hidden size E
    n_layer: int  # transformer blocks
    n_ff: int  # MLP inner size F
    n_head: int  # query heads
    n_head_kv: int  # key/value heads (1 for starcoder, n_head / group for GQA)
    norm_eps: float  # LayerNorm epsilon
    rope_freq_base: float  # RoPE theta (starcoder2 only)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_embd_kv(self) -> int:
        return self.head_dim * self.n_head_kv

    @classmethod
    def from_gguf(cls, f: GGUFFile) -> ModelConfig:
        arch = f.get("general.architecture")
        if arch is None:
            raise GGUFError(f"{f.path}: metadata has no general.architecture; is this a model file?")
        if not isinstance(arch, str):
            raise GGUFError(f"{f.path}: general.architecture must be a string, got {arch!r}")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{f.path}: architecture {arch!r} is not supported; llmctl's runtime runs "
                f"{' and '.join(SUPPORTED_ARCHITECTURES)} models"
            )

        def key(suffix: str, default: Any = None) -> Any:
            k = f"{arch}.{suffix}"
            v = f.get(k, default)
            if v is None:
                raise GGUFError(f"{f.path}: required metadata key {k!r} is missing")
            if isinstance(default, float):  # a real number (epsilon, RoPE base); the rest are counts
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < math.inf:
                    raise GGUFError(f"{f.path}: metadata key {k!r} must be a non-negative number, got {v!r}")
                return float(v)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise GGUFError(f"{f.path}: metadata key {k!r} must be a positive integer, got {v!r}")
            return v

        embd = f.tensors.get("token_embd.weight")
        if embd is None:
            raise GGUFError(f"{f.path}: tensor 'token_embd.weight' is missing")
        n_head = key("attention.head_count")
        cfg = cls(
            arch=arch,
            name=str(f.get("general.name", f.path.stem)),
            n_vocab=embd.shape[0],
            n_ctx_train=key("context_length"),
            n_embd=key("embedding_length"),
            n_layer=key("block_count"),
            n_ff=key("feed_forward_length"),
            n_head=n_head,
            n_head_kv=key("attention.head_count_kv", n_head if arch == "starcoder2" else 1),
            norm_eps=key("attention.layer_norm_epsilon", 1e-5),
            rope_freq_base=key("rope.freq_base", 10000.0) if arch == "starcoder2" else 0.0,
        )
        if cfg.n_embd % cfg.n_head or cfg.n_head % cfg.n_head_kv:
            raise GGUFError(
                f"{f.path}: inconsistent heads: embedding {cfg.n_embd}, {cfg.n_head} heads, "
                f"{cfg.n_head_kv} kv heads (each must divide the one before)"
            )
        if arch == "starcoder" and cfg.n_head_kv != 1:
            raise UnsupportedModelError(f"{f.path}: starcoder models use one kv head, this has {cfg.n_head_kv}")
        if arch == "starcoder2" and cfg.head_dim % 2:
            raise GGUFError(f"{f.path}: head size {cfg.head_dim} is odd; RoPE rotates pairs of values")
        return cfg
