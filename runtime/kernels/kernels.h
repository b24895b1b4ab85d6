/* Quantized CPU kernels of the llmctl runtime.
 *
 * Numerics follow llama.cpp's CPU backend (ggml-cpu) so that logits agree with it:
 *  - activations are quantized to the weight type's "vec_dot type" before each matmul
 *    (Q8_0 for Q4_0/Q8_0 weights, Q8_K for Q6_K, F16 for F16, none for F32);
 *  - Q8_0 activation quantization rounds half to even with id = 127/amax (ggml's AVX2 path);
 *  - attention reads an F16 KV cache with Q rounded to F16, and the softmax probabilities are
 *    rounded to F16 before the weighted sum of V (ggml's non-flash-attention path);
 *  - GELU goes through an fp16 lookup table.
 *
 * Every kernel has a portable C version and an AVX2/FMA/F16C version; kernels_init() picks one
 * at run time from CPUID, so one binary runs on any x86-64 (and any other) CPU.
 * All functions run without the GIL; the matmul and attention drivers use OpenMP threads.
 */
#ifndef LLMCTL_KERNELS_H
#define LLMCTL_KERNELS_H

#include <stdint.h>
#include <stddef.h>

/* ggml type ids */
enum {
    KT_F32 = 0,
    KT_F16 = 1,
    KT_Q4_0 = 2,
    KT_Q8_0 = 8,
    KT_Q6_K = 14,
    KT_Q8_K = 15,
    /* not a ggml type: Q4_0 rows repacked by kernels_repack_q4_0 (REPACKED_Q4_0 in kernels.c) */
    KT_Q4_0_R16 = 100,
    /* not a ggml type: Q8_0 rows repacked by kernels_repack_q8_0 (REPACKED_Q8_0 in kernels.c) */
    KT_Q8_0_R8 = 101,
};

/* Picks the kernel set: "auto" (best the CPU supports), "avx512vnni" (AVX-512 F/BW/VL/VNNI: zmm
 * GEMM tiles), "avxvnni" (AVX2 plus AVX-VNNI), "avx2"
 * or "generic".
 * Returns 0 on success, -1 if the CPU lacks what was asked for. */
int kernels_init(const char *which);
/* Name of the kernel set in use. */
const char *kernels_active(void);
/* Where the matmuls prefetch weights ahead of their use: "auto" (picked from the CPU, see
 * WEIGHT_PREFETCH in kernels.c), "l1" or "l2". The same results either way.
 * Returns 0 on success, -1 for any other name. */
int kernels_prefetch(const char *where);
/* "l1" or "l2": where the matmuls prefetch weights now. */
const char *kernels_prefetch_active(void);
/* What kernels_matmul does to each output y[m, n] once it is computed, in this order (each step
 * rounds as the separate ggml op would): y += bias[n]; y = gelu_tanh(y) through ggml's table;
 * y += add[m, n] (a residual: float32 [M, N], not overlapping y). NULL / 0 skips a step. */
typedef struct {
    const float *bias;
    int gelu;
    const float *add;
} kernels_epilogue;

/* y[m, n] = dot(W[n, :], x[m, :]) for m < M, n < N, then the epilogue `ep` (may be NULL); W rows
 * are `w_row_bytes` apart, of type `wtype`, each holding K elements. x is float32 [M, K], y
 * float32 [M, N]. Returns 0, or -1 for an unsupported type or a K that is not a multiple of the
 * block size. */
int kernels_matmul(int wtype, const uint8_t *w, size_t w_row_bytes, int64_t N, int64_t K,
                   const float *x, int64_t M, float *y, const kernels_epilogue *ep, int n_threads);

/* 1 if the kernel set in use has a tile for repacked Q4_0 rows (KT_Q4_0_R16), which a model
 * should then repack at load; 0 if it would only read them by a slower path. */
int kernels_repacks_q4_0(void);

/* Repacks N rows of K Q4_0 elements (src_row_bytes apart) into dst (N * K / 32 * 18 bytes),
 * for kernels_matmul with KT_Q4_0_R16 and rows of K / 32 * 18 bytes. N must be a multiple of
 * 16. Returns 0, or -1 for an N or K it cannot take. */
int kernels_repack_q4_0(const uint8_t *src, size_t src_row_bytes, int64_t N, int64_t K, uint8_t *dst, int n_threads);

/* 1 if the kernel set in use has a tile for repacked Q8_0 rows (KT_Q8_0_R8), which a model
 * should then repack at load; 0 if it would only read them by a slower path. */
int kernels_repacks_q8_0(void);

/* Repacks N rows of K Q8_0 elements (src_row_bytes apart) into dst (N * K / 32 * 34 bytes),
 * for kernels_matmul with KT_Q8_0_R8 and rows of K / 32 * 34 bytes. N must be a multiple of
 * 8. Returns 0, or -1 for an N or K it cannot take. */
int kernels_repack_q8_0(const uint8_t *src, size_t src_row_bytes, int64_t N, int64_t K, uint8_t *dst, int n_threads);

/* Bytes of one weight row of K elements of type wtype, or -1 if the matmul does not take the
 * type or K is not a multiple of its block. */
int64_t kernels_row_bytes(int wtype, int64_t K);

/* out[i, :] = dequantized W[rows[i], :] (embedding lookup). Returns 0 or -1 (bad type). */
int kernels_get_rows(int wtype, const uint8_t *w, size_t w_row_bytes, int64_t K,
                     const int64_t *rows, int64_t n_rows, float *out);

/* Causal attention for T new tokens at positions pos0 .. pos0+T-1.
 * q: float32 [T, n_head, hd]; k_cache, v_cache: fp16 bits [n_ctx, n_kv_head, hd], already
 * holding positions 0 .. pos0+T-1; out: float32 [T, n_head, hd]. Query head h reads kv head
 * h / (n_head / n_kv_head). Returns 0 or -1 (out of memory). */
int kernels_attention(const float *q, const uint16_t *k_cache, const uint16_t *v_cache,
                      float *out, int64_t T, int64_t pos0, int64_t n_head, int64_t n_kv_head,
                      int64_t hd, float scale, int n_threads);

/* RoPE angles' cos and sin [n_pos, hd/2] exactly as ggml's rope cache holds them. */
void kernels_rope_table(int64_t n_pos, int64_t hd, float freq_base, float *cos_out, float *sin_out);

/* y = LayerNorm(x) * w + b over rows of n, rounding as ggml_norm / ggml_mul / ggml_add do; many
 * rows over n_threads. */
void kernels_layer_norm(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t n, float eps,
                        int n_threads);

/* y = gelu_tanh(x) through ggml's fp16 table, in place allowed; long inputs over n_threads. */
void kernels_gelu(const float *x, float *y, int64_t n, int n_threads);

/* NEOX RoPE of x [T, n_head, hd] in place, row t by the angles cos/sin [T, hd/2], with ggml's
 * fused multiply-adds. */
void kernels_rope_neox(float *x, const float *cos, const float *sin, int64_t T, int64_t n_head, int64_t hd);

/* Conversions and single-row quantizers, exposed for tests against the NumPy references. */
void kernels_f32_to_f16(const float *x, uint16_t *y, int64_t n);
void kernels_f16_to_f32(const uint16_t *x, float *y, int64_t n);
void kernels_quantize_q8_0(const float *x, uint8_t *y, int64_t k);
void kernels_quantize_q8_K(const float *x, uint8_t *y, int64_t k);
/* dot(W row of type wtype, x) with x quantized to the vec_dot type first, by the single-row
 * kernel (the matmul's tiles must give the same bits). n_out is the row count of the matrix the
 * row belongs to, which sets Q4_0's summation order (BLOCK_ORDER in kernels.c). NAN for an
 * unsupported type. */
float kernels_vec_dot(int wtype, const uint8_t *w_row, const float *x, int64_t k, int64_t n_out);

/* Reads the n bytes at p with n_threads threads, as fast as the memory allows, and returns their
 * sum as 64-bit words (all n bytes when n is a multiple of 64 * streams * n_threads; otherwise a
 * short tail is left out), each thread reading its part as `streams` streams side by side,
 * prefetched at kernels_prefetch's level (prefetch 1) or left to the hardware (0): the
 * benchmark times it to measure the memory read bandwidth. */
uint64_t kernels_read_sum(const uint8_t *p, size_t n, int n_threads, int streams, int prefetch);

#endif
