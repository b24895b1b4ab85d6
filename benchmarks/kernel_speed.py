"""Quantized matmul speed of each kernel set, on StarCoder2-3B's weight shapes.

    python -m benchmarks.kernel_speed [--sets avx2,avx512vnni] [--types q8_0,q4_0,q6_k]
        [--rows 1,4,256] [--threads 1] [--repeat 5]

Weights are random bytes in the type's block layout (random fp16 scales), activations random
floats; every call goes through `_kernels.matmul` (activation quantization included). Prints the
best of `--repeat` calls as ms, GMAC/s and the weight bytes read per second (what bounds one
activation row). Q8_0/Q4_0 run on the attention and feed-forward shapes (3072 x 3072,
12288 x 3072, 3072 x 12288), Q6_K on the LM head of the Q4_0 models (49152 x 3072). The machine
is shared: use one thread and several repeats, and compare sets within one run. Never asserted.
Where a set has a tile for repacked Q4_0 or Q8_0 (runtime/repack.py), they are also timed repacked.

    python -m benchmarks.kernel_speed --stream [--types q8_0,q4_0] [--threads 1,2] [--rows 1,4]
        [--prefetch l1,l2]

times decode as memory sees it instead: one activation row (or --rows rows: sequences decoded
together) through every matrix of a generated StarCoder2-3B-shaped model (the runtime_speed
files, several times larger than the caches), in the order of a forward pass, best of `--repeat`
passes (alternating between the variants compared), as milliseconds per token and GB/s beside the
read bandwidth. The single matmuls above come from the caches and so say little about decode.
--sets defaults to every SIMD set this CPU runs; --prefetch l1,l2 compares prefetching the weights
into L1 and into L2 (`auto` is what the runtime picks for this CPU); a model the runtime
repacks is timed in both layouts.

    python -m benchmarks.kernel_speed --attention [--positions 256,1000,2000] [--threads 1,2]
        [--rows 1,1000]

times attention per step over the 30 layers of the 3B shape (24 heads, 2 KV heads, head size
128; random fp16 caches) at each position: warm (one layer's cache, again and again, so it
stays in L2) and cold (the 30 layers' caches in turn, with a 64 MB read between layers, as
decode's weight stream evicts them). A step is one new token (decode, which meets its
attention cold) or --rows new tokens at once (a prompt of that many tokens after the position:
`--positions 0 --rows 1000` times a 1,000-token prompt's attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np

from runtime.ggml_types import BLOCK_SIZE, GGMLType
from runtime.kernels import _kernels
from runtime.repack import LAYOUTS

TYPES = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0, "q6_k": GGMLType.Q6_K}
SHAPES = {
    GGMLType.Q8_0: [(3072, 3072), (12288, 3072), (3072, 12288)],
    GGMLType.Q4_0: [(3072, 3072), (12288, 3072), (3072, 12288)],
    GGMLType.Q6_K: [(49152, 3072)],
}


def simd_sets() -> list[str]:
    """The SIMD kernel sets this CPU can run."""
    sets = []
    for s in ("avx2", "avxvnni", "avx512vnni"):
        try:
            _kernels.use(s)
        except ValueError:
            continue
        sets.append(s)
    _kernels.use("auto")
    return sets


def random_weights(rng: np.random.Generator, t: GGMLType, n: int, k: int) -> np.ndarray:
    """n raw rows of k elements: random quant bytes, fp16 scales of about 0.01."""
    elems, size = BLOCK_SIZE[t]
    blocks = rng.integers(0, 256, (n, k // elems, size), dtype=np.uint8)
    d = (rng.standard_normal(blocks.shape[:2]) * 0.01).astype("<f2").view(np.uint8)
    at = size - 2 if t == GGMLType.Q6_K else 0  # where the block's fp16 scale lives
    blocks[:, :, at : at + 2] = d.reshape(n, -1, 2)
    return blocks.reshape(n, -1)


def best_time(wtype: int, w: np.ndarray, x: np.ndarray, threads: int, repeat: int) -> float:
    out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        _kernels.matmul(wtype, w, x.shape[1], x, out, threads)
        best = min(best, time.perf_counter() - t0)
    return best


def stream(
    types: list[str],
    sets: list[str],
    prefetch: list[str],
    threads: list[int],
    rows: list[int],
    repeat: int,
) -> None:
    """Decode's matmuls over a whole model, per kernel set, prefetch level and number of
    sequences decoded together (activation rows): see the module docstring."""
    from benchmarks.runtime_speed import VARIANTS, ensure_model, read_bandwidth
    from runtime.engine import Model
    from runtime.model import MATRICES

    bandwidth = {n: read_bandwidth(n) for n in threads}
    print("read bandwidth: " + ", ".join(f"{bandwidth[n]:.1f} GB/s ({n} thr)" for n in threads), flush=True)
    for name in types:
        with Model.load(ensure_model("3b", VARIANTS[name], False)) as model:
            model.wait_repacked()
            tr = model.transformer
            linears = [lin for b in tr.blocks for field, _ in MATRICES if (lin := getattr(b, field))]
            linears.append(tr.output)
            n_bytes = sum(lin.rows.nbytes for lin in linears)
            # the file's layout, and the repacked one where the model repacked (runtime/repack.py)
            in_file = [
                dataclasses.replace(lin, rows=model.gguf.raw(lin.name).reshape(lin.rows.shape), repacked=False)
                for lin in linears
            ]
            layouts = {"": in_file, " repacked": linears} if any(lin.repacked for lin in linears) else {"": linears}
            rng = np.random.default_rng(0)
            variants = [(s, lv, lay) for s in sets for lv in prefetch for lay in layouts if _takes(s, TYPES[name], lay)]
            for m, n in ((m, n) for m in rows for n in threads):
                x = {lin.n_in: rng.standard_normal((m, lin.n_in)).astype(np.float32) for lin in linears}
                best = dict.fromkeys(variants, float("inf"))
                for i in range(repeat + 1):  # passes alternate between variants; the first warms up
                    for s, level, lay in variants:
                        _kernels.use(s)
                        _kernels.prefetch(level)
                        t0 = time.perf_counter()
                        for lin in layouts[lay]:
                            lin(x[lin.n_in], n)
                        if i:
                            best[s, level, lay] = min(best[s, level, lay], time.perf_counter() - t0)
                cells = []
                for (s, level, lay), sec in best.items():
                    gbs = n_bytes / sec / 1e9
                    label = " ".join([s] + [level] * (len(prefetch) > 1)) + lay
                    cells.append(f"{label} {sec * 1e3:6.1f} ms {gbs:5.1f} GB/s ({100 * gbs / bandwidth[n]:.0f}%)")
                print(f"{name} 3b decode matmuls, {m} seq, {n} thr: " + " | ".join(cells), flush=True)
    _kernels.use("auto")
    _kernels.prefetch("auto")


def _takes(kernel_set: str, t: GGMLType, layout: str) -> bool:
    """Whether to time `layout` of weight type `t` on `kernel_set`: the repacked one only where the
    set has its tile (the others read it one output at a time, a fallback)."""
    if not layout:
        return True
    _kernels.use(kernel_set)
    return LAYOUTS[t].has_tile()


EVICT_BYTES = 64 << 20  # read between layers in --attention: more than L2 and a core's share of L3


def attention(sets: list[str], threads: list[int], positions: list[int], repeat: int, rows: list[int]) -> None:
    """Attention per step of `rows` new tokens (1: decode), warm and cold: see the module docstring."""
    from runtime.testing.make_model import PRESETS

    d = PRESETS["3b"]
    hd, n_ctx = d.n_embd // d.n_head, max(positions) + max(rows)
    rng = np.random.default_rng(0)
    caches = [
        tuple(rng.standard_normal((n_ctx, d.n_head_kv, hd)).astype(np.float16).view(np.uint16) for _ in "kv")
        for _ in range(d.n_layer)
    ]
    evict = np.ones(EVICT_BYTES, dtype=np.uint8)
    scale = float(1 / np.sqrt(hd))

    def per_step(q: np.ndarray, out: np.ndarray, pos: int, n: int, cold: bool) -> float:
        best = float("inf")
        for _ in range(repeat):
            total = 0.0
            for k, v in caches if cold else caches[:1] * d.n_layer:
                if cold:
                    evict[::64].sum()  # one byte of every cache line
                t0 = time.perf_counter()
                _kernels.attention(q, k, v, out, pos, scale, n)
                total += time.perf_counter() - t0
            best = min(best, total)
        return best

    for t, pos, n in ((t, p, n) for t in rows for p in positions for n in threads):
        q = rng.standard_normal((t, d.n_head, hd)).astype(np.float32)
        out = np.empty_like(q)
        cells = []
        for s in sets:
            _kernels.use(s)
            warm, cold = per_step(q, out, pos, n, False), per_step(q, out, pos, n, True)
            cells.append(f"{s} warm {warm * 1e3:6.2f} ms cold {cold * 1e3:6.2f} ms")
        what = "decode" if t == 1 else f"{t} prompt tokens"
        print(f"attention, {what}, {d.n_layer} layers, position {pos}, {n} thr: " + " | ".join(cells), flush=True)
    _kernels.use("auto")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default=",".join(simd_sets()), help="kernel sets, compared side by side")
    p.add_argument("--types", default="q8_0,q4_0,q6_k", help="comma-separated: q8_0, q4_0, q6_k")
    p.add_argument(
        "--rows",
        help="activation rows (M) to time: default 1,4,256 (--stream: sequences, default 1; --attention: new tokens, "
        "default 1, decode)",
    )
    p.add_argument("--threads", default="1", help="thread count (--stream: a list, 1,2)")
    p.add_argument("--repeat", type=int, default=5, help="calls per measurement; the best counts")
    p.add_argument("--stream", action="store_true", help="decode's matmuls over a whole 3B model instead")
    p.add_argument(
        "--prefetch", default="auto", help="--stream: where weights are prefetched, compared side by side: auto, l1, l2"
    )
    p.add_argument("--attention", action="store_true", help="decode attention per token, warm and cold, instead")
    p.add_argument("--positions", default="256,1000,2000", help="--attention: cache positions to time")
    args = p.parse_args()
    sets = args.sets.split(",")
    threads = [int(n) for n in args.threads.split(",")]
    if args.attention:
        rows = [int(r) for r in (args.rows or "1").split(",")]
        attention(sets, threads, [int(x) for x in args.positions.split(",")], args.repeat, rows)
        return
    if args.stream:
        rows = [int(r) for r in (args.rows or "1").split(",")]
        types = [t for t in args.types.split(",") if t != "q6_k"]
        stream(types, sets, args.prefetch.split(","), threads, rows, args.repeat)
        return
    if len(threads) != 1:
        p.error("single matmuls take one thread count; a list of them goes with --stream")
    rng = np.random.default_rng(0)
    for name in args.types.split(","):
        t = TYPES[name]
        for n, k in SHAPES[t]:
            w = random_weights(rng, t, n, k)
            for m in (int(r) for r in (args.rows or "1,4,256").split(",")):
                x = rng.standard_normal((m, k)).astype(np.float32)
                cells = []
                for s in sets:
                    _kernels.use(s)
                    layouts = [("", int(t), w)]
                    layout = LAYOUTS.get(t)
                    if layout is not None and layout.has_tile():  # the layout the runtime repacks to
                        packed = np.empty_like(w)
                        layout.repack(w, k, packed, 1)
                        layouts.append((" repacked", layout.kernel_type, packed))
                    for label, wtype, weights in layouts:
                        sec = best_time(wtype, weights, x, threads[0], args.repeat)
                        gmac, gbs = m * n * k / sec / 1e9, w.nbytes / sec / 1e9
                        cells.append(f"{s}{label} {sec * 1e3:7.2f} ms {gmac:6.1f} GMAC/s {gbs:5.1f} GB/s")
                print(f"{name} {n}x{k} M={m}: " + " | ".join(cells), flush=True)
    _kernels.use("auto")


if __name__ == "__main__":
    main()
