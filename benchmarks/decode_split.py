"""Where a decode step's time goes: each kernel op, and the steps between them.

    python -m benchmarks.decode_split [--types q4_0,q8_0] [--threads 1,2] [--seqs 1,4]
        [--position 256] [--steps 24] [--no-repack]

Loads the runtime_speed model file of each type (StarCoder2-3B shape; generated if missing), fills
a cache with `--position` prompt tokens, then times `--steps` decode steps: one `forward_batch`
each, for `--seqs` sequences decoded together (each from a copy of that cache), with a timer around
every op: the layers' ops by the timers of their C loop (`Transformer.op_seconds`), the embedding
lookup, final norm and LM head by a timer around each call Python makes into the kernels. Prints
milliseconds per step for each op (`matmul` counts the bias, GELU and residual it applies;
`kv_store` is the KV cache's fp16 store) and the rest: Python, NumPy and the C loop's own steps
between the kernels, the timers' own cost (well under a microsecond each, ~300 a step) included.
Profile with this before optimizing outside the matmuls; `kernel_speed --stream` times the matmuls
alone. --no-repack keeps the matrices in the file's layout, as the runtime's --no-repack does
(runtime/repack.py). Never asserted: the machine is shared, so compare several runs.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import numpy as np

from runtime import model, ops
from runtime.kernels import _kernels

# The modules whose forward-pass calls go through `_kernels`.
CALLERS = (ops, model)


class _TimedKernels:
    """Stands in for the `_kernels` module: each function call adds its wall time to `spent`."""

    def __init__(self, spent: dict[str, float]) -> None:
        self._spent = spent

    def __getattr__(self, name: str) -> Callable[..., Any]:
        fn, spent = getattr(_kernels, name), self._spent

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - t0

        setattr(self, name, timed)  # found without __getattr__ from now on
        return timed


@contextmanager
def timed_kernels(spent: dict[str, float]) -> Iterator[None]:
    """Every forward-pass call into the kernels timed into `spent` while the block runs."""
    proxy: Any = _TimedKernels(spent)
    callers = [cast(Any, m) for m in CALLERS]
    saved = [(m, m._kernels) for m in callers]
    for m in callers:
        m._kernels = proxy
    try:
        yield
    finally:
        for m, original in saved:
            m._kernels = original


def split(
    path: str, threads: int, seqs: int, position: int, steps: int, repack: bool | None = None
) -> tuple[float, dict[str, float]]:
    """(ms per decode step, ms per step spent in each kernel entry point); `repack` as Model.load
    takes it."""
    from runtime.engine import Model
    from runtime.generate import prefill
    from runtime.kv_cache import KVCache

    with Model.load(path, n_threads=threads, n_ctx=position + steps + 1, repack=repack) as m:
        m.wait_repacked()
        vocab = m.config.n_vocab
        logits = prefill(m.transformer, m.cache, [(17 * i) % vocab for i in range(position)])
        caches = [m.cache] + [KVCache(m.config, m.n_ctx) for _ in range(seqs - 1)]
        for c in caches[1:]:
            c.k[:, :position], c.v[:, :position], c.n_past = m.cache.k[:, :position], m.cache.v[:, :position], position
        tokens = [int(np.argmax(logits))] * seqs
        spent: dict[str, float] = defaultdict(float)
        in_layers = m.transformer.op_seconds = np.zeros(len(_kernels.LAYER_OPS))
        with timed_kernels(spent):
            t0 = time.perf_counter()
            for _ in range(steps):
                out = m.transformer.forward_batch([(c, np.array([t])) for c, t in zip(caches, tokens, strict=True)])
                tokens = [int(i) for i in np.argmax(out, axis=1)]
            total = time.perf_counter() - t0
        m.transformer.op_seconds = None
    for name, sec in zip(_kernels.LAYER_OPS, in_layers, strict=True):
        spent[name] += float(sec)
    return total / steps * 1e3, {name: sec / steps * 1e3 for name, sec in spent.items()}


def line(label: str, step_ms: float, per_step: dict[str, float]) -> str:
    parts = [f"{name} {ms:.2f}" for name, ms in sorted(per_step.items(), key=lambda kv: -kv[1])]
    rest = step_ms - sum(per_step.values())
    return f"{label}: {step_ms:.2f} ms/step = " + " + ".join(parts) + f" + between them {rest:.2f}"


def main() -> None:
    from benchmarks.runtime_speed import VARIANTS, ensure_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default="q4_0,q8_0", help="comma-separated: q8_0, q4_0 (with a Q6_K head)")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--seqs", default="1", help="comma-separated numbers of sequences decoded together")
    p.add_argument("--position", type=int, default=256, help="cache positions filled before the timed steps")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed")
    p.add_argument(
        "--no-repack",
        dest="repack",
        action="store_false",
        default=None,
        help="keep the file's layout (runtime --no-repack)",
    )
    args = p.parse_args()
    if args.position < 1 or args.steps < 1:
        p.error("--position and --steps must be at least 1")
    for name in args.types.split(","):
        if name not in VARIANTS:
            p.error(f"--types: unknown type {name!r}; expected {', '.join(VARIANTS)}")
        path = str(ensure_model("3b", VARIANTS[name], False))
        for n in (int(x) for x in args.threads.split(",")):
            for seqs in (int(x) for x in args.seqs.split(",")):
                step_ms, per_step = split(path, n, seqs, args.position, args.steps, args.repack)
                layout = " file layout" if args.repack is False else ""
                label = f"{name} 3b{layout}, {n} thr, {seqs} seq, position {args.position}"
                print(line(label, step_ms, per_step), flush=True)


if __name__ == "__main__":
    main()
