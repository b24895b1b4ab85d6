"""The forward pass's building blocks. Matmuls (with their bias, GELU and residual), attention,
LayerNorm and RoPE run in the C kernels, rounding like ggml (float32 throughout)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.ggml_types import GGMLType
from runtime.kernels import _kernels
from runtime.repack import LAYOUTS

MATMUL_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q6_K)


@dataclass(frozen=True)
class Linear:
    """y = x @ W.T (+ b). W stays in its file type: raw rows straight from the memory map."""

    rows: np.ndarray  # uint8 [n_out, row_bytes], a view into the mapped file (or its repacked copy)
    ggml_type: GGMLType
    n_in: int
    bias: np.ndarray | None = None  # float32 [n_out]
    repacked: bool = False  # Q4_0 or Q8_0 rows in the kernels' repacked layout (runtime/repack.py)
    name: str = ""  # the tensor's name in the file

    @property
    def n_out(self) -> int:
        return int(self.rows.shape[0])

    @property
    def kernel_type(self) -> int:
        """The matmul's weight type: the ggml type, or the repacked layout's."""
        return LAYOUTS[self.ggml_type].kernel_type if self.repacked else int(self.ggml_type)

    def __call__(
        self, x: np.ndarray, n_threads: int, *, gelu: bool = False, add: np.ndarray | None = None
    ) -> np.ndarray:
        """x @ W.T + b, then gelu_tanh if `gelu`, then + `add` (a residual [M, n_out]), all in the
        matmul's threads as they finish their outputs (the bits of the separate steps)."""
        out = np.empty((x.shape[0], self.n_out), dtype=np.float32)
        _kernels.matmul(self.kernel_type, self.rows, self.n_in, x, out, n_threads, self.bias, gelu, add)
        return out

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """Dequantized rows `ids` (embedding lookup): float32 [len(ids), n_in]."""
        assert not self.repacked, "embeddings are never repacked"
        out = np.empty((len(ids), self.n_in), dtype=np.float32)
        _kernels.get_rows(int(self.ggml_type), self.rows, self.n_in, np.ascontiguousarray(ids, dtype=np.int64), out)
        return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float, n_threads: int = 1) -> np.ndarray:
    """ggml_norm then *w + b: (x - mean) / sqrt(biased var + eps), rounded as ggml does."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty_like(x)
    _kernels.layer_norm(x.reshape(-1, x.shape[-1]), weight, bias, out.reshape(-1, x.shape[-1]), eps, n_threads)
    return out


def rope_tables(n_ctx: int, head_dim: int, freq_base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [n_ctx, head_dim/2] as ggml_rope_cache_init builds them: theta_i = pos * s^i by
    repeated float32 multiplication, s = powf(base, -2/head_dim), then libm's cosf/sinf."""
    cos, sin = _kernels.rope_table(n_ctx, head_dim, freq_base)
    return cos, sin


def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate pairs (x[i], x[i + hd/2]) of x [T, heads, hd] by the angles of rows cos/sin [T, hd/2],
    in place (x must be C-contiguous float32), with ggml's fused multiply-adds; returns x."""
    _kernels.rope_neox(x, np.ascontiguousarray(cos), np.ascontiguousarray(sin))
    return x
