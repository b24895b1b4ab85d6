# cython: language_level=3, boundscheck=False, wraparound=False
"""Python entry points to the C kernels (kernels.h). Every call releases the GIL.

Arrays must be C-contiguous with the dtypes named in each docstring; the Python callers in
runtime/ops.py guarantee that, so these wrappers check shapes only where a mistake would make
the C code read or write out of bounds.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t
from cpython.unicode cimport PyUnicode_DecodeUTF8

cnp.import_array()

cdef extern from "kernels.h" nogil:
    int kernels_init(const char *which)
    const char *kernels_active()
    int kernels_prefetch(const char *where)
    const char *kernels_prefetch_active()
    int kernels_decode_tiles(const char *which)
    const char *kernels_decode_tiles_active()
    ctypedef struct kernels_epilogue:
        const float *bias
        int gelu
        const float *add
    int kernels_matmul(int wtype, const uint8_t *w, size_t w_row_bytes, int64_t N, int64_t K,
                       const float *x, int64_t M, float *y, const kernels_epilogue *ep, int n_threads)
    int kernels_get_rows(int wtype, const uint8_t *w, size_t w_row_bytes, int64_t K,
                         const int64_t *rows, int64_t n_rows, float *out)
    int kernels_attention(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                          float *out, int64_t T, int64_t pos0, int64_t n_head, int64_t n_kv_head,
                          int64_t hd, float scale, int n_threads)
    void kernels_gelu(const float *x, float *y, int64_t n, int n_threads)
    void kernels_rope_neox(float *x, const float *cos, const float *sin, int64_t T, int64_t n_head, int64_t hd)
    void kernels_rope_table(int64_t n_pos, int64_t hd, float freq_base, float *cos_out, float *sin_out)
    void kernels_layer_norm(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t n, float eps,
                            int n_threads)
    void kernels_quantize_q8_0(const float *x, uint8_t *y, int64_t k)
    void kernels_quantize_q8_K(const float *x, uint8_t *y, int64_t k)
    void kernels_f32_to_f16(const float *x, uint16_t *y, int64_t n)
    float kernels_vec_dot(int wtype, const uint8_t *w_row, const float *x, int64_t k)
    uint64_t kernels_read_sum(const uint8_t *p, size_t n, int n_threads, int streams)

kernels_init(b"auto")


def use(str which="auto"):
    """Select the kernel set: "auto", "avx512vnni", "avxvnni", "avx2" or "generic". ValueError if the CPU
    lacks it."""
    if kernels_init(which.encode()) != 0:
        raise ValueError(f"kernel set {which!r} is not available on this CPU")


def active():
    """Name of the kernel set in use ("avx512vnni", "avxvnni", "avx2" or "generic")."""
    return kernels_active().decode()


def prefetch(str where="auto"):
    """Where the matmuls prefetch weights: "auto" (picked from the CPU), "l1" or "l2"; the same
    results either way. Returns the level now in use. ValueError for any other name."""
    if kernels_prefetch(where.encode()) != 0:
        raise ValueError(f"prefetch level {where!r}: expected auto, l1 or l2")
    return kernels_prefetch_active().decode()


def decode_tiles(str which="auto"):
    """Which tiles the avx512vnni set's Q4_0 decode (one activation row) takes: "auto" (picked
    from the CPU: ymm on AMD Zen 4), "zmm" or "ymm"; the same results either way. Returns the
    tiles now in use. ValueError for any other name."""
    if kernels_decode_tiles(which.encode()) != 0:
        raise ValueError(f"decode tiles {which!r}: expected auto, zmm or ymm")
    return kernels_decode_tiles_active().decode()


def matmul(int wtype, const uint8_t[:, ::1] w, int64_t k, const float[:, ::1] x,
           float[:, ::1] out, int n_threads=1, bias=None, bint gelu=False, add=None):
    """out[M, N] = x[M, K] @ W[N, K].T with W given as its raw rows (uint8 [N, row_bytes]), then,
    as each thread finishes its outputs: + bias (float32 [N]), gelu_tanh (ggml's table) if
    `gelu`, + add (float32 [M, N], a residual; it must not overlap out). Each step rounds as
    the separate NumPy / gelu step would: the same bits, without their passes and calls."""
    cdef int64_t n = w.shape[0], m = x.shape[0]
    if x.shape[1] != k or out.shape[0] != m or out.shape[1] != n:
        raise ValueError(f"matmul shapes: W {n}x{k}, x {x.shape[0]}x{x.shape[1]}, out {out.shape[0]}x{out.shape[1]}")
    cdef const float[::1] b
    cdef const float[:, ::1] r
    cdef kernels_epilogue ep
    ep.bias = NULL
    ep.gelu = gelu
    ep.add = NULL
    if bias is not None:
        b = bias
        if b.shape[0] != n:
            raise ValueError(f"matmul: bias of {b.shape[0]} for {n} outputs")
        if n:
            ep.bias = &b[0]
    if add is not None:
        r = add
        if r.shape[0] != m or r.shape[1] != n:
            raise ValueError(f"matmul: add of {r.shape[0]}x{r.shape[1]} for out {m}x{n}")
        if m and n:
            if &r[0, 0] < &out[m - 1, n - 1] + 1 and &out[0, 0] < &r[m - 1, n - 1] + 1:
                raise ValueError("matmul: add overlaps out")
            ep.add = &r[0, 0]
    if n == 0 or m == 0:
        return
    cdef int rc
    with nogil:
        rc = kernels_matmul(wtype, &w[0, 0], w.shape[1], n, k, &x[0, 0], m, &out[0, 0], &ep, n_threads)
    if rc != 0:
        raise ValueError(f"matmul: unsupported weight type {wtype} or row length {k}")


def vec_dot(int wtype, const uint8_t[::1] w_row, const float[::1] x):
    """One dot product of a raw weight row with x, by the single-row kernel (not the matmul's
    tiles): what the matmul must reproduce bit for bit."""
    cdef int64_t k = x.shape[0]
    if k == 0 or w_row.shape[0] == 0:
        raise ValueError("vec_dot: empty row")
    cdef float r
    with nogil:
        r = kernels_vec_dot(wtype, &w_row[0], &x[0], k)
    return r


def read_sum(const uint8_t[::1] buf, int n_threads=1, int streams=4):
    """Sum of buf's 64-bit words, read with n_threads threads, each reading `streams` parts side
    by side: time it for the memory read bandwidth (benchmarks/runtime_speed.py). len(buf) must be
    a multiple of 64; all of it is read when it is a multiple of 64 * streams * n_threads."""
    if buf.shape[0] % 64:
        raise ValueError("read_sum: length must be a multiple of 64")
    if not 1 <= streams <= 64:
        raise ValueError("read_sum: streams must be 1 to 64")
    if buf.shape[0] == 0:
        return 0
    cdef uint64_t r
    with nogil:
        r = kernels_read_sum(&buf[0], buf.shape[0], n_threads, streams)
    return r


def get_rows(int wtype, const uint8_t[:, ::1] w, int64_t k, const int64_t[::1] rows, float[:, ::1] out):
    """out[i] = dequantized row rows[i] of W (uint8 [N, row_bytes])."""
    cdef int64_t i, n = rows.shape[0]
    if out.shape[0] != n or out.shape[1] != k:
        raise ValueError("get_rows: output shape")
    for i in range(n):
        if rows[i] < 0 or rows[i] >= w.shape[0]:
            raise IndexError(f"row {rows[i]} out of range 0..{w.shape[0] - 1}")
    if n == 0:
        return
    cdef int rc
    with nogil:
        rc = kernels_get_rows(wtype, &w[0, 0], w.shape[1], k, &rows[0], n, &out[0, 0])
    if rc != 0:
        raise ValueError(f"get_rows: unsupported weight type {wtype} or row length {k}")


def attention(const float[:, :, ::1] q, const uint16_t[:, :, ::1] k_cache,
              const uint16_t[:, :, ::1] v_cache, float[:, :, ::1] out, int64_t pos0,
              float scale, int n_threads=1):
    """Causal attention of q [T, n_head, hd] over caches [n_ctx, n_kv_head, hd] (fp16 bits)."""
    cdef int64_t t = q.shape[0], n_head = q.shape[1], hd = q.shape[2]
    cdef int64_t n_kv = k_cache.shape[1]
    if (k_cache.shape[2] != hd or v_cache.shape[1] != n_kv or v_cache.shape[2] != hd
            or pos0 < 0 or pos0 + t > k_cache.shape[0] or pos0 + t > v_cache.shape[0]
            or n_kv == 0 or n_head % n_kv != 0 or out.shape[0] != t or out.shape[1] != n_head
            or out.shape[2] != hd):
        raise ValueError("attention: inconsistent shapes")
    if t == 0:
        return
    cdef int rc
    with nogil:
        rc = kernels_attention(&q[0, 0, 0], &k_cache[0, 0, 0], &v_cache[0, 0, 0], &out[0, 0, 0],
                               t, pos0, n_head, n_kv, hd, scale, n_threads)
    if rc != 0:
        raise MemoryError("attention scratch")


def rope_table(int64_t n_pos, int64_t hd, float freq_base):
    """(cos, sin) float32 [n_pos, hd/2] of the RoPE angles, as ggml's rope cache."""
    if hd <= 0 or hd % 2 or n_pos < 0:
        raise ValueError("rope_table: head size must be even and positive")
    cos = np.empty((n_pos, hd // 2), dtype=np.float32)
    sin = np.empty((n_pos, hd // 2), dtype=np.float32)
    cdef float[:, ::1] c = cos
    cdef float[:, ::1] s = sin
    if n_pos:
        with nogil:
            kernels_rope_table(n_pos, hd, freq_base, &c[0, 0], &s[0, 0])
    return cos, sin


def layer_norm(const float[:, ::1] x, const float[::1] w, const float[::1] b, float[:, ::1] out, float eps,
               int n_threads=1):
    """out = LayerNorm(x) * w + b, row by row (ggml's rounding); many rows over n_threads."""
    cdef int64_t rows = x.shape[0], n = x.shape[1]
    if w.shape[0] != n or b.shape[0] != n or out.shape[0] != rows or out.shape[1] != n:
        raise ValueError("layer_norm: shapes")
    if rows == 0 or n == 0:
        return
    with nogil:
        kernels_layer_norm(&x[0, 0], &w[0], &b[0], &out[0, 0], rows, n, eps, n_threads)


def gelu(const float[::1] x, float[::1] out, int n_threads=1):
    """out = gelu_tanh(x) via ggml's fp16 table (out may be x)."""
    if out.shape[0] != x.shape[0]:
        raise ValueError("gelu: shapes")
    if x.shape[0] == 0:
        return
    with nogil:
        kernels_gelu(&x[0], &out[0], x.shape[0], n_threads)


def rope_neox(float[:, :, ::1] x, const float[:, ::1] cos, const float[:, ::1] sin):
    """NEOX RoPE of x [T, n_head, hd] in place, row t by cos/sin [T, hd/2] (ggml's fmas)."""
    if cos.shape[0] != x.shape[0] or sin.shape[0] != x.shape[0] or x.shape[2] % 2 \
            or cos.shape[1] != x.shape[2] // 2 or sin.shape[1] != x.shape[2] // 2:
        raise ValueError("rope_neox: shapes")
    if x.shape[0] == 0 or x.shape[1] == 0:
        return
    with nogil:
        kernels_rope_neox(&x[0, 0, 0], &cos[0, 0], &sin[0, 0], x.shape[0], x.shape[1], x.shape[2])


def quantize_q8_0(const float[::1] x):
    """Q8_0 blocks (34 bytes per 32 values) of x, as the matmul quantizes activations."""
    if x.shape[0] % 32:
        raise ValueError("length must be a multiple of 32")
    out = np.zeros(x.shape[0] // 32 * 34, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    if x.shape[0]:
        with nogil:
            kernels_quantize_q8_0(&x[0], &o[0], x.shape[0])
    return out


def quantize_q8_K(const float[::1] x):
    """Q8_K blocks (292 bytes per 256 values) of x."""
    if x.shape[0] % 256:
        raise ValueError("length must be a multiple of 256")
    out = np.zeros(x.shape[0] // 256 * 292, dtype=np.uint8)
    cdef uint8_t[::1] o = out
    if x.shape[0]:
        with nogil:
            kernels_quantize_q8_K(&x[0], &o[0], x.shape[0])
    return out


def f32_to_f16(const float[::1] x, out=None):
    """fp16 bits of x, rounded to nearest even: into `out` (uint16, x's length; a KV cache store
    writes its rows so, with no temporaries) and returned, or into a new array."""
    if out is None:
        out = np.zeros(x.shape[0], dtype=np.uint16)
    cdef uint16_t[::1] o = out
    if o.shape[0] != x.shape[0]:
        raise ValueError(f"f32_to_f16: out of {o.shape[0]} for {x.shape[0]} values")
    if x.shape[0]:
        with nogil:
            kernels_f32_to_f16(&x[0], &o[0], x.shape[0])
    return out


def read_strings(const uint8_t[::1] buf, Py_ssize_t pos, Py_ssize_t count):
    """Up to `count` GGUF strings (a little-endian u64 length, then that many UTF-8 bytes) from
    buf[pos:], as (strings, the position after the last one read). It stops early, without
    raising, at a string that runs past the end or is not valid UTF-8, so that the caller's
    checked read can name the error. Holds the GIL (it builds str objects); a tokenizer's ~100k
    strings take ~10 ms here against ~80 ms read one by one in Python."""
    cdef Py_ssize_t size = buf.shape[0], i
    cdef uint64_t n
    cdef int b
    out = []
    if pos < 0 or pos > size:
        return out, pos
    for i in range(count):
        if size - pos < 8:
            break
        n = 0
        for b in range(8):
            n |= (<uint64_t>buf[pos + b]) << (8 * b)
        if n > <uint64_t>(size - pos - 8):
            break
        try:
            s = PyUnicode_DecodeUTF8(<const char *>&buf[0] + pos + 8, <Py_ssize_t>n, NULL)
        except UnicodeDecodeError:
            break
        out.append(s)
        pos += 8 + <Py_ssize_t>n
    return out, pos
