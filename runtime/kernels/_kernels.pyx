# cython: language_level=3, boundscheck=False, wraparound=False
"""Python entry points to the C kernels (kernels.h). Every call releases the GIL.

Arrays must be C-contiguous with the dtypes named in each docstring; the Python callers in
runtime/ops.py guarantee that, so these wrappers check shapes only where a mistake would make
the C code read or write out of bounds.
"""
import numpy as np
cimport numpy as cnp
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint64_t
from libc.stdlib cimport calloc, free
from cpython.unicode cimport PyUnicode_DecodeUTF8

cnp.import_array()

cdef extern from "kernels.h" nogil:
    int kernels_init(const char *which)
    const char *kernels_active()
    int kernels_prefetch(const char *where)
    const char *kernels_prefetch_active()
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
    float kernels_vec_dot(int wtype, const uint8_t *w_row, const float *x, int64_t k, int64_t n_out)
    uint64_t kernels_read_sum(const uint8_t *p, size_t n, int n_threads, int streams, int prefetch)
    int64_t kernels_row_bytes(int wtype, int64_t K)
    int kernels_repacks_q4_0()
    int kernels_repack_q4_0(const uint8_t *src, size_t src_row_bytes, int64_t N, int64_t K, uint8_t *dst,
                            int n_threads)
    int kernels_repacks_q8_0()
    int kernels_repack_q8_0(const uint8_t *src, size_t src_row_bytes, int64_t N, int64_t K, uint8_t *dst,
                            int n_threads)
    enum: KT_Q4_0
    enum: KT_Q4_0_R16
    enum: KT_Q8_0
    enum: KT_Q8_0_R8

cdef extern from "forward.h" nogil:
    ctypedef struct kernels_linear:
        int wtype
        const uint8_t *w
        size_t row_bytes
        int64_t n_out
        const float *bias
    ctypedef struct kernels_layer:
        const float *attn_norm_w
        const float *attn_norm_b
        kernels_linear wq, wk, wv, wqkv, wo
        const float *ffn_norm_w
        const float *ffn_norm_b
        kernels_linear up, down
    ctypedef struct kernels_dims:
        int64_t n_embd, n_ff, n_head, n_head_kv, head_dim
        float norm_eps, kq_scale
    ctypedef struct kernels_segment:
        uint16_t *k
        uint16_t *v
        int64_t n_ctx, n_past, n_tokens
    enum: KOP_COUNT
    int kernels_forward_layers(const kernels_dims *d, const kernels_layer *layers, int n_layer,
                               const kernels_segment *segs, int n_segs, float *x, int64_t T,
                               const float *cos, const float *sin, int n_threads, double *op_seconds)

kernels_init(b"auto")


def use(str which="auto"):
    """Select the kernel set: "auto", "avx512vnni", "avxvnni", "avx2" or "generic" ("avxvnni-evex":
    the avxvnni code with AVX-512's encoding of its one VNNI instruction, for testing that code on
    CPUs without AVX-VNNI). ValueError if the CPU lacks it."""
    if kernels_init(which.encode()) != 0:
        raise ValueError(f"kernel set {which!r} is not available on this CPU")


def active():
    """Name of the kernel set in use ("avx512vnni", "avxvnni", "avx2", "generic" or "avxvnni-evex")."""
    return kernels_active().decode()


def prefetch(str where="auto"):
    """Where the matmuls prefetch weights: "auto" (picked from the CPU), "l1" or "l2"; the same
    results either way. Returns the level now in use. ValueError for any other name."""
    if kernels_prefetch(where.encode()) != 0:
        raise ValueError(f"prefetch level {where!r}: expected auto, l1 or l2")
    return kernels_prefetch_active().decode()


Q4_0_R16 = KT_Q4_0_R16  # the matmul's weight type for rows repack_q4_0 wrote (not a ggml type)


def repacks_q4_0():
    """True if the kernel set in use has a tile for repacked Q4_0 rows (a model should repack
    its Q4_0 matrices at load); False if it would only read them by a slower path."""
    return kernels_repacks_q4_0() != 0


cdef _repack(str name, int wtype, int group, const uint8_t[:, ::1] w, int64_t k, uint8_t[:, ::1] out,
             int n_threads):
    """out = W's rows of `wtype` repacked by the kernels' repack_<type> (`name`), groups of `group` rows."""
    cdef int64_t n = w.shape[0]
    if out.shape[0] != n or out.shape[1] != w.shape[1] or w.shape[1] != kernels_row_bytes(wtype, k):
        raise ValueError(f"{name} shapes: W {n}x{w.shape[1]} of {k} elements, out {out.shape[0]}x{out.shape[1]}")
    if n == 0:
        return
    cdef int rc
    with nogil:
        if wtype == KT_Q4_0:
            rc = kernels_repack_q4_0(&w[0, 0], w.shape[1], n, k, &out[0, 0], n_threads)
        else:
            rc = kernels_repack_q8_0(&w[0, 0], w.shape[1], n, k, &out[0, 0], n_threads)
    if rc != 0:
        raise ValueError(f"{name}: {n} rows are not a multiple of {group}")


def repack_q4_0(const uint8_t[:, ::1] w, int64_t k, uint8_t[:, ::1] out, int n_threads=1):
    """out = W's Q4_0 rows (uint8 [N, row_bytes], N a multiple of 16) repacked for matmul with
    weight type Q4_0_R16: the same bytes, interleaved by groups of 16 rows, the same results."""
    _repack("repack_q4_0", KT_Q4_0, 16, w, k, out, n_threads)


Q8_0_R8 = KT_Q8_0_R8  # the matmul's weight type for rows repack_q8_0 wrote (not a ggml type)


def repacks_q8_0():
    """True if the kernel set in use has a tile for repacked Q8_0 rows (a model may repack its
    Q8_0 matrices at load); False if it would only read them by a slower path."""
    return kernels_repacks_q8_0() != 0


def repack_q8_0(const uint8_t[:, ::1] w, int64_t k, uint8_t[:, ::1] out, int n_threads=1):
    """out = W's Q8_0 rows (uint8 [N, row_bytes], N a multiple of 8) repacked for matmul with
    weight type Q8_0_R8: the same bytes, interleaved by groups of 8 rows, the same results."""
    _repack("repack_q8_0", KT_Q8_0, 8, w, k, out, n_threads)


def matmul(int wtype, const uint8_t[:, ::1] w, int64_t k, const float[:, ::1] x,
           float[:, ::1] out, int n_threads=1, bias=None, bint gelu=False, add=None):
    """out[M, N] = x[M, K] @ W[N, K].T with W given as its raw rows (uint8 [N, row_bytes]), then,
    as each thread finishes its outputs: + bias (float32 [N]), gelu_tanh (ggml's table) if
    `gelu`, + add (float32 [M, N], a residual; it must not overlap out). Each step rounds as
    the separate NumPy / gelu step would: the same bits, without their passes and calls."""
    cdef int64_t n = w.shape[0], m = x.shape[0]
    if x.shape[1] != k or out.shape[0] != m or out.shape[1] != n:
        raise ValueError(f"matmul shapes: W {n}x{k}, x {x.shape[0]}x{x.shape[1]}, out {out.shape[0]}x{out.shape[1]}")
    cdef int64_t row_bytes = kernels_row_bytes(wtype, k)
    if row_bytes >= 0 and w.shape[1] != row_bytes:  # (unsupported types fail below, by name)
        raise ValueError(f"matmul: rows of {w.shape[1]} bytes for {k} elements of weight type {wtype}, "
                         f"expected {row_bytes}")
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


def vec_dot(int wtype, const uint8_t[::1] w_row, const float[::1] x, int64_t n_out=1):
    """One dot product of a raw weight row with x, by the single-row kernel (not the matmul's
    tiles): what the matmul must reproduce bit for bit. n_out is the row count of the matrix the
    row belongs to: Q4_0 rows of matrices with a multiple of 8 rows are summed block by block, as
    llama.cpp's repacked kernels sum them, the others in ggml's vec_dot lanes."""
    cdef int64_t k = x.shape[0]
    if k == 0 or w_row.shape[0] == 0:
        raise ValueError("vec_dot: empty row")
    if n_out < 1:
        raise ValueError(f"vec_dot: n_out must be at least 1, got {n_out}")
    cdef float r
    with nogil:
        r = kernels_vec_dot(wtype, &w_row[0], &x[0], k, n_out)
    return r


def read_sum(const uint8_t[::1] buf, int n_threads=1, int streams=4, bint prefetch=True):
    """Sum of buf's 64-bit words, read with n_threads threads, each reading `streams` parts side
    by side, prefetched as the matmuls prefetch (`prefetch`) or by the hardware alone: time it for
    the memory read bandwidth (benchmarks/runtime_speed.py). len(buf) must be a multiple of 64;
    all of it is read when it is a multiple of 64 * streams * n_threads."""
    if buf.shape[0] % 64:
        raise ValueError("read_sum: length must be a multiple of 64")
    if not 1 <= streams <= 64:
        raise ValueError("read_sum: streams must be 1 to 64")
    if buf.shape[0] == 0:
        return 0
    cdef uint64_t r
    with nogil:
        r = kernels_read_sum(&buf[0], buf.shape[0], n_threads, streams, prefetch)
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


# LayerStack.forward's ops, in the order of the seconds its `timings` array gets (forward.h's KOP_*).
LAYER_OPS = ("layer_norm", "matmul", "rope_neox", "kv_store", "attention")


cdef class LayerStack:
    """A model's transformer layers as C pointers into its weights (which it keeps alive), so
    that `forward` runs them all in one call without the GIL (forward.c).

    `layers` holds one dict per layer: "attn_norm" and "ffn_norm" (weight, bias) float32 [E]
    pairs; "wq", "wk", "wv" (StarCoder2) or "wqkv" (StarCoder), "wo", "up", "down" as
    (ggml type, raw rows uint8 [n_out, row_bytes], bias float32 [n_out] or None), or None where
    the architecture has no such matrix. Shapes are checked here, once."""

    cdef kernels_dims dims
    cdef kernels_layer *layers
    cdef int n_layer
    cdef bint fused_qkv
    cdef list _keep

    def __cinit__(self, int64_t n_embd, int64_t n_ff, int64_t n_head, int64_t n_head_kv, int64_t head_dim,
                  float norm_eps, float kq_scale, list layers):
        self.fused_qkv = bool(layers) and layers[0].get("wqkv") is not None
        if (n_embd <= 0 or n_ff <= 0 or head_dim <= 0 or n_head_kv <= 0 or n_head % n_head_kv
                or n_head * head_dim != n_embd or not layers or (head_dim % 2 and not self.fused_qkv)):
            raise ValueError("LayerStack: inconsistent dimensions")
        self.dims = kernels_dims(n_embd, n_ff, n_head, n_head_kv, head_dim, norm_eps, kq_scale)
        self.n_layer = len(layers)
        self._keep = []
        self.layers = <kernels_layer *>calloc(self.n_layer, sizeof(kernels_layer))
        if self.layers == NULL:
            raise MemoryError("LayerStack")
        cdef int64_t kvd = n_head_kv * head_dim
        for il, spec in enumerate(layers):
            L = &self.layers[il]
            L.attn_norm_w = self._vector(spec["attn_norm"][0], n_embd, il)
            L.attn_norm_b = self._vector(spec["attn_norm"][1], n_embd, il)
            L.ffn_norm_w = self._vector(spec["ffn_norm"][0], n_embd, il)
            L.ffn_norm_b = self._vector(spec["ffn_norm"][1], n_embd, il)
            if self.fused_qkv:
                L.wqkv = self._linear(spec["wqkv"], n_embd + 2 * head_dim, n_embd, il, "wqkv")
            else:
                L.wq = self._linear(spec["wq"], n_embd, n_embd, il, "wq")
                L.wk = self._linear(spec["wk"], kvd, n_embd, il, "wk")
                L.wv = self._linear(spec["wv"], kvd, n_embd, il, "wv")
            L.wo = self._linear(spec["wo"], n_embd, n_embd, il, "wo")
            L.up = self._linear(spec["up"], n_ff, n_embd, il, "up")
            L.down = self._linear(spec["down"], n_embd, n_ff, il, "down")

    def __dealloc__(self):
        free(self.layers)

    cdef const float *_vector(self, v, int64_t n, int il) except NULL:
        cdef const float[::1] view = v
        if view.shape[0] != n:
            raise ValueError(f"LayerStack: layer {il}: a norm vector of {view.shape[0]}, expected {n}")
        self._keep.append(v)
        return &view[0]

    cdef kernels_linear _linear(self, spec, int64_t n_out, int64_t n_in, int il, str name) except *:
        if spec is None:
            raise ValueError(f"LayerStack: layer {il}: {name} is missing")
        wtype, rows, bias = spec
        cdef const uint8_t[:, ::1] w = rows
        cdef kernels_linear out
        if w.shape[0] != n_out or w.shape[1] != kernels_row_bytes(wtype, n_in):
            raise ValueError(f"LayerStack: layer {il}: {name} of {w.shape[0]}x{w.shape[1]} bytes, type {wtype}, "
                             f"for {n_out} outputs of {n_in}")
        out.wtype, out.w, out.row_bytes, out.n_out, out.bias = wtype, &w[0, 0], w.shape[1], n_out, NULL
        self._keep.append(rows)
        if bias is not None:
            out.bias = self._vector(bias, n_out, il)
        return out

    def set_linear(self, int il, str name, spec):
        """Layer il's matrix `name` ("wq", "wk", "wv", "wqkv", "wo", "up" or "down") becomes `spec`,
        of the same shape: how a repacked copy of its weights takes over (runtime/repack.py).
        The caller makes sure that no `forward` runs meanwhile."""
        if not 0 <= il < self.n_layer:
            raise IndexError(f"LayerStack.set_linear: layer {il} of {self.n_layer}")
        cdef kernels_linear *target
        L = &self.layers[il]
        if name == "wq":
            target = &L.wq
        elif name == "wk":
            target = &L.wk
        elif name == "wv":
            target = &L.wv
        elif name == "wqkv":
            target = &L.wqkv
        elif name == "wo":
            target = &L.wo
        elif name == "up":
            target = &L.up
        elif name == "down":
            target = &L.down
        else:
            raise ValueError(f"LayerStack.set_linear: no matrix {name!r}")
        if target.w == NULL:
            raise ValueError(f"LayerStack.set_linear: layer {il} has no {name}")
        cdef int64_t n_in = self.dims.n_ff if name == "down" else self.dims.n_embd
        target[0] = self._linear(spec, target.n_out, n_in, il, name)

    def forward(self, float[:, ::1] x, list segments, cos=None, sin=None, int n_threads=1, timings=None):
        """Runs every layer over x [T, E] in place. `segments` are (k cache, v cache, n_past,
        n_tokens), the caches fp16 bits [n_layer, n_ctx, n_head_kv, head_dim], their n_tokens
        summing to T; cos/sin [T, head_dim/2] the rows' RoPE angles (StarCoder2; None for
        StarCoder); `timings` float64 [len(LAYER_OPS)] gets each op's seconds added."""
        cdef int64_t T = x.shape[0], hd = self.dims.head_dim, rows = 0
        cdef int n_segs = len(segments), rc = 0
        cdef const float[:, ::1] c
        cdef const float[:, ::1] s
        cdef const float *cp = NULL
        cdef const float *sp = NULL
        cdef double[::1] t
        cdef double *tp = NULL
        cdef uint16_t[:, :, :, ::1] kc
        cdef uint16_t[:, :, :, ::1] vc
        if x.shape[1] != self.dims.n_embd:
            raise ValueError(f"LayerStack.forward: x has {x.shape[1]} columns, expected {self.dims.n_embd}")
        if not self.fused_qkv:
            if cos is None or sin is None:
                raise ValueError("LayerStack.forward: StarCoder2 layers need cos and sin")
            c, s = cos, sin
            if c.shape[0] != T or s.shape[0] != T or c.shape[1] != hd // 2 or s.shape[1] != hd // 2:
                raise ValueError("LayerStack.forward: cos/sin must be [T, head_dim/2]")
            if T:
                cp, sp = &c[0, 0], &s[0, 0]
        if timings is not None:
            t = timings
            if t.shape[0] != KOP_COUNT:
                raise ValueError(f"LayerStack.forward: timings must have {KOP_COUNT} entries")
            tp = &t[0]
        cdef kernels_segment *segs = <kernels_segment *>calloc(max(n_segs, 1), sizeof(kernels_segment))
        if segs == NULL:
            raise MemoryError("LayerStack.forward")
        try:
            for i, (k_cache, v_cache, n_past, n_tokens) in enumerate(segments):
                kc, vc = k_cache, v_cache
                if (kc.shape[0] != self.n_layer or kc.shape[2] != self.dims.n_head_kv or kc.shape[3] != hd
                        or vc.shape[0] != kc.shape[0] or vc.shape[1] != kc.shape[1] or vc.shape[2] != kc.shape[2]
                        or vc.shape[3] != hd or n_past < 0 or n_tokens < 0 or n_past + n_tokens > kc.shape[1]):
                    raise ValueError(f"LayerStack.forward: segment {i}: cache shape or positions do not fit")
                segs[i] = kernels_segment(&kc[0, 0, 0, 0], &vc[0, 0, 0, 0], kc.shape[1], n_past, n_tokens)
                rows += n_tokens
            if rows != T:
                raise ValueError(f"LayerStack.forward: segments hold {rows} tokens for {T} rows")
            if T == 0:
                return
            with nogil:
                rc = kernels_forward_layers(&self.dims, self.layers, self.n_layer, segs, n_segs, &x[0, 0], T,
                                            cp, sp, n_threads, tp)
        finally:
            free(segs)
        if rc != 0:
            raise MemoryError("LayerStack.forward: out of memory")
