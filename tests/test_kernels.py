"""The C kernels against the NumPy reference formats (runtime/quants.py) and gguf-py, on every
kernel set this CPU has: AVX-512 with VNNI, AVX2 with AVX-VNNI, AVX2, and the portable fallback
other CPUs get."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

from runtime import Model, quants
from runtime.cpuinfo import cpuinfo_fields
from runtime.ggml_types import BLOCK_SIZE, GGMLType
from runtime.gguf import read_gguf
from runtime.kernels import _kernels
from runtime.testing.make_model import make_model
from tests.kernel_sets import SETS, using


def _activations(rng: np.random.Generator, rows: int, k: int) -> np.ndarray:
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :7] = 0.0  # zeros and exact ties exercise the rounding rules
    x[-1, 3] = -x[-1].__abs__().max()
    return x


def test_activation_quantizers_are_bit_exact(kernel_set: str) -> None:
    rng = np.random.default_rng(1)
    x = _activations(rng, 4, 512).reshape(-1)
    assert np.array_equal(_kernels.quantize_q8_0(x), quants.Q8_0.quantize(x))
    assert np.array_equal(_kernels.quantize_q8_K(x), quants.Q8_K.quantize(x))
    # ggml's own reference quantizer agrees for Q8_0
    ref = gguf.quants.quantize(x.reshape(1, -1), gguf.GGMLQuantizationType.Q8_0).reshape(-1)
    assert np.array_equal(_kernels.quantize_q8_0(x), ref)
    assert np.array_equal(_kernels.f32_to_f16(x), x.astype(np.float16).view(np.uint16))
    into = np.zeros(x.shape, dtype=np.uint16)
    assert _kernels.f32_to_f16(x, into) is into
    assert np.array_equal(into, x.astype(np.float16).view(np.uint16))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, GGMLType]]:
    """Real quantized tensors written by the test-model generator."""
    out: dict[str, tuple[np.ndarray, GGMLType]] = {}
    d = tmp_path_factory.mktemp("w")
    for wtype, head in [("f32", None), ("f16", None), ("q8_0", None), ("q4_0", "q6_k")]:
        path = make_model(d / f"{wtype}.gguf", preset="tiny", wtype=wtype, head_type=head, n_embd=256, n_ff=512)
        f = read_gguf(path)
        for name in ("blk.0.ffn_up.weight", "token_embd.weight"):
            info = f.tensors[name]
            out[f"{wtype}:{name}"] = (
                np.array(f.tensor(name).view(np.uint8).reshape(info.shape[0], -1)),
                info.ggml_type,
            )
        f.close()
    return out


def _n_cols(raw: np.ndarray, t: GGMLType) -> int:
    elems, size = BLOCK_SIZE[t]
    return raw.shape[1] // size * elems


def _reference_matmul(raw: np.ndarray, t: GGMLType, x: np.ndarray) -> np.ndarray:
    """Dequantized weights times the activations as the kernel quantizes them, in float64."""
    k = x.shape[1]
    w = quants.dequantize(raw, t, k).astype(np.float64)
    if t in (GGMLType.Q8_0, GGMLType.Q4_0):
        xq = np.stack([quants.dequantize(quants.Q8_0.quantize(r), GGMLType.Q8_0, k)[0] for r in x])
    elif t == GGMLType.Q6_K:
        xq = np.stack([quants.dequantize(quants.Q8_K.quantize(r), GGMLType.Q8_K, k)[0] for r in x])
    elif t == GGMLType.F16:
        xq = x.astype(np.float16).astype(np.float32)
    else:
        xq = x
    return xq.astype(np.float64) @ w.T


@pytest.mark.parametrize("rows", [1, 5])
def test_matmul_matches_reference(kernel_set: str, weights: dict[str, tuple[np.ndarray, GGMLType]], rows: int) -> None:
    rng = np.random.default_rng(rows)
    for key, (raw, t) in weights.items():
        k = _n_cols(raw, t)
        x = _activations(rng, rows, k)
        out = np.empty((rows, raw.shape[0]), dtype=np.float32)
        _kernels.matmul(int(t), raw, k, x, out, 2)
        ref = _reference_matmul(raw, t, x)
        err = np.abs(out - ref).max() / np.abs(ref).max()
        assert err < 2e-6, f"{key} ({kernel_set}, {rows} rows): relative error {err:.2e}"


@pytest.mark.parametrize("rows", [1, 5])
def test_matmul_epilogue_gives_the_bits_of_the_separate_steps(
    kernel_set: str, weights: dict[str, tuple[np.ndarray, GGMLType]], rows: int
) -> None:
    """Bias, GELU and the residual applied by the matmul's threads round exactly as the NumPy
    addition and the gelu kernel do when run after it, on every thread count."""
    rng = np.random.default_rng(7)
    for key, (raw, t) in weights.items():
        k, n = _n_cols(raw, t), raw.shape[0]
        x = _activations(rng, rows, k)
        bias = rng.standard_normal(n).astype(np.float32)
        add = rng.standard_normal((rows, n)).astype(np.float32)
        plain = np.empty((rows, n), dtype=np.float32)
        _kernels.matmul(int(t), raw, k, x, plain, 1)
        biased = plain + bias
        activated = np.empty_like(biased)
        _kernels.gelu(biased.reshape(-1), activated.reshape(-1))
        expected = {
            (True, False, False): biased,
            (False, False, True): plain + add,
            (True, True, False): activated,
            (True, False, True): biased + add,
            (True, True, True): activated + add,
        }
        for (with_bias, gelu, with_add), ref in expected.items():
            for threads in (1, 2):
                out = np.empty((rows, n), dtype=np.float32)
                _kernels.matmul(
                    int(t), raw, k, x, out, threads, bias if with_bias else None, gelu, add if with_add else None
                )
                assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), (key, with_bias, gelu, with_add)


def _outputs_on_sets(
    weights: dict[str, tuple[np.ndarray, GGMLType]], sets: tuple[str, str], rows: int, threads: int
) -> list[tuple[str, GGMLType, np.ndarray, np.ndarray]]:
    """(tensor, type, matmul output on sets[0], on sets[1]) for every test tensor; skips the test
    when the CPU lacks one of the sets."""
    rng = np.random.default_rng(3)
    results = []
    for key, (raw, t) in weights.items():
        k = _n_cols(raw, t)
        x = _activations(rng, rows, k)
        outs = []
        for name in sets:
            with using(name):
                out = np.empty((rows, raw.shape[0]), dtype=np.float32)
                _kernels.matmul(int(t), raw, k, x, out, threads)
            outs.append(out)
        results.append((key, t, outs[0], outs[1]))
    return results


@pytest.mark.parametrize("name", SETS[1:])
def test_every_set_gives_the_portable_sets_bits(weights: dict[str, tuple[np.ndarray, GGMLType]], name: str) -> None:
    """Every set sums each product in ggml's AVX2 order, the portable fallback too (eight float
    lanes with fmaf, the same horizontal sums), and VNNI computes the integers AVX2's maddubs
    does, so every result is identical: one row (vec_dot's order), and 3 and 6 rows (the tiles,
    and tinyBLAS's order for F16/F32)."""
    for rows in (1, 3, 6):
        for key, _, ref, out in _outputs_on_sets(weights, ("generic", name), rows, 2):
            assert np.array_equal(ref.view(np.uint32), out.view(np.uint32)), (key, name, rows)


def _random_q_rows(rng: np.random.Generator, t: GGMLType, n: int, k: int) -> np.ndarray:
    """Raw Q8_0/Q4_0/Q6_K rows: every quant byte value (-128 too) and random fp16 scales (the
    first two bytes of a Q8_0/Q4_0 block, the last two of a Q6_K block)."""
    elems, size = BLOCK_SIZE[t]
    nb = k // elems
    raw = rng.integers(0, 256, (n, nb, size), dtype=np.uint8)
    scales = (rng.standard_normal((n, nb)) * 0.01).astype("<f2").view(np.uint8).reshape(n, nb, 2)
    if t == GGMLType.Q6_K:
        raw[:, :, -2:] = scales
    else:
        raw[:, :, :2] = scales
    return raw.reshape(n, -1)


# (weight rows, row length, activation rows): odd sizes, remainders of every tile shape, and
# enough rows for several chunks of work per thread
GEMM_SHAPES = [
    (1, 32, 1),
    (5, 96, 3),
    (13, 256, 4),
    (37, 160, 9),
    (6, 64, 2),
    (3, 64, 17),
    (7, 64, 5),
    (9, 64, 7),
    (10, 96, 11),
    (203, 1024, 6),
    (531, 64, 2),
    # rows as long as a feed-forward down projection's, and many tiles in one unit of work
    (61, 4160, 8),
    (450, 2240, 9),
    # Q4_0 matrices of a multiple of 8 rows take the block order (BLOCK_ORDER): tiles of 8 rows
    # and of 4, one to four activation rows at a time
    (8, 32, 2),
    (8, 64, 1),
    (16, 96, 3),
    (24, 256, 4),
    (40, 160, 9),
    (104, 1024, 6),
    (64, 4160, 8),
    (456, 2240, 5),
]


@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q6_K], ids=["q8_0", "q4_0", "q6_k"])
def test_gemm_equals_single_row_dots(kernel_set: str, t: GGMLType) -> None:
    """The tiled matmul computes every output exactly as the single-row dot product does (the
    one the parity tests hold to llama.cpp), for any shape and any number of threads."""
    rng = np.random.default_rng(11)
    for n, k, m in GEMM_SHAPES:
        k *= BLOCK_SIZE[t][0] // 32  # Q6_K rows: the same number of blocks of 256
        raw = _random_q_rows(rng, t, n, k)
        x = _activations(rng, m, k)
        ref = np.array([[_kernels.vec_dot(int(t), raw[j], x[i], n) for j in range(n)] for i in range(m)], np.float32)
        for threads in (1, 2, 3):
            out = np.empty((m, n), dtype=np.float32)
            _kernels.matmul(int(t), raw, k, x, out, threads)
            assert np.array_equal(out.view(np.uint32), ref.view(np.uint32)), (kernel_set, n, k, m, threads)
        row = np.empty((1, n), dtype=np.float32)
        for i in range(m):  # one activation row at a time (decode) gives the same bits as a batch
            _kernels.matmul(int(t), raw, k, x[i : i + 1], row, 2)
            assert np.array_equal(row[0].view(np.uint32), ref[i].view(np.uint32)), (kernel_set, n, k, i)


def _cpu_vendor_family_model() -> tuple[str, int, int]:
    fields = cpuinfo_fields()
    return fields["vendor_id"], int(fields["cpu family"]), int(fields["model"])


@pytest.mark.parametrize("n", [260, 256], ids=["vec_dot-order", "block-order"])
@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q4_0, GGMLType.Q6_K], ids=["q8_0", "q4_0", "q6_k"])
def test_prefetch_level_changes_no_bits(kernel_set: str, t: GGMLType, n: int) -> None:
    """Prefetching weights into L1 or L2 (WEIGHT_PREFETCH, picked from the CPU; one activation
    row not at all at L2, HARDWARE_DECODE) gives decode, batched decode and prompt tiles the
    single-row dot products' bits either way, in both of Q4_0's orders (BLOCK_ORDER: 256 rows take
    the block order, 260 vec_dot's)."""
    rng = np.random.default_rng(5)
    k = 544 * (BLOCK_SIZE[t][0] // 32)
    raw = _random_q_rows(rng, t, n, k)
    x = _activations(rng, 9, k)
    ref = np.array([[_kernels.vec_dot(int(t), raw[j], x[i], n) for j in range(n)] for i in range(9)], np.float32)
    try:
        for level in ("l1", "l2"):
            assert _kernels.prefetch(level) == level
            for m in (1, 2, 3, 4, 9):
                out = np.empty((m, n), dtype=np.float32)
                _kernels.matmul(int(t), raw, k, x[:m], out, 2)
                assert np.array_equal(out.view(np.uint32), ref[:m].view(np.uint32)), (kernel_set, level, m)
    finally:
        _kernels.prefetch("auto")


def test_prefetch_level_is_picked_from_the_cpu() -> None:
    """AMD Zen 4 (family 25, models 0x10-0x1F, 0x60-0x7F, 0xA0-0xAF) prefetches weights into L2;
    every other CPU (Zen 3, the rest of family 25, among them) into L1."""
    vendor, family, model = _cpu_vendor_family_model()
    zen4 = vendor == "AuthenticAMD" and family == 25 and (model >> 4) in (0x1, 0x6, 0x7, 0xA)
    assert _kernels.prefetch("auto") == ("l2" if zen4 else "l1")
    with pytest.raises(ValueError, match="prefetch level 'l3': expected auto, l1 or l2"):
        _kernels.prefetch("l3")
    assert _kernels.prefetch() == ("l2" if zen4 else "l1")


@pytest.mark.parametrize("prefetch", [True, False])
@pytest.mark.parametrize("streams", [1, 2, 4, 8])
def test_read_sum(streams: int, prefetch: bool) -> None:
    buf = np.arange(1 << 16, dtype=np.uint64)
    assert _kernels.read_sum(buf.view(np.uint8), 2, streams, prefetch) == int(buf.sum())


def test_read_sum_refuses_a_stream_count_out_of_range() -> None:
    with pytest.raises(ValueError, match="streams must be 1 to 64"):
        _kernels.read_sum(np.zeros(64, dtype=np.uint8), 1, 0)


def test_get_rows_matches_gguf_py(kernel_set: str, weights: dict[str, tuple[np.ndarray, GGMLType]]) -> None:
    for key, (raw, t) in weights.items():
        if t == GGMLType.F32:
            continue
        ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType(int(t)))
        ref = ref.reshape(raw.shape[0], -1).astype(np.float32)
        rows = np.array([0, 3, raw.shape[0] - 1], dtype=np.int64)
        out = np.empty((3, ref.shape[1]), dtype=np.float32)
        _kernels.get_rows(int(t), raw, ref.shape[1], rows, out)
        assert np.array_equal(out, ref[rows]), key
        assert np.array_equal(quants.dequantize(raw, t, ref.shape[1]), ref), key


def test_gelu_uses_the_fp16_table() -> None:
    x = np.linspace(-12, 12, 20001, dtype=np.float32)
    out = np.empty_like(x)
    _kernels.gelu(x, out)
    mid = (x > -10) & (x < 10)
    # inside (-10, 10) the result comes from the fp16 table: fp16 values of gelu(fp16(x))
    assert np.array_equal(out[mid].astype(np.float16).astype(np.float32), out[mid])
    h = x.astype(np.float16).astype(np.float64)
    exact = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * h * (1 + 0.044715 * h * h)))
    assert np.all(np.abs(out[mid] - exact[mid]) <= np.abs(exact[mid]) * 2**-9 + 2**-23)
    assert np.array_equal(out[x >= 10], x[x >= 10]) and not out[x <= -10].any()


def test_gelu_gives_the_same_bits_on_every_set_and_thread_count() -> None:
    """The AVX2 path (F16C rounding, gathered table entries, threads over long inputs) against the
    portable scalar loop: every fp16 value, the bounds +-10 and their neighbours, odd lengths."""
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    bounds = np.array([-10, 10, np.nextafter(-10, 0), np.nextafter(10, 0), -np.inf, np.inf], dtype=np.float32)
    rng = np.random.default_rng(3)
    x = np.concatenate([every_half, bounds, (rng.standard_normal(70001) * 4).astype(np.float32)])
    x = x[~np.isnan(x)]
    _kernels.use("generic")
    ref = np.empty_like(x)
    _kernels.gelu(x, ref)
    for name in SETS[1:]:
        try:
            _kernels.use(name)
        except ValueError:
            continue
        for threads, n in ((1, len(x)), (2, len(x)), (2, 13)):
            out = np.empty(n, dtype=np.float32)
            _kernels.gelu(x[:n], out, threads)
            assert np.array_equal(out.view(np.uint32), ref[:n].view(np.uint32)), (name, threads, n)
    _kernels.use("auto")


def test_rope_neox_is_ggml_fma_rotation(kernel_set: str) -> None:
    """x0*cos - x1*sin and x0*sin + x1*cos as fma(x0, cos, -(x1*sin)) and fma(x0, sin, x1*cos):
    against a float64 evaluation of the same expression (one rounding short of a true fma, so
    equal but for rare ties), and bit for bit against the portable set."""
    rng = np.random.default_rng(4)
    T, heads, hd = 5, 3, 128
    x = rng.standard_normal((T, heads, hd)).astype(np.float32)
    angles = rng.uniform(0, 100, (T, hd // 2)).astype(np.float32)
    cos, sin = np.cos(angles), np.sin(angles)
    out = x.copy()
    _kernels.rope_neox(out, cos, sin)
    x0, x1, c, s = x[..., :64].astype(np.float64), x[..., 64:], cos[:, None], sin[:, None]
    ref = np.concatenate(
        [(x0 * c - (x1 * s).astype(np.float32)), (x0 * s + (x1 * c).astype(np.float32))], axis=-1
    ).astype(np.float32)
    assert np.mean(out == ref) > 0.999
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    _kernels.use("generic")
    generic = x.copy()
    _kernels.rope_neox(generic, cos, sin)
    assert np.array_equal(out.view(np.uint32), generic.view(np.uint32))
    with pytest.raises(ValueError, match="rope_neox: shapes"):
        _kernels.rope_neox(x, cos[:2], sin)


def test_attention_matches_numpy(kernel_set: str) -> None:
    rng = np.random.default_rng(5)
    T, n_head, n_kv, hd, n_ctx, pos0 = 3, 4, 2, 16, 32, 5
    q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16)
    v = rng.standard_normal((n_ctx, n_kv, hd)).astype(np.float16)
    out = np.empty_like(q)
    scale = np.float32(hd**-0.5)
    _kernels.attention(q, k.view(np.uint16), v.view(np.uint16), out, pos0, scale, 2)
    q16 = q.astype(np.float16).astype(np.float64)
    for t in range(T):
        n = pos0 + t + 1
        for h in range(n_head):
            kv = h // (n_head // n_kv)
            s = (k[:n, kv].astype(np.float64) @ q16[t, h]) * scale
            p = np.exp(s - s.max())
            p /= p.sum()
            ref = p @ v[:n, kv].astype(np.float64)
            np.testing.assert_allclose(out[t, h], ref, rtol=2e-3, atol=2e-3)


def test_prompt_attention_gives_the_same_bits_in_any_tiling(kernel_set: str) -> None:
    """Prompt rows are computed in tiles of query rows sharing each K/V row; a row's result must not
    depend on which rows share its tile: 11 rows at once against the same rows 2 or 3 at a time."""
    rng = np.random.default_rng(6)
    n_head, n_kv, hd, pos0, T = 6, 2, 64, 9, 11
    q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
    k = rng.standard_normal((pos0 + T, n_kv, hd)).astype(np.float16).view(np.uint16)
    v = rng.standard_normal((pos0 + T, n_kv, hd)).astype(np.float16).view(np.uint16)
    scale = float(np.float32(hd**-0.5))
    whole = np.empty_like(q)
    _kernels.attention(q, k, v, whole, pos0, scale, 2)
    for step in (2, 3):
        parts = np.empty_like(q)
        for a in range(0, T - 1, step):
            b = min(a + step, T) if T - (a + step) != 1 else T  # keep every call at 2+ rows
            _kernels.attention(q[a:b], k, v, parts[a:b], pos0 + a, scale, 1)
        assert np.array_equal(whole.view(np.uint32), parts.view(np.uint32)), (kernel_set, step)


def _decode_attention_inputs(
    seed: int, pos0: int, k_scale: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """One query row of 24 heads of 128 over 2 KV heads (StarCoder2-3B's shape), caches of pos0 + 1;
    keys k_scale times a standard normal."""
    rng = np.random.default_rng(seed)
    n_head, n_kv, hd = 24, 2, 128
    q = rng.standard_normal((1, n_head, hd)).astype(np.float32)
    k = (rng.standard_normal((pos0 + 1, n_kv, hd)) * k_scale).astype(np.float16).view(np.uint16)
    v = rng.standard_normal((pos0 + 1, n_kv, hd)).astype(np.float16).view(np.uint16)
    return q, k, v, float(np.float32(hd**-0.5))


def test_decode_attention_gives_the_same_bits_in_any_head_grouping(kernel_set: str) -> None:
    """One query row: the heads of a KV head are computed a few at a time sharing each K/V row
    (up to 3 with AVX2, 6 with AVX-512); a head's result must not depend on that: all 24 heads at
    once against 1 to 5 heads of each KV head."""
    pos0 = 70
    q, k, v, scale = _decode_attention_inputs(8, pos0)
    whole = np.empty_like(q)
    _kernels.attention(q, k, v, whole, pos0, scale, 2)
    for n in range(1, 6):
        heads = [*range(n), *range(12, 12 + n)]
        part = np.empty((1, len(heads), q.shape[2]), dtype=np.float32)
        _kernels.attention(np.ascontiguousarray(q[:, heads]), k, v, part, pos0, scale, 1)
        assert np.array_equal(whole[:, heads].view(np.uint32), part.view(np.uint32)), (kernel_set, heads)


def _attention_bits(name: str, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos0: int, scale: float) -> bytes:
    """The attention output's bytes on kernel set `name` (2 threads)."""
    out = np.empty_like(q)
    with using(name):
        _kernels.attention(q, k, v, out, pos0, scale, 2)
    return out.tobytes()


@pytest.mark.parametrize("pos0", [4, 15, 31, 70, 300])
@pytest.mark.parametrize("name", [s for s in SETS if s != "avx2"])
def test_decode_attention_gives_the_avx2_bits_on_every_set(name: str, pos0: int) -> None:
    """The avx512vnni set weighs V rows a lane class at a time with zmm registers and finishes
    its scores 16 keys at a time, the AVX2 path sixteen bytes of 32 rows at a time with ymm, the
    portable set one value at a time with fmaf: the sums, and so the bits, must be the avx2 set's
    (positions 4 and 70 leave some of the 32 classes with no key or one, 300 gives each ten; 16
    and 32 keys fill whole blocks of 16, 5, 71 and 301 end in a part of one). Keys three times
    as large spread the scores, so that a score an ulp off (its sums in another order) shows in
    the probabilities, which are rounded to fp16."""
    q, k, v, scale = _decode_attention_inputs(10, pos0, k_scale=3.0)
    assert _attention_bits(name, q, k, v, pos0, scale) == _attention_bits("avx2", q, k, v, pos0, scale)


@pytest.mark.parametrize("pos0", [0, 70, 300])
def test_prompt_attention_gives_the_avx2_bits_on_the_portable_set(pos0: int) -> None:
    """Prompt rows (tinyBLAS's order): the AVX2 tiles of query rows against the portable loop,
    whose softmax runs ggml's vectorized expf lane by lane and whose weighted sums fuse like FMA."""
    rng = np.random.default_rng(11)
    n_head, n_kv, hd, T = 6, 2, 64, 9
    q = rng.standard_normal((T, n_head, hd)).astype(np.float32)
    k = (rng.standard_normal((pos0 + T, n_kv, hd)) * 3).astype(np.float16).view(np.uint16)
    v = rng.standard_normal((pos0 + T, n_kv, hd)).astype(np.float16).view(np.uint16)
    scale = float(np.float32(hd**-0.5))
    assert _attention_bits("generic", q, k, v, pos0, scale) == _attention_bits("avx2", q, k, v, pos0, scale)


@pytest.mark.parametrize("arch", ["starcoder2", "starcoder"])
@pytest.mark.parametrize("wtype,head", [("q8_0", None), ("q4_0", "q6_k"), ("f16", None)])
@pytest.mark.parametrize("name", SETS[1:])
def test_every_set_gives_the_same_logits(name: str, arch: str, wtype: str, head: str | None, tmp_path: Path) -> None:
    """A whole model, prompt then decode, gives the portable set's logits bit for bit on every
    set: the same model answers the same on every CPU."""
    dims = dict(n_embd=256, n_ff=512, n_head=8) if head else {}
    path = make_model(tmp_path / "m.gguf", arch=arch, preset="tiny", wtype=wtype, head_type=head, seed=5, **dims)
    ids = [int(i) for i in np.random.default_rng(2).integers(5, 990, 200)]

    def logits() -> np.ndarray:
        with Model.load(path, n_ctx=256) as model:
            prompt = model.eval(ids[:190])
            steps = [model.transformer.forward(np.array([t]), model.cache)[0] for t in ids[190:]]
        return np.concatenate([prompt, np.stack(steps)])

    with using(name):
        ours = logits()
    with using("generic"):
        ref = logits()
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), name


def test_layer_norm_matches_numpy() -> None:
    rng = np.random.default_rng(9)
    x = (rng.standard_normal((4, 100)) * 3 + 1).astype(np.float32)
    w, b = rng.standard_normal(100).astype(np.float32), rng.standard_normal(100).astype(np.float32)
    out = np.empty_like(x)
    _kernels.layer_norm(x, w, b, out, 1e-5)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5) * w + b
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [100, 3072])
def test_layer_norm_of_many_rows_is_each_rows_own(n: int) -> None:
    """Rows normalized together (their mean sums interleaved 4 at a time, groups over threads)
    give the bits of each row normalized alone."""
    rng = np.random.default_rng(n)
    x = (rng.standard_normal((11, n)) * rng.uniform(0.01, 100, (11, 1)) + 1).astype(np.float32)
    w, b = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    alone = np.empty_like(x)
    for r in range(len(x)):
        _kernels.layer_norm(x[r : r + 1], w, b, alone[r : r + 1], 1e-5)
    for rows in range(1, len(x) + 1):
        for threads in (1, 2):
            out = np.empty_like(x[:rows])
            _kernels.layer_norm(x[:rows], w, b, out, 1e-5, threads)
            assert np.array_equal(out.view(np.uint32), alone[:rows].view(np.uint32)), (rows, threads)


def test_kernel_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kernel set"):
        _kernels.use("sse9")
    out = np.empty((1, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="unsupported weight type"):
        _kernels.matmul(99, np.zeros((2, 34), np.uint8), 32, np.zeros((1, 32), np.float32), out, 1)
    with pytest.raises(ValueError, match="shapes"):
        _kernels.matmul(8, np.zeros((2, 34), np.uint8), 32, np.zeros((1, 64), np.float32), out, 1)
    w, x = np.zeros((2, 34), np.uint8), np.zeros((1, 32), np.float32)
    with pytest.raises(ValueError, match="bias of 3 for 2 outputs"):
        _kernels.matmul(8, w, 32, x, out, 1, np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="add of 1x3 for out 1x2"):
        _kernels.matmul(8, w, 32, x, out, 1, None, False, np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="add overlaps out"):
        _kernels.matmul(8, w, 32, x, out, 1, None, False, out)
    with pytest.raises(ValueError, match="f32_to_f16: out of 6 for 8 values"):
        _kernels.f32_to_f16(np.zeros(8, np.float32), np.zeros(6, np.uint16))
    with pytest.raises(ValueError, match="vec_dot: n_out must be at least 1, got 0"):
        _kernels.vec_dot(2, np.zeros(18, np.uint8), np.zeros(32, np.float32), 0)
