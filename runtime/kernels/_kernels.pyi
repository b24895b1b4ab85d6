"""Type stubs for the compiled kernels (runtime/kernels/_kernels.pyx)."""

import numpy as np

def use(which: str = "auto") -> None: ...
def active() -> str: ...
def prefetch(where: str = ...) -> str: ...

Q4_0_R16: int

def repacks_q4_0() -> bool: ...
def repack_q4_0(w: np.ndarray, k: int, out: np.ndarray, n_threads: int = 1) -> None: ...
def matmul(
    wtype: int,
    w: np.ndarray,
    k: int,
    x: np.ndarray,
    out: np.ndarray,
    n_threads: int = 1,
    bias: np.ndarray | None = None,
    gelu: bool = False,
    add: np.ndarray | None = None,
) -> None: ...
def vec_dot(wtype: int, w_row: np.ndarray, x: np.ndarray, n_out: int = 1) -> float: ...
def read_sum(buf: np.ndarray, n_threads: int = 1, streams: int = 4) -> int: ...
def get_rows(wtype: int, w: np.ndarray, k: int, rows: np.ndarray, out: np.ndarray) -> None: ...
def attention(
    q: np.ndarray,
    k_cache: np.ndarray,
    v_cache: np.ndarray,
    out: np.ndarray,
    pos0: int,
    scale: float,
    n_threads: int = 1,
) -> None: ...
def rope_table(n_pos: int, hd: int, freq_base: float) -> tuple[np.ndarray, np.ndarray]: ...
def layer_norm(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, out: np.ndarray, eps: float, n_threads: int = 1
) -> None: ...
def gelu(x: np.ndarray, out: np.ndarray, n_threads: int = 1) -> None: ...
def rope_neox(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> None: ...
def quantize_q8_0(x: np.ndarray) -> np.ndarray: ...
def quantize_q8_K(x: np.ndarray) -> np.ndarray: ...
def f32_to_f16(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray: ...
def read_strings(buf: bytes | memoryview, pos: int, count: int) -> tuple[list[str], int]: ...

LAYER_OPS: tuple[str, ...]

class LayerStack:
    def __init__(
        self,
        n_embd: int,
        n_ff: int,
        n_head: int,
        n_head_kv: int,
        head_dim: int,
        norm_eps: float,
        kq_scale: float,
        layers: list[dict[str, object]],
    ) -> None: ...
    def set_linear(self, il: int, name: str, spec: tuple[int, np.ndarray, np.ndarray | None]) -> None: ...
    def forward(
        self,
        x: np.ndarray,
        segments: list[tuple[np.ndarray, np.ndarray, int, int]],
        cos: np.ndarray | None = None,
        sin: np.ndarray | None = None,
        n_threads: int = 1,
        timings: np.ndarray | None = None,
    ) -> None: ...
