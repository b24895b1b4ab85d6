"""The F16 key/value cache: all of it allocated once, filled position by position (by the layers' C
loop, runtime/kernels/forward.c)."""

from __future__ import annotations

import mmap

import numpy as np

from runtime.config import ModelConfig


class KVCache:
    """k[layer] and v[layer] are fp16 bits shaped [n_ctx, n_head_kv, head_dim].

    Both live in anonymous mappings of zero pages, so resident memory grows only with the
    positions used. (np.zeros would not do: NumPy asks for transparent huge pages on large
    arrays, and a 2 MiB page per layer becomes resident at the first position written: a 256-token
    prompt made 58 of the 63 MiB of a 2048-position StarCoder2-3B cache resident.)
    """

    def __init__(self, cfg: ModelConfig, n_ctx: int) -> None:
        shape = (cfg.n_layer, n_ctx, cfg.n_head_kv, cfg.head_dim)
        self.n_ctx = n_ctx
        self.k = _zero_pages(shape)
        self.v = _zero_pages(shape)
        self.n_past = 0  # positions 0 .. n_past-1 hold valid keys and values

    def reset(self) -> None:
        self.n_past = 0

    @property
    def n_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def _zero_pages(shape: tuple[int, ...]) -> np.ndarray:
    """A zeroed uint16 array in its own anonymous mapping (unmapped when the array is freed)."""
    n_bytes = int(np.prod(shape)) * 2
    return np.frombuffer(mmap.mmap(-1, max(n_bytes, 1)), dtype=np.uint16, count=n_bytes // 2).reshape(shape)
