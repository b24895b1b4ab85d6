/* Kernel dispatch and the threaded drivers (matmul, attention); see kernels.h. */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
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

/* The activations of a matmul, quantized once per call, M rows of nb blocks each. Q8_0/Q4_0
 * weights: q holds the Q8_0 blocks, d each block's scale as float, and where the set's gemm
 * reads them (act_corr: the VNNI sets, AVX2 with Q4_0 weights) corr each block's 8 correction
 * lanes (-offset * the sums of bytes 4l..4l+3, offset = 128 for Q8_0 weights, 8 for Q4_0);
 * csum, for Q4_0 in the block order (BLOCK_ORDER), each block's whole correction (else NULL).
 * Q6_K weights: qk holds the Q8_K blocks. */
typedef struct {
    const block_q8_0 *q;
    const float *d;
    const int32_t *corr;
    const int32_t *csum;
    const block_q8_K *qk;
    int64_t nb;
} q8_act;
/* y[m * ldy + n] = dot(weight row n, activation row m) for n < n_rows, m < M */
typedef void (*gemm_fn)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M, float *y,
                        int64_t ldy);

typedef struct {
    const char *name;
    void (*f16_to_f32)(const uint16_t *x, float *y, int64_t n);
    quantize_fn quantize_q8_0;
    quantize_fn quantize_f16;
    dot_fn dot_q8_0, dot_q4_0, dot_q6_K;
    gemm_fn gemm_q8_0, gemm_q4_0;  /* many rows at once, each output as dot_q8_0 / dot_q4_0 */
    dot_fn dot_q4_0_blocks;        /* Q4_0 in llama.cpp's block order (BLOCK_ORDER) */
    gemm_fn gemm_q4_0_blocks;      /* many rows at once, each output as dot_q4_0_blocks */
    gemm_fn gemm_q4_0_r16;         /* the same outputs from repacked rows (REPACKED_Q4_0) */
    int repacks_q4_0;              /* the set has a tile for repacked rows: load should repack */
    gemm_fn gemm_q8_0_r8;          /* gemm_q8_0's outputs from repacked rows (REPACKED_Q8_0) */
    int repacks_q8_0;              /* the set has a tile for them: load should repack */
    gemm_fn gemm_q6_K;             /* many activation rows at once, each output as dot_q6_K */
    int one_pass_rows;             /* every gemm above takes this many activation rows in one pass */
    unsigned act_corr;             /* bit 1 << wtype: that type's gemm reads q8_act.corr */
    dot_fn dot_f16_vec, dot_f16_blas, dot_f32_vec, dot_f32_blas;  /* see kernels_impl.h */
    double (*softmax_exp)(int64_t n, float *s, float max);
    void (*axpy_f16)(int64_t n, float a, const uint16_t *v, float *y);
} kernel_set;

/* BLOCK_ORDER. Q4_0 matrices of a multiple of 8 rows are summed as llama.cpp sums them by
 * default: it repacks such matrices at load (Q4_0_8x8 on x86 with AVX2; the other weight types
 * stay as they are on x86) and sums each 32-value block's products as one integer, added to a
 * row's sum as fmaf((float)block_sum, dx * dy, sum), where ggml's vec_dot (the other Q4_0
 * matrices, and every matrix with its extra buffer types off) adds eight lanes of four products
 * per block, each with its own fma, and sums the lanes at the end. With llama.cpp's defaults,
 * every Q4_0 matmul of a StarCoder2 model gave the block order's bits (26 of 26, prompt and
 * decode rows, read through its eval callback), and vec_dot's order kept the runtime's Q4_0
 * logits 3.7-6.5% of their std away from them over 300 tokens, with 16 of 20 greedy
 * continuations the same (the bar is 1% and 19 of 20); in the block order they are the same
 * bits and 20 of 20. The block order also takes less work: no conversion and fma per lane, one
 * per block. gemm_q4_0_blocks (kernels_impl.h) holds two weight rows per ymm and reduces the
 * rows' lanes by horizontal adds; on an AMD EPYC (Zen 4) core a 3072 x 3072 matmul of 256
 * activation rows ran at 87 instead of 60 GMAC/s, 4 rows at 87 instead of 80 and one at 46
 * instead of 41 (the AVX2 set: 58-62 instead of 43, 63 instead of 44, 41 instead of 32). traits_for
 * picks the order by the matrix's row count, as llama.cpp does. */

/* WEIGHT_PREFETCH. The matmul tiles prefetch each weight stream PREFETCH_AHEAD bytes ahead of
 * its use (GROUPED_ROWS in kernels_impl.h), into L1 by default. On an AMD EPYC of the Zen 4
 * generation (family 25, model 17), prefetching into L2 instead read the 3B Q8_0 model's decode
 * matmuls in 128 instead of 197 ms with 1 thread and 75 instead of 109 ms with 2 (medians of 5
 * alternated passes, the same bits), where Q4_0, bound by its arithmetic there, did not change:
 * a core of that CPU keeps few L1 misses in flight, and prefetches into L1 hold them. The CPUs
 * measured with L1 prefetches keep them: Intel Xeon, Zen 5, and Zen 3 (family 25, model 1),
 * where L1 was as fast or faster in every case (Q8_0 1 thread 161 against 171 ms, Q4_0 124
 * against 130; best of 7 alternated passes). At L2, one activation row's tiles issue none
 * (HARDWARE_DECODE). kernels_prefetch sets it. */
static int weights_to_l2 = 0;

/* How far ahead of its use a weight stream is prefetched (see GROUPED_ROWS in kernels_impl.h):
 * into L1, 2 KiB; into L2 (Zen 4), 4 KiB, which L2 holds as easily for every stream of a tile,
 * and which hides more of the memory's latency: the 3B Q4_0 decode matmuls on one Zen 4 core
 * took 74.0-75.1 ms against 74.5-77.9 with 2 KiB (medians 74.2 and 76.3 of 5 alternated
 * processes, the same bits), Q8_0's within the noise. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 2048
#endif
#ifndef PREFETCH_AHEAD_L2
#define PREFETCH_AHEAD_L2 4096
#endif

/* HARDWARE_DECODE. Where the weights go to L2 (Zen 4), a tile of one activation row issues no
 * prefetches and leaves its streams to the core's hardware prefetchers. Reading the repacked Q4_0
 * tile's pattern (4 streams of 288-byte blocks, no arithmetic) took 27-31 GB/s on one AMD EPYC
 * Zen 4 core with no prefetch instructions and 24 with one PREFETCHT1 per cache line (a
 * prefetch that core is known to drop now and then); four per line, which the tiles issued to
 * make up for the drops, read as fast, but their instructions then bound the tile: one row of
 * repacked Q4_0 ran at 50 instead of 96 GMAC/s from the caches. The 3B model's decode matmuls
 * (one sequence, two alternated pairs of processes a case, the same bits), medians with 1
 * thread: Q4_0 56.7-57.3 ms against 64.5-64.9, Q8_0 102.6-114.3 against 105.1-120.2, the Q6_K
 * head 4.68 against 5.0; with 2: Q4_0 34.5-49.3 against 41.8-51.9, Q8_0 57.7-88.2 against 68.5-93.1. Tiles
 * of more rows keep prefetching: without it four sequences took 106-108 ms against 83 (Q4_0) and
 * 315-331 against 138 (Q8_0) with 1 thread, their arithmetic leaving the hardware's streams
 * behind. CPUs that prefetch into L1 keep their prefetches for one row: on an Intel Xeon (Emerald
 * Rapids, family 6 model 207) the same decode matmuls without them took 144-154 ms against
 * 119-120 (Q4_0) and 245-250 against 220-221 (Q8_0) with 1 thread, 78-80 against 64-66 and
 * 128-134 against 118-119 with 2 (three alternated pairs of processes, medians). */
#define PREFETCHES(RA, to_l2) (!(to_l2) || (RA) > 1)

/* Prefetches the weights the distance above ahead of p, the weights now in use. to_l2:
 * weights_to_l2 as a constant, which AT_PREFETCH_LEVEL passes to every tile. */
static inline __attribute__((always_inline)) void prefetch_ahead(const void *p, int to_l2) {
    if (to_l2)
        __builtin_prefetch((const char *)p + PREFETCH_AHEAD_L2, 0, 2); /* _MM_HINT_T1 */
    else
        __builtin_prefetch((const char *)p + PREFETCH_AHEAD, 0, 3); /* _MM_HINT_T0 */
}

/* prefetch_ahead for a tile of RA activation rows, where it prefetches (HARDWARE_DECODE). */
static inline __attribute__((always_inline)) void prefetch_weights(const void *p, int RA, int to_l2) {
    if (PREFETCHES(RA, to_l2)) prefetch_ahead(p, to_l2);
}

/* GROUP_AHEAD. How far ahead the repacked layouts' tiles prefetch each group (one stream of
 * reads) into L1: 8 KiB in flight over a tile's groups, and 16 KiB for a lone group. A group's
 * stream moves 8 or 16 rows' bytes per block, so one stream 2 KiB ahead (PREFETCH_AHEAD) keeps
 * only ~2 KiB in flight, too little to cover the memory's latency at a core's bandwidth. On an
 * AMD EPYC Zen 5 core (kernel_speed --stream, the same bits, alternated processes) 4 sequences'
 * repacked Q8_0 matmuls, one group per tile, took 89-91 ms against 155-165 with 2 KiB, 92-100 with
 * 8 KiB and 89 with 32 KiB (the file layout's tile, 4 streams of 2 KiB: 97-103); one sequence's, 2
 * groups, 82-85 ms against 86-91 with 2 KiB and 87-93 with 8 KiB; 4 sequences' repacked Q4_0, 2
 * groups, 51-52 ms against 59.5 with 2 KiB and 51 with 8 KiB. Into L2 (Zen 4) the tiles keep
 * their own distances. */
#define GROUP_AHEAD(groups) ((groups) == 1 ? 16384 : 8192 / (groups))

/* prefetch_weights for a tile of `groups` repacked groups: into L2 l2_ahead bytes ahead (each
 * layout's own distance), into L1 GROUP_AHEAD. */
static inline __attribute__((always_inline)) void prefetch_group(const uint8_t *p, int RA, int groups, size_t l2_ahead,
                                                                 int to_l2) {
    if (!PREFETCHES(RA, to_l2)) return;
    if (to_l2)
        __builtin_prefetch(p + l2_ahead, 0, 2);
    else
        __builtin_prefetch(p + GROUP_AHEAD(groups), 0, 3);
}

/* tile(args..., to_l2) with weights_to_l2 passed as the constant 0 or 1: the (inlined) tile is
 * compiled once per level, so its block loop tests nothing but its end. With the level in a
 * variable the loops tested it at every block (GCC unswitched them only in part), and the global
 * itself was loaded again at each prefetch, a memory access to the compiler. On an AMD EPYC Zen 3
 * a Q4_0 decode row took 2-9% less time once the ymm tiles took the constant. */
#define AT_PREFETCH_LEVEL(tile, ...)         \
    do {                                     \
        if (weights_to_l2)                   \
            tile(__VA_ARGS__, 1);            \
        else                                 \
            tile(__VA_ARGS__, 0);            \
    } while (0)

/* Activation rows m0 .. m0+RA-1 against n_groups groups of `rows` repacked rows, gbytes each, by
 * `tile` (q4_r16_tile, q8_r8_tile): tiles of RG groups, as many parts of the rows apart
 * (GROUPED_ROWS), then single groups for what is left. */
#define GROUPED_TILES(tile, rows, RG, RA, w, gbytes, n_groups, a, m0, y, ldy)                                    \
    do {                                                                                                       \
        const int64_t part_ = (n_groups) / (RG);                                                               \
        for (int64_t j_ = 0; j_ < part_; j_++)                                                                 \
            AT_PREFETCH_LEVEL(tile, RG, RA, (w) + j_ * (gbytes), part_ * (gbytes), a, m0,                      \
                              (y) + (m0) * (ldy) + (rows) * j_, ldy, (rows) * part_);                          \
        for (int64_t g_ = (RG) * part_; g_ < (n_groups); g_++)                                                 \
            AT_PREFETCH_LEVEL(tile, 1, RA, (w) + g_ * (gbytes), gbytes, a, m0, (y) + (m0) * (ldy) + (rows) * g_, \
                              ldy, rows);                                                                      \
    } while (0)

/* REPACKED_Q4_0. Q4_0 matrices of a multiple of 16 rows, repacked once (kernels_repack_q4_0, on a
 * thread of its own while the model serves, or by a prompt's pass: runtime/repack.py) for the SIMD sets' tiles
 * (q4_r16_tile in kernels_impl.h, in zmm and in ymm registers), the way llama.cpp repacks Q4_0 by default
 * and for the same reason: a block's 32 products per row summed into one 32-bit lane, with no
 * horizontal adds. Rows 16g .. 16g+15 form group g, stored where those rows were; block i of
 * group g takes R16_BYTES bytes at (g * nb + i) * R16_BYTES: the 16 rows' fp16 scales, then four
 * units of 64 bytes, unit u holding bytes 4u .. 4u+3 of each of the 16 rows' nibbles (row r at
 * 4r). One zmm load is then one unit of 16 rows (a ymm load one of 8): the low nibbles are
 * elements 4u .. 4u+3 of each row, the high ones 16+4u .. 16+4u+3, which vpdpbusd (or maddubs)
 * multiplies by a broadcast of the same four activation bytes. Only the bytes move, so each
 * output keeps the block order's bits (BLOCK_ORDER); the repacked bytes are as many as the
 * file's. */
#define R16_ROWS 16
#define R16_BYTES (R16_ROWS * sizeof(block_q4_0))

/* REPACKED_Q8_0. Q8_0 matrices of a multiple of 8 rows, repacked once as Q4_0 is (runtime/repack.py)
 * for the AVX-512 set's tile (q8_r8_tile in kernels_impl.h), which keeps ggml's vec_dot order:
 * every output is the same bits as dot_q8_0's (8 lanes of 4 products per block, each with its
 * own fma). Rows 8g .. 8g+7 form group g, stored where those rows were; block i of group g takes
 * R8_BYTES bytes at (g * nb + i) * R8_BYTES: the 8 rows' fp16 scales, then four units of 64
 * bytes, unit u holding, for each row r at 8r, the row's lanes u and 4 + u (bytes 4u .. 4u+3 and
 * 16+4u .. 16+4u+3). One zmm load is then one unit: 16 lanes, two of each row, which vpdpbusd
 * multiplies by the activation's lanes u and 4 + u (its block's 32-bit words in PAIR_ORDER,
 * broadcast as one 64-bit word); each 32-bit result is one of ggml's lanes, converted and added
 * by its fma as dot_q8_0 does, and the 8 lanes of a row are summed as hsum8 sums them. The file
 * layout's tiles spend most of their instructions gathering rows' halves into registers and
 * multiplying scales (4 sequences: 4 products of scales per row and block, here 1 for 8 rows);
 * on an AMD EPYC Zen 4 core, 4 activation rows from L2 took 46 instead of 70 cycles per block of
 * 8 rows, one row 16 instead of 29, and a decode step of the 3B model 130 instead of 154 ms for
 * one sequence and 152 instead of 258 for four (1 thread). The repacked bytes are as many as the
 * file's. */
#define R8_ROWS 8
#define R8_BYTES (R8_ROWS * sizeof(block_q8_0))

/* PAIR_ORDER. The activation blocks of a matmul on repacked Q8_0 hold their 8 32-bit words
 * (lanes) in the order 0, 4, 1, 5, 2, 6, 3, 7, and their VNNI corrections (q8_act.corr) too:
 * lanes u and 4 + u side by side, as a unit of the repacked weights holds each row's. */
static void pair_order(block_q8_0 *b) {
    int8_t qs[QK8_0];
    for (int u = 0; u < 4; u++) {
        memcpy(qs + 8 * u, b->qs + 4 * u, 4);
        memcpy(qs + 8 * u + 4, b->qs + 16 + 4 * u, 4);
    }
    memcpy(b->qs, qs, QK8_0);
}

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

/* The same AVX2 code with AVX-VNNI's dpbusd for the int8 dot products (same integers, so the
 * same results, in fewer instructions). */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avxvnni")
#define KERNELS_AVX2 1
#define KERNELS_VNNI 1
#define SUFFIX(name) name##_avxvnni
#define SUFFIX_NAME "avxvnni"
#include "kernels_impl.h"
#undef SUFFIX
#undef SUFFIX_NAME
#undef KERNELS_VNNI
#undef KERNELS_AVX2
#pragma GCC pop_options

/* AVXVNNI_TWIN. The avxvnni code once more, with AVX512-VNNI's (EVEX) encoding of its dpbusd
 * in place of AVX-VNNI's (VEX): the same C and the same integers. The CPUs with AVX-512 VNNI but
 * not AVX-VNNI (AMD Zen 4, Intel Xeons before Sapphire Rapids) run it, so that the avxvnni set's
 * code (Intel's client CPUs since Alder Lake) is tested where the set itself cannot run
 * (tests/kernel_sets.py). Only use("avxvnni-evex") picks it, never "auto". */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512vl,avx512vnni")
#define _mm256_dpbusd_avx_epi32 _mm256_dpbusd_epi32
#define KERNELS_AVX2 1
#define KERNELS_VNNI 1
#define SUFFIX(name) name##_avxvnni_evex
#define SUFFIX_NAME "avxvnni-evex"
#include "kernels_impl.h"
#undef SUFFIX
#undef SUFFIX_NAME
#undef KERNELS_VNNI
#undef KERNELS_AVX2
#undef _mm256_dpbusd_avx_epi32
#pragma GCC pop_options

/* AVX-512 with VNNI: the GEMM tiles hold two weight rows per zmm (see kernels_impl.h); the rest
 * is the avxvnni code with AVX512-VNNI's encoding of dpbusd. Same integers, so the same bits. */
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define KERNELS_AVX2 1
#define KERNELS_VNNI 1
#define KERNELS_AVX512 1
#define SUFFIX(name) name##_avx512vnni
#define SUFFIX_NAME "avx512vnni"
#include "kernels_impl.h"
#undef SUFFIX
#undef SUFFIX_NAME
#undef KERNELS_AVX512
#undef KERNELS_VNNI
#undef KERNELS_AVX2
#pragma GCC pop_options
#endif

static const kernel_set *K = &kernel_set_generic;
static int initialized = 0;
static int64_t l2_bytes = 1 << 20; /* one core's L2, as the C library reports it (set by kernels_init) */
static uint16_t gelu_table[(1 << 16) + 1];  /* +1: the AVX2 gather reads 4 bytes at each entry */

static int cpu_has_avx2(void) {
#if defined(HAVE_AVX2_SET)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

static int cpu_has_avxvnni(void) {
#if defined(HAVE_AVX2_SET)
    return cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
#else
    return 0;
#endif
}

static int cpu_has_avx512vnni(void) {
#if defined(HAVE_AVX2_SET)
    return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
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
#ifdef _SC_LEVEL2_CACHE_SIZE
        const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
        if (l2 > 0) l2_bytes = l2;
#endif
        kernels_prefetch("auto");
        initialized = 1;
    }
    if (which == NULL || strcmp(which, "auto") == 0) {
#if defined(HAVE_AVX2_SET)
        K = cpu_has_avx512vnni() ? &kernel_set_avx512vnni
            : cpu_has_avxvnni()  ? &kernel_set_avxvnni
            : cpu_has_avx2()     ? &kernel_set_avx2
                                 : &kernel_set_generic;
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
    if (strcmp(which, "avxvnni") == 0 && cpu_has_avxvnni()) {
        K = &kernel_set_avxvnni;
        return 0;
    }
    if (strcmp(which, "avx512vnni") == 0 && cpu_has_avx512vnni()) {
        K = &kernel_set_avx512vnni;
        return 0;
    }
    if (strcmp(which, "avxvnni-evex") == 0 && cpu_has_avx512vnni()) { /* see AVXVNNI_TWIN */
        K = &kernel_set_avxvnni_evex;
        return 0;
    }
#endif
    return -1;
}

const char *kernels_active(void) { return K->name; }

/* True if CPUID's vendor string (leaf 0: EBX, EDX, ECX) is `vendor`, such as "AuthenticAMD". */
static int cpu_vendor_is(const char *vendor) {
#if defined(KERNELS_X86) && defined(__GNUC__)
    unsigned a, b, c, d;
    char name[12];
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    memcpy(name, &b, 4);
    memcpy(name + 4, &d, 4);
    memcpy(name + 8, &c, 4);
    return memcmp(name, vendor, sizeof(name)) == 0;
#else
    (void)vendor;
    return 0;
#endif
}

/* True on AMD Zen 4: family 25 with the models AMD gave that generation (0x10-0x1F EPYC Genoa,
 * 0x60-0x7F Ryzen 7000, 0xA0-0xAF EPYC Bergamo and Siena); family 25's other models are Zen 3.
 * See WEIGHT_PREFETCH. */
static int cpu_is_zen4(void) {
#if defined(KERNELS_X86) && defined(__GNUC__)
    unsigned a, b, c, d;
    if (!cpu_vendor_is("AuthenticAMD") || !__get_cpuid(1, &a, &b, &c, &d)) return 0;
    const unsigned base = (a >> 8) & 0xF; /* the extended family and model count from family 15 */
    if (base != 0xF || base + ((a >> 20) & 0xFF) != 25) return 0;
    const unsigned model = ((a >> 12) & 0xF0) | ((a >> 4) & 0xF);
    return (model >= 0x10 && model <= 0x1F) || (model >= 0x60 && model <= 0x7F) || (model >= 0xA0 && model <= 0xAF);
#else
    return 0;
#endif
}

/* *flag from a choice's name: auto_value for "auto" (or NULL), 0 for off_name, 1 for on_name;
 * -1 for any other name. */
static int set_choice(int *flag, const char *which, int auto_value, const char *off_name, const char *on_name) {
    if (which == NULL || strcmp(which, "auto") == 0)
        *flag = auto_value;
    else if (strcmp(which, off_name) == 0)
        *flag = 0;
    else if (strcmp(which, on_name) == 0)
        *flag = 1;
    else
        return -1;
    return 0;
}

int kernels_prefetch(const char *where) { return set_choice(&weights_to_l2, where, cpu_is_zen4(), "l1", "l2"); }

const char *kernels_prefetch_active(void) { return weights_to_l2 ? "l2" : "l1"; }

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
    gemm_fn gemm;           /* Q8_0/Q4_0/Q6_K: the tiled matmul; NULL: dot by dot */
    int act_offset;         /* what the VNNI gemm adds to the weight bytes to make them unsigned */
    int block_order;        /* q8_act.csum: Q4_0 summed in the block order (BLOCK_ORDER) */
    int64_t row_group;      /* rows a chunk keeps together: R16_ROWS for repacked Q4_0, else 4 */
    int pair_order;         /* activation blocks in PAIR_ORDER (repacked Q8_0) */
} type_traits;

/* ggml sums F16/F32 products in tinyBLAS's order when llamafile_sgemm takes the product: two or
 * more activation rows, a row length that is a multiple of 8 and an output count that is a
 * multiple of 4; otherwise in vec_dot's order. */
static int tinyblas_takes(int64_t n_out, int64_t n_rows, int64_t k) { return n_rows >= 2 && k % 8 == 0 && n_out % 4 == 0; }

static int traits_for(int wtype, int64_t n_out, int64_t n_rows, int64_t k, type_traits *t) {
    const int batched = tinyblas_takes(n_out, n_rows, k);
    switch (wtype) {
    case KT_F32: *t = (type_traits){1, 4, NULL, batched ? K->dot_f32_blas : K->dot_f32_vec, NULL, 0, 0, 4, 0}; return 0;
    case KT_F16:
        *t = (type_traits){1, 2, K->quantize_f16, batched ? K->dot_f16_blas : K->dot_f16_vec, NULL, 0, 0, 4, 0};
        return 0;
    case KT_Q8_0:
        *t = (type_traits){QK8_0, sizeof(block_q8_0), K->quantize_q8_0, K->dot_q8_0, K->gemm_q8_0, 128, 0, 4, 0};
        return 0;
    case KT_Q4_0: {
        const int blocks = n_out % 8 == 0; /* BLOCK_ORDER */
        *t = (type_traits){QK4_0, sizeof(block_q8_0), K->quantize_q8_0, blocks ? K->dot_q4_0_blocks : K->dot_q4_0,
                           blocks ? K->gemm_q4_0_blocks : K->gemm_q4_0, 8, blocks, 4, 0};
        return 0;
    }
    case KT_Q4_0_R16: /* no single-row dot: a row's bytes are spread over its group */
        if (n_out % R16_ROWS != 0) return -1;
        *t = (type_traits){QK4_0, sizeof(block_q8_0), K->quantize_q8_0, NULL, K->gemm_q4_0_r16, 8, 1, R16_ROWS, 0};
        return 0;
    case KT_Q8_0_R8:
        if (n_out % R8_ROWS != 0) return -1;
        *t = (type_traits){QK8_0, sizeof(block_q8_0), K->quantize_q8_0, NULL, K->gemm_q8_0_r8, 128, 0, R8_ROWS, 1};
        return 0;
    case KT_Q6_K: *t = (type_traits){QK_K, sizeof(block_q8_K), quantize_q8_K, K->dot_q6_K, K->gemm_q6_K, 0, 0, 4, 0}; return 0;
    default: return -1;
    }
}

static int threads_for(int n_threads, int64_t work) {
    if (n_threads < 1) n_threads = 1;
    if (work < n_threads) n_threads = work > 0 ? (int)work : 1;
    return n_threads;
}

/* Weight rows per unit of work. When the set's gemms take all M activation rows in one pass over
 * the weights (decode, batched decode), up to 4 MiB, since every unit starts its streams of reads
 * cold: a 3B model decoded 3-7% faster with 2 threads than with 256 KiB (one sequence, near this
 * machine's run-to-run noise), and on an Intel Xeon (AMX) core its Q8_0 matmuls for 4 sequences
 * took 215-236 instead of 246-266 ms with 1 thread and 119-127 instead of 130-146 with 2 (the file
 * layout; repacked Q4_0 124-131 and 66-72 instead of 126-131 and 74-75). With more rows, about 256
 * KiB of weights, which stay in L2 while every tile of activation rows passes over them (each
 * weight byte comes from memory once per call).
 * At least four units per thread so that a thread slowed down by another process does not hold
 * up the call; a multiple of `group` (4, or 16 for repacked Q4_0) so that tiles stay whole. */
static int64_t rows_per_chunk(int64_t N, size_t row_bytes, int nt, int64_t M, int64_t group) {
    int64_t rows = (int64_t)(((M <= K->one_pass_rows ? 4096u : 256u) << 10) / (row_bytes ? row_bytes : 1));
    const int64_t balanced = (N + 4 * nt - 1) / (4 * nt);
    if (rows > balanced) rows = balanced;
    rows = (rows + group - 1) / group * group;
    return rows < group ? group : rows;
}

static void gelu_part(const float *x, float *y, int64_t n);

/* The epilogue of outputs y[m, n0 .. n1-1], m < M (rows ldy apart), right after a thread has
 * computed them, while they are in its L1: the bias, GELU and residual steps of a layer cost no
 * pass of their own over memory, no call from Python, and run on every thread. */
static void apply_epilogue(const kernels_epilogue *ep, float *y, int64_t ldy, int64_t M, int64_t n0, int64_t n1) {
    if (ep == NULL) return;
    for (int64_t m = 0; m < M; m++) {
        float *ym = y + m * ldy;
        if (ep->bias != NULL)
            for (int64_t n = n0; n < n1; n++) ym[n] += ep->bias[n];
        if (ep->gelu) gelu_part(ym + n0, ym + n0, n1 - n0);
        if (ep->add != NULL) {
            const float *am = ep->add + m * ldy;
            for (int64_t n = n0; n < n1; n++) ym[n] += am[n];
        }
    }
}

/* Weights with a tiled gemm: quantize the activations once (in parallel over rows), then the
 * gemm over chunks of weight rows. Q8_0/Q4_0 weights take Q8_0 activations with float scales
 * (and VNNI corrections); Q6_K weights take Q8_K activations. */
static int matmul_gemm(int wtype, const type_traits *t, const uint8_t *w, size_t w_row_bytes, int64_t N, int64_t K_,
                       const float *x, int64_t M, float *y, const kernels_epilogue *ep, int n_threads) {
    const int64_t nb = K_ / t->block;
    const size_t n_blocks = (size_t)(M * nb);
    const int q8_0 = wtype != KT_Q6_K;
    uint8_t *q = (uint8_t *)malloc(n_blocks * t->act_block_bytes);
    float *d = q8_0 ? (float *)malloc(n_blocks * sizeof(float)) : NULL;
    const int block_order = t->block_order;
    const int corr_type = t->pair_order ? KT_Q8_0 : wtype; /* act_corr has a bit per ggml type */
    const int with_corr = q8_0 && !block_order && corr_type < 32 && (K->act_corr >> corr_type & 1u);
    int32_t *corr = with_corr ? (int32_t *)malloc(n_blocks * 8 * sizeof(int32_t)) : NULL;
    int32_t *csum = block_order ? (int32_t *)malloc(n_blocks * sizeof(int32_t)) : NULL;
    if (q == NULL || (q8_0 && d == NULL) || (with_corr && corr == NULL) || (block_order && csum == NULL)) {
        free(q);
        free(d);
        free(corr);
        free(csum);
        return -1;
    }
    const int nq = threads_for(n_threads, M);
#pragma omp parallel for num_threads(nq) schedule(static)
    for (int64_t m = 0; m < M; m++) {
        t->quantize(x + m * K_, q + (size_t)(m * nb) * t->act_block_bytes, K_);
        if (d == NULL) continue;
        block_q8_0 *qm = (block_q8_0 *)q + m * nb;
        if (t->pair_order)
            for (int64_t i = 0; i < nb; i++) pair_order(qm + i);
        for (int64_t i = 0; i < nb; i++) {
            d[m * nb + i] = fp16_to_fp32(qm[i].d);
            if (csum != NULL) {
                int32_t sum = 0;
                for (int j = 0; j < QK8_0; j++) sum += qm[i].qs[j];
                csum[m * nb + i] = -t->act_offset * sum;
            }
            if (corr == NULL) continue;
            for (int l = 0; l < 8; l++) {
                const int8_t *b = qm[i].qs + 4 * l;
                corr[(m * nb + i) * 8 + l] = -t->act_offset * (b[0] + b[1] + b[2] + b[3]);
            }
        }
    }
    const q8_act a = {q8_0 ? (const block_q8_0 *)q : NULL, d, corr, csum, q8_0 ? NULL : (const block_q8_K *)q, nb};
    const int nt = threads_for(n_threads, (N + t->row_group - 1) / t->row_group);
    const int64_t chunk = rows_per_chunk(N, w_row_bytes, nt, M, t->row_group);
    const int64_t n_chunks = (N + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t n0 = c * chunk;
        const int64_t n1 = n0 + chunk < N ? n0 + chunk : N;
        t->gemm(w + (size_t)n0 * w_row_bytes, w_row_bytes, n1 - n0, &a, M, y + n0, N);
        apply_epilogue(ep, y, N, M, n0, n1);
    }
    free(q);
    free(d);
    free(corr);
    free(csum);
    return 0;
}

int kernels_repacks_q4_0(void) { return K->repacks_q4_0; }

/* REPACKED_Q4_0 and REPACKED_Q8_0: group g of src's rows (`rows` rows, nb blocks of block_bytes
 * each: an fp16 scale, then the quant bytes as 32-bit words) written interleaved: per block, the
 * rows' scales, then four 64-byte units, unit u holding each row's words u, 4 + u, ... side by
 * side (Q4_0: word u alone; Q8_0: words u and 4 + u). Inlined into each type's loop with its
 * constants: with the sizes as variables (one shared OpenMP loop) a 12288 x 3072 matrix copied at
 * 3.5-3.9 GB/s, against 5-8 GB/s with them constant. */
static inline __attribute__((always_inline)) void repack_group(const uint8_t *src, size_t src_row_bytes, int64_t g,
                                                               int64_t nb, uint8_t *dst, int rows,
                                                               size_t block_bytes) {
    const int words = (int)(block_bytes - 2) / 16; /* of a row's words per unit */
    const size_t group_bytes = (size_t)rows * block_bytes;
    uint8_t *group = dst + (size_t)(g * nb) * group_bytes;
    for (int64_t i = 0; i < nb; i++) {
        uint8_t *out = group + (size_t)i * group_bytes;
        for (int r = 0; r < rows; r++) {
            const uint8_t *b = src + (size_t)(g * rows + r) * src_row_bytes + (size_t)i * block_bytes;
            memcpy(out + 2 * r, b, 2);
            for (int u = 0; u < 4; u++)
                for (int j = 0; j < words; j++)
                    memcpy(out + 2 * rows + 64 * u + 4 * (words * r + j), b + 2 + 4 * (u + 4 * j), 4);
        }
    }
}

/* Whether N rows of src_row_bytes hold whole groups of `rows` rows of K_ elements. */
static int repack_fits(size_t src_row_bytes, int64_t N, int64_t K_, int rows, int qk, size_t block_bytes) {
    return N % rows == 0 && K_ % qk == 0 && src_row_bytes >= (size_t)(K_ / qk) * block_bytes;
}

int kernels_repack_q4_0(const uint8_t *src, size_t src_row_bytes, int64_t N, int64_t K_, uint8_t *dst,
                        int n_threads) {
    if (!repack_fits(src_row_bytes, N, K_, R16_ROWS, QK4_0, sizeof(block_q4_0))) return -1;
    const int64_t n_groups = N / R16_ROWS;
#pragma omp parallel for num_threads(threads_for(n_threads, n_groups)) schedule(static)
    for (int64_t g = 0; g < n_groups; g++)
        repack_group(src, src_row_bytes, g, K_ / QK4_0, dst, R16_ROWS, sizeof(block_q4_0));
    return 0;
}

int kernels_repacks_q8_0(void) { return K->repacks_q8_0; }

int kernels_repack_q8_0(const uint8_t *src, size_t src_row_bytes, int64_t N, int64_t K_, uint8_t *dst,
                        int n_threads) {
    if (!repack_fits(src_row_bytes, N, K_, R8_ROWS, QK8_0, sizeof(block_q8_0))) return -1;
    const int64_t n_groups = N / R8_ROWS;
#pragma omp parallel for num_threads(threads_for(n_threads, n_groups)) schedule(static)
    for (int64_t g = 0; g < n_groups; g++)
        repack_group(src, src_row_bytes, g, K_ / QK8_0, dst, R8_ROWS, sizeof(block_q8_0));
    return 0;
}

int64_t kernels_row_bytes(int wtype, int64_t K) {
    int64_t block, bytes;
    switch (wtype) {
    case KT_F32: block = 1, bytes = sizeof(float); break;
    case KT_F16: block = 1, bytes = sizeof(uint16_t); break;
    case KT_Q8_0:
    case KT_Q8_0_R8: block = QK8_0, bytes = sizeof(block_q8_0); break;
    case KT_Q4_0:
    case KT_Q4_0_R16: block = QK4_0, bytes = sizeof(block_q4_0); break;
    case KT_Q6_K: block = QK_K, bytes = sizeof(block_q6_K); break;
    default: return -1;
    }
    return K >= 0 && K % block == 0 ? K / block * bytes : -1;
}

int kernels_matmul(int wtype, const uint8_t *w, size_t w_row_bytes, int64_t N, int64_t K_, const float *x,
                   int64_t M, float *y, const kernels_epilogue *ep, int n_threads) {
    type_traits t;
    if (traits_for(wtype, N, M, K_, &t) != 0 || K_ % t.block != 0) return -1;
    /* Q6_K decode (one activation row) takes the gemm too: with AVX-512 its tiles read two rows
     * per zmm, each from its own prefetched stream (gemm_q6_K), and the LM head of a 3B Q4_0
     * model read ~33 GB/s on one AMD EPYC (Zen 5) core where one dot product per row reads far
     * less (9.5-10 GB/s on an Intel Xeon core that read 12) */
    if (t.gemm != NULL)
        return matmul_gemm(wtype, &t, w, w_row_bytes, N, K_, x, M, y, ep, n_threads);
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
     * over them: each weight byte is read from memory once per call. */
    const int64_t chunk = 16;
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const int nt = threads_for(n_threads, n_chunks);
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t n0 = c * chunk;
        const int64_t n1 = n0 + chunk < N ? n0 + chunk : N;
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *a = act + (size_t)m * act_bytes;
            float *ym = y + m * N;
            for (int64_t n = n0; n < n1; n++) ym[n] = t.dot(K_, w + (size_t)n * w_row_bytes, a);
        }
        apply_epilogue(ep, y, N, M, n0, n1);
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

#if defined(HAVE_AVX2_SET)
/* The AVX2 code for attention and the elementwise steps runs with every kernel set but the
 * portable one (which the tests select to check the plain C). */
static int simd_elementwise(void) { return K != &kernel_set_generic; }

__attribute__((target("avx2,f16c"))) static void round_probs_avx2(float *p, int64_t n, float inv) {
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_set1_ps(inv));
        _mm256_storeu_ps(p + j, _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)));
    }
    for (; j < n; j++) p[j] = fp16_to_fp32(fp32_to_fp16(p[j] * inv));
}
#endif

/* p[j] = fp16(p[j] * inv) for j < n: the probabilities are rounded to fp16 before they weight V,
 * as in ggml (F16C rounds to nearest even, as fp32_to_fp16 does). */
static void round_probs(float *p, int64_t n, float inv) {
#if defined(HAVE_AVX2_SET)
    if (simd_elementwise()) {
        round_probs_avx2(p, n, inv);
        return;
    }
#endif
    for (int64_t j = 0; j < n; j++) p[j] = fp16_to_fp32(fp32_to_fp16(p[j] * inv));
}

/* Scores p[0 .. n_keys-1] (largest: max) into probabilities as ggml's masked softmax makes them:
 * the padding up to n_pad is -inf, exp and sum as ggml_vec_soft_max_f32, then round_probs. */
static void scores_to_probs(float *p, int64_t n_keys, int64_t n_pad, float max) {
    for (int64_t j = n_keys; j < n_pad; j++) p[j] = -INFINITY;
    const double sum = K->softmax_exp(n_pad, p, max);
    round_probs(p, n_keys, (float)(1.0 / sum));
}

/* o[d] = the sum over the accumulator lanes of acc (one hd-vector per lane: 32, or 8 when
 * batched) in ggml's order: vec_dot's reduce4 then hsum, or tinyBLAS's hsum8. */
static void sum_lanes(const float *acc, int64_t hd, int batched, float *o) {
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
    sum_lanes(acc, hd, batched, o);
}

#if defined(HAVE_AVX2_SET)
#define ATT_ROWS 8 /* query rows of one head that share each key and value row */

/* Q rounded to fp16, as ggml converts it to the cache type, and back to floats for the SIMD
 * paths' dot products (half: hd scratch values). */
static void query_as_fp16(const float *q, uint16_t *half, float *out, int64_t hd) {
    K->quantize_f16(q, half, hd);
    K->f16_to_f32(half, out, hd);
}

/* c[i][j] becomes c[j][i] */
static inline __attribute__((always_inline, target("avx2"))) void transpose8_ps(__m256 c[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(c[2 * i], c[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(c[2 * i], c[2 * i + 1]);
    }
    for (int i = 0; i < 2; i++) {
        u[4 * i] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm256_shuffle_ps(t[4 * i], t[4 * i + 2], 0xEE);
        u[4 * i + 2] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm256_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        c[i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x20);
        c[4 + i] = _mm256_permute2f128_ps(u[i], u[4 + i], 0x31);
    }
}

/* hsum8 of each of a[0..7], in lane r of the result: the same additions in the same order,
 * (x0 + x4) + (x2 + x6) + ((x1 + x5) + (x3 + x7)), 21 instructions for the 8 sums instead of
 * 8 x 5 and a store each. */
static inline __attribute__((always_inline, target("avx2"))) __m256 hsum8_each(const __m256 a[8]) {
    /* pairs (r, r + 4) share a register: its halves hold their 4 sums x_i + x_{i+4} */
    __m256 h[4];
    for (int p = 0; p < 4; p++)
        h[p] = _mm256_add_ps(_mm256_permute2f128_ps(a[p], a[p + 4], 0x31), _mm256_permute2f128_ps(a[p], a[p + 4], 0x20));
    /* then x_i + x_{i+2}: rows (0, 1 | 4, 5) and (2, 3 | 6, 7), two sums each */
    const __m256 s01 = _mm256_add_ps(_mm256_shuffle_ps(h[0], h[1], 0x44), _mm256_shuffle_ps(h[0], h[1], 0xEE));
    const __m256 s23 = _mm256_add_ps(_mm256_shuffle_ps(h[2], h[3], 0x44), _mm256_shuffle_ps(h[2], h[3], 0xEE));
    /* then the two: rows 0, 1, 2, 3 | 4, 5, 6, 7 */
    return _mm256_add_ps(_mm256_shuffle_ps(s01, s23, 0x88), _mm256_shuffle_ps(s01, s23, 0xDD));
}

/* The scores of ATT_ROWS query rows against keys 0 .. n_last-1, key by key: a column of 8 scores
 * at a time, each the sum of its row's 8-lane accumulator (dot_f16_blas's), scaled and masked as
 * one vector into cols (key j's at 8 * j), then turned into rows of n_pad in scores, 8 x 8 at a
 * time; max: each row's largest score. Each key's 8 scores took 8 hsum8s, 8 scalar products,
 * comparisons and stores, as many instructions as its 16 steps of fmas: on an AMD EPYC Zen 3
 * core, 1,000 prompt tokens of the 3B shape (one layer, 1 thread) spent ~90 of their 160-180 ms
 * in the scores that way. */
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) void score_columns_avx2(
    const float *q16, int64_t n_first, int64_t n_last, const uint16_t *k, int64_t kv_stride, int64_t hd,
    int64_t n_pad, float scale, float *cols, float *scores, float *max) {
    const __m256i visible = _mm256_add_epi32(_mm256_set1_epi32((int)n_first), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t j = 0; j < n_last; j++) {
        const uint16_t *kj = k + j * kv_stride;
        __m256 a[ATT_ROWS];
        for (int r = 0; r < ATT_ROWS; r++) a[r] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
            const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kj + i)));
            for (int r = 0; r < ATT_ROWS; r++) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(q16 + r * hd + i), kv, a[r]);
        }
        const __m256 seen = _mm256_castsi256_ps(_mm256_cmpgt_epi32(visible, _mm256_set1_epi32((int)j)));
        const __m256 sc = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_mul_ps(hsum8_each(a), _mm256_set1_ps(scale)), seen);
        _mm256_store_ps(cols + 8 * j, sc);
        top = _mm256_max_ps(sc, top); /* sc first: a NaN score leaves the max as it was, as `>` does */
    }
    _mm256_storeu_ps(max, top);
    for (int64_t j = n_last; j % 8 != 0; j++) /* the last block's columns past the keys: masked */
        _mm256_store_ps(cols + 8 * j, _mm256_set1_ps(-INFINITY));
    for (int64_t j0 = 0; j0 < n_last; j0 += 8) {
        __m256 c[8];
        for (int i = 0; i < 8; i++) c[i] = _mm256_load_ps(cols + 8 * (j0 + i));
        transpose8_ps(c);
        for (int r = 0; r < ATT_ROWS; r++) _mm256_storeu_ps(scores + r * n_pad + j0, c[r]);
    }
}

/* Prompt attention (tinyBLAS's order: two or more query rows) for query rows t0 .. t0+R-1 of
 * one head, R <= ATT_ROWS (a constant once inlined, so that the rows' accumulators stay in
 * registers): each K row is converted from fp16 once for all R rows. Every score is
 * dot_f16_blas's (one 8-lane accumulator, then hsum8) and every weighted sum of V rows is
 * attend_values's, so the bits are those of the row-by-row path. q16: ATT_ROWS query rows,
 * fp16-rounded, as floats (those past R unused); cols: scratch for score_columns_avx2; scores:
 * ATT_ROWS rows of n_pad; vt: the KV head's V transposed (VALUES_TRANSPOSED). */
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) void attend_rows_avx2(
    const float *q16, int R, int64_t n_first, const uint16_t *k, const uint16_t *vt, int64_t kv_stride, int64_t hd,
    int64_t n_pad, float scale, float *cols, float *scores, float *out, int64_t out_stride) {
    const int64_t n_last = n_first + R - 1; /* row r sees keys 0 .. n_first + r - 1 */
    float max[ATT_ROWS];
    score_columns_avx2(q16, n_first, n_last, k, kv_stride, hd, n_pad, scale, cols, scores, max);
    /* Each row's softmax runs over its own keys, padded to 8, not over n_pad: the exponentials
     * of the masked keys are 0, and a group of 8 of them adds 0 to softmax_exp's sum. */
    const int64_t n_cols = (n_last + 7) & ~(int64_t)7;
    for (int r = 0; r < R; r++) {
        float *p = scores + r * n_pad;
        const int64_t n_exp = (n_first + r + 7) & ~(int64_t)7;
        scores_to_probs(p, n_first + r, n_exp, max[r]);
        for (int64_t j = n_exp; j < n_cols; j++) p[j] = 0.0f;
    }
    for (int64_t d = 0; d < hd; d++) {
        const uint16_t *vd = vt + d * n_pad;
        __m256 a[ATT_ROWS];
        for (int r = 0; r < R; r++) a[r] = _mm256_setzero_ps();
        for (int64_t j = 0; j < n_cols; j += 8) {
            const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vd + j)));
            for (int r = 0; r < R; r++) a[r] = _mm256_fmadd_ps(_mm256_loadu_ps(scores + r * n_pad + j), v, a[r]);
        }
        for (int r = 0; r < R; r++) out[r * out_stride + d] = hsum8_avx2(a[r]);
    }
}

#define ATT_HEADS 3 /* query heads of one KV head that share each K and V row (4 accumulators each) */

/* Decode attention (vec_dot's order: one query row) for query heads h0 .. h0+G-1 of one row,
 * all reading the same KV head, G <= ATT_HEADS: each K and V row is converted once for the G
 * heads. Every score is dot_f16_vec's (4 accumulators over steps of 32, then reduce4) and every
 * weighted sum attend_values's with 32 lanes, read from V transposed (DECODE_VALUES_TRANSPOSED);
 * hd must be a multiple of 32. q16: the G query rows, fp16-rounded, as floats; scores: G rows of
 * n_pad; vt: the KV head's V transposed, hd rows of n_pad. */
static inline __attribute__((always_inline, target("avx2,fma,f16c"))) void attend_heads_avx2(const float *q16, int G, int64_t n_keys,
                                                                      const uint16_t *k, const uint16_t *vt,
                                                                      int64_t kv_stride, int64_t hd, int64_t n_pad,
                                                                      float scale, float *scores, float *out) {
    float max[ATT_HEADS];
    for (int g = 0; g < G; g++) max[g] = -INFINITY;
    for (int64_t j = 0; j < n_keys; j++) {
        const uint16_t *kj = k + j * kv_stride;
        __m256 a[ATT_HEADS][4];
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++) a[g][c] = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 32) {
            for (int c = 0; c < 4; c++) {
                const __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kj + i + 8 * c)));
                for (int g = 0; g < G; g++) a[g][c] = _mm256_fmadd_ps(_mm256_loadu_ps(q16 + g * hd + i + 8 * c), kv, a[g][c]);
            }
        }
        for (int g = 0; g < G; g++) {
            const float sc = reduce4_avx2(a[g][0], a[g][1], a[g][2], a[g][3]) * scale;
            scores[g * n_pad + j] = sc;
            if (sc > max[g]) max[g] = sc;
        }
    }
    for (int g = 0; g < G; g++) scores_to_probs(scores + g * n_pad, n_keys, n_pad, max[g]);
    /* out[d] = dot(vt[d], p) as vec_dot sums it: key j in accumulator (j / 8) % 4, lane j % 8, in
     * key order, then reduce4. The lanes of the last 8 keys past n_keys have zero probabilities
     * and zero (or finite) values, so they add nothing. */
    for (int64_t d = 0; d < hd; d++) {
        const uint16_t *vd = vt + d * n_pad;
        __m256 a[ATT_HEADS][4];
        for (int g = 0; g < G; g++)
            for (int c = 0; c < 4; c++) a[g][c] = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 32 <= n_keys; j += 32)
            for (int c = 0; c < 4; c++) {
                const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vd + j + 8 * c)));
                for (int g = 0; g < G; g++)
                    a[g][c] = _mm256_fmadd_ps(_mm256_loadu_ps(scores + g * n_pad + j + 8 * c), vv, a[g][c]);
            }
        for (int c = 0; c < 4 && j + 8 * c < n_keys; c++) {
            const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(vd + j + 8 * c)));
            for (int g = 0; g < G; g++)
                a[g][c] = _mm256_fmadd_ps(_mm256_loadu_ps(scores + g * n_pad + j + 8 * c), vv, a[g][c]);
        }
        for (int g = 0; g < G; g++) out[g * hd + d] = reduce4_avx2(a[g][0], a[g][1], a[g][2], a[g][3]);
    }
}

/* attend_heads_avx2 with G a constant, so that its accumulators stay in registers */
#define ATTEND_HEADS(G_)                                                                                              \
    __attribute__((target("avx2,fma,f16c"))) static void attend_heads##G_(                                          \
        const float *q16, int64_t n_keys, const uint16_t *k, const uint16_t *vt, int64_t kv_stride, int64_t hd,      \
        int64_t n_pad, float scale, float *scores, float *out) {                                                      \
        attend_heads_avx2(q16, G_, n_keys, k, vt, kv_stride, hd, n_pad, scale, scores, out);                         \
    }
ATTEND_HEADS(1)
ATTEND_HEADS(2)
ATTEND_HEADS(3)

/* attend_heads_avx2 with AVX-512 for hd == ATT_HD512, giving the same bits with fewer
 * instructions and without its L1 misses. Scores: a zmm holds two of vec_dot's accumulators
 * (elements 0-15 of each step of 32 are accumulators 0 and 1, elements 16-31 accumulators 2 and
 * 3), whose four 256-bit halves reduce4 then sums as the AVX2 path does, 16 keys at a time
 * (ATT_KEYS512). Values:
 * the same lane classes as the AVX2 loop (key j weighs into class j % 32, each class summed over
 * its keys in key order with fma, the classes combined as attend_values combines them), but a
 * class at a time over whole V rows, 16 values of d per zmm: the AVX2 loop reads 16 bytes of each
 * of 32 rows per step and missed L1 on nearly every load (on an AMD EPYC Zen 4, 1 thread,
 * position 256, the values took 80 of the 111 us of a layer's attention; then the whole of it
 * took about 50). G goes up to ATT_HEADS512 = 6 heads, twice the AVX2 path's, so that each K and
 * V row is converted and read half as often; the values then go half of d at a time, to keep
 * 6 x 4 accumulators in registers. x: scratch of 32 x G x hd / 2 floats. */
#define ATT_HD512 128
#define ATT_HEADS512 6 /* attend512_by_heads has one kernel per G up to this */
/* ATT_AHEAD. The score loop also asks for the K row ATT_AHEAD keys ahead (into L1) and the V row
 * as far ahead (into L2, for the value passes), on top of prefetch_kv_rows' sweep: on an AMD EPYC
 * (Zen 4), where the sweep alone changed nothing (its prefetches issued back to back, it seems,
 * are dropped), `kernel_speed --attention`'s cold layers at position 2000 took 17-22 instead of
 * 22-26 ms per token with 1 thread (medians of 5 passes alternated with the build before; no
 * change at 500; noisy with 2 threads). 8 and 32 rows ahead did about as well. The same bits. */
#define ATT_AHEAD 16
/* ATT_KEYS512. Keys whose scores attend_heads_avx512 finishes together: the rest of reduce4
 * after its first add (two extracts, two adds, two hadds), about as many instructions per key and
 * head as the key's fmas, runs on 16 keys at once in 46 (reduce4_each512). On an Intel Xeon
 * (AMX), `kernel_speed --attention` at position 2000 with 1 thread, warm: 10.9-11.0 ms per
 * token against 12.4-12.5 (two alternated pairs of processes; 2 threads 5.7-6.5 against
 * 6.7-7.0); cold, as decode meets it, 15.2-16.4 against 16.5-16.9, and 4 sequences decoding
 * at position 2000 spent 59-60 ms a step in attention against 62-66. The same bits. */
#define ATT_KEYS512 16

/* reduce4 of each of 16 keys' accumulators, folded: f[k] = a01 + a23 (elements 0-7 accumulators
 * 0 + 2, 8-15 1 + 3); element k of the result is key k's score before scaling, by the same
 * additions in the same order: x = lo256 + hi256, y = lo128(x) + hi128(x), (y0 + y1) + (y2 + y3). */
static inline __attribute__((always_inline, target("avx2,fma,f16c,avx512f,avx512vl"))) __m512 reduce4_each512(
    const __m512 f[ATT_KEYS512]) {
    __m512 x[8], y[4], h[2];
    for (int p = 0; p < 8; p++) /* keys 2p, 2p + 1: [x | x'] */
        x[p] = _mm512_add_ps(_mm512_shuffle_f32x4(f[2 * p], f[2 * p + 1], 0x44),
                             _mm512_shuffle_f32x4(f[2 * p], f[2 * p + 1], 0xEE));
    for (int p = 0; p < 4; p++) /* keys 4p .. 4p + 3, 4 lanes each */
        y[p] = _mm512_add_ps(_mm512_shuffle_f32x4(x[2 * p], x[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(x[2 * p], x[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++) /* hadd: 128-bit lane L holds keys 8p + L and 8p + 4 + L, two sums each */
        h[p] = _mm512_add_ps(_mm512_shuffle_ps(y[2 * p], y[2 * p + 1], 0x88),
                             _mm512_shuffle_ps(y[2 * p], y[2 * p + 1], 0xDD));
    /* hadd again: element 4L + e is key L + 4e */
    const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(h[0], h[1], 0x88), _mm512_shuffle_ps(h[0], h[1], 0xDD));
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(order, r);
}
static inline __attribute__((always_inline, target("avx2,fma,f16c,avx512f,avx512vl"))) void attend_heads_avx512(
    const float *q16, int G, int64_t n_keys, const uint16_t *k, const uint16_t *v, int64_t kv_stride, int64_t n_pad,
    float scale, float *scores, float *x, float *out) {
    enum { HALF = ATT_HD512 / 2, NB = HALF / 16 };
    __m512 top[ATT_HEADS512];
    __m512 folded[ATT_HEADS512][ATT_KEYS512]; /* a01 + a23 of each head and key of a block */
    for (int g = 0; g < G; g++) top[g] = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < n_keys; j0 += ATT_KEYS512) {
        const int nk = n_keys - j0 < ATT_KEYS512 ? (int)(n_keys - j0) : ATT_KEYS512;
        for (int jj = 0; jj < nk; jj++) {
            const int64_t j = j0 + jj;
            const uint16_t *kj = k + j * kv_stride;
            if (j + ATT_AHEAD < n_keys) { /* see ATT_AHEAD */
                const int64_t ahead = (j + ATT_AHEAD) * kv_stride;
                const char *kp = (const char *)(k + ahead), *vp = (const char *)(v + ahead);
                for (int b = 0; b < ATT_HD512 * (int)sizeof(uint16_t); b += 64) {
                    _mm_prefetch(kp + b, _MM_HINT_T0);
                    _mm_prefetch(vp + b, _MM_HINT_T1);
                }
            }
            __m512 a01[ATT_HEADS512], a23[ATT_HEADS512];
            for (int g = 0; g < G; g++) a01[g] = a23[g] = _mm512_setzero_ps();
            for (int i = 0; i < ATT_HD512; i += 32) {
                const __m512 k01 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kj + i)));
                const __m512 k23 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kj + i + 16)));
                for (int g = 0; g < G; g++) {
                    a01[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q16 + g * ATT_HD512 + i), k01, a01[g]);
                    a23[g] = _mm512_fmadd_ps(_mm512_loadu_ps(q16 + g * ATT_HD512 + i + 16), k23, a23[g]);
                }
            }
            for (int g = 0; g < G; g++) folded[g][jj] = _mm512_add_ps(a01[g], a23[g]); /* reduce4's first step */
        }
        const __mmask16 seen = (__mmask16)((1u << nk) - 1);
        for (int g = 0; g < G; g++) {
            for (int jj = nk; jj < ATT_KEYS512; jj++) /* lanes past the keys: defined, then masked */
                folded[g][jj] = _mm512_setzero_ps();
            const __m512 sc = _mm512_mul_ps(reduce4_each512(folded[g]), _mm512_set1_ps(scale));
            _mm512_mask_storeu_ps(scores + g * n_pad + j0, seen, sc);
            top[g] = _mm512_mask_max_ps(top[g], seen, sc, top[g]); /* sc first: a NaN score leaves the max */
        }
    }
    float max[ATT_HEADS512];
    for (int g = 0; g < G; g++) max[g] = _mm512_reduce_max_ps(top[g]);
    for (int g = 0; g < G; g++) scores_to_probs(scores + g * n_pad, n_keys, n_pad, max[g]);
    /* half of d at a time, so that G heads' accumulators fit in the registers */
    for (int d0 = 0; d0 < ATT_HD512; d0 += HALF) {
        for (int cls = 0; cls < 32; cls++) {
            __m512 acc[ATT_HEADS512][NB];
            for (int g = 0; g < G; g++)
                for (int b = 0; b < NB; b++) acc[g][b] = _mm512_setzero_ps();
            for (int64_t j = cls; j < n_keys; j += 32) {
                for (int b = 0; b < NB; b++) {
                    const __m512 vv =
                        _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(v + j * kv_stride + d0 + 16 * b)));
                    for (int g = 0; g < G; g++)
                        acc[g][b] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * n_pad + j]), vv, acc[g][b]);
                }
            }
            for (int g = 0; g < G; g++)
                for (int b = 0; b < NB; b++) _mm512_storeu_ps(x + ((size_t)cls * G + g) * HALF + 16 * b, acc[g][b]);
        }
        /* class 8c + l is accumulator c, lane l of vec_dot: lanes (a0 + a2) + (a1 + a3), then hsum's tree */
#define CLS(c, l) _mm512_loadu_ps(x + ((size_t)(8 * (c) + (l)) * G + g) * HALF + d)
        for (int g = 0; g < G; g++)
            for (int d = 0; d < HALF; d += 16) {
                __m512 xl[8];
                for (int l = 0; l < 8; l++)
                    xl[l] = _mm512_add_ps(_mm512_add_ps(CLS(0, l), CLS(2, l)), _mm512_add_ps(CLS(1, l), CLS(3, l)));
                const __m512 t0 = _mm512_add_ps(xl[0], xl[4]), t1 = _mm512_add_ps(xl[1], xl[5]);
                const __m512 t2 = _mm512_add_ps(xl[2], xl[6]), t3 = _mm512_add_ps(xl[3], xl[7]);
                _mm512_storeu_ps(out + g * ATT_HD512 + d0 + d,
                                 _mm512_add_ps(_mm512_add_ps(t0, t1), _mm512_add_ps(t2, t3)));
            }
#undef CLS
    }
}

/* attend_heads_avx512 with G a constant, so that its accumulators stay in registers */
#define ATTEND_HEADS512(G_)                                                                                           \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512vl"))) static void attend_heads512_##G_(                    \
        const float *q16, int64_t n_keys, const uint16_t *k, const uint16_t *v, int64_t kv_stride, int64_t n_pad,    \
        float scale, float *scores, float *x, float *out) {                                                           \
        attend_heads_avx512(q16, G_, n_keys, k, v, kv_stride, n_pad, scale, scores, x, out);                          \
    }
ATTEND_HEADS512(1)
ATTEND_HEADS512(2)
ATTEND_HEADS512(3)
ATTEND_HEADS512(4)
ATTEND_HEADS512(5)
ATTEND_HEADS512(6)

typedef void (*attend512_fn)(const float *, int64_t, const uint16_t *, const uint16_t *, int64_t, int64_t, float,
                             float *, float *, float *);
static const attend512_fn attend512_by_heads[ATT_HEADS512 + 1] = {
    NULL, attend_heads512_1, attend_heads512_2, attend_heads512_3, attend_heads512_4, attend_heads512_5,
    attend_heads512_6};

/* Decode meets a layer's K and V rows cold: the weights streamed in since the last token have
 * evicted them, and the score and value loops, which read 256 bytes of every 512 (a row of one
 * KV head) and, with AVX-512, the values a lane class at a time (every 32nd row), wait on their
 * misses. So a thread first asks for its KV head's rows in one sweep of prefetches into L2, no
 * more than half of L2 of them (ATT_PREFETCH_SHARE), once per KV head and call: K's alone (v
 * NULL) where the values were read once already, into DECODE_VALUES_TRANSPOSED. On an Intel Xeon (AMX, 2 MB
 * L2), 1 / 2 threads, `kernel_speed --attention` at position 2000 (30 layers, 64 MB read between
 * them) gave 29.4 / 18.3 ms per token with 3 heads a work item and no prefetch, 26.3 / 15.1 with
 * the prefetch, 23.8 / 13.2 with it and 6 heads (6 heads without it were slower than 3: the
 * misses, not the arithmetic, bound a cold layer); a 3B Q4_0 model decoding at position 2000
 * spent 31 / 17 ms per token in attention before, 27 / 12 after. The bits do not change. */
#define ATT_PREFETCH_SHARE 2
static void prefetch_kv_rows(const uint16_t *k, const uint16_t *v, int64_t n_rows, int64_t kv_stride, int64_t hd) {
    const int64_t row_bytes = hd * (int64_t)sizeof(uint16_t);
    const int64_t rows = l2_bytes / ATT_PREFETCH_SHARE / (2 * row_bytes);
    for (int64_t j = 0; j < (n_rows < rows ? n_rows : rows); j++) {
        const char *kj = (const char *)(k + j * kv_stride);
        const char *vj = v != NULL ? (const char *)(v + j * kv_stride) : NULL;
        for (int64_t b = 0; b < row_bytes; b += 64) {
            _mm_prefetch(kj + b, _MM_HINT_T1);
            if (v != NULL) _mm_prefetch(vj + b, _MM_HINT_T1);
        }
    }
}

/* DECODE_VALUES_TRANSPOSED. Without AVX-512, decode's weighted sums read V transposed as fp16:
 * row d of a KV head holds element d of every V row (zero past the keys), built once per call
 * for every work item, 8 x 8 blocks at a time. vec_dot puts key j of a weighted sum in lane
 * (j / 8) % 4, j % 8, so element d's sum is then a dot product over one contiguous row, as a
 * score is over a K row. Read in place, the 32 lane classes took V a lane class at a time:
 * every 8th row, 4 KiB apart (the rows of both KV heads interleave), which maps those rows onto
 * a few sets of L1 and L2 and missed on most of them. On an AMD EPYC Zen 3 core, the 3B shape's
 * attention at position 2000 (kernel_speed --attention, 1 thread) spent ~30 of its 40 ms warm
 * in the weighted sums. The same bits (tests/test_kernels.py). The prompt case reads the same
 * rows (VALUES_TRANSPOSED). */
__attribute__((target("avx2"))) static void transpose_values(const uint16_t *v_cache, int64_t n_rows,
                                                             int64_t kv_stride, int64_t hd, int64_t n_pad,
                                                             int64_t kvh, int64_t j0, uint16_t *vt) {
    for (int64_t d0 = 0; d0 < hd; d0 += 8) {
        __m128i r[8];
        for (int i = 0; i < 8; i++)
            r[i] = j0 + i < n_rows ? _mm_loadu_si128((const __m128i *)(v_cache + (j0 + i) * kv_stride + kvh * hd + d0))
                                   : _mm_setzero_si128();
        __m128i a[8], b[8];
        for (int i = 0; i < 4; i++) {
            a[2 * i] = _mm_unpacklo_epi16(r[2 * i], r[2 * i + 1]);
            a[2 * i + 1] = _mm_unpackhi_epi16(r[2 * i], r[2 * i + 1]);
        }
        for (int i = 0; i < 2; i++) {
            b[4 * i] = _mm_unpacklo_epi32(a[4 * i], a[4 * i + 2]);
            b[4 * i + 1] = _mm_unpackhi_epi32(a[4 * i], a[4 * i + 2]);
            b[4 * i + 2] = _mm_unpacklo_epi32(a[4 * i + 1], a[4 * i + 3]);
            b[4 * i + 3] = _mm_unpackhi_epi32(a[4 * i + 1], a[4 * i + 3]);
        }
        uint16_t *out = vt + (kvh * hd + d0) * n_pad + j0;
        for (int i = 0; i < 4; i++) {
            _mm_storeu_si128((__m128i *)(out + (2 * i) * n_pad), _mm_unpacklo_epi64(b[i], b[4 + i]));
            _mm_storeu_si128((__m128i *)(out + (2 * i + 1) * n_pad), _mm_unpackhi_epi64(b[i], b[4 + i]));
        }
    }
}

/* transpose_values for every KV head's first n_rows rows, shared among the threads of the
 * enclosing parallel region (an orphaned `omp for`, with its barrier at the end). */
static void transpose_all_values(const uint16_t *v_cache, int64_t n_rows, int64_t kv_stride, int64_t hd,
                                 int64_t n_pad, int64_t n_kv_head, uint16_t *vt) {
#pragma omp for schedule(static)
    for (int64_t b = 0; b < n_kv_head * (n_pad / 8); b++)
        transpose_values(v_cache, n_rows, kv_stride, hd, n_pad, b / (n_pad / 8), (b % (n_pad / 8)) * 8, vt);
}

/* The decode case, tiled: work items are (query row, KV head, group of ATT_HEADS or ATT_HEADS512 heads). */
static int attention_decode_avx2(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, float *out,
                                 int64_t T, int64_t pos0, int64_t n_head, int64_t n_kv_head, int64_t hd, float scale,
                                 int n_threads) {
    const int64_t n_pad = (pos0 + T + 7) & ~(int64_t)7;
    const int64_t group = n_head / n_kv_head, kv_stride = n_kv_head * hd;
    /* the avx512vnni set's CPUs take attend_heads_avx512 */
    const int use512 = K == &kernel_set_avx512vnni && hd == ATT_HD512;
    const int heads = use512 ? ATT_HEADS512 : ATT_HEADS; /* per work item */
    const int64_t per_kv = (group + heads - 1) / heads, n_items = T * n_kv_head * per_kv;
    uint16_t *vt = use512 ? NULL : (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(kv_stride * n_pad));
    if (!use512 && vt == NULL) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads_for(n_threads, n_items))
    {
        if (vt != NULL) transpose_all_values(v_cache, pos0 + T, kv_stride, hd, n_pad, n_kv_head, vt);
        float *scores = (float *)malloc(sizeof(float) * (size_t)(heads * n_pad));
        float *q16 = (float *)malloc(sizeof(float) * (size_t)(heads * hd));
        uint16_t *half = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)hd);
        float *x512 = use512 ? (float *)malloc(sizeof(float) * (size_t)(32 * ATT_HEADS512 * hd / 2)) : NULL;
        if (scores == NULL || q16 == NULL || half == NULL || (use512 && x512 == NULL)) {
#pragma omp atomic write
            failed = 1;
        } else {
            int64_t fetched = -1; /* the KV head this thread has prefetched */
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < n_items; item++) {
                const int64_t t = item / (n_kv_head * per_kv), kvh = (item / per_kv) % n_kv_head;
                const int64_t h0 = kvh * group + (item % per_kv) * heads;
                const int G = (int)(kvh * group + group - h0 < heads ? kvh * group + group - h0 : heads);
                for (int g = 0; g < G; g++) query_as_fp16(q + (t * n_head + h0 + g) * hd, half, q16 + g * hd, hd);
                const int64_t n_keys = pos0 + t + 1;
                const uint16_t *kh = k_cache + kvh * hd, *vh = v_cache + kvh * hd;
                if (kvh != fetched) {
                    prefetch_kv_rows(kh, vt != NULL ? NULL : vh, pos0 + T, kv_stride, hd);
                    fetched = kvh;
                }
                float *o = out + (t * n_head + h0) * hd;
                const uint16_t *vth = vt != NULL ? vt + kvh * hd * n_pad : NULL;
                if (x512 != NULL) attend512_by_heads[G](q16, n_keys, kh, vh, kv_stride, n_pad, scale, scores, x512, o);
                else if (G == 3) attend_heads3(q16, n_keys, kh, vth, kv_stride, hd, n_pad, scale, scores, o);
                else if (G == 2) attend_heads2(q16, n_keys, kh, vth, kv_stride, hd, n_pad, scale, scores, o);
                else attend_heads1(q16, n_keys, kh, vth, kv_stride, hd, n_pad, scale, scores, o);
            }
        }
        free(scores);
        free(q16);
        free(half);
        free(x512);
    }
    free(vt);
    return failed ? -1 : 0;
}

/* VALUES_TRANSPOSED. The prompt case reads V transposed, as decode does and by the same code
 * (transpose_values, DECODE_VALUES_TRANSPOSED): row d of a KV head is element d of every V row,
 * in fp16, zero past the keys. Element j of a weighted sum goes to lane j % 8 (tinyBLAS's order,
 * attend_values), so for one output element d the 8 lanes are one ymm that takes p[j .. j+7]
 * times vt[d][j .. j+7] by one fma, and the R rows' sums stay in registers as the keys pass.
 * Adding each V row into 8 x hd accumulators in memory instead (as attend_values does) cost a
 * load and a store per fma: on an AMD EPYC Zen 3 core, 1,000 prompt tokens of the StarCoder2-3B
 * shape spent 242-290 ms per layer in attention that way, 107-119 with this (and each row's
 * softmax over its own keys), the same bits. The rows were floats until the prompt took
 * transpose_values: half the bytes for a KV head (256 KiB at 1,000 keys) to stream from L2 for
 * each of its 12 query heads, and a conversion per 8 fmas. */

/* The prompt case, tiled: work items are (group of ATT_ROWS query rows, head). */
__attribute__((target("avx2,fma,f16c"))) static int attention_prompt_avx2(const float *q, const uint16_t *k_cache,
                                                                          const uint16_t *v_cache, float *out, int64_t T,
                                                                          int64_t pos0, int64_t n_head,
                                                                          int64_t n_kv_head, int64_t hd, float scale,
                                                                          int n_threads) {
    const int64_t n_keys = pos0 + T, n_pad = (n_keys + 7) & ~(int64_t)7;
    const int64_t group = n_head / n_kv_head, kv_stride = n_kv_head * hd;
    const int64_t n_tiles = (T + ATT_ROWS - 1) / ATT_ROWS;
    uint16_t *vt = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(kv_stride * n_pad));
    if (vt == NULL) return -1;
    int failed = 0;
#pragma omp parallel num_threads(threads_for(n_threads, n_tiles * n_head))
    {
        transpose_all_values(v_cache, n_keys, kv_stride, hd, n_pad, n_kv_head, vt);
        float *scores = (float *)malloc(sizeof(float) * (size_t)(ATT_ROWS * n_pad));
        float *cols = (float *)aligned_alloc(32, sizeof(float) * (size_t)(ATT_ROWS * n_pad));
        /* zeroed: a last tile's rows past R (scored, never used) are never unwritten memory */
        float *q16 = (float *)calloc((size_t)(ATT_ROWS * hd), sizeof(float));
        uint16_t *half = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)hd);
        if (scores == NULL || cols == NULL || q16 == NULL || half == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(dynamic, 1)
            for (int64_t item = 0; item < n_tiles * n_head; item++) {
                const int64_t t0 = (item / n_head) * ATT_ROWS, h = item % n_head;
                const int R = (int)(T - t0 < ATT_ROWS ? T - t0 : ATT_ROWS);
                for (int r = 0; r < R; r++) query_as_fp16(q + ((t0 + r) * n_head + h) * hd, half, q16 + r * hd, hd);
                const uint16_t *k = k_cache + (h / group) * hd;
                const uint16_t *v = vt + (h / group) * hd * n_pad;
                float *o = out + (t0 * n_head + h) * hd;
                if (R == ATT_ROWS) /* the constant lets the compiler keep each row's sums in registers */
                    attend_rows_avx2(q16, ATT_ROWS, pos0 + t0 + 1, k, v, kv_stride, hd, n_pad, scale, cols, scores, o,
                                     n_head * hd);
                else
                    attend_rows_avx2(q16, R, pos0 + t0 + 1, k, v, kv_stride, hd, n_pad, scale, cols, scores, o,
                                     n_head * hd);
            }
        }
        free(scores);
        free(cols);
        free(q16);
        free(half);
    }
    free(vt);
    return failed ? -1 : 0;
}
#endif

int kernels_attention(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, float *out, int64_t T,
                      int64_t pos0, int64_t n_head, int64_t n_kv_head, int64_t hd, float scale, int n_threads) {
#if defined(HAVE_AVX2_SET)
    if (simd_elementwise() && tinyblas_takes(256, T, hd) && tinyblas_takes(hd, T, 256) && hd % 8 == 0)
        return attention_prompt_avx2(q, k_cache, v_cache, out, T, pos0, n_head, n_kv_head, hd, scale, n_threads);
    if (simd_elementwise() && !tinyblas_takes(256, T, hd) && !tinyblas_takes(hd, T, 256) && hd % 32 == 0)
        return attention_decode_avx2(q, k_cache, v_cache, out, T, pos0, n_head, n_kv_head, hd, scale, n_threads);
#endif
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
                scores_to_probs(scores, n_keys, n_pad, max);
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

/* ggml_norm's mean: a sum in double, element by element, of four rows at once: four
 * independent chains of adds, each row's in its own order, where one row's chain is bound by the
 * latency of an add per element. Not vectorized: GCC would build each vector from four rows'
 * strided floats. On an Emerald Rapids Xeon four rows of 3072 took 10.7 us this way, 14.7 us
 * vectorized and 16 us one row after another; 256 rows 0.62 ms, 0.30 ms with two threads, against
 * 0.96 ms. The same bits. */
__attribute__((optimize("no-tree-vectorize"))) static void row_sums4(const float *x0, const float *x1,
                                                                     const float *x2, const float *x3,
                                                                     int64_t n, double sum[4]) {
    double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
    for (int64_t i = 0; i < n; i++) {
        s0 += (double)x0[i];
        s1 += (double)x1[i];
        s2 += (double)x2[i];
        s3 += (double)x3[i];
    }
    sum[0] = s0, sum[1] = s1, sum[2] = s2, sum[3] = s3;
}

/* One row of ggml_norm, then *w, +b, from its mean's double sum: the variance from float squares
 * summed 8 at a time (hsum order) into a double; then *scale, *w, +b as separate float ops. */
static void layer_norm_row(const float *xr, double sum, const float *w, const float *b, float *yr, int64_t n,
                           float eps) {
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

/* Rows r0 .. r0+R-1 (R <= 4) of a layer norm */
static void layer_norm_rows(const float *x, const float *w, const float *b, float *y, int64_t r0, int R, int64_t n,
                            float eps) {
    double sum[4] = {0.0, 0.0, 0.0, 0.0};
    if (R == 1) { /* decode: one chain (four took 10% longer for one row) */
        for (int64_t i = 0; i < n; i++) sum[0] += (double)x[r0 * n + i];
    } else {
        const float *xr[4]; /* a group of 2 or 3 rows sums its first row again (for free) */
        for (int r = 0; r < 4; r++) xr[r] = x + (r0 + (r < R ? r : 0)) * n;
        row_sums4(xr[0], xr[1], xr[2], xr[3], n, sum);
    }
    for (int r = 0; r < R; r++) layer_norm_row(x + (r0 + r) * n, sum[r], w, b, y + (r0 + r) * n, n, eps);
}

void kernels_layer_norm(const float *x, const float *w, const float *b, float *y, int64_t rows, int64_t n, float eps,
                        int n_threads) {
    const int64_t groups = (rows + 3) / 4;
    if (groups == 1) { /* decode and batched decode: no thread team to start */
        layer_norm_rows(x, w, b, y, 0, (int)rows, n, eps);
        return;
    }
#pragma omp parallel for num_threads(threads_for(n_threads, groups)) schedule(static)
    for (int64_t g = 0; g < groups; g++)
        layer_norm_rows(x, w, b, y, 4 * g, (int)(rows - 4 * g < 4 ? rows - 4 * g : 4), n, eps);
}

/* ggml_vec_gelu_f32 with GGML_GELU_FP16: 0 at or below -10, x at or above 10, otherwise the
 * table entry of x rounded to fp16. */
static void gelu_scalar(const float *x, float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) {
        const float v = x[i];
        if (v <= -10.0f) y[i] = 0.0f;
        else if (v >= 10.0f) y[i] = v;
        else y[i] = fp16_to_fp32(gelu_table[fp32_to_fp16(v)]);
    }
}

#if defined(HAVE_AVX2_SET)
/* The same 8 at a time: F16C's conversion rounds to nearest even as fp32_to_fp16 does, and a
 * 32-bit gather at 2-byte steps fetches each entry in its low half. */
__attribute__((target("avx2,fma,f16c"))) static void gelu_avx2(const float *x, float *y, int64_t n) {
    const __m256 lo = _mm256_set1_ps(-10.0f), hi = _mm256_set1_ps(10.0f);
    const __m256i low16 = _mm256_set1_epi32(0xFFFF);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        const __m256i idx = _mm256_cvtepu16_epi32(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
        const __m256i g = _mm256_and_si256(_mm256_i32gather_epi32((const int *)gelu_table, idx, 2), low16);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(g, g), 0x08);
        __m256 r = _mm256_cvtph_ps(_mm256_castsi256_si128(packed));
        r = _mm256_blendv_ps(r, v, _mm256_cmp_ps(v, hi, _CMP_GE_OQ));
        r = _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(v, lo, _CMP_LE_OQ));
        _mm256_storeu_ps(y + i, r);
    }
    gelu_scalar(x + i, y + i, n - i);
}
#endif

static void gelu_part(const float *x, float *y, int64_t n) {
#if defined(HAVE_AVX2_SET)
    if (simd_elementwise()) {
        gelu_avx2(x, y, n);
        return;
    }
#endif
    gelu_scalar(x, y, n);
}

void kernels_gelu(const float *x, float *y, int64_t n, int n_threads) {
    const int64_t piece = 1 << 14;  /* a decode step's 12288 values stay on one thread */
    const int64_t n_pieces = (n + piece - 1) / piece;
#pragma omp parallel for num_threads(threads_for(n_threads, n_pieces)) schedule(static)
    for (int64_t p = 0; p < n_pieces; p++) {
        const int64_t a = p * piece;
        gelu_part(x + a, y + a, n - a < piece ? n - a : piece);
    }
}

/* NEOX RoPE in place: pairs (x[i], x[i + hd/2]) of each head of row t turned by the angles of
 * cos/sin row t. ggml's compiled rotate_pairs contracts x0*cos - x1*sin into
 * fma(x0, cos, -(x1*sin)) and x0*sin + x1*cos into fma(x0, sin, x1*cos); so does this. */
static void rope_rows_scalar(float *x, const float *cos, const float *sin, int64_t rows, int64_t hd) {
    const int64_t half = hd / 2;
    for (int64_t r = 0; r < rows; r++, x += hd) {
        for (int64_t i = 0; i < half; i++) {
            const float x0 = x[i], x1 = x[i + half];
            x[i] = fmaf(x0, cos[i], -(x1 * sin[i]));
            x[i + half] = fmaf(x0, sin[i], x1 * cos[i]);
        }
    }
}

#if defined(HAVE_AVX2_SET)
__attribute__((target("avx2,fma"))) static void rope_rows_avx2(float *x, const float *cos, const float *sin,
                                                               int64_t rows, int64_t hd) {
    const int64_t half = hd / 2;
    if (half % 8) {
        rope_rows_scalar(x, cos, sin, rows, hd);
        return;
    }
    for (int64_t r = 0; r < rows; r++, x += hd) {
        for (int64_t i = 0; i < half; i += 8) {
            const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + half);
            const __m256 c = _mm256_loadu_ps(cos + i), s = _mm256_loadu_ps(sin + i);
            const __m256 neg = _mm256_xor_ps(_mm256_mul_ps(x1, s), _mm256_set1_ps(-0.0f));
            _mm256_storeu_ps(x + i, _mm256_fmadd_ps(x0, c, neg));
            _mm256_storeu_ps(x + i + half, _mm256_fmadd_ps(x0, s, _mm256_mul_ps(x1, c)));
        }
    }
}
#endif

void kernels_rope_neox(float *x, const float *cos, const float *sin, int64_t T, int64_t n_head, int64_t hd) {
    for (int64_t t = 0; t < T; t++) {
        float *row = x + t * n_head * hd;
        const float *c = cos + t * (hd / 2), *s = sin + t * (hd / 2);
#if defined(HAVE_AVX2_SET)
        if (simd_elementwise()) {
            rope_rows_avx2(row, c, s, n_head, hd);
            continue;
        }
#endif
        rope_rows_scalar(row, c, s, n_head, hd);
    }
}

void kernels_f32_to_f16(const float *x, uint16_t *y, int64_t n) { K->quantize_f16(x, y, n); }
void kernels_f16_to_f32(const uint16_t *x, float *y, int64_t n) { K->f16_to_f32(x, y, n); }
void kernels_quantize_q8_0(const float *x, uint8_t *y, int64_t k) { K->quantize_q8_0(x, y, k); }
void kernels_quantize_q8_K(const float *x, uint8_t *y, int64_t k) { quantize_q8_K(x, y, k); }

float kernels_vec_dot(int wtype, const uint8_t *w_row, const float *x, int64_t k, int64_t n_out) {
    /* the single-row dot product itself, not the gemm: tests compare the two */
    type_traits t;
    if (traits_for(wtype, n_out, 1, k, &t) != 0 || k % t.block != 0 || t.dot == NULL) return NAN;
    if (t.quantize == NULL) return t.dot(k, w_row, x);
    uint8_t *buf = (uint8_t *)malloc((size_t)(k / t.block) * t.act_block_bytes);
    if (buf == NULL) return NAN;
    t.quantize(x, buf, k);
    const float y = t.dot(k, w_row, buf);
    free(buf);
    return y;
}

/* One thread's part of kernels_read_sum: `part` lines of each of ns streams from base, with the
 * prefetch level a constant (AT_PREFETCH_LEVEL), as the matmul tiles have it; with `prefetch` 0,
 * no prefetches (HARDWARE_DECODE). */
static inline __attribute__((always_inline)) void read_part(const uint8_t *base, size_t part, size_t ns, uint64_t *sum,
                                                            int prefetch, int to_l2) {
    enum { PREFETCH = 2048 };
    /* eight sums, one per word of a line: summed into one, each line's words went through the
     * stack in GCC's code and held a Zen 4 core to 24 GB/s, below what it reads (30) */
    uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (size_t i = 0; i < part; i++) {
        for (size_t k = 0; k < ns; k++) {
            const uint8_t *q = base + (k * part + i) * 64;
            if (prefetch) prefetch_ahead(q + PREFETCH, to_l2);
            for (int j = 0; j < 8; j++) {
                uint64_t w;
                memcpy(&w, q + 8 * j, sizeof(w));
                acc[j] += w;
            }
        }
    }
    *sum += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

uint64_t kernels_read_sum(const uint8_t *p, size_t n, int n_threads, int streams, int prefetch) {
    /* Each thread reads its contiguous part as `streams` streams with prefetches 2 KiB ahead
     * (into L1 or L2, as the matmuls prefetch weights: kernels_prefetch), or with none. Several
     * prefetched streams reach the read bandwidth where one plain stream does not on some CPUs
     * (bound by the misses one core keeps in flight); on a Zen 4 one stream reads fastest, with
     * or without prefetches. What is best differs between CPUs, so the benchmark tries each. */
    const size_t ns = streams < 1 ? 1 : (size_t)streams;
    const size_t lines = n / 64;
    uint64_t sum = 0;
    const int nt = threads_for(n_threads, (int64_t)(lines / ns));
#pragma omp parallel num_threads(nt) reduction(+ : sum)
    {
#ifdef _OPENMP
        const size_t t = (size_t)omp_get_thread_num();
#else
        const size_t t = 0;
#endif
        const size_t part = lines / (size_t)nt / ns;  /* lines per stream */
        if (prefetch)
            AT_PREFETCH_LEVEL(read_part, p + t * part * ns * 64, part, ns, &sum, 1);
        else
            read_part(p + t * part * ns * 64, part, ns, &sum, 0, 0);
    }
    return sum;  /* of the first nt * streams * part lines: the tail is not read */
}
