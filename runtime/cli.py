"""`python -m runtime`: inspect a GGUF model (`info`), generate text with it (`generate`), or serve
it over HTTP with OpenAI- and llama.cpp-compatible endpoints (`serve`, docs/server.md).

    python -m runtime info model.gguf [-o json]
    python -m runtime generate -m model.gguf -p 'def fib(n):' -n 64 --temperature 0
    python -m runtime generate -m model.gguf -p 'def f(x):\\n    ' --infill-suffix '\\n    return y\\n'
    python -m runtime serve -m model.gguf --port 8080 --parallel 4

Every `ModelError` (bad file, unsupported model, context overflow, bad sampling parameter) is
printed as one line `error: ...` on stderr with exit code 1; `--debug` shows the traceback
instead. Usage errors exit with 2, Ctrl-C with 130.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any, TextIO

from runtime.errors import ModelError
from runtime.sampling import Sampler, SamplingParams

PROG = "python -m runtime"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_DEFAULTS = SamplingParams()


# --- argument parsing --------------------------------------------------------------------------


def _int_at_least(lo: int, what: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"{what} must be at least {lo}, got {value}")
        return value

    return parse


def _float(what: str) -> Any:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{what} must be a finite number, got {text!r}")
        return value

    return parse


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; "(default: X)" after options that have a real default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if "(default" in text or not action.option_strings or default in (None, [], argparse.SUPPRESS):
            return text
        if isinstance(default, bool):  # flags
            return text
        return text + " (default: %(default)s)"


GENERATE_EXAMPLES = """\
examples:
  python -m runtime generate -m model.gguf -p 'def fib(n):' -n 64 --temperature 0
  python -m runtime generate -m model.gguf -p 'import os' --seed 1 --stop $'\\n\\n'
  python -m runtime generate -m model.gguf -p $'def f(x):\\n    ' --infill-suffix $'\\n    return y\\n'
"""


def build_parser() -> argparse.ArgumentParser:
    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=fmt,
        description="llmctl's inference runtime: inspect StarCoder / StarCoder2 GGUF models and generate text.",
        epilog="Errors are printed on one line and exit with 1; usage errors exit with 2; Ctrl-C with 130.",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    # Also accepted after the subcommand; SUPPRESS keeps a subparser from resetting the value above.
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    info = commands.add_parser(
        "info",
        parents=[debug],
        formatter_class=fmt,
        help="show what is in a GGUF model file",
        description="Show a GGUF model's architecture, size, hyperparameters, tensor types and tokenizer.",
    )
    info.add_argument("file", metavar="FILE", help="the .gguf model file")
    info.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="output format: a readable table or JSON"
    )

    gen = commands.add_parser(
        "generate",
        parents=[debug],
        formatter_class=fmt,
        help="generate text (or fill in the middle) with a GGUF model",
        description=(
            "Continue a prompt, streaming the text to stdout as it is generated; a line of statistics\n"
            "(tokens, speed, why generation stopped, seed) goes to stderr. With --infill-suffix, generate\n"
            "the code between the prompt (the prefix) and the suffix (fill in the middle)."
        ),
        epilog=GENERATE_EXAMPLES,
    )
    gen.add_argument("-m", "--model", required=True, metavar="FILE", help="the .gguf model file")
    gen.add_argument(
        "-p", "--prompt", required=True, metavar="TEXT", help="the prompt (the prefix with --infill-suffix)"
    )
    gen.add_argument(
        "-n",
        "--n-predict",
        type=_int_at_least(-1, "--n-predict"),
        default=128,
        metavar="N",
        help="most tokens to generate; -1: until end of text or the context window is full",
    )
    gen.add_argument(
        "--temperature",
        "--temp",
        type=_float("--temperature"),
        default=_DEFAULTS.temperature,
        metavar="T",
        help="sampling temperature; 0 picks the most likely token every time (greedy, deterministic)",
    )
    gen.add_argument(
        "--top-k",
        type=int,
        default=_DEFAULTS.top_k,
        metavar="K",
        help="sample only among the K most likely tokens; 0 turns it off",
    )
    gen.add_argument(
        "--top-p",
        type=_float("--top-p"),
        default=_DEFAULTS.top_p,
        metavar="P",
        help="sample only among the most likely tokens whose probabilities add up to P, in (0, 1]; 1 turns it off",
    )
    gen.add_argument(
        "--min-p",
        type=_float("--min-p"),
        default=_DEFAULTS.min_p,
        metavar="P",
        help="drop tokens less likely than P times the most likely one, in [0, 1]; 0 turns it off",
    )
    gen.add_argument(
        "--repeat-penalty",
        type=_float("--repeat-penalty"),
        default=_DEFAULTS.repeat_penalty,
        metavar="X",
        help="divide the logits of recently seen tokens by X (> 1 discourages repetition); 1 turns it off",
    )
    gen.add_argument(
        "--repeat-last-n",
        type=_int_at_least(0, "--repeat-last-n"),
        default=_DEFAULTS.repeat_last_n,
        metavar="N",
        help="how many of the last tokens --repeat-penalty looks at",
    )
    gen.add_argument(
        "--seed",
        type=_int_at_least(0, "--seed"),
        default=None,
        metavar="N",
        help="random seed: the same seed, prompt and options give the same text "
        "(default: a random seed, printed with the statistics)",
    )
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="STR",
        help="stop when this text is generated (it is not printed); repeatable. Taken literally: "
        "in bash write a newline as $'\\n'",
    )
    gen.add_argument(
        "-t",
        "--threads",
        type=_int_at_least(1, "--threads"),
        default=None,
        metavar="N",
        help="CPU threads (default: every CPU this process may use)",
    )
    gen.add_argument(
        "-c",
        "--ctx-size",
        type=_int_at_least(1, "--ctx-size"),
        default=None,
        metavar="N",
        help="context window in tokens, prompt included (default: the model's training context, at most 4096)",
    )
    gen.add_argument(
        "--infill-suffix",
        default=None,
        metavar="TEXT",
        help="fill in the middle: generate what goes between the prompt (prefix) and this suffix",
    )
    _add_no_repack(gen)
    gen.add_argument(
        "--no-special",
        dest="special",
        action="store_false",
        help="treat control-token text such as <fim_prefix> in the prompt as plain text",
    )
    _add_serve(commands, fmt, debug)
    return parser


SERVE_EXAMPLES = """\
examples:
  python -m runtime serve -m model.gguf
  LLMCTL_API_KEY=secret python -m runtime serve -m model.gguf --host 0.0.0.0 --port 8080 --parallel 8
  curl http://127.0.0.1:8080/v1/completions -d '{"prompt": "def fib(n):", "max_tokens": 32}'
"""


def _add_serve(commands: Any, fmt: type[argparse.HelpFormatter], debug: argparse.ArgumentParser) -> None:
    serve = commands.add_parser(
        "serve",
        parents=[debug],
        formatter_class=fmt,
        help="serve a GGUF model over HTTP (OpenAI and llama.cpp APIs)",
        description=(
            "Serve the model over HTTP: OpenAI's /v1/completions, /v1/chat/completions and /v1/models,\n"
            "llama.cpp's /completion, /infill, /tokenize, /detokenize, /props, plus /health and /metrics.\n"
            "Up to --parallel requests are decoded together; --max-queue more wait (then 429).\n"
            "SIGTERM or Ctrl-C finish in-flight requests within --shutdown-timeout and exit 0."
        ),
        epilog=SERVE_EXAMPLES,
    )
    serve.add_argument("-m", "--model", required=True, metavar="FILE", help="the .gguf model file")
    serve.add_argument(
        "--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface (default: 127.0.0.1)"
    )
    serve.add_argument("--port", type=_port, default=8080, help="TCP port")
    serve.add_argument(
        "-np",
        "--parallel",
        type=_int_at_least(1, "--parallel"),
        default=4,
        metavar="N",
        help="slots: requests decoded together in one batched forward pass",
    )
    serve.add_argument(
        "-c",
        "--ctx",
        "--ctx-size",
        dest="ctx",
        type=_int_at_least(1, "--ctx"),
        default=None,
        metavar="N",
        help="context window of each slot in tokens (default: the model's training context, at most 4096)",
    )
    serve.add_argument(
        "-t",
        "--threads",
        type=_int_at_least(1, "--threads"),
        default=None,
        metavar="N",
        help="CPU threads (default: every CPU this process may use)",
    )
    serve.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every endpoint but /health "
        "(default: the LLMCTL_API_KEY environment variable, which unlike this option is not visible in ps)",
    )
    serve.add_argument(
        "--max-queue",
        type=_int_at_least(0, "--max-queue"),
        default=64,
        metavar="N",
        help="requests that may wait for a free slot; beyond that the server answers 429",
    )
    serve.add_argument(
        "--timeout",
        type=_positive_float("--timeout"),
        default=600.0,
        metavar="SECONDS",
        help="longest a request may generate for; then it ends as if it reached max_tokens",
    )
    serve.add_argument(
        "--shutdown-timeout",
        type=_positive_float("--shutdown-timeout", allow_zero=True),
        default=5.0,
        metavar="SECONDS",
        help="on SIGTERM, how long in-flight requests may take to finish before they are cancelled",
    )
    serve.add_argument(
        "-a", "--alias", default=None, metavar="NAME", help="model id in /v1/models (default: the file name stem)"
    )
    serve.add_argument(
        "--sha256",
        default=None,
        metavar="DIGEST",
        help="the weights file's pinned digest (or env LLMCTL_WEIGHTS_SHA256): checked before the model loads, "
        "a mismatch refuses to serve; a record of a successful check lets the next start skip the hash",
    )
    serve.add_argument("--rehash", action="store_true", help="hash the weights even when a check record exists")
    _add_no_repack(serve)
    serve.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="info", help="server log level"
    )
    serve.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")


def _add_no_repack(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-repack",
        dest="repack",
        action="store_false",
        default=None,
        help="keep Q4_0 and Q8_0 matrices in the file's layout; by default they are repacked for faster "
        "kernels while the model already serves (Q4_0 on CPUs with AVX2, Q8_0 with AVX-512; the same "
        "results, the matrices' size in memory in place of the file's pages: ~1.6 GB for a 3B Q4_0 model); "
        "a prompt of 64 tokens or more that comes before they are done repacks the rest first",
    )


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--port must be an integer, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"--port must be in 0..65535, got {value}")
    return value


def _positive_float(what: str, allow_zero: bool = False) -> Any:
    finite = _float(what)

    def parse(text: str) -> float:
        value: float = finite(text)
        if value < 0 or (value == 0 and not allow_zero):
            raise argparse.ArgumentTypeError(f"{what} must be {'>= 0' if allow_zero else '> 0'}, got {text}")
        return value

    return parse


# --- info --------------------------------------------------------------------------------------


def _human(n: float, units: Sequence[str], base: float = 1000.0) -> str:
    for unit in units[:-1]:
        if abs(n) < base:
            return f"{n:.0f} {unit}" if unit == units[0] else f"{n:.2f} {unit}"
        n /= base
    return f"{n:.2f} {units[-1]}"


def model_info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Everything `info` shows, as plain JSON-ready values. Raises ModelError like Model.load."""
    import numpy as np

    from runtime.config import ModelConfig
    from runtime.ggml_types import FileType
    from runtime.gguf import read_gguf
    from runtime.tokenizer import CodeTokenizer

    with read_gguf(path) as f:
        cfg = ModelConfig.from_gguf(f)
        tok = CodeTokenizer.from_gguf(f)
        size = f.path.stat().st_size
        ftype = f.get("general.file_type")
        try:
            ftype_name = FileType(ftype).name if ftype is not None else None
        except ValueError:
            ftype_name = str(ftype)
        # float metadata is float32: show its shortest repr (1e-05, not 9.999999747378752e-06)
        hyper = {
            k: float(str(np.float32(v))) if isinstance(v, float) else v
            for k, v in asdict(cfg).items()
            if k not in ("arch", "name")
        }
        hyper["head_dim"] = cfg.head_dim
        if cfg.arch != "starcoder2":
            del hyper["rope_freq_base"]

        def token(i: int | None) -> dict[str, Any] | None:
            return None if i is None else {"id": i, "text": tok.tokens[i]}

        return {
            "file": str(f.path),
            "architecture": cfg.arch,
            "name": cfg.name,
            "file_size": size,
            "gguf_version": f.version,
            "file_type": ftype_name,
            "parameters": sum(t.n_elements for t in f.tensors.values()),
            "hyperparameters": hyper,
            "tensors": len(f.tensors),
            "tensor_types": dict(Counter(t.ggml_type.name for t in f.tensors.values())),
            "tokenizer": {
                "model": f.get("tokenizer.ggml.model"),
                "pre": f.get("tokenizer.ggml.pre"),
                "vocab_size": tok.n_vocab,
                "merges": len(f.get("tokenizer.ggml.merges") or []),
                "bos": token(tok.bos_id),
                "eos": token(tok.eos_id),
                "add_bos": tok.add_bos,
            },
            "fim_tokens": {role: token(i) for role, i in tok.fim_ids.items()},
        }


def _format_info(info: dict[str, Any]) -> str:
    def tok(t: dict[str, Any] | None) -> str:
        return "-" if t is None else f"{t['id']} {t['text']}"

    t = info["tokenizer"]
    rows: list[tuple[str, str]] = [
        ("file", info["file"]),
        ("architecture", info["architecture"]),
        ("name", info["name"]),
        ("file size", f"{_human(info['file_size'], ('B', 'kB', 'MB', 'GB', 'TB'))} ({info['file_size']} bytes)"),
        ("GGUF version", str(info["gguf_version"])),
        ("file type", info["file_type"] or "-"),
        ("parameters", f"{_human(info['parameters'], ('', 'K', 'M', 'B', 'T')).strip()} ({info['parameters']})"),
    ]
    rows += [(f"  {k}", str(v)) for k, v in info["hyperparameters"].items()]
    rows += [
        ("tensors", str(info["tensors"])),
        ("tensor types", ", ".join(f"{k}: {v}" for k, v in info["tensor_types"].items())),
        ("tokenizer", f"{t['model']} (pre-tokenizer {t['pre']})"),
        ("  vocab size", str(t["vocab_size"])),
        ("  merges", str(t["merges"])),
        ("  bos", tok(t["bos"])),
        ("  eos", tok(t["eos"])),
        ("  add_bos", str(t["add_bos"]).lower()),
        ("FIM tokens", "-" if not info["fim_tokens"] else ""),
    ]
    rows += [(f"  {role}", tok(v)) for role, v in info["fim_tokens"].items()]
    # hyperparameters follow "parameters" under their own heading
    at = next(i for i, (k, _) in enumerate(rows) if k.startswith("  "))
    rows.insert(at, ("hyperparameters", ""))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}".rstrip() for k, v in rows)


def cmd_info(args: argparse.Namespace, out: TextIO) -> int:
    info = model_info(args.file)
    if args.output == "json":
        out.write(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    else:
        out.write(_format_info(info) + "\n")
    out.flush()
    return 0


# --- generate ----------------------------------------------------------------------------------


class _TimedSampler(Sampler):
    """A Sampler that notes when it is first called: the end of the prompt's prefill."""

    first_call: float | None = None

    def __call__(self, logits: Any, history: Sequence[int]) -> int:
        if self.first_call is None:
            self.first_call = time.perf_counter()
        return super().__call__(logits, history)


def _write(stream: TextIO, text: str) -> None:
    try:
        stream.write(text)
    except UnicodeEncodeError:  # a terminal or pipe that cannot show every character
        enc = stream.encoding or "utf-8"
        stream.write(text.encode(enc, errors="replace").decode(enc, errors="replace"))
    stream.flush()


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:.1f} tokens/s" if n and seconds > 0 else "- tokens/s"


def cmd_generate(args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    from runtime.engine import Model
    from runtime.generate import Completion, generate

    seed = args.seed if args.seed is not None else secrets.randbelow(2**32)
    params = SamplingParams(
        args.temperature, args.top_k, args.top_p, args.min_p, args.repeat_penalty, args.repeat_last_n, seed
    )
    sampler = _TimedSampler(params)  # validates the parameters before the model is loaded
    max_tokens = None if args.n_predict < 0 else args.n_predict
    with Model.load(args.model, n_threads=args.threads, n_ctx=args.ctx_size, repack=args.repack) as model:
        if args.infill_suffix is not None:
            ids = model.infill_ids(args.prompt, args.infill_suffix)
        else:
            ids = model.tokenize(args.prompt, special=args.special)
        res = Completion()
        start = time.perf_counter()
        for piece in generate(
            model.transformer,
            model.cache,
            model.tokenizer,
            ids,
            sampler,
            max_tokens=max_tokens,
            stop=args.stop,
            result=res,
        ):
            _write(out, piece)
        end = time.perf_counter()
    _write(out, "\n")
    prefill_end = sampler.first_call if sampler.first_call is not None else end
    n_prefilled = res.prompt_tokens if sampler.first_call is not None else 0  # -n 0 runs no prefill
    n_gen = len(res.tokens)
    err.write(
        f"prompt: {res.prompt_tokens} tokens, {_rate(n_prefilled, prefill_end - start)} | "
        f"generated: {n_gen} tokens, {_rate(n_gen, end - prefill_end)} | "
        f"finish: {res.finish_reason} | seed: {seed}\n"
    )
    err.flush()
    return 0


# --- serve -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    api_key = args.api_key if args.api_key is not None else os.environ.get("LLMCTL_API_KEY") or None
    sha256 = args.sha256 or os.environ.get("LLMCTL_WEIGHTS_SHA256") or None
    if sha256 is not None:
        from runtime.verify import parse_digest

        sha256 = parse_digest(sha256)  # a malformed digest fails now, not after the port is bound
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from runtime.server.loading import ModelLoad

    # The load starts now, and the HTTP stack is imported while the file is pre-faulted (without
    # the GIL): the first answer comes sooner than with one after the other.
    load = ModelLoad(
        args.model,
        n_threads=args.threads,
        n_ctx=args.ctx,
        weights_sha256=sha256,
        rehash=args.rehash,
        repack=args.repack,
    )
    try:
        from runtime.server.serve import run
        from runtime.server.state import ServerConfig
    except ImportError as e:  # an image built without the server's dependencies
        raise ModelError(f"the server needs starlette, uvicorn and prometheus-client: {e}") from None
    # Fail fast, before binding the port, on a file that is missing or not a supported model; the
    # rest of the load (digest, every tensor checked, pages mapped) goes on while /health says "loading".
    header_error = load.wait_checked()
    if header_error is not None:
        raise ModelError(header_error)
    logging.getLogger("llmctl.server").info("loading %s", args.model)
    config = ServerConfig(
        n_parallel=args.parallel,
        max_queue=args.max_queue,
        n_ctx=args.ctx,
        n_threads=args.threads,
        api_key=api_key,
        alias=args.alias,
        request_timeout=args.timeout,
        shutdown_timeout=args.shutdown_timeout,
        weights_sha256=sha256,
        rehash=args.rehash,
    )
    return run(
        load, host=args.host, port=args.port, config=config, log_level=args.log_level, access_log=args.access_log
    )


# --- entry point -------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "unknown error"


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 ok, 1 error, 2 usage, 130 interrupted)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        if args.command == "info":
            return cmd_info(args, sys.stdout)
        if args.command == "serve":
            return cmd_serve(args)
        return cmd_generate(args, sys.stdout, sys.stderr)
    except ModelError as e:
        if args.debug:
            raise
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        if args.debug:
            raise
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # e.g. `| head`: the reader is gone, nothing more to say
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return EXIT_ERROR
