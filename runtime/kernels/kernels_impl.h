/* Row kernels, compiled twice by kernels.c: once portable (SUFFIX = _generic) and once with
 * KERNELS_AVX2 under `#pragma GCC target("avx2,fma,f16c")` (SUFFIX = _avx2).
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
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int sumi = 0;
        for (int j = 0; j < QK8_0; j++) sumi += x[i].qs[j] * y[i].qs[j];
        sum += (float)sumi * (fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d));
    }
    return sum;
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
    float sum = 0.0f;
    for (int64_t i = 0; i < nb; i++) {
        int sumi = 0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            const int lo = (x[i].qs[j] & 0x0F) - 8;
            const int hi = (x[i].qs[j] >> 4) - 8;
            sumi += lo * y[i].qs[j] + hi * y[i].qs[j + QK4_0 / 2];
        }
        sum += (float)sumi * (fp16_to_fp32(x[i].d) * fp16_to_fp32(y[i].d));
    }
    return sum;
#endif
}

/* Q6_K weights against Q8_K activations. Integer sums are exact; only the final float
 * accumulation order differs from ggml. Plain C: the AVX2 build vectorizes the inner loops. */
static float SUFFIX(dot_q6_K)(int64_t n, const void *vx, const void *vy) {
    const block_q6_K *x = (const block_q6_K *)vx;
    const block_q8_K *y = (const block_q8_K *)vy;
    const int64_t nb = n / QK_K;
    float sum = 0.0f;
    int8_t q[QK_K];
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        int8_t *a = q;
        for (int half = 0; half < QK_K / 128; half++) {
            for (int l = 0; l < 32; l++) {
                a[l + 0] = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                a[l + 32] = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                a[l + 64] = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                a[l + 96] = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            }
            a += 128;
            ql += 64;
            qh += 32;
        }
        int32_t sumi = 0;
        for (int g = 0; g < QK_K / 16; g++) {
            int32_t s = 0;
            for (int l = 0; l < 16; l++) s += (int32_t)q[g * 16 + l] * (int32_t)y[i].qs[g * 16 + l];
            sumi += s * x[i].scales[g];
        }
        sum += fp16_to_fp32(x[i].d) * y[i].d * (float)sumi;
    }
    return sum;
}

/* F16 weights against activations rounded to F16, accumulated in float. */
static float SUFFIX(dot_f16)(int64_t n, const void *vx, const void *vy) {
    const uint16_t *x = (const uint16_t *)vx;
    const uint16_t *y = (const uint16_t *)vy;
    int64_t i = 0;
    float sum = 0.0f;
#ifdef KERNELS_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))),
                               _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(y + i))), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i + 8))),
                               _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(y + i + 8))), acc1);
    }
    sum = SUFFIX(hsum8)(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) sum += fp16_to_fp32(x[i]) * fp16_to_fp32(y[i]);
    return sum;
}

static float SUFFIX(dot_f32)(int64_t n, const void *vx, const void *vy) {
    const float *x = (const float *)vx;
    const float *y = (const float *)vy;
    int64_t i = 0;
    float sum = 0.0f;
#ifdef KERNELS_AVX2
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), _mm256_loadu_ps(y + i + 8), acc1);
    }
    sum = SUFFIX(hsum8)(_mm256_add_ps(acc0, acc1));
#endif
    for (; i < n; i++) sum += x[i] * y[i];
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
    .dot_q6_K = SUFFIX(dot_q6_K),
    .dot_f16 = SUFFIX(dot_f16),
    .dot_f32 = SUFFIX(dot_f32),
    .axpy_f16 = SUFFIX(axpy_f16),
};
