/* Row kernels, compiled four times by kernels.c: once portable (SUFFIX = _generic), once with
 * KERNELS_AVX2 under `#pragma GCC target("avx2,fma,f16c")` (SUFFIX = _avx2), and twice more with
 * KERNELS_VNNI (_avxvnni) and KERNELS_VNNI + KERNELS_AVX512 (_avx512vnni: zmm GEMM tiles).
 * Only the bodies that matter for speed have intrinsics; the rest is plain C that the compiler
 * vectorizes for the target. Results of the two sets differ only in float summation order. */

/* ---- fp16 rows ---------------------------------------------------------------------------- */

static void SUFFIX(f16_to_f32_row)(const uint16_t *x, float *y, int64_t n) {
    int64_t i = 0;
#ifdef KERNELS_AVX2
    for (; i + 8 <= n; i += 8) {
        _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    }
#endif
    for (; i < n; i++) y[i] = fp16_to_fp32(x[i]);
}

static void SUFFIX(f32_to_f16_row)(const float *x, void *vy, int64_t n) {
    uint16_t *y = (uint16_t *)vy;
    int64_t i = 0;
#ifdef KERNELS_AVX2
    for (; i + 8 <= n; i += 8) {
        _mm_storeu_si128((__m128i *)(y + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < n; i++) y[i] = fp32_to_fp16(x[i]);
}

/* ---- activation quantization: Q8_0 -------------------------------------------------------- */

static void SUFFIX(quantize_q8_0)(const float *x, void *vy, int64_t k) {
    block_q8_0 *y = (block_q8_0 *)vy;
    const int64_t nb = k / QK8_0;
    for (int64_t i = 0; i < nb; i++) {
        const float *xb = x + i * QK8_0;
        float amax = 0.0f;
#ifdef KERNELS_AVX2
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 m = _mm256_setzero_ps();
        for (int j = 0; j < QK8_0; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(xb + j)));
        __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        amax = _mm_cvtss_f32(m4);
#else
        for (int j = 0; j < QK8_0; j++) {
            const float a = fabsf(xb[j]);
            if (a > amax) amax = a;
        }
#endif
        const float d = amax / 127.0f;
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        y[i].d = fp32_to_fp16(d);
#ifdef KERNELS_AVX2
        const __m256 mul = _mm256_set1_ps(id);
        for (int j = 0; j < QK8_0; j += 8) {
            /* round half to even, as ggml's AVX2 quantize_row_q8_0 does */
            __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + j), mul), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m256i vi = _mm256_cvtps_epi32(v);
            int32_t tmp[8];
            _mm256_storeu_si256((__m256i *)tmp, vi);
            for (int t = 0; t < 8; t++) y[i].qs[j + t] = (int8_t)tmp[t];
        }
#else
        for (int j = 0; j < QK8_0; j++) y[i].qs[j] = (int8_t)nearbyintf(xb[j] * id);
#endif
    }
}

/* ---- dot products ------------------------------------------------------------------------- */

#ifdef KERNELS_AVX2
static inline float SUFFIX(hsum8)(__m256 x) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(x, 1), _mm256_castps256_ps128(x));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* 8 float lanes of pairwise sums of x*y for signed bytes (ggml's mul_sum_i8_pairs_float). */
static inline __m256 SUFFIX(mul_sum_i8)(__m256i x, __m256i y) {
    const __m256i ax = _mm256_sign_epi8(x, x);
    const __m256i sy = _mm256_sign_epi8(y, x);
    const __m256i dot = _mm256_maddubs_epi16(ax, sy);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)));
}
#else
/* The portable set keeps ggml's AVX2 summation orders, so that every set gives the same bits
 * (and meets llama.cpp's AVX2 build): eight float lanes (for the quantized dot products lane l
 * sums bytes 4l..4l+3 of every 32-byte group as an exact integer), one fmaf per lane and step,
 * then hsum8's pairing, which this is: (hi + lo), then [0]+[2] and [1]+[3], then the two. */
static inline float SUFFIX(hsum8_lanes)(const float acc[8]) {
    const float t0 = acc[0] + acc[4], t1 = acc[1] + acc[5], t2 = acc[2] + acc[6], t3 = acc[3] + acc[7];
    return (t0 + t2) + (t1 + t3);
}
#endif

static float SUFFIX(dot_q8_0)(int64_t n, const void *vx, const void *vy) {
    const block_q8_0 *x = (const block_q8_0 *)vx;
    const block_q8_0 *y = (const block_q8_0 *)vy;
    const int64_t nb = n / QK8_0;
#ifdef KERNELS_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d));
        const __m256i qx = _mm256_loadu_si256((const __m256i *)x[i].qs);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i].qs);
        acc = _mm256_fmadd_ps(d, SUFFIX(mul_sum_i8)(qx, qy), acc);
    }
    return SUFFIX(hsum8)(acc);
#else
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d);
        for (int l = 0; l < 8; l++) {
            int32_t lane = 0;
            for (int j = 4 * l; j < 4 * l + 4; j++) lane += x[i].qs[j] * y[i].qs[j];
            acc[l] = fmaf(d, (float)lane, acc[l]);
        }
    }
    return SUFFIX(hsum8_lanes)(acc);
#endif
}

static float SUFFIX(dot_q4_0)(int64_t n, const void *vx, const void *vy) {
    const block_q4_0 *x = (const block_q4_0 *)vx;
    const block_q8_0 *y = (const block_q8_0 *)vy;
    const int64_t nb = n / QK4_0;
#ifdef KERNELS_AVX2
    const __m256i low = _mm256_set1_epi8(0xF);
    const __m256i eight = _mm256_set1_epi8(8);
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m256 d = _mm256_set1_ps(fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d));
        const __m128i packed = _mm_loadu_si128((const __m128i *)x[i].qs);
        /* low nibbles are elements 0..15, high nibbles 16..31 */
        __m256i qx = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
        qx = _mm256_sub_epi8(qx, eight);
        const __m256i qy = _mm256_loadu_si256((const __m256i *)y[i].qs);
        acc = _mm256_fmadd_ps(d, SUFFIX(mul_sum_i8)(qx, qy), acc);
    }
    return SUFFIX(hsum8)(acc);
#else
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < nb; i++) {
        const float d = fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d);
        for (int l = 0; l < 8; l++) {  /* elements 0..15 are the low nibbles, 16..31 the high */
            int32_t lane = 0;
            for (int j = 4 * l; j < 4 * l + 4; j++) {
                const uint8_t b = x[i].qs[j % (QK4_0 / 2)];
                lane += ((j < QK4_0 / 2 ? b & 0x0F : b >> 4) - 8) * y[i].qs[j];
            }
            acc[l] = fmaf(d, (float)lane, acc[l]);
        }
    }
    return SUFFIX(hsum8_lanes)(acc);
#endif
}

/* ---- Q8_0 / Q4_0 matmul over many rows: a register-tiled int8 GEMM ----------------------- */

/* y[m * ldy + n] = dot(weight row n, activation row m) for n < n_rows, m0 <= m < m1, one dot
 * product after another: the portable set's matmuls, and rows a tile leaves over. */
static inline __attribute__((always_inline)) void SUFFIX(gemm_by_dots)(dot_fn dot, const uint8_t *w, size_t w_stride,
                                                                         int64_t n_rows, const q8_act *a, int64_t m0,
                                                                         int64_t m1, float *y, int64_t ldy) {
    for (int64_t m = m0; m < m1; m++)
        for (int64_t n = 0; n < n_rows; n++) y[m * ldy + n] = dot(a->nb * QK8_0, w + n * w_stride, a->q + m * a->nb);
}

/* Every output is one dot product computed exactly as dot_q8_0 / dot_q4_0 above compute it:
 * per block the same 8 integer lanes (lane l = sum of the products of bytes 4l..4l+3), then
 * acc = fma(fp16(x.d) * fp16(y.d), float(lanes), acc) in block order, then hsum8. The tiles only
 * choose which dot products run together, so that each loaded weight block serves RA activation
 * rows and each activation block RW weight rows; any tile shape gives the same bits. */
/* GROUPED_ROWS. A tile's weight rows are not neighbours: the rows of a call (or of a thread's
 * chunk) are split into as many groups of consecutive rows as the tile has rows, and a tile takes
 * row j of every group. Each group is then read front to back as one stream, each block
 * prefetched PREFETCH_AHEAD (into L2: PREFETCH_AHEAD_L2) bytes before it is used, the way
 * kernels_read_sum reaches the read bandwidth, whereas neighbouring rows read side by side
 * (streams one row apart) kept a core well below it: decoding a StarCoder2-3B-shaped model on
 * an Intel Xeon (AVX-512), 1 and 2 threads, every kernel set spent about 10% less time in the
 * matmuls with Q8_0 and 15-18% less with Q4_0 (the prompt's tiles, which work from L2, are
 * unchanged). The results are the same bits: each output is still one dot product computed as
 * before. */
#ifdef KERNELS_AVX2
/* A weight block as bytes for block_lanes: Q8_0 signed (-128..127) on AVX2 and unsigned (w + 128)
 * for VNNI; Q4_0 its raw nibbles (w + 8), unpacked from one 16-byte load broadcast to both
 * halves. block_lanes corrects the offsets with act->corr (block_corr).
 *
 * Q4_HIGH_IN_PLACE. With VNNI the high nibbles stay where they are, 16 times their value (the
 * byte & 0xF0), instead of being shifted down: lanes 4-7 of the block's integers are then
 * exactly 16 times ggml's (block_corr scales their corrections to match; vpdpbusd sums in 32
 * bits), so are their floats, and the fmas keep those lanes' accumulators exactly 16 times
 * ggml's, since scaling by a power of two commutes with rounding (for values above 2^-122; a
 * product of a block's scales and an integer is never that small unless it is zero). q_tile
 * divides them by 16, again exactly, before the sum: the same bits, and one shift fewer per
 * weight row and block (decode's Q4_0 matmuls 3% faster on an AMD EPYC Zen 4 core, bound by
 * its vector instructions there). AVX2's maddubs sums pairs in 16 bits, where 16 times the
 * products could overflow: it keeps the shift. */
static inline __attribute__((always_inline)) __m256i SUFFIX(load_wblock)(int wtype, const uint8_t *blk) {
    if (wtype == KT_Q8_0) {
        const __m256i w = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)blk)->qs);
#ifdef KERNELS_VNNI
        return _mm256_xor_si256(w, _mm256_set1_epi8((char)0x80));
#else
        return w;
#endif
    }
    const __m256i packed = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)((const block_q4_0 *)blk)->qs));
#ifdef KERNELS_VNNI
    return _mm256_and_si256(packed, _mm256_set_epi64x((long long)0xF0F0F0F0F0F0F0F0ull, (long long)0xF0F0F0F0F0F0F0F0ull,
                                                      0x0F0F0F0F0F0F0F0FLL, 0x0F0F0F0F0F0F0F0FLL));
#else
    return _mm256_and_si256(_mm256_srlv_epi64(packed, _mm256_set_epi64x(4, 4, 0, 0)), _mm256_set1_epi8(0xF));
#endif
}

/* The block's 8 correction lanes for block_lanes; with VNNI, Q4_0's lanes 4-7 times 16
 * (Q4_HIGH_IN_PLACE). */
static inline __attribute__((always_inline)) __m256i SUFFIX(block_corr)(int wtype, const int32_t *corr) {
    const __m256i c = _mm256_loadu_si256((const __m256i *)corr);
#ifdef KERNELS_VNNI
    if (wtype == KT_Q4_0) return _mm256_sllv_epi32(c, _mm256_set_epi32(4, 4, 4, 4, 0, 0, 0, 0));
#endif
    (void)wtype;
    return c;
}

#ifdef KERNELS_VNNI
/* acc + the products of unsigned bytes u and signed bytes s, four to each 32-bit lane; with
 * AVX-512, AVX512-VNNI's EVEX form of the instruction (CPUs with it may lack AVX-VNNI) */
static inline __attribute__((always_inline)) __m256i SUFFIX(dot_u8s8)(__m256i acc, __m256i u, __m256i s) {
#if defined(KERNELS_AVX512)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#endif

/* The block's 8 integer lanes as floats. VNNI: one dpbusd of the unsigned weights starting from
 * corr = -offset * (lane sums of y), which leaves exactly sum(w * y) per lane. AVX2, Q4_0: the
 * same with maddubs and madd (nibble x byte pairs cannot saturate), which spares ggml's two sign
 * steps and its subtraction of 8 per block (a 3B model's Q4_0 decode matmuls took 10-15% less time
 * with 1 thread on an AMD EPYC Zen 3, where they are bound by the core). AVX2, Q8_0: ggml's sign
 * trick (|w| * sign(y, w) with maddubs, pairs summed by madd), since w + 128 could saturate. The
 * lanes are the same integers either way. */
static inline __attribute__((always_inline)) __m256 SUFFIX(block_lanes)(int wtype, __m256i w, __m256i w_abs, __m256i y,
                                                                        __m256i corr) {
#ifdef KERNELS_VNNI
    (void)w_abs;
    return _mm256_cvtepi32_ps(SUFFIX(dot_u8s8)(corr, w, y));
#else
    if (wtype == KT_Q4_0) {
        const __m256i dot = _mm256_maddubs_epi16(w, y);
        return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)), corr));
    }
    const __m256i dot = _mm256_maddubs_epi16(w_abs, _mm256_sign_epi8(y, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(dot, _mm256_set1_epi16(1)));
#endif
}

/* Lane r (< 4) of v's 128-bit halves in every lane (r is a constant once the tiles are inlined). */
static inline __attribute__((always_inline)) __m256 SUFFIX(lane_bcast)(__m256 v, int r) {
    return r == 0   ? _mm256_shuffle_ps(v, v, 0x00)
           : r == 1 ? _mm256_shuffle_ps(v, v, 0x55)
           : r == 2 ? _mm256_shuffle_ps(v, v, 0xAA)
                    : _mm256_shuffle_ps(v, v, 0xFF);
}

/* Where activation rows m0 .. m0+RA-1 start: their Q8_0 blocks, float scales and corrections, the
 * VNNI lanes' (q8_act.corr, 8 a block) or, for the block order, the whole blocks' (csum, 1). */
static inline __attribute__((always_inline)) void SUFFIX(act_rows)(const q8_act *a, int64_t m0, int RA,
                                                                   const int32_t *corr, int per_block,
                                                                   const block_q8_0 **yq, const float **yd,
                                                                   const int32_t **yc) {
    for (int c = 0; c < RA; c++) {
        yq[c] = a->q + (m0 + c) * a->nb;
        yd[c] = a->d + (m0 + c) * a->nb;
        yc[c] = corr + (m0 + c) * a->nb * per_block;
    }
}

/* The fp16 scales at b0 .. b3 (the first two bytes of four weight blocks) as floats, gathered
 * in a general register and converted by one vcvtph2ps: vector inserts would compete with the
 * weight loads' inserts for the one shuffle port. */
static inline __attribute__((always_inline)) __m128 SUFFIX(scales4)(const uint8_t *b0, const uint8_t *b1,
                                                                     const uint8_t *b2, const uint8_t *b3) {
    const uint64_t h = (uint64_t)*(const uint16_t *)b0 | (uint64_t)*(const uint16_t *)b1 << 16 |
                       (uint64_t)*(const uint16_t *)b2 << 32 | (uint64_t)*(const uint16_t *)b3 << 48;
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)h));
}

/* Block i of q_tile's dot products: acc[r][c] += its products (see q_tile). */
static inline __attribute__((always_inline)) void SUFFIX(q_tile_block)(int wtype, int RW, int RA, const uint8_t *w,
                                                                          size_t gs, int64_t i, const block_q8_0 **yq,
                                                                          const float **yd, const int32_t **yc,
                                                                          __m256 acc[4][8], int to_l2) {
    const size_t bb = wtype == KT_Q8_0 ? sizeof(block_q8_0) : sizeof(block_q4_0);
    /* With 4 rows, their scales are converted by one vcvtph2ps and multiplied by each
     * activation row's in one 4-lane product, as tinyBLAS does: a shuffle per dot product
     * instead of a broadcast and a full-width multiply (the same products, rounded once). */
    __m256 dd[8];
    if (RW == 4) {
        const uint8_t *b0 = w + (size_t)i * bb;
        const __m128 dx4 = SUFFIX(scales4)(b0, b0 + gs, b0 + 2 * gs, b0 + 3 * gs);
        for (int c = 0; c < RA; c++) {
            const __m128 p = _mm_mul_ps(dx4, _mm_set1_ps(yd[c][i]));
            dd[c] = _mm256_set_m128(p, p);
        }
    }
    for (int r = 0; r < RW; r++) {
        const uint8_t *blk = w + r * gs + (size_t)i * bb;
        prefetch_weights((const char *)blk, RA, to_l2);
        const __m256i wq = SUFFIX(load_wblock)(wtype, blk);
        const __m256i w_abs = _mm256_sign_epi8(wq, wq);
        const __m256 dx = _mm256_broadcast_ss(&fp16_table[*(const uint16_t *)blk]); /* RW < 4 */
        for (int c = 0; c < RA; c++) {
            const __m256i yv = _mm256_loadu_si256((const __m256i *)yq[c][i].qs);
            const __m256 q = SUFFIX(block_lanes)(wtype, wq, w_abs, yv, SUFFIX(block_corr)(wtype, yc[c] + 8 * i));
            const __m256 d = RW == 4 ? SUFFIX(lane_bcast)(dd[c], r) : _mm256_mul_ps(dx, _mm256_broadcast_ss(yd[c] + i));
            acc[r][c] = _mm256_fmadd_ps(d, q, acc[r][c]);
        }
    }
}

/* y[c * ldy + r * ys] = dot(weight row r, activation row m0 + c) for r < RW, c < RA, where weight
 * row r starts r * gs bytes after w. to_l2: a constant (AT_PREFETCH_LEVEL). */
static inline __attribute__((always_inline)) void SUFFIX(q_tile)(int wtype, int RW, int RA, const uint8_t *w,
                                                                    size_t gs, const q8_act *a, int64_t m0, float *y,
                                                                    int64_t ldy, int64_t ys, int to_l2) {
    const int64_t nb = a->nb;
    const block_q8_0 *yq[8];  /* RW <= 4, RA <= 8 */
    const float *yd[8];
    const int32_t *yc[8];
    SUFFIX(act_rows)(a, m0, RA, a->corr, 8, yq, yd, yc);
    __m256 acc[4][8];
    for (int c = 0; c < RA; c++)
        for (int r = 0; r < RW; r++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) SUFFIX(q_tile_block)(wtype, RW, RA, w, gs, i, yq, yd, yc, acc, to_l2);
#ifdef KERNELS_VNNI
    if (wtype == KT_Q4_0) /* Q4_HIGH_IN_PLACE: lanes 4-7 back from 16 times their value */
        for (int r = 0; r < RW; r++)
            for (int c = 0; c < RA; c++)
                acc[r][c] = _mm256_mul_ps(acc[r][c], _mm256_set_ps(0.0625f, 0.0625f, 0.0625f, 0.0625f, 1, 1, 1, 1));
#endif
    for (int r = 0; r < RW; r++)
        for (int c = 0; c < RA; c++) y[c * ldy + r * ys] = SUFFIX(hsum8)(acc[r][c]);
}

/* Activation rows m0 .. m0+RA-1 against all n_rows weight rows. A tile takes its RW weight rows
 * from RW groups of consecutive rows, row j of each (see GROUPED_ROWS); the rows left over go
 * one at a time. */
static inline __attribute__((always_inline)) void SUFFIX(q_tile_row)(int wtype, int RW, int RA, const uint8_t *w,
                                                                     size_t w_stride, int64_t n_rows, const q8_act *a,
                                                                     int64_t m0, float *y, int64_t ldy) {
    const int64_t g = n_rows / RW;
    float *ym = y + m0 * ldy;
    for (int64_t j = 0; j < g; j++)
        AT_PREFETCH_LEVEL(SUFFIX(q_tile), wtype, RW, RA, w + j * w_stride, g * w_stride, a, m0, ym + j, ldy, g);
    for (int64_t n = RW * g; n < n_rows; n++)
        AT_PREFETCH_LEVEL(SUFFIX(q_tile), wtype, 1, RA, w + n * w_stride, w_stride, a, m0, ym + n, ldy, 1);
}

#ifdef KERNELS_AVX512
/* AVX-512: a zmm holds block i of two weight rows (row r in the low 256 bits, r + 1 in the
 * high), against activation block i broadcast into both halves. Each half then runs exactly the
 * ymm steps of block_lanes (VNNI) and the fma, and is reduced by the same hsum8: two consecutive
 * blocks of one dot product never share a register, so the float order does not change. */
static inline __attribute__((always_inline)) __m512i SUFFIX(load_wpair)(int wtype, const uint8_t *b0,
                                                                        const uint8_t *b1) {
    if (wtype == KT_Q8_0) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)b0)->qs);
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)((const block_q8_0 *)b1)->qs);
        return _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(w0), w1, 1), _mm512_set1_epi8((char)0x80));
    }
    /* 128-bit lanes [p0, p0, p1, p1] of the packed nibbles, lanes 1 and 3 shifted right by 4:
     * each half is its row's [low nibbles, high nibbles] (load_wblock's without VNNI; the
     * zmm tiles keep the shift, Q4_HIGH_IN_PLACE is the ymm tiles') */
    const __m128i p0 = _mm_loadu_si128((const __m128i *)((const block_q4_0 *)b0)->qs);
    const __m128i p1 = _mm_loadu_si128((const __m128i *)((const block_q4_0 *)b1)->qs);
    const __m512i z = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0),
                                               _mm512_castsi256_si512(_mm256_set_m128i(p1, p0)));
    return _mm512_and_si512(_mm512_mask_srli_epi16(z, 0xFF00FF00u, z, 4), _mm512_set1_epi8(0xF));
}

/* y[c * ldy + r * ys] = dot(weight row r, activation row m0 + c) for r < 2 * RP, c < RA, where
 * weight row r starts r * gs bytes after w. */
static inline __attribute__((always_inline)) void SUFFIX(q_tile512)(int wtype, int RP, int RA, const uint8_t *w,
                                                                    size_t gs, const q8_act *a, int64_t m0,
                                                                    float *y, int64_t ldy, int64_t ys, int to_l2) {
    const size_t bb = wtype == KT_Q8_0 ? sizeof(block_q8_0) : sizeof(block_q4_0);
    const int64_t nb = a->nb;
    const block_q8_0 *yq[8];  /* RP <= 4, RA <= 8 */
    const float *yd[8];
    const int32_t *yc[8];
    SUFFIX(act_rows)(a, m0, RA, a->corr, 8, yq, yd, yc);
    __m512 acc[4][8];
    for (int c = 0; c < RA; c++)
        for (int p = 0; p < RP; p++) acc[p][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i wq[4];
        __m512 dx[4];
        for (int p = 0; p < RP; p++) {
            const uint8_t *b0 = w + 2 * p * gs + (size_t)i * bb;
            const uint8_t *b1 = b0 + gs;
            prefetch_weights((const char *)b0, RA, to_l2);
            prefetch_weights((const char *)b1, RA, to_l2);
            dx[p] = _mm512_mask_broadcastss_ps(_mm512_set1_ps(fp16_table[*(const uint16_t *)b0]), 0xFF00,
                                               _mm_load_ss(&fp16_table[*(const uint16_t *)b1]));
            wq[p] = SUFFIX(load_wpair)(wtype, b0, b1);
        }
        for (int c = 0; c < RA; c++) {
            const __m512i yv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)yq[c][i].qs));
            const __m512i corr = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(yc[c] + 8 * i)));
            const __m512 dy = _mm512_set1_ps(yd[c][i]);
            for (int p = 0; p < RP; p++) {
                const __m512 q = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(corr, wq[p], yv));
                acc[p][c] = _mm512_fmadd_ps(_mm512_mul_ps(dx[p], dy), q, acc[p][c]);
            }
        }
    }
    for (int p = 0; p < RP; p++)
        for (int c = 0; c < RA; c++) {
            y[c * ldy + 2 * p * ys] = SUFFIX(hsum8)(_mm512_castps512_ps256(acc[p][c]));
            y[c * ldy + (2 * p + 1) * ys] =
                SUFFIX(hsum8)(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[p][c]), 1)));
        }
}

/* Activation rows m0 .. m0+RA-1 against all n_rows weight rows. A tile takes its 2 * RP weight
 * rows from 2 * RP groups of consecutive rows, row j of each (see GROUPED_ROWS); the rows left
 * over go by neighbouring pairs, then a last odd row by the ymm tile. */
static inline __attribute__((always_inline)) void SUFFIX(q_tile512_row)(int wtype, int RP, int RA,
                                                                        const uint8_t *w, size_t w_stride,
                                                                        int64_t n_rows, const q8_act *a,
                                                                        int64_t m0, float *y, int64_t ldy) {
    const int64_t g = n_rows / (2 * RP);
    float *ym = y + m0 * ldy;
    for (int64_t j = 0; j < g; j++)
        AT_PREFETCH_LEVEL(SUFFIX(q_tile512), wtype, RP, RA, w + j * w_stride, g * w_stride, a, m0, ym + j, ldy, g);
    int64_t n = 2 * RP * g;
    for (; n + 2 <= n_rows; n += 2)
        AT_PREFETCH_LEVEL(SUFFIX(q_tile512), wtype, 1, RA, w + n * w_stride, w_stride, a, m0, ym + n, ldy, 1);
    if (n < n_rows) AT_PREFETCH_LEVEL(SUFFIX(q_tile), wtype, 1, RA, w + n * w_stride, w_stride, a, m0, ym + n, ldy, 1);
}

/* Q8_0 and Q4_0 with AVX-512, four weight rows per zmm: one zmm holds bytes 0-15 of block i of
 * four rows (row r in 128-bit lane r) and another their bytes 16-31 (Q4_0: the low and the high
 * nibbles of its 16 bytes), against bytes 0-15 and 16-31 of the activation block broadcast to
 * every 128-bit lane. Lane 4r + l of the first is row r's block_lanes lane l (elements
 * 4l..4l+3), of the second its lane 4 + l, so each of a row's 8 lanes takes exactly the integer
 * and float steps of q_tile512 (one multiply of the scales serves both zmm), and hsum8 of [first
 * lanes 4r..4r+3, second lanes 4r..4r+3] is its dot product. Against q_tile512's pairs this
 * halves the scale products (and for Q4_0 drops the nibble shuffles), which bind decode and
 * batched decode on an AMD EPYC (Zen 4) core: for Q4_0, 8 rows (RQ = 2) per tile took a 3B
 * model's decode matmuls from 110-125 to 103-106 ms (1 thread) and 4 sequences' from 257-271 to
 * 223-234 ms; for Q8_0, 4 sequences' from 231 to 212-214 ms with 1 thread and from 119-124 to
 * 111-112 ms with 2, 2 and 3 sequences' by 5%, one sequence's no different (medians of 5
 * alternated passes, the same bits), and 4 sequences by 4 rows (RQ = 1) took 234 ms: the 8 rows
 * share each activation block's broadcasts. (Before, Q8_0 sequences went by q_tile512 with 4
 * rows, which on a Zen 5 had been 3-17% faster than 6; 8 rows have not been measured there.)
 * One activation row (decode) goes 4 rows (RQ = 1)
 * at a time: 8 rows are 8 streams of reads, and no CPU measured so far reads 8 streams per core
 * as fast as 4 (kernels_read_sum: AMD EPYC Zen 5 39.7 against 31.9 GB/s); on Zen 5 the Q4_0
 * decode matmuls went from 53 to 49 ms with 1 thread and from 42 to 36 ms with 2 (medians of 7
 * alternated passes), where on Zen 4, bound by arithmetic, 4 rows had been a little slower. */
static inline __attribute__((always_inline)) void SUFFIX(quad_tile512)(int wtype, int RQ, int RA, const uint8_t *w,
                                                                       size_t gs, const q8_act *a, int64_t m0,
                                                                       float *y, int64_t ldy, int64_t ys, int to_l2) {
    const size_t bb = wtype == KT_Q8_0 ? sizeof(block_q8_0) : sizeof(block_q4_0);
    const int64_t nb = a->nb;
    const block_q8_0 *yq[4];  /* RQ <= 2, RA <= 4 */
    const float *yd[4];
    const int32_t *yc[4];
    SUFFIX(act_rows)(a, m0, RA, a->corr, 8, yq, yd, yc);
    const __m512i quad = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    const __m512i low = _mm512_set1_epi8(0xF);
    __m512 lo[2][4], hi[2][4];
    for (int q = 0; q < RQ; q++)
        for (int c = 0; c < RA; c++) lo[q][c] = hi[q][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        __m512i wlo[2], whi[2];
        __m512 dx[2];
        for (int q = 0; q < RQ; q++) {
            const uint8_t *b[4]; /* block i of the four rows: the fp16 scale, then the quants */
            for (int r = 0; r < 4; r++) {
                b[r] = w + (4 * q + r) * gs + (size_t)i * bb;
                prefetch_weights((const char *)b[r], RA, to_l2);
            }
            if (wtype == KT_Q4_0) {
                const block_q4_0 *const *b4 = (const block_q4_0 *const *)b;
                __m512i z = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)b4[0]->qs));
                z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)b4[1]->qs), 1);
                z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)b4[2]->qs), 2);
                z = _mm512_inserti32x4(z, _mm_loadu_si128((const __m128i *)b4[3]->qs), 3);
                wlo[q] = _mm512_and_si512(z, low);
                whi[q] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
            } else { /* Q8_0: rows 0, 1 and 2, 3 as load_wpair's pairs, their 16-byte halves gathered by two permutes */
                const __m512i z01 = SUFFIX(load_wpair)(KT_Q8_0, b[0], b[1]);
                const __m512i z23 = SUFFIX(load_wpair)(KT_Q8_0, b[2], b[3]);
                wlo[q] = _mm512_permutex2var_epi64(z01, _mm512_set_epi64(13, 12, 9, 8, 5, 4, 1, 0), z23);
                whi[q] = _mm512_permutex2var_epi64(z01, _mm512_set_epi64(15, 14, 11, 10, 7, 6, 3, 2), z23);
            }
            dx[q] = _mm512_permutexvar_ps(quad, _mm512_castps128_ps512(SUFFIX(scales4)(b[0], b[1], b[2], b[3])));
        }
        for (int c = 0; c < RA; c++) {
            const __m512i ylo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)yq[c][i].qs));
            const __m512i yhi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(yq[c][i].qs + 16)));
            const __m512i clo = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(yc[c] + 8 * i)));
            const __m512i chi = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(yc[c] + 8 * i + 4)));
            const __m512 dy = _mm512_set1_ps(yd[c][i]);
            for (int q = 0; q < RQ; q++) {
                const __m512 d = _mm512_mul_ps(dx[q], dy);
                lo[q][c] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(clo, wlo[q], ylo)), lo[q][c]);
                hi[q][c] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(chi, whi[q], yhi)), hi[q][c]);
            }
        }
    }
    for (int q = 0; q < RQ; q++)
        for (int c = 0; c < RA; c++) {
            const __m128 l4[4] = {_mm512_extractf32x4_ps(lo[q][c], 0), _mm512_extractf32x4_ps(lo[q][c], 1),
                                  _mm512_extractf32x4_ps(lo[q][c], 2), _mm512_extractf32x4_ps(lo[q][c], 3)};
            const __m128 h4[4] = {_mm512_extractf32x4_ps(hi[q][c], 0), _mm512_extractf32x4_ps(hi[q][c], 1),
                                  _mm512_extractf32x4_ps(hi[q][c], 2), _mm512_extractf32x4_ps(hi[q][c], 3)};
            for (int r = 0; r < 4; r++) y[c * ldy + (4 * q + r) * ys] = SUFFIX(hsum8)(_mm256_set_m128(h4[r], l4[r]));
        }
}

/* Activation rows m0 .. m0+RA-1 by quad_tile512: its 4 * RQ weight rows from as many groups of
 * consecutive rows (see GROUPED_ROWS); the rows left over go to q_tile512_row. */
static inline __attribute__((always_inline)) void SUFFIX(quad_tile512_row)(int wtype, int RQ, int RA,
                                                                           const uint8_t *w, size_t w_stride,
                                                                           int64_t n_rows, const q8_act *a,
                                                                           int64_t m0, float *y, int64_t ldy) {
    const int64_t g = n_rows / (4 * RQ);
    for (int64_t j = 0; j < g; j++)
        AT_PREFETCH_LEVEL(SUFFIX(quad_tile512), wtype, RQ, RA, w + j * w_stride, g * w_stride, a, m0,
                          y + m0 * ldy + j, ldy, g);
    const int64_t n = 4 * RQ * g;
    if (n < n_rows) SUFFIX(q_tile512_row)(wtype, 1, RA, w + n * w_stride, w_stride, n_rows - n, a, m0, y + n, ldy);
}

/* Tile sizes (override with -D to try others). Measured on a Zen 5 core, 1 thread, 256 x 3072
 * and 256 x 12288 activations: 6 weight rows x 8 activation rows (24 zmm accumulators) gave
 * 115-140 GMAC/s, against 85-105 for 4 x 4 and 4 x 8 and 100-125 for 6 x 6, 8 x 4 and 8 x 5.
 * One activation row (decode) goes best 4 weight rows at a time (2, 6 and 8 were slower). */
#ifndef GEMM512_RP
#define GEMM512_RP 3
#endif
#ifndef GEMM512_RA
#define GEMM512_RA 8
#endif

/* Tiles of 2 x GEMM512_RP weight rows x GEMM512_RA activation rows. Decode and batched decode
 * (1 to 4 activation rows) go by quad_tile512: those are bound by how the weights stream in
 * and by the scale work per block, and a tile's weight rows are its streams (GROUPED_ROWS). */
static inline __attribute__((always_inline)) void SUFFIX(gemm_q)(int wtype, const uint8_t *w, size_t w_stride,
                                                                 int64_t n_rows, const q8_act *a, int64_t M, float *y,
                                                                 int64_t ldy) {
    int64_t m = 0;
    for (; m + GEMM512_RA <= M; m += GEMM512_RA)
        SUFFIX(q_tile512_row)(wtype, GEMM512_RP, GEMM512_RA, w, w_stride, n_rows, a, m, y, ldy);
    if (M - m <= 4) { /* decode, batched decode, a prompt's last rows */
        switch (M - m) {
        case 4: SUFFIX(quad_tile512_row)(wtype, 2, 4, w, w_stride, n_rows, a, m, y, ldy); break;
        case 3: SUFFIX(quad_tile512_row)(wtype, 2, 3, w, w_stride, n_rows, a, m, y, ldy); break;
        case 2: SUFFIX(quad_tile512_row)(wtype, 2, 2, w, w_stride, n_rows, a, m, y, ldy); break;
        case 1: SUFFIX(quad_tile512_row)(wtype, 1, 1, w, w_stride, n_rows, a, m, y, ldy); break;
        }
        return;
    }
    switch (M - m) {
    case 7: SUFFIX(q_tile512_row)(wtype, GEMM512_RP, 7, w, w_stride, n_rows, a, m, y, ldy); break;
    case 6: SUFFIX(q_tile512_row)(wtype, GEMM512_RP, 6, w, w_stride, n_rows, a, m, y, ldy); break;
    case 5: SUFFIX(q_tile512_row)(wtype, GEMM512_RP, 5, w, w_stride, n_rows, a, m, y, ldy); break;
    }
}
#else
/* Tiles of weight rows x activation rows: VNNI, which needs fewer registers per block, fits 2 x 4
 * accumulators in the 16 ymm registers; AVX2 4 x 2, tinyBLAS's AVX2 shape, whose four weight rows
 * take q_tile's 4-row scale products (on an AMD EPYC Zen 3, 256 activation rows of a 3072 x 3072
 * matmul took 12-15% less time than with the 1 x 4 tile for Q8_0 and 6-9% less for Q4_0, medians
 * and bests of 25 alternated passes; four sequences' decode matmuls 3-6% less). One activation
 * row (decode) goes 4 weight rows at a time so that its block is loaded once for four. */
static inline __attribute__((always_inline)) void SUFFIX(gemm_q)(int wtype, const uint8_t *w, size_t w_stride,
                                                                 int64_t n_rows, const q8_act *a, int64_t M, float *y,
                                                                 int64_t ldy) {
    int64_t m = 0;
#ifdef KERNELS_VNNI
    for (; m + 4 <= M; m += 4) SUFFIX(q_tile_row)(wtype, 2, 4, w, w_stride, n_rows, a, m, y, ldy);
    if (M - m == 3) {
        SUFFIX(q_tile_row)(wtype, 2, 3, w, w_stride, n_rows, a, m, y, ldy);
        return;
    }
#endif
    for (; m + 2 <= M; m += 2) SUFFIX(q_tile_row)(wtype, 4, 2, w, w_stride, n_rows, a, m, y, ldy);
    if (m < M) SUFFIX(q_tile_row)(wtype, 4, 1, w, w_stride, n_rows, a, m, y, ldy);
}

#endif

static void SUFFIX(gemm_q8_0)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                              float *y, int64_t ldy) {
    SUFFIX(gemm_q)(KT_Q8_0, w, w_stride, n_rows, a, M, y, ldy);
}

static void SUFFIX(gemm_q4_0)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                              float *y, int64_t ldy) {
    SUFFIX(gemm_q)(KT_Q4_0, w, w_stride, n_rows, a, M, y, ldy);
}
#else
/* Portable: the single-row dot products, one after another. */
static void SUFFIX(gemm_q8_0)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                              float *y, int64_t ldy) {
    SUFFIX(gemm_by_dots)(SUFFIX(dot_q8_0), w, w_stride, n_rows, a, 0, M, y, ldy);
}

static void SUFFIX(gemm_q4_0)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                              float *y, int64_t ldy) {
    SUFFIX(gemm_by_dots)(SUFFIX(dot_q4_0), w, w_stride, n_rows, a, 0, M, y, ldy);
}
#endif

/* ---- Q4_0 in llama.cpp's block order (BLOCK_ORDER in kernels.c) --------------------------- */

/* dot(x, y) as llama.cpp's repacked Q4_0 kernels sum it: each block's 32 products as one exact
 * integer, added to the sum as fmaf((float)block_sum, dx * dy, sum), block after block. */
static float SUFFIX(dot_q4_0_blocks)(int64_t n, const void *vx, const void *vy) {
    const block_q4_0 *x = (const block_q4_0 *)vx;
    const block_q8_0 *y = (const block_q8_0 *)vy;
    float acc = 0.0f;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        int32_t s = 0;
        for (int j = 0; j < QK4_0 / 2; j++) /* low nibbles are elements 0..15, high nibbles 16..31 */
            s += ((x[i].qs[j] & 0x0F) - 8) * y[i].qs[j] + ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + QK4_0 / 2];
        acc = fmaf((float)s, fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d), acc);
    }
    return acc;
}

#ifdef KERNELS_AVX2
/* vphaddd(a, b) by two vshufps and an add (4-6% faster on AMD Zen 4): each 128-bit half's 32-bit
 * units 0+1 and 2+3 of a, then of b. With in16, the units are added as two 16-bit lanes each. */
static inline __attribute__((always_inline)) __m256i SUFFIX(hadd_units)(__m256i a, __m256i b, int in16) {
    const __m256 x = _mm256_castsi256_ps(a), y = _mm256_castsi256_ps(b);
    const __m256i even = _mm256_castps_si256(_mm256_shuffle_ps(x, y, 0x88));
    const __m256i odd = _mm256_castps_si256(_mm256_shuffle_ps(x, y, 0xDD));
    return in16 ? _mm256_add_epi16(even, odd) : _mm256_add_epi32(even, odd);
}

/* The 32 products of one Q4_0 block per weight row of sum[0..3] (2 rows each, one per half, as
 * q4_blocks_tile holds them): one 32-bit lane per row, rows 0, 2, 4, 6 in the low half and 1, 3,
 * 5, 7 in the high. wl/wh are the unsigned nibbles, yl/yh the activation's halves. With VNNI each
 * row's products go to 32-bit lanes at once. Without it, maddubs leaves pairs in 16-bit lanes; these
 * are added (low and high nibbles, then two levels of the reduction) while they fit in 16 bits,
 * and only then widened by one madd, 22 instructions for 8 rows where widening each first took
 * 29: a nibble (0..15) times a byte (-128..127) is within [-1920, 1905], so 16 products are
 * within [-30720, 30480], and the last level, 32, would not fit. */
static inline __attribute__((always_inline)) __m256i SUFFIX(block_sums8)(int RQ, const __m256i *wl, const __m256i *wh,
                                                                         __m256i yl, __m256i yh) {
    __m256i sum[4];
#ifdef KERNELS_VNNI
    for (int p = 0; p < 2 * RQ; p++)
        sum[p] = SUFFIX(dot_u8s8)(SUFFIX(dot_u8s8)(_mm256_setzero_si256(), wl[p], yl), wh[p], yh);
    const __m256i h0 = SUFFIX(hadd_units)(sum[0], sum[1], 0);
    const __m256i h1 = RQ == 2 ? SUFFIX(hadd_units)(sum[2], sum[3], 0) : h0;
    return SUFFIX(hadd_units)(h0, h1, 0);
#else
    for (int p = 0; p < 2 * RQ; p++)
        sum[p] = _mm256_add_epi16(_mm256_maddubs_epi16(wl[p], yl), _mm256_maddubs_epi16(wh[p], yh));
    const __m256i h0 = SUFFIX(hadd_units)(sum[0], sum[1], 1);
    const __m256i h1 = RQ == 2 ? SUFFIX(hadd_units)(sum[2], sum[3], 1) : h0;
    return _mm256_madd_epi16(SUFFIX(hadd_units)(h0, h1, 1), _mm256_set1_epi16(1));
#endif
}

/* y[c * ldy + r * ys] = dot_q4_0_blocks(weight row r, activation row m0 + c) for r < 4 * RQ,
 * c < RA, where weight row r starts r * gs bytes after w. A ymm holds block i of two weight rows
 * (row 2p's 16 bytes in the low half, row 2p + 1's in the high), its low and its high nibbles
 * in two registers, and each activation block's halves are broadcast to both halves. Three
 * horizontal adds then leave one sum per weight row in a lane, rows 0, 2, 4, 6 in the low half
 * and 1, 3, 5, 7 in the high (RQ = 1: rows 0, 2 and 1, 3, twice), to which the block's
 * correction is added (-8 times the sum of its bytes: the nibbles stay unsigned). */
static inline __attribute__((always_inline)) void SUFFIX(q4_blocks_tile)(int RQ, int RA, const uint8_t *w, size_t gs,
                                                                         const q8_act *a, int64_t m0, float *y,
                                                                         int64_t ldy, int64_t ys, int to_l2) {
    const block_q8_0 *yq[4];
    const float *yd[4];
    const int32_t *yc[4];
    SUFFIX(act_rows)(a, m0, RA, a->csum, 1, yq, yd, yc);
    const __m256i low = _mm256_set1_epi8(0xF);
    __m256 acc[4];
    for (int c = 0; c < RA; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < a->nb; i++) {
        const uint8_t *b[8];
        for (int r = 0; r < 4 * RQ; r++) {
            b[r] = w + r * gs + (size_t)i * sizeof(block_q4_0);
            prefetch_weights((const char *)b[r], RA, to_l2);
        }
        __m256i wl[4], wh[4];
        for (int p = 0; p < 2 * RQ; p++) {
            const __m256i z = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)((const block_q4_0 *)b[2 * p + 1])->qs),
                                               _mm_loadu_si128((const __m128i *)((const block_q4_0 *)b[2 * p])->qs));
            wl[p] = _mm256_and_si256(z, low);
            wh[p] = _mm256_and_si256(_mm256_srli_epi16(z, 4), low);
        }
        const __m128 s0 = SUFFIX(scales4)(b[0], b[1], b[2], b[3]);
        const __m128 s1 = RQ == 2 ? SUFFIX(scales4)(b[4], b[5], b[6], b[7]) : s0;
        const __m256 dx = _mm256_set_m128(_mm_shuffle_ps(s0, s1, _MM_SHUFFLE(3, 1, 3, 1)),
                                          _mm_shuffle_ps(s0, s1, _MM_SHUFFLE(2, 0, 2, 0)));
        for (int c = 0; c < RA; c++) {
            const __m256i yl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)yq[c][i].qs));
            const __m256i yh = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(yq[c][i].qs + 16)));
            const __m256i total = _mm256_add_epi32(SUFFIX(block_sums8)(RQ, wl, wh, yl, yh), _mm256_set1_epi32(yc[c][i]));
            acc[c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(total),
                                     _mm256_mul_ps(dx, _mm256_set1_ps(yd[c][i])), acc[c]);
        }
    }
    for (int c = 0; c < RA; c++) {
        float v[8];
        _mm256_storeu_ps(v, acc[c]);
        for (int j = 0; j < 2 * RQ; j++) {
            y[c * ldy + 2 * j * ys] = v[j];
            y[c * ldy + (2 * j + 1) * ys] = v[4 + j];
        }
    }
}

/* Activation rows m0 .. m0+RA-1 against all n_rows weight rows in the block order: tiles of 8
 * weight rows from as many groups of consecutive rows (GROUPED_ROWS), a tile of 4 and single
 * rows for what is left. */
static inline __attribute__((always_inline)) void SUFFIX(q4_blocks_rows)(int RA, const uint8_t *w, size_t w_stride,
                                                                         int64_t n_rows, const q8_act *a, int64_t m0,
                                                                         float *y, int64_t ldy) {
    const int64_t g = n_rows / 8;
    for (int64_t j = 0; j < g; j++)
        AT_PREFETCH_LEVEL(SUFFIX(q4_blocks_tile), 2, RA, w + j * w_stride, g * w_stride, a, m0, y + m0 * ldy + j, ldy, g);
    int64_t n = 8 * g;
    if (n + 4 <= n_rows) {
        AT_PREFETCH_LEVEL(SUFFIX(q4_blocks_tile), 1, RA, w + n * w_stride, w_stride, a, m0, y + m0 * ldy + n, ldy, 1);
        n += 4;
    }
    SUFFIX(gemm_by_dots)(SUFFIX(dot_q4_0_blocks), w + n * w_stride, w_stride, n_rows - n, a, m0, m0 + RA, y + n, ldy);
}

/* Activation rows per q4_blocks_tile: four. With AVX2's 16 registers the tile's eight weight
 * registers and four accumulators spill, yet on an AMD Zen 4 core the AVX2 set's 3072 x 3072
 * matmuls of 4 and 256 activation rows ran 17% faster than two rows at a time (63 against 54
 * GMAC/s; one row the same). With AVX-512, eight rows made 256 rows 5-10% faster but one and
 * four rows 2-5% slower: decode comes first. */
#define Q4_BLOCKS_RA 4

static void SUFFIX(gemm_q4_0_blocks)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                                     float *y, int64_t ldy) {
    int64_t m = 0;
    for (; m + Q4_BLOCKS_RA <= M; m += Q4_BLOCKS_RA) SUFFIX(q4_blocks_rows)(Q4_BLOCKS_RA, w, w_stride, n_rows, a, m, y, ldy);
    switch (M - m) {
    case 3: SUFFIX(q4_blocks_rows)(3, w, w_stride, n_rows, a, m, y, ldy); break;
    case 2: SUFFIX(q4_blocks_rows)(2, w, w_stride, n_rows, a, m, y, ldy); break;
    case 1: SUFFIX(q4_blocks_rows)(1, w, w_stride, n_rows, a, m, y, ldy); break;
    default: break;
    }
}
#undef Q4_BLOCKS_RA
#else
/* Portable: the single-row dot products, one after another. */
static void SUFFIX(gemm_q4_0_blocks)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                                     float *y, int64_t ldy) {
    SUFFIX(gemm_by_dots)(SUFFIX(dot_q4_0_blocks), w, w_stride, n_rows, a, 0, M, y, ldy);
}
#endif

/* ---- Q4_0 repacked (REPACKED_Q4_0 in kernels.c) ------------------------------------------- */

#ifdef KERNELS_AVX2
/* Bytes 4u .. 4u+3 of an activation block as one 32-bit unit, for a broadcast (qs is not 4-byte
 * aligned; memcpy is how C reads it, and the compiler makes it the broadcast's memory operand). */
static inline __attribute__((always_inline)) int32_t SUFFIX(unit4)(const int8_t *qs, int u) {
    int32_t v;
    memcpy(&v, qs + 4 * u, sizeof(v));
    return v;
}
#ifndef R16_RG_MAX
#define R16_RG_MAX 4 /* most groups per tile */
#endif
#ifndef R16_RA_MAX
#define R16_RA_MAX 8 /* most activation rows per tile */
#endif
#ifdef KERNELS_AVX512
/* y[c * ldy + g * ys + r] = dot_q4_0_blocks(row r of group g, activation row m0 + c) for g < RG,
 * c < RA: groups gs bytes apart from w. Per block, each group's four units are loaded once and
 * split into low and high nibbles; each activation row then takes 8 vpdpbusd per group, each
 * against a broadcast of four of its bytes, and finds every row's block sum in that row's lane
 * (two chains, low and high nibbles, for latency), the block's correction added first. */
static inline __attribute__((always_inline)) void SUFFIX(q4_r16_tile)(int RG, int RA, const uint8_t *w, size_t gs,
                                                                      const q8_act *a, int64_t m0, float *y,
                                                                      int64_t ldy, int64_t ys, int to_l2) {
    const block_q8_0 *yq[R16_RA_MAX];
    const float *yd[R16_RA_MAX];
    const int32_t *yc[R16_RA_MAX];
    SUFFIX(act_rows)(a, m0, RA, a->csum, 1, yq, yd, yc);
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[R16_RG_MAX][R16_RA_MAX];
    for (int g = 0; g < RG; g++)
        for (int c = 0; c < RA; c++) acc[g][c] = _mm512_setzero_ps();
    for (int64_t i = 0; i < a->nb; i++) {
        __m512i wl[R16_RG_MAX][4], wh[R16_RG_MAX][4];
        __m512 dx[R16_RG_MAX];
        for (int g = 0; g < RG; g++) {
            const uint8_t *b = w + g * gs + (size_t)i * R16_BYTES;
            for (size_t o = 0; o < R16_BYTES; o += 64)
                prefetch_group(b + o, RA, RG, PREFETCH_AHEAD_L2, to_l2);
            dx[g] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)b));
            for (int u = 0; u < 4; u++) {
                const __m512i z = _mm512_loadu_si512((const void *)(b + 2 * R16_ROWS + 64 * u));
                wl[g][u] = _mm512_and_si512(z, low);
                wh[g][u] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
            }
        }
        for (int c = 0; c < RA; c++) {
            const int8_t *yw = yq[c][i].qs;
            const __m512 dy = _mm512_set1_ps(yd[c][i]);
            for (int g = 0; g < RG; g++) {
                __m512i s0 = _mm512_set1_epi32(yc[c][i]), s1 = _mm512_setzero_si512();
                for (int u = 0; u < 4; u++) {
                    s0 = _mm512_dpbusd_epi32(s0, wl[g][u], _mm512_set1_epi32(SUFFIX(unit4)(yw, u)));
                    s1 = _mm512_dpbusd_epi32(s1, wh[g][u], _mm512_set1_epi32(SUFFIX(unit4)(yw, 4 + u)));
                }
                acc[g][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)), _mm512_mul_ps(dx[g], dy),
                                            acc[g][c]);
            }
        }
    }
    for (int g = 0; g < RG; g++)
        for (int c = 0; c < RA; c++) _mm512_storeu_ps(y + c * ldy + g * ys, acc[g][c]);
}

/* Tile shapes (override with -D to try others), measured on an AMD EPYC Zen 4 core. Prompts: 8
 * activation rows by 1 group, 170-177 GMAC/s for 256 rows of the 3B shapes from L2 (the file
 * layout's tile: 86-90); 12 and 16 rows, or 2 groups, were as fast or slower. Batched decode (3 or
 * 4 rows): 2 groups, the 3B model's Q4_0 matrices for 4 sequences in 80 ms with 1 thread against
 * 88 with 1 group and 99 with 4 (51 against 53 and 56 with 2 threads). Decode (1 or 2 rows): 4
 * groups, as far apart as the rows allow (GROUPED_ROWS): 64-66 ms against 66-71 with 2 and 72-79
 * with 1 (8: the same as 4); Zen 4 prefetched into L2 (one row now leaves it to the hardware,
 * HARDWARE_DECODE in kernels.c, as fast with 2 groups as with 4). Where the weights go to L1 (GROUP_AHEAD),
 * 2 groups: on an AMD EPYC Zen 5 core one sequence's matmuls took 45.1-45.8 ms against 48.7-49.7
 * with 4 groups and 48.3-49.3 with 1 (three alternated processes, 1 thread). */
#ifndef R16_RA512
#define R16_RA512 8
#endif
#ifndef R16_RG_BATCH512
#define R16_RG_BATCH512 2
#endif
#ifndef R16_RG_DECODE_L2_512
#define R16_RG_DECODE_L2_512 4
#endif
#ifndef R16_RG_DECODE512
#define R16_RG_DECODE512 2
#endif
#define R16_RA R16_RA512
#define R16_RG_BATCH R16_RG_BATCH512
#define R16_RG_DECODE_L2 R16_RG_DECODE_L2_512
#define R16_RG_DECODE R16_RG_DECODE512
#else
/* q4_r16_tile in ymm registers: each group as two halves of 8 rows (a unit's low and high 32
 * bytes). Without VNNI, maddubs leaves each row's products in pairs in two 16-bit lanes; a
 * block's 8 vectors of them are added while they fit in 16 bits (16 products of a nibble and a
 * byte, within [-30720, 30480]) and one madd widens each row's two lanes into its 32-bit lane.
 * On an AMD Zen 4 core (the AVX2 set, and the avxvnni code as avxvnni-evex), against the block
 * order's tile: one activation row 33% (AVX2) and 75-100% (VNNI) faster from the caches, the 3B
 * Q4_0 decode matmuls 72 instead of 81 ms with 1 thread and 50-52 instead of 68-69 with 2; 4 and
 * 256 rows as fast with AVX2 (the maddubs steps bound both) and 30% faster with VNNI. */
static inline __attribute__((always_inline)) void SUFFIX(q4_r16_tile)(int RG, int RA, const uint8_t *w, size_t gs,
                                                                      const q8_act *a, int64_t m0, float *y,
                                                                      int64_t ldy, int64_t ys, int to_l2) {
    const block_q8_0 *yq[R16_RA_MAX];
    const float *yd[R16_RA_MAX];
    const int32_t *yc[R16_RA_MAX];
    SUFFIX(act_rows)(a, m0, RA, a->csum, 1, yq, yd, yc);
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc[2 * R16_RG_MAX][R16_RA_MAX];
    for (int h = 0; h < 2 * RG; h++)
        for (int c = 0; c < RA; c++) acc[h][c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < a->nb; i++) {
        for (int g = 0; g < RG; g++) {
            const uint8_t *b = w + g * gs + (size_t)i * R16_BYTES;
            for (size_t o = 0; o < R16_BYTES; o += 64)
                prefetch_group(b + o, RA, RG, PREFETCH_AHEAD_L2, to_l2);
            for (int h = 0; h < 2; h++) {
                const __m256 dx = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + 16 * h)));
                __m256i wl[4], wh[4];
                for (int u = 0; u < 4; u++) {
                    const __m256i z = _mm256_loadu_si256((const __m256i *)(b + 2 * R16_ROWS + 64 * u + 32 * h));
                    wl[u] = _mm256_and_si256(z, low);
                    wh[u] = _mm256_and_si256(_mm256_srli_epi16(z, 4), low);
                }
                for (int c = 0; c < RA; c++) {
                    const int8_t *yw = yq[c][i].qs;
                    /* Hidden from the optimizer, so that each half broadcasts the row's bytes
                     * again (a load each): otherwise GCC broadcasts a block's RA x 8 units once
                     * for both halves and, short of ymm registers, spills and reloads them all.
                     * On an AMD EPYC Zen 4 core (the AVX2 set, 10 alternated calls) 4 and 256
                     * activation rows then ran at 80-89 instead of 67-73 GMAC/s, and 4
                     * sequences' 3B Q4_0 decode matmuls (kernel_speed --stream) took 158-171
                     * instead of 177-182 ms; one row 0-5% faster. */
                    __asm__("" : "+r"(yw));
#ifdef KERNELS_VNNI
                    __m256i s0 = _mm256_set1_epi32(yc[c][i]), s1 = _mm256_setzero_si256();
                    for (int u = 0; u < 4; u++) {
                        s0 = SUFFIX(dot_u8s8)(s0, wl[u], _mm256_set1_epi32(SUFFIX(unit4)(yw, u)));
                        s1 = SUFFIX(dot_u8s8)(s1, wh[u], _mm256_set1_epi32(SUFFIX(unit4)(yw, 4 + u)));
                    }
                    const __m256i sum = _mm256_add_epi32(s0, s1);
#else
                    __m256i p0 = _mm256_maddubs_epi16(wl[0], _mm256_set1_epi32(SUFFIX(unit4)(yw, 0)));
                    __m256i p1 = _mm256_maddubs_epi16(wh[0], _mm256_set1_epi32(SUFFIX(unit4)(yw, 4)));
                    for (int u = 1; u < 4; u++) {
                        p0 = _mm256_add_epi16(p0, _mm256_maddubs_epi16(wl[u], _mm256_set1_epi32(SUFFIX(unit4)(yw, u))));
                        p1 = _mm256_add_epi16(p1, _mm256_maddubs_epi16(wh[u], _mm256_set1_epi32(SUFFIX(unit4)(yw, 4 + u))));
                    }
                    const __m256i sum = _mm256_add_epi32(_mm256_madd_epi16(_mm256_add_epi16(p0, p1), _mm256_set1_epi16(1)),
                                                         _mm256_set1_epi32(yc[c][i]));
#endif
                    acc[2 * g + h][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum),
                                                        _mm256_mul_ps(dx, _mm256_set1_ps(yd[c][i])), acc[2 * g + h][c]);
                }
            }
        }
    }
    for (int g = 0; g < RG; g++)
        for (int h = 0; h < 2; h++)
            for (int c = 0; c < RA; c++) _mm256_storeu_ps(y + c * ldy + g * ys + 8 * h, acc[2 * g + h][c]);
}

/* Tile shapes, measured as above: 4 activation rows by 1 group (2 rows: 15% slower for 4
 * sequences); one row by 2 groups (1: 25% slower, 4: 8%). */
#ifndef R16_RA256
#define R16_RA256 4
#endif
#ifndef R16_RG_BATCH256
#define R16_RG_BATCH256 1
#endif
#ifndef R16_RG_DECODE256
#define R16_RG_DECODE256 2
#endif
#define R16_RA R16_RA256
#define R16_RG_BATCH R16_RG_BATCH256
#define R16_RG_DECODE_L2 R16_RG_DECODE256
#define R16_RG_DECODE R16_RG_DECODE256
#endif
/* gemm_q4_0_r16's tiles take up to 7 leftover rows, and every tile fits its arrays */
_Static_assert(R16_RA <= 8 && R16_RA <= R16_RA_MAX && R16_RG_BATCH <= R16_RG_MAX && R16_RG_DECODE <= R16_RG_MAX &&
                   R16_RG_DECODE_L2 <= R16_RG_MAX,
               "R16 tile shapes out of range");

/* Activation rows m0 .. m0+RA-1 against n_groups groups (GROUPED_TILES). */
static inline __attribute__((always_inline)) void SUFFIX(q4_r16_rows)(int RG, int RA, const uint8_t *w, size_t gbytes,
                                                                      int64_t n_groups, const q8_act *a, int64_t m0,
                                                                      float *y, int64_t ldy) {
    GROUPED_TILES(SUFFIX(q4_r16_tile), R16_ROWS, RG, RA, w, gbytes, n_groups, a, m0, y, ldy);
}

/* One or two activation rows (RA) by the decode tile of the prefetch level. */
static inline __attribute__((always_inline)) void SUFFIX(q4_r16_decode)(int RA, const uint8_t *w, size_t gbytes,
                                                                        int64_t n_groups, const q8_act *a, int64_t m0,
                                                                        float *y, int64_t ldy) {
    if (weights_to_l2)
        SUFFIX(q4_r16_rows)(R16_RG_DECODE_L2, RA, w, gbytes, n_groups, a, m0, y, ldy);
    else
        SUFFIX(q4_r16_rows)(R16_RG_DECODE, RA, w, gbytes, n_groups, a, m0, y, ldy);
}

/* Repacked Q4_0 rows (a multiple of 16, w_stride bytes per row as in the file). */
static void SUFFIX(gemm_q4_0_r16)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                                  float *y, int64_t ldy) {
    const size_t gbytes = R16_ROWS * w_stride;
    const int64_t ng = n_rows / R16_ROWS;
    int64_t m = 0;
    for (; m + R16_RA <= M; m += R16_RA) SUFFIX(q4_r16_rows)(1, R16_RA, w, gbytes, ng, a, m, y, ldy);
    switch (M - m) {
    case 7: SUFFIX(q4_r16_rows)(1, 7, w, gbytes, ng, a, m, y, ldy); break;
    case 6: SUFFIX(q4_r16_rows)(1, 6, w, gbytes, ng, a, m, y, ldy); break;
    case 5: SUFFIX(q4_r16_rows)(1, 5, w, gbytes, ng, a, m, y, ldy); break;
    case 4: SUFFIX(q4_r16_rows)(R16_RG_BATCH, 4, w, gbytes, ng, a, m, y, ldy); break;
    case 3: SUFFIX(q4_r16_rows)(R16_RG_BATCH, 3, w, gbytes, ng, a, m, y, ldy); break;
    case 2: SUFFIX(q4_r16_decode)(2, w, gbytes, ng, a, m, y, ldy); break;
    case 1: SUFFIX(q4_r16_decode)(1, w, gbytes, ng, a, m, y, ldy); break;
    default: break;
    }
}
#undef R16_RA
#undef R16_RG_BATCH
#undef R16_RG_DECODE_L2
#undef R16_RG_DECODE
#else
/* The sets without a tile for the layout: dot_q4_0_blocks read from it, one output at a time. */
static void SUFFIX(gemm_q4_0_r16)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                                  float *y, int64_t ldy) {
    for (int64_t n = 0; n < n_rows; n++) {
        const uint8_t *group = w + (n / R16_ROWS) * R16_ROWS * w_stride;
        const int r = (int)(n % R16_ROWS);
        for (int64_t m = 0; m < M; m++) {
            const block_q8_0 *yb = a->q + m * a->nb;
            float acc = 0.0f;
            for (int64_t i = 0; i < a->nb; i++) {
                const uint8_t *blk = group + (size_t)i * R16_BYTES;
                uint16_t d;
                memcpy(&d, blk + 2 * r, 2);
                int32_t s = 0;
                for (int u = 0; u < 4; u++)
                    for (int j = 0; j < 4; j++) {
                        const uint8_t q = blk[2 * R16_ROWS + 64 * u + 4 * r + j];
                        s += ((q & 0x0F) - 8) * yb[i].qs[4 * u + j] + ((q >> 4) - 8) * yb[i].qs[16 + 4 * u + j];
                    }
                acc = fmaf((float)s, fp16_to_fp32(d) * fp16_to_fp32(yb[i].d), acc);
            }
            y[m * ldy + n] = acc;
        }
    }
}
#endif

/* ---- Q8_0 repacked (REPACKED_Q8_0 in kernels.c) ------------------------------------------- */

#ifdef KERNELS_AVX512
/* How the tile prefetches each group's blocks (WEIGHT_PREFETCH): one prefetch every
 * R8_PREFETCH_STEP bytes, each cache line 4 times; into L2 (Zen 4) R8_AHEAD_L2 ahead, 4 times
 * PREFETCH_AHEAD_L2 since a group's stream moves 8 rows' bytes per block, into L1 GROUP_AHEAD.
 * Measured on an AMD EPYC Zen 4 core (the 3B model's Q8_0 decode matmuls, kernel_speed --stream,
 * the same bits): 4 sequences took 139-145 ms against 181 with PREFETCH_AHEAD_L2, and one
 * sequence 126-131 ms with 16-byte steps against 143-154 with 64-byte ones, 142-148 with 32 and
 * 154 with 8 (the file layout's tiles, which prefetch each row's 34-byte blocks, about twice per
 * line: 130-142). A core of that CPU appears to drop prefetches it has no room for
 * (WEIGHT_PREFETCH); asking again for the same line a little later recovers them. One sequence
 * there now issues no prefetches at all, faster still (HARDWARE_DECODE in kernels.c). On an Intel
 * Xeon (AMX, family 6 model 167), which prefetches into L1, a standalone read of the layout as 2
 * streams took 20.6 GB/s with 16-byte steps against 18.3 with 64-byte ones, and the decode
 * matmuls with 2 KiB ahead (and 2 groups, R8_RG_DECODE) were 4-6% faster than with 8 KiB and 4
 * groups, as fast as the file layout or up to 2% faster (GROUP_AHEAD, from Zen 5, now puts 2
 * groups 4 KiB ahead; on an Emerald Rapids Xeon 2 and 8 KiB were within the noise of it). */
#ifndef R8_AHEAD_L2
#define R8_AHEAD_L2 (4 * PREFETCH_AHEAD_L2)
#endif
#ifndef R8_PREFETCH_STEP
#define R8_PREFETCH_STEP 16
#endif
/* Groups per tile for one activation row, by where the weights are prefetched: into L2 (Zen 4),
 * 4 (2 and 1 were no faster there, with 64-byte steps); into L1, 2: an Intel Xeon core reads 1 or
 * 2 streams faster than 4 (kernels_read_sum: 20.8 and 23.6 GB/s against 18.6), and its decode
 * matmuls took 104.7-107.7 ms with 2 threads against 107.8-113.9 with 4 groups (three alternated
 * pairs of processes; with 1 thread within the noise). */
#ifndef R8_RG_DECODE_L2
#define R8_RG_DECODE_L2 4
#endif
#ifndef R8_RG_DECODE
#define R8_RG_DECODE 2
#endif
/* Groups per tile for 3 or 4 activation rows when those are all the rows (batched decode) and
 * the weights are prefetched into L1; into L2 (Zen 4) they take one group. Two groups of 4 rows
 * need 32 accumulators, AVX-512's every register, so GCC keeps some on the stack: from the caches
 * that tile runs at 66 instead of 81 GMAC/s, but it reads two streams, and on an Intel Xeon
 * (Emerald Rapids), whose core reads one stream far slower than the file layout's tile reads its
 * eight, 4 sequences' 3B decode matmuls took 238-242 instead of 271-278 ms with 1 thread and
 * 127-131 instead of 143-160 with 2 (best passes of three alternated pairs of processes, the same
 * bits; the file layout's tile: 222 and 119); 3 sequences (24 accumulators) 232-237 instead of
 * 270-315 and medians of 149-156 instead of 165-174 with 2. Prompts keep one group: their
 * weights come from L2, where the spills cost. Not yet measured on Zen 5, which also prefetches
 * into L1. */
#ifndef R8_RG_BATCH
#define R8_RG_BATCH 2
#endif
/* y[c * ldy + g * ys + r] = dot_q8_0(row r of group g, activation row m0 + c) for g < RG, c < RA,
 * RG * RA <= 8, groups gs bytes apart from w; the activation blocks in PAIR_ORDER. Per block, each
 * group's four units are loaded once (made unsigned as load_wblock makes Q8_0) and its 8 scales
 * converted and doubled to the units' 16 lanes; each activation row then takes, per group, one
 * product of scales and four vpdpbusd, each starting from the row's corrections of lanes u and
 * 4 + u and against its words u and 4 + u, both broadcast as 64-bit words. Accumulator (g, c, u)
 * holds row r's lane u in element 2r and its lane 4 + u in 2r + 1: hsum8's pairs are neighbours. */
static inline __attribute__((always_inline)) void SUFFIX(q8_r8_tile)(int RG, int RA, const uint8_t *w, size_t gs,
                                                                     const q8_act *a, int64_t m0, float *y,
                                                                     int64_t ldy, int64_t ys, int to_l2) {
    const block_q8_0 *yq[4];
    const float *yd[4];
    const int32_t *yc[4];
    SUFFIX(act_rows)(a, m0, RA, a->corr, 8, yq, yd, yc);
    const __m512i twice = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    __m512 acc[8][4]; /* [g * RA + c][u] */
    for (int k = 0; k < RG * RA; k++)
        for (int u = 0; u < 4; u++) acc[k][u] = _mm512_setzero_ps();
    for (int64_t i = 0; i < a->nb; i++)
        for (int g = 0; g < RG; g++) { /* one group's units at a time: 4 registers, not 4 per group */
            const uint8_t *b = w + g * gs + (size_t)i * R8_BYTES;
            for (size_t o = 0; o < R8_BYTES; o += R8_PREFETCH_STEP) prefetch_group(b + o, RA, RG, R8_AHEAD_L2, to_l2);
            const __m256 d8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)b));
            const __m512 dx = _mm512_permutexvar_ps(twice, _mm512_castps256_ps512(d8));
            __m512i wq[4];
            for (int u = 0; u < 4; u++)
                wq[u] = _mm512_xor_si512(_mm512_loadu_si512((const void *)(b + 2 * R8_ROWS + 64 * u)),
                                         _mm512_set1_epi8((char)0x80));
            for (int c = 0; c < RA; c++) {
                const __m512 d = _mm512_mul_ps(dx, _mm512_set1_ps(yd[c][i]));
                for (int u = 0; u < 4; u++) {
                    int64_t yw, cw; /* words u and 4 + u (PAIR_ORDER), and their corrections */
                    memcpy(&yw, yq[c][i].qs + 8 * u, sizeof(yw));
                    memcpy(&cw, yc[c] + 8 * i + 2 * u, sizeof(cw));
                    const __m512i lanes = _mm512_dpbusd_epi32(_mm512_set1_epi64(cw), wq[u], _mm512_set1_epi64(yw));
                    acc[g * RA + c][u] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(lanes), acc[g * RA + c][u]);
                }
            }
        }
    const __m512i even = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 14, 12, 10, 8, 6, 4, 2, 0);
    for (int g = 0; g < RG; g++)
        for (int c = 0; c < RA; c++) {
            __m512 t[4]; /* element 2r: row r's lanes u + (4 + u), as hsum8 pairs them */
            for (int u = 0; u < 4; u++) {
                const __m512 v = acc[g * RA + c][u];
                t[u] = _mm512_add_ps(v, _mm512_permute_ps(v, 0xB1));
            }
            const __m512 sum = _mm512_add_ps(_mm512_add_ps(t[0], t[2]), _mm512_add_ps(t[1], t[3]));
            _mm256_storeu_ps(y + c * ldy + g * ys, _mm512_castps512_ps256(_mm512_permutexvar_ps(even, sum)));
        }
}

/* Activation rows m0 .. m0+RA-1 against n_groups groups (GROUPED_TILES). */
static inline __attribute__((always_inline)) void SUFFIX(q8_r8_rows)(int RG, int RA, const uint8_t *w, size_t gbytes,
                                                                     int64_t n_groups, const q8_act *a, int64_t m0,
                                                                     float *y, int64_t ldy) {
    GROUPED_TILES(SUFFIX(q8_r8_tile), R8_ROWS, RG, RA, w, gbytes, n_groups, a, m0, y, ldy);
}

/* Repacked Q8_0 rows (a multiple of 8, w_stride bytes per row as in the file): tiles of 4
 * activation rows by one group (16 accumulators), 3 or 4 rows that are all the rows by R8_RG_BATCH
 * groups where the weights go to L1, 2 rows by 2 groups, and one row (decode) by R8_RG_DECODE_L2 or
 * R8_RG_DECODE groups, one stream of reads per group. On Intel Xeons 4 rows by one group read slower
 * from memory than the file layout's tile, which reads 8 streams (Emerald Rapids: 278 against 222
 * ms for the 3B model's matmuls, 1 thread); each tile as two passes of 2 rows by 2 groups, the
 * second from L2, took 314-326 ms there. */
static void SUFFIX(gemm_q8_0_r8)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                                 float *y, int64_t ldy) {
    const size_t gbytes = R8_ROWS * w_stride;
    const int64_t ng = n_rows / R8_ROWS;
    if (!weights_to_l2 && (M == 3 || M == 4)) { /* batched decode, weights into L1: R8_RG_BATCH */
        if (M == 4)
            SUFFIX(q8_r8_rows)(R8_RG_BATCH, 4, w, gbytes, ng, a, 0, y, ldy);
        else
            SUFFIX(q8_r8_rows)(R8_RG_BATCH, 3, w, gbytes, ng, a, 0, y, ldy);
        return;
    }
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) SUFFIX(q8_r8_rows)(1, 4, w, gbytes, ng, a, m, y, ldy);
    switch (M - m) {
    case 3: SUFFIX(q8_r8_rows)(1, 3, w, gbytes, ng, a, m, y, ldy); break;
    case 2: SUFFIX(q8_r8_rows)(2, 2, w, gbytes, ng, a, m, y, ldy); break;
    case 1:
        if (weights_to_l2)
            SUFFIX(q8_r8_rows)(R8_RG_DECODE_L2, 1, w, gbytes, ng, a, m, y, ldy);
        else
            SUFFIX(q8_r8_rows)(R8_RG_DECODE, 1, w, gbytes, ng, a, m, y, ldy);
        break;
    default: break;
    }
}
#else
/* The sets without a tile for the layout: dot_q8_0's lanes read from it, one output at a time
 * (activation blocks in PAIR_ORDER). */
static void SUFFIX(gemm_q8_0_r8)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                                 float *y, int64_t ldy) {
    for (int64_t n = 0; n < n_rows; n++) {
        const uint8_t *group = w + (n / R8_ROWS) * R8_ROWS * w_stride;
        const int r = (int)(n % R8_ROWS);
        for (int64_t m = 0; m < M; m++) {
            const block_q8_0 *yb = a->q + m * a->nb;
            float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            for (int64_t i = 0; i < a->nb; i++) {
                const uint8_t *blk = group + (size_t)i * R8_BYTES;
                uint16_t dw;
                memcpy(&dw, blk + 2 * r, 2);
                const float d = fp16_to_fp32(dw) * fp16_to_fp32(yb[i].d);
                for (int l = 0; l < 8; l++) { /* lane l: unit l % 4, its first or second word */
                    const int8_t *wl = (const int8_t *)(blk + 2 * R8_ROWS + 64 * (l % 4) + 8 * r + 4 * (l / 4));
                    const int8_t *yl = yb[i].qs + 8 * (l % 4) + 4 * (l / 4);
                    const int32_t lane = wl[0] * yl[0] + wl[1] * yl[1] + wl[2] * yl[2] + wl[3] * yl[3];
                    acc[l] = fmaf(d, (float)lane, acc[l]);
                }
            }
#ifdef KERNELS_AVX2
            y[m * ldy + n] = SUFFIX(hsum8)(_mm256_loadu_ps(acc));
#else
            y[m * ldy + n] = SUFFIX(hsum8_lanes)(acc);
#endif
        }
    }
}
#endif

#ifdef KERNELS_AVX2
#ifndef Q6_K_UNPACK
/* ggml's AVX2 unpacking of 128 Q6_K values (low bits b1, b2, high bits bh) into q[0..3], 6-bit
 * unsigned bytes; W = 256 for one row, 512 for two rows (one per half) */
#define Q6_K_UNPACK(W, b1, b2, bh, q)                                                                            \
    do {                                                                                                          \
        const __m##W##i m15_ = _mm##W##_set1_epi8(15);                                                            \
        q[0] = _mm##W##_or_si##W(_mm##W##_and_si##W(b1, m15_),                                                    \
                                 _mm##W##_slli_epi16(_mm##W##_and_si##W(bh, _mm##W##_set1_epi8(3)), 4));          \
        q[1] = _mm##W##_or_si##W(_mm##W##_and_si##W(b2, m15_),                                                    \
                                 _mm##W##_slli_epi16(_mm##W##_and_si##W(bh, _mm##W##_set1_epi8(12)), 2));         \
        q[2] = _mm##W##_or_si##W(_mm##W##_and_si##W(_mm##W##_srli_epi16(b1, 4), m15_),                            \
                                 _mm##W##_and_si##W(bh, _mm##W##_set1_epi8(48)));                                 \
        q[3] = _mm##W##_or_si##W(_mm##W##_and_si##W(_mm##W##_srli_epi16(b2, 4), m15_),                            \
                                 _mm##W##_srli_epi16(_mm##W##_and_si##W(bh, _mm##W##_set1_epi8(-64)), 2));        \
    } while (0)
#endif

static const uint8_t SUFFIX(q6_K_shuffle)[128] = {
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,  2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
    4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,  6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7,
    8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9,  10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11,
    12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13,  14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15};

/* ggml's AVX2 ggml_vec_dot_q6_K_q8_K, step for step, for one Q6_K row against RA Q8_K rows at
 * once: each weight block's 6-bit values and scales are decoded once for all RA rows. Per row the
 * integer lanes are ggml's (exact: maddubs cannot saturate on 6-bit x 8-bit pairs) and the float
 * steps are its own (acc = fma(d, float(lanes), acc) per block in order, then hsum8), so every
 * output has the single-row kernel's bits; dot_q6_K is this with RA = 1. */
static inline __attribute__((always_inline)) void SUFFIX(q6_K_tile)(int RA, int64_t nb, const block_q6_K *xa,
                                                                    const block_q8_K *const *ya, float *y,
                                                                    int64_t ldy, int to_l2) {
    __m256 acc[4];
    for (int c = 0; c < RA; c++) acc[c] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        /* the row is one stream (decode takes rows one after another): without this, a
         * 3B model's LM head read 8.6 GB/s, far below what the core computes from L2 */
        for (int l = 0; l < (int)sizeof(block_q6_K); l += 64)
            prefetch_weights((const char *)&xa[i] + l, RA, to_l2);
        const uint8_t *q4 = xa[i].ql;
        const uint8_t *qh = xa[i].qh;
        const __m128i scales = _mm_loadu_si128((const __m128i *)xa[i].scales);
        __m256i sumi[4];
        for (int c = 0; c < RA; c++) sumi[c] = _mm256_setzero_si256();
        for (int j = 0; j < QK_K / 128; ++j) {
            const __m256i q4bits1 = _mm256_loadu_si256((const __m256i *)q4); q4 += 32;
            const __m256i q4bits2 = _mm256_loadu_si256((const __m256i *)q4); q4 += 32;
            const __m256i q4bitsH = _mm256_loadu_si256((const __m256i *)qh); qh += 32;
            __m256i q6[4];
            Q6_K_UNPACK(256, q4bits1, q4bits2, q4bitsH, q6);
            const __m128i *shuf = (const __m128i *)SUFFIX(q6_K_shuffle) + 4 * j;
            const __m256i scale_0 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, _mm_loadu_si128(shuf + 0)));
            const __m256i scale_1 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, _mm_loadu_si128(shuf + 1)));
            const __m256i scale_2 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, _mm_loadu_si128(shuf + 2)));
            const __m256i scale_3 = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, _mm_loadu_si128(shuf + 3)));
            for (int c = 0; c < RA; c++) {
                const __m256i *q8 = (const __m256i *)(ya[c][i].qs + 128 * j);
                const __m256i p16_0 = _mm256_madd_epi16(scale_0, _mm256_maddubs_epi16(q6[0], _mm256_loadu_si256(q8 + 0)));
                const __m256i p16_1 = _mm256_madd_epi16(scale_1, _mm256_maddubs_epi16(q6[1], _mm256_loadu_si256(q8 + 1)));
                const __m256i p16_2 = _mm256_madd_epi16(scale_2, _mm256_maddubs_epi16(q6[2], _mm256_loadu_si256(q8 + 2)));
                const __m256i p16_3 = _mm256_madd_epi16(scale_3, _mm256_maddubs_epi16(q6[3], _mm256_loadu_si256(q8 + 3)));
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p16_0, p16_1));
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p16_2, p16_3));
            }
        }
        const __m256i scales_16 = _mm256_cvtepi8_epi16(scales);
        const float dx = fp16_to_fp32(xa[i].d);
        for (int c = 0; c < RA; c++) {
            const __m256i q8sums = _mm256_loadu_si256((const __m256i *)ya[c][i].bsums);
            const __m256i q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);
            const float d = ya[c][i].d * dx;
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(_mm256_sub_epi32(sumi[c], q8sclsub)), acc[c]);
        }
    }
    for (int c = 0; c < RA; c++) y[c * ldy] = SUFFIX(hsum8)(acc[c]);
}
#endif

#ifdef KERNELS_AVX512
/* q6_K_tile for two weight rows at once, x0 and the row gs bytes after it: a zmm holds a vector
 * of the first in its low 256 bits and the same vector of the second in its high 256 bits,
 * against the activation vector broadcast into both halves. Each half does exactly q6_K_tile's
 * integer and float steps for its row, and is reduced by the same hsum8: y[c * ldy] for the
 * first row, y[c * ldy + ys] for the second. */
static inline __attribute__((always_inline)) void SUFFIX(q6_K_tile2)(int RA, int64_t nb, const block_q6_K *x0,
                                                                     size_t gs, const block_q8_K *const *ya,
                                                                     float *y, int64_t ldy, int64_t ys, int to_l2) {
    const block_q6_K *x1 = (const block_q6_K *)((const uint8_t *)x0 + gs);
    __m512 acc[4];
    for (int c = 0; c < RA; c++) acc[c] = _mm512_setzero_ps();
#define PAIR256(p0, p1) \
    _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(p0))), \
                       _mm256_loadu_si256((const __m256i *)(p1)), 1)
    for (int64_t i = 0; i < nb; i++) {
        /* each row's group is one stream (GROUPED_ROWS), read as the other kernels read theirs */
        for (int l = 0; l < (int)sizeof(block_q6_K); l += 64) {
            prefetch_weights((const char *)&x0[i] + l, RA, to_l2);
            prefetch_weights((const char *)&x1[i] + l, RA, to_l2);
        }
        const __m256i scales = _mm256_set_m128i(_mm_loadu_si128((const __m128i *)x1[i].scales),
                                                _mm_loadu_si128((const __m128i *)x0[i].scales));
        __m512i sumi[4];
        for (int c = 0; c < RA; c++) sumi[c] = _mm512_setzero_si512();
        for (int j = 0; j < QK_K / 128; ++j) {
            const __m512i q4bits1 = PAIR256(x0[i].ql + 64 * j, x1[i].ql + 64 * j);
            const __m512i q4bits2 = PAIR256(x0[i].ql + 64 * j + 32, x1[i].ql + 64 * j + 32);
            const __m512i q4bitsH = PAIR256(x0[i].qh + 32 * j, x1[i].qh + 32 * j);
            __m512i q6[4];
            Q6_K_UNPACK(512, q4bits1, q4bits2, q4bitsH, q6);
            const __m128i *shuf = (const __m128i *)SUFFIX(q6_K_shuffle) + 4 * j;
            __m512i sc[4];
            for (int k = 0; k < 4; k++)
                sc[k] = _mm512_cvtepi8_epi16(_mm256_shuffle_epi8(scales, _mm256_broadcastsi128_si256(_mm_loadu_si128(shuf + k))));
            for (int c = 0; c < RA; c++) {
                const __m256i *q8 = (const __m256i *)(ya[c][i].qs + 128 * j);
                const __m512i p16_0 = _mm512_madd_epi16(sc[0], _mm512_maddubs_epi16(q6[0], _mm512_broadcast_i64x4(_mm256_loadu_si256(q8 + 0))));
                const __m512i p16_1 = _mm512_madd_epi16(sc[1], _mm512_maddubs_epi16(q6[1], _mm512_broadcast_i64x4(_mm256_loadu_si256(q8 + 1))));
                const __m512i p16_2 = _mm512_madd_epi16(sc[2], _mm512_maddubs_epi16(q6[2], _mm512_broadcast_i64x4(_mm256_loadu_si256(q8 + 2))));
                const __m512i p16_3 = _mm512_madd_epi16(sc[3], _mm512_maddubs_epi16(q6[3], _mm512_broadcast_i64x4(_mm256_loadu_si256(q8 + 3))));
                sumi[c] = _mm512_add_epi32(sumi[c], _mm512_add_epi32(p16_0, p16_1));
                sumi[c] = _mm512_add_epi32(sumi[c], _mm512_add_epi32(p16_2, p16_3));
            }
        }
        const __m512i scales_16 = _mm512_cvtepi8_epi16(scales);
        const __m512 dx = _mm512_mask_broadcastss_ps(_mm512_set1_ps(fp16_to_fp32(x0[i].d)), 0xFF00,
                                                     _mm_set_ss(fp16_to_fp32(x1[i].d)));
        for (int c = 0; c < RA; c++) {
            const __m512i q8sums = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)ya[c][i].bsums));
            const __m512i q8sclsub = _mm512_slli_epi32(_mm512_madd_epi16(q8sums, scales_16), 5);
            const __m512 d = _mm512_mul_ps(_mm512_set1_ps(ya[c][i].d), dx);
            acc[c] = _mm512_fmadd_ps(d, _mm512_cvtepi32_ps(_mm512_sub_epi32(sumi[c], q8sclsub)), acc[c]);
        }
    }
#undef PAIR256
    for (int c = 0; c < RA; c++) {
        y[c * ldy] = SUFFIX(hsum8)(_mm512_castps512_ps256(acc[c]));
        y[c * ldy + ys] = SUFFIX(hsum8)(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[c]), 1)));
    }
}
#endif

/* Q6_K weights against Q8_K activations. The AVX2 set runs ggml's AVX2 code; the portable set
 * computes the same 8 integer lanes in plain C (lane L holds bytes 4L..4L+3 of every 32-element
 * group, scaled, minus 32 * the scaled block sums 2L and 2L+1; each block adds d * lane to a
 * float lane with FMA; the lanes are summed at the end), so both give the same result. */
static float SUFFIX(dot_q6_K)(int64_t n, const void *vx, const void *vy) {
#ifdef KERNELS_AVX2
    const block_q8_K *ya = (const block_q8_K *)vy;
    float y;
    AT_PREFETCH_LEVEL(SUFFIX(q6_K_tile), 1, n / QK_K, (const block_q6_K *)vx, &ya, &y, 0);
    return y;
#else

    const block_q6_K *x = (const block_q6_K *)vx;
    const block_q8_K *y = (const block_q8_K *)vy;
    const int64_t nb = n / QK_K;
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    uint8_t q[QK_K];
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        for (int half = 0; half < QK_K / 128; half++) {
            uint8_t *a = q + 128 * half;
            for (int l = 0; l < 32; l++) {
                a[l + 0] = (uint8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4));
                a[l + 32] = (uint8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
                a[l + 64] = (uint8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4));
                a[l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
            }
            ql += 64;
            qh += 32;
        }
        int32_t lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        for (int g = 0; g < QK_K / 32; g++) {  /* 32-element groups, in element order */
            for (int L = 0; L < 8; L++) {
                int32_t s4 = 0;
                for (int b = 0; b < 4; b++) s4 += (int32_t)q[32 * g + 4 * L + b] * (int32_t)y[i].qs[32 * g + 4 * L + b];
                lane[L] += s4 * x[i].scales[2 * g + (L >= 4)];
            }
        }
        const float d = y[i].d * fp16_to_fp32(x[i].d);
        for (int L = 0; L < 8; L++) {
            lane[L] -= 32 * (y[i].bsums[2 * L] * x[i].scales[2 * L] + y[i].bsums[2 * L + 1] * x[i].scales[2 * L + 1]);
            acc[L] = fmaf(d, (float)lane[L], acc[L]);
        }
    }
    return SUFFIX(hsum8_lanes)(acc);
#endif
}

#ifdef KERNELS_AVX2
/* ROWS (1, or 2 with AVX-512: x and the row gs bytes after it, outputs ys apart) weight rows
 * against RA activation rows ya[0 .. RA-1] */
static inline __attribute__((always_inline)) void SUFFIX(q6_K_tile_rows)(int ROWS, int RA, int64_t nb,
                                                                         const block_q6_K *x, size_t gs,
                                                                         const block_q8_K *const *ya, float *y,
                                                                         int64_t ldy, int64_t ys) {
#ifdef KERNELS_AVX512
    if (ROWS == 2) {
        AT_PREFETCH_LEVEL(SUFFIX(q6_K_tile2), RA, nb, x, gs, ya, y, ldy, ys);
        return;
    }
#endif
    (void)gs;
    (void)ys;
    AT_PREFETCH_LEVEL(SUFFIX(q6_K_tile), RA, nb, x, ya, y, ldy);
}

/* ROWS weight rows from x (gs bytes apart, outputs ys apart) against all M activation rows, 4 at a
 * time */
static inline __attribute__((always_inline)) void SUFFIX(q6_K_row_tiles)(int ROWS, const block_q6_K *x,
                                                                         size_t gs, const q8_act *a,
                                                                         int64_t M, float *y, int64_t ldy,
                                                                         int64_t ys) {
    for (int64_t m = 0; m < M; m += 4) {
        const block_q8_K *ya[4] = {NULL, NULL, NULL, NULL};
        for (int c = 0; c < 4 && m + c < M; c++) ya[c] = a->qk + (m + c) * a->nb;
        float *ym = y + m * ldy;
        switch (M - m) {
        case 1: SUFFIX(q6_K_tile_rows)(ROWS, 1, a->nb, x, gs, ya, ym, ldy, ys); break;
        case 2: SUFFIX(q6_K_tile_rows)(ROWS, 2, a->nb, x, gs, ya, ym, ldy, ys); break;
        case 3: SUFFIX(q6_K_tile_rows)(ROWS, 3, a->nb, x, gs, ya, ym, ldy, ys); break;
        default: SUFFIX(q6_K_tile_rows)(ROWS, 4, a->nb, x, gs, ya, ym, ldy, ys); break;
        }
    }
}
#endif

/* y[m * ldy + r] = dot_q6_K(weight row r, activation row m) for r < n_rows, m < M, with the
 * activations as a->qk (Q8_K): each weight row (each pair of rows with AVX-512) against 4
 * activation rows at a time. With AVX-512 a pair is row j of each half of the rows
 * (GROUPED_ROWS), so that each half is read front to back as one stream. On one AMD EPYC (Zen 5)
 * core that reads the LM head of a 3B Q4_0 model (49152 rows) in 3.7-3.9 ms (~33 GB/s); pairs of
 * neighbouring rows, with the next pair prefetched, took 6.1-7.8 ms (~18 GB/s). With 2 threads:
 * 2.6-2.9 against 3.7-4.0 ms. */
static void SUFFIX(gemm_q6_K)(const uint8_t *w, size_t w_stride, int64_t n_rows, const q8_act *a, int64_t M,
                              float *y, int64_t ldy) {
    int64_t r = 0;
#ifdef KERNELS_AVX512
    const int64_t g = n_rows / 2;
    for (int64_t j = 0; j < g; j++)
        SUFFIX(q6_K_row_tiles)(2, (const block_q6_K *)(w + (size_t)j * w_stride), g * w_stride, a, M, y + j, ldy, g);
    r = 2 * g;
#endif
    for (; r < n_rows; r++) {
        const block_q6_K *x = (const block_q6_K *)(w + (size_t)r * w_stride);
#ifdef KERNELS_AVX2
        SUFFIX(q6_K_row_tiles)(1, x, w_stride, a, M, y + r, ldy, 1);
#else
        for (int64_t m = 0; m < M; m++) y[m * ldy + r] = SUFFIX(dot_q6_K)(a->nb * QK_K, x, a->qk + m * a->nb);
#endif
    }
}

/* F16 and F32 dot products come in two summation orders, because ggml uses two: its vec_dot
 * (one row of activations: decode) sums 4 accumulators of 8 lanes over steps of 32 and reduces
 * them with hadd; llamafile's tinyBLAS (two or more rows: prompts) sums one 8-lane accumulator
 * and reduces it with movehl/movehdup. F16 x F16 products are exact in float, so matching the
 * order makes the results bit-identical. */

#ifdef KERNELS_AVX2
/* GGML_F32x8_REDUCE of four accumulators */
static inline float SUFFIX(reduce4)(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    a0 = _mm256_add_ps(a0, a2);
    a1 = _mm256_add_ps(a1, a3);
    a0 = _mm256_add_ps(a0, a1);
    const __m128 t0 = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    const __m128 t1 = _mm_hadd_ps(t0, t0);
    return _mm_cvtss_f32(_mm_hadd_ps(t1, t1));
}
#define LOAD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#endif

#ifndef KERNELS_AVX2
/* reduce4's order on four 8-lane accumulators, for the portable set: (a0 + a2) + (a1 + a3) lane
 * by lane, then (hi + lo), then two horizontal adds */
static inline float SUFFIX(reduce4_lanes)(float a[4][8]) {
    float s[8];
    for (int l = 0; l < 8; l++) s[l] = (a[0][l] + a[2][l]) + (a[1][l] + a[3][l]);
    const float t0 = s[0] + s[4], t1 = s[1] + s[5], t2 = s[2] + s[6], t3 = s[3] + s[7];
    return (t0 + t1) + (t2 + t3);
}
#endif

#ifdef KERNELS_AVX2
/* Elements i .. i+7 of an F16 (f16) or F32 row, as floats */
static inline __attribute__((always_inline)) __m256 SUFFIX(load8)(int f16, const void *p, int64_t i) {
    return f16 ? LOAD_F16((const uint16_t *)p + i) : _mm256_loadu_ps((const float *)p + i);
}
#endif

/* Element i of an F16 (f16) or F32 row, as a float */
static inline __attribute__((always_inline)) float SUFFIX(elem)(int f16, const void *p, int64_t i) {
    return f16 ? fp16_to_fp32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* F16 (f16 = 1) and F32 (f16 = 0, a constant once inlined) dot products in ggml's two AVX2
 * orders. vec: 4 x 8 lanes over steps of 32, reduce4, then the tail, in double for F16 (as
 * ggml_vec_dot_f16) and in float for F32. blas: tinyBLAS's one 8-lane accumulator, hsum8. The
 * portable set runs the same lanes with fmaf, so every set gives the same bits. */
static inline __attribute__((always_inline)) float SUFFIX(dot_vec)(int f16, int64_t n, const void *x, const void *y) {
    int64_t i = 0;
    const int64_t np = n & ~(int64_t)31;
#ifdef KERNELS_AVX2
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (; i < np; i += 32)
        for (int j = 0; j < 4; j++)
            a[j] = _mm256_fmadd_ps(SUFFIX(load8)(f16, x, i + 8 * j), SUFFIX(load8)(f16, y, i + 8 * j), a[j]);
    const float head = SUFFIX(reduce4)(a[0], a[1], a[2], a[3]);
#else
    float a[4][8] = {{0}};
    for (; i < np; i += 32)
        for (int j = 0; j < 4; j++)
            for (int l = 0; l < 8; l++)
                a[j][l] = fmaf(SUFFIX(elem)(f16, x, i + 8 * j + l), SUFFIX(elem)(f16, y, i + 8 * j + l), a[j][l]);
    const float head = SUFFIX(reduce4_lanes)(a);
#endif
    if (f16) {
        double sum = head;
        for (; i < n; i++) sum += (double)(SUFFIX(elem)(1, x, i) * SUFFIX(elem)(1, y, i));
        return (float)sum;
    }
    float sum = head;
    for (; i < n; i++) sum += SUFFIX(elem)(0, x, i) * SUFFIX(elem)(0, y, i);
    return sum;
}

static inline __attribute__((always_inline)) float SUFFIX(dot_blas)(int f16, int64_t n, const void *x, const void *y) {
    if (n % 8 != 0) return SUFFIX(dot_vec)(f16, n, x, y);
#ifdef KERNELS_AVX2
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(SUFFIX(load8)(f16, x, i), SUFFIX(load8)(f16, y, i), acc);
    return SUFFIX(hsum8)(acc);
#else
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] = fmaf(SUFFIX(elem)(f16, x, i + l), SUFFIX(elem)(f16, y, i + l), acc[l]);
    return SUFFIX(hsum8_lanes)(acc);
#endif
}

static float SUFFIX(dot_f16_vec)(int64_t n, const void *x, const void *y) { return SUFFIX(dot_vec)(1, n, x, y); }
static float SUFFIX(dot_f16_blas)(int64_t n, const void *x, const void *y) { return SUFFIX(dot_blas)(1, n, x, y); }
static float SUFFIX(dot_f32_vec)(int64_t n, const void *x, const void *y) { return SUFFIX(dot_vec)(0, n, x, y); }
static float SUFFIX(dot_f32_blas)(int64_t n, const void *x, const void *y) { return SUFFIX(dot_blas)(0, n, x, y); }

/* ggml's vectorized expf (ggml_v_expf, ggml-cpu/vec.h, MIT): the softmax uses it on AVX2,
 * and it differs from libm's expf in the last bit, so attention needs the same function. */
#ifdef KERNELS_AVX2
static inline __m256 SUFFIX(v_expf)(__m256 x) {
    const __m256 r = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), r);
    const __m256 n = _mm256_sub_ps(z, r);
    const __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x));
    const __m256i e = _mm256_slli_epi32(_mm256_castps_si256(z), 23);
    const __m256 k = _mm256_castsi256_ps(_mm256_add_epi32(e, _mm256_castps_si256(_mm256_set1_ps(1))));
    const __m256i c = _mm256_castps_si256(_mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), n), _mm256_set1_ps(126), _CMP_GT_OQ));
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 j = _mm256_fmadd_ps(
        _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b, _mm256_set1_ps(0x1.573e2ep-5f)), u,
                        _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b, _mm256_set1_ps(0x1.fffdb6p-2f))),
        u, _mm256_mul_ps(_mm256_set1_ps(0x1.ffffecp-1f), b));
    if (!_mm256_movemask_ps(_mm256_castsi256_ps(c))) return _mm256_fmadd_ps(j, k, k);
    const __m256i g = _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ)),
                                       _mm256_set1_epi32(0x82000000u));
    const __m256 s1 = _mm256_castsi256_ps(_mm256_add_epi32(g, _mm256_set1_epi32(0x7f000000u)));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_sub_epi32(e, g));
    const __m256i d = _mm256_castps_si256(_mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.f), n), _mm256_set1_ps(192), _CMP_GT_OQ));
    return _mm256_or_ps(
        _mm256_and_ps(_mm256_castsi256_ps(d), _mm256_mul_ps(s1, s1)),
        _mm256_andnot_ps(_mm256_castsi256_ps(d),
                         _mm256_or_ps(_mm256_and_ps(_mm256_castsi256_ps(c), _mm256_mul_ps(_mm256_fmadd_ps(s2, j, s2), s1)),
                                      _mm256_andnot_ps(_mm256_castsi256_ps(c), _mm256_fmadd_ps(k, j, k)))));
}
#endif

#ifndef KERNELS_AVX2
/* v_expf above for one lane, operation for operation (fmaf for each fused step, the same bit
 * arithmetic, the same choice between its three results), so the portable set's softmax gives
 * the AVX2 sets' bits */
static float SUFFIX(v_expf_lane)(float x) {
    const float r = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, r);
    const float n = z - r;
    const float b = fmaf(-n, 0x1.7f7d1cp-20f, fmaf(-n, 0x1.62e4p-1f, x));
    const uint32_t e = fp32_to_bits(z) << 23;
    const float k = fp32_from_bits(e + fp32_to_bits(1.0f));
    const float u = b * b;
    const float j = fmaf(fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f)), u,
                         0x1.ffffecp-1f * b);
    if (!(fabsf(n) > 126.0f)) return fmaf(k, j, k);
    const uint32_t g = n <= 0.0f ? 0x82000000u : 0u;
    const float s1 = fp32_from_bits(g + 0x7f000000u);
    const float s2 = fp32_from_bits(e - g);
    if (fabsf(n) > 192.0f) return s1 * s1;
    return fmaf(s2, j, s2) * s1;
}
#endif

/* e[j] = exp(s[j] - max) for j < n (n a multiple of 8, masked entries already -INFINITY);
 * returns their sum as ggml_vec_soft_max_f32 accumulates it. */
static double SUFFIX(softmax_exp)(int64_t n, float *s, float max) {
    double sum = 0.0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
#ifdef KERNELS_AVX2
        const __m256 v = SUFFIX(v_expf)(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(max)));
        _mm256_storeu_ps(s + i, v);
        sum += (double)SUFFIX(hsum8)(v);
#else
        for (int l = 0; l < 8; l++) s[i + l] = SUFFIX(v_expf_lane)(s[i + l] - max);
        sum += (double)SUFFIX(hsum8_lanes)(s + i);
#endif
    }
    for (; i < n; i++) {
        s[i] = expf(s[i] - max);
        sum += (double)s[i];
    }
    return sum;
}

/* y[0:n] += a * v[0:n] with v in fp16 (the attention's weighted sum of V rows). */
static void SUFFIX(axpy_f16)(int64_t n, float a, const uint16_t *v, float *y) {
    int64_t i = 0;
#ifdef KERNELS_AVX2
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) {
        const __m256 vv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + i)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, vv, _mm256_loadu_ps(y + i)));
    }
#else
    for (; i < (n & ~(int64_t)7); i++) y[i] = fmaf(a, fp16_to_fp32(v[i]), y[i]); /* the AVX2 sets' fused steps */
#endif
    for (; i < n; i++) y[i] += a * fp16_to_fp32(v[i]);
}

static const kernel_set SUFFIX(kernel_set) = {
    .name = SUFFIX_NAME,
    .f16_to_f32 = SUFFIX(f16_to_f32_row),
    .quantize_q8_0 = SUFFIX(quantize_q8_0),
    .quantize_f16 = SUFFIX(f32_to_f16_row),
    .dot_q8_0 = SUFFIX(dot_q8_0),
    .dot_q4_0 = SUFFIX(dot_q4_0),
    .dot_q4_0_blocks = SUFFIX(dot_q4_0_blocks),
    .dot_q6_K = SUFFIX(dot_q6_K),
    .gemm_q8_0 = SUFFIX(gemm_q8_0),
    .gemm_q4_0 = SUFFIX(gemm_q4_0),
    .gemm_q4_0_blocks = SUFFIX(gemm_q4_0_blocks),
    .gemm_q4_0_r16 = SUFFIX(gemm_q4_0_r16),
#ifdef KERNELS_AVX2
    .repacks_q4_0 = 1,
#endif
    .gemm_q8_0_r8 = SUFFIX(gemm_q8_0_r8),
#ifdef KERNELS_AVX512
    .repacks_q8_0 = 1,
#endif
    .gemm_q6_K = SUFFIX(gemm_q6_K),
#ifdef KERNELS_VNNI
    .one_pass_rows = 4,
#elif defined(KERNELS_AVX2)
    .one_pass_rows = 2, /* gemm_q's 4 x 2 tile */
#else
    .one_pass_rows = 1, /* gemm_by_dots */
#endif
#ifdef KERNELS_VNNI
    .act_corr = 1u << KT_Q8_0 | 1u << KT_Q4_0,
#elif defined(KERNELS_AVX2)
    .act_corr = 1u << KT_Q4_0,
#endif
    .dot_f16_vec = SUFFIX(dot_f16_vec),
    .dot_f16_blas = SUFFIX(dot_f16_blas),
    .dot_f32_vec = SUFFIX(dot_f32_vec),
    .dot_f32_blas = SUFFIX(dot_f32_blas),
    .softmax_exp = SUFFIX(softmax_exp),
    .axpy_f16 = SUFFIX(axpy_f16),
};
