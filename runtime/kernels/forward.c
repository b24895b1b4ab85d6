/* The transformer layers as one C call (forward.h): the loop runtime/model.py used to run in
 * Python, op for op, so the bits are the same. */
#include "forward.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"

/* Prompt rows per feed-forward pass: the FFN's activation is 4x the model width, the largest
 * buffer of a forward; 128 rows bound it (12 MiB for a 3B model) with no loss of GEMM
 * efficiency. Rows are independent, so any grouping gives the same bits. */
#define FFN_ROWS 128

/* Op timers: a no-op unless the caller asked for times. */
typedef struct {
    double *seconds;
    struct timespec t0;
} op_timer;

static void op_start(op_timer *t) {
    if (t->seconds != NULL) clock_gettime(CLOCK_MONOTONIC, &t->t0);
}

static void op_end(op_timer *t, int op) {
    if (t->seconds == NULL) return;
    struct timespec t1;
    clock_gettime(CLOCK_MONOTONIC, &t1);
    t->seconds[op] += (double)(t1.tv_sec - t->t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t->t0.tv_nsec);
}

/* y[M, n_out] = x[M, K] @ W.T + bias, then GELU and + add as asked. */
static int linear(const kernels_linear *l, const float *x, int64_t M, int64_t K, float *y, int gelu, const float *add,
                  int nt, op_timer *t) {
    const kernels_epilogue ep = {l->bias, gelu, add};
    op_start(t);
    const int rc = kernels_matmul(l->wtype, l->w, l->row_bytes, l->n_out, K, x, M, y, &ep, nt);
    op_end(t, KOP_MATMUL);
    return rc;
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, int64_t T, const kernels_dims *d,
                       int nt, op_timer *t) {
    op_start(t);
    kernels_layer_norm(x, w, b, y, T, d->n_embd, d->norm_eps, nt);
    op_end(t, KOP_LAYER_NORM);
}

/* Scratch of one call: every buffer a layer writes besides x. */
typedef struct {
    float *h, *x2, *q, *k, *v, *qkv, *attn, *ffn;
} scratch;

static void scratch_free(scratch *s) {
    free(s->h), free(s->x2), free(s->q), free(s->k), free(s->v), free(s->qkv), free(s->attn), free(s->ffn);
}

static int scratch_alloc(scratch *s, const kernels_dims *d, int64_t T, int fused_qkv) {
    const int64_t E = d->n_embd, kvd = d->n_head_kv * d->head_dim, ffn_rows = T < FFN_ROWS ? T : FFN_ROWS;
    const size_t f = sizeof(float);
    memset(s, 0, sizeof *s);
    s->h = malloc((size_t)(T * E) * f);
    s->x2 = malloc((size_t)(T * E) * f);
    s->q = malloc((size_t)(T * E) * f);
    s->attn = malloc((size_t)(T * E) * f);
    s->ffn = malloc((size_t)(ffn_rows * d->n_ff) * f);
    if (fused_qkv)
        s->qkv = malloc((size_t)(T * (E + 2 * d->head_dim)) * f);
    else
        s->k = malloc((size_t)(T * kvd) * f), s->v = malloc((size_t)(T * kvd) * f);
    const int ok = s->h && s->x2 && s->q && s->attn && s->ffn && (fused_qkv ? s->qkv != NULL : s->k && s->v);
    if (!ok) scratch_free(s);
    return ok ? 0 : -1;
}

/* q [T, n_embd], k and v [T, kvd] (rows kv_stride apart) of one layer from h. StarCoder: one
 * fused projection, q copied out of it; StarCoder2: three, then RoPE on q and k. */
static int project_qkv(const kernels_layer *L, const kernels_dims *d, const float *h, int64_t T, const float *cos,
                       const float *sin, scratch *s, const float **k, const float **v, int64_t *kv_stride, int nt,
                       op_timer *t) {
    const int64_t E = d->n_embd, hd = d->head_dim;
    if (L->wqkv.w != NULL) {
        const int64_t width = E + 2 * hd;
        if (linear(&L->wqkv, h, T, E, s->qkv, 0, NULL, nt, t) != 0) return -1;
        for (int64_t r = 0; r < T; r++) memcpy(s->q + r * E, s->qkv + r * width, (size_t)E * sizeof(float));
        *k = s->qkv + E, *v = s->qkv + E + hd, *kv_stride = width;
        return 0;
    }
    if (linear(&L->wq, h, T, E, s->q, 0, NULL, nt, t) != 0 || linear(&L->wk, h, T, E, s->k, 0, NULL, nt, t) != 0 ||
        linear(&L->wv, h, T, E, s->v, 0, NULL, nt, t) != 0)
        return -1;
    op_start(t);
    kernels_rope_neox(s->q, cos, sin, T, d->n_head, hd);
    kernels_rope_neox(s->k, cos, sin, T, d->n_head_kv, hd);
    op_end(t, KOP_ROPE);
    *k = s->k, *v = s->v, *kv_stride = d->n_head_kv * hd;
    return 0;
}

/* Each segment stores its rows' keys and values as fp16 at its positions, then attends over
 * its cache; attn gets [T, n_embd]. */
static int attend(int il, const kernels_dims *d, const kernels_segment *segs, int n_segs, const float *q,
                  const float *k, const float *v, int64_t kv_stride, float *attn, int nt, op_timer *t) {
    const int64_t E = d->n_embd, kvd = d->n_head_kv * d->head_dim;
    int64_t row = 0;
    for (int i = 0; i < n_segs; i++) {
        const kernels_segment *sg = &segs[i];
        if (sg->n_tokens == 0) continue;
        uint16_t *kc = sg->k + (size_t)(il * sg->n_ctx * kvd), *vc = sg->v + (size_t)(il * sg->n_ctx * kvd);
        op_start(t);
        for (int64_t r = 0; r < sg->n_tokens; r++) {
            kernels_f32_to_f16(k + (row + r) * kv_stride, kc + (sg->n_past + r) * kvd, kvd);
            kernels_f32_to_f16(v + (row + r) * kv_stride, vc + (sg->n_past + r) * kvd, kvd);
        }
        op_end(t, KOP_KV_STORE);
        op_start(t);
        const int rc = kernels_attention(q + row * E, kc, vc, attn + row * E, sg->n_tokens, sg->n_past, d->n_head,
                                         d->n_head_kv, d->head_dim, d->kq_scale, nt);
        op_end(t, KOP_ATTENTION);
        if (rc != 0) return -1;
        row += sg->n_tokens;
    }
    return 0;
}

int kernels_forward_layers(const kernels_dims *d, const kernels_layer *layers, int n_layer, const kernels_segment *segs,
                           int n_segs, float *x, int64_t T, const float *cos, const float *sin, int n_threads,
                           double *op_seconds) {
    if (T <= 0 || n_layer <= 0) return 0;
    scratch s;
    if (scratch_alloc(&s, d, T, layers[0].wqkv.w != NULL) != 0) return -1;
    const int64_t E = d->n_embd, F = d->n_ff;
    op_timer t = {op_seconds, {0, 0}};
    float *cur = x, *next = s.x2; /* the residual stream; each residual step writes the other */
    int rc = 0;
    for (int il = 0; il < n_layer && rc == 0; il++) {
        const kernels_layer *L = &layers[il];
        const float *k, *v;
        int64_t kv_stride;
        layer_norm(cur, L->attn_norm_w, L->attn_norm_b, s.h, T, d, n_threads, &t);
        rc = project_qkv(L, d, s.h, T, cos, sin, &s, &k, &v, &kv_stride, n_threads, &t);
        if (rc == 0) rc = attend(il, d, segs, n_segs, s.q, k, v, kv_stride, s.attn, n_threads, &t);
        if (rc == 0) rc = linear(&L->wo, s.attn, T, E, next, 0, cur, n_threads, &t);
        if (rc != 0) break;
        float *swap = cur;
        cur = next, next = swap;
        layer_norm(cur, L->ffn_norm_w, L->ffn_norm_b, s.h, T, d, n_threads, &t);
        for (int64_t r0 = 0; r0 < T && rc == 0; r0 += FFN_ROWS) {
            const int64_t n = T - r0 < FFN_ROWS ? T - r0 : FFN_ROWS;
            rc = linear(&L->up, s.h + r0 * E, n, E, s.ffn, 1, NULL, n_threads, &t);
            if (rc == 0) rc = linear(&L->down, s.ffn, n, F, next + r0 * E, 0, cur + r0 * E, n_threads, &t);
        }
        swap = cur;
        cur = next, next = swap;
    }
    if (rc == 0 && cur != x) memcpy(x, cur, (size_t)(T * E) * sizeof(float));
    scratch_free(&s);
    return rc;
}
