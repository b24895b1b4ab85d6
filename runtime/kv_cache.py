"""The F16 key/value cache: all of it allocated once, filled position by position."""

from __future__ import annotations

import numpy as np

from runtime.config import ModelConfig


class KVCache:
    """k[layer] and v[layer] are fp16 bits shaped [n_ctx, n_head_kv, head_dim].

    np.zeros maps fresh pages lazily, so resident memory grows only with the positions used.
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int) -> None:
        shape = (cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim)
        self.n_ctx = n_ctx
        self.k = np.zeros(shape, dtype=np.uint16)
        self.v = np.zeros(shape, dtype=np.uint16)
        self.n_past = 0  # positions 0 .. n_past-1 hold valid keys and values

    def store(self, layer: int, pos0: int, k: np.ndarray, v: np.ndarray) -> None:
        """Write float32 k, v [T, n_head_kv, head_dim] at positions pos0.. as fp16 (round to nearest even)."""
        t = k.shape[0]
        self.k[layer, pos0 : pos0 + t] = k.astype(np.float16).view(np.uint16)
        self.v[layer, pos0 : pos0 + t] = v.astype(np.float16).view(np.uint16)

    def reset(self) -> None:
        self.n_past = 0

    @property
    def n_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes
