"""Time to first request and time to first token: llmctl's server against llama.cpp, from process start.

For each round and model (the 3B-shaped files of `benchmarks.runtime_speed`, page cache warm):

- **llmctl**: `python -m runtime serve -m FILE` is started (the runtime byte-compiled first, as the
  images ship it); the clock runs from the spawn to the port accepting connections, to `/health`
  answering 200, and to the answer of a first `/completion` (a short prompt, one token): the
  "first request served" figure. Then a 1,000-token prompt (token
  ids, no prompt cache) with one token to generate: its wall time is the time to first token. The
  server's peak RSS (`VmHWM`) is read before it is stopped; the budget is file + KV cache + 100 MiB.
- **llama.cpp** (llama-cpp-python, in a fresh interpreter, no HTTP): from the spawn to the first token
  of the same short prompt (import, `Llama()`, eval), then the 1,000-token prompt's first token; its
  peak RSS. That is a lower bound for llama-server, which also parses HTTP.

The engines alternate within each round; the report gives medians. Never asserted in tests.

    python -m benchmarks.startup --out docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

from benchmarks.report import write_section
from benchmarks.runtime_speed import (
    MIB,
    ROOT,
    RSS_SLACK_MIB,
    VARIANTS,
    add_llama_lib_argument,
    cpu_model,
    ensure_model,
    hold_in_page_cache,
    llama_build,
    log,
    open_llama,
    peak_rss_mib,
    prompt_ids,
    run_child,
    use_llama_lib,
)
from benchmarks.server_load import free_port

SHORT_PROMPT = "def add(a, b):\n"
POLL = 0.005


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_llmctl(path: Path, ids: list[int], threads: int, n_ctx: int) -> dict[str, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "runtime", "serve", "-m", str(path), "--port", str(port)]
    cmd += ["--threads", str(threads), "--ctx", str(n_ctx), "--parallel", "1"]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        while not _listening(port):
            if proc.poll() is not None:
                why = proc.stderr.read().decode()[-500:] if proc.stderr else ""
                raise SystemExit(f"startup: the server exited: {why}")
            time.sleep(POLL)
        listening = time.monotonic() - start
        with httpx.Client(timeout=600, trust_env=False) as client:
            while client.get(f"{base}/health").status_code != 200:
                time.sleep(POLL)
            healthy = time.monotonic() - start
            body = {"prompt": SHORT_PROMPT, "n_predict": 1, "temperature": 0, "cache_prompt": False}
            client.post(f"{base}/completion", json=body).raise_for_status()
            first = time.monotonic() - start
            t0 = time.monotonic()
            body = {"prompt": ids, "n_predict": 1, "temperature": 0, "cache_prompt": False}
            client.post(f"{base}/completion", json=body).raise_for_status()
            ttft = time.monotonic() - t0
        rss = peak_rss_mib(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"listening_s": listening, "healthy_s": healthy, "first_s": first, "ttft_s": ttft, "rss_mib": rss}


def llama_child(path: str, threads: int, n_ctx: int, spawned: float) -> dict[str, float]:
    """In the child: spawn-to-first-token of the short prompt, then the long prompt's first token."""
    ids = [int(i) for i in json.loads(sys.stdin.read())]
    llm = open_llama(path, n_ctx, threads)
    short = llm.tokenize(SHORT_PROMPT.encode(), add_bos=False)
    next(iter(llm.generate(short, temp=0.0)))  # evaluates the prompt, then samples the first token
    first = time.time() - spawned
    llm.reset()  # no prefix reuse: the long prompt is evaluated whole
    t0 = time.monotonic()
    next(iter(llm.generate(ids, temp=0.0)))
    ttft = time.monotonic() - t0
    rss = peak_rss_mib()
    return {"first_s": first, "ttft_s": ttft, "rss_mib": rss}


def run_llama(path: Path, ids: list[int], threads: int, n_ctx: int) -> dict[str, float]:
    spawned = time.time()
    cmd = [sys.executable, "-m", "benchmarks.startup", "_llama", str(path), str(threads), str(n_ctx), repr(spawned)]
    return run_child(cmd, ids, f"startup: llama.cpp on {path.name}")


@dataclass
class Row:
    label: str
    path: Path
    kv_mib: float
    runs: dict[str, list[dict[str, float]]] = field(default_factory=lambda: {"llmctl": [], "llama.cpp": []})

    def median(self, engine: str, key: str) -> float | None:
        values = [r[key] for r in self.runs[engine] if key in r]
        return statistics.median(values) if values else None


def _kv_mib(path: Path, n_ctx: int) -> float:
    from runtime.config import ModelConfig
    from runtime.gguf import read_gguf

    with read_gguf(path) as f:
        cfg = ModelConfig.from_gguf(f)
    head_dim = cfg.n_embd // cfg.n_head
    return 2 * cfg.n_layer * n_ctx * cfg.n_head_kv * head_dim * 2 / MIB  # K and V, fp16


def _s(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def report(rows: list[Row], args: argparse.Namespace, have_llama: bool) -> str:
    import platform

    lines = [
        f"### Time to first request and first token, {args.preset} shape, {args.threads} threads",
        "",
        f"- Command: `python -m benchmarks.startup --preset {args.preset} --rounds {args.rounds} "
        + (f"--llama-lib {args.llama_lib} " if args.llama_lib else "")
        + "--out docs/benchmarks.md`",
        f"- Date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}",
        f"- Page cache warm; median of {args.rounds} rounds, engines alternated. Long prompt: {args.prompt} tokens, "
        f"context {args.ctx}.",
        "- llmctl: `python -m runtime serve` (byte-compiled), timed from the spawn over HTTP on loopback. "
        "llama.cpp: llama-cpp-python "
        "in a fresh interpreter, no HTTP (a lower bound for llama-server)"
        + (f", {args.llama_build}." if have_llama else "."),
        "",
        "| model | engine | listening s | healthy s | first request s | TTFT long prompt s | peak RSS MiB "
        "| RSS budget MiB |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        budget = row.path.stat().st_size / MIB + row.kv_mib + RSS_SLACK_MIB
        m = row.median
        lines.append(
            f"| {row.label} | llmctl | {_s(m('llmctl', 'listening_s'))} | {_s(m('llmctl', 'healthy_s'))} "
            f"| {_s(m('llmctl', 'first_s'))} | {_s(m('llmctl', 'ttft_s'))} | {m('llmctl', 'rss_mib') or 0:.0f} "
            f"| {budget:.0f} |"
        )
        if have_llama:
            lines.append(
                f"| {row.label} | llama.cpp | | | {_s(m('llama.cpp', 'first_s'))} | {_s(m('llama.cpp', 'ttft_s'))} "
                f"| {m('llama.cpp', 'rss_mib') or 0:.0f} | |"
            )
    lines += ["", f"RSS budget = file + KV cache (fp16, the context above) + {RSS_SLACK_MIB} MiB."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_llama"]:
        threads, n_ctx, spawned = int(argv[2]), int(argv[3]), float(argv[4])
        print(json.dumps(llama_child(argv[1], threads, n_ctx, spawned)), flush=True)
        return 0
    p = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="3b")
    p.add_argument("--types", default="q8_0,q4_0")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=1000, help="tokens of the long prompt")
    p.add_argument("--ctx", type=int, default=2048, help="context of both engines")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the table into this Markdown file (between markers)")
    add_llama_lib_argument(p)
    args = p.parse_args(argv)
    use_llama_lib(p, args.llama_lib)
    try:
        import llama_cpp  # noqa: F401

        have_llama = True
        args.llama_build = llama_build()
    except ImportError:
        have_llama = False
        log("llama-cpp-python is not installed: measuring llmctl only")
    rows = []
    for key in args.types.split(","):
        variant = VARIANTS[key]
        path = ensure_model(args.preset, variant, regen=False)
        rows.append(Row(variant.label, path, _kv_mib(path, args.ctx)))
    ids = prompt_ids(rows[0].path, args.prompt)
    _held = [hold_in_page_cache(row.path) for row in rows]  # mapped until the rounds end
    # The runtime byte-compiled, as the model images ship it (manager/model_image.py) and as pip
    # installs it: with PYTHONDONTWRITEBYTECODE set (as in CI) a checkout compiles every module
    # from source at each start, ~40-60 ms of the first request that users do not pay.
    compileall.compile_dir(ROOT / "runtime", quiet=1)
    for i in range(args.rounds):
        for row in rows:
            for engine in ("llmctl", "llama.cpp") if have_llama else ("llmctl",):
                run = run_llmctl if engine == "llmctl" else run_llama
                result = run(row.path, ids, args.threads, args.ctx)
                row.runs[engine].append(result)
                log(f"round {i + 1} {row.label} {engine}: {json.dumps({k: round(v, 3) for k, v in result.items()})}")
    text = report(rows, args, have_llama)
    print(text)
    if args.out:
        write_section(args.out, "startup", text, "Time to first request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
