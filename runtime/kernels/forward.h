/* The transformer layers of StarCoder and StarCoder2 as one C call.
 *
 * A decode step runs about ten kernels per layer; called one by one from Python, the steps
 * between them (array views, argument checks, allocations) cost ~2 ms a token on a 3B model,
 * 2-5% of the step, and the weight stream evicts their data between calls. kernels_forward_layers
 * runs the same kernels in the same order on the same rows, so it gives the Python loop's bits.
 */
#ifndef LLMCTL_FORWARD_H
#define LLMCTL_FORWARD_H
#include <stddef.h>
#include <stdint.h>

/* A weight matrix: n_out raw rows of type wtype, row_bytes apart, and an optional bias [n_out]. */
typedef struct {
    int wtype;
    const uint8_t *w;
    size_t row_bytes;
    int64_t n_out;
    const float *bias;
} kernels_linear;

/* One layer's weights. StarCoder2 has wq, wk, wv (wqkv.w NULL); StarCoder the fused wqkv
 * [n_embd + 2 * head_dim rows] (wq.w, wk.w, wv.w NULL) and no RoPE. */
typedef struct {
    const float *attn_norm_w, *attn_norm_b;
    kernels_linear wq, wk, wv, wqkv, wo;
    const float *ffn_norm_w, *ffn_norm_b;
    kernels_linear up, down;
} kernels_layer;

typedef struct {
    int64_t n_embd, n_ff, n_head, n_head_kv, head_dim;
    float norm_eps, kq_scale;
} kernels_dims;

/* One sequence of a batch: n_tokens rows of x, appended at positions n_past.. of its cache
 * (fp16 bits [n_layer, n_ctx, n_head_kv, head_dim], positions 0 .. n_past-1 filled). */
typedef struct {
    uint16_t *k, *v;
    int64_t n_ctx, n_past, n_tokens;
} kernels_segment;

/* Where kernels_forward_layers spends its time, when asked (seconds added per op). */
enum { KOP_LAYER_NORM, KOP_MATMUL, KOP_ROPE, KOP_KV_STORE, KOP_ATTENTION, KOP_COUNT };

/* Runs layers 0 .. n_layer-1 over x [T, n_embd] in place, T the segments' tokens in order:
 * for each layer, x += attention(LayerNorm(x)) @ wo.T + bias, then x += FFN(LayerNorm(x)), each
 * segment attending over its own cache, which gets the new keys and values. cos/sin [T, hd/2]
 * are the rows' RoPE angles (NULL for StarCoder). If op_seconds is not NULL, each op's wall
 * time is added to op_seconds[KOP_*]. Returns 0, or -1 if memory ran out or a kernel refused
 * its arguments (x is then undefined, the caches partly written). */
int kernels_forward_layers(const kernels_dims *d, const kernels_layer *layers, int n_layer, const kernels_segment *segs,
                           int n_segs, float *x, int64_t T, const float *cos, const float *sin, int n_threads,
                           double *op_seconds);
#endif
