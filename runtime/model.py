"""StarCoder2 and StarCoder (gpt_bigcode) forward passes over memory-mapped GGUF weights.

Weights are loaded once as views into the file (no copies, no dequantization). The layers run
in one C call (`_kernels.LayerStack`, runtime/kernels/forward.c, which reads top to bottom like
the math); Python looks up the embeddings and RoPE angles before it and runs the LM head after.
Nearly all time goes to the quantized matmuls.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime import ops
from runtime.config import ModelConfig
from runtime.errors import GGUFError, UnsupportedModelError
from runtime.ggml_types import BLOCK_SIZE, GGMLType
from runtime.gguf import GGUFFile
from runtime.kernels import _kernels
from runtime.kv_cache import KVCache
from runtime.ops import Linear
from runtime.repack import CATCH_UP_ROWS, BackgroundRepack, ForwardLock, repackable, types_to_repack


@dataclass(frozen=True)
class Norm:
    weight: np.ndarray  # float32 [E]
    bias: np.ndarray  # float32 [E]


@dataclass(frozen=True)
class Block:
    attn_norm: Norm
    wq: Linear | None  # starcoder2: separate projections
    wk: Linear | None
    wv: Linear | None
    wqkv: Linear | None  # starcoder: fused [E + 2*hd, E]
    wo: Linear
    ffn_norm: Norm
    ffn_up: Linear
    ffn_down: Linear


class _Loader:
    """Finds tensors by name and checks their shape and type, naming the tensor when wrong.
    own_vectors: float32 vectors are copied out of the file (repacking drops matrices' pages,
    and reading a vector next to one would map them back: runtime/repack.py)."""

    def __init__(self, f: GGUFFile, own_vectors: bool = False) -> None:
        self.f = f
        self.own_vectors = own_vectors

    def _get(self, name: str, shape: tuple[int, ...]):  # type: ignore[no-untyped-def]
        info = self.f.tensors.get(name)
        if info is None:
            raise GGUFError(f"{self.f.path}: tensor {name!r} is missing")
        if info.shape != shape:
            raise GGUFError(f"{self.f.path}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}")
        return info

    def vector(self, name: str, n: int) -> np.ndarray:
        info = self._get(name, (n,))
        if info.ggml_type == GGMLType.F32:
            return self.f.tensor(name).copy() if self.own_vectors else self.f.tensor(name)
        if info.ggml_type == GGMLType.F16:
            return self.f.tensor(name).astype(np.float32)
        raise UnsupportedModelError(
            f"{self.f.path}: tensor {name!r} is {info.ggml_type.name}; vectors must be F32 or F16"
        )

    def norm(self, prefix: str, n: int) -> Norm:
        return Norm(self.vector(f"{prefix}.weight", n), self.vector(f"{prefix}.bias", n))

    def linear(self, prefix: str, n_out: int, n_in: int, bias: bool = True) -> Linear:
        name = f"{prefix}.weight"
        info = self._get(name, (n_out, n_in))
        if info.ggml_type not in ops.MATMUL_TYPES:
            raise UnsupportedModelError(
                f"{self.f.path}: tensor {name!r} has type {info.ggml_type.name}; supported: "
                + ", ".join(t.name for t in ops.MATMUL_TYPES)
            )
        raw = self.f.raw(name).reshape(n_out, -1)
        b = self.vector(f"{prefix}.bias", n_out) if bias else None
        return Linear(raw, info.ggml_type, n_in, b, name=name)


# A Block's matrices: (its field, LayerStack's name for it)
MATRICES = (
    ("wq", "wq"),
    ("wk", "wk"),
    ("wv", "wv"),
    ("wqkv", "wqkv"),
    ("wo", "wo"),
    ("ffn_up", "up"),
    ("ffn_down", "down"),
)


def _linear_spec(lin: Linear | None) -> tuple[int, np.ndarray, np.ndarray | None] | None:
    return None if lin is None else (lin.kernel_type, lin.rows, lin.bias)


def _layer_spec(b: Block) -> dict[str, object]:
    """One layer as _kernels.LayerStack takes it."""
    norms = {"attn_norm": (b.attn_norm.weight, b.attn_norm.bias), "ffn_norm": (b.ffn_norm.weight, b.ffn_norm.bias)}
    return norms | {key: _linear_spec(getattr(b, field)) for field, key in MATRICES}


class Transformer:
    """Weights plus the forward pass. `forward` appends tokens to a KVCache and returns logits."""

    def __init__(self, f: GGUFFile, cfg: ModelConfig, n_threads: int, *, repack: bool | None = None) -> None:
        """repack: repack the layers' Q4_0 and Q8_0 matrices on a thread of their own while the
        model serves (runtime/repack.py; `repacking`; a pass of CATCH_UP_ROWS rows or more
        repacks those left before it runs), those of the types the kernel set in use has a tile
        for; None (default) or True does, False does not. The same results either way."""
        self.cfg = cfg
        self.n_threads = n_threads
        repack_types = types_to_repack(repack)
        load = _Loader(f, own_vectors=bool(repack_types))
        E, F, V = cfg.n_embd, cfg.n_ff, cfg.n_vocab
        self.token_embd = load.linear("token_embd", V, E, bias=False)
        self.position_embd = (
            load.linear("position_embd", cfg.n_ctx_train, E, bias=False) if cfg.arch == "starcoder" else None
        )
        self.blocks: list[Block] = []
        hd, kv = cfg.head_dim, cfg.n_embd_kv
        for i in range(cfg.n_layer):
            p = f"blk.{i}"
            wq: Linear | None
            wk: Linear | None
            wv: Linear | None
            wqkv: Linear | None
            if cfg.arch == "starcoder2":
                wq, wk, wv = (
                    load.linear(f"{p}.attn_q", E, E),
                    load.linear(f"{p}.attn_k", kv, E),
                    load.linear(f"{p}.attn_v", kv, E),
                )
                wqkv = None
            else:
                wq = wk = wv = None
                wqkv = load.linear(f"{p}.attn_qkv", E + 2 * hd, E)
            self.blocks.append(
                Block(
                    attn_norm=load.norm(f"{p}.attn_norm", E),
                    wq=wq,
                    wk=wk,
                    wv=wv,
                    wqkv=wqkv,
                    wo=load.linear(f"{p}.attn_output", E, E),
                    ffn_norm=load.norm(f"{p}.ffn_norm", E),
                    ffn_up=load.linear(f"{p}.ffn_up", F, E),
                    ffn_down=load.linear(f"{p}.ffn_down", E, F),
                )
            )
        self.output_norm = load.norm("output_norm", E)
        # The LM head is tied to the embedding when output.weight is absent.
        self.output = load.linear("output", V, E, bias=False) if "output.weight" in f.tensors else self.token_embd
        for lin in (self.token_embd, self.output):
            block = BLOCK_SIZE[lin.ggml_type][0]
            if E % block:
                raise UnsupportedModelError(
                    f"{f.path}: embedding size {E} is not a multiple of {lin.ggml_type.name} blocks"
                )
        self.kq_scale = np.float32(1.0) / np.float32(math.sqrt(np.float32(hd)))
        layers = [_layer_spec(b) for b in self.blocks]
        kq_scale = float(self.kq_scale)
        self.layers = _kernels.LayerStack(E, F, cfg.n_head, cfg.n_head_kv, hd, cfg.norm_eps, kq_scale, layers)
        # float64 [len(_kernels.LAYER_OPS)]: if set, every forward adds each layer op's seconds to it
        self.op_seconds: np.ndarray | None = None
        self._rope_cache: tuple[np.ndarray, np.ndarray] | None = None
        self._forward_lock = ForwardLock()  # held by each forward pass and each repacked matrix's takeover
        self._matrix_at: dict[str, tuple[int, str, str]] = {}  # tensor name: (layer, Block field, LayerStack name)
        jobs = []
        for il, layer in enumerate(self.blocks):
            for field, key in MATRICES:
                lin = getattr(layer, field)
                if lin is not None and lin.ggml_type in repack_types and repackable(f.tensors[lin.name]):
                    self._matrix_at[lin.name] = (il, field, key)
                    jobs.append(lin)
        self.repacking = BackgroundRepack(f, jobs, self._take_over, self._forward_lock) if jobs else None

    def _take_over(self, job: Linear, copy: np.ndarray) -> None:
        """The repacked copy of matrix `job` serves from now on (called with the forward lock held)."""
        il, field, key = self._matrix_at[job.name]
        lin = dataclasses.replace(job, rows=copy, repacked=True)
        self.layers.set_linear(il, key, (lin.kernel_type, lin.rows, lin.bias))
        field_value: dict[str, Any] = {field: lin}
        self.blocks[il] = dataclasses.replace(self.blocks[il], **field_value)

    def close(self) -> None:
        """Stop repacking (before the file is unmapped)."""
        if self.repacking is not None:
            self.repacking.stop()

    def rope(self, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        if self._rope_cache is None or self._rope_cache[0].shape[0] < n_ctx:
            self._rope_cache = ops.rope_tables(n_ctx, self.cfg.head_dim, self.cfg.rope_freq_base)
        return self._rope_cache

    def forward(self, ids: np.ndarray, cache: KVCache, *, all_logits: bool = False) -> np.ndarray:
        """Run tokens `ids` at positions cache.n_past.. and advance the cache.
        Returns logits [T, V] (all_logits) or [1, V] for the last token only."""
        return self.forward_batch([(cache, ids)], all_logits=all_logits)

    def forward_batch(self, segments: Sequence[tuple[KVCache, np.ndarray]], *, all_logits: bool = False) -> np.ndarray:
        """Run several sequences in one pass: each segment is a cache and the tokens to append to it.

        The matmuls see all segments' rows at once, so every weight is read once per call however
        many sequences there are (this is what batched serving gains); attention runs per segment
        over its own cache. Returns logits for every row (all_logits) or for each segment's last row,
        in segment order."""
        cfg, nt = self.cfg, self.n_threads
        lengths = [len(ids) for _, ids in segments]
        for cache, ids in segments:
            if cache.n_past + len(ids) > cache.n_ctx:
                raise ValueError(f"forward: {cache.n_past}+{len(ids)} positions exceed the cache of {cache.n_ctx}")
        ids = np.concatenate([np.asarray(t, dtype=np.int64) for _, t in segments])
        positions = np.concatenate([np.arange(c.n_past, c.n_past + len(t)) for c, t in segments])
        starts = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        x = self.token_embd.lookup(ids)  # [T, E]
        if self.position_embd is not None:
            x += self.position_embd.lookup(positions)
        cos = sin = None
        if cfg.arch == "starcoder2":
            cos_all, sin_all = self.rope(max(c.n_ctx for c, _ in segments))
            cos, sin = cos_all[positions], sin_all[positions]
        cache_rows = [(c.k, c.v, c.n_past, n) for (c, _), n in zip(segments, lengths, strict=True)]
        with self._forward_lock:
            if self.repacking is not None and len(ids) >= CATCH_UP_ROWS:
                self.repacking.catch_up(nt)
            self.layers.forward(x, cache_rows, cos, sin, nt, self.op_seconds)
        for (cache, _), n in zip(segments, lengths, strict=True):
            cache.n_past += n
        if not all_logits:
            x = x[starts[1:] - 1]
        x = ops.layer_norm(x, self.output_norm.weight, self.output_norm.bias, cfg.norm_eps, nt)
        return self.output(np.ascontiguousarray(x), nt)
