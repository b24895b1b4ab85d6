/* Kernel dispatch and the threaded drivers (matmul, attention); see kernels.h. */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KERNELS_X86 1
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

/* ---- block layouts (identical to ggml's) -------------------------------------------------- */

#define QK4_0 32
#define QK8_0 32
#define QK_K 256

typedef struct { uint16_t d; uint8_t qs[QK4_0 / 2]; } block_q4_0;
typedef struct { uint16_t d; int8_t qs[QK8_0]; } block_q8_0;
typedef struct { uint8_t ql[QK_K / 2]; uint8_t qh[QK_K / 4]; int8_t scales[QK_K / 16]; uint16_t d; } block_q6_K;
typedef struct { float d; int8_t qs[QK_K]; int16_t bsums[QK_K / 16]; } block_q8_K;

_Static_assert(sizeof(block_q4_0) == 18, "block_q4_0 size");
_Static_assert(sizeof(block_q8_0) == 34, "block_q8_0 size");
_Static_assert(sizeof(block_q6_K) == 210, "block_q6_K size");
_Static_assert(sizeof(block_q8_K) == 292, "block_q8_K size");

/* ---- fp16 <-> fp32, exact and portable (IEEE round-to-nearest-even) ------------------------ */

static inline float fp32_from_bits(uint32_t w) { float f; memcpy(&f, &w, 4); return f; }
static inline uint32_t fp32_to_bits(float f) { uint32_t w; memcpy(&w, &f, 4); return w; }

static float fp16_table[1 << 16];  /* filled by kernels_init */

static inline float fp16_to_fp32_exact(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = fp32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = fp32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t result = sign | (two_w < (1u << 27) ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
    return fp32_from_bits(result);
}

static inline float fp16_to_fp32(uint16_t h) { return fp16_table[h]; }

static inline uint16_t fp32_to_fp16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = fp32_to_bits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = fp32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

/* ---- the kernel sets ----------------------------------------------------------------------- */

typedef float (*dot_fn)(int64_t n, const void *x, const void *y);
typedef void (*quantize_fn)(const float *x, void *y, int64_t k);
typedef void (*dot4_fn)(int64_t n, const void *x, const void *y, size_t y_stride, float *out);

typedef struct {
    const char *name;
    void (*f16_to_f32)(const uint16_t *x, float *y, int64_t n);
    quantize_fn quantize_q8_0;
    quantize_fn quantize_f16;
    dot_fn dot_q8_0, dot_q4_0, dot_q6_K;
    dot4_fn dot4_q8_0, dot4_q4_0;  /* one weight row, four activation rows */
    dot_fn dot_f16_vec, dot_f16_blas, dot_f32_vec, dot_f32_blas;  /* see kernels_impl.h */
    double (*softmax_exp)(int64_t n, float *s, float max);
    void (*axpy_f16)(int64_t n, float a, const uint16_t *v, float *y);
} kernel_set;

#define SUFFIX(name) name##_generic
#define SUFFIX_NAME "generic"
#include "kernels_impl.h"
#undef SUFFIX
#undef SUFFIX_NAME

#if defined(KERNELS_X86) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define KERNELS_AVX2 1
#define SUFFIX(name) name##_avx2
#define SUFFIX_NAME "avx2"
#include "kernels_impl.h"
#undef SUFFIX
#undef SUFFIX_NAME
#undef KERNELS_AVX2
#pragma GCC pop_options
#define HAVE_AVX2_SET 1
#endif

static const kernel_set *K = &kernel_set_generic;
static int initialized = 0;
static uint16_t gelu_table[1 << 16];

static int cpu_has_avx2(void) {
#if defined(HAVE_AVX2_SET)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static void build_tables(void) {
    for (uint32_t i = 0; i < (1u << 16); i++) fp16_table[i] = fp16_to_fp32_exact((uint16_t)i);
    /* ggml's GELU table: fp16(gelu_tanh(x)) for every fp16 x, computed in float. */
    const float sqrt_2_over_pi = 0.79788456080286535587989211986876f;
    const float coef_a = 0.044715f;
    for (uint32_t i = 0; i < (1u << 16); i++) {
        const float x = fp16_table[i];
        /* ggml's CPU backend is compiled with FMA, and the compiler fuses 1 + a*x*x */
        const float g = 0.5f * x * (1.0f + tanhf(sqrt_2_over_pi * x * fmaf(coef_a * x, x, 1.0f)));
        gelu_table[i] = fp32_to_fp16(g);
    }
}

int kernels_init(const char *which) {
    if (!initialized) {
        build_tables();
        initialized = 1;
    }
    if (which == NULL || strcmp(which, "auto") == 0) {
#if defined(HAVE_AVX2_SET)
        K = cpu_has_avx2() ? &kernel_set_avx2 : &kernel_set_generic;
#else
        K = &kernel_set_generic;
#endif
        return 0;
    }
    if (strcmp(which, "generic") == 0) {
        K = &kernel_set_generic;
        return 0;
    }
#if defined(HAVE_AVX2_SET)
    if (strcmp(which, "avx2") == 0 && cpu_has_avx2()) {
        K = &kernel_set_avx2;
        return 0;
    }
#endif
    return -1;
}

const char *kernels_active(void) { return K->name; }

/* ---- Q8_K activations (ggml uses the scalar reference on every CPU) ------------------------ */

/* ggml's nearest_int: round half to even through the float magic number 1.5 * 2^23. */
static inline int nearest_int(float fval) {
    float val = fval + 12582912.f;
    int i;
    memcpy(&i, &val, sizeof(int));
    return (i & 0x007fffff) - 0x00400000;
}

static void quantize_q8_K(const float *x, void *vy, int64_t k) {
    block_q8_K *y = (block_q8_K *)vy;
    for (int64_t i = 0; i < k / QK_K; i++, x += QK_K) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax == 0.0f) {
            memset(&y[i], 0, sizeof(block_q8_K));
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) {
            const int v = nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int j = 0; j < QK_K / 16; j++) {
            int sum = 0;
            for (int l = 0; l < 16; l++) sum += y[i].qs[j * 16 + l];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}

/* ---- per weight type: block size, the activation format and the dot product ---------------- */

typedef struct {
    int64_t block;          /* elements per weight block (and per activation block) */
    size_t act_block_bytes; /* bytes of one activation block in the vec_dot format */
    quantize_fn quantize;   /* NULL: activations stay float32 */
    dot_fn dot;
    dot4_fn dot4;           /* NULL: no four-row kernel */
} type_traits;

/* ggml sums F16/F32 products in tinyBLAS's order when llamafile_sgemm takes the product: two or
 * more activation rows, a row length that is a multiple of 8 and an output count that is a
 * multiple of 4; otherwise in vec_dot's order. */
static int tinyblas_takes(int64_t n_out, int64_t n_rows, int64_t k) { return n_rows >= 2 && k % 8 == 0 && n_out % 4 == 0; }

static int traits_for(int wtype, int64_t n_out, int64_t n_rows, int64_t k, type_traits *t) {
    const int batched = tinyblas_takes(n_out, n_rows, k);
    switch (wtype) {
    case KT_F32: *t = (type_traits){1, 4, NULL, batched ? K->dot_f32_blas : K->dot_f32_vec, NULL}; return 0;
    case KT_F16: *t = (type_traits){1, 2, K->quantize_f16, batched ? K->dot_f16_blas : K->dot_f16_vec, NULL}; return 0;
    case KT_Q8_0: *t = (type_traits){QK8_0, sizeof(block_q8_0), K->quantize_q8_0, K->dot_q8_0, K->dot4_q8_0}; return 0;
    case KT_Q4_0: *t = (type_traits){QK4_0, sizeof(block_q8_0), K->quantize_q8_0, K->dot_q4_0, K->dot4_q4_0}; return 0;
    case KT_Q6_K: *t = (type_traits){QK_K, sizeof(block_q8_K), quantize_q8_K, K->dot_q6_K, NULL}; return 0;
    default: return -1;
    }
}

static int threads_for(int n_threads, int64_t work) {
    if (n_threads < 1) n_threads = 1;
    if (work < n_threads) n_threads = work > 0 ? (int)work : 1;
    return n_threads;
}

int kernels_matmul(int wtype, const uint8_t *w, size_t w_row_bytes, int64_t N, int64_t K_, const float *x,
                   int64_t M, float *y, int n_threads) {
    type_traits t;
    if (traits_for(wtype, N, M, K_, &t) != 0 || K_ % t.block != 0) return -1;
    const size_t act_bytes = (size_t)(K_ / t.block) * t.act_block_bytes;
    const uint8_t *act = (const uint8_t *)x;
    uint8_t *buf = NULL;
    if (t.quantize != NULL) {
        buf = (uint8_t *)malloc(act_bytes * (size_t)M);
        if (buf == NULL) return -1;
        const int nt = threads_for(n_threads, M);
#pragma omp parallel for num_threads(nt) schedule(static)
        for (int64_t m = 0; m < M; m++) t.quantize(x + m * K_, buf + (size_t)m * act_bytes, K_);
        act = buf;
    }
    /* Weight rows are split into chunks that stay in L1/L2 while every activation row passes
     * over them: each weight byte is read from memory once per call, which is what bounds
     * decode speed. */
    const int64_t chunk = 16;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const int nt = threads_for(n_threads, n_chunks);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t n0 = c * chunk;
        const int64_t n1 = n0 + chunk < N ? n0 + chunk : N;
        int64_t m = 0;
        if (t.dot4 != NULL) {
            float r4[4];
            for (; m + 4 <= M; m += 4) {
                const uint8_t *a = act + (size_t)m * act_bytes;
                for (int64_t n = n0; n < n1; n++) {
                    t.dot4(K_, w + (size_t)n * w_row_bytes, a, act_bytes, r4);
                    for (int r = 0; r < 4; r++) y[(m + r) * N + n] = r4[r];
                }
            }
        }
        for (; m < M; m++) {
            const uint8_t *a = act + (size_t)m * act_bytes;
            float *ym = y + m * N;
            for (int64_t n = n0; n < n1; n++) ym[n] = t.dot(K_, w + (size_t)n * w_row_bytes, a);
        }
    }
    free(buf);
    return 0;
}

/* ---- dequantization of single rows (embedding lookups) ------------------------------------- */

static void dequantize_row(int wtype, const uint8_t *row, float *out, int64_t k) {
    switch (wtype) {
    case KT_F32: memcpy(out, row, (size_t)k * sizeof(float)); break;
    case KT_F16: K->f16_to_f32((const uint16_t *)row, out, k); break;
    case KT_Q8_0: {
        const block_q8_0 *b = (const block_q8_0 *)row;
        for (int64_t i = 0; i < k / QK8_0; i++) {
            const float d = fp16_to_fp32(b[i].d);
            for (int j = 0; j < QK8_0; j++) out[i * QK8_0 + j] = b[i].qs[j] * d;
        }
    } break;
    case KT_Q4_0: {
        const block_q4_0 *b = (const block_q4_0 *)row;
        for (int64_t i = 0; i < k / QK4_0; i++) {
            const float d = fp16_to_fp32(b[i].d);
            for (int j = 0; j < QK4_0 / 2; j++) {
                out[i * QK4_0 + j] = ((b[i].qs[j] & 0x0F) - 8) * d;
                out[i * QK4_0 + j + QK4_0 / 2] = ((b[i].qs[j] >> 4) - 8) * d;
            }
        }
    } break;
    case KT_Q6_K: {
        const block_q6_K *b = (const block_q6_K *)row;
        for (int64_t i = 0; i < k / QK_K; i++) {
            const float d = fp16_to_fp32(b[i].d);
            const uint8_t *ql = b[i].ql, *qh = b[i].qh;
            const int8_t *sc = b[i].scales;
            float *o = out + i * QK_K;
            for (int half = 0; half < QK_K / 128; half++) {
                for (int l = 0; l < 32; l++) {
                    const int is = l / 16;
                    const int q1 = (int)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                    const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                    const int q3 = (int)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                    const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                    o[l + 0] = d * sc[is + 0] * q1;
                    o[l + 32] = d * sc[is + 2] * q2;
                    o[l + 64] = d * sc[is + 4] * q3;
                    o[l + 96] = d * sc[is + 6] * q4;
                }
                o += 128;
                ql += 64;
                qh += 32;
                sc += 8;
            }
        }
    } break;
    }
}

int kernels_get_rows(int wtype, const uint8_t *w, size_t w_row_bytes, int64_t K_, const int64_t *rows,
                     int64_t n_rows, float *out) {
    type_traits t;
    if (traits_for(wtype, 1, 1, K_, &t) != 0 || K_ % t.block != 0) return -1;
    for (int64_t i = 0; i < n_rows; i++) dequantize_row(wtype, w + (size_t)rows[i] * w_row_bytes, out + i * K_, K_);
    return 0;
}

/* ---- attention ------------------------------------------------------------------------------ */

/* Summation of the weighted V rows in ggml's order. ggml computes out[d] = dot(V^T[d, :], p)
 * over the (zero-padded) cache; with one query row its vec_dot puts element j in accumulator
 * (j / 8) % 4, lane j % 8 (then reduce4); with two or more rows tinyBLAS puts it in lane j % 8
 * (then hsum8). acc holds one hd-vector per accumulator lane: 32 or 8 of them. */
static void attend_values(const float *p, int64_t n_keys, const uint16_t *v_cache, int64_t kv_stride, int64_t hd,
                          int batched, float *acc, float *o) {
    const int64_t n_lanes = batched ? 8 : 32;
    memset(acc, 0, sizeof(float) * (size_t)(n_lanes * hd));
    for (int64_t j = 0; j < n_keys; j++) {
        if (p[j] != 0.0f) K->axpy_f16(hd, p[j], v_cache + j * kv_stride, acc + (j % n_lanes) * hd);
    }
    for (int64_t d = 0; d < hd; d++) {
        float x[8];
        if (batched) {
            for (int l = 0; l < 8; l++) x[l] = acc[l * hd + d];
        } else {
            for (int l = 0; l < 8; l++) {
                const float a0 = acc[l * hd + d], a1 = acc[(8 + l) * hd + d];
                const float a2 = acc[(16 + l) * hd + d], a3 = acc[(24 + l) * hd + d];
                x[l] = (a0 + a2) + (a1 + a3);
            }
        }
        const float t0 = x[0] + x[4], t1 = x[1] + x[5], t2 = x[2] + x[6], t3 = x[3] + x[7];
        o[d] = batched ? (t0 + t2) + (t1 + t3) : (t0 + t1) + (t2 + t3);
    }
}

int kernels_attention(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, float *out, int64_t T,
                      int64_t pos0, int64_t n_head, int64_t n_kv_head, int64_t hd, float scale, int n_threads) {
    const int64_t n_keys_max = pos0 + T;
    const int64_t n_pad = (n_keys_max + 7) & ~(int64_t)7;  /* softmax runs over whole groups of 8 */
    const int64_t group = n_head / n_kv_head;
    const int64_t kv_stride = n_kv_head * hd;
    /* KQ: rows = cache cells (ggml pads them to 256), k = hd; KQV: rows = hd, k = cells. */
    const int qk_batched = tinyblas_takes(256, T, hd);
    const int batched = tinyblas_takes(hd, T, 256);
    const dot_fn qk_dot = qk_batched ? K->dot_f16_blas : K->dot_f16_vec;
    int failed = 0;
    const int nt = threads_for(n_threads, T * n_head);
#pragma omp parallel num_threads(nt)
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)n_pad);
        float *acc = (float *)malloc(sizeof(float) * (size_t)(32 * hd));
        uint16_t *q16 = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)hd);
        if (scores == NULL || acc == NULL || q16 == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t th = 0; th < T * n_head; th++) {
                const int64_t t = th / n_head, h = th % n_head, kvh = h / group;
                const int64_t n_keys = pos0 + t + 1;  /* causal: itself and everything before */
                /* Q.K with Q rounded to fp16 (ggml converts it to the cache type), then scaled */
                K->quantize_f16(q + th * hd, q16, hd);
                float max = -INFINITY;
                for (int64_t j = 0; j < n_keys; j++) {
                    const float s = qk_dot(hd, q16, k_cache + j * kv_stride + kvh * hd) * scale;
                    scores[j] = s;
                    if (s > max) max = s;
                }
                for (int64_t j = n_keys; j < n_pad; j++) scores[j] = -INFINITY;
                const double sum = K->softmax_exp(n_pad, scores, max);
                const float inv = (float)(1.0 / sum);
                /* probabilities are rounded to fp16 before they weight V, as in ggml */
                for (int64_t j = 0; j < n_keys; j++) scores[j] = fp16_to_fp32(fp32_to_fp16(scores[j] * inv));
                attend_values(scores, n_keys, v_cache + kvh * hd, kv_stride, hd, batched, acc, out + th * hd);
            }
        }
        free(scores);
        free(acc);
        free(q16);
    }
    return failed ? -1 : 0;
}

/* ---- elementwise ---------------------------------------------------------------------------- */

void kernels_rope_table(int64_t n_pos, int64_t hd, float freq_base, float *cos_out, float *sin_out) {
    /* ggml_rope_cache_init: theta_i = pos * s^i by repeated float multiplication, then libm's
     * cosf/sinf (not correctly rounded: the table must come from the same functions) */
    const float theta_scale = powf(freq_base, -2.0f / (float)hd);
    for (int64_t p = 0; p < n_pos; p++) {
        float theta = (float)p;
        for (int64_t i = 0; i < hd / 2; i++) {
            cos_out[p * (hd / 2) + i] = cosf(theta);
            sin_out[p * (hd / 2) + i] = sinf(theta);
            theta *= theta_scale;
        }
    }
}

void kernels_layer_norm(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t n, float eps) {
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        /* ggml_norm: mean from a double sum rounded to float; variance from float squares summed
         * 8 at a time (hsum order) into a double; then *scale, *w, +b as separate float ops */
        double sum = 0.0;
        for (int64_t i = 0; i < n; i++) sum += (double)xr[i];
        const float mean = (float)sum / (float)n;
        double sq = 0.0;
        int64_t i = 0;
        for (; i + 8 <= n; i += 8) {
            float v[8];
            for (int l = 0; l < 8; l++) {
                yr[i + l] = xr[i + l] - mean;
                v[l] = yr[i + l] * yr[i + l];
            }
            const float t0 = v[0] + v[4], t1 = v[1] + v[5], t2 = v[2] + v[6], t3 = v[3] + v[7];
            sq += (double)((t0 + t2) + (t1 + t3));
        }
        for (; i < n; i++) {
            yr[i] = xr[i] - mean;
            const float v = yr[i] * yr[i];
            sq += (double)v;
        }
        const float variance = (float)(sq / (double)n);
        const float scale = 1.0f / sqrtf(variance + eps);
        for (int64_t j = 0; j < n; j++) {
            const float t = yr[j] * scale;
            const float u = t * w[j];
            yr[j] = u + b[j];
        }
    }
}

void kernels_gelu(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        if (v <= -10.0f) y[i] = 0.0f;
        else if (v >= 10.0f) y[i] = v;
        else y[i] = fp16_to_fp32(gelu_table[fp32_to_fp16(v)]);
    }
}

void kernels_f32_to_f16(const float *x, uint16_t *y, int64_t n) { K->quantize_f16(x, y, n); }
void kernels_f16_to_f32(const uint16_t *x, float *y, int64_t n) { K->f16_to_f32(x, y, n); }
void kernels_quantize_q8_0(const float *x, uint8_t *y, int64_t k) { K->quantize_q8_0(x, y, k); }
void kernels_quantize_q8_K(const float *x, uint8_t *y, int64_t k) { quantize_q8_K(x, y, k); }

float kernels_vec_dot(int wtype, const uint8_t *w_row, const float *x, int64_t k) {
    type_traits t;
    if (traits_for(wtype, 1, 1, k, &t) != 0 || k % t.block != 0) return NAN;
    float y = NAN;
    if (kernels_matmul(wtype, w_row, 0, 1, k, x, 1, &y, 1) != 0) return NAN;
    return y;
}
