"""Runtime speed, side by side with llama.cpp: load time, prompt processing, decode, peak memory.

    python -m benchmarks.runtime_speed [--preset 3b] [--types q8_0,q4_0] [--threads 1,2]
        [--prompt 256] [--gen 64] [--rounds 2] [--out docs/benchmarks.md]

Random-weight StarCoder2 models (runtime.testing.make_model) are generated once into
${XDG_CACHE_HOME:-~/.cache}/llmctl/bench/. Every measurement runs in a fresh subprocess, so peak
RSS is per engine, and engines alternate within each round because the machine is shared and
noisy; the table gives the median of the rounds. Decode reads every weight once per token, so
the report also gives the weight bytes read per second and their share of the machine's memory
read bandwidth, measured here with the same threads. Nothing here is asserted by the tests.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import importlib.util
import json
import mmap
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.report import write_section
from runtime.cpuinfo import cpuinfo_fields

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("llmctl", "llama.cpp")
METRICS = ("load_s", "prompt_tps", "long_prompt_tps", "decode_tps", "rss_mib")
BATCH = 4  # sequences decoded together for the batched column (issue 8: >= 3x one sequence)
RSS_SLACK_MIB = 100  # issue 8: peak RSS <= file + KV cache + this
MIB = 1 << 20


@dataclass(frozen=True)
class Variant:
    """One model file to generate and measure."""

    key: str  # as given to --types
    wtype: str
    head_type: str | None
    label: str


VARIANTS = {
    "q8_0": Variant("q8_0", "q8_0", None, "Q8_0"),
    "q4_0": Variant("q4_0", "q4_0", "q6_k", "Q4_0, Q6_K head"),
}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmctl" / "bench"


def model_path(preset: str, v: Variant) -> Path:
    head = f"-{v.head_type}" if v.head_type else ""
    return cache_dir() / f"starcoder2-{preset}-{v.wtype}{head}.gguf"


def ensure_model(preset: str, v: Variant, regen: bool) -> Path:
    """Generate the model file unless it is already in the cache."""
    from runtime.testing.make_model import make_model

    path = model_path(preset, v)
    if path.exists() and not regen:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    log(f"generating {path} ...")
    start = time.monotonic()
    make_model(path, arch="starcoder2", preset=preset, wtype=v.wtype, head_type=v.head_type, progress=True)
    log(f"wrote {path} ({path.stat().st_size / MIB:.0f} MiB) in {time.monotonic() - start:.1f} s")
    return path


def hold_in_page_cache(path: Path) -> mmap.mmap:
    """Map the file and touch every page, so that every run, first or not, finds it in the page
    cache; keep the returned mapping for as long as the runs last. Reading the file once is not
    enough on every host: some reclaim the cache of files that no process maps (one AMD EPYC host
    ran DAMON's pageout on unmapped file pages cold for a minute), and a run that then loads its
    model from disk is timed on a cold cache, and maps the model with whatever folio sizes the
    reads left (see "Decode: the weights read as streams")."""
    import numpy as np

    with open(path, "rb") as f:
        held = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    int(np.frombuffer(held, dtype=np.uint8)[:: mmap.PAGESIZE].sum())  # fault every page in
    return held


def prompt_ids(path: Path, n: int) -> list[int]:
    """The first `n` tokens of the standard library's source, with the model's own tokenizer."""
    from runtime.gguf import read_gguf
    from runtime.tokenizer import CodeTokenizer

    f = read_gguf(path)
    try:
        tok = CodeTokenizer.from_gguf(f)
        ids: list[int] = []
        for src in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
            ids += tok.encode(src.read_text(encoding="utf-8", errors="replace"), special=False, add_bos=False)
            if len(ids) >= n:
                return ids[:n]
    finally:
        f.close()
    raise SystemExit(f"runtime_speed: the standard library's source gives fewer than {n} tokens")


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of the matrices one decoded token reads: every 2-D weight but the embedding table,
    which is read whole only when it doubles as the LM head (tied embeddings)."""
    from runtime.gguf import read_gguf

    f = read_gguf(path)
    try:
        skip = {"position_embd.weight"} | ({"token_embd.weight"} if "output.weight" in f.tensors else set())
        return sum(t.n_bytes for t in f.tensors.values() if len(t.shape) == 2 and t.name not in skip)
    finally:
        f.close()


READ_STREAMS = (1, 2, 4, 8)  # streams per thread the bandwidth probe tries


def read_bandwidth(threads: int, rounds: int = 3) -> float:
    """Memory read bandwidth in GB/s with `threads` threads: the best of `rounds` passes over
    1 GiB (far more than the caches), read by the runtime's own kernels, each thread reading its
    part as 1, 2, 4 or 8 streams side by side, prefetched into L1, into L2, or not at all. Which
    way reaches the bandwidth differs between CPUs (an Intel Xeon needed 4 prefetched streams, an
    AMD EPYC Zen 4 reads 2.5x faster with one than with 4 when prefetching into L1, and faster
    still with no prefetches), so the best of all is the bound decode is held to."""
    import numpy as np

    from runtime.kernels import _kernels

    buf = np.ones(1 << 30, dtype=np.uint8)
    best = 0.0
    try:
        for _ in range(rounds):
            for level, prefetch in (("l1", True), ("l2", True), ("auto", False)):
                _kernels.prefetch(level)
                for streams in READ_STREAMS:
                    start = time.perf_counter()
                    _kernels.read_sum(buf, threads, streams, prefetch)
                    best = max(best, buf.size / (time.perf_counter() - start) / 1e9)
    finally:
        _kernels.prefetch("auto")
    return best


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the child: one engine, one model, one JSON line ------------------------------------------


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak resident set (VmHWM). Not ru_maxrss: Linux keeps that across fork and exec,
    so a child would report the parent's peak (1 GiB of bandwidth buffer) if it were higher."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if pid == "self" else float("nan")


def run_ours(path: str, ids: list[int], gen: int, threads: int, n_ctx: int, long_ids: list[int]) -> dict[str, Any]:
    import numpy as np

    from runtime.engine import Model
    from runtime.generate import decode_one, prefill

    t0 = time.perf_counter()
    model = Model.load(path, n_threads=threads, n_ctx=n_ctx)
    loaded = time.perf_counter()
    repacked = model.wait_repacked()  # Q4_0 and Q8_0 matrices repacked on a thread after load (runtime/repack.py)
    t1 = time.perf_counter()
    logits = prefill(model.transformer, model.cache, ids)
    t2 = time.perf_counter()
    tokens: list[int] = []
    for _ in range(gen):
        tokens.append(int(np.argmax(logits)))
        logits = decode_one(model.transformer, model.cache, tokens[-1])
    t3 = time.perf_counter()
    rss = peak_rss_mib()  # before the batched part adds its caches
    return {
        "load_s": loaded - t0,
        "repack_s": t1 - loaded if model.transformer.repacking is not None and repacked else None,
        "prompt_tps": len(ids) / (t2 - t1),
        "decode_tps": gen / (t3 - t2),
        "bandwidth_gbs": read_bandwidth(threads),
        "batch_tps": batched_decode_tps(model, tokens[-1], gen),
        "long_prompt_tps": long_prompt_tps(
            lambda: prefill(model.transformer, model.cache, long_ids), model.cache.reset, long_ids
        ),
        "rss_mib": rss,
        "kv_mib": model.cache.n_bytes / MIB,
        "tokens": tokens,
    }


def long_prompt_tps(run: Callable[[], object], reset: Callable[[], object], long_ids: list[int]) -> float | None:
    """Tokens/s of the second, longer prompt on an emptied cache (None when there is none)."""
    if not long_ids:
        return None
    reset()
    t0 = time.perf_counter()
    run()
    return len(long_ids) / (time.perf_counter() - t0)


def batched_decode_tps(model: Any, token: int, gen: int) -> float:
    """Aggregate tokens/s of BATCH sequences decoded together (one `forward_batch` step gives each
    its next token), each starting from a copy of the single sequence's cache, so that attention
    costs what it cost there."""
    import numpy as np

    from runtime.kv_cache import KVCache

    n = model.cache.n_past
    caches = [KVCache(model.config, model.n_ctx) for _ in range(BATCH)]
    for c in caches:
        c.k[:, :n], c.v[:, :n], c.n_past = model.cache.k[:, :n], model.cache.v[:, :n], n
    tokens = [token] * BATCH
    t0 = time.perf_counter()
    for _ in range(gen):
        logits = model.transformer.forward_batch([(c, np.array([t])) for c, t in zip(caches, tokens, strict=True)])
        tokens = [int(i) for i in np.argmax(logits, axis=1)]
    return BATCH * gen / (time.perf_counter() - t0)


def open_llama(path: str, n_ctx: int, threads: int, n_seq: int = 1) -> Any:
    """llama_cpp.Llama on `path` as every benchmark runs it: `threads` for prompt and decode, 512-token
    batches, no flash attention; its default extra buffer types unless NO_EXTRA_BUFTS_ENV=1. With
    `n_seq` > 1 the context holds that many sequences in one KV cache of `n_ctx` cells (as
    llama.cpp's server shares a prompt between its slots), for `llama_batched_decode_tps`."""
    import llama_cpp
    import llama_cpp.llama_cpp as capi  # where Llama() takes its default model and context params from

    if n_seq > 1:
        context_default = capi.llama_context_default_params

        def context_params() -> Any:
            p = context_default()
            p.n_seq_max, p.kv_unified = n_seq, True
            return p

        capi.llama_context_default_params = context_params  # type: ignore[assignment]
    if os.environ.get(NO_EXTRA_BUFTS_ENV) == "1":
        # llama.cpp's extra buffer types (Q4_0 repacking, AMX) off: ggml's reference path for
        # every type; a -march=native build needs it on AMX CPUs (llama.cpp issue 20824).
        default = capi.llama_model_default_params

        def params() -> Any:
            p = default()
            p.use_extra_bufts = False
            return p

        capi.llama_model_default_params = params  # type: ignore[assignment]

    return llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=False,
        flash_attn=False,
        verbose=False,
    )


def run_llama(path: str, ids: list[int], gen: int, threads: int, n_ctx: int, long_ids: list[int]) -> dict[str, Any]:
    import llama_cpp.llama_cpp as capi
    import numpy as np

    t0 = time.perf_counter()
    llm = open_llama(path, n_ctx, threads, n_seq=BATCH)
    t1 = time.perf_counter()
    n_vocab = llm.n_vocab()

    def last_logits() -> Any:
        return np.ctypeslib.as_array(capi.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))

    llm.eval(ids)
    logits = last_logits()
    t2 = time.perf_counter()
    tokens: list[int] = []
    for _ in range(gen):
        tokens.append(int(np.argmax(logits)))
        llm.eval([tokens[-1]])
        logits = last_logits()
    t3 = time.perf_counter()
    return {
        "load_s": t1 - t0,
        "prompt_tps": len(ids) / (t2 - t1),
        "decode_tps": gen / (t3 - t2),
        "rss_mib": peak_rss_mib(),
        "bandwidth_gbs": read_bandwidth(threads),
        "batch_tps": llama_batched_decode_tps(llm, tokens[-1], len(ids) + gen, gen),
        "long_prompt_tps": long_prompt_tps(lambda: llm.eval(long_ids), llm.reset, long_ids),
        "tokens": tokens,
    }


def llama_batched_decode_tps(llm: Any, token: int, n_past: int, gen: int) -> float:
    """`batched_decode_tps` for llama.cpp: BATCH sequences, each starting from the single
    sequence's `n_past` cells (shared, as `llama_memory_seq_cp` shares them), one `llama_decode`
    of BATCH tokens per step; the other sequences' cells are dropped again at the end."""
    import llama_cpp.llama_cpp as capi
    import numpy as np

    mem = capi.llama_get_memory(llm.ctx)
    for s in range(1, BATCH):
        capi.llama_memory_seq_cp(mem, 0, s, -1, -1)
    n_vocab = llm.n_vocab()
    batch = capi.llama_batch_init(BATCH, 0, 1)
    try:
        tokens = [token] * BATCH
        t0 = time.perf_counter()
        for step in range(gen):
            batch.n_tokens = BATCH
            for s, t in enumerate(tokens):
                batch.token[s], batch.pos[s], batch.n_seq_id[s], batch.logits[s] = t, n_past + step, 1, 1
                batch.seq_id[s][0] = s
            if capi.llama_decode(llm.ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed at batched step {step}")
            tokens = [
                int(np.argmax(np.ctypeslib.as_array(capi.llama_get_logits_ith(llm.ctx, s), shape=(n_vocab,))))
                for s in range(BATCH)
            ]
        return BATCH * gen / (time.perf_counter() - t0)
    finally:
        capi.llama_batch_free(batch)
        for s in range(1, BATCH):  # Llama.reset() and eval() clear sequence 0's cells only
            capi.llama_memory_seq_rm(mem, s, -1, -1)


def child_main(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.runtime_speed _child")
    p.add_argument("engine", choices=ENGINES)
    p.add_argument("model")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--gen", type=int, required=True)
    p.add_argument("--n-ctx", type=int, required=True)
    p.add_argument("--prompt", type=int, required=True)
    p.add_argument("--long-prompt", type=int, required=True)
    a = p.parse_args(argv)
    ids = [int(i) for i in json.loads(sys.stdin.read())]
    run = run_ours if a.engine == "llmctl" else run_llama
    res = run(a.model, ids[: a.prompt], a.gen, a.threads, a.n_ctx, ids[: a.long_prompt])
    print(json.dumps(res), flush=True)
    return 0


def run_child(cmd: list[str], ids: list[int], what: str) -> dict[str, Any]:
    """Run a benchmark child (a fresh interpreter in the repository) with the token ids on its stdin;
    the JSON object on the last line of its stdout. `SystemExit` naming `what` if it fails."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(cmd, input=json.dumps(ids), capture_output=True, text=True, cwd=ROOT, env=env)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        errs = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        why = errs[-1] if errs else f"exit status {proc.returncode}"
        raise SystemExit(f"{what} failed: {why}")
    res: dict[str, Any] = json.loads(lines[-1])
    return res


def measure(
    engine: str, path: Path, ids: list[int], gen: int, threads: int, prompt: int, long_prompt: int
) -> dict[str, Any]:
    """Run one engine on one model in a fresh interpreter (the first `prompt` of `ids`, then
    decoding, then the first `long_prompt` of them anew); its JSON result."""
    cmd = [sys.executable, "-m", "benchmarks.runtime_speed", "_child", engine, str(path)]
    # room for the prompt, the single sequence's tokens and the batched ones (llama.cpp's
    # sequences share one cache: BATCH times theirs), or the long prompt
    n_ctx = max(prompt + (1 + BATCH) * gen, long_prompt) + 16
    cmd += ["--threads", str(threads), "--gen", str(gen), "--n-ctx", str(n_ctx)]
    cmd += ["--prompt", str(prompt), "--long-prompt", str(long_prompt)]
    return run_child(cmd, ids, f"runtime_speed: {engine} on {path.name}")


# --- the parent: rounds, medians, the report ---------------------------------------------------


@dataclass
class Result:
    variant: Variant
    path: Path
    threads: int
    runs: dict[str, list[dict[str, Any]]]
    bytes_per_token: int

    def median(self, engine: str, metric: str) -> float | None:
        vals = [r[metric] for r in self.runs.get(engine, []) if r.get(metric) is not None]
        return statistics.median(vals) if vals else None

    @property
    def file_mib(self) -> float:
        return self.path.stat().st_size / MIB


def cpu_model() -> str:
    """The CPU's model name with its family and model numbers, which tell CPU generations apart
    where a VM hides the name ("Intel(R) Xeon(R) Processor (family 6, model 207)")."""
    fields = cpuinfo_fields()
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in fields and "model" in fields:
        return f"{name} (family {fields['cpu family']}, model {fields['model']})"
    return name


def machine_line(llama_version: str | None) -> str:
    kernels = importlib.import_module("runtime.kernels._kernels")  # compiled; no stubs
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    llama = f"llama-cpp-python {llama_version}" if llama_version else "llama-cpp-python not installed"
    return (
        f"{cpu_model()}, {os.cpu_count()} cores ({usable} usable), llmctl kernels `{kernels.active()}`, "
        f"{llama}, Python {platform.python_version()}"
    )


def _fmt(metric: str, x: float | None) -> str:
    if x is None:
        return "—"
    if metric == "load_s":
        return f"{x:.2f}"
    if metric == "rss_mib":
        return _mib(x)
    return f"{x:.1f}" if x < 1000 else f"{x:.0f}"


def _agree(res: Result) -> str | None:
    """How far the two engines' greedy continuations agree (first run of each)."""
    ours, theirs = res.runs.get("llmctl"), res.runs.get("llama.cpp")
    if not ours or not theirs:
        return None
    a, b = ours[0]["tokens"], theirs[0]["tokens"]
    n = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    return f"{n}/{len(a)} ({res.variant.label})"


def _mib(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _read_rate(res: Result, engine: str, bandwidth: float) -> str:
    """Weight bytes read per second while decoding; their share of the best bandwidth of the
    whole run, and the median of each run's share of the bandwidth its own process read right
    after decoding (on a shared host the bandwidth changes from minute to minute)."""
    tps = res.median(engine, "decode_tps")
    if tps is None:
        return "— | — | —"
    gbs = tps * res.bytes_per_token / 1e9
    shares = [
        r["decode_tps"] * res.bytes_per_token / 1e9 / r["bandwidth_gbs"]
        for r in res.runs.get(engine, [])
        if r.get("bandwidth_gbs")
    ]
    then = f"{100 * statistics.median(shares):.0f}%" if shares else "—"
    return f"{gbs:.1f} | {100 * gbs / bandwidth:.0f}% | {then}"


def _batched(res: Result, engine: str = "llmctl") -> str:
    """Aggregate tokens/s of BATCH sequences, and its ratio to one sequence's decode."""
    batch, one = res.median(engine, "batch_tps"), res.median(engine, "decode_tps")
    if batch is None or not one:
        return "—"
    return f"{batch:.1f} ({batch / one:.2f}× one)"


def _ratio(res: Result, metric: str) -> str:
    a, b = res.median("llmctl", metric), res.median("llama.cpp", metric)
    return f"{a / b:.2f}×" if a is not None and b else "—"


def table(results: list[Result], have_llama: bool, bandwidth: float, prompts: tuple[int, int]) -> str:
    head = (
        f"| model | engine | load s | prompt {prompts[0]} tok/s | prompt {prompts[1] or '(none)'} tok/s | decode tok/s "
        f"| peak RSS MiB | decode GB/s | of bandwidth | of bandwidth then | {BATCH} seqs tok/s | file MiB "
        "| RSS budget MiB |"
    )
    rows = [head, "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for res in results:
        label = res.variant.label
        kv = res.median("llmctl", "kv_mib") or 0.0
        budget = _mib(res.file_mib + kv + RSS_SLACK_MIB)
        ours = [_fmt(m, res.median("llmctl", m)) for m in METRICS]
        rate = _read_rate(res, "llmctl", bandwidth)
        batch = _batched(res)
        rows.append(f"| {label} | llmctl | {' | '.join(ours)} | {rate} | {batch} | {_mib(res.file_mib)} | {budget} |")
        if not have_llama:
            rows.append(f"| {label} | llama.cpp | not installed: measured llmctl only | | | | | | | | | | |")
            continue
        theirs = [_fmt(m, res.median("llama.cpp", m)) for m in METRICS]
        rate = _read_rate(res, "llama.cpp", bandwidth)
        batch = _batched(res, "llama.cpp")
        rows.append(f"| {label} | llama.cpp | {' | '.join(theirs)} | {rate} | {batch} | {_mib(res.file_mib)} | |")
        ratios = [_ratio(res, m) for m in METRICS]
        rows.append(f"| {label} | *llmctl / llama.cpp* | {' | '.join(ratios)} | | | | {_ratio(res, 'batch_tps')} | | |")
    return "\n".join(rows)


def _threads(n: int) -> str:
    return f"{n} thread{'s' if n != 1 else ''}"


def section(
    args: argparse.Namespace,
    command: str,
    results: list[Result],
    bandwidth: dict[int, float],
    have_llama: bool,
    llama_ver: str | None,
) -> str:
    shape = "StarCoder2-3B shape" if args.preset == "3b" else f"StarCoder2 architecture, preset `{args.preset}`"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    first = [r for r in results if r.threads == args.threads[0]]
    files = ", ".join(
        f"{r.variant.label} `{r.path.name}` {r.path.stat().st_size / 1e6:.1f} MB "
        f"({r.bytes_per_token / 1e6:.0f} MB of weights read per token)"
        for r in first
    )
    engines = "llmctl and llama.cpp alternated" if have_llama else "llmctl only (llama-cpp-python is not installed)"
    bw = ", ".join(f"{bandwidth[n]:.1f} GB/s with {_threads(n)}" for n in args.threads)
    lines = [
        f"### {shape}, {' and '.join(_threads(n) for n in args.threads)}",
        "",
        f"- Command: `{command}`",
        f"- Date: {now}",
        f"- Machine: {machine_line(llama_ver)}",
        "- Memory read bandwidth (1 GiB read as 1, 2, 4 and 8 streams per thread, prefetched into L1, "
        f"into L2 or not at all, 3 passes each, before each round; the best of all): {bw}",
        f"- Files (random weights): {files}",
        f"- Prompt {args.prompt} tokens, then {args.gen} tokens decoded greedily one at a time"
        + (f", then a {args.long_prompt}-token prompt on an emptied cache" if args.long_prompt else "")
        + f"; median of {args.rounds} round{'s' if args.rounds != 1 else ''}, {engines}.",
        "- llama.cpp: "
        + (f"{args.llama_build}; " if have_llama else "")
        + (
            "without its extra buffer types (no Q4_0 repacking)."
            if args.llama_no_extra_bufts
            else "default settings (Q4_0 weights repacked), as users run it and as the parity tests do."
        ),
    ]
    repacks = [
        f"{r.variant.label} with {_threads(r.threads)} {sec:.1f} s"
        for r in results
        if (sec := r.median("llmctl", "repack_s")) is not None
    ]
    if repacks:
        lines.append(
            "- llmctl repacked the layers' Q4_0 (and with AVX-512 Q8_0) matrices on a thread of their own after load "
            "(runtime/repack.py; the load returns first and the model serves meanwhile), median: "
            + ", ".join(repacks)
            + "; each round waits for it before the prompt."
        )
    if args.preset != "3b":
        lines.append(
            f"- Preset `{args.preset}` is a harness check, far smaller than a real model: its numbers say little."
        )
    for n in args.threads:
        rows = [r for r in results if r.threads == n]
        lines += ["", f"#### {_threads(n)}", "", table(rows, have_llama, bandwidth[n], (args.prompt, args.long_prompt))]
    lines.append("")
    agree = [a for a in (_agree(r) for r in first) if a]
    lines.append(
        "Load is the constructor (`Model.load` / `llama_cpp.Llama`); prompt and decode are tokens per second "
        "of wall time; decode GB/s is decode tok/s times the weight bytes read per token, *of bandwidth* "
        "its share of the best read bandwidth the probe measured in the whole run (the decode roofline), and "
        "*then* the median of each run's share of the bandwidth its own process read right after decoding "
        f"(the probe, 3 passes); {BATCH} seqs is the aggregate "
        f"tokens/s of {BATCH} sequences decoded together (one batched forward pass per step, each from a copy "
        "of the single sequence's cache; llama.cpp's sequences share that cache's cells, one `llama_decode` of "
        f"{BATCH} tokens a step); peak RSS is `VmHWM` of the "
        "engine's own process (mapped weights count once "
        f"touched). RSS budget = file + KV cache + {RSS_SLACK_MIB} MiB, for llmctl."
        + (f" Leading greedy tokens on which the engines agree: {', '.join(agree)}." if agree else "")
    )
    return "\n".join(lines)


NO_EXTRA_BUFTS_ENV = "LLMCTL_BENCH_LLAMA_NO_EXTRA_BUFTS"
LLAMA_LIB_ENV = "LLAMA_CPP_LIB_PATH"  # where llama_cpp loads libllama.so from (llama-cpp-python's own variable)
# ggml's CPU features (llama_print_system_info) that say which SIMD code a llama.cpp build runs
LLAMA_SIMD = tuple("AVX AVX2 F16C FMA BMI2 AVX_VNNI AVX512 AVX512_VBMI AVX512_VNNI AVX512_BF16 AMX_INT8".split())


def add_llama_lib_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--llama-lib",
        type=Path,
        help="run llama.cpp from the shared libraries in this directory (libllama.so and its libggml*, "
        "for example a -march=native build of llama-cpp-python's llama.cpp version) instead of "
        "llama-cpp-python's own build, which scripts/bootstrap.sh compiles for AVX2 only",
    )


def use_llama_lib(p: argparse.ArgumentParser, lib: Path | None) -> None:
    """Refuse a --llama-lib without libllama.so; else point the llama.cpp children (which inherit
    this process's environment) at it."""
    if lib is None:
        return
    if not (lib / "libllama.so").is_file():
        p.error(f"--llama-lib: no libllama.so in {lib} (build llama.cpp with -DBUILD_SHARED_LIBS=ON)")
    os.environ[LLAMA_LIB_ENV] = str(lib.resolve())


def llama_build() -> str:
    """Which llama.cpp the children run and the SIMD features it was compiled for, from
    `llama_print_system_info()` in a fresh interpreter (so this process never loads it)."""
    lib = os.environ.get(LLAMA_LIB_ENV)
    where = f"the libraries in `{lib}`" if lib else "llama-cpp-python's own build"
    code = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"runtime_speed: cannot load llama.cpp from {where}: {last}")
    features = {m.group(1) for m in re.finditer(r"\b([A-Z0-9_]+) = 1\b", proc.stdout)}
    simd = [f for f in LLAMA_SIMD if f in features]
    return f"{where}, compiled for {', '.join(simd) or 'no SIMD'}"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from runtime.testing.make_model import PRESETS

    p = argparse.ArgumentParser(prog="python -m benchmarks.runtime_speed", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=tuple(PRESETS), default="3b", help="model shape (default: 3b)")
    p.add_argument("--types", default="q8_0,q4_0", help="comma-separated: q8_0, q4_0 (with a Q6_K head)")
    p.add_argument("--threads", default="2", help="comma-separated thread counts, each measured (default: 2)")
    p.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    p.add_argument(
        "--long-prompt",
        type=int,
        default=512,
        help="tokens of a second prompt, timed on an emptied cache after decoding (0: none)",
    )
    p.add_argument("--gen", type=int, default=64, help="decoded tokens")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, help="rewrite the runtime_speed section of this markdown file")
    p.add_argument("--regen", action="store_true", help="regenerate the cached model files")
    p.add_argument(
        "--llama-no-extra-bufts",
        action="store_true",
        help="run llama.cpp without its extra buffer types (no Q4_0 repacking); "
        "by default it runs as users get it, as the parity tests do",
    )
    add_llama_lib_argument(p)
    a = p.parse_args(argv)
    use_llama_lib(p, a.llama_lib)
    a.types = [t.strip() for t in a.types.split(",") if t.strip()]
    try:
        a.threads = [int(t) for t in a.threads.split(",") if t.strip()]
    except ValueError:
        p.error(f"--threads: not a list of numbers: {a.threads}")
    if not a.threads or min(a.threads) < 1:
        p.error("--threads must name at least one count, each at least 1")
    bad = [t for t in a.types if t not in VARIANTS]
    if bad or not a.types:
        p.error(f"--types: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(VARIANTS)}")
    for name in ("prompt", "gen", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be at least 1")
    if a.long_prompt < 0:
        p.error("--long-prompt must be at least 0")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_child"]:
        return child_main(argv[1:])
    args = parse_args(argv)
    if args.llama_no_extra_bufts:
        os.environ[NO_EXTRA_BUFTS_ENV] = "1"  # read by the llama.cpp children
    command = shlex.join(["python", "-m", "benchmarks.runtime_speed", *argv])

    have_llama = importlib.util.find_spec("llama_cpp") is not None
    llama_ver: str | None = None
    if have_llama:
        try:
            llama_ver = importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            llama_ver = "unknown version"
        args.llama_build = llama_build()
        log(f"runtime_speed: llama.cpp from {args.llama_build}")
    else:
        log("runtime_speed: llama_cpp is not installed (pip install llama-cpp-python): measuring llmctl only")
    engines = ENGINES if have_llama else ENGINES[:1]

    results: list[Result] = []
    for key in args.types:
        v = VARIANTS[key]
        path = ensure_model(args.preset, v, args.regen)
        per_token = weight_bytes_per_token(path)
        results += [Result(v, path, n, {e: [] for e in engines}, per_token) for n in args.threads]
    bandwidth = {n: read_bandwidth(n) for n in args.threads}
    log("read bandwidth: " + ", ".join(f"{bandwidth[n]:.1f} GB/s ({_threads(n)})" for n in args.threads))
    _held = [hold_in_page_cache(path) for path in dict.fromkeys(r.path for r in results)]  # until the end
    ids = {r.variant.key: prompt_ids(r.path, max(args.prompt, args.long_prompt)) for r in results}

    for rnd in range(args.rounds):
        if rnd:  # the bandwidth drifts on a shared machine: keep the best seen between rounds
            bandwidth = {n: max(bandwidth[n], read_bandwidth(n)) for n in args.threads}
        for res in results:
            for engine in engines:  # alternate: llmctl, llama.cpp, llmctl, llama.cpp, ...
                r = measure(
                    engine, res.path, ids[res.variant.key], args.gen, res.threads, args.prompt, args.long_prompt
                )
                res.runs[engine].append(r)
                log(
                    f"round {rnd + 1}/{args.rounds} {res.variant.label:<16} {_threads(res.threads):<9} "
                    f"{engine:<9}  load {r['load_s']:.2f} s  "
                    f"prompt {r['prompt_tps']:.1f} tok/s  decode {r['decode_tps']:.1f} tok/s  "
                    f"peak RSS {r['rss_mib']:.0f} MiB"
                )

    text = section(args, command, results, bandwidth, have_llama, llama_ver)
    print(text)
    if args.out is not None:
        write_section(args.out, "runtime_speed", text)
        log(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
