"""The layers' C loop (`_kernels.LayerStack`, forward.c) gives the bits of the same kernels called
one op at a time from Python, for both architectures, several sequences at once, prompts longer
than one feed-forward pass, and any thread count; and it refuses inconsistent arguments clearly."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from runtime import Model, ops
from runtime.kernels import _kernels
from runtime.kv_cache import KVCache
from runtime.model import Transformer
from runtime.testing.make_model import make_model

FFN_ROWS = 128  # forward.c's rows per feed-forward pass: a 300-token prompt takes three


def _reference_layers(tr: Transformer, x: np.ndarray, segments: Sequence[tuple[KVCache, int]], cos, sin) -> None:  # type: ignore[no-untyped-def]
    """The layer loop as runtime/model.py ran it in Python before forward.c, op for op."""
    cfg, nt, T, hd = tr.cfg, tr.n_threads, x.shape[0], tr.cfg.head_dim
    starts = np.concatenate([[0], np.cumsum([n for _, n in segments])])
    attn = np.empty((T, cfg.n_head, hd), dtype=np.float32)
    for il, blk in enumerate(tr.blocks):
        h = ops.layer_norm(x, blk.attn_norm.weight, blk.attn_norm.bias, cfg.norm_eps, nt)
        if blk.wqkv is not None:
            qkv = blk.wqkv(h, nt)
            q = qkv[:, : cfg.n_embd].reshape(T, cfg.n_head, hd)
            k = qkv[:, cfg.n_embd : cfg.n_embd + hd].reshape(T, 1, hd)
            v = qkv[:, cfg.n_embd + hd :].reshape(T, 1, hd)
        else:
            assert blk.wq is not None and blk.wk is not None and blk.wv is not None
            q = ops.rope_neox(blk.wq(h, nt).reshape(T, cfg.n_head, hd), cos, sin)
            k = ops.rope_neox(blk.wk(h, nt).reshape(T, cfg.n_head_kv, hd), cos, sin)
            v = blk.wv(h, nt).reshape(T, cfg.n_head_kv, hd)
        q = np.ascontiguousarray(q)
        for (cache, n), a, b in zip(segments, starts[:-1], starts[1:], strict=True):
            for src, dst in ((k, cache.k), (v, cache.v)):
                rows = dst[il, cache.n_past : cache.n_past + n].reshape(-1)
                _kernels.f32_to_f16(np.ascontiguousarray(src[a:b]).reshape(-1), rows)
            _kernels.attention(q[a:b], cache.k[il], cache.v[il], attn[a:b], cache.n_past, float(tr.kq_scale), nt)
        x[:] = blk.wo(attn.reshape(T, cfg.n_embd), nt, add=x)
        h = ops.layer_norm(x, blk.ffn_norm.weight, blk.ffn_norm.bias, cfg.norm_eps, nt)
        for a in range(0, T, FFN_ROWS):
            rows = slice(a, a + FFN_ROWS)
            x[rows] = blk.ffn_down(blk.ffn_up(h[rows], nt, gelu=True), nt, add=x[rows])


@pytest.mark.parametrize(
    "arch, wtype, dims",
    [
        ("starcoder2", "q8_0", dict(n_embd=192, n_head=6, n_head_kv=2, n_ff=384)),
        ("starcoder2", "q4_0", {}),
        ("starcoder", "q4_0", dict(n_embd=160, n_head=5, n_ff=320)),
        ("starcoder", "f16", {}),
    ],
)
@pytest.mark.parametrize("n_threads", [1, 2])
def test_c_layers_give_the_bits_of_the_ops_one_by_one(
    tmp_path: Path, arch: str, wtype: str, dims: dict[str, int], n_threads: int
) -> None:
    path = make_model(tmp_path / "m.gguf", arch=arch, wtype=wtype, seed=5, **dims)
    with Model.load(path, n_threads=n_threads, n_ctx=512) as m:
        tr, cfg = m.transformer, m.config
        rng = np.random.default_rng(2)
        # a first prompt of 300 rows, then three sequences of 1, 7 and 2 rows together
        for lengths, n_past in (([300], [0]), ([1, 7, 2], [300, 40, 0])):
            T = sum(lengths)
            x = rng.standard_normal((T, cfg.n_embd)).astype(np.float32)
            positions = np.concatenate([np.arange(p, p + n) for p, n in zip(n_past, lengths, strict=True)])
            cos_all, sin_all = tr.rope(512)
            cos, sin = (cos_all[positions], sin_all[positions]) if arch == "starcoder2" else (None, None)
            filled = [rng.integers(0, 0x3C00, (cfg.n_layer, p, cfg.n_head_kv, cfg.head_dim)) for p in n_past]
            outs, caches = [], []
            for run in ("c", "python"):
                segs = []
                for p, n, kv in zip(n_past, lengths, filled, strict=True):
                    c = KVCache(cfg, 512)
                    c.k[:, :p], c.v[:, :p], c.n_past = kv, kv[::-1], p  # keys and values below 1.0
                    segs.append((c, n))
                y = x.copy()
                if run == "c":
                    tr.layers.forward(y, [(c.k, c.v, c.n_past, n) for c, n in segs], cos, sin, n_threads)
                else:
                    _reference_layers(tr, y, segs, cos, sin)
                outs.append(y)
                caches.append(segs)
            assert np.array_equal(outs[0].view(np.uint32), outs[1].view(np.uint32)), (lengths, n_threads)
            for (c0, _), (c1, _) in zip(*caches, strict=True):
                assert np.array_equal(c0.k, c1.k) and np.array_equal(c0.v, c1.v), "KV caches differ"


def test_op_seconds_add_up_per_op(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m.gguf", wtype="q8_0", seed=1)
    with Model.load(path, n_ctx=64) as m:
        m.transformer.op_seconds = np.zeros(len(_kernels.LAYER_OPS))
        m.transformer.forward(np.arange(20), m.cache)
        spent = dict(zip(_kernels.LAYER_OPS, m.transformer.op_seconds, strict=True))
    assert set(spent) == {"layer_norm", "matmul", "rope_neox", "kv_store", "attention"}
    assert all(s > 0 for s in spent.values()), spent


def test_layer_stack_refuses_inconsistent_arguments(tmp_path: Path) -> None:
    path = make_model(tmp_path / "m.gguf", wtype="q8_0", seed=1)
    with Model.load(path, n_ctx=64) as m:
        tr, cfg = m.transformer, m.config
        from runtime.model import _layer_spec

        spec = [_layer_spec(b) for b in tr.blocks]
        dims = (cfg.n_embd, cfg.n_ff, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.norm_eps, 0.125)
        bad = dict(spec[1], up=spec[1]["down"])
        with pytest.raises(ValueError, match="layer 1: up of"):
            _kernels.LayerStack(*dims, [spec[0], bad])
        with pytest.raises(ValueError, match="layer 0: wq is missing"):
            _kernels.LayerStack(*dims, [dict(spec[0], wq=None)])
        with pytest.raises(ValueError, match="inconsistent dimensions"):
            _kernels.LayerStack(cfg.n_embd, cfg.n_ff, cfg.n_head, 3, cfg.head_dim, cfg.norm_eps, 0.125, spec)
        x = np.zeros((4, cfg.n_embd), dtype=np.float32)
        cos, sin = (a[:4] for a in tr.rope(64))
        cache = KVCache(cfg, 64)
        with pytest.raises(ValueError, match="segments hold 3 tokens for 4 rows"):
            tr.layers.forward(x, [(cache.k, cache.v, 0, 3)], cos, sin)
        with pytest.raises(ValueError, match="segment 0: cache shape or positions"):
            tr.layers.forward(x, [(cache.k, cache.v, 62, 4)], cos, sin)
        with pytest.raises(ValueError, match="need cos and sin"):
            tr.layers.forward(x, [(cache.k, cache.v, 0, 4)])
        assert not cache.k.any(), "a refused call wrote the cache"
