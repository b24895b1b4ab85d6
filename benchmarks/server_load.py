"""Aggregate throughput and time to first token of llmctl's server under concurrent streams,
side by side with llama.cpp's own server (llama-server), on the same GGUF file.

    python -m benchmarks.server_load [--preset 3b] [--type q8_0] [--streams 1,2,4,8]
        [--llama-server PATH] [--out docs/benchmarks.md]

Each server runs alone on the machine, with as many slots as the largest stream count. For each
stream count c, c clients send streaming llama.cpp-style `/completion` requests (greedy, the same
prompts for both servers) back to back; aggregate tokens/s is every generated token over the wall
time, and time to first token is measured from sending a request to its first streamed piece.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.report import write_section
from benchmarks.runtime_speed import cpu_model

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Point:
    server: str
    streams: int
    tokens_per_s: float
    ttft_median_s: float
    requests: int
    errors: int


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base: str, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server_load: the server exited with status {proc.returncode} while starting")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server_load: {base} was not ready after {timeout:.0f} s")


def prompts_for(n: int) -> list[str]:
    """Distinct code prompts of similar length (no shared prefix, so no cache reuse helps)."""
    src = (ROOT / "runtime" / "model.py").read_text()
    return [f"# variant {i}\n" + src[200 * i : 200 * i + 400] for i in range(n)]


def one_request(base: str, prompt: str, n_predict: int) -> tuple[int, float]:
    """(tokens generated, time to first token) of one streaming /completion request."""
    body = {"prompt": prompt, "n_predict": n_predict, "temperature": 0, "stream": True, "cache_prompt": False}
    start = time.monotonic()
    first = None
    tokens = 0
    with httpx.stream("POST", f"{base}/completion", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            data = json.loads(line[6:])
            if data.get("content"):
                tokens += 1
                if first is None:
                    first = time.monotonic() - start
            if data.get("stop"):
                tokens = int(data.get("tokens_predicted", tokens))
                break
    return tokens, first if first is not None else time.monotonic() - start


def measure(server: str, base: str, streams: int, per_client: int, n_predict: int) -> Point:
    prompts = prompts_for(streams * per_client)
    ttfts: list[float] = []
    counts: list[int] = []
    errors = 0
    lock = threading.Lock()

    def client(i: int) -> None:
        nonlocal errors
        for k in range(per_client):
            try:
                n, ttft = one_request(base, prompts[i * per_client + k], n_predict)
                with lock:
                    counts.append(n)
                    ttfts.append(ttft)
            except (httpx.HTTPError, ValueError):
                with lock:
                    errors += 1

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    ttft = statistics.median(ttfts) if ttfts else float("nan")
    return Point(server, streams, sum(counts) / wall, ttft, len(counts), errors)


def run_server(cmd: list[str], base: str, args: argparse.Namespace, name: str) -> list[Point]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_ready(base, proc)
        one_request(base, "def warm_up():", 4)  # page in the weights before timing
        points = []
        for c in args.streams:
            p = measure(name, base, c, args.per_client, args.n_predict)
            print(
                f"{name:10s} streams {c}: {p.tokens_per_s:6.2f} tok/s, TTFT {p.ttft_median_s:.2f} s, errors {p.errors}",
                flush=True,
            )
            points.append(p)
        return points
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def model_path(args: argparse.Namespace) -> Path:
    from runtime.testing.make_model import make_model

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "llmctl" / "bench"
    head = "q6_k" if args.type == "q4_0" else None
    path = cache / f"starcoder2-{args.preset}-{args.type}{'-q6_k' if head else ''}.gguf"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        make_model(path, arch="starcoder2", preset=args.preset, wtype=args.type, head_type=head, progress=True)
    return path


def section(args: argparse.Namespace, command: str, path: Path, points: list[Point], llama: str | None) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cpu = cpu_model()
    lines = [
        f"### Server: {args.preset} {args.type}, {args.threads} threads, streams {', '.join(map(str, args.streams))}",
        "",
        f"- Command: `{command}`",
        f"- Date: {now}; machine: {cpu}, {os.cpu_count()} cores",
        f"- File: `{path.name}` ({path.stat().st_size / 1e6:.0f} MB, random weights)",
        f"- Each stream sends {args.per_client} streaming `/completion` requests of {args.n_predict} greedy tokens "
        "back to back (distinct prompts of ~100 tokens, no prompt cache); both servers have one slot per stream.",
        "- llama.cpp: " + (f"`{llama}` (`-np {max(args.streams)} -t {args.threads}`)" if llama else "not measured"),
        "",
        "| server | streams | aggregate tok/s | median time to first token (s) | requests | errors |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {p.server} | {p.streams} | {p.tokens_per_s:.2f} | {p.ttft_median_s:.2f} | {p.requests} | {p.errors} |"
        for p in points
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m benchmarks.server_load", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="3b", choices=("tiny", "small", "3b", "7b"))
    p.add_argument("--type", default="q8_0", choices=("q8_0", "q4_0"))
    p.add_argument("--streams", default="1,2,4,8", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--per-client", type=int, default=2, help="requests per stream (default 2)")
    p.add_argument("--n-predict", type=int, default=32, help="tokens per request (default 32)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=512, help="context per slot (default 512)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), help="path to llama.cpp's llama-server")
    p.add_argument("--out", type=Path, help="rewrite the server_load section of this markdown file")
    args = p.parse_args(argv)
    if args.llama_server and not Path(args.llama_server).is_file():
        p.error(f"--llama-server: no such file: {args.llama_server}")
    path = model_path(args)
    n_slots = max(args.streams)
    points: list[Point] = []
    port = free_port()
    ours = [sys.executable, "-m", "runtime", "serve", "-m", str(path), "--port", str(port)]
    ours += ["--parallel", str(n_slots), "--threads", str(args.threads), "--ctx", str(args.ctx)]
    points += run_server(ours, f"http://127.0.0.1:{port}", args, "llmctl")
    llama = args.llama_server
    if llama:
        port = free_port()
        cmd = [llama, "-m", str(path), "--port", str(port), "-np", str(n_slots), "-t", str(args.threads)]
        cmd += ["-tb", str(args.threads), "-c", str(args.ctx * n_slots), "--no-webui"]
        points += run_server(cmd, f"http://127.0.0.1:{port}", args, "llama.cpp")
    else:
        print(
            "server_load: no llama-server given (--llama-server or LLAMA_SERVER): measuring llmctl only",
            file=sys.stderr,
        )
    text = section(args, shlex.join(["python", "-m", "benchmarks.server_load", *argv]), path, points, llama)
    print(text)
    if args.out:
        write_section(args.out, "server_load", text, "Server under concurrent streams")
        print(f"updated {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
